"""The emergency announcement player (media/announcement.py): G.711, the SIT, WAV, RTP.

A UDP socket on 127.0.0.1 stands in for the caller's phone: the player gets an SDP offer
pointing at it, and what arrives is checked as RTP (RFC 3550 header fields, 20 ms pacing)
and as audio (G.711 decoded, tones found with a Goertzel filter).
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import struct
import time
import wave
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from media.announcement import (
    PCMA,
    PCMU,
    SAMPLES_PER_PACKET,
    SIT_FREQUENCIES_HZ,
    AnnouncementFileError,
    AnnouncementPlayer,
    AnnouncementSession,
    alaw_to_linear,
    decode_alaw,
    decode_ulaw,
    encode_alaw,
    encode_ulaw,
    linear_to_alaw,
    linear_to_ulaw,
    load_wav,
    sit_samples,
    tone_samples,
    ulaw_to_linear,
)
from media.backend import MediaError, PortsExhausted, SdpError
from media.ports import PortAllocator
from media.sdp import parse_sdp

HOST = "127.0.0.1"
RECEIVE_TIMEOUT_S = 2.0


# -- helpers ------------------------------------------------------------------------------


def goertzel_power(samples: array[int] | list[int], frequency: float, rate: int = 8000) -> float:
    """Normalised power of ``frequency`` in ``samples`` (Goertzel's recurrence)."""
    coefficient = 2 * math.cos(2 * math.pi * frequency / rate)
    previous = before = 0.0
    for sample in samples:
        previous, before = sample + coefficient * previous - before, previous
    power = previous * previous + before * before - coefficient * previous * before
    return power / max(len(samples), 1) ** 2


def dominant(samples: array[int], candidates: tuple[float, ...]) -> float:
    return max(candidates, key=lambda frequency: goertzel_power(samples, frequency))


def sdp(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def offer_for(port: int, formats: str = "0 8 101", host: str = HOST, *extra: str) -> bytes:
    return sdp(
        "v=0",
        f"o=dev1 1 1 IN IP4 {host}",
        "s=-",
        f"c=IN IP4 {host}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {formats}",
        "a=rtpmap:101 telephone-event/8000",
        *extra,
    )


def free_pair() -> int:
    """An even port whose pair (port, port + 1) is free on loopback right now."""
    for _ in range(200):
        port = random.randrange(42000, 60000, 2)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one:
                one.bind((HOST, port))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two:
                    two.bind((HOST, port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free UDP port pair found on loopback")


def parse_rtp(packet: bytes) -> dict[str, int | bytes]:
    first, second, seq, timestamp, ssrc = struct.unpack("!BBHII", packet[:12])
    return {
        "version": first >> 6,
        "padding": (first >> 5) & 1,
        "extension": (first >> 4) & 1,
        "csrc_count": first & 0x0F,
        "marker": second >> 7,
        "payload_type": second & 0x7F,
        "seq": seq,
        "timestamp": timestamp,
        "ssrc": ssrc,
        "payload": packet[12:],
    }


async def receive(sock: socket.socket, count: int) -> list[tuple[float, bytes]]:
    """``count`` datagrams with their arrival time on the loop clock (bounded wait)."""
    loop = asyncio.get_running_loop()
    out: list[tuple[float, bytes]] = []
    for _ in range(count):
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), RECEIVE_TIMEOUT_S)
        out.append((loop.time(), data))
    return out


def drain(sock: socket.socket) -> int:
    """Datagrams waiting on a non-blocking socket (bounded)."""
    count = 0
    for _ in range(10_000):
        try:
            sock.recv(2048)
        except BlockingIOError:
            return count
        count += 1
    return count


@pytest.fixture
def phones() -> Iterator[list[socket.socket]]:
    """Factory list: append opened loopback UDP sockets; all are closed afterwards."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def phone(opened: list[socket.socket]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    opened.append(sock)
    return sock


@pytest.fixture
def ports() -> PortAllocator:
    low = free_pair()
    return PortAllocator(low, low + 2 * 4 - 1)


@pytest.fixture
async def players() -> AsyncIterator[list[AnnouncementPlayer]]:
    started: list[AnnouncementPlayer] = []
    yield started
    for player in started:
        player.stop()
    for player in started:
        if player.running or player.port is not None:
            await asyncio.wait_for(player.wait(), 2.0)


async def start_player(
    started: list[AnnouncementPlayer],
    offer: bytes,
    ports: PortAllocator,
    wav: Path | None = None,
    **options: float,
) -> tuple[AnnouncementPlayer, bytes]:
    player = AnnouncementPlayer(**options)  # type: ignore[arg-type]
    started.append(player)
    answer = await player.start(offer, bind_host=HOST, advertise_host=HOST, ports=ports, wav=wav)
    return player, answer


def write_wav(path: Path, samples: list[int], *, rate: int = 8000, channels: int = 1,
              width: int = 2) -> Path:  # fmt: skip
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        if width == 2:
            writer.writeframes(array("h", samples * channels).tobytes())
        else:
            writer.writeframes(bytes(128 for _ in samples * channels))
    return path


# -- G.711 ----------------------------------------------------------------------------------


def test_g711_known_code_points() -> None:
    # Zero: positive zero codes; -1 mirrors to the negative zero codes.
    assert linear_to_ulaw(0) == 0xFF
    assert linear_to_alaw(0) == 0xD5
    assert linear_to_ulaw(-1) == 0x7F
    assert linear_to_alaw(-1) == 0x55
    # Full scale, both signs.
    assert linear_to_ulaw(32767) == 0x80
    assert linear_to_ulaw(-32768) == 0x00
    assert linear_to_alaw(32767) == 0xAA
    assert linear_to_alaw(-32768) == 0x2A
    # Middle of the range: segment and step worked out by hand from G.711's tables.
    assert linear_to_ulaw(1000) == 0xCE  # 14-bit 250 + 33 = 283: segment 3, step 1
    assert linear_to_alaw(3210) == 0x9C  # 12-bit 200: segment 4, step 9, even bits inverted
    assert linear_to_ulaw(-1000) == 0x4E
    assert linear_to_alaw(-3210) == 0x1C
    # Decoding gives the middle of each step.
    assert ulaw_to_linear(0xFF) == 0 and ulaw_to_linear(0x7F) == 0
    assert alaw_to_linear(0xD5) == 8 and alaw_to_linear(0x55) == -8
    assert ulaw_to_linear(0x80) == 32124 and ulaw_to_linear(0x00) == -32124
    assert alaw_to_linear(0xAA) == 32256 and alaw_to_linear(0x2A) == -32256


def test_g711_round_trip_and_monotonic() -> None:
    for encode, decode in ((linear_to_ulaw, ulaw_to_linear), (linear_to_alaw, alaw_to_linear)):
        codes = [code for code in range(256) if not (encode is linear_to_ulaw and code == 0x7F)]
        assert all(encode(decode(code)) == code for code in codes)
        levels = sorted(decode(code) for code in codes)
        assert len(set(levels)) == len(levels)  # every code a distinct level
    # Symmetric quantiser: a negative sample x is coded as the mirror of ~x = -x - 1.
    assert all(linear_to_ulaw(~x) == linear_to_ulaw(x) ^ 0x80 for x in range(32768))
    assert all(linear_to_alaw(~x) == linear_to_alaw(x) ^ 0x80 for x in range(32768))
    samples = array("h", range(-32768, 32768))
    for encode_all, decode_all in ((encode_ulaw, decode_ulaw), (encode_alaw, decode_alaw)):
        decoded = decode_all(encode_all(samples))
        assert len(decoded) == 65536
        assert all(a <= b for a, b in zip(decoded, decoded[1:], strict=False))  # monotonic
        worst = max(abs(d - x) - abs(x) / 31 for x, d in zip(samples, decoded, strict=True))
        assert worst <= 16  # under ~3 % relative error, a few units near zero


def test_g711_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        linear_to_ulaw(32768)
    with pytest.raises(ValueError, match="out of range"):
        linear_to_alaw(-32769)
    with pytest.raises(ValueError, match="out of range"):
        encode_ulaw([0, 40000])
    with pytest.raises(ValueError, match="out of range"):
        ulaw_to_linear(256)
    with pytest.raises(TypeError, match="integers"):
        linear_to_alaw(0.5)  # type: ignore[arg-type]
    assert PCMU.payload_type == 0 and PCMA.payload_type == 8


# -- tones and WAV ---------------------------------------------------------------------------


def test_tone_samples_frequency_length_level() -> None:
    tone = tone_samples(1400, 100, level_dbm0=-10)
    assert len(tone) == 800
    assert dominant(tone, (950.0, 1400.0, 1800.0, 1000.0)) == 1400.0
    peak = max(abs(v) for v in tone)
    assert 32767 * 10 ** (-13.17 / 20) * 0.98 <= peak <= 32767 * 10 ** (-13.17 / 20) * 1.01
    assert abs(tone[0]) < 200 and abs(tone[-1]) < 200  # ramped in and out: no click
    with pytest.raises(ValueError, match="frequency"):
        tone_samples(4000, 10)
    with pytest.raises(ValueError, match="duration"):
        tone_samples(950, -1)
    with pytest.raises(ValueError, match="full scale"):
        tone_samples(950, 10, level_dbm0=6)


def test_sit_cycle_follows_e180() -> None:
    cycle = sit_samples()
    assert len(cycle) == 3 * 2640 + 8000  # 3 x 330 ms of tone, 1000 ms of silence
    for index, frequency in enumerate(SIT_FREQUENCIES_HZ):
        segment = cycle[index * 2640 + 80 : (index + 1) * 2640 - 80]
        assert dominant(segment, SIT_FREQUENCIES_HZ) == frequency
        others = [goertzel_power(segment, f) for f in SIT_FREQUENCIES_HZ if f != frequency]
        assert goertzel_power(segment, frequency) > 100 * max(others)
    assert not any(cycle[3 * 2640 :])  # the silent interval is digital silence


def test_load_wav_reads_samples(tmp_path: Path) -> None:
    samples = [0, 1, -1, 32767, -32768, 1234]
    assert list(load_wav(write_wav(tmp_path / "ok.wav", samples))) == samples


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": 16000}, "16000 Hz"),
        ({"channels": 2}, "2 channels"),
        ({"width": 1}, "8-bit"),
    ],
)
def test_load_wav_wrong_format(tmp_path: Path, options: dict[str, int], message: str) -> None:
    path = write_wav(tmp_path / "bad.wav", [0] * 80, **options)
    with pytest.raises(AnnouncementFileError, match=message) as info:
        load_wav(path)
    assert str(path) in str(info.value) and "8000 Hz mono 16-bit PCM" in str(info.value)


def test_load_wav_not_a_wav_missing_empty_float(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    with pytest.raises(AnnouncementFileError, match="not a PCM WAV"):
        load_wav(text)
    with pytest.raises(AnnouncementFileError, match="no such file"):
        load_wav(tmp_path / "missing.wav")
    with pytest.raises(AnnouncementFileError, match="no audio"):
        load_wav(write_wav(tmp_path / "empty.wav", []))
    # IEEE float WAV (format tag 3): RIFF header written by hand.
    data = struct.pack("<4f", 0.0, 0.5, -0.5, 0.0)
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    floating = tmp_path / "float.wav"
    floating.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(AnnouncementFileError, match="not a PCM WAV") as info:
        load_wav(floating)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MediaError)


# -- the player --------------------------------------------------------------------------------


async def test_plays_sit_as_pcmu_rtp(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    offer = offer_for(caller.getsockname()[1], "0 8 101")
    player, answer = await start_player(players, offer, ports)

    parsed = parse_sdp(answer)
    assert len(parsed.media) == 1
    audio = parsed.media[0]
    assert audio.formats == ["0"] and audio.port == player.port
    assert audio.attribute("rtpmap") == "0 PCMU/8000"
    assert parsed.stream_connection(0) is not None
    assert parsed.stream_connection(0).address == HOST  # type: ignore[union-attr]

    received = await receive(caller, 55)  # ~1.1 s
    packets = [parse_rtp(data) for _, data in received]
    assert all(p["version"] == 2 and p["payload_type"] == 0 for p in packets)
    assert all(p["padding"] == 0 and p["extension"] == 0 and p["csrc_count"] == 0 for p in packets)
    assert [p["marker"] for p in packets] == [1] + [0] * 54
    assert len({p["ssrc"] for p in packets}) == 1
    assert all(len(p["payload"]) == SAMPLES_PER_PACKET for p in packets)  # type: ignore[arg-type]
    for before, after in zip(packets, packets[1:], strict=False):
        assert after["seq"] == (before["seq"] + 1) & 0xFFFF  # type: ignore[operator]
        assert after["timestamp"] == (before["timestamp"] + 160) & 0xFFFFFFFF  # type: ignore[operator]

    # Pacing: 54 intervals of 20 ms = 1.08 s (loose bounds: 2 shared cores).
    elapsed = received[-1][0] - received[0][0]
    assert 0.85 <= elapsed <= 1.5, elapsed

    audio_samples = decode_ulaw(b"".join(p["payload"] for p in packets))  # type: ignore[misc]
    first = audio_samples[80:2560]  # inside the first 330 ms
    second = audio_samples[2720:5200]  # inside the next 330 ms
    third = audio_samples[5360:7840]
    assert dominant(first, SIT_FREQUENCIES_HZ) == 950.0
    assert goertzel_power(first, 950) > 100 * goertzel_power(first, 1400)
    assert dominant(second, SIT_FREQUENCIES_HZ) == 1400.0
    assert goertzel_power(second, 1400) > 100 * goertzel_power(second, 950)
    assert dominant(third, SIT_FREQUENCIES_HZ) == 1800.0
    assert player.running and player.source == "sit" and player.packets_sent >= 55


async def test_pcma_when_offer_lacks_pcmu(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    offer = offer_for(caller.getsockname()[1], "18 8 101")
    player, answer = await start_player(players, offer, ports)
    audio = parse_sdp(answer).media[0]
    assert audio.formats == ["8"] and audio.attribute("rtpmap") == "8 PCMA/8000"
    packets = [parse_rtp(data) for _, data in await receive(caller, 10)]
    assert {p["payload_type"] for p in packets} == {8}
    decoded = decode_alaw(b"".join(p["payload"] for p in packets))  # type: ignore[misc]
    assert dominant(decoded[80:1520], SIT_FREQUENCIES_HZ) == 950.0
    assert player.codec is PCMA


@pytest.mark.parametrize(
    "media_line",
    [
        "m=audio 4000 RTP/AVP 18 101",  # G.729 only
        "m=audio 4000 RTP/SAVP 0 8",  # SRTP: no keys to answer with
        "m=audio 0 RTP/AVP 0 8",  # the audio stream is disabled
        "m=video 4000 RTP/AVP 0",  # not audio
    ],
)
async def test_488_without_pcmu_or_pcma(media_line: str, ports: PortAllocator) -> None:
    offer = sdp("v=0", "o=dev1 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
                media_line)  # fmt: skip
    player = AnnouncementPlayer()
    with pytest.raises(SdpError, match="PCMU \\(0\\) or PCMA \\(8\\)") as info:
        await player.start(offer, bind_host=HOST, advertise_host=HOST, ports=ports)
    assert info.value.status == 488
    assert ports.in_use == 0  # nothing allocated for a refused offer
    assert not player.running


async def test_malformed_offer_is_488(ports: PortAllocator) -> None:
    with pytest.raises(SdpError) as info:
        await AnnouncementPlayer().start(
            b"not sdp", bind_host=HOST, advertise_host=HOST, ports=ports
        )
    assert info.value.status == 488 and ports.in_use == 0


async def test_answer_rejects_other_streams_and_mirrors_direction(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    port = caller.getsockname()[1]
    offer = sdp(
        "v=0", "o=dev1 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0",
        "m=video 5000 RTP/AVP 96", "a=rtpmap:96 H264/90000",
        f"m=audio {port} RTP/AVP 8", "a=recvonly",
        "m=audio 5004 RTP/AVP 0",
    )  # fmt: skip
    player, answer = await start_player(players, offer, ports)
    parsed = parse_sdp(answer)
    assert [(m.media, m.port) for m in parsed.media] == [
        ("video", 0),
        ("audio", player.port),
        ("audio", 0),
    ]
    assert parsed.media[1].direction == "sendonly"  # answering a recvonly offer
    assert parse_rtp((await receive(caller, 1))[0][1])["payload_type"] == 8


async def test_sendonly_offer_gets_recvonly_and_no_audio(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    offer = offer_for(caller.getsockname()[1], "0", HOST, "a=sendonly")
    player, answer = await start_player(players, offer, ports)
    assert parse_sdp(answer).media[0].direction == "recvonly"
    await asyncio.sleep(0.1)
    assert drain(caller) == 0 and player.packets_sent == 0


async def test_stop_releases_the_port(phones: list[socket.socket]) -> None:
    caller = phone(phones)
    low = free_pair()
    ports = PortAllocator(low, low + 1)  # exactly one pair
    finished: list[bool] = []
    player = AnnouncementPlayer(on_finished=lambda: finished.append(True))
    try:
        await player.start(
            offer_for(caller.getsockname()[1]), bind_host=HOST, advertise_host=HOST, ports=ports
        )
        assert player.port == low and ports.available == 0
        with pytest.raises(PortsExhausted) as info:
            await AnnouncementPlayer().start(
                offer_for(caller.getsockname()[1]),
                bind_host=HOST,
                advertise_host=HOST,
                ports=ports,
            )
        assert info.value.status == 503
        await receive(caller, 2)
    finally:
        player.stop()
    player.stop()  # idempotent
    await asyncio.wait_for(player.wait(), 2.0)
    assert player.finished and not player.running and finished == [True]
    assert ports.allocate() == low  # back in the allocator...
    for port in (low, low + 1):  # ...and really closed: bindable again
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind((HOST, port))
    ports.release(low)
    await asyncio.sleep(0.06)
    drain(caller)
    await asyncio.sleep(0.06)
    assert drain(caller) == 0  # nothing sent after stop


async def test_stops_by_itself_after_max_seconds(
    phones: list[socket.socket], ports: PortAllocator
) -> None:
    caller = phone(phones)
    player = AnnouncementPlayer(max_seconds=0.3)
    await player.start(
        offer_for(caller.getsockname()[1]), bind_host=HOST, advertise_host=HOST, ports=ports
    )
    await asyncio.wait_for(player.wait(), 2.0)
    assert not player.running and ports.in_use == 0
    assert player.packets_sent == 15  # 0.3 s / 20 ms
    assert drain(caller) == 15


async def test_latches_to_the_phone_rtp_source(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    private = phone(phones)  # the address in the SDP (a NATed phone's private one)
    public = phone(phones)  # where the phone's RTP really comes from
    intruder = phone(phones)
    player, _ = await start_player(players, offer_for(private.getsockname()[1]), ports)
    await receive(private, 1)
    rtp = struct.pack("!BBHII", 0x80, 0, 1, 160, 0x1234) + bytes(160)
    public.sendto(b"junk", (HOST, player.port))  # not RTP: not latched to
    public.sendto(rtp, (HOST, player.port))
    await receive(public, 3)
    assert player.latched and player.target == public.getsockname()
    intruder.sendto(rtp, (HOST, player.port))  # no hijack after latching
    await asyncio.sleep(0.05)
    drain(public)
    await receive(public, 2)
    assert player.target == public.getsockname() and player.dropped == 1
    assert drain(intruder) == 0
    await asyncio.sleep(0.05)
    drain(private)
    await asyncio.sleep(0.05)
    assert drain(private) == 0  # nothing goes to the SDP address any more


async def test_hold_address_waits_for_latching(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    player, _ = await start_player(players, offer_for(9, "0", "0.0.0.0"), ports)
    await asyncio.sleep(0.06)
    assert player.target is None and player.packets_sent == 0
    caller.sendto(struct.pack("!BBHII", 0x80, 0, 1, 160, 7) + bytes(160), (HOST, player.port))
    first = parse_rtp((await receive(caller, 1))[0][1])
    assert first["marker"] == 1  # the first packet actually sent carries the marker


async def test_wav_replaces_the_tone(
    tmp_path: Path,
    phones: list[socket.socket],
    ports: PortAllocator,
    players: list[AnnouncementPlayer],
) -> None:
    rng = random.Random(20)
    samples = [rng.randrange(-20000, 20000) for _ in range(400)]  # 50 ms: 2.5 packets
    path = write_wav(tmp_path / "announcement.wav", samples)
    caller = phone(phones)
    player, _ = await start_player(players, offer_for(caller.getsockname()[1]), ports, wav=path)
    assert player.source == "wav" and player.wav_error is None
    payloads = [parse_rtp(data)["payload"] for _, data in await receive(caller, 6)]
    looped = encode_ulaw(samples) + bytes([0xFF]) * 80  # padded to whole 20 ms packets
    assert b"".join(payloads) == looped * 2  # type: ignore[arg-type]


async def test_unusable_wav_falls_back_to_sit(
    tmp_path: Path,
    phones: list[socket.socket],
    ports: PortAllocator,
    players: list[AnnouncementPlayer],
) -> None:
    path = write_wav(tmp_path / "stereo.wav", [0] * 160, channels=2)
    caller = phone(phones)
    offer = offer_for(caller.getsockname()[1], "8")
    player, _ = await start_player(players, offer, ports, wav=path)
    assert player.source == "sit" and player.wav_error and "2 channels" in player.wav_error
    packets = [parse_rtp(data) for _, data in await receive(caller, 10)]
    decoded = decode_alaw(b"".join(p["payload"] for p in packets))  # type: ignore[misc]
    assert dominant(decoded[80:1520], SIT_FREQUENCIES_HZ) == 950.0


async def test_start_twice_and_bad_settings(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    player, _ = await start_player(players, offer_for(caller.getsockname()[1]), ports)
    with pytest.raises(MediaError, match="already started"):
        await player.start(
            offer_for(caller.getsockname()[1]), bind_host=HOST, advertise_host=HOST, ports=ports
        )
    with pytest.raises(ValueError, match="max_seconds"):
        AnnouncementPlayer(max_seconds=0)
    with pytest.raises(ValueError, match="max_seconds"):
        AnnouncementPlayer(max_seconds=float("inf"))
    with pytest.raises(SdpError, match="not an IP address"):
        await AnnouncementPlayer().start(
            offer_for(caller.getsockname()[1]),
            bind_host=HOST,
            advertise_host="switch.example.com",
            ports=ports,
        )


async def test_pacing_follows_the_start_time_after_a_stall(
    phones: list[socket.socket], ports: PortAllocator, players: list[AnnouncementPlayer]
) -> None:
    caller = phone(phones)
    player, _ = await start_player(players, offer_for(caller.getsockname()[1]), ports)
    received = await receive(caller, 5)
    time.sleep(0.2)  # the event loop is blocked: ~10 packets are late
    received += await receive(caller, 20)
    packets = [parse_rtp(data) for _, data in received]
    seqs = [int(p["seq"]) for p in packets]  # type: ignore[call-overload]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    steps = [
        (int(b["timestamp"]) - int(a["timestamp"])) & 0xFFFFFFFF  # type: ignore[call-overload]
        for a, b in zip(packets, packets[1:], strict=False)
    ]
    assert all(step % 160 == 0 for step in steps)
    assert max(steps) > 160 and player.skipped > 0  # skipped ahead, no burst of old audio
    # Media time and wall time agree at the end: the stall left no lasting delay.
    media_s = ((int(packets[-1]["timestamp"]) - int(packets[0]["timestamp"])) & 0xFFFFFFFF) / 8000  # type: ignore[call-overload]
    wall_s = received[-1][0] - received[0][0]
    assert abs(wall_s - media_s) < 0.05, (wall_s, media_s)


async def test_stop_while_starting_gives_the_port_back(
    phones: list[socket.socket], ports: PortAllocator
) -> None:
    caller = phone(phones)
    player = AnnouncementPlayer()
    starting = asyncio.ensure_future(
        player.start(
            offer_for(caller.getsockname()[1]), bind_host=HOST, advertise_host=HOST, ports=ports
        )
    )
    await asyncio.sleep(0)  # start() is now inside its first await
    player.stop()  # the caller hung up meanwhile
    with pytest.raises(MediaError, match="stopped while starting"):
        await asyncio.wait_for(starting, 2.0)
    await asyncio.wait_for(player.wait(), 2.0)
    assert ports.in_use == 0 and player.packets_sent == 0
    await asyncio.sleep(0.05)
    assert drain(caller) == 0


async def test_ipv6_loopback(
    phones: list[socket.socket], players: list[AnnouncementPlayer]
) -> None:
    caller = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    phones.append(caller)
    caller.bind(("::1", 0))
    caller.setblocking(False)
    offer = sdp(
        "v=0", "o=dev1 1 1 IN IP6 ::1", "s=-", "c=IN IP6 ::1", "t=0 0",
        f"m=audio {caller.getsockname()[1]} RTP/AVP 0",
    )  # fmt: skip
    low = random.randrange(42000, 60000, 2)
    player = AnnouncementPlayer()
    players.append(player)
    answer = await player.start(
        offer, bind_host="::1", advertise_host="::1", ports=PortAllocator(low, low + 63)
    )
    assert "c=IN IP6 ::1" in answer.decode()
    assert parse_rtp((await receive(caller, 2))[1][1])["payload_type"] == 0


async def test_session_binds_the_switch_settings(
    tmp_path: Path, phones: list[socket.socket], ports: PortAllocator
) -> None:
    caller = phone(phones)
    path = write_wav(tmp_path / "a.wav", [1000, -1000] * 80)
    session = AnnouncementSession(ports=ports, bind_host=HOST, advertise_host=HOST, wav=path)
    answer = await session.start(offer_for(caller.getsockname()[1], "8"))
    try:
        assert f"m=audio {session.player.port} RTP/AVP 8" in answer.decode()
        payload = parse_rtp((await receive(caller, 1))[0][1])["payload"]
        assert payload == encode_alaw([1000, -1000] * 80)
    finally:
        session.stop()
    await asyncio.wait_for(session.wait(), 2.0)
    assert ports.in_use == 0

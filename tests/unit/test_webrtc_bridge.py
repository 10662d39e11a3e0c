"""WebRTC-to-RTP bridge: a browser peer (aiortc) and a desk phone (UDP) on loopback.

The "browser" is an aiortc peer sending a 1 kHz tone; the "phone" is a plain UDP socket
sending G.711 RTP of a 440 Hz tone. Each side must hear the other's tone through the
bridge, in both call directions, within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
from array import array
from collections.abc import AsyncIterator, Callable

import aioice.ice
import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from media.announcement import PCMA, PCMU, G711Codec
from media.backend import MediaError, SdpError
from media.ports import PortAllocator
from media.webrtc import ToneTrack, WebRtcBridge

DEADLINE_S = 5.0
WINDOW = 800  # samples at 8 kHz: 100 ms


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """ICE host candidates on 127.0.0.1 only: no traffic leaves loopback."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def goertzel_power(samples: list[int] | array[int], frequency: float, rate: int = 8000) -> float:
    """Power of ``frequency`` in ``samples`` (Goertzel), normalised by the sample count."""
    coeff = 2 * math.cos(2 * math.pi * frequency / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (len(samples) ** 2)


def has_tone(samples: list[int] | array[int], frequency: float) -> bool:
    """``frequency`` is loud and clearly above other telephone-band frequencies."""
    if len(samples) < WINDOW:
        return False
    window = samples[-WINDOW:]
    target = goertzel_power(window, frequency)
    others = [goertzel_power(window, f) for f in (300, 697, 1336, 1800, 2500) if f != frequency]
    return target > 1e5 and target > 20 * max(others)


class Phone(asyncio.DatagramProtocol):
    """A desk phone: sends G.711 RTP of a 440 Hz tone, decodes what it receives."""

    def __init__(self, codec: G711Codec) -> None:
        self.codec = codec
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[bytes] = []
        self.decoded: list[int] = []
        self.target: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        if data[1] & 0x7F == self.codec.payload_type:
            self.decoded.extend(self.codec.decode(data[12:]))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    async def send_tone(self, frequency: float = 440.0) -> None:
        assert self.transport is not None and self.target is not None
        loop = asyncio.get_running_loop()
        seq, start = 0, loop.time()
        while True:  # cancelled by the test
            samples = array(
                "h",
                (
                    int(12000 * math.sin(2 * math.pi * frequency * (seq * 160 + n) / 8000))
                    for n in range(160)
                ),
            )
            header = struct.pack("!BBHII", 0x80, self.codec.payload_type, seq, seq * 160, 0xCAFE)
            self.transport.sendto(header + self.codec.encode(samples), self.target)
            seq += 1
            await asyncio.sleep(max(0.0, start + seq * 0.02 - loop.time()))

    def sdp(self, formats: str, rtpmaps: str = "") -> bytes:
        return (
            "v=0\r\no=phone 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {self.port} RTP/AVP {formats}\r\n{rtpmaps}a=sendrecv\r\n"
        ).encode()


@contextlib.asynccontextmanager
async def phone_socket(codec: G711Codec) -> AsyncIterator[Phone]:
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(
        lambda: Phone(codec), local_addr=("127.0.0.1", 0)
    )
    try:
        yield phone
    finally:
        transport.close()


async def record(track: object, into: list[int]) -> None:
    """Collect what the browser hears as 8 kHz mono samples."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()  # type: ignore[attr-defined]
            for mono in resampler.resample(frame):
                pcm = array("h")
                pcm.frombytes(bytes(mono.planes[0])[: 2 * mono.samples])
                into.extend(pcm)


async def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


def browser_peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def free_udp(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_browser_calls_phone_audio_both_ways_and_close_releases() -> None:
    ports = PortAllocator(41000, 41019)
    bridge = WebRtcBridge("call-1", ports=ports)
    browser = browser_peer()
    heard_by_browser: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        browser.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
        await browser.setLocalDescription(await browser.createOffer())
        assert "opus" in browser.localDescription.sdp  # a real browser offers Opus first

        answer, plain_offer = await bridge.offer_from_browser(browser.localDescription.sdp)
        await browser.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        assert "opus" not in answer and "PCMU/8000" in answer
        assert b"RTP/AVP 0 8 101" in plain_offer
        assert b"a=rtpmap:101 telephone-event/8000" in plain_offer
        assert b"c=IN IP4 127.0.0.1" in plain_offer
        assert bridge.rtp_port in (41000, 41002) and ports.in_use == 1

        async with phone_socket(PCMU) as phone:
            await bridge.answer_from_phone(
                phone.sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n")
            )
            phone.target = ("127.0.0.1", bridge.rtp_port)
            tasks.append(asyncio.create_task(phone.send_tone(440.0)))
            remote = browser.getTransceivers()[0].receiver.track
            tasks.append(asyncio.create_task(record(remote, heard_by_browser)))

            assert await wait_until(lambda: has_tone(phone.decoded, 1000.0)), "phone: no 1 kHz"
            assert await wait_until(lambda: has_tone(heard_by_browser, 440.0)), "browser: no 440"
            assert not has_tone(phone.decoded, 440.0)
            assert all(p[1] & 0x7F == 0 for p in phone.received)
            ssrcs = {struct.unpack("!I", p[8:12])[0] for p in phone.received}
            assert len(ssrcs) == 1
            stats = bridge.stats()
            assert stats.a_to_b.packets == len(phone.received) > 0
            assert stats.b_to_a.packets > 0 and stats.b_to_a.dropped == 0
            assert bridge.connection_state == "connected"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bridge.close()
        await browser.close()
    assert bridge.closed and bridge.connection_state == "new"
    assert ports.in_use == 0
    assert free_udp(bridge.rtp_port) and free_udp(bridge.rtp_port + 1)
    await bridge.close()  # idempotent


async def test_phone_calls_browser_with_pcma() -> None:
    bridge = WebRtcBridge("call-2")
    browser = browser_peer()
    heard_by_browser: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        async with phone_socket(PCMA) as phone:
            offer = phone.sdp(
                "8 0 101",
                "a=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n",
            )
            webrtc_offer, plain_answer = await bridge.offer_to_browser(offer)
            assert "PCMA/8000" in webrtc_offer and "a=fingerprint:" in webrtc_offer
            assert "a=candidate:" in webrtc_offer
            assert b"RTP/AVP 8 101" in plain_answer and b"a=sendrecv" in plain_answer
            assert bridge.phone_codec is PCMA

            await browser.setRemoteDescription(RTCSessionDescription(webrtc_offer, "offer"))
            transceiver = browser.getTransceivers()[0]
            transceiver.sender.replaceTrack(ToneTrack(1000.0))
            transceiver.direction = "sendrecv"
            await browser.setLocalDescription(await browser.createAnswer())
            await bridge.answer_from_browser(browser.localDescription.sdp)

            phone.target = ("127.0.0.1", bridge.rtp_port)
            tasks.append(asyncio.create_task(phone.send_tone(440.0)))
            tasks.append(asyncio.create_task(record(transceiver.receiver.track, heard_by_browser)))
            assert await wait_until(lambda: has_tone(phone.decoded, 1000.0)), "phone: no 1 kHz"
            assert await wait_until(lambda: has_tone(heard_by_browser, 440.0)), "browser: no 440"
            assert all(p[1] & 0x7F == 8 for p in phone.received)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bridge.close()
        await browser.close()


async def test_phone_dtmf_latching_and_dtmf_to_phone() -> None:
    digits: list[str] = []
    bridge = WebRtcBridge("call-3", on_dtmf=digits.append)
    async with phone_socket(PCMU) as phone:
        offer = phone.sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n")
        await bridge.offer_to_browser(offer)
        target = ("127.0.0.1", bridge.rtp_port)
        assert phone.transport is not None
        for packet_index in range(3):  # one event "5" (three packets, same timestamp)
            header = struct.pack("!BBHII", 0x80, 101, packet_index, 800, 1)
            phone.transport.sendto(header + struct.pack("!BBH", 5, 10, 160), target)
        header = struct.pack("!BBHII", 0x80, 101, 3, 1600, 1)
        phone.transport.sendto(header + struct.pack("!BBH", 11, 0x8A, 160), target)  # "#"
        assert await wait_until(lambda: len(digits) >= 2, 2.0)
        assert digits == ["5", "#"]

        # A stranger's packet after the phone latched is refused.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.sendto(struct.pack("!BBHII", 0x80, 0, 9, 9, 9) + bytes(160), target)
            assert await wait_until(lambda: bridge.from_phone.dropped == 1, 2.0)

        await bridge.send_dtmf("1", duration_ms=60)
        events = [p for p in phone.received if p[1] & 0x7F == 101]
        assert events, "no telephone-event reached the phone"
        assert events[0][1] & 0x80  # marker on the first packet of the event
        assert {p[12] for p in events} == {1}
        assert sum(1 for p in events if p[13] & 0x80) == 3  # end bit sent three times
        assert len({p[4:8] for p in events}) == 1  # one RTP timestamp for the event
        with pytest.raises(ValueError):
            await bridge.send_dtmf("x")
    await bridge.close()


async def test_bad_sdp_and_wrong_order_are_clear_errors() -> None:
    bridge = WebRtcBridge("call-4")
    opus_only = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
    )
    with pytest.raises(SdpError, match="no G.711"):
        await bridge.offer_from_browser(opus_only)
    with pytest.raises(SdpError):
        await bridge.offer_from_browser("not sdp")
    with pytest.raises(SdpError, match="PCMU or PCMA"):
        await bridge.offer_to_browser(
            b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            b"m=audio 4000 RTP/AVP 18\r\n"
        )
    with pytest.raises(MediaError, match="is idle"):
        await bridge.answer_from_phone(b"v=0\r\n")
    with pytest.raises(MediaError, match="telephone-event"):
        await bridge.send_dtmf("1")
    assert bridge.state == "idle"
    await bridge.close()
    with pytest.raises(MediaError, match="closed"):
        await bridge.offer_to_browser(b"v=0\r\n")
    with pytest.raises(SdpError):
        WebRtcBridge("call-5", host="127.0.0.1", advertise_host="phone.example")

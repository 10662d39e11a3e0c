"""The announcement player: early media for an emergency call no route could take.

When every emergency route of a site has failed (EMERGENCY.md EM-13), the switch answers
the caller's INVITE with a 183 Session Progress carrying an SDP answer and plays an
announcement on that early-media stream while it keeps retrying the routes, so that "the
caller hears a clear announcement" instead of silence. No recorded speech ships with the
project, so by default the announcement is the special information tone (SIT) of ITU-T
Recommendation E.180/Q.35 (03/1998, "Technical characteristics of tones for the
telephone service"): three tones of 950 Hz, 1400 Hz and 1800 Hz (each ±50 Hz allowed), sent in
that order, each lasting 330 ms (330 ± 70 ms allowed, with at most 30 ms of silence
between them), followed by a silent interval of 1000 ms (1000 ± 250 ms allowed), over
and over (played here as 3 × 330 ms of tone, no gap, then 1010 ms of silence: the
cycle is padded to whole 20 ms packets). An operator may configure a WAV file (8 kHz, mono, 16-bit linear PCM) that
replaces the tone; it is played in a loop as it is, so any pause between repetitions
belongs in the file.

Audio goes out as G.711 (ITU-T G.711: µ-law, RTP payload type 0 "PCMU", or A-law,
payload type 8 "PCMA", RFC 3551), in 20 ms RTP packets (RFC 3550) of 160 samples. The
encoders are written from the G.711 segment definitions (the stdlib ``audioop`` module is
deprecated and is not used).

:class:`AnnouncementPlayer` takes the caller's SDP offer, allocates an RTP/RTCP port pair
from the relay's :class:`~media.ports.PortAllocator`, returns the SDP answer for the 183
and sends RTP to the offer's address, paced by the event loop's clock against the start
time (no drift). Like the relay it latches to the source of the first RTP packet it
receives (symmetric RTP, RFC 4961), so a phone behind NAT, whose SDP names a private
address, hears the announcement too. It stops on :meth:`AnnouncementPlayer.stop` or by
itself after ``max_seconds``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import secrets
import struct
import sys
import wave
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from media.backend import MediaError, PortsExhausted, SdpError
from media.ports import PortAllocator
from media.relay import BIND_ATTEMPTS, SETTLE_TURNS
from media.sdp import (
    Connection,
    MediaDescription,
    Origin,
    SessionDescription,
    address_type,
    parse_sdp,
)

log = logging.getLogger("media.announcement")

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id) as asyncio gives them

# -- constants ----------------------------------------------------------------------------

#: G.711 is sampled at 8 kHz (and its static RTP payload types use an 8 kHz RTP clock).
SAMPLE_RATE = 8000
#: Packetisation time: 20 ms, the RFC 3551 default for G.711.
PTIME_MS = 20
PTIME_S = PTIME_MS / 1000
#: Samples (and G.711 bytes, and RTP timestamp units) per packet.
SAMPLES_PER_PACKET = SAMPLE_RATE * PTIME_MS // 1000

#: ITU-T E.180/Q.35 special information tone: frequencies in the order they are sent.
SIT_FREQUENCIES_HZ: tuple[float, float, float] = (950.0, 1400.0, 1800.0)
#: Duration of each of the three tones (E.180: 330 ± 70 ms).
SIT_TONE_MS = 330
#: Silent interval after the three tones, before they repeat (E.180: 1000 ± 250 ms).
SIT_SILENCE_MS = 1000
#: Level of each SIT tone. A choice of this module (comfortable, well clear of clipping),
#: not a figure taken from E.180.
DEFAULT_LEVEL_DBM0 = -13.0
#: Power of a full-scale sine in G.711 (µ-law +3.17 dBm0, A-law +3.14 dBm0; the µ-law
#: figure is used for both, the 0.03 dB difference does not matter here).
FULL_SCALE_SINE_DBM0 = 3.17
#: Raised-cosine ramp at each end of a tone, so tone switching does not click.
DEFAULT_RAMP_MS = 5.0

#: Longest WAV accepted (memory, and the time to encode it, stay bounded).
MAX_WAV_SECONDS = 120
#: Default bound on how long one announcement plays.
DEFAULT_MAX_SECONDS = 600.0
#: Packets sent at once to catch up after the loop was late; later than that, skip ahead
#: (the RTP timestamp jumps, the sequence number does not: RFC 3550 §5.1).
MAX_CATCH_UP_PACKETS = 3

#: Transport profiles the player can answer: plain RTP (no SRTP keys to offer back).
PLAIN_RTP_PROFILES = frozenset({"RTP/AVP", "RTP/AVPF"})

RTP_VERSION = 2
_RTP_HEADER = struct.Struct("!BBHII")


# -- G.711 ---------------------------------------------------------------------------------
#
# Both laws quantise a sign and a magnitude into 8 segments ("chords") of 16 steps each;
# the step doubles from one segment to the next (A-law's first two segments share one
# step). Negative 16-bit samples are mirrored with the one's complement (-x - 1), so the
# quantiser is symmetric around -0.5 and both zero codes (+0 and -0) are reached, the way
# the ITU-T G.191 software tools do it.

#: µ-law: the magnitude (14-bit domain) is biased by 33 before segmenting; 8191 = clip.
_ULAW_BIAS = 33
_ULAW_CLIP = 0x1FFF
#: A-law: the even bits of the code are inverted on the line (G.711's A-law tables).
_ALAW_INVERT = 0x55


def _check_sample(sample: int) -> None:
    if not isinstance(sample, int):
        raise TypeError(f"16-bit linear PCM samples are integers, not {type(sample).__name__}")
    if not -32768 <= sample <= 32767:
        raise ValueError(f"16-bit linear PCM sample out of range: {sample}")


def linear_to_ulaw(sample: int) -> int:
    """G.711 µ-law code (0-255, as sent on the line) for a 16-bit linear sample."""
    _check_sample(sample)
    negative = sample < 0
    magnitude = ~sample if negative else sample
    biased = min((magnitude >> 2) + _ULAW_BIAS, _ULAW_CLIP)
    segment = biased.bit_length() - 6  # 33..63 -> 0, 64..127 -> 1, ..., 4096..8191 -> 7
    step = (biased >> (segment + 1)) & 0x0F
    code = (0x80 if negative else 0x00) | (segment << 4) | step
    return ~code & 0xFF  # every bit is inverted on the line


def linear_to_alaw(sample: int) -> int:
    """G.711 A-law code (0-255, as sent on the line) for a 16-bit linear sample."""
    _check_sample(sample)
    negative = sample < 0
    magnitude = (~sample if negative else sample) >> 4  # 0..2047
    if magnitude < 16:
        segment, step = 0, magnitude
    else:
        segment = magnitude.bit_length() - 4  # 16..31 -> 1, ..., 1024..2047 -> 7
        step = (magnitude >> (segment - 1)) & 0x0F
    code = (0x00 if negative else 0x80) | (segment << 4) | step
    return code ^ _ALAW_INVERT


def ulaw_to_linear(code: int) -> int:
    """16-bit linear value of a G.711 µ-law code (the middle of its quantisation step)."""
    if not 0 <= code <= 255:
        raise ValueError(f"G.711 code out of range: {code}")
    code = ~code & 0xFF
    segment = (code >> 4) & 0x07
    step = code & 0x0F
    # The step's middle in the biased 14-bit domain is (2 * step + 33) << segment.
    magnitude = (((2 * step + _ULAW_BIAS) << segment) - _ULAW_BIAS) << 2  # 14 -> 16 bits
    return -magnitude if code & 0x80 else magnitude


def alaw_to_linear(code: int) -> int:
    """16-bit linear value of a G.711 A-law code (the middle of its quantisation step)."""
    if not 0 <= code <= 255:
        raise ValueError(f"G.711 code out of range: {code}")
    code ^= _ALAW_INVERT
    segment = (code >> 4) & 0x07
    step = code & 0x0F
    if segment == 0:
        magnitude = (step << 4) | 0x08
    else:
        magnitude = (((step | 0x10) << 4) | 0x08) << (segment - 1)
    return magnitude if code & 0x80 else -magnitude


@functools.cache
def _encode_table(law: str) -> bytes:
    """Code for every 16-bit sample, indexed by the sample's unsigned 16-bit pattern."""
    encode = linear_to_ulaw if law == "ulaw" else linear_to_alaw
    return bytes(encode(index - 65536 if index >= 32768 else index) for index in range(65536))


@functools.cache
def _decode_table(law: str) -> tuple[int, ...]:
    decode = ulaw_to_linear if law == "ulaw" else alaw_to_linear
    return tuple(decode(code) for code in range(256))


def _as_pcm(samples: Iterable[int]) -> array[int]:
    if isinstance(samples, array) and samples.typecode == "h":
        return samples
    try:
        return array("h", samples)
    except OverflowError as exc:
        raise ValueError(f"16-bit linear PCM sample out of range: {exc}") from exc


def _encode(samples: Iterable[int], law: str) -> bytes:
    pcm = _as_pcm(samples)
    unsigned = array("H")
    unsigned.frombytes(pcm.tobytes())  # same bits, read as 0..65535
    return bytes(map(_encode_table(law).__getitem__, unsigned))


def encode_ulaw(samples: Iterable[int]) -> bytes:
    """G.711 µ-law bytes for 16-bit linear samples (ValueError when one is out of range)."""
    return _encode(samples, "ulaw")


def encode_alaw(samples: Iterable[int]) -> bytes:
    """G.711 A-law bytes for 16-bit linear samples (ValueError when one is out of range)."""
    return _encode(samples, "alaw")


def decode_ulaw(data: bytes) -> array[int]:
    """16-bit linear samples for G.711 µ-law bytes."""
    table = _decode_table("ulaw")
    return array("h", (table[code] for code in data))


def decode_alaw(data: bytes) -> array[int]:
    """16-bit linear samples for G.711 A-law bytes."""
    table = _decode_table("alaw")
    return array("h", (table[code] for code in data))


@dataclass(frozen=True, slots=True)
class G711Codec:
    """A G.711 law as negotiated in SDP: its static RTP payload type and encoder."""

    name: str  # the rtpmap encoding name
    payload_type: int
    encode: Callable[[Iterable[int]], bytes]
    decode: Callable[[bytes], array[int]]

    @property
    def rtpmap(self) -> str:
        return f"{self.payload_type} {self.name}/{SAMPLE_RATE}"


PCMU = G711Codec("PCMU", 0, encode_ulaw, decode_ulaw)
PCMA = G711Codec("PCMA", 8, encode_alaw, decode_alaw)


# -- audio sources --------------------------------------------------------------------------


def silence_samples(duration_ms: float) -> array[int]:
    """``duration_ms`` of digital silence at 8 kHz."""
    if not duration_ms >= 0:
        raise ValueError(f"duration must be >= 0 ms, not {duration_ms}")
    return array("h", bytes(2 * round(duration_ms * SAMPLE_RATE / 1000)))


def tone_samples(
    frequency_hz: float,
    duration_ms: float,
    *,
    level_dbm0: float = DEFAULT_LEVEL_DBM0,
    ramp_ms: float = DEFAULT_RAMP_MS,
) -> array[int]:
    """A sine of ``frequency_hz`` for ``duration_ms`` at 8 kHz, 16-bit, ``level_dbm0``.

    The first and last ``ramp_ms`` rise and fall along a raised cosine, so that one tone
    following another does not click.
    """
    if not 0 < frequency_hz < SAMPLE_RATE / 2:
        raise ValueError(f"frequency must be between 0 and {SAMPLE_RATE // 2} Hz")
    if not duration_ms >= 0:
        raise ValueError(f"duration must be >= 0 ms, not {duration_ms}")
    if not ramp_ms >= 0:
        raise ValueError(f"ramp must be >= 0 ms, not {ramp_ms}")
    if not level_dbm0 <= FULL_SCALE_SINE_DBM0:
        raise ValueError(f"level {level_dbm0} dBm0 is above G.711's full scale")
    count = round(duration_ms * SAMPLE_RATE / 1000)
    peak = 32767 * 10 ** ((level_dbm0 - FULL_SCALE_SINE_DBM0) / 20)
    ramp = min(round(ramp_ms * SAMPLE_RATE / 1000), count // 2)
    omega = 2 * math.pi * frequency_hz / SAMPLE_RATE
    out = array("h", bytes(2 * count))
    for n in range(count):
        value = peak * math.sin(omega * n)
        edge = min(n, count - 1 - n)
        if edge < ramp:
            value *= 0.5 - 0.5 * math.cos(math.pi * (edge + 0.5) / ramp)
        out[n] = round(value)
    return out


@functools.cache
def _sit_cycle(level_dbm0: float, silence_ms: float) -> bytes:
    samples = array("h")
    for frequency in SIT_FREQUENCIES_HZ:
        samples.extend(tone_samples(frequency, SIT_TONE_MS, level_dbm0=level_dbm0))
    samples.extend(silence_samples(silence_ms))
    return samples.tobytes()


def sit_samples(
    *, level_dbm0: float = DEFAULT_LEVEL_DBM0, silence_ms: float = SIT_SILENCE_MS
) -> array[int]:
    """One cycle of the E.180 special information tone at 8 kHz, 16-bit.

    950, 1400 then 1800 Hz for 330 ms each, then ``silence_ms`` of silence (15,920 samples
    with the defaults); played in a loop it is the announcement of a failed call.
    """
    cycle = array("h")
    cycle.frombytes(_sit_cycle(float(level_dbm0), float(silence_ms)))
    return cycle


class AnnouncementFileError(MediaError, ValueError):
    """The configured announcement file cannot be played (missing, or not the format)."""

    status = 500
    reason = "Announcement Unavailable"


def load_wav(path: Path | str) -> array[int]:
    """The samples of a WAV file that must be 8 kHz, mono, 16-bit linear PCM.

    Raises :class:`AnnouncementFileError` (a ``ValueError``) naming the file and what is
    wrong: missing or unreadable, not a WAV, compressed or floating point, the wrong rate,
    channel count or sample width, empty, or longer than ``MAX_WAV_SECONDS``.
    """
    path = Path(path)
    required = f"needs {SAMPLE_RATE} Hz mono 16-bit PCM"
    try:
        with wave.open(str(path), "rb") as reader:
            channels = reader.getnchannels()
            width = reader.getsampwidth()
            rate = reader.getframerate()
            frames = reader.getnframes()
            problems = []
            if rate != SAMPLE_RATE:
                problems.append(f"{rate} Hz")
            if channels != 1:
                problems.append(f"{channels} channels")
            if width != 2:
                problems.append(f"{8 * width}-bit samples")
            if problems:
                raise AnnouncementFileError(
                    f"{path}: {', '.join(problems)}; the announcement {required}"
                )
            if frames == 0:
                raise AnnouncementFileError(f"{path}: the WAV file holds no audio")
            if frames > MAX_WAV_SECONDS * SAMPLE_RATE:
                raise AnnouncementFileError(
                    f"{path}: {frames / SAMPLE_RATE:.1f} s of audio, more than the "
                    f"{MAX_WAV_SECONDS} s allowed for an announcement"
                )
            data = reader.readframes(frames)
    except AnnouncementFileError:
        raise
    except FileNotFoundError as exc:
        raise AnnouncementFileError(f"{path}: no such file") from exc
    except OSError as exc:
        raise AnnouncementFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (wave.Error, EOFError) as exc:
        detail = str(exc) or "truncated file"
        raise AnnouncementFileError(f"{path}: not a PCM WAV file ({detail}); {required}") from exc
    samples = array("h")
    samples.frombytes(data[: len(data) & ~1])
    if sys.byteorder == "big":
        samples.byteswap()  # WAV data is little-endian
    if not samples:
        raise AnnouncementFileError(f"{path}: the WAV file holds no audio")
    return samples


@functools.lru_cache(maxsize=16)
def _wav_payload(path: str, mtime_ns: int, size: int, law: str) -> bytes:
    """The encoded WAV (cached by path, modification time and size)."""
    return _encode(load_wav(path), law)


def _packets(encoded: bytes, silence: int) -> list[bytes]:
    """Cut a looped recording into 20 ms payloads (the last one padded with silence)."""
    remainder = len(encoded) % SAMPLES_PER_PACKET
    if remainder:
        encoded += bytes([silence]) * (SAMPLES_PER_PACKET - remainder)
    return [
        encoded[offset : offset + SAMPLES_PER_PACKET]
        for offset in range(0, len(encoded), SAMPLES_PER_PACKET)
    ]


@functools.cache
def _sit_packets(payload_type: int, level_dbm0: float) -> tuple[bytes, ...]:
    codec = PCMU if payload_type == PCMU.payload_type else PCMA
    cycle = codec.encode(sit_samples(level_dbm0=level_dbm0))
    return tuple(_packets(cycle, codec.encode((0,))[0]))


# -- SDP -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Choice:
    index: int  # the chosen m= section of the offer
    codec: G711Codec
    answer_direction: str
    send: bool


_ANSWER_DIRECTION = {
    "sendrecv": ("sendrecv", True),  # the phone keeps sending: latching works behind NAT
    "recvonly": ("sendonly", True),
    "sendonly": ("recvonly", False),
    "inactive": ("inactive", False),
}


def _choose_stream(offer: SessionDescription) -> _Choice:
    """The first plain-RTP audio stream offering PCMU (preferred) or PCMA; 488 otherwise."""
    seen: list[str] = []
    for index, description in enumerate(offer.media):
        if description.media != "audio" or description.is_disabled:
            continue
        seen.append(f"{description.proto} {' '.join(description.formats)}")
        if description.proto.upper() not in PLAIN_RTP_PROFILES:
            continue
        if str(PCMU.payload_type) in description.formats:
            codec = PCMU
        elif str(PCMA.payload_type) in description.formats:
            codec = PCMA
        else:
            continue
        direction, send = _ANSWER_DIRECTION[offer.stream_direction(index)]
        return _Choice(index, codec, direction, send)
    offered = "; ".join(seen) if seen else "no active audio stream"
    raise SdpError(
        f"the announcement needs PCMU (0) or PCMA (8) over RTP/AVP; offer has: {offered}"
    )


def _answer_sdp(
    offer: SessionDescription, choice: _Choice, advertise_host: str, port: int
) -> bytes:
    """One audio stream answered, every other m= section rejected (port 0, RFC 3264 §6)."""
    host = advertise_host.strip("[]")
    addr_type = address_type(host)
    session_id = str(secrets.randbits(62) or 1)
    lines: list[tuple[str, str]] = [
        ("v", "0"),
        ("o", str(Origin("-", session_id, 1, "IN", addr_type, host))),
        ("s", "-"),
        ("c", str(Connection("IN", addr_type, host))),
        ("t", "0 0"),
    ]
    media: list[MediaDescription] = []
    for index, description in enumerate(offer.media):
        if index == choice.index:
            payload_type = str(choice.codec.payload_type)
            media.append(
                MediaDescription(
                    "audio",
                    port,
                    None,
                    description.proto,
                    [payload_type],
                    [
                        ("a", f"rtpmap:{choice.codec.rtpmap}"),
                        ("a", f"ptime:{PTIME_MS}"),
                        ("a", choice.answer_direction),
                    ],
                )
            )
        else:
            formats = list(description.formats) or ["0"]
            media.append(MediaDescription(description.media, 0, None, description.proto, formats))
    return SessionDescription(lines, media).serialize()


# -- the player -------------------------------------------------------------------------------


class _PlayerSocket(asyncio.DatagramProtocol):
    """The player's RTP socket (``rtcp=False``) or RTCP socket (received RTCP is dropped)."""

    def __init__(self, player: AnnouncementPlayer, rtcp: bool) -> None:
        self.player = player
        self.rtcp = rtcp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.player._socket_opened(transport, self.rtcp)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.player._socket_closed()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not self.rtcp:
            self.player._rtp_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable: the phone is not listening (yet); keep going


class AnnouncementPlayer:
    """Plays the "all emergency routes failed" announcement as early media to one caller.

    One player per call: :meth:`start` with the caller's SDP offer returns the SDP answer
    for the 183 and starts the RTP stream; :meth:`stop` (when the caller hangs up, or a
    route finally answers) ends it and gives the ports back. ``max_seconds`` bounds how
    long it plays when nobody stops it; ``on_finished`` (if set) is called once when it
    ends, whatever the reason.
    """

    def __init__(
        self,
        *,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        level_dbm0: float = DEFAULT_LEVEL_DBM0,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        if not 0 < max_seconds < math.inf:
            raise ValueError(f"max_seconds must be a positive number of seconds, not {max_seconds}")
        if not level_dbm0 <= FULL_SCALE_SINE_DBM0:
            raise ValueError(f"level {level_dbm0} dBm0 is above G.711's full scale")
        self.max_seconds = float(max_seconds)
        self.level_dbm0 = float(level_dbm0)
        self.on_finished = on_finished
        #: Negotiated codec, RTP port and address sent to; None before :meth:`start`.
        self.codec: G711Codec | None = None
        self.port: int | None = None
        self.target: Address | None = None
        self.latched = False
        #: "sit" or "wav": what is being played (a WAV that fails to load falls back).
        self.source = "sit"
        self.wav_error: str | None = None
        #: The RTP stream's identity (RFC 3550 §5.1), random per player.
        self.ssrc = secrets.randbits(32)
        self.packets_sent = 0
        self.packets_received = 0
        self.dropped = 0  # packets from a source other than the latched one
        self.skipped = 0  # 20 ms slots skipped because the loop was late
        self._first_seq = secrets.randbits(16)
        self._first_timestamp = secrets.randbits(32)
        self._payloads: Sequence[bytes] = ()
        self._send_allowed = False
        self._bind_v6 = False
        self._ports: PortAllocator | None = None
        self._rtp: asyncio.DatagramTransport | None = None
        self._rtcp: asyncio.DatagramTransport | None = None
        self._open_sockets = 0
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._starting = False
        self._stopping = False
        self._finished = asyncio.Event()

    # -- state --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._started and not self._stopping

    @property
    def finished(self) -> bool:
        """Stopped and its ports given back to the allocator."""
        return self._finished.is_set()

    async def wait(self) -> None:
        """Until the player has stopped (``stop()`` or ``max_seconds``) and released ports."""
        await self._finished.wait()

    # -- start / stop ---------------------------------------------------------------------
    async def start(
        self,
        offer_sdp: bytes,
        *,
        bind_host: str,
        advertise_host: str,
        ports: PortAllocator,
        wav: Path | None = None,
    ) -> bytes:
        """Answer ``offer_sdp`` and start playing; returns the SDP answer for the 183.

        Raises :class:`SdpError` (488) when the offer is malformed or has no plain RTP
        audio stream with PCMU or PCMA, :class:`PortsExhausted` (503) when no port pair
        can be bound. A ``wav`` that cannot be played is logged and the SIT is played
        instead: the caller must hear something.
        """
        if self._started or self._stopping:
            raise MediaError("announcement player already started", reason="Player Busy")
        offer = parse_sdp(offer_sdp)
        choice = _choose_stream(offer)
        address_type(advertise_host.strip("[]"))  # SdpError for an unusable address
        self._started = self._starting = True
        self.codec = choice.codec
        self._send_allowed = choice.send
        self._bind_v6 = ":" in bind_host
        try:
            self._payloads = await self._load_payloads(choice.codec, wav)
            if not self._stopping:
                await self._bind(bind_host, ports)
            if self._stopping:  # stop() came while starting (the caller hung up)
                if self.port is not None:
                    await self._unbind(ports)
                raise MediaError("announcement stopped while starting", reason="Stopped")
        except BaseException:  # a failed start leaves a finished player, holding nothing
            self._starting = False
            if not self._stopping:
                self.stop()
            elif self._open_sockets == 0:
                self._release()
            raise
        self._starting = False
        assert self.port is not None
        self.target = self._offer_target(offer, choice.index)
        answer = _answer_sdp(offer, choice, advertise_host, self.port)
        self._task = asyncio.get_running_loop().create_task(
            self._play(), name=f"announcement-{self.port}"
        )
        log.info(
            "announcement started port=%d codec=%s source=%s target=%s",
            self.port,
            choice.codec.name,
            self.source,
            self.target,
        )
        return answer

    def stop(self) -> None:
        """Stop sending and close the sockets; the ports go back once the OS released them.

        Idempotent, and harmless before or during :meth:`start` (a start in progress then
        gives its ports back and raises :class:`MediaError`). ``await wait()`` to know the
        ports are back in the allocator.
        """
        if self._stopping:
            return
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        for transport in (self._rtp, self._rtcp):
            if transport is not None:
                transport.close()
        self._rtp = None
        self._rtcp = None
        if self._open_sockets == 0 and not self._starting:
            self._release()

    # -- internals ------------------------------------------------------------------------
    async def _load_payloads(self, codec: G711Codec, wav: Path | None) -> Sequence[bytes]:
        if wav is not None:
            law = "ulaw" if codec is PCMU else "alaw"
            try:
                status = await asyncio.to_thread(Path(wav).stat)
                encoded = await asyncio.to_thread(
                    _wav_payload, str(wav), status.st_mtime_ns, status.st_size, law
                )
            except (AnnouncementFileError, OSError) as exc:
                if isinstance(exc, AnnouncementFileError):
                    detail = str(exc.detail)
                else:
                    detail = f"{wav}: cannot read: {exc.strerror or exc}"
                self.wav_error = detail
                log.error("announcement file unusable, playing the SIT instead: %s", detail)
            else:
                self.source = "wav"
                return _packets(encoded, codec.encode((0,))[0])
        self.source = "sit"
        return _sit_packets(codec.payload_type, self.level_dbm0)

    async def _bind(self, bind_host: str, ports: PortAllocator) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(BIND_ATTEMPTS):
            port = ports.allocate()  # PortsExhausted propagates (503)
            self._ports = ports
            self.port = port
            try:
                await loop.create_datagram_endpoint(
                    lambda: _PlayerSocket(self, rtcp=False), local_addr=(bind_host, port)
                )
                await loop.create_datagram_endpoint(
                    lambda: _PlayerSocket(self, rtcp=True), local_addr=(bind_host, port + 1)
                )
            except OSError as exc:
                log.warning("announcement port pair %d/%d not bindable: %s", port, port + 1, exc)
                await self._unbind(ports)
                continue
            return
        self._ports = None
        self.port = None
        raise PortsExhausted(f"no bindable port pair after {BIND_ATTEMPTS} attempts")

    async def _unbind(self, ports: PortAllocator) -> None:
        """Close what a failed bind opened, then set the pair aside (back of the queue)."""
        for transport in (self._rtp, self._rtcp):
            if transport is not None:
                transport.close()
        self._rtp = None
        self._rtcp = None
        for _ in range(SETTLE_TURNS):  # a bounded number of loop turns for connection_lost
            if self._open_sockets == 0:
                break
            await asyncio.sleep(0)
        assert self.port is not None
        ports.set_aside(self.port)
        self._ports = None
        self.port = None

    def _offer_target(self, offer: SessionDescription, index: int) -> Address | None:
        """Where the offer asks RTP to go, if this socket can send there (else: latch)."""
        connection = offer.stream_connection(index)
        if connection is None:
            return None
        try:
            address = ipaddress.ip_address(connection.address.strip("[]"))
        except ValueError:
            return None  # a host name: wait for the phone's first packet
        if address.is_unspecified or (address.version == 6) != self._bind_v6:
            return None
        port = offer.media[index].port
        return (str(address), port, 0, 0) if self._bind_v6 else (str(address), port)

    def _socket_opened(self, transport: asyncio.DatagramTransport, rtcp: bool) -> None:
        self._open_sockets += 1
        if rtcp:
            self._rtcp = transport
        else:
            self._rtp = transport

    def _socket_closed(self) -> None:
        self._open_sockets -= 1
        if self._open_sockets == 0 and self._stopping and not self._starting:
            self._release()

    def _release(self) -> None:
        if self._finished.is_set():
            return
        ports, self._ports = self._ports, None
        if ports is not None and self.port is not None:
            ports.release(self.port)
        self._finished.set()
        log.info(
            "announcement stopped port=%s sent=%d received=%d",
            self.port,
            self.packets_sent,
            self.packets_received,
        )
        if self.on_finished is not None:
            try:
                self.on_finished()
            except Exception:  # the owner's callback must not break the release
                log.exception("announcement on_finished callback failed")

    def _rtp_received(self, data: bytes, addr: Address) -> None:
        if len(data) < 12 or data[0] >> 6 != RTP_VERSION:
            return  # not RTP: never latch to it
        if self.latched:
            if addr != self.target:
                self.dropped += 1
                return
        else:
            self.target = addr
            self.latched = True
        self.packets_received += 1

    def _send(self, slot: int) -> None:
        transport = self._rtp
        target = self.target
        if not self._send_allowed or transport is None or target is None:
            return
        codec = self.codec
        assert codec is not None
        first = self.packets_sent == 0
        header = _RTP_HEADER.pack(
            RTP_VERSION << 6,
            (0x80 if first else 0x00) | codec.payload_type,
            (self._first_seq + self.packets_sent) & 0xFFFF,
            (self._first_timestamp + slot * SAMPLES_PER_PACKET) & 0xFFFFFFFF,
            self.ssrc,
        )
        payloads = self._payloads
        transport.sendto(header + payloads[slot % len(payloads)], target)
        self.packets_sent += 1

    async def _play(self) -> None:
        """Send packet ``slot`` at start + slot × 20 ms on the loop's clock until the end."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        slots = math.ceil(self.max_seconds / PTIME_S)
        slot = 0
        try:
            while slot < slots:
                delay = start + slot * PTIME_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late = int(-delay / PTIME_S)
                    if late > MAX_CATCH_UP_PACKETS:
                        self.skipped += late
                        slot += late
                        continue
                self._send(slot)
                slot += 1
            log.info("announcement reached its %.0f s limit port=%s", self.max_seconds, self.port)
        finally:
            self.stop()


class AnnouncementSession:
    """An :class:`AnnouncementPlayer` with the switch's media settings bound.

    What the B2BUA holds per call: ``start(offer_sdp)`` returns the SDP answer for the
    183, ``stop()`` ends the announcement when the caller hangs up or a route answers.
    """

    def __init__(
        self,
        *,
        ports: PortAllocator,
        bind_host: str,
        advertise_host: str,
        wav: Path | None = None,
        max_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        self.player = AnnouncementPlayer(max_seconds=max_seconds)
        self.ports = ports
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.wav = wav

    async def start(self, offer_sdp: bytes) -> bytes:
        """The SDP answer for the 183; SdpError (488) or PortsExhausted (503) as the player."""
        return await self.player.start(
            offer_sdp,
            bind_host=self.bind_host,
            advertise_host=self.advertise_host,
            ports=self.ports,
            wav=self.wav,
        )

    def stop(self) -> None:
        self.player.stop()

    async def wait(self) -> None:
        await self.player.wait()

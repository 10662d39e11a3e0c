"""WebRTC-to-RTP media bridge for browser softphones (issue 8, media half).

A browser softphone (SIP over WebSocket, RFC 7118) offers WebRTC media: ICE (RFC 8445),
DTLS-SRTP (RFC 5763/5764), rtcp-mux, usually Opus and G.711. Desk phones and ATAs speak
plain RTP/AVP with G.711 and telephone-event (RFC 4733). One :class:`WebRtcBridge` sits
between the two legs of one call:

* the browser leg is terminated by an aiortc ``RTCPeerConnection`` that negotiates PCMU
  or PCMA only (the browser's order among the two is kept);
* the desk-phone leg is a plain UDP RTP socket (plus an RTCP socket announced with
  ``a=rtcp``, RFC 3605, whose packets are counted and discarded) on a configurable host;
  the phone's address comes from its SDP and is then *latched* to the source of the
  first RTP packet it sends (symmetric RTP, as the built-in relay does for NAT).

Audio is decoded and re-encoded in the bridge: browser → aiortc decodes SRTP into
``av.AudioFrame`` values → resampled to 8 kHz mono when needed → G.711 → RTP packets of
20 ms to the phone; phone → RTP → G.711 decoded → :class:`PhoneAudioTrack` yields 20 ms
frames at a steady pace → aiortc encodes and sends SRTP to the browser. So the browser
side and the phone side may use different G.711 laws.

DTMF (RFC 4733 telephone-event): aiortc knows no telephone-event codec, so the bridge
carries events past it. telephone-event/8000 is added to the SDP for the browser (offered
with payload type 101, or answered with the browser's own); telephone-event RTP from the
browser (``RTCDTMFSender``) is taken out of the decrypted stream before aiortc's receiver
would drop it and sent to the phone in the phone's payload type, audio to the phone paused
meanwhile; while the phone signals an event, the audio packets aiortc sends to the browser
become that event's packets (same SSRC and sequence numbers, one timestamp, the end packet
three times). When the browser did not agree to telephone-event, the phone's digits go to
``on_dtmf(digit)`` for the signalling side to send as SIP INFO. :meth:`WebRtcBridge.send_dtmf`
sends digits to the phone (the softphone page's SIP INFO, when the switch converts them).

Re-offers on an established call (hold, resume, a phone that moved) are renegotiated on
the same peer connection, keeping ICE and DTLS: :meth:`~WebRtcBridge.reoffer_from_phone`
then :meth:`~WebRtcBridge.answer_reoffer_from_browser`, or
:meth:`~WebRtcBridge.reoffer_from_browser` then :meth:`~WebRtcBridge.answer_reoffer_from_phone`;
each side's direction follows the other's (a side on hold gets no media; one that holds
with ``a=sendonly`` still sends its music on hold). aiortc cannot restart ICE, so a
browser's re-offer with new ICE credentials is refused (488). Host candidates for the
browser carry ``advertise_host`` when it differs from the bind address (1:1 NAT).

Both call directions: browser calls phone (:meth:`~WebRtcBridge.offer_from_browser`, then
:meth:`~WebRtcBridge.answer_from_phone`) and phone calls browser
(:meth:`~WebRtcBridge.offer_to_browser`, then :meth:`~WebRtcBridge.answer_from_browser`).
Bad SDP raises :class:`~media.backend.SdpError` (SIP 488); calling the methods out of
order raises :class:`~media.backend.MediaError`.

``python -m media.webrtc --bench N`` bridges N calls at once for 10 s and prints CPU use
per call (see :func:`run_bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import math
import secrets
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtp import is_rtcp

from media.announcement import PCMA, PCMU, PLAIN_RTP_PROFILES, G711Codec
from media.backend import DirectionStats, MediaError, MediaStats, SdpError
from media.ports import PortAllocator
from media.sdp import (
    Connection,
    MediaDescription,
    Origin,
    SessionDescription,
    address_type,
    parse_sdp,
)

Address = tuple[str, int]

SAMPLE_RATE = 8000
PTIME_MS = 20
SAMPLES_PER_PACKET = SAMPLE_RATE * PTIME_MS // 1000  # 160
BYTES_PER_FRAME = 2 * SAMPLES_PER_PACKET  # 16-bit linear
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: Payload type we offer for telephone-event (RFC 4733) on the phone side.
TELEPHONE_EVENT_PT = 101
#: Decoded phone audio waiting to be sent to the browser, in 20 ms frames; older audio
#: is dropped beyond this (the phone's clock runs faster than ours, or a burst arrived).
MAX_QUEUED_FRAMES = 8
DTMF_EVENTS = "0123456789*#ABCD"
_RTP_HEADER = struct.Struct("!BBHII")
_CODECS_BY_PT: dict[int, G711Codec] = {PCMU.payload_type: PCMU, PCMA.payload_type: PCMA}
_MIME_BY_CODEC = {"PCMU": "audio/PCMU", "PCMA": "audio/PCMA"}


# -- phone → browser: a paced aiortc track fed with decoded RTP --------------------------------


class PhoneAudioTrack(MediaStreamTrack):
    """Audio from the desk phone as an aiortc track: 20 ms 8 kHz mono frames, steady pace.

    :meth:`feed` adds decoded 16-bit samples; :meth:`recv` returns the next 20 ms (silence
    when the phone sent nothing in time), so the browser always gets a regular stream.
    """

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = bytearray()
        self._start: float | None = None
        self._timestamp = 0
        self.frames_with_audio = 0
        self.frames_of_silence = 0
        self.overflow_dropped = 0

    def feed(self, samples: array[int]) -> None:
        """Queue decoded phone audio (16-bit linear samples at 8 kHz)."""
        self._buffer += samples.tobytes()
        excess = len(self._buffer) - MAX_QUEUED_FRAMES * BYTES_PER_FRAME
        if excess > 0:
            del self._buffer[:excess]
            self.overflow_dropped += excess // 2

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            self._timestamp += SAMPLES_PER_PACKET
            wait = self._start + self._timestamp / SAMPLE_RATE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        if len(self._buffer) >= BYTES_PER_FRAME:
            pcm = bytes(self._buffer[:BYTES_PER_FRAME])
            del self._buffer[:BYTES_PER_FRAME]
            self.frames_with_audio += 1
        elif self._buffer:
            pcm = bytes(self._buffer).ljust(BYTES_PER_FRAME, b"\0")
            self._buffer.clear()
            self.frames_with_audio += 1
        else:
            pcm = bytes(BYTES_PER_FRAME)
            self.frames_of_silence += 1
        frame = av.AudioFrame(format="s16", layout="mono", samples=SAMPLES_PER_PACKET)
        frame.planes[0].update(pcm)
        frame.pts = self._timestamp
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = TIME_BASE
        return frame


# -- the plain RTP side -------------------------------------------------------------------------


class _PhoneSocket(asyncio.DatagramProtocol):
    def __init__(self, bridge: WebRtcBridge, rtcp: bool) -> None:
        self.bridge = bridge
        self.rtcp = rtcp

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if self.rtcp:
            self.bridge.phone_rtcp_packets += 1  # reports about the phone leg: not relayed
        else:
            self.bridge._rtp_from_phone(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a phone that went away: the B2BUA's timers deal with it


@dataclass(slots=True)
class _PhoneLeg:
    """What was negotiated with the desk phone."""

    codec: G711Codec | None = None  # what we send; None until the phone's SDP is known
    telephone_event_pt: int | None = None
    target: Address | None = None
    latched: bool = False
    send: bool = True  # False when the phone's SDP says it does not want to receive
    direction: str = "sendrecv"  # the phone's latest SDP direction, from its point of view
    held_address: bool = False  # its latest SDP had c=0.0.0.0 (RFC 2543 hold)
    sdp_target: Address | None = None  # the address of its latest SDP


@dataclass(slots=True)
class _EventToBrowser:
    """A telephone-event from the phone being carried to the browser (RFC 4733)."""

    event: int
    volume: int
    phone_ts: int
    heard_at: float  # clock of the phone's latest packet of this event
    start_ts: int | None = None  # browser-side timestamp of the event's first packet
    ended: bool = False
    end_duration: int | None = None
    ends_sent: int = 0


@dataclass(slots=True)
class _EventToPhone:
    """A telephone-event from the browser being carried to the phone."""

    browser_ts: int
    start_ts: int  # phone-side timestamp of the event
    ended: bool = False


def _g711_formats(description: MediaDescription) -> list[G711Codec]:
    """G.711 laws of an m= section in its order of preference (static or rtpmap'd PT)."""
    codecs: list[G711Codec] = []
    names = {}
    for value in description.attributes("rtpmap"):
        number, _, encoding = value.partition(" ")
        names[number] = encoding.split("/")[0].upper()
    for fmt in description.formats:
        name = names.get(fmt)
        if name is None and fmt.isdigit() and int(fmt) in _CODECS_BY_PT:
            name = _CODECS_BY_PT[int(fmt)].name
        codec = {"PCMU": PCMU, "PCMA": PCMA}.get(name or "")
        if codec is not None and codec not in codecs:
            codecs.append(codec)
    return codecs


def _telephone_event_pt(description: MediaDescription) -> int | None:
    for value in description.attributes("rtpmap"):
        number, _, encoding = value.partition(" ")
        if encoding.lower().startswith("telephone-event/8000") and number.isdigit():
            if number in description.formats:
                return int(number)
    return None


def _first_audio(sdp: SessionDescription, plain: bool) -> int:
    """Index of the first active audio m= section (plain RTP/AVP when ``plain``)."""
    for index, description in enumerate(sdp.media):
        if description.media != "audio" or description.is_disabled:
            continue
        if plain and description.proto.upper() not in PLAIN_RTP_PROFILES:
            continue
        return index
    kind = "plain RTP/AVP audio" if plain else "active audio"
    raise SdpError(f"no {kind} stream in the SDP")


def _parse_browser_sdp(text: str) -> tuple[SessionDescription, list[G711Codec]]:
    if not isinstance(text, str) or not text.strip():
        raise SdpError("the browser's SDP is empty or not text")
    sdp = parse_sdp(text.encode("utf-8", "surrogateescape"))
    index = _first_audio(sdp, plain=False)
    codecs = _g711_formats(sdp.media[index])
    if not codecs:
        raise SdpError(
            "the browser offered no G.711 (PCMU/PCMA); formats: "
            + " ".join(sdp.media[index].formats)
        )
    return sdp, codecs


_REPLY_DIRECTION = {
    "sendrecv": "sendrecv",
    "recvonly": "sendonly",
    "sendonly": "recvonly",
    "inactive": "inactive",
}
#: How long a telephone-event from the phone may go without a packet before the bridge
#: ends it towards the browser itself (the phone's end packets were lost).
EVENT_SILENCE_S = 0.25


def _sends(direction: str) -> bool:
    return direction in ("sendrecv", "sendonly")


def _receives(direction: str) -> bool:
    return direction in ("sendrecv", "recvonly")


def _direction(send: bool, receive: bool) -> str:
    """The SDP direction attribute for a party that sends and/or receives."""
    if send:
        return "sendrecv" if receive else "sendonly"
    return "recvonly" if receive else "inactive"


def _rtp_fields(data: bytes) -> tuple[int, bool, int, int, int] | None:
    """(payload type, marker, timestamp, payload start, payload end) of an RTP packet."""
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    offset = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10:  # header extension
        if len(data) < offset + 4:
            return None
        offset += 4 + 4 * int.from_bytes(data[offset + 2 : offset + 4], "big")
    end = len(data)
    if data[0] & 0x20 and end > offset:  # padding
        end -= data[-1]
    if end < offset:
        return None
    timestamp = int.from_bytes(data[4:8], "big")
    return data[1] & 0x7F, bool(data[1] & 0x80), timestamp, offset, end


def _media_attribute(sdp: SessionDescription, index: int, name: str) -> str | None:
    value = sdp.media[index].attribute(name)
    return value if value is not None else sdp.session_attribute(name)


class WebRtcBridge:
    """Media of one call between a WebRTC browser leg and a plain RTP desk-phone leg.

    ``host`` is where the phone-side sockets bind; ``advertise_host`` (default ``host``)
    goes into the SDP for the phone. ``ports`` allocates the RTP/RTCP pair from the
    switch's relay range (default: two ephemeral ports). ``ice_servers`` is passed to
    aiortc (default none: host candidates only, no STUN traffic to the Internet).
    ``on_dtmf`` is called with each telephone-event digit the phone sends that cannot go to
    the browser as telephone-event RTP (the browser did not negotiate telephone-event).
    ``host`` is also where aioice gathers the ICE host candidates (see
    :class:`~media.hybrid.HybridMediaBackend`); when ``advertise_host`` differs, the
    candidates' address in the SDP for the browser is rewritten to it (1:1 NAT).
    """

    def __init__(
        self,
        call_id: str = "",
        *,
        host: str = "127.0.0.1",
        advertise_host: str | None = None,
        ports: PortAllocator | None = None,
        ice_servers: Sequence[RTCIceServer] = (),
        on_dtmf: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call_id = call_id
        self.host = host
        self.advertise_host = (advertise_host or host).strip("[]")
        address_type(self.advertise_host)  # SdpError for a host that is not an IP literal
        self._ports = ports
        self._ice_servers = list(ice_servers)
        self.on_dtmf = on_dtmf
        self._clock = clock
        self.started_at = clock()
        self._pc: RTCPeerConnection | None = None
        self._to_browser = PhoneAudioTrack()
        self._from_browser_task: asyncio.Task[None] | None = None
        self._transceiver: RTCRtpTransceiver | None = None
        self._rtp_transport: asyncio.DatagramTransport | None = None
        self._rtcp_transport: asyncio.DatagramTransport | None = None
        self._allocated_port: int | None = None
        self.rtp_port = 0
        self.rtcp_port = 0
        self._phone = _PhoneLeg()
        self._state = "idle"  # idle, browser-offered, phone-offered, active, closed
        self._origin_id = str(secrets.randbits(62) or 1)
        self._origin_version = 1
        # RTP towards the phone
        self._ssrc = secrets.randbits(32)
        self._seq = secrets.randbits(16)
        self._rtp_ts = secrets.randbits(32)
        self._marker = True
        self._pending = bytearray()
        self._dtmf_active = False
        self._last_dtmf_ts: int | None = None
        # counters
        self.to_phone = DirectionStats()
        self.from_phone = DirectionStats()
        self.phone_rtcp_packets = 0
        self.browser_frames = 0
        self.negotiated_at: float | None = None  # last completed offer/answer
        # the browser leg's SDP state
        self._browser_te_pt: int | None = None  # telephone-event PT agreed with the browser
        self._browser_ufrag: str | None = None
        self._browser_origin: tuple[str, int] | None = None  # o= session id, version
        # a re-offer waiting for its answer, and what to restore when it is refused
        self._reoffer: tuple[SessionDescription, int, G711Codec] | None = None
        self._saved: tuple[_PhoneLeg, str, str | None] | None = None
        self._browser_reply = ""
        # telephone-events (RFC 4733) between the legs
        self._event_to_browser: _EventToBrowser | None = None
        self._event_to_phone: _EventToPhone | None = None
        self.dtmf_from_phone: list[str] = []
        self.dtmf_from_browser: list[str] = []
        self.dtmf_events_dropped = 0

    # -- public API ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """idle, browser-offered, phone-offered, active, phone-reoffered, browser-reoffered
        (a re-offer from that side waits for the other side's answer), or closed."""
        return self._state

    @property
    def phone_codec(self) -> G711Codec | None:
        return self._phone.codec

    @property
    def connection_state(self) -> str:
        """The WebRTC leg's connection state (new, connecting, connected, failed, closed)."""
        return self._pc.connectionState if self._pc is not None else "new"

    @property
    def browser_lost(self) -> bool:
        """The browser's ICE/DTLS connection failed or was closed by the browser."""
        return self._pc is not None and self._pc.connectionState in ("failed", "closed")

    @property
    def browser_telephone_event_pt(self) -> int | None:
        """The telephone-event payload type agreed with the browser (None: not agreed)."""
        return self._browser_te_pt

    @property
    def browser_direction(self) -> str | None:
        """The bridge's current direction towards the browser (None before negotiation)."""
        if self._transceiver is None:
            return None
        return self._transceiver.currentDirection

    @property
    def phone_direction(self) -> str:
        """The phone's latest SDP direction, from the phone's point of view."""
        return "inactive" if self._phone.held_address else self._phone.direction

    @property
    def on_hold(self) -> bool:
        """Either side holds the call: its latest SDP is not sendrecv (or c=0.0.0.0)."""
        browser = self.browser_direction
        return self.phone_direction != "sendrecv" or browser not in (None, "sendrecv")

    async def offer_from_browser(self, sdp_offer: str) -> tuple[str, bytes]:
        """Browser calls a phone: its WebRTC offer → (answer for the browser, plain offer)."""
        self._expect_state("idle")
        sdp, codecs = _parse_browser_sdp(sdp_offer)
        await self._open_phone_side()
        pc, transceiver = self._new_peer_connection(codecs)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp_offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            await self.close()
            raise SdpError(f"browser offer not acceptable: {exc}") from exc
        self._learn_browser(sdp)
        self._start_from_browser(transceiver.receiver.track)
        browser_codec = self._local_codec(pc)
        others = [c for c in (PCMU, PCMA) if c is not browser_codec]
        self._state = "browser-offered"
        direction = sdp.stream_direction(_first_audio(sdp, plain=False))
        return self._for_browser(pc.localDescription.sdp), self._plain_sdp(
            [browser_codec, *others], direction
        )

    async def answer_from_phone(self, sdp_answer: bytes) -> None:
        """The phone's answer to our plain offer: its address and G.711 law."""
        self._expect_state("browser-offered")
        sdp, index, codec = self._parse_phone_sdp(sdp_answer, "answered")
        self._learn_phone(sdp, index, codec)
        self._state = "active"
        self.negotiated_at = self._clock()

    async def offer_to_browser(self, plain_offer_from_phone: bytes) -> tuple[str, bytes]:
        """Phone calls a browser: its plain offer → (WebRTC offer for the browser, answer)."""
        self._expect_state("idle")
        sdp, index, codec = self._parse_phone_sdp(plain_offer_from_phone, "offered")
        codecs = _g711_formats(sdp.media[index])
        await self._open_phone_side()
        self._learn_phone(sdp, index, codec)
        pc, transceiver = self._new_peer_connection(codecs)
        transceiver.direction = self._direction_for_browser()
        try:
            await pc.setLocalDescription(await pc.createOffer())
        except Exception as exc:  # pragma: no cover - aiortc refusing its own offer
            await self.close()
            raise MediaError(f"could not create the WebRTC offer: {exc}") from exc
        self._transceiver = transceiver
        self._state = "phone-offered"
        direction = _REPLY_DIRECTION[sdp.stream_direction(index)]
        answer = self._plain_sdp(
            [codec],
            direction,
            offer=sdp,
            index=index,
            telephone_event=self._phone.telephone_event_pt is not None,
        )
        return self._for_browser(pc.localDescription.sdp, offer=True), answer

    async def answer_from_browser(self, sdp_answer: str) -> None:
        """The browser's WebRTC answer to :meth:`offer_to_browser`'s offer."""
        self._expect_state("phone-offered")
        sdp, _ = _parse_browser_sdp(sdp_answer)
        if self._pc is None or self._transceiver is None:  # pragma: no cover - state says so
            raise MediaError("no WebRTC offer outstanding")
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp_answer, "answer"))
        except Exception as exc:
            raise SdpError(f"browser answer not acceptable: {exc}") from exc
        self._learn_browser(sdp)
        self._start_from_browser(self._transceiver.receiver.track)
        self._state = "active"
        self.negotiated_at = self._clock()

    # -- re-offers on an established call (hold, resume, a new address) -------------------------

    async def reoffer_from_phone(self, plain_offer: bytes) -> str:
        """The phone's re-offer (re-INVITE/UPDATE) → the WebRTC re-offer for the browser.

        The browser keeps its ICE and DTLS session (aiortc renegotiates on the same peer
        connection); the direction offered to the browser follows the phone's (a phone
        holding with ``a=sendonly`` makes the bridge offer ``sendonly``: the phone's music
        still reaches the browser, nothing goes back). Answer with
        :meth:`answer_reoffer_from_browser`; :meth:`abandon_reoffer` if the browser refuses.
        """
        self._expect_state("active")
        sdp, index, codec = self._parse_phone_sdp(plain_offer, "offered")
        pc, transceiver = self._pc, self._transceiver
        if pc is None or transceiver is None:  # pragma: no cover - state says so
            raise MediaError("no WebRTC leg to re-offer to")
        self._saved = (replace(self._phone), transceiver.direction, transceiver.currentDirection)
        self._learn_phone(sdp, index, codec)
        transceiver.direction = self._direction_for_browser()
        try:
            await pc.setLocalDescription(await pc.createOffer())
        except Exception as exc:  # pragma: no cover - aiortc refusing its own offer
            self._restore()
            raise MediaError(f"could not create the WebRTC re-offer: {exc}") from exc
        self._reoffer = (sdp, index, codec)
        self._state = "phone-reoffered"
        return self._for_browser(pc.localDescription.sdp, offer=True)

    async def answer_reoffer_from_browser(self, sdp_answer: str) -> bytes:
        """The browser's answer to :meth:`reoffer_from_phone` → the plain answer for the
        phone: same port, direction per RFC 3264 §6.1 (limited to what the browser agreed)."""
        self._expect_state("phone-reoffered")
        assert self._pc is not None and self._reoffer is not None
        sdp, _ = _parse_browser_sdp(sdp_answer)
        self._check_same_ice(sdp)
        try:
            await self._pc.setRemoteDescription(RTCSessionDescription(sdp_answer, "answer"))
        except Exception as exc:
            raise SdpError(f"browser answer not acceptable: {exc}") from exc
        self._learn_browser(sdp)
        offer, index, codec = self._reoffer
        browser = sdp.stream_direction(_first_audio(sdp, plain=False))
        phone = self.phone_direction
        direction = _direction(
            send=_receives(phone) and _sends(browser), receive=_sends(phone) and _receives(browser)
        )
        self._origin_version += 1
        answer = self._plain_sdp(
            [codec],
            direction,
            offer=offer,
            index=index,
            telephone_event=self._phone.telephone_event_pt is not None,
        )
        self._finish_reoffer()
        return answer

    async def reoffer_from_browser(self, sdp_offer: str) -> tuple[str, bytes]:
        """The browser's re-offer (hold/resume) → (WebRTC answer for the browser, plain
        re-offer for the phone on the same port).

        aiortc answers at once on the same peer connection; the direction offered to the
        phone follows the browser's (``a=sendonly`` from the browser → ``a=sendonly`` to the
        phone). An ICE restart (new ``ice-ufrag``) is refused with :class:`SdpError`: aiortc
        cannot restart ICE. Complete with :meth:`answer_reoffer_from_phone`.
        """
        self._expect_state("active")
        sdp, _ = _parse_browser_sdp(sdp_offer)
        self._check_same_ice(sdp)
        pc, transceiver = self._pc, self._transceiver
        if pc is None or transceiver is None:  # pragma: no cover - state says so
            raise MediaError("no WebRTC leg to renegotiate")
        self._saved = (replace(self._phone), transceiver.direction, transceiver.currentDirection)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp_offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise SdpError(f"browser re-offer not acceptable: {exc}") from exc
        self._learn_browser(sdp)
        browser = sdp.stream_direction(_first_audio(sdp, plain=False))
        codec = self._phone.codec or PCMU
        others = [c for c in (PCMU, PCMA) if c is not codec]
        self._origin_version += 1
        offer = self._plain_sdp([codec, *others], browser)
        self._browser_reply = self._for_browser(pc.localDescription.sdp)
        self._state = "browser-reoffered"
        return self._browser_reply, offer

    async def answer_reoffer_from_phone(self, sdp_answer: bytes) -> None:
        """The phone's answer to :meth:`reoffer_from_browser`'s plain re-offer."""
        self._expect_state("browser-reoffered")
        sdp, index, codec = self._parse_phone_sdp(sdp_answer, "answered")
        self._learn_phone(sdp, index, codec)
        self._finish_reoffer()

    def abandon_reoffer(self) -> None:
        """The other side refused the re-offer (or never answered): back to the media as it
        was before it, so the call goes on unchanged (RFC 3261 §14.1)."""
        if self._state not in ("phone-reoffered", "browser-reoffered"):
            return
        pc = self._pc
        if self._state == "phone-reoffered" and pc is not None:
            # aiortc has no "rollback": undo the local offer by hand
            with contextlib.suppress(AttributeError):
                pc._RTCPeerConnection__setSignalingState("stable")  # type: ignore[attr-defined]
                pc._RTCPeerConnection__pendingLocalDescription = None  # type: ignore[attr-defined]
        self._restore()
        self._reoffer = None
        self._state = "active"

    @property
    def browser_reply(self) -> str:
        """The WebRTC answer made for the browser's latest re-offer."""
        return self._browser_reply

    async def send_dtmf(self, digits: str, duration_ms: int = 100) -> None:
        """Send ``digits`` to the phone as RFC 4733 telephone-events (audio paused meanwhile).

        Raises :class:`MediaError` when the phone did not negotiate telephone-event or the
        call's phone leg is not known yet, ValueError for a digit that is not 0-9*#A-D.
        """
        bad = [d for d in digits.upper() if d not in DTMF_EVENTS]
        if bad:
            raise ValueError(f"not DTMF digits: {''.join(bad)!r}")
        if not 40 <= duration_ms <= 8000:
            raise ValueError(f"DTMF duration must be 40-8000 ms, not {duration_ms}")
        pt = self._phone.telephone_event_pt
        if pt is None or self._phone.target is None or self._rtp_transport is None:
            raise MediaError("the phone leg has no telephone-event payload type or address")
        for digit in digits.upper():
            event = DTMF_EVENTS.index(digit)
            self._dtmf_active = True
            try:
                start_ts = self._rtp_ts
                elapsed = 0
                marker = True
                while True:
                    elapsed = min(elapsed + SAMPLES_PER_PACKET, duration_ms * 8)
                    end = elapsed >= duration_ms * 8
                    payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, elapsed)
                    for _ in range(3 if end else 1):  # the end packet three times (§2.5.1.4)
                        self._send_to_phone(pt, payload, start_ts, marker)
                        marker = False
                    if end:
                        break
                    await asyncio.sleep(PTIME_MS / 1000)
                self._rtp_ts = (start_ts + elapsed) & 0xFFFFFFFF
            finally:
                self._dtmf_active = False
            await asyncio.sleep(0.05)  # an inter-digit gap

    def stats(self) -> MediaStats:
        """Counters: ``a_to_b`` is browser → phone, ``b_to_a`` is phone → browser."""
        return MediaStats(self.started_at, a_to_b=self.to_phone, b_to_a=self.from_phone)

    async def close(self) -> None:
        """Hang up the media: stop tasks, close the peer connection, free the sockets."""
        if self._state == "closed":
            return
        self._state = "closed"
        task, self._from_browser_task = self._from_browser_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._to_browser.stop()
        pc, self._pc = self._pc, None
        if pc is not None:
            await pc.close()
        for transport in (self._rtp_transport, self._rtcp_transport):
            if transport is not None:
                transport.close()
        self._rtp_transport = self._rtcp_transport = None
        if self._ports is not None and self._allocated_port is not None:
            self._ports.release(self._allocated_port)
            self._allocated_port = None

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # -- set-up helpers -----------------------------------------------------------------------

    def _expect_state(self, state: str) -> None:
        if self._state != state:
            raise MediaError(
                f"WebRTC bridge for call {self.call_id!r} is {self._state}, not {state}"
            )

    @staticmethod
    def _parse_phone_sdp(data: bytes, verb: str) -> tuple[SessionDescription, int, G711Codec]:
        sdp = parse_sdp(data)
        index = _first_audio(sdp, plain=True)
        description = sdp.media[index]
        codecs = _g711_formats(description)
        if not codecs:
            raise SdpError(
                f"the phone {verb} no PCMU or PCMA; formats: " + " ".join(description.formats)
            )
        return sdp, index, codecs[0]

    def _learn_browser(self, sdp: SessionDescription) -> None:
        index = _first_audio(sdp, plain=False)
        self._browser_te_pt = _telephone_event_pt(sdp.media[index])
        self._browser_ufrag = _media_attribute(sdp, index, "ice-ufrag")

    def _check_same_ice(self, sdp: SessionDescription) -> None:
        ufrag = _media_attribute(sdp, _first_audio(sdp, plain=False), "ice-ufrag")
        if self._browser_ufrag is not None and ufrag != self._browser_ufrag:
            raise SdpError(
                "ICE restart (a new ice-ufrag) is not supported on a call bridged to WebRTC"
            )

    def _direction_for_browser(self) -> str:
        """The bridge sends to the browser what the phone sends, and takes from the
        browser what the phone can receive."""
        return _direction(
            send=_sends(self._phone.direction), receive=_receives(self.phone_direction)
        )

    def _restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        phone, direction, current = saved
        self._phone = phone
        if self._transceiver is not None:
            self._transceiver.direction = direction
            if current is not None:
                self._transceiver._setCurrentDirection(current)

    def _finish_reoffer(self) -> None:
        self._saved = None
        self._reoffer = None
        self._state = "active"
        self.negotiated_at = self._clock()

    def _for_browser(self, text: str, *, offer: bool = False) -> str:
        """aiortc's SDP made ready for the browser: one o= line for the whole session
        (its version raised each time), telephone-event (RFC 4733) added to the audio
        section, and host candidates on the advertised address."""
        lines = text.split("\r\n")
        if lines and lines[-1] == "":
            lines.pop()
        out: list[str] = []
        audio_at: int | None = None
        last_rtpmap: int | None = None
        in_audio = False
        for line in lines:
            if line.startswith("m="):
                in_audio = audio_at is None and line.startswith("m=audio ")
                if in_audio:
                    audio_at = len(out)
            elif line.startswith("o="):
                line = self._browser_origin_line(line)
            elif line.startswith(("c=", "a=candidate:")):
                line = self._advertised(line)
            if in_audio and line.startswith("a=rtpmap:"):
                last_rtpmap = len(out)
            out.append(line)
        if audio_at is not None:
            formats = out[audio_at].split()[3:]
            te = self._browser_te_pt
            if te is None and offer:
                te = next(
                    pt for pt in (TELEPHONE_EVENT_PT, 126, 110, 100) if str(pt) not in formats
                )
            if te is not None and str(te) not in formats:
                out[audio_at] += f" {te}"
                at = (audio_at if last_rtpmap is None else last_rtpmap) + 1
                out[at:at] = [f"a=rtpmap:{te} telephone-event/8000", f"a=fmtp:{te} 0-16"]
        return "\r\n".join(out) + "\r\n"

    def _browser_origin_line(self, line: str) -> str:
        parts = line[2:].split()
        if len(parts) != 6:
            return line
        if self._browser_origin is None:
            version = int(parts[2]) if parts[2].isdigit() else 1
            self._browser_origin = (parts[1], version)
        else:
            session, version = self._browser_origin
            self._browser_origin = (session, version + 1)
        parts[1], parts[2] = self._browser_origin[0], str(self._browser_origin[1])
        return "o=" + " ".join(parts)

    def _advertised(self, line: str) -> str:
        """A c= or host candidate line with the bind address replaced by the advertised one
        (the port is unchanged: 1:1 NAT keeps ports)."""
        public, bound = self.advertise_host, self.host.strip("[]")
        if public == bound:
            return line
        family = address_type(public)
        parts = line.split(" ")

        def ours(address: str) -> bool:
            if address == bound:
                return True
            if bound not in ("", "0.0.0.0", "::"):
                return False
            try:
                return address_type(address) == family
            except SdpError:  # an mDNS name or other non-literal: not ours to rewrite
                return False

        if line.startswith("c="):
            if len(parts) == 3 and parts[1] == family and ours(parts[2]):
                parts[2] = public
        elif len(parts) >= 8 and parts[6] == "typ" and parts[7] == "host" and ours(parts[4]):
            parts[4] = public
        return " ".join(parts)

    def _new_peer_connection(
        self, codecs: Sequence[G711Codec]
    ) -> tuple[RTCPeerConnection, RTCRtpTransceiver]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        self._pc = pc
        transceiver = pc.addTransceiver(self._to_browser, direction="sendrecv")
        self._transceiver = transceiver
        capabilities = RTCRtpSender.getCapabilities("audio").codecs
        wanted = [_MIME_BY_CODEC[c.name].lower() for c in codecs]
        preferred = sorted(
            (c for c in capabilities if c.mimeType.lower() in wanted),
            key=lambda c: wanted.index(c.mimeType.lower()),
        )
        transceiver.setCodecPreferences(preferred)
        self._hook_transport(transceiver.receiver.transport)
        return pc, transceiver

    def _hook_transport(self, dtls: RTCDtlsTransport) -> None:
        """Carry telephone-events past aiortc, which knows no telephone-event codec: RTP
        from the browser with the agreed telephone-event payload type is taken before
        aiortc's receiver would drop it, and while the phone signals an event, the audio
        packets aiortc sends to the browser become the event's packets (same SSRC and
        sequence numbers, RFC 4733 §2.3)."""
        receive = dtls._handle_rtp_data
        send = dtls._send_rtp

        async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
            pt = self._browser_te_pt
            if pt is not None and len(data) >= 12 and data[1] & 0x7F == pt:
                self._event_from_browser(data)
                return
            await receive(data, arrival_time_ms=arrival_time_ms)

        async def send_rtp(data: bytes) -> None:
            if self._event_to_browser is not None and not is_rtcp(data):
                data = self._event_packet_for_browser(data)
            await send(data)

        dtls._handle_rtp_data = handle_rtp_data  # type: ignore[method-assign]
        dtls._send_rtp = send_rtp  # type: ignore[method-assign]

    @staticmethod
    def _local_codec(pc: RTCPeerConnection) -> G711Codec:
        sdp = parse_sdp(pc.localDescription.sdp.encode())
        codecs = _g711_formats(sdp.media[_first_audio(sdp, plain=False)])
        if not codecs:  # pragma: no cover - codec preferences allow G.711 only
            raise SdpError("no G.711 negotiated with the browser")
        return codecs[0]

    async def _open_phone_side(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ports is not None:
            port = self._ports.allocate()
            self._allocated_port = port
            rtp_local: Address = (self.host, port)
            rtcp_local: Address = (self.host, port + 1)
        else:
            rtp_local = rtcp_local = (self.host, 0)
        try:
            rtp, _ = await loop.create_datagram_endpoint(
                lambda: _PhoneSocket(self, rtcp=False), local_addr=rtp_local
            )
            self._rtp_transport = rtp
            rtcp, _ = await loop.create_datagram_endpoint(
                lambda: _PhoneSocket(self, rtcp=True), local_addr=rtcp_local
            )
            self._rtcp_transport = rtcp
        except OSError as exc:
            await self.close()
            raise MediaError(
                f"cannot bind the phone-side RTP socket on {self.host}: {exc}",
                status=503,
                reason="Media Unavailable",
            ) from exc
        self.rtp_port = rtp.get_extra_info("sockname")[1]
        self.rtcp_port = rtcp.get_extra_info("sockname")[1]

    def _learn_phone(self, sdp: SessionDescription, index: int, codec: G711Codec) -> None:
        """The phone's codec, telephone-event, direction and address from its SDP. A new
        address in a later SDP (a phone that moved) unlatches it: the next packet latches
        again; a hold with c=0.0.0.0 keeps the address known."""
        description = sdp.media[index]
        phone = self._phone
        phone.codec = codec
        phone.telephone_event_pt = _telephone_event_pt(description)
        phone.direction = sdp.stream_direction(index)
        connection = sdp.stream_connection(index)
        phone.held_address = connection is None or connection.is_unspecified
        phone.send = _receives(phone.direction) and not phone.held_address
        if connection is None or connection.is_unspecified:
            return
        target = (connection.address, description.port)
        if not phone.latched:
            phone.target = target
        elif phone.sdp_target is not None and target != phone.sdp_target:
            phone.target, phone.latched = target, False
        phone.sdp_target = target

    def _plain_sdp(
        self,
        codecs: Sequence[G711Codec],
        direction: str,
        *,
        offer: SessionDescription | None = None,
        index: int = 0,
        telephone_event: bool = True,
    ) -> bytes:
        """Our SDP for the phone: one audio stream (others rejected when answering)."""
        host = self.advertise_host
        addr_type = address_type(host)
        lines: list[tuple[str, str]] = [
            ("v", "0"),
            ("o", str(Origin("-", self._origin_id, self._origin_version, "IN", addr_type, host))),
            ("s", "-"),
            ("c", str(Connection("IN", addr_type, host))),
            ("t", "0 0"),
        ]
        formats = [str(c.payload_type) for c in codecs]
        attributes = [("a", f"rtpmap:{c.rtpmap}") for c in codecs]
        te_pt = self._phone.telephone_event_pt if offer is not None else TELEPHONE_EVENT_PT
        if telephone_event and te_pt is not None:
            self._phone.telephone_event_pt = te_pt
            formats.append(str(te_pt))
            attributes += [
                ("a", f"rtpmap:{te_pt} telephone-event/8000"),
                ("a", f"fmtp:{te_pt} 0-16"),
            ]
        attributes += [
            ("a", f"rtcp:{self.rtcp_port}"),
            ("a", f"ptime:{PTIME_MS}"),
            ("a", direction),
        ]
        ours = MediaDescription("audio", self.rtp_port, None, "RTP/AVP", formats, attributes)
        media: list[MediaDescription] = []
        if offer is None:
            media.append(ours)
        else:
            for number, description in enumerate(offer.media):
                if number == index:
                    media.append(ours)
                else:
                    fmts = list(description.formats) or ["0"]
                    media.append(
                        MediaDescription(description.media, 0, None, description.proto, fmts)
                    )
        return SessionDescription(lines, media).serialize()

    # -- browser → phone ------------------------------------------------------------------------

    def _start_from_browser(self, track: MediaStreamTrack) -> None:
        self._from_browser_task = asyncio.get_running_loop().create_task(
            self._pump_from_browser(track), name=f"webrtc-from-browser-{self.call_id}"
        )

    async def _pump_from_browser(self, track: MediaStreamTrack) -> None:
        resampler: av.AudioResampler | None = None
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the browser's track ended (hang-up or failed ICE/DTLS)
            self.browser_frames += 1
            if not isinstance(frame, av.AudioFrame):
                continue
            if (
                frame.format.name == "s16"
                and frame.layout.name == "mono"
                and frame.sample_rate == SAMPLE_RATE
            ):
                frames = [frame]
            else:
                if resampler is None:
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
                frames = resampler.resample(frame)
            for mono in frames:
                self._pending += bytes(mono.planes[0])[: 2 * mono.samples]
            while len(self._pending) >= BYTES_PER_FRAME:
                pcm = array("h")
                pcm.frombytes(bytes(self._pending[:BYTES_PER_FRAME]))
                del self._pending[:BYTES_PER_FRAME]
                self._audio_to_phone(pcm)

    def _audio_to_phone(self, pcm: array[int]) -> None:
        codec = self._phone.codec
        timestamp = self._rtp_ts
        self._rtp_ts = (timestamp + SAMPLES_PER_PACKET) & 0xFFFFFFFF
        if codec is None or self._dtmf_active or not self._phone.send:
            self._marker = True  # a talk spurt starts again when we resume
            return
        self._send_to_phone(codec.payload_type, codec.encode(pcm), timestamp, self._marker)
        self._marker = False

    def _send_to_phone(self, pt: int, payload: bytes, timestamp: int, marker: bool) -> None:
        target = self._phone.target
        if target is None or self._rtp_transport is None:
            return
        header = _RTP_HEADER.pack(
            0x80, (0x80 if marker else 0) | pt, self._seq, timestamp, self._ssrc
        )
        self._seq = (self._seq + 1) & 0xFFFF
        packet = header + payload
        self._rtp_transport.sendto(packet, target)
        self.to_phone.packets += 1
        self.to_phone.bytes += len(packet)
        self.to_phone.last_packet_at = self._clock()

    # -- phone → browser ------------------------------------------------------------------------

    def _rtp_from_phone(self, data: bytes, addr: Address) -> None:
        phone = self._phone
        if phone.latched:
            if addr != phone.target:
                self.from_phone.dropped += 1
                return
        else:
            phone.target = addr
            phone.latched = True
        fields = _rtp_fields(data)
        if fields is None:
            self.from_phone.dropped += 1
            return
        pt, _, timestamp, start, end = fields
        payload = data[start:end]
        self.from_phone.packets += 1
        self.from_phone.bytes += len(data)
        self.from_phone.last_packet_at = self._clock()
        codec = _CODECS_BY_PT.get(pt)
        if codec is not None:
            self._to_browser.feed(codec.decode(payload))
        elif pt == phone.telephone_event_pt and len(payload) >= 4:
            self._event_from_phone(payload, timestamp)

    # -- telephone-events (RFC 4733) between the legs ---------------------------------------------

    def _event_from_phone(self, payload: bytes, timestamp: int) -> None:
        event = payload[0]
        if event >= len(DTMF_EVENTS):
            self.dtmf_events_dropped += 1
            return
        new = timestamp != self._last_dtmf_ts
        if new:
            self._last_dtmf_ts = timestamp
            self.dtmf_from_phone.append(DTMF_EVENTS[event])
        if self._browser_te_pt is None:
            if new and self.on_dtmf is not None:
                self.on_dtmf(DTMF_EVENTS[event])  # the signalling side tells the browser
            return
        now = self._clock()
        relay = self._event_to_browser
        if new:
            relay = _EventToBrowser(event, payload[1] & 0x3F, timestamp, now)
            self._event_to_browser = relay
        elif relay is None or relay.phone_ts != timestamp:
            return  # a retransmitted end of an event already carried over
        relay.heard_at = now
        if payload[1] & 0x80:
            relay.ended = True

    def _event_packet_for_browser(self, data: bytes) -> bytes:
        """An audio packet aiortc sends to the browser, turned into the phone's event."""
        relay, pt = self._event_to_browser, self._browser_te_pt
        fields = _rtp_fields(data)
        if relay is None or pt is None or fields is None:
            return data
        _, _, timestamp, start, _ = fields
        if self._clock() - relay.heard_at > 1.0:  # long gone (the browser leg was on hold)
            self._event_to_browser = None
            return data
        first = relay.start_ts is None
        if relay.start_ts is None:
            relay.start_ts = timestamp
        if not relay.ended and self._clock() - relay.heard_at > EVENT_SILENCE_S:
            relay.ended = True  # the phone's end packets were lost
        duration = min((timestamp - relay.start_ts) % 2**32 + SAMPLES_PER_PACKET, 0xFFFF)
        if relay.ended:
            if relay.end_duration is None:
                relay.end_duration = duration
            duration = relay.end_duration
            relay.ends_sent += 1
            if relay.ends_sent >= 3:  # the end packet three times (RFC 4733 §2.5.1.4)
                self._event_to_browser = None
        header = bytearray(data[:start])
        header[0] &= 0xDF  # no padding
        header[1] = (0x80 if first else 0) | pt
        header[4:8] = relay.start_ts.to_bytes(4, "big")
        flags = (0x80 if relay.ended else 0) | relay.volume
        return bytes(header) + struct.pack("!BBH", relay.event, flags, duration)

    def _event_from_browser(self, data: bytes) -> None:
        """A telephone-event packet from the browser (RTCDTMFSender): on to the phone as
        RFC 4733 events in the phone's payload type, audio to the phone paused meanwhile."""
        fields = _rtp_fields(data)
        if fields is None or fields[4] - fields[3] < 4:
            return
        _, _, timestamp, start, _ = fields
        event, flags, duration = struct.unpack("!BBH", data[start : start + 4])
        if event >= len(DTMF_EVENTS):
            self.dtmf_events_dropped += 1
            return
        relay = self._event_to_phone
        new = relay is None or relay.browser_ts != timestamp
        if new:
            relay = _EventToPhone(timestamp, self._rtp_ts)
            self._event_to_phone = relay
            self.dtmf_from_browser.append(DTMF_EVENTS[event])
        assert relay is not None
        pt = self._phone.telephone_event_pt
        if pt is None or not self._phone.send:
            if new:
                self.dtmf_events_dropped += 1  # the phone takes no telephone-event
            return
        end = bool(flags & 0x80)
        if not relay.ended:
            self._dtmf_active = not end
        self._send_to_phone(pt, data[start : start + 4], relay.start_ts, new)
        if end and not relay.ended:
            relay.ended = True
            ahead = (relay.start_ts + max(duration, SAMPLES_PER_PACKET) - self._rtp_ts) % 2**32
            if ahead < 2**31:
                self._rtp_ts = (self._rtp_ts + ahead) % 2**32


# -- benchmark -----------------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    """Let aioice gather host candidates on 127.0.0.1 only (for tests and the benchmark)."""
    import aioice.ice

    saved = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = saved


def tone_frame(frequency_hz: float, start_sample: int, rate: int = 48000) -> av.AudioFrame:
    """20 ms of a sine tone (half scale) as an s16 mono frame starting at ``start_sample``."""
    count = rate * PTIME_MS // 1000
    samples = array(
        "h",
        (
            int(16000 * math.sin(2 * math.pi * frequency_hz * (start_sample + n) / rate))
            for n in range(count)
        ),
    )
    frame = av.AudioFrame(format="s16", layout="mono", samples=count)
    frame.planes[0].update(samples.tobytes())
    frame.pts = start_sample
    frame.sample_rate = rate
    frame.time_base = fractions.Fraction(1, rate)
    return frame


class ToneTrack(MediaStreamTrack):
    """A browser-like microphone: a paced sine tone at 48 kHz (tests and benchmark)."""

    kind = "audio"

    def __init__(self, frequency_hz: float) -> None:
        super().__init__()
        self.frequency_hz = frequency_hz
        self._sample = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        else:
            self._sample += 960
            wait = self._start + self._sample / 48000 - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        return tone_frame(self.frequency_hz, self._sample)


async def _bench_call(index: int, stop: asyncio.Event, counters: dict[str, list[int]]) -> None:
    bridge = WebRtcBridge(f"bench-{index}")
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    phone_transport: asyncio.DatagramTransport | None = None
    try:
        browser.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
        await browser.setLocalDescription(await browser.createOffer())
        answer, plain_offer = await bridge.offer_from_browser(browser.localDescription.sdp)
        await browser.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        received_at_browser = counters["browser"]
        received_at_phone = counters["phone"]

        class Phone(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
                received_at_phone[index] += 1

        loop = asyncio.get_running_loop()
        phone_transport, _ = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", 0))
        port = phone_transport.get_extra_info("sockname")[1]
        await bridge.answer_from_phone(
            f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=sendrecv\r\n".encode()
        )
        remote = browser.getTransceivers()[0].receiver.track

        async def drain() -> None:
            with contextlib.suppress(MediaStreamError):
                while True:
                    await remote.recv()
                    received_at_browser[index] += 1

        drainer = asyncio.create_task(drain())
        tone = PCMU.encode(
            array(
                "h",
                (
                    int(8000 * math.sin(2 * math.pi * 440 * n / 8000))
                    for n in range(SAMPLES_PER_PACKET)
                ),
            )
        )
        seq, ts, start = 0, 0, loop.time()
        target = ("127.0.0.1", bridge.rtp_port)
        while not stop.is_set():
            phone_transport.sendto(_RTP_HEADER.pack(0x80, 0, seq, ts, 0x1234) + tone, target)
            seq, ts = (seq + 1) & 0xFFFF, ts + SAMPLES_PER_PACKET
            wait = start + (seq / 50) - loop.time()
            if wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
    finally:
        await bridge.close()
        await browser.close()
        if phone_transport is not None:
            phone_transport.close()


async def run_bench(calls: int, seconds: float = 10.0) -> dict[str, float]:
    """Bridge ``calls`` calls at once (browser peers and phones simulated in-process).

    CPU is measured over ``seconds`` after a 2 s warm-up and includes the simulated
    browsers (an aiortc peer each: SRTP + G.711 like the bridge's own browser side) and
    phones, so the bridge alone costs roughly half of ``cpu_per_call``.
    """
    counters: dict[str, list[int]] = {"browser": [0] * calls, "phone": [0] * calls}
    stop = asyncio.Event()
    with loopback_ice():
        tasks = [asyncio.create_task(_bench_call(i, stop, counters)) for i in range(calls)]
        await asyncio.sleep(2.0)
        phone0, browser0 = list(counters["phone"]), list(counters["browser"])
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu1, wall1 = time.process_time(), time.monotonic()
        phone1, browser1 = list(counters["phone"]), list(counters["browser"])
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]

    wall = wall1 - wall0
    expected = wall * 1000 / PTIME_MS
    flowing = sum(
        1
        for i in range(calls)
        if phone1[i] - phone0[i] >= 0.9 * expected and browser1[i] - browser0[i] >= 0.9 * expected
    )
    cpu_fraction = (cpu1 - cpu0) / wall
    return {
        "calls": calls,
        "seconds": wall,
        "cpu_cores_used": cpu_fraction,
        "cpu_per_call_percent": 100 * cpu_fraction / calls,
        "calls_flowing": flowing,
        "errors": len(errors),
        "calls_per_core_with_simulators": calls / cpu_fraction if cpu_fraction else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m media.webrtc", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bench", type=int, metavar="N", required=True, help="calls at once")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.bench < 1:
        parser.error("--bench needs at least 1 call")
    result = asyncio.run(run_bench(args.bench, args.seconds))
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    return 0 if result["calls_flowing"] == args.bench and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

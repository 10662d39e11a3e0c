"""The built-in RTP/RTCP relay: :class:`RtpRelay`, a :class:`~media.backend.MediaBackend`.

Per call and per media section (``m=`` line) the relay holds two *sides*, one facing each
leg. A side owns an RTP/RTCP port pair and the UDP sockets bound to them; what arrives on
the side facing A is sent out of the side facing B to B's address, and back. Sending from
the side facing the receiver keeps RTP symmetric (RFC 4961): each phone sends to, and
receives from, the one address and port written in its SDP.

Symmetric latching: a side's remote address starts as the SDP's (only a first guess: a
phone behind NAT writes its private address) and is replaced by the source of the first
packet received on that side. From then on packets from any other source are dropped and
counted in ``dropped`` (no hijack). Each new SDP from a side (re-offer or answer) lets
that side latch again on its next packet (a phone that moved, or whose NAT mapping
changed, keeps its audio).

The per-packet path is one ``datagram_received`` → ``sendto``, with a few counter updates
and, for RTP, a sequence-gap check; no logging and no allocation beyond the call itself.
One periodic task checks every session's media timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from media.backend import (
    DirectionStats,
    MediaBackend,
    MediaError,
    MediaStats,
    PortsExhausted,
    SdpError,
    UnknownCall,
)
from media.ports import PortAllocator
from media.rtcp import parse_rtcp
from media.sdp import (
    MediaDescription,
    Origin,
    RelayStreamPorts,
    SessionDescription,
    parse_sdp,
    rewrite_for_relay,
)

log = logging.getLogger("media.relay")

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id) as asyncio gives them

#: A sequence jump this far forward is counted as loss; larger jumps are a new stream.
MAX_SEQUENCE_GAP = 3000
#: A sequence this far behind the expected one is a late (reordered) packet.
MAX_REORDER = 100
#: Attempts at binding a fresh pair when ports of the range are held by another process.
BIND_ATTEMPTS = 16
#: Loop turns ``delete`` waits for closed sockets to be released by the event loop.
SETTLE_TURNS = 10


class _Side:
    """The relay's end of one media section facing one leg, with that leg's counters.

    Counters are about packets *received from* this side's phone (direction this → peer),
    and ``report_*`` hold what this phone's RTCP reports say about what it *receives*
    (direction peer → this).
    """

    __slots__ = (
        "role",
        "peer",
        "port",
        "rtcp_port",
        "rtp_transport",
        "rtcp_transport",
        "rtp_target",
        "rtcp_target",
        "rtp_latched",
        "rtcp_latched",
        "sdp_rtp",
        "sdp_rtcp",
        "mux",
        "is_rtp",
        "parse_rtcp",
        "clock_rate",
        "clock",
        "packets",
        "bytes",
        "seq_lost",
        "expected_seq",
        "last_packet_at",
        "dropped",
        "rtcp_packets",
        "report_jitter_ms",
        "report_fraction_lost",
        "report_cumulative_lost",
        "open_sockets",
        "release",
        "released",
    )

    def __init__(self, role: str, port: int, clock: Callable[[], float]) -> None:
        self.role = role
        self.peer: _Side = self
        self.port = port
        self.rtcp_port = port + 1
        self.rtp_transport: asyncio.DatagramTransport | None = None
        self.rtcp_transport: asyncio.DatagramTransport | None = None
        self.rtp_target: Address | None = None
        self.rtcp_target: Address | None = None
        self.rtp_latched = False
        self.rtcp_latched = False
        self.sdp_rtp: Address | None = None
        self.sdp_rtcp: Address | None = None
        self.mux = False
        self.is_rtp = True
        self.parse_rtcp = True
        self.clock_rate = 8000
        self.clock = clock
        self.packets = 0
        self.bytes = 0
        self.seq_lost = 0
        self.expected_seq = -1
        self.last_packet_at: float | None = None
        self.dropped = 0
        self.rtcp_packets = 0
        self.report_jitter_ms: float | None = None
        self.report_fraction_lost: float | None = None
        self.report_cumulative_lost = 0
        self.open_sockets = 0
        self.release: Callable[[int], None] | None = None
        self.released = False

    # -- RTCP (its own port, or muxed on the RTP port) ----------------------------------
    def rtcp_in(self, data: bytes) -> None:
        self.rtcp_packets += 1
        if self.parse_rtcp:
            result = parse_rtcp(data)
            for report in result.reports:
                if report.blocks:
                    block = report.blocks[0]
                    self.report_jitter_ms = block.jitter_ms(self.clock_rate)
                    self.report_fraction_lost = block.fraction_lost
                    if block.cumulative_lost > self.report_cumulative_lost:
                        self.report_cumulative_lost = block.cumulative_lost
                    break
        peer = self.peer
        if peer.mux:
            if peer.rtp_target is not None and peer.rtp_transport is not None:
                peer.rtp_transport.sendto(data, peer.rtp_target)
        elif peer.rtcp_target is not None and peer.rtcp_transport is not None:
            peer.rtcp_transport.sendto(data, peer.rtcp_target)

    def set_sdp_target(self, rtp: Address | None, rtcp: Address | None) -> None:
        """New SDP from this side's phone: allow latching again on its next packet.

        When the SDP names a new address the phone moved, so send there until it talks;
        when the SDP is the same, keep sending to the latched source (a NATed phone's SDP
        address is unreachable) until its next packet confirms or moves it.
        """
        if rtp != self.sdp_rtp or not self.rtp_latched:
            self.rtp_target = rtp
        if rtcp != self.sdp_rtcp or not self.rtcp_latched:
            self.rtcp_target = rtcp
        self.rtp_latched = False
        self.rtcp_latched = False
        self.sdp_rtp = rtp
        self.sdp_rtcp = rtcp

    def close(self, release: Callable[[int], None]) -> None:
        """Close the sockets; ``release(port)`` once the OS has really let go of them."""
        if self.release is not None or self.released:
            return
        self.release = release
        for transport in (self.rtp_transport, self.rtcp_transport):
            if transport is not None:
                transport.close()
        self.rtp_transport = None
        self.rtcp_transport = None
        self.rtp_target = None
        self.rtcp_target = None
        if self.open_sockets == 0:
            self._released()

    def socket_opened(self) -> None:
        self.open_sockets += 1

    def socket_closed(self) -> None:
        self.open_sockets -= 1
        if self.open_sockets == 0 and self.release is not None:
            self._released()

    def _released(self) -> None:
        release, self.release = self.release, None
        self.released = True
        if release is not None:
            release(self.port)


class _RtpSocket(asyncio.DatagramProtocol):
    __slots__ = ("side",)

    def __init__(self, side: _Side) -> None:
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.side.rtp_transport = transport  # type: ignore[assignment]
        self.side.socket_opened()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.socket_closed()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        side = self.side
        if side.rtp_latched:
            if addr != side.rtp_target:
                side.dropped += 1
                return
        else:
            side.rtp_target = addr
            side.rtp_latched = True
        if side.is_rtp and len(data) >= 12:
            if 192 <= data[1] <= 223:  # RTCP muxed on the RTP port (RFC 5761 §4)
                side.rtcp_in(data)
                return
            seq = (data[2] << 8) | data[3]
            expected = side.expected_seq
            if expected >= 0 and seq != expected:
                gap = (seq - expected) & 0xFFFF
                if gap < MAX_SEQUENCE_GAP:
                    side.seq_lost += gap
                elif gap > 0xFFFF - MAX_REORDER:  # late: it was counted lost, it is not
                    if side.seq_lost:
                        side.seq_lost -= 1
                    seq = (expected - 1) & 0xFFFF
            side.expected_seq = (seq + 1) & 0xFFFF
        side.packets += 1
        side.bytes += len(data)
        side.last_packet_at = side.clock()
        peer = side.peer
        target = peer.rtp_target
        if target is not None and peer.rtp_transport is not None:
            peer.rtp_transport.sendto(data, target)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable from a phone that went away: the timeout deals with it


class _RtcpSocket(asyncio.DatagramProtocol):
    __slots__ = ("side",)

    def __init__(self, side: _Side) -> None:
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.side.rtcp_transport = transport  # type: ignore[assignment]
        self.side.socket_opened()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.socket_closed()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        side = self.side
        if side.rtcp_latched:
            if addr != side.rtcp_target:
                side.dropped += 1
                return
        else:
            side.rtcp_target = addr
            side.rtcp_latched = True
        side.rtcp_in(data)

    def error_received(self, exc: Exception) -> None:
        pass


@dataclass(slots=True)
class _Stream:
    """One media section relayed between the side facing A and the side facing B."""

    index: int
    a: _Side
    b: _Side

    def side(self, role: str) -> _Side:
        return self.a if role == "a" else self.b

    def close(self, release: Callable[[int], None]) -> None:
        self.a.close(release)
        self.b.close(release)

    @property
    def released(self) -> bool:
        return self.a.released and self.b.released


@dataclass(slots=True)
class _OriginState:
    """The o= a leg has seen from us, and the content it described."""

    origin: Origin
    body: bytes


class _Session:
    __slots__ = (
        "call_id",
        "tag_a",
        "tag_b",
        "streams",
        "retired",
        "started_at",
        "answered_at",
        "negotiated_at",
        "last_offer",
        "last_offer_role",
        "origins",
        "on_hold",
        "timed_out",
    )

    def __init__(self, call_id: str, tag_a: str, now: float) -> None:
        self.call_id = call_id
        self.tag_a = tag_a
        self.tag_b: str | None = None
        self.streams: list[_Stream | None] = []
        self.retired: list[_Stream] = []
        self.started_at = now
        self.answered_at: float | None = None
        self.negotiated_at = now
        self.last_offer: SessionDescription | None = None
        self.last_offer_role = "a"
        self.origins: dict[str, _OriginState] = {}
        self.on_hold = False
        self.timed_out = False

    def role_of(self, tag: str) -> str:
        """'a' for the first offerer's tag; anything else is leg B (learnt or replaced)."""
        if tag == self.tag_a:
            return "a"
        self.tag_b = tag
        return "b"

    def last_rtp_at(self) -> float | None:
        latest: float | None = None
        for stream in self.streams:
            if stream is None:
                continue
            for side in (stream.a, stream.b):
                at = side.last_packet_at
                if at is not None and (latest is None or at > latest):
                    latest = at
        return latest


def _other(role: str) -> str:
    return "b" if role == "a" else "a"


class RtpRelay(MediaBackend):
    """A userspace RTP/RTCP relay on asyncio datagram endpoints.

    ``bind_host``: local address for relay sockets (e.g. ``0.0.0.0`` or ``::``).
    ``advertise_host``: the address written into SDP (the public one); defaults to
    ``bind_host`` when that is a specific address. ``port_range``: inclusive (low, high).
    ``media_timeout``: seconds without RTP in either direction on an answered call, not on
    hold, before ``on_timeout(call_id)`` (None or 0 disables). ``clock``: monotonic seconds.
    """

    def __init__(
        self,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        port_range: tuple[int, int] = (30000, 39999),
        media_timeout: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        strip_ice: bool = True,
        check_interval: float | None = None,
    ) -> None:
        if advertise_host is None:
            if bind_host in ("0.0.0.0", "::", ""):
                raise ValueError("advertise_host is required when binding a wildcard address")
            advertise_host = bind_host
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.ports = PortAllocator(*port_range)
        self.media_timeout = media_timeout
        self.clock = clock
        self.strip_ice = strip_ice
        self.on_timeout: Callable[[str], None] | None = None
        if check_interval is None:
            check_interval = min(1.0, media_timeout / 4) if media_timeout else 1.0
        self.check_interval = check_interval
        self._bind_family_v6 = ":" in bind_host
        self._sessions: dict[str, _Session] = {}
        self._checker: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        self._closed = False
        self._ensure_checker()

    async def close(self) -> None:
        self._closed = True
        if self._checker is not None:
            self._checker.cancel()
            try:
                await self._checker
            except asyncio.CancelledError:
                pass
            self._checker = None
        for call_id in list(self._sessions):
            await self.delete(call_id)

    def _ensure_checker(self) -> None:
        if self._closed or not self.media_timeout:
            return
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(
                self._check_loop(), name="media-timeout-checker"
            )

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            self.check_timeouts(self.clock())

    def check_timeouts(self, now: float) -> list[str]:
        """Fire ``on_timeout`` for every answered, unheld call silent for ``media_timeout``."""
        timeout = self.media_timeout
        if not timeout:
            return []
        expired: list[str] = []
        for session in self._sessions.values():
            if session.timed_out or session.answered_at is None or session.on_hold:
                continue
            if not any(stream is not None for stream in session.streams):
                continue
            last = session.last_rtp_at()
            since = session.negotiated_at if last is None else max(last, session.negotiated_at)
            if now - since >= timeout:
                session.timed_out = True
                expired.append(session.call_id)
        for call_id in expired:
            log.info("media timeout call_id=%s after %.1fs", call_id, timeout)
            if self.on_timeout is not None:
                try:
                    self.on_timeout(call_id)
                except Exception:  # the checker must survive a faulty callback
                    log.exception("on_timeout callback failed call_id=%s", call_id)
        return expired

    # -- offer / answer -----------------------------------------------------------------
    async def offer(self, call_id: str, from_tag: str, sdp: bytes) -> bytes:
        offer = parse_sdp(sdp)
        now = self.clock()
        session = self._sessions.get(call_id)
        created = session is None
        if session is None:
            session = _Session(call_id, from_tag, now)
            self._sessions[call_id] = session
            role = "a"
        else:
            role = session.role_of(from_tag)
        answering = _other(role)
        fresh: list[_Stream] = []
        try:
            out_ports: list[RelayStreamPorts | None] = []
            for index, description in enumerate(offer.media):
                stream = session.streams[index] if index < len(session.streams) else None
                if description.is_disabled or not description.is_udp:
                    self._retire(session, index)
                    out_ports.append(
                        RelayStreamPorts(0, 0) if not description.is_disabled else None
                    )
                    continue
                if stream is None:
                    stream = await self._open_stream(index)
                    fresh.append(stream)
                    while len(session.streams) <= index:
                        session.streams.append(None)
                    session.streams[index] = stream
                offering_side = stream.side(role)
                self._target_from_sdp(offering_side, offer, index)
                self._configure(stream, description)
                facing_answerer = stream.side(answering)
                out_ports.append(
                    RelayStreamPorts(
                        facing_answerer.port, facing_answerer.rtcp_port, description.rtcp_mux
                    )
                )
            for index in range(len(offer.media), len(session.streams)):
                self._retire(session, index)
        except MediaError:
            for stream in fresh:
                self._release_stream(stream)
                if stream in session.streams:
                    session.streams[session.streams.index(stream)] = None
            if created:
                self._sessions.pop(call_id, None)
            raise
        session.last_offer = offer
        session.last_offer_role = role
        session.negotiated_at = now
        session.timed_out = False
        rewritten = rewrite_for_relay(
            offer, self.advertise_host, out_ports, strip_ice=self.strip_ice
        )
        self._present_origin(session, answering, rewritten)
        self._ensure_checker()
        if created:
            log.debug("media session created call_id=%s streams=%d", call_id, len(fresh))
        return rewritten.serialize()

    async def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: bytes) -> bytes:
        session = self._sessions.get(call_id)
        if session is None or session.last_offer is None:
            raise UnknownCall(f"no offer for call {call_id!r}")
        answer = parse_sdp(sdp)
        offer = session.last_offer
        offerer = session.last_offer_role  # from_tag is the offerer's tag
        answerer = _other(offerer)
        if answerer == "b":
            session.tag_b = to_tag
        if len(answer.media) != len(offer.media):
            raise SdpError(
                f"answer has {len(answer.media)} media sections, offer had {len(offer.media)}"
            )
        now = self.clock()
        out_ports: list[RelayStreamPorts | None] = []
        held = False
        live = 0
        for index, description in enumerate(answer.media):
            stream = session.streams[index] if index < len(session.streams) else None
            if stream is None:
                out_ports.append(RelayStreamPorts(0, 0) if not description.is_disabled else None)
                continue
            if description.is_disabled:
                self._retire(session, index)
                out_ports.append(None)
                continue
            live += 1
            answering_side = stream.side(answerer)
            self._target_from_sdp(answering_side, answer, index)
            mux = offer.media[index].rtcp_mux and description.rtcp_mux
            stream.a.mux = stream.b.mux = mux
            facing_offerer = stream.side(offerer)
            out_ports.append(RelayStreamPorts(facing_offerer.port, facing_offerer.rtcp_port, mux))
            if self._is_held(offer, index) or self._is_held(answer, index):
                held = True
        session.on_hold = held or live == 0
        if session.answered_at is None:
            session.answered_at = now
        session.negotiated_at = now
        session.timed_out = False
        rewritten = rewrite_for_relay(
            answer, self.advertise_host, out_ports, strip_ice=self.strip_ice
        )
        self._present_origin(session, offerer, rewritten)
        return rewritten.serialize()

    async def delete(self, call_id: str) -> MediaStats | None:
        session = self._sessions.pop(call_id, None)
        if session is None:
            return None
        for index in range(len(session.streams)):
            self._retire(session, index)
        await self._settle(session.retired)
        stats = self._stats(session)
        log.debug(
            "media session deleted call_id=%s a_to_b=%d b_to_a=%d packets",
            call_id,
            stats.a_to_b.packets,
            stats.b_to_a.packets,
        )
        return stats

    async def query(self, call_id: str) -> MediaStats | None:
        session = self._sessions.get(call_id)
        return None if session is None else self._stats(session)

    def relay_ports(self, call_id: str) -> list[tuple[int, int] | None]:
        """Per media section: (port facing A, port facing B), or None when not relayed."""
        session = self._sessions.get(call_id)
        if session is None:
            return []
        return [None if s is None else (s.a.port, s.b.port) for s in session.streams]

    # -- helpers ------------------------------------------------------------------------
    async def _open_stream(self, index: int) -> _Stream:
        clock = self.clock
        sides: list[_Side] = []
        try:
            for role in ("a", "b"):
                sides.append(await self._open_side(role, clock))
        except MediaError:
            for side in sides:
                side.close(self.ports.release)
            raise
        a, b = sides
        a.peer, b.peer = b, a
        return _Stream(index, a, b)

    async def _open_side(self, role: str, clock: Callable[[], float]) -> _Side:
        loop = asyncio.get_running_loop()
        for _ in range(BIND_ATTEMPTS):
            port = self.ports.allocate()  # PortsExhausted propagates
            side = _Side(role, port, clock)
            try:
                await loop.create_datagram_endpoint(
                    lambda side=side: _RtpSocket(side), local_addr=(self.bind_host, port)
                )
                await loop.create_datagram_endpoint(
                    lambda side=side: _RtcpSocket(side), local_addr=(self.bind_host, port + 1)
                )
            except OSError as exc:
                side.close(self.ports.set_aside)
                log.warning("relay port pair %d/%d not bindable: %s", port, port + 1, exc)
                continue
            return side
        raise PortsExhausted(f"no bindable port pair after {BIND_ATTEMPTS} attempts")

    def _release_stream(self, stream: _Stream) -> None:
        """Close the stream's sockets; the ports return to the pool once they are closed."""
        stream.close(self.ports.release)

    @staticmethod
    async def _settle(streams: list[_Stream]) -> None:
        """Let the loop finish closing sockets (a bounded number of turns)."""
        for _ in range(SETTLE_TURNS):
            if all(stream.released for stream in streams):
                return
            await asyncio.sleep(0)

    def _retire(self, session: _Session, index: int) -> None:
        if index < len(session.streams):
            stream = session.streams[index]
            if stream is not None:
                self._release_stream(stream)
                session.retired.append(stream)
                session.streams[index] = None

    def _target_from_sdp(self, side: _Side, sdp: SessionDescription, index: int) -> None:
        description = sdp.media[index]
        connection = sdp.stream_connection(index)
        host = connection.address if connection is not None else None
        if host is not None and not self._usable_target(host):
            host = None  # hold (0.0.0.0), a name, or another family: wait for latching
        rtp = (host, description.port) if host else None
        rtcp_attribute = description.rtcp
        rtcp: Address | None = None
        if rtcp_attribute is not None:
            rtcp_host = host
            if rtcp_attribute.connection is not None:
                candidate = rtcp_attribute.connection.address
                rtcp_host = candidate if self._usable_target(candidate) else None
            rtcp = (rtcp_host, rtcp_attribute.port) if rtcp_host else None
        elif host:
            rtcp = (host, description.port + 1)
        if self._bind_family_v6 and rtp is not None:
            rtp = (rtp[0], rtp[1], 0, 0)
        if self._bind_family_v6 and rtcp is not None:
            rtcp = (rtcp[0], rtcp[1], 0, 0)
        side.set_sdp_target(rtp, rtcp)

    def _usable_target(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.is_unspecified:
            return False
        return (address.version == 6) == self._bind_family_v6

    @staticmethod
    def _configure(stream: _Stream, description: MediaDescription) -> None:
        is_rtp = description.is_rtp
        parse = is_rtp and not description.is_srtp  # SRTCP report blocks are encrypted
        clock_rate = description.clock_rate() if is_rtp else 8000
        for side in (stream.a, stream.b):
            side.is_rtp = is_rtp
            side.parse_rtcp = parse
            side.clock_rate = clock_rate

    @staticmethod
    def _is_held(sdp: SessionDescription, index: int) -> bool:
        if sdp.stream_direction(index) != "sendrecv":
            return True
        connection = sdp.stream_connection(index)
        return connection is not None and connection.is_unspecified

    @staticmethod
    def _present_origin(session: _Session, role: str, sdp: SessionDescription) -> None:
        """Keep one o= per leg, its version raised only when what it describes changed."""
        body = sdp.body_without_origin()
        state = session.origins.get(role)
        if state is None:
            session.origins[role] = _OriginState(sdp.origin, body)
            return
        if body != state.body:
            state.origin.session_version += 1
            state.body = body
        sdp.origin = replace(state.origin)

    @staticmethod
    def _stats(session: _Session) -> MediaStats:
        stats = MediaStats(started_at=session.started_at)
        streams = [s for s in session.streams if s is not None] + session.retired
        for sender, receiver, direction in (("a", "b", stats.a_to_b), ("b", "a", stats.b_to_a)):
            _accumulate(direction, [(s.side(sender), s.side(receiver)) for s in streams])
        return stats


def _accumulate(direction: DirectionStats, pairs: list[tuple[_Side, _Side]]) -> None:
    for sender, receiver in pairs:
        direction.packets += sender.packets
        direction.bytes += sender.bytes
        direction.lost += max(sender.seq_lost, receiver.report_cumulative_lost)
        direction.rtcp_packets += sender.rtcp_packets
        direction.dropped += sender.dropped
        if sender.last_packet_at is not None and (
            direction.last_packet_at is None or sender.last_packet_at > direction.last_packet_at
        ):
            direction.last_packet_at = sender.last_packet_at
        if receiver.report_jitter_ms is not None:
            direction.jitter_ms = max(direction.jitter_ms or 0.0, receiver.report_jitter_ms)
        if receiver.report_fraction_lost is not None:
            direction.fraction_lost = max(
                direction.fraction_lost or 0.0, receiver.report_fraction_lost
            )

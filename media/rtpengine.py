"""The rtpengine relay backend: drives an rtpengine daemon through its ng control protocol.

Protocol: each request is one UDP datagram ``<cookie> <bencoded dict>`` whose dict holds
``command`` and its parameters; the reply is ``<cookie> <bencoded dict>`` with ``result``
(``ok``, ``pong``, ``error`` with ``error-reason``, or ``load limit``) and, for offer and
answer, the rewritten ``sdp``. Replies are matched to requests by cookie. A request not
answered in time is sent again with the *same* cookie (rtpengine keeps recent replies by
cookie, so a retransmitted offer is not applied twice); after the last attempt the
request fails with ``MediaError(503, "rtpengine not answering")``.

Offer/answer flags: the B2BUA anchors media, so every offer and answer asks rtpengine to
rewrite the origin and the session connection (``replace``), to strip ICE, and leaves
everything else to rtpengine's defaults, which suit a single-interface relay: symmetric
latching on the first packets, RTCP ports or rtcp-mux, telephone-event, T.38 and SRTP
passed through. Extra ng parameters can be given per backend (``extra_params``).

Legs: the first ``offer`` of a call fixes leg A (its ``from_tag``); the ``to_tag`` of the
answer is leg B. A later offer from either leg (re-INVITE, UPDATE) is sent with the
other leg's tag as ``to-tag``, as rtpengine expects for in-dialog offers.

Statistics: ``query`` maps rtpengine's per-leg streams into :class:`MediaStats`: packets
and bytes rtpengine received on the RTP streams of leg A are ``a_to_b`` (and relayed to
B), those of leg B are ``b_to_a``; packets on RTCP streams are ``rtcp_packets``;
rtpengine's per-stream ``errors`` (packets it could not relay) are ``dropped``. Loss and
jitter are not mapped (left ``None``/0). ``delete`` returns the statistics read just
before the call is deleted (or those of the delete reply when rtpengine includes them).

Media timeout: rtpengine ends idle calls by itself after its own ``--timeout`` but cannot
tell the B2BUA. When this backend is built with ``media_timeout``, ``start()`` runs a
poller that ``query``\\s every answered call each ``poll_interval`` seconds and calls
``on_timeout(call_id)`` once when neither leg has sent RTP or RTCP for ``media_timeout``
seconds since the answer (or when rtpengine no longer knows the call: it timed it out
first). rtpengine reports packet times in whole seconds, so a packet is taken to have
arrived at the end of its second: the timeout can fire up to one second late, never early.
Times in :class:`MediaStats` are converted from rtpengine's Unix times to ``clock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from media.backend import (
    DirectionStats,
    MediaBackend,
    MediaError,
    MediaStats,
    PortsExhausted,
    SdpError,
    UnknownCall,
)
from media.bencode import BencodeError, BValue, decode, encode

logger = logging.getLogger(__name__)

NG_DEFAULT_TIMEOUT_S = 0.5
"""Wait for the first attempt; each retransmission waits twice as long, up to 2 s."""
NG_MAX_ATTEMPT_WAIT_S = 2.0
NG_DEFAULT_RETRIES = 3
OFFER_ANSWER_PARAMS: Mapping[str, BValue] = {
    "replace": [b"origin", b"session-connection"],
    "ICE": b"remove",
}


class RtpengineError(MediaError):
    """rtpengine refused a command (``result: error``); ``detail`` is its error-reason."""

    status = 500
    reason = "Media relay error"


class RtpengineUnavailable(MediaError):
    """rtpengine did not answer, or answered that it is overloaded."""

    status = 503
    reason = "rtpengine not answering"


def error_from_reply(command: str, reply: Mapping[str, BValue]) -> MediaError:
    """The :class:`MediaError` that a non-ok reply to ``command`` stands for."""
    result = _text(reply.get("result"))
    why = _text(reply.get("error-reason")) or result or "no result in reply"
    detail = f"rtpengine {command}: {why}"
    if result == "load limit":
        return RtpengineUnavailable(detail, reason="rtpengine overloaded")
    lowered = why.lower()
    if "ran out of ports" in lowered:
        return PortsExhausted(detail)
    if "unknown call-id" in lowered or "unknown from-tag" in lowered or "unknown to-tag" in lowered:
        return UnknownCall(detail)
    if "sdp" in lowered:
        return SdpError(detail)
    return RtpengineError(detail)


class _NgDatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, client: NgClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client._reply_received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the retransmission timer decides.
        logger.debug("rtpengine ng socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._transport_lost()


class NgClient:
    """An rtpengine ng protocol client over one connected UDP socket.

    ``request`` returns the reply dict when ``result`` is ``ok`` or ``pong`` and raises
    :class:`MediaError` otherwise (see :func:`error_from_reply`). Bad datagrams (not
    ``cookie dict``, unknown cookie, undecodable) are counted in ``bad_replies`` and
    dropped.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        timeout: float = NG_DEFAULT_TIMEOUT_S,
        retries: int = NG_DEFAULT_RETRIES,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.bad_replies = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._opening: asyncio.Lock | None = None
        self._pending: dict[bytes, asyncio.Future[dict[str, BValue]]] = {}
        self._cookie_prefix = secrets.token_hex(4).encode()
        self._counter = itertools.count(1)

    async def open(self) -> None:
        """Create the UDP socket (idempotent; ``request`` opens it when needed)."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _NgDatagramProtocol(self), remote_addr=self.address
            )
            self._transport = transport

    def close(self) -> None:
        """Close the socket; pending requests fail with :class:`RtpengineUnavailable`."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail_pending("ng client closed")

    async def request(
        self, command: str, params: Mapping[str, BValue] | None = None
    ) -> dict[str, BValue]:
        """Send ``command`` with ``params``; the ok reply, or raise :class:`MediaError`."""
        message: dict[str, BValue] = dict(params or {})
        message["command"] = command.encode()
        try:
            body = encode(message)
        except BencodeError as exc:
            raise RtpengineError(f"cannot encode {command} request: {exc}") from exc
        await self.open()
        cookie = b"%s_%d" % (self._cookie_prefix, next(self._counter))
        datagram = cookie + b" " + body
        future: asyncio.Future[dict[str, BValue]] = asyncio.get_running_loop().create_future()
        self._pending[cookie] = future
        try:
            wait = self.timeout
            for _attempt in range(self.retries + 1):
                if self._transport is None:
                    raise RtpengineUnavailable(f"{command}: ng client closed")
                self._transport.sendto(datagram)
                done, _ = await asyncio.wait({future}, timeout=wait)
                if done:
                    break
                wait = min(wait * 2, max(NG_MAX_ATTEMPT_WAIT_S, self.timeout))
            else:
                raise RtpengineUnavailable(
                    f"{command}: no reply from {self.address[0]}:{self.address[1]} "
                    f"after {self.retries + 1} attempts"
                )
            reply = future.result()
        finally:
            self._pending.pop(cookie, None)
            if not future.done():
                future.cancel()
        if _text(reply.get("result")) not in ("ok", "pong"):
            raise error_from_reply(command, reply)
        warning = reply.get("warning")
        if warning:
            logger.warning("rtpengine %s warning: %s", command, _text(warning))
        return reply

    async def ping(self) -> None:
        """Raise :class:`MediaError` unless rtpengine answers ``pong``."""
        reply = await self.request("ping")
        if _text(reply.get("result")) != "pong":
            raise RtpengineError(f"ping answered {_text(reply.get('result'))!r}")

    def _reply_received(self, data: bytes) -> None:
        cookie, space, body = data.partition(b" ")
        future = self._pending.get(cookie)
        if not space or future is None:
            self.bad_replies += 1
            return
        try:
            reply = decode(body)
        except BencodeError as exc:
            self.bad_replies += 1
            logger.warning("undecodable rtpengine reply: %s", exc)
            return
        if not isinstance(reply, dict):
            self.bad_replies += 1
            return
        if not future.done():
            future.set_result(reply)

    def _transport_lost(self) -> None:
        self._transport = None
        self._fail_pending("ng socket lost")

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RtpengineUnavailable(why))
        self._pending.clear()


@dataclass(slots=True)
class _CallLegs:
    a_tag: str
    b_tag: str | None = None
    answered_at: float | None = None
    timeout_reported: bool = False


class RtpengineBackend(MediaBackend):
    """:class:`MediaBackend` on an rtpengine daemon (``ng_address`` is its ``--listen-ng``).

    See the module docstring for flags, statistics and the media timeout.
    """

    def __init__(
        self,
        ng_address: tuple[str, int],
        *,
        request_timeout: float = NG_DEFAULT_TIMEOUT_S,
        retries: int = NG_DEFAULT_RETRIES,
        media_timeout: float | None = None,
        poll_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        extra_params: Mapping[str, BValue] | None = None,
    ) -> None:
        self.ng = NgClient(ng_address, timeout=request_timeout, retries=retries)
        self.media_timeout = media_timeout
        self.poll_interval = poll_interval
        self.clock = clock
        self.extra_params: dict[str, BValue] = dict(extra_params or {})
        self._calls: dict[str, _CallLegs] = {}
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.ng.open()
        if self.media_timeout is not None and self._poller is None:
            self._poller = asyncio.create_task(self._poll_media_timeouts())

    async def close(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        for call_id in list(self._calls):
            try:
                await self.ng.request("delete", {"call-id": call_id.encode()})
            except RtpengineUnavailable:
                break  # rtpengine is gone: its own --timeout will free the rest
            except MediaError:
                continue
        self._calls.clear()
        self.ng.close()

    async def ping(self) -> None:
        """Raise :class:`MediaError` unless rtpengine answers."""
        await self.ng.ping()

    # ------------------------------------------------------------------ offer/answer
    async def offer(self, call_id: str, from_tag: str, sdp: bytes) -> bytes:
        legs = self._calls.get(call_id)
        params = self._sdp_params(call_id, from_tag, sdp)
        if legs is not None:
            other = legs.b_tag if from_tag == legs.a_tag else legs.a_tag
            if other is not None and other != from_tag:
                params["to-tag"] = other.encode()
        reply = await self.ng.request("offer", params)
        if legs is None:
            self._calls[call_id] = _CallLegs(a_tag=from_tag)
        return _sdp_of(reply, "offer")

    async def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: bytes) -> bytes:
        params = self._sdp_params(call_id, from_tag, sdp)
        params["to-tag"] = to_tag.encode()
        reply = await self.ng.request("answer", params)
        legs = self._calls.get(call_id)
        if legs is None:  # offer made by another process (restart): adopt the call
            legs = self._calls[call_id] = _CallLegs(a_tag=from_tag)
        if to_tag != legs.a_tag:
            legs.b_tag = to_tag
        elif from_tag != legs.a_tag:
            legs.b_tag = from_tag
        if legs.answered_at is None:
            legs.answered_at = self.clock()
        return _sdp_of(reply, "answer")

    def _sdp_params(self, call_id: str, from_tag: str, sdp: bytes) -> dict[str, BValue]:
        if not sdp:
            raise SdpError("empty SDP")
        params: dict[str, BValue] = dict(OFFER_ANSWER_PARAMS)
        params.update(self.extra_params)
        params["call-id"] = call_id.encode()
        params["from-tag"] = from_tag.encode()
        params["sdp"] = bytes(sdp)
        return params

    # ------------------------------------------------------------------ stats
    async def query(self, call_id: str) -> MediaStats | None:
        try:
            reply = await self.ng.request("query", {"call-id": call_id.encode()})
        except UnknownCall:
            return None
        return self._stats_from(call_id, reply)

    async def delete(self, call_id: str) -> MediaStats | None:
        stats = await self.query(call_id)
        try:
            reply = await self.ng.request("delete", {"call-id": call_id.encode()})
        except UnknownCall:
            self._calls.pop(call_id, None)
            return None
        if isinstance(reply.get("tags"), dict) and reply.get("tags"):
            stats = self._stats_from(call_id, reply, legs_hint=stats)
        self._calls.pop(call_id, None)
        return stats

    def _stats_from(
        self,
        call_id: str,
        reply: Mapping[str, BValue],
        legs_hint: MediaStats | None = None,
    ) -> MediaStats:
        wall_offset = self.clock() - time.time()  # rtpengine Unix time -> our clock
        tags = reply.get("tags")
        tag_infos: dict[str, Mapping[str, BValue]] = {}
        if isinstance(tags, dict):
            tag_infos = {k: v for k, v in tags.items() if isinstance(v, dict)}
        legs = self._calls.get(call_id)
        a_tag = legs.a_tag if legs is not None else _earliest_tag(tag_infos)
        b_tag = legs.b_tag if legs is not None else None
        created = _number(reply.get("created"))
        created_us = _number(reply.get("created_us"))
        if created is not None:
            started_at = created + (created_us or 0) / 1e6 + wall_offset
        elif legs_hint is not None:
            started_at = legs_hint.started_at
        else:
            started_at = self.clock()
        stats = MediaStats(started_at=started_at)
        for tag, info in tag_infos.items():
            if tag == a_tag:
                _add_leg_streams(stats.a_to_b, info, wall_offset)
            elif b_tag is None or tag == b_tag:
                _add_leg_streams(stats.b_to_a, info, wall_offset)
        return stats

    # ------------------------------------------------------------------ media timeout
    async def _poll_media_timeouts(self) -> None:
        assert self.media_timeout is not None
        while True:
            await asyncio.sleep(self.poll_interval)
            for call_id, legs in list(self._calls.items()):
                if legs.answered_at is None or legs.timeout_reported:
                    continue
                try:
                    stats = await self.query(call_id)
                except MediaError as exc:
                    logger.warning("media timeout poll of %s failed: %s", call_id, exc)
                    continue
                if self._calls.get(call_id) is not legs:
                    continue  # deleted or replaced while we waited
                last_activity = legs.answered_at
                if stats is not None and stats.last_packet_at is not None:
                    last_activity = max(last_activity, stats.last_packet_at)
                if stats is None or self.clock() - last_activity >= self.media_timeout:
                    legs.timeout_reported = True
                    logger.info("media timeout for call %s", call_id)
                    if self.on_timeout is not None:
                        try:
                            self.on_timeout(call_id)
                        except Exception:
                            logger.exception("on_timeout callback failed for %s", call_id)


def _add_leg_streams(
    direction: DirectionStats, tag_info: Mapping[str, BValue], wall_offset: float
) -> None:
    """Add the counters of one leg's streams (what rtpengine received from that leg)."""
    medias = tag_info.get("medias")
    if not isinstance(medias, list):
        return
    for media in medias:
        streams = media.get("streams") if isinstance(media, dict) else None
        if not isinstance(streams, list):
            continue
        for stream in streams:
            if not isinstance(stream, dict):
                continue
            counters = stream.get("stats")
            if not isinstance(counters, dict):
                continue
            packets = _number(counters.get("packets")) or 0
            flags = stream.get("flags")
            is_rtcp = isinstance(flags, list) and b"RTCP" in flags
            if is_rtcp:
                direction.rtcp_packets += packets
            else:
                direction.packets += packets
                direction.bytes += _number(counters.get("bytes")) or 0
            direction.dropped += _number(counters.get("errors")) or 0
            last = _number(stream.get("last packet"))
            if packets and last is not None:
                # whole seconds: take the end of that second, so timeouts are never early
                at = last + 1 + wall_offset
                if direction.last_packet_at is None or at > direction.last_packet_at:
                    direction.last_packet_at = at


def _earliest_tag(tag_infos: Mapping[str, Mapping[str, BValue]]) -> str | None:
    if not tag_infos:
        return None
    return min(tag_infos, key=lambda tag: _number(tag_infos[tag].get("created")) or 0)


def _sdp_of(reply: Mapping[str, BValue], command: str) -> bytes:
    sdp = reply.get("sdp")
    if not isinstance(sdp, bytes) or not sdp:
        raise RtpengineError(f"rtpengine {command} reply carries no SDP")
    return sdp


def _number(value: BValue | None) -> int | None:
    return value if isinstance(value, int) else None


def _text(value: BValue | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None:
        return ""
    return str(value)

"""Media anchoring for calls that mix browser softphones and plain-RTP phones (issue 8).

:class:`HybridMediaBackend` is the switch's :class:`~media.backend.MediaBackend` when the
built-in relay is selected and WebRTC bridging is on. Every call is relayed by the wrapped
:class:`~media.relay.RtpRelay` as before, except a call with a WebRTC leg (a browser on SIP
over WebSocket, RFC 7118, whose SDP uses ``UDP/TLS/RTP/SAVPF`` with ICE and a DTLS
fingerprint). Such a call gets a :class:`~media.webrtc.WebRtcBridge` that terminates ICE
and DTLS-SRTP towards the browser and speaks plain G.711 RTP towards the other leg:

* browser calls phone: the browser's offer is recognised by its SDP; the plain offer the
  bridge makes goes on to the callee, and the callee's plain answer is turned into the
  bridge's WebRTC answer for the browser;
* phone calls browser: the switch learns that the callee is a browser from where it is
  registered, and passes ``hint="webrtc"`` to :meth:`HybridMediaBackend.offer` (the
  callee's contacts are all on ``ws``/``wss`` flows); the bridge then makes a WebRTC offer
  for the browser from the phone's plain offer, and the browser's answer yields the plain
  answer for the phone;
* browser calls browser (WebRTC offer with the webrtc hint): the SDP passes through
  untouched and the browsers' media goes end to end.

ICE host candidates: when the relay binds a specific address (not a wildcard), aioice is
told to gather host candidates on that address only, from :meth:`start` to :meth:`close`,
so browser media uses the same interface as the relay. When the relay's advertise_host
(the public address, 1:1 NAT) differs from its bind address, the SDP for the browser
gives the advertise_host as the host candidates' address (ports unchanged).

Re-offers (re-INVITE or UPDATE with SDP, either leg) on a bridged call are forwarded as a
B2BUA does, so the other party sees the hold: a desk phone's plain re-offer becomes a
WebRTC re-offer that aiortc makes on the same peer connection (same ICE credentials and
DTLS fingerprint) and the browser's answer becomes the phone's plain answer (same bridge
port, direction per RFC 3264 §6.1); a browser's re-offer is answered by aiortc and goes
on to the phone as a plain re-offer on the same port. The bridge stops sending towards a
side that holds and resumes after. A browser's ICE restart is refused with 488 (aiortc
cannot restart ICE). A re-offer the other leg refuses is undone (:meth:`offer_rejected`).
A re-offer before the bridge is answered gets 491.

Media timeout: bridged calls are watched like relayed ones (:meth:`check_timeouts`): no
RTP from the phone for the relay's ``media_timeout`` outside hold, or the browser's
ICE/DTLS connection failed or closed, calls ``on_timeout(call_id)``.

DTMF: telephone-events go between the phone's RTP and the browser's SRTP both ways (see
:mod:`media.webrtc`); a browser that agreed no telephone-event gets the phone's digits
through ``on_dtmf_info`` as SIP INFO (application/dtmf-relay) from the switch. The
softphone page's own SIP INFO digits pass through the B2BUA to the phone unchanged.

Browser to browser calls pass every re-offer through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from media.backend import MediaBackend, MediaError, MediaStats, SdpError, UnknownCall
from media.ports import PortAllocator
from media.relay import RtpRelay
from media.sdp import parse_sdp
from media.webrtc import WebRtcBridge

log = logging.getLogger("media.hybrid")

#: The ``hint`` value of :meth:`HybridMediaBackend.offer` meaning "the answerer is a browser".
WEBRTC_HINT = "webrtc"
#: The Duration of a telephone-event digit sent to a browser as SIP INFO.
DTMF_INFO_DURATION_MS = 160
_WILDCARDS = ("", "0.0.0.0", "::")


def is_webrtc_sdp(sdp: bytes) -> bool:
    """True when an active audio stream uses a DTLS-SRTP profile with ICE and a fingerprint.

    SDP that does not parse is not WebRTC here: the relay reports the error (488).
    """
    try:
        parsed = parse_sdp(sdp)
    except (MediaError, ValueError):
        return False
    for description in parsed.media:
        if description.media != "audio" or description.is_disabled:
            continue
        proto = description.proto.upper()
        if "SAVPF" not in proto and not proto.startswith("UDP/TLS"):
            continue
        ice = description.has_attribute("ice-ufrag") or parsed.has_session_attribute("ice-ufrag")
        dtls = description.has_attribute("fingerprint") or parsed.has_session_attribute(
            "fingerprint"
        )
        if ice and dtls:
            return True
    return False


@dataclass(slots=True)
class _Reoffer:
    """A re-offer on a bridged call waiting for the other leg's answer."""

    from_tag: str
    from_browser: bool


@dataclass(slots=True)
class _BridgedCall:
    """One call whose media goes through a WebRTC bridge (or passes between browsers)."""

    offerer_tag: str
    browser_offered: bool  # True: the browser is the offerer (leg A)
    bridge: WebRtcBridge | None  # None: browser to browser, SDP passed through
    reply: bytes = b""  # SDP for the offerer once the answerer's SDP arrives
    answerer_tag: str | None = None
    pending: _Reoffer | None = None
    timed_out: bool = False
    lost_since: float | None = None  # when the browser's connection was first seen lost

    @property
    def browser_tag(self) -> str | None:
        return self.offerer_tag if self.browser_offered else self.answerer_tag

    @property
    def phone_tag(self) -> str | None:
        return self.answerer_tag if self.browser_offered else self.offerer_tag


class HybridMediaBackend(MediaBackend):
    """The relay for plain calls, a WebRTC bridge per call with a browser leg.

    ``relay`` is the wrapped :class:`RtpRelay`: its port range, bind and advertised
    addresses, media timeout and clock are used by the bridges too. ``limit_ice_hosts``:
    gather ICE host candidates on the relay's bind address only (ignored for a wildcard
    bind address). ``connection_grace``: seconds a browser's ICE/DTLS connection may stay
    failed or closed before the call is reported to ``on_timeout`` (its BYE usually comes
    first).
    """

    #: The switch passes ``hint`` to :meth:`offer` only to backends saying so.
    takes_offer_hints = True

    def __init__(
        self, relay: RtpRelay, *, limit_ice_hosts: bool = True, connection_grace: float = 1.0
    ) -> None:
        self.relay = relay
        self.limit_ice_hosts = limit_ice_hosts and relay.bind_host not in _WILDCARDS
        self.connection_grace = connection_grace
        self._calls: dict[str, _BridgedCall] = {}
        self._saved_host_addresses: Callable[[bool, bool], list[str]] | None = None
        self._checker: asyncio.Task[None] | None = None
        #: Called with (call-id, tag of the browser leg, digit, duration in ms) for each
        #: telephone-event digit of the phone that the browser did not agree to take as
        #: RTP: the switch sends it to the browser as SIP INFO (application/dtmf-relay).
        self.on_dtmf_info: Callable[[str, str, str, int], None] | None = None

    # -- what the switch reads from a relay --------------------------------------------------
    @property
    def on_timeout(self) -> Callable[[str], None] | None:  # type: ignore[override]
        return self.relay.on_timeout

    @on_timeout.setter
    def on_timeout(self, callback: Callable[[str], None] | None) -> None:
        self.relay.on_timeout = callback

    @property
    def ports(self) -> PortAllocator:
        return self.relay.ports

    @property
    def session_count(self) -> int:
        return self.relay.session_count + len(self._calls)

    @property
    def bridged_calls(self) -> dict[str, WebRtcBridge | None]:
        """Call-ids with a WebRTC leg and their bridge (None: passed between browsers)."""
        return {call_id: call.bridge for call_id, call in self._calls.items()}

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.limit_ice_hosts and self._saved_host_addresses is None:
            import aioice.ice

            host = self.relay.bind_host
            v6 = ":" in host
            self._saved_host_addresses = aioice.ice.get_host_addresses

            def bind_host_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
                return [host] if (use_ipv6 if v6 else use_ipv4) else []

            aioice.ice.get_host_addresses = bind_host_only
        await self.relay.start()
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(
                self._check_loop(), name="webrtc-bridge-timeout-checker"
            )

    async def close(self) -> None:
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
        for call_id in list(self._calls):
            await self.delete(call_id)
        await self.relay.close()
        if self._saved_host_addresses is not None:
            import aioice.ice

            aioice.ice.get_host_addresses = self._saved_host_addresses
            self._saved_host_addresses = None

    # -- media timeout of bridged calls -------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.relay.check_interval)
            self.check_timeouts(self.relay.clock())

    def check_timeouts(self, now: float) -> list[str]:
        """Report bridged calls to ``on_timeout``: the phone sent no RTP for the relay's
        ``media_timeout`` on an answered call that is not on hold (as
        :meth:`RtpRelay.check_timeouts`), or the browser's ICE/DTLS connection has been
        failed or closed for ``connection_grace`` seconds (also on hold: aiortc cannot
        restart ICE, so that leg's media cannot come back). Each call is reported once."""
        timeout = self.relay.media_timeout
        expired: list[str] = []
        for call_id, bridged in self._calls.items():
            bridge = bridged.bridge
            if bridge is None or bridged.timed_out or bridge.closed:
                continue
            if bridge.browser_lost:
                if bridged.lost_since is None:
                    bridged.lost_since = now
                if now - bridged.lost_since >= self.connection_grace:
                    expired.append(call_id)
                continue
            bridged.lost_since = None
            if not timeout or bridge.negotiated_at is None or bridge.on_hold:
                continue
            last = bridge.from_phone.last_packet_at
            since = bridge.negotiated_at if last is None else max(last, bridge.negotiated_at)
            if now - since >= timeout:
                expired.append(call_id)
        for call_id in expired:
            self._calls[call_id].timed_out = True
            log.info("media timeout of WebRTC-bridged call_id=%s", call_id)
            callback = self.relay.on_timeout
            if callback is not None:
                try:
                    callback(call_id)
                except Exception:  # the checker must survive a faulty callback
                    log.exception("on_timeout callback failed call_id=%s", call_id)
        return expired

    # -- offer / answer ----------------------------------------------------------------------
    async def offer(
        self, call_id: str, from_tag: str, sdp: bytes, hint: str | None = None
    ) -> bytes:
        """As :meth:`MediaBackend.offer`; ``hint="webrtc"``: the answering leg is a browser.

        A later offer on a bridged call (re-INVITE/UPDATE from either leg) is a re-offer:
        see the module docstring."""
        if hint not in (None, WEBRTC_HINT):
            raise ValueError(f"unknown media offer hint {hint!r}")
        bridged = self._calls.get(call_id)
        if bridged is not None:
            return await self._reoffer(bridged, from_tag, sdp)
        to_browser = hint == WEBRTC_HINT
        from_browser = is_webrtc_sdp(sdp)
        if not from_browser and not to_browser:
            return await self.relay.offer(call_id, from_tag, sdp)
        if await self.relay.query(call_id) is not None:
            raise SdpError("the call's media is relayed already: no WebRTC bridge now")
        if from_browser and to_browser:
            self._calls[call_id] = _BridgedCall(from_tag, True, None)
            return sdp
        bridge = WebRtcBridge(
            call_id,
            host=self.relay.bind_host,
            advertise_host=self.relay.advertise_host,
            ports=self.relay.ports,
            clock=self.relay.clock,
        )
        bridge.on_dtmf = lambda digit: self._phone_digit(call_id, digit)
        try:
            if from_browser:
                reply, onward = await bridge.offer_from_browser(
                    sdp.decode("utf-8", "surrogateescape")
                )
                outgoing, reply_bytes = onward, reply.encode()
            else:
                webrtc_offer, plain_answer = await bridge.offer_to_browser(sdp)
                outgoing, reply_bytes = webrtc_offer.encode(), plain_answer
        except BaseException:
            await bridge.close()
            raise
        self._calls[call_id] = _BridgedCall(from_tag, from_browser, bridge, reply_bytes)
        return outgoing

    async def _reoffer(self, bridged: _BridgedCall, from_tag: str, sdp: bytes) -> bytes:
        bridge = bridged.bridge
        if bridge is None:  # browser to browser: end to end
            bridged.pending = _Reoffer(from_tag, True)
            return sdp
        if bridged.pending is not None:  # the last re-offer was refused or never answered
            bridge.abandon_reoffer()
            bridged.pending = None
        if bridge.state != "active" or bridged.answerer_tag is None:
            raise MediaError(
                "the WebRTC bridge is still being negotiated", status=491, reason="Request Pending"
            )
        if from_tag == bridged.browser_tag:
            _, onward = await bridge.reoffer_from_browser(sdp.decode("utf-8", "surrogateescape"))
            bridged.pending = _Reoffer(from_tag, True)
            return onward
        if from_tag == bridged.phone_tag:
            webrtc_offer = await bridge.reoffer_from_phone(sdp)
            bridged.pending = _Reoffer(from_tag, False)
            return webrtc_offer.encode()
        raise UnknownCall(f"tag {from_tag!r} is not a leg of the bridged call {bridge.call_id!r}")

    async def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: bytes) -> bytes:
        bridged = self._calls.get(call_id)
        if bridged is None:
            return await self.relay.answer(call_id, from_tag, to_tag, sdp)
        bridge = bridged.bridge
        pending = bridged.pending
        if pending is not None and from_tag == pending.from_tag:
            bridged.pending = None
            if bridge is None:
                return sdp
            bridged.timed_out = False
            try:
                if pending.from_browser:
                    await bridge.answer_reoffer_from_phone(sdp)
                    return bridge.browser_reply.encode()
                text = sdp.decode("utf-8", "surrogateescape")
                return await bridge.answer_reoffer_from_browser(text)
            except MediaError:
                bridge.abandon_reoffer()
                raise
        if from_tag != bridged.offerer_tag:
            raise UnknownCall(f"no offer from tag {from_tag!r} in call {call_id!r}")
        if bridge is None:  # browser to browser: end to end
            return sdp
        if bridge.state not in ("idle", "browser-offered", "phone-offered"):
            # the same answer again (a 183 then the 200): the offerer's SDP is unchanged
            if to_tag != bridged.answerer_tag:
                raise SdpError("the WebRTC bridge is answered already by another leg")
            return bridged.reply
        if bridged.browser_offered:
            await bridge.answer_from_phone(sdp)
        else:
            await bridge.answer_from_browser(sdp.decode("utf-8", "surrogateescape"))
        bridged.answerer_tag = to_tag
        return bridged.reply

    async def offer_rejected(self, call_id: str, from_tag: str) -> None:
        """The other leg refused the re-offer from ``from_tag`` (or did not answer it): the
        bridge goes back to the media as negotiated before. Unknown calls are ignored."""
        bridged = self._calls.get(call_id)
        if bridged is None or bridged.pending is None or bridged.pending.from_tag != from_tag:
            return
        bridged.pending = None
        if bridged.bridge is not None:
            bridged.bridge.abandon_reoffer()

    def _phone_digit(self, call_id: str, digit: str) -> None:
        """A phone's telephone-event digit the browser cannot take as RTP: SIP INFO."""
        bridged = self._calls.get(call_id)
        tag = bridged.browser_tag if bridged is not None else None
        if tag is not None and self.on_dtmf_info is not None:
            self.on_dtmf_info(call_id, tag, digit, DTMF_INFO_DURATION_MS)

    async def delete(self, call_id: str) -> MediaStats | None:
        bridged = self._calls.pop(call_id, None)
        if bridged is None:
            return await self.relay.delete(call_id)
        if bridged.bridge is None:
            return None
        await bridged.bridge.close()
        return self._stats(bridged)

    async def query(self, call_id: str) -> MediaStats | None:
        bridged = self._calls.get(call_id)
        if bridged is None:
            return await self.relay.query(call_id)
        return None if bridged.bridge is None else self._stats(bridged)

    @staticmethod
    def _stats(bridged: _BridgedCall) -> MediaStats:
        """Leg A is the offerer; the bridge counts browser → phone as ``a_to_b``."""
        assert bridged.bridge is not None
        stats = bridged.bridge.stats()
        if not bridged.browser_offered:
            stats.a_to_b, stats.b_to_a = stats.b_to_a, stats.a_to_b
        return stats

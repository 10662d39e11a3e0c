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
so browser media uses the same interface as the relay.

Not handled yet: re-offers (re-INVITE / UPDATE with SDP) on a bridged call are refused with
488, the media timeout does not watch bridged calls, and DTMF between the bridge and SIP
INFO is not forwarded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from media.backend import MediaBackend, MediaError, MediaStats, SdpError, UnknownCall
from media.ports import PortAllocator
from media.relay import RtpRelay
from media.sdp import parse_sdp
from media.webrtc import WebRtcBridge

#: The ``hint`` value of :meth:`HybridMediaBackend.offer` meaning "the answerer is a browser".
WEBRTC_HINT = "webrtc"
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
class _BridgedCall:
    """One call whose media goes through a WebRTC bridge (or passes between browsers)."""

    offerer_tag: str
    browser_offered: bool  # True: the browser is the offerer (leg A)
    bridge: WebRtcBridge | None  # None: browser to browser, SDP passed through
    reply: bytes = b""  # SDP for the offerer once the answerer's SDP arrives
    answerer_tag: str | None = None


class HybridMediaBackend(MediaBackend):
    """The relay for plain calls, a WebRTC bridge per call with a browser leg.

    ``relay`` is the wrapped :class:`RtpRelay`: its port range, bind and advertised
    addresses are used by the bridges too. ``limit_ice_hosts``: gather ICE host candidates
    on the relay's bind address only (ignored for a wildcard bind address).
    """

    #: The switch passes ``hint`` to :meth:`offer` only to backends saying so.
    takes_offer_hints = True

    def __init__(self, relay: RtpRelay, *, limit_ice_hosts: bool = True) -> None:
        self.relay = relay
        self.limit_ice_hosts = limit_ice_hosts and relay.bind_host not in _WILDCARDS
        self._calls: dict[str, _BridgedCall] = {}
        self._saved_host_addresses: Callable[[bool, bool], list[str]] | None = None

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

    async def close(self) -> None:
        for call_id in list(self._calls):
            await self.delete(call_id)
        await self.relay.close()
        if self._saved_host_addresses is not None:
            import aioice.ice

            aioice.ice.get_host_addresses = self._saved_host_addresses
            self._saved_host_addresses = None

    # -- offer / answer ----------------------------------------------------------------------
    async def offer(
        self, call_id: str, from_tag: str, sdp: bytes, hint: str | None = None
    ) -> bytes:
        """As :meth:`MediaBackend.offer`; ``hint="webrtc"``: the answering leg is a browser."""
        if hint not in (None, WEBRTC_HINT):
            raise ValueError(f"unknown media offer hint {hint!r}")
        bridged = self._calls.get(call_id)
        if bridged is not None:
            raise SdpError("changing the media of a call bridged to WebRTC is not supported")
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
        )
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

    async def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: bytes) -> bytes:
        bridged = self._calls.get(call_id)
        if bridged is None:
            return await self.relay.answer(call_id, from_tag, to_tag, sdp)
        if from_tag != bridged.offerer_tag:
            raise UnknownCall(f"no offer from tag {from_tag!r} in call {call_id!r}")
        bridge = bridged.bridge
        if bridge is None:  # browser to browser: end to end
            return sdp
        if bridge.state == "active":
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

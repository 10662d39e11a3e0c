"""A scriptable SIP device user agent over UDP on loopback, for the integration tests.

`SipUA` plays a registered phone (DEV-x of EMERGENCY.md §3.1) against the real switch
process: it REGISTERs with digest (401 round), places calls (INVITE with the 407 digest
round, provisional responses, ACK of 2xx and non-2xx, CANCEL) and drives the dialog
afterwards (BYE, re-INVITE, REFER, any other in-dialog request). Requests the switch
sends to the device (an INVITE for a PSAP callback, MESSAGE, OPTIONS, BYE, re-INVITE)
are recorded in ``ua.received`` and answered automatically; an incoming INVITE is
answered as ``ua.incoming_invite`` says ("answer", "busy" or "ring").

`SipEndpoint` is the UDP machinery the device UA and the fake emergency trunk
(tests/peers/etrunk.py) share: a minimal UAC/UAS transaction layer (requests
retransmitted every T1 doubling, bounded; responses matched by Via branch and CSeq
method; retransmitted requests answered again from the last response, never recorded
twice; INVITE final responses retransmitted until their ACK) and `Call`, one dialog.

Every SIP message is parsed with the project's ``sip.parser`` and built as
``sip.message`` objects; digest credentials come from ``sip.digest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from media.sdp import SdpError, parse_sdp
from sip.dialog import Dialog, new_call_id, new_tag
from sip.digest import build_authorization, choose_challenge, parse_challenge
from sip.grammar import GrammarError
from sip.headers import parse_name_address
from sip.message import SipRequest, SipResponse, make_response
from sip.parser import SipParseError, parse_message
from sip.transaction import build_ack_for_non_2xx, new_branch
from sip.uri import SipUri, parse_uri

__all__ = [
    "DEFAULT_SDP",
    "LOOPBACK",
    "Call",
    "ClientTransaction",
    "IncomingInvite",
    "RequestRecord",
    "SipEndpoint",
    "SipUA",
    "answer_sdp",
    "host_port",
    "offer_sdp",
    "uri_address",
]

LOOPBACK = "127.0.0.1"
T1 = 0.5  # RFC 3261 round-trip estimate: first retransmission interval
T2 = 4.0  # cap of the non-INVITE retransmission interval
TIMER_B = 64 * T1  # give up on a request that got no response at all
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, INFO, UPDATE, REFER, NOTIFY"
USER_AGENT = "softswitch-test-peer/1"

Address = tuple[str, int]
InviteWait = Literal["final", "provisional", "sent"]


class _DefaultSdp:
    """Marker: "offer the peer's default PCMU/PCMA/telephone-event SDP"."""

    def __repr__(self) -> str:
        return "DEFAULT_SDP"


DEFAULT_SDP: Any = _DefaultSdp()


class RequestRecord(NamedTuple):
    """One request as received: when (time.monotonic()), the datagram, the parsed request."""

    at: float
    raw: bytes
    request: SipRequest


# --------------------------------------------------------------------------------------
# SDP
# --------------------------------------------------------------------------------------


def _ip_version(host: str) -> str:
    return "IP6" if ":" in host else "IP4"


def offer_sdp(
    host: str, rtp_port: int, *, session_id: int = 1, version: int = 1,
    direction: str = "sendrecv",
) -> bytes:  # fmt: skip
    """An audio offer: PCMU, PCMA and telephone-event (RFC 4733) at ``host:rtp_port``."""
    family = _ip_version(host)
    lines = [
        "v=0",
        f"o=- {session_id} {version} IN {family} {host}",
        "s=-",
        f"c=IN {family} {host}",
        "t=0 0",
        f"m=audio {rtp_port} RTP/AVP 0 8 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        f"a={direction}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


_ANSWER_DIRECTION = {
    "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive",
    "sendrecv": "sendrecv",
}  # fmt: skip
_STATIC_CODECS = {"0": "PCMU/8000", "8": "PCMA/8000"}


def answer_sdp(offer: bytes, host: str, rtp_port: int, *, session_id: int = 2) -> bytes:
    """The answer (RFC 3264) to ``offer``: the first audio stream accepted with the
    offered PCMU/PCMA (and telephone-event) at ``host:rtp_port``, direction mirrored;
    every other stream refused (port 0). ValueError for an unparseable offer."""
    try:
        parsed = parse_sdp(offer)
    except SdpError as exc:
        raise ValueError(f"cannot answer an unparseable SDP offer: {exc}") from None
    family = _ip_version(host)
    lines = [
        "v=0", f"o=- {session_id} 1 IN {family} {host}", "s=-", f"c=IN {family} {host}",
        "t=0 0",
    ]  # fmt: skip
    audio_done = False
    for index, media in enumerate(parsed.media):
        rtpmaps: dict[str, str] = {}
        for value in media.attributes("rtpmap"):
            payload, _, encoding = value.partition(" ")
            rtpmaps[payload] = encoding.strip()
        codecs = [
            pt for pt in media.formats
            if rtpmaps.get(pt, _STATIC_CODECS.get(pt, "")).upper().startswith(("PCMU/", "PCMA/"))
        ]  # fmt: skip
        events = [
            pt for pt in media.formats if rtpmaps.get(pt, "").lower().startswith("telephone-event/")
        ]
        usable = (
            media.media == "audio"
            and media.is_rtp
            and not media.is_disabled
            and not audio_done
            and codecs
        )
        if not usable:
            lines.append(f"m={media.media} 0 {media.proto} {' '.join(media.formats)}")
            continue
        audio_done = True
        chosen = codecs + events
        lines.append(f"m=audio {rtp_port} {media.proto} {' '.join(chosen)}")
        for pt in chosen:
            lines.append(f"a=rtpmap:{pt} {rtpmaps.get(pt, _STATIC_CODECS.get(pt, ''))}")
        lines += [f"a=fmtp:{v}" for v in media.attributes("fmtp") if v.partition(" ")[0] in events]
        lines.append(f"a={_ANSWER_DIRECTION.get(parsed.stream_direction(index), 'sendrecv')}")
    return ("\r\n".join(lines) + "\r\n").encode()


# --------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------


def host_port(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def uri_address(uri_text: str, default: Address | None = None) -> Address:
    """Where a request for ``uri_text`` (a sip: URI, or a name-addr) is sent over UDP:
    its host and port (5060 when absent); ``default`` for other URIs."""
    text = uri_text.strip()
    if text.startswith("<") or '"' in text:
        try:
            text = str(parse_name_address(text).uri)
        except GrammarError:
            pass
    try:
        uri = parse_uri(text)
    except GrammarError as exc:
        if default is not None:
            return default
        raise ValueError(f"not a URI to send to: {uri_text!r} ({exc})") from None
    if isinstance(uri, SipUri):
        return (uri.host.strip("[]"), uri.port or 5060)
    if default is not None:
        return default
    raise ValueError(f"not a sip: URI to send to: {uri_text!r}")


# --------------------------------------------------------------------------------------
# Transactions
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class ClientTransaction:
    """One request we sent: its responses, in order, and the final one."""

    request: SipRequest
    destination: Address
    responses: list[SipResponse] = field(default_factory=list)
    final: SipResponse | None = None
    queue: asyncio.Queue[SipResponse] = field(default_factory=asyncio.Queue)
    ack: tuple[bytes, Address] | None = None  # re-sent when the final is retransmitted
    retransmitter: asyncio.Task | None = None

    async def next_response(self, timeout: float | None) -> SipResponse | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def final_response(self, timeout: float) -> SipResponse | None:
        """The final response (provisional ones are skipped), or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            response = await self.next_response(max(0.0, deadline - time.monotonic()))
            if response is None or response.status >= 200:
                return response


@dataclass(eq=False)
class IncomingInvite:
    """An INVITE we received (server side): our To tag, and what we answered."""

    request: SipRequest
    source: Address
    tag: str
    final: SipResponse | None = None
    task: asyncio.Task | None = None
    silent: bool = False


def _auth_header_names(status: int) -> tuple[str, str]:
    return (
        ("WWW-Authenticate", "Authorization")
        if status == 401
        else ("Proxy-Authenticate", "Proxy-Authorization")
    )


# --------------------------------------------------------------------------------------
# Dialogs
# --------------------------------------------------------------------------------------


class Call:
    """One call, seen from this endpoint: the INVITE transaction and then the dialog.

    For a call we placed (``role == "uac"``): ``final``, ``provisionals``, ``challenges``
    (the 401/407 answered), ``sent_at`` (time.monotonic() when the INVITE carrying the
    credentials, or the only INVITE, was sent). For a call we answered (``role ==
    "uas"``): ``invite`` is the INVITE received and ``final`` our final response.
    ``received`` lists the in-dialog requests the other side sent us.
    """

    def __init__(
        self, endpoint: SipEndpoint, role: Literal["uac", "uas"], destination: Address
    ) -> None:
        self.endpoint = endpoint
        self.role = role
        self.destination = destination  # where requests go when the dialog has no target
        self.invite: SipRequest | None = None
        self.final: SipResponse | None = None
        self.provisionals: list[SipResponse] = []
        self.challenges: list[SipResponse] = []
        self.sent_at: float | None = None
        self.dialog: Dialog | None = None
        self.local_sdp: bytes = b""
        self.remote_sdp: bytes = b""
        self.received: list[SipRequest] = []
        self.cancel_response: SipResponse | None = None
        self.bye_received: SipRequest | None = None
        self.ended = asyncio.Event()
        self._done = asyncio.Event()
        self._progress = asyncio.Event()
        self._arrival = asyncio.Event()
        self._consumed: set[int] = set()
        self._sdp_version = 1
        self._task: asyncio.Task | None = None

    # -- views ----------------------------------------------------------------------------
    @property
    def status(self) -> int | None:
        return self.final.status if self.final is not None else None

    @property
    def answered(self) -> bool:
        return self.final is not None and 200 <= self.final.status < 300

    @property
    def call_id(self) -> str:
        assert self.invite is not None
        return self.invite.call_id

    @property
    def local_tag(self) -> str | None:
        return self.dialog.local_tag if self.dialog is not None else None

    @property
    def remote_tag(self) -> str | None:
        return self.dialog.remote_tag if self.dialog is not None else None

    def __repr__(self) -> str:
        call_id = self.invite.call_id if self.invite is not None else "?"
        return f"<Call {self.role} {call_id} status={self.status}>"

    # -- waiting ----------------------------------------------------------------------------
    async def wait_final(self, timeout: float = 10.0) -> SipResponse | None:
        """The INVITE's final response (None if none within ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), timeout)
        return self.final

    async def wait_provisional(self, timeout: float = 10.0) -> SipResponse | None:
        """The first provisional response beyond 100 Trying (None if none yet)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), timeout)
        return next((r for r in self.provisionals if r.status > 100), None)

    async def wait_request(self, method: str, timeout: float = 5.0) -> SipRequest | None:
        """The next in-dialog request of ``method`` the other side sent (None on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, request in enumerate(self.received):
                if index not in self._consumed and request.method == method.upper():
                    self._consumed.add(index)
                    return request
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self._arrival
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def _received(self, request: SipRequest) -> None:
        self.received.append(request)
        self._arrival.set()
        self._arrival = asyncio.Event()

    # -- in-dialog requests -----------------------------------------------------------------
    def _require_dialog(self) -> Dialog:
        if self.dialog is None or self.dialog.early:
            raise RuntimeError(f"{self!r} has no confirmed dialog (it was not answered)")
        return self.dialog

    async def request(
        self, method: str, *, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
        content_type: str | None = None, timeout: float = 5.0,
    ) -> SipResponse | None:  # fmt: skip
        """Send an in-dialog request (INFO, UPDATE, MESSAGE, NOTIFY, ...); its final
        response (one 401/407 answered when the endpoint has credentials)."""
        if method.upper() in ("INVITE", "ACK", "CANCEL"):
            raise ValueError(f"use reinvite()/cancel() for {method}; ACKs are automatic")
        dialog = self._require_dialog()
        extra = list(headers)
        if content_type is not None:
            extra.append(("Content-Type", content_type))
        elif body:
            raise ValueError("a body needs a content_type")

        def build(auth: list[tuple[str, str]]) -> SipRequest:
            return dialog.create_request(
                method.upper(),
                self.endpoint.via_sent_by,
                extra_headers=[*extra, *auth],
                body=body,
            )

        return await self.endpoint.request_with_auth(build, self._target(), timeout)

    async def bye(
        self, *, headers: Iterable[tuple[str, str]] = (), timeout: float = 5.0
    ) -> SipResponse | None:
        """Hang up: BYE in the dialog; its final response."""
        response = await self.request("BYE", headers=headers, timeout=timeout)
        self.ended.set()
        return response

    async def refer(
        self, refer_to: str, *, headers: Iterable[tuple[str, str]] = (), timeout: float = 5.0
    ) -> SipResponse | None:
        """Transfer: REFER with ``Refer-To: refer_to`` (a URI or name-addr)."""
        target = refer_to if refer_to.strip().startswith("<") else f"<{refer_to}>"
        return await self.request(
            "REFER", headers=[("Refer-To", target), *headers], timeout=timeout
        )

    async def reinvite(
        self, sdp: bytes | None = DEFAULT_SDP, *, headers: Iterable[tuple[str, str]] = (),
        timeout: float = 5.0, content_type: str | None = None,
    ) -> SipResponse | None:  # fmt: skip
        """A re-INVITE (hold: pass an ``a=sendonly`` offer, e.g. ``offer_sdp(...,
        direction="sendonly")``); the final response, ACKed (2xx and non-2xx)."""
        dialog = self._require_dialog()
        if sdp is DEFAULT_SDP:
            self._sdp_version += 1
            sdp = self.endpoint.default_offer(version=self._sdp_version)
        body = sdp or b""
        extra = [("Contact", self.endpoint.contact), ("Allow", ALLOW), *headers]
        if body:  # ``content_type``: another body than SDP (multipart with a PIDF-LO)
            extra.append(("Content-Type", content_type or "application/sdp"))
        request = dialog.create_request(
            "INVITE", self.endpoint.via_sent_by, extra_headers=extra, body=body
        )
        destination = self._target()
        tx = self.endpoint.send_request(request, destination)
        response = await tx.final_response(timeout)
        if response is None:
            return None
        if 200 <= response.status < 300:
            if response.body:
                self.remote_sdp = response.body
            self.local_sdp = body or self.local_sdp
            ack = dialog.create_request("ACK", self.endpoint.via_sent_by, cseq=request.cseq.seq)
            tx.ack = (ack.to_bytes(), destination)
        else:
            tx.ack = (build_ack_for_non_2xx(request, response).to_bytes(), destination)
        self.endpoint.send_bytes(tx.ack[0], tx.ack[1])
        return response

    async def cancel(self, timeout: float = 5.0) -> SipResponse | None:
        """CANCEL the ringing INVITE we sent; returns the INVITE's final response (487
        normally; ACKed automatically). The CANCEL's own response is ``cancel_response``.
        Waits (bounded) for a provisional response first, as RFC 3261 §9.1 asks."""
        if self.role != "uac" or self.invite is None:
            raise RuntimeError("only a call we placed can be cancelled")
        if self.final is not None:
            return self.final
        if not self.provisionals:
            await self.wait_provisional(timeout)
        invite = self.invite
        headers = [
            ("Via", invite.header_values("Via")[0]),
            ("Max-Forwards", "70"),
            *(("Route", r) for r in invite.header_lines("Route")),
            ("From", invite.header("From") or ""),
            ("To", invite.header("To") or ""),
            ("Call-ID", invite.call_id),
            ("CSeq", f"{invite.cseq.seq} CANCEL"),
            ("User-Agent", USER_AGENT),
        ]
        cancel = SipRequest("CANCEL", invite.uri, headers)
        tx = self.endpoint.send_request(cancel, self.destination)
        self.cancel_response = await tx.final_response(timeout)
        return await self.wait_final(timeout)

    def _target(self) -> Address:
        dialog = self.dialog
        if dialog is None:
            return self.destination
        if dialog.route_set:
            return uri_address(dialog.route_set[0], self.destination)
        return uri_address(dialog.remote_target, self.destination)

    def _finish(self, response: SipResponse | None) -> None:
        self.final = response
        self._done.set()
        self._progress.set()


# --------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, owner: SipEndpoint) -> None:
        self.owner = owner
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner._datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.owner.errors.append(f"socket error: {exc}")


class _RtpCounter(asyncio.DatagramProtocol):
    def __init__(self, owner: SipEndpoint) -> None:
        self.owner = owner
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner.rtp_packets += 1


AuthBuilder = Callable[[list[tuple[str, str]]], SipRequest]


class SipEndpoint:
    """A SIP endpoint on one UDP socket (and one RTP socket it advertises in its SDP).

    Subclasses decide what a new incoming INVITE gets (:meth:`on_new_invite`); every
    request received is recorded (``requests``/``received``) before it is answered.
    """

    user: str = "peer"

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        *,
        credentials: tuple[str, str] | None = None,
        algorithm: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.algorithm = algorithm  # preferred digest algorithm ("MD5", "SHA-256"), or best
        self.requests: list[RequestRecord] = []
        self.retransmissions: list[RequestRecord] = []
        self.errors: list[str] = []  # unparseable datagrams, socket errors
        self.calls: dict[tuple[str, str], Call] = {}  # (Call-ID, our tag) → call
        self.responding = True
        self.rtp_port = 0
        self.rtp_packets = 0
        self.answer_sdp: bytes | None = None  # fixed SDP answer instead of answer_sdp()
        self.out_of_dialog_status: dict[str, int] = {
            "OPTIONS": 200, "MESSAGE": 200, "NOTIFY": 200, "INFO": 200, "REFER": 202,
        }  # fmt: skip
        self._transport: asyncio.DatagramTransport | None = None
        self._rtp: asyncio.DatagramTransport | None = None
        self._clients: dict[tuple[str, str], ClientTransaction] = {}
        self._served: dict[tuple[str, str], tuple[bytes, Address] | None] = {}
        self._unhandled: set[tuple[str, str]] = set()  # received while not responding
        self._incoming: dict[str, IncomingInvite] = {}  # INVITE branch → state
        self._acks: dict[tuple[str, int], asyncio.Event] = {}
        self._tasks: set[asyncio.Task] = set()
        self._arrival: asyncio.Event | None = None
        self._consumed: set[int] = set()
        self._session_id = secrets.randbelow(10**9) + 1

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._arrival = asyncio.Event()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        rtp, _ = await loop.create_datagram_endpoint(
            lambda: _RtpCounter(self), local_addr=(self.host, 0)
        )
        self._rtp = rtp
        self.rtp_port = rtp.get_extra_info("sockname")[1]

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for tx in self._clients.values():
            if tx.retransmitter is not None:
                tx.retransmitter.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        closing = []
        for transport in (self._transport, self._rtp):
            if transport is not None:
                transport.close()
                protocol = transport.get_protocol()
                if isinstance(protocol, _Datagrams | _RtpCounter):
                    closing.append(protocol.closed)
        self._transport = self._rtp = None
        if closing:
            # the socket is released only when the loop has run connection_lost: wait
            # (bounded), so the same port can be bound again right away
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing), 1.0)

    async def __aenter__(self) -> SipEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- addresses --------------------------------------------------------------------------
    @property
    def address(self) -> Address:
        return (self.host, self.port)

    @property
    def via_sent_by(self) -> str:
        return host_port(self.address)

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{self.via_sent_by}>"

    def default_offer(self, version: int = 1, direction: str = "sendrecv") -> bytes:
        return offer_sdp(
            self.host,
            self.rtp_port,
            session_id=self._session_id,
            version=version,
            direction=direction,
        )

    def sdp_answer_to(self, offer: bytes) -> bytes:
        """Our SDP for an incoming offer (or our own offer when there was none)."""
        if self.answer_sdp is not None:
            return self.answer_sdp
        if not offer:
            return self.default_offer()
        if offer.startswith(b"--") and b"v=0" in offer:  # multipart: answer its SDP part
            start = offer.index(b"v=0")
            end = offer.find(b"\r\n--", start)
            offer = offer[start:end + 2 if end >= 0 else len(offer)]
        return answer_sdp(offer, self.host, self.rtp_port, session_id=self._session_id)

    # -- received requests ------------------------------------------------------------------
    @property
    def received(self) -> list[SipRequest]:
        """Every request received (retransmissions excluded), in arrival order."""
        return [record.request for record in self.requests]

    async def wait_for(self, method: str, timeout: float = 5.0) -> SipRequest | None:
        """The next received request of ``method`` not yet returned by ``wait_for``;
        None when none arrives within ``timeout``."""
        record = await self._wait_record(
            lambda r: r.request.method == method.upper(), self._consumed, timeout
        )
        return record.request if record is not None else None

    async def _wait_record(
        self, predicate: Callable[[RequestRecord], bool], consumed: set[int], timeout: float
    ) -> RequestRecord | None:
        deadline = time.monotonic() + timeout
        while True:
            for index, record in enumerate(self.requests):
                if index not in consumed and predicate(record):
                    consumed.add(index)
                    return record
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._arrival is None:
                return None
            event = self._arrival
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def stop_responding(self) -> None:
        """Record requests but answer nothing (not even retransmissions). After
        :meth:`resume`, a retransmission of a request that arrived meanwhile is handled
        (once: it stays recorded as one request)."""
        self.responding = False

    def resume(self) -> None:
        self.responding = True

    # -- sending ------------------------------------------------------------------------------
    def send_bytes(self, data: bytes, destination: Address) -> None:
        if self._transport is None:
            raise RuntimeError("the endpoint is not started (use it as an async context)")
        self._transport.sendto(data, destination)

    def send_request(self, request: SipRequest, destination: Address) -> ClientTransaction:
        """Send a request (not ACK) and retransmit it over UDP until it is answered:
        T1 doubling (capped at T2 for non-INVITE), for at most 64*T1."""
        via = request.top_via
        if via is None or via.branch is None:
            raise ValueError("a request needs a top Via with a branch")
        tx = ClientTransaction(request, destination)
        self._clients[(via.branch, request.method)] = tx
        data = request.to_bytes()
        self.send_bytes(data, destination)
        tx.retransmitter = self._spawn(self._retransmit(tx, data))
        return tx

    async def _retransmit(self, tx: ClientTransaction, data: bytes) -> None:
        interval = T1
        deadline = time.monotonic() + TIMER_B
        invite = tx.request.method == "INVITE"
        while True:
            await asyncio.sleep(interval)
            if tx.final is not None or (invite and tx.responses):
                return
            if time.monotonic() >= deadline:
                return
            if self._transport is None:
                return
            self.send_bytes(data, tx.destination)
            interval = interval * 2 if invite else min(interval * 2, T2)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(f"task failed: {task.exception()!r}")

    def respond(self, request: SipRequest, response: SipResponse, destination: Address) -> None:
        """Send a response and remember it for retransmissions of the request."""
        if not self.responding:
            return
        via = request.top_via
        data = response.to_bytes()
        if via is not None and via.branch is not None:
            self._served[(via.branch, request.method)] = (data, destination)
        self.send_bytes(data, destination)

    def authorization_for(
        self, request: SipRequest, response: SipResponse
    ) -> tuple[str, str] | None:
        """The (header, value) answering a 401/407 challenge, or None when we have no
        credentials or no usable challenge."""
        if self.credentials is None:
            return None
        challenge_header, credentials_header = _auth_header_names(response.status)
        values = response.header_lines(challenge_header)
        if self.algorithm is not None:
            preferred = [
                v
                for v in values
                if (c := parse_challenge(v)) is not None
                and c.algorithm.upper() == self.algorithm.upper()
            ]
            values = preferred or values
        challenge = choose_challenge(values)
        if challenge is None:
            return None
        username, password = self.credentials
        value = build_authorization(
            challenge, request.method, request.uri, username, password, body=request.body
        )
        return (credentials_header, value)

    async def request_with_auth(
        self, build: AuthBuilder, destination: Address, timeout: float
    ) -> SipResponse | None:
        """Send ``build([])``; on 401/407 send ``build([credentials])`` once (the builder
        must give the new request the next CSeq). The final response, or None."""
        request = build([])
        response = await self.send_request(request, destination).final_response(timeout)
        if response is None or response.status not in (401, 407):
            return response
        authorization = self.authorization_for(request, response)
        if authorization is None:
            return response
        retry = build([authorization])
        return await self.send_request(retry, destination).final_response(timeout)

    # -- receiving ----------------------------------------------------------------------------
    def _datagram(self, data: bytes, source: Address) -> None:
        if not data.strip():
            return  # keepalive CRLF
        try:
            message = parse_message(data)
        except SipParseError as exc:
            self.errors.append(f"unparseable datagram from {source}: {exc}")
            return
        try:
            if isinstance(message, SipResponse):
                self._on_response(message)
            else:
                self._on_request(message, data, source)
        except Exception as exc:  # a test peer reports, it never takes the loop down
            self.errors.append(f"failed to handle {message!r} from {source}: {exc!r}")

    def _on_response(self, response: SipResponse) -> None:
        via = response.top_via
        if via is None or via.branch is None:
            return
        tx = self._clients.get((via.branch, response.cseq.method))
        if tx is None:
            return
        if response.status >= 200 and tx.ack is not None:
            self.send_bytes(*tx.ack)  # the final was retransmitted: our ACK got lost
            return
        if response.status >= 200 and tx.final is not None:
            return  # retransmitted final of a non-INVITE transaction
        tx.responses.append(response)
        if response.status >= 200:
            tx.final = response
        tx.queue.put_nowait(response)

    def _on_request(self, request: SipRequest, raw: bytes, source: Address) -> None:
        record = RequestRecord(time.monotonic(), raw, request)
        via = request.top_via
        key = (via.branch or "", request.method) if via is not None else None
        if key is not None and key in self._served and request.method != "ACK":
            self.retransmissions.append(record)
            if not self.responding:
                return
            if key in self._unhandled:  # arrived while we were not responding
                self._unhandled.discard(key)
                self._dispatch(request, source)
                return
            cached = self._served[key]
            if cached is not None:
                self.send_bytes(*cached)
            return
        if key is not None and request.method != "ACK":
            self._served[key] = None
        self.requests.append(record)
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = asyncio.Event()
        if request.method == "ACK":
            self._on_ack(request)
        elif not self.responding:
            if key is not None:
                self._unhandled.add(key)
        else:
            self._dispatch(request, source)

    def _dispatch(self, request: SipRequest, source: Address) -> None:
        to_tag = request.to.tag
        if request.method == "CANCEL":
            self._on_cancel(request, source)
        elif to_tag:
            self._on_in_dialog(request, source, to_tag)
        elif request.method == "INVITE":
            branch = request.top_via.branch if request.top_via is not None else None
            state = IncomingInvite(request, source, new_tag())
            self._incoming[branch or ""] = state
            state.task = self._spawn(self._run_new_invite(state))
        elif request.method == "BYE":
            self.respond(request, self.response(request, 481), source)
        else:
            status = self.out_of_dialog_status.get(request.method, 405)
            headers = [("Allow", ALLOW)] if status == 405 else []
            self.respond(request, self.response(request, status, headers=headers), source)

    def _on_ack(self, request: SipRequest) -> None:
        event = self._acks.get((request.call_id, request.cseq.seq))
        if event is not None:
            event.set()
        to_tag = request.to.tag
        call = self.calls.get((request.call_id, to_tag or ""))
        if call is not None:
            call._received(request)

    def _on_cancel(self, request: SipRequest, source: Address) -> None:
        via = request.top_via
        state = self._incoming.get(via.branch or "") if via is not None else None
        if state is None:
            self.respond(request, self.response(request, 481), source)
            return
        if state.silent:
            return  # a black-holed INVITE: its CANCEL is not answered either
        self.respond(request, self.response(request, 200), source)
        if state.final is None:
            if state.task is not None:
                state.task.cancel()
            self.send_invite_response(state, self.invite_response(state, 487))

    def _on_in_dialog(self, request: SipRequest, source: Address, to_tag: str) -> None:
        call = self.calls.get((request.call_id, to_tag))
        if call is None:
            self.respond(request, self.response(request, 481), source)
            return
        dialog = call.dialog
        if dialog is not None and not dialog.accept_remote_request(request):
            self.respond(request, self.response(request, 500), source)
            return
        call._received(request)
        method = request.method
        if method == "BYE":
            call.bye_received = request
            call.ended.set()
            self.respond(request, self.response(request, 200), source)
        elif method in ("INVITE", "UPDATE"):
            body = b""
            if request.body or method == "INVITE":
                try:
                    body = self.sdp_answer_to(request.body)
                except ValueError:
                    self.respond(request, self.response(request, 488), source)
                    return
                call.remote_sdp = request.body or call.remote_sdp
                call.local_sdp = body
            headers = [("Contact", self.contact), ("Allow", ALLOW)]
            if body:
                headers.append(("Content-Type", "application/sdp"))
            response = self.response(request, 200, headers=headers, body=body)
            if method == "INVITE":
                self._spawn(self._send_until_acked(request, response, source))
            else:
                self.respond(request, response, source)
        else:
            status = 202 if method == "REFER" else 200
            self.respond(request, self.response(request, status), source)

    # -- responses --------------------------------------------------------------------------------
    def response(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        to_tag: str | None = None,
    ) -> SipResponse:
        """A response to ``request`` (tagged when it has no To tag and status > 100)."""
        if to_tag is None and status > 100 and not request.to.tag:
            to_tag = new_tag()
        return make_response(
            request,
            status,
            reason,
            to_tag=to_tag,
            headers=[("Server", USER_AGENT), *headers],
            body=body,
        )

    def invite_response(
        self,
        state: IncomingInvite,
        status: int,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> SipResponse:
        """A response to a received INVITE with our stable To tag; Contact on 1xx/2xx;
        on a 2xx without ``body``, our SDP answer; ``Geolocation-Error: 100`` on a 424."""
        extra = list(headers)
        if status < 300 and status != 100:
            extra.append(("Contact", self.contact))
        if 200 <= status < 300:
            extra.append(("Allow", ALLOW))
            if body is None:
                body = self.sdp_answer_to(state.request.body)
        if status == 424 and not any(n.lower() == "geolocation-error" for n, _ in extra):
            extra.append(("Geolocation-Error", "100"))
        body = body or b""
        if body and not any(n.lower() == "content-type" for n, _ in extra):
            extra.append(("Content-Type", "application/sdp"))
        tag = state.tag if status > 100 else None
        return self.response(state.request, status, reason, headers=extra, body=body, to_tag=tag)

    def send_invite_response(self, state: IncomingInvite, response: SipResponse) -> None:
        """Send a response to a received INVITE. A final one is retransmitted until its
        ACK arrives; a 2xx also makes the dialog (``self.calls``, :meth:`on_answered`)."""
        if state.final is not None:
            return
        if response.status < 200:
            self.respond(state.request, response, state.source)
            return
        state.final = response
        if 200 <= response.status < 300:
            call = Call(self, "uas", state.source)
            call.invite = state.request
            call.final = response
            call.remote_sdp = state.request.body
            call.local_sdp = response.body
            dialog = Dialog.as_uas(state.request, state.tag)
            dialog.confirm()
            call.dialog = dialog
            call._done.set()
            self.calls[(state.request.call_id, state.tag)] = call
            self.on_answered(call)
        self._spawn(self._send_until_acked(state.request, response, state.source))

    async def _send_until_acked(
        self, request: SipRequest, response: SipResponse, destination: Address
    ) -> None:
        key = (request.call_id, request.cseq.seq)
        event = self._acks.setdefault(key, asyncio.Event())
        interval = T1
        deadline = time.monotonic() + TIMER_B
        self.respond(request, response, destination)
        while not event.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), interval)
            if not event.is_set() and self.responding:
                self.send_bytes(response.to_bytes(), destination)
            interval = min(interval * 2, T2)

    # -- hooks ----------------------------------------------------------------------------------
    async def _run_new_invite(self, state: IncomingInvite) -> None:
        await self.on_new_invite(state)

    async def on_new_invite(self, state: IncomingInvite) -> None:
        """What a new (out-of-dialog) INVITE gets; subclasses override."""
        self.send_invite_response(state, self.invite_response(state, 501))

    def on_answered(self, call: Call) -> None:
        """A call we answered with a 2xx (subclasses keep a list)."""

    # -- out-of-dialog requests -------------------------------------------------------------
    @property
    def from_uri(self) -> str:
        """The URI we put in the From of requests outside a dialog."""
        return f"sip:{self.user}@{host_port(self.address)}"

    async def send(
        self, method: str, request_uri: str, destination: Address, *,
        headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
        content_type: str | None = None, to_uri: str | None = None, timeout: float = 5.0,
    ) -> SipResponse | None:  # fmt: skip
        """An out-of-dialog non-INVITE request (OPTIONS, MESSAGE, ...) to
        ``destination``; its final response (one 401/407 answered with our credentials)."""
        method = method.upper()
        if method in ("INVITE", "ACK", "CANCEL", "REGISTER"):
            raise ValueError(f"{method} has its own method (place_call/cancel/register)")
        if body and content_type is None:
            raise ValueError("a body needs a content_type")
        call_id = new_call_id(self.host)
        tag = new_tag()
        sequence = iter(range(1, 10))
        extra = [("User-Agent", USER_AGENT), *headers]
        if content_type is not None:
            extra.append(("Content-Type", content_type))

        def build(auth: list[tuple[str, str]]) -> SipRequest:
            return SipRequest(method, request_uri, [
                ("Via", f"SIP/2.0/UDP {self.via_sent_by};branch={new_branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", f"<{self.from_uri}>;tag={tag}"),
                ("To", f"<{to_uri or request_uri}>"),
                ("Call-ID", call_id),
                ("CSeq", f"{next(sequence)} {method}"),
                *extra,
                *auth,
            ], body)  # fmt: skip

        return await self.request_with_auth(build, destination, timeout)

    # -- placing calls ------------------------------------------------------------------------
    async def place_call(
        self, request_uri: str, destination: Address, *, from_value: str, to_value: str,
        sdp: bytes | None = DEFAULT_SDP, headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None, content_type: str | None = None, timeout: float = 10.0,
        wait: InviteWait = "final",
    ) -> Call:  # fmt: skip
        """Send an INVITE (``from_value`` without tag) and run it: the 401/407 digest
        round when we have credentials, provisional responses collected, the ACK of the
        final response. Returns when ``wait`` is reached ("final": the final response;
        "provisional": a 1xx beyond 100 or the final; "sent": at once) or after
        ``timeout``; the rest goes on in the background."""
        if body is None:
            if sdp is DEFAULT_SDP:
                sdp = self.default_offer()
            body = sdp or b""
            content_type = "application/sdp" if body else None
        elif content_type is None:
            raise ValueError("a body needs a content_type")
        call = Call(self, "uac", destination)
        call.local_sdp = body if content_type == "application/sdp" else b""
        from_tag = new_tag()
        call_id = new_call_id(self.host)
        extra = [
            ("Contact", self.contact), ("Allow", ALLOW), ("User-Agent", USER_AGENT), *headers,
        ]  # fmt: skip
        if content_type is not None:
            extra.append(("Content-Type", content_type))

        def build(seq: int, auth: list[tuple[str, str]]) -> SipRequest:
            request_headers = [
                ("Via", f"SIP/2.0/UDP {self.via_sent_by};branch={new_branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", f"{from_value};tag={from_tag}"),
                ("To", to_value),
                ("Call-ID", call_id),
                ("CSeq", f"{seq} INVITE"),
                *extra,
                *auth,
            ]
            return SipRequest("INVITE", request_uri, request_headers, body)

        first = build(1, [])
        call.invite = first
        self.calls[(call_id, from_tag)] = call
        call.sent_at = time.monotonic()
        tx = self.send_request(first, destination)
        call._task = self._spawn(self._run_invite(call, tx, build))
        if wait == "final":
            await call.wait_final(timeout)
        elif wait == "provisional":
            await call.wait_provisional(timeout)
        return call

    async def _run_invite(
        self,
        call: Call,
        tx: ClientTransaction,
        build: Callable[[int, list[tuple[str, str]]], SipRequest],
    ) -> None:
        authenticated = False
        try:
            while True:
                limit = None if tx.responses else TIMER_B
                response = await tx.next_response(limit)
                if response is None:
                    call._finish(None)  # no response at all (Timer B)
                    return
                invite = tx.request
                if response.status < 200:
                    call.provisionals.append(response)
                    if response.status > 100:
                        if response.body:
                            call.remote_sdp = response.body
                        call._progress.set()
                    continue
                if response.status >= 300:
                    tx.ack = (build_ack_for_non_2xx(invite, response).to_bytes(), tx.destination)
                    self.send_bytes(*tx.ack)
                    authorization = (
                        None if authenticated or response.status not in (401, 407)
                        else self.authorization_for(invite, response)
                    )  # fmt: skip
                    if authorization is not None:
                        authenticated = True
                        call.challenges.append(response)
                        retry = build(invite.cseq.seq + 1, [authorization])
                        call.invite = retry
                        call.sent_at = time.monotonic()
                        tx = self.send_request(retry, tx.destination)
                        continue
                    call._finish(response)
                    return
                dialog = Dialog.as_uac(invite, response)
                dialog.confirm(response)
                call.dialog = dialog
                answer = b""
                if response.body:
                    call.remote_sdp = response.body
                    if not invite.body:  # late offer: the ACK carries our answer
                        answer = self.sdp_answer_to(response.body)
                        call.local_sdp = answer
                ack = dialog.create_request(
                    "ACK",
                    self.via_sent_by,
                    cseq=invite.cseq.seq,
                    body=answer,
                    extra_headers=[("Content-Type", "application/sdp")] if answer else None,
                )
                call.dialog = dialog
                tx.ack = (ack.to_bytes(), call._target())
                self.send_bytes(*tx.ack)
                call._finish(response)
                return
        finally:
            if not call._done.is_set():
                call._finish(call.final)


# --------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------


IncomingBehaviour = Literal["answer", "busy", "ring"]


class SipUA(SipEndpoint):
    """A device registered to the switch (``registrar``: its UDP address), with the
    extension's credentials. ``incoming_invite`` says what a call to it gets:
    "answer" (180, then 200 with SDP after ``answer_delay`` seconds), "busy" (486) or
    "ring" (180 until the switch CANCELs). ``incoming_calls`` lists the answered ones."""

    def __init__(
        self,
        username: str,
        password: str,
        registrar: Address,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        domain: str | None = None,
        display_name: str | None = None,
        algorithm: str | None = None,
        incoming_invite: IncomingBehaviour = "answer",
        answer_delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, credentials=(username, password), algorithm=algorithm)
        self.username = username
        self.user = username
        self.registrar = registrar
        self.domain = domain or registrar[0]
        self.display_name = display_name
        self.incoming_invite: IncomingBehaviour = incoming_invite
        self.answer_delay = answer_delay
        self.incoming_calls: list[Call] = []
        self.registrations: list[SipResponse | None] = []
        self._register_call_id = new_call_id(host)
        self._register_seq = 0

    async def __aenter__(self) -> SipUA:
        await self.start()
        return self

    @property
    def aor(self) -> str:
        return f"sip:{self.username}@{self.domain}"

    @property
    def from_uri(self) -> str:
        return self.aor

    async def message(
        self,
        target: str,
        text: str,
        *,
        timeout: float = 5.0,
        headers: Iterable[tuple[str, str]] = (),
    ) -> SipResponse | None:
        """A text/plain MESSAGE to ``target`` (an extension or URI) through the switch."""
        return await self.send(
            "MESSAGE",
            self.target_uri(target),
            self.registrar,
            headers=headers,
            body=text.encode(),
            content_type="text/plain",
            timeout=timeout,
        )

    # -- REGISTER ---------------------------------------------------------------------------
    async def register(
        self,
        expires: int = 3600,
        *,
        headers: Iterable[tuple[str, str]] = (),
        contact: str | None = None,
        timeout: float = 5.0,
    ) -> SipResponse | None:
        """REGISTER our Contact for ``expires`` seconds (0 removes it), answering the 401
        with digest; the final response (None on timeout)."""
        tag = new_tag()
        extra = [
            ("Contact", contact or self.contact),
            ("Expires", str(expires)),
            ("User-Agent", USER_AGENT),
            *headers,
        ]

        def build(auth: list[tuple[str, str]]) -> SipRequest:
            self._register_seq += 1
            return SipRequest(
                "REGISTER",
                f"sip:{self.domain}",
                [
                    ("Via", f"SIP/2.0/UDP {self.via_sent_by};branch={new_branch()};rport"),
                    ("Max-Forwards", "70"),
                    ("From", f"<{self.aor}>;tag={tag}"),
                    ("To", f"<{self.aor}>"),
                    ("Call-ID", self._register_call_id),
                    ("CSeq", f"{self._register_seq} REGISTER"),
                    *extra,
                    *auth,
                ],
            )

        response = await self.request_with_auth(build, self.registrar, timeout)
        self.registrations.append(response)
        return response

    async def unregister(self, timeout: float = 5.0) -> SipResponse | None:
        return await self.register(0, timeout=timeout)

    # -- INVITE -----------------------------------------------------------------------------
    def target_uri(self, target: str) -> str:
        """``"1001"`` → ``sip:1001@<domain>``; a URI (``sip:``, ``tel:``, ``urn:``) as is."""
        return target if ":" in target else f"sip:{target}@{self.domain}"

    async def invite(
        self, target_uri: str, *, sdp: bytes | None = DEFAULT_SDP,
        headers: Iterable[tuple[str, str]] = (), body: bytes | None = None,
        content_type: str | None = None, from_display: str | None = None,
        from_uri: str | None = None, to_uri: str | None = None, timeout: float = 10.0,
        wait: InviteWait = "final",
    ) -> Call:  # fmt: skip
        """Call ``target_uri`` through the switch (see :meth:`SipEndpoint.place_call`).
        ``sdp=None`` sends no offer (the 200's offer is answered in the ACK); ``body`` +
        ``content_type`` send any body instead (e.g. multipart SDP + PIDF-LO)."""
        uri = self.target_uri(target_uri)
        display = from_display if from_display is not None else self.display_name
        from_addr = f"<{from_uri or self.aor}>"
        if display:
            from_addr = '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '" ' + from_addr
        return await self.place_call(
            uri,
            self.registrar,
            from_value=from_addr,
            to_value=f"<{to_uri or uri}>",
            sdp=sdp,
            headers=headers,
            body=body,
            content_type=content_type,
            timeout=timeout,
            wait=wait,
        )

    # -- incoming calls ---------------------------------------------------------------------
    async def on_new_invite(self, state: IncomingInvite) -> None:
        behaviour = self.incoming_invite
        if behaviour == "busy":
            self.send_invite_response(state, self.invite_response(state, 486))
            return
        self.send_invite_response(state, self.invite_response(state, 180))
        if behaviour == "ring":
            return  # rings until CANCEL (answered 487 by the endpoint)
        if self.answer_delay > 0:
            await asyncio.sleep(self.answer_delay)
        try:
            response = self.invite_response(state, 200)
        except ValueError:
            response = self.invite_response(state, 488)
        self.send_invite_response(state, response)

    def on_answered(self, call: Call) -> None:
        self.incoming_calls.append(call)

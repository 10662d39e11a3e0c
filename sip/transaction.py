"""The SIP transaction layer (RFC 3261 §17, with the RFC 6026 Accepted state), sans-I/O.

`TransactionLayer` matches incoming requests and responses to transactions, runs the
four state machines (INVITE/non-INVITE, client/server) and returns *events*: messages
to send and things the transaction user (TU) must know. It never sleeps and never
touches a socket; every call that can change state takes `now` (seconds, any
monotonic clock), and the owner drives timers with `next_deadline()` and `on_timer(now)`.
All timers of all transactions live in one `TimerQueue`.

Events (returned as lists, in the order they happened):

- `SendMessage(message, flow)`: hand a message to the transport. For server
  transactions `flow` is the opaque object given to `receive_request`; for client
  transactions it is the destination given to `send_request`.
- `RequestReceived(transaction, request, matched_invite)`: a new request for the TU.
  `transaction` is None for an ACK that starts no transaction (the ACK of a 2xx, an
  ACK matching an INVITE server transaction in the RFC 6026 Accepted state, or an ACK
  matching nothing). For CANCEL, `transaction` is the CANCEL's own non-INVITE server
  transaction and `matched_invite` the INVITE server transaction it cancels (§9.2),
  or None: the TU then answers the CANCEL 481 (and, when found, the INVITE 487).
- `ResponseReceived(transaction, response)`: a response for the TU. Every 2xx to an
  INVITE is delivered (retransmissions and other forks included); the TU sends the
  ACK of a 2xx itself. With `rfc6026=False` a 2xx arriving after the INVITE client
  transaction ended is delivered with `transaction=None` (RFC 3261 §17.1.1.2).
- `TransactionTimedOut(transaction, timer)`: Timer B or F (client: act as if a 408
  was received) or Timer H (INVITE server: the ACK never came).
- `TransportFailed(transaction)`: the transport reported an error (§17.1.4, §17.2.4).
- `TransactionTerminated(transaction)`: the transaction is gone from the layer.
- `InvalidMessage(message, reason)`: a message the layer cannot match (no Via,
  unparseable CSeq, ...). Never an exception from the receive path.

Responses that match no client transaction are dropped without an event and counted
(`stats()["stray_responses"]`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum

from .headers import Via
from .message import SipRequest, SipResponse, make_response
from .timers import TimerHandle, TimerQueue, TimerSettings

MAGIC_COOKIE = "z9hG4bK"

# Delay after which an INVITE server transaction answers 100 Trying by itself when the
# TU has not sent a response (RFC 3261 §17.2.1: "unless ... within 200 ms").
DEFAULT_INVITE_TRYING_DELAY = 0.2

# Timer names as in RFC 3261 Table 4 and RFC 6026; "Trying" is the 200 ms 100-Trying timer.
TIMER_TRYING = "Trying"


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie and 96 random bits."""
    return MAGIC_COOKIE + secrets.token_hex(12)


class TransactionState(StrEnum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026
    TERMINATED = "Terminated"


class TransactionStateError(RuntimeError):
    """The TU asked for something the transaction cannot do in its state."""


# -- events ---------------------------------------------------------------------------


@dataclass(slots=True)
class SendMessage:
    message: SipRequest | SipResponse
    flow: object


@dataclass(slots=True)
class RequestReceived:
    transaction: ServerTransaction | None
    request: SipRequest
    matched_invite: InviteServerTransaction | None = None


@dataclass(slots=True)
class ResponseReceived:
    transaction: ClientTransaction | None
    response: SipResponse


@dataclass(slots=True)
class TransactionTimedOut:
    transaction: Transaction
    timer: str  # "B", "F" or "H"


@dataclass(slots=True)
class TransportFailed:
    transaction: Transaction


@dataclass(slots=True)
class TransactionTerminated:
    transaction: Transaction


@dataclass(slots=True)
class InvalidMessage:
    message: SipRequest | SipResponse
    reason: str


TransactionEvent = (
    SendMessage
    | RequestReceived
    | ResponseReceived
    | TransactionTimedOut
    | TransportFailed
    | TransactionTerminated
    | InvalidMessage
)
Events = list[TransactionEvent]


# -- matching keys ----------------------------------------------------------------------


class _Unmatchable(Exception):
    """A message lacks what matching needs (internal; becomes InvalidMessage)."""


def _top_via(message: SipRequest | SipResponse) -> Via:
    try:
        via = message.top_via
    except ValueError as exc:
        raise _Unmatchable(f"malformed Via: {exc}") from None
    if via is None:
        raise _Unmatchable("no Via header")
    return via


def _key_method(method: str) -> str:
    """The method a request is matched under: an ACK belongs to its INVITE."""
    return "INVITE" if method == "ACK" else method


def _rfc3261_server_key(via: Via, method: str) -> tuple:
    return ("rfc3261", via.branch, via.host.lower(), via.port, method)


def _rfc2543_server_key(request: SipRequest, via: Via, method: str, to_tag: str | None) -> tuple:
    """§17.2.3 fallback: Request-URI, To tag, From tag, Call-ID, CSeq and top Via."""
    try:
        return (
            "rfc2543",
            request.uri.strip(),
            to_tag,
            request.from_.tag,
            request.call_id,
            request.cseq.seq,
            method,
            via.transport,
            via.host.lower(),
            via.port,
            tuple(sorted(via.params.items(), key=lambda item: item[0])),
        )
    except ValueError as exc:
        raise _Unmatchable(str(exc)) from None


def _request_to_tag(request: SipRequest) -> str | None:
    try:
        return request.to.tag
    except ValueError as exc:
        raise _Unmatchable(f"malformed To: {exc}") from None


def _server_key(request: SipRequest, method: str, to_tag: str | None = None) -> tuple:
    via = _top_via(request)
    if via.is_rfc3261_branch:
        return _rfc3261_server_key(via, method)
    return _rfc2543_server_key(request, via, method, to_tag)


def _response_to_tag(response: SipResponse | None) -> str | None:
    if response is None:
        return None
    try:
        return response.to.tag
    except ValueError:
        return None


def _copy_timestamp(request: SipRequest) -> list[tuple[str, str]]:
    value = request.header("Timestamp")
    return [("Timestamp", value)] if value is not None else []


# -- transactions -------------------------------------------------------------------------


class Transaction:
    """What every transaction exposes. `tu_data` is free for the TU."""

    __slots__ = (
        "key",
        "request",
        "method",
        "reliable",
        "state",
        "last_response",
        "tu_data",
        "created_at",
        "_timers",
        "_layer",
        "_interval",
    )

    def __init__(
        self, layer: TransactionLayer, key: tuple, request: SipRequest, reliable: bool, now: float
    ) -> None:
        self._layer = layer
        self.key = key
        self.request = request
        self.method = request.method
        self.reliable = reliable
        self.state = TransactionState.TRYING
        self.last_response: SipResponse | None = None
        self.tu_data: object = None
        self.created_at = now
        self._timers: dict[str, TimerHandle] = {}
        self._interval = 0.0  # current retransmission interval (A, E or G)

    @property
    def terminated(self) -> bool:
        return self.state is TransactionState.TERMINATED

    @property
    def branch(self) -> str | None:
        via = self.request.top_via
        return via.branch if via is not None else None

    @property
    def settings(self) -> TimerSettings:
        return self._layer.settings

    def _start_timer(self, name: str, delay: float, now: float) -> None:
        self._layer._start_timer(self, name, delay, now)

    def _stop_timer(self, name: str) -> None:
        self._layer._stop_timer(self, name)

    def _terminate(self, events: Events) -> None:
        self._layer._terminate(self, events)

    def _on_timer(self, name: str, now: float, events: Events) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.state.value} {self.branch}>"


class ServerTransaction(Transaction):
    __slots__ = ("flow",)

    def __init__(
        self,
        layer: TransactionLayer,
        key: tuple,
        request: SipRequest,
        flow: object,
        reliable: bool,
        now: float,
    ) -> None:
        super().__init__(layer, key, request, reliable, now)
        self.flow = flow

    def _send(self, response: SipResponse, events: Events) -> None:
        events.append(SendMessage(response, self.flow))

    def _on_request(self, request: SipRequest, now: float, events: Events) -> None:
        raise NotImplementedError

    def _on_response_from_tu(self, response: SipResponse, now: float, events: Events) -> None:
        raise NotImplementedError


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 Figure 7 with the RFC 6026 Accepted state (Figure 7 of RFC 6026)."""

    __slots__ = ()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state = TransactionState.PROCEEDING

    def _send_trying(self, events: Events) -> None:
        self._stop_timer(TIMER_TRYING)
        trying = make_response(self.request, 100, headers=_copy_timestamp(self.request))
        self.last_response = trying
        self._send(trying, events)

    def _on_request(self, request: SipRequest, now: float, events: Events) -> None:
        state = self.state
        if request.method == "ACK":
            if state is TransactionState.COMPLETED:
                self._stop_timer("G")
                self._stop_timer("H")
                self.state = TransactionState.CONFIRMED
                delay = self.settings.timer_i(self.reliable)
                if delay <= 0:
                    self._terminate(events)
                else:
                    self._start_timer("I", delay, now)
            elif state is TransactionState.ACCEPTED:
                # RFC 6026: an ACK (of the 2xx) reaching the transaction goes to the TU.
                events.append(RequestReceived(None, request))
            # Proceeding (no final response yet) or Confirmed: absorbed.
            return
        # A retransmission of the INVITE.
        if state is TransactionState.PROCEEDING:
            if self.last_response is not None:
                self._send(self.last_response, events)
            elif TIMER_TRYING in self._timers:
                self._send_trying(events)
        elif state is TransactionState.COMPLETED and self.last_response is not None:
            self._send(self.last_response, events)
        # Confirmed and Accepted absorb INVITE retransmissions silently.

    def _on_response_from_tu(self, response: SipResponse, now: float, events: Events) -> None:
        status = response.status
        state = self.state
        if state is TransactionState.ACCEPTED:
            if not 200 <= status < 300:
                raise TransactionStateError(f"{status} after a 2xx on an INVITE transaction")
            self.last_response = response
            self._send(response, events)
            return
        if state is not TransactionState.PROCEEDING:
            raise TransactionStateError(f"cannot send {status} in state {state.value}")
        self._stop_timer(TIMER_TRYING)
        self.last_response = response
        self._send(response, events)
        if status < 200:
            return
        if status < 300:
            if self._layer.rfc6026:
                self.state = TransactionState.ACCEPTED
                self._start_timer("L", self.settings.timer_l, now)
            else:
                self._terminate(events)
            return
        self.state = TransactionState.COMPLETED
        if not self.reliable:
            self._interval = self.settings.timer_g
            self._start_timer("G", self._interval, now)
        self._start_timer("H", self.settings.timer_h, now)

    def _on_timer(self, name: str, now: float, events: Events) -> None:
        state = self.state
        if name == TIMER_TRYING and state is TransactionState.PROCEEDING:
            if self.last_response is None:
                self._send_trying(events)
        elif name == "G" and state is TransactionState.COMPLETED:
            if self.last_response is not None:
                self._send(self.last_response, events)
            self._interval = min(2 * self._interval, self.settings.t2)
            self._start_timer("G", self._interval, now)
        elif name == "H" and state is TransactionState.COMPLETED:
            events.append(TransactionTimedOut(self, "H"))
            self._terminate(events)
        elif name == "I" and state is TransactionState.CONFIRMED:
            self._terminate(events)
        elif name == "L" and state is TransactionState.ACCEPTED:
            self._terminate(events)


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 Figure 8."""

    __slots__ = ()

    def _on_request(self, request: SipRequest, now: float, events: Events) -> None:
        # Trying: absorbed without an answer; Proceeding/Completed: re-send the last response.
        if self.state is not TransactionState.TRYING and self.last_response is not None:
            self._send(self.last_response, events)

    def _on_response_from_tu(self, response: SipResponse, now: float, events: Events) -> None:
        state = self.state
        if state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            raise TransactionStateError(f"cannot send {response.status} in state {state.value}")
        self.last_response = response
        self._send(response, events)
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            return
        self.state = TransactionState.COMPLETED
        # Only retransmission absorption is left (Timer J, 32 s over UDP): drop the parsed
        # header views so thousands of completed transactions hold few objects for the GC.
        self.request._cache.clear()
        response._cache.clear()
        delay = self.settings.timer_j(self.reliable)
        if delay <= 0:
            self._terminate(events)
        else:
            self._start_timer("J", delay, now)

    def _on_timer(self, name: str, now: float, events: Events) -> None:
        if name == "J" and self.state is TransactionState.COMPLETED:
            self._terminate(events)


class ClientTransaction(Transaction):
    __slots__ = ("destination",)

    def __init__(
        self,
        layer: TransactionLayer,
        key: tuple,
        request: SipRequest,
        destination: object,
        reliable: bool,
        now: float,
    ) -> None:
        super().__init__(layer, key, request, reliable, now)
        self.destination = destination

    @property
    def flow(self) -> object:
        """The destination the request is sent to (same role as a server's flow)."""
        return self.destination

    def _send(self, message: SipRequest, events: Events) -> None:
        events.append(SendMessage(message, self.destination))

    def _start(self, now: float, events: Events) -> None:
        raise NotImplementedError

    def _on_response(self, response: SipResponse, now: float, events: Events) -> None:
        raise NotImplementedError


class InviteClientTransaction(ClientTransaction):
    """RFC 3261 Figure 5 with the RFC 6026 Accepted state."""

    __slots__ = ("ack",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.state = TransactionState.CALLING
        self.ack: SipRequest | None = None  # the ACK of a non-2xx final response

    def _start(self, now: float, events: Events) -> None:
        self._send(self.request, events)
        if not self.reliable:
            self._interval = self.settings.timer_a
            self._start_timer("A", self._interval, now)
        self._start_timer("B", self.settings.timer_b, now)

    def _on_response(self, response: SipResponse, now: float, events: Events) -> None:
        status = response.status
        state = self.state
        if state in (TransactionState.CALLING, TransactionState.PROCEEDING):
            self.last_response = response
            if status < 200:
                if state is TransactionState.CALLING:
                    self._stop_timer("A")
                    self._stop_timer("B")
                    self.state = TransactionState.PROCEEDING
                events.append(ResponseReceived(self, response))
            elif status < 300:
                self._stop_timer("A")
                self._stop_timer("B")
                events.append(ResponseReceived(self, response))
                if self._layer.rfc6026:
                    self.state = TransactionState.ACCEPTED
                    self._start_timer("M", self.settings.timer_m, now)
                else:
                    self._terminate(events)
            else:
                self._stop_timer("A")
                self._stop_timer("B")
                self.state = TransactionState.COMPLETED
                self.ack = build_ack_for_non_2xx(self.request, response)
                self._send(self.ack, events)
                events.append(ResponseReceived(self, response))
                delay = self.settings.timer_d(self.reliable)
                if delay <= 0:
                    self._terminate(events)
                else:
                    self._start_timer("D", delay, now)
        elif state is TransactionState.COMPLETED:
            # A retransmission of the final response: ACK again, tell nobody.
            if status >= 300 and self.ack is not None:
                self._send(self.ack, events)
        elif state is TransactionState.ACCEPTED:
            if 200 <= status < 300:
                self.last_response = response
                events.append(ResponseReceived(self, response))
            # RFC 6026: anything else in Accepted is discarded.

    def _on_timer(self, name: str, now: float, events: Events) -> None:
        state = self.state
        if name == "A" and state is TransactionState.CALLING:
            self._send(self.request, events)
            self._interval *= 2
            self._start_timer("A", self._interval, now)
        elif name == "B" and state is TransactionState.CALLING:
            events.append(TransactionTimedOut(self, "B"))
            self._terminate(events)
        elif name == "D" and state is TransactionState.COMPLETED:
            self._terminate(events)
        elif name == "M" and state is TransactionState.ACCEPTED:
            self._terminate(events)


class NonInviteClientTransaction(ClientTransaction):
    """RFC 3261 Figure 6."""

    __slots__ = ()

    def _start(self, now: float, events: Events) -> None:
        self._send(self.request, events)
        if not self.reliable:
            self._interval = self.settings.timer_e
            self._start_timer("E", self._interval, now)
        self._start_timer("F", self.settings.timer_f, now)

    def _on_response(self, response: SipResponse, now: float, events: Events) -> None:
        state = self.state
        if state not in (TransactionState.TRYING, TransactionState.PROCEEDING):
            return  # Completed absorbs response retransmissions
        self.last_response = response
        if response.status < 200:
            self.state = TransactionState.PROCEEDING
            events.append(ResponseReceived(self, response))
            return
        self._stop_timer("E")
        self._stop_timer("F")
        self.state = TransactionState.COMPLETED
        events.append(ResponseReceived(self, response))
        delay = self.settings.timer_k(self.reliable)
        if delay <= 0:
            self._terminate(events)
        else:
            self._start_timer("K", delay, now)

    def _on_timer(self, name: str, now: float, events: Events) -> None:
        state = self.state
        if name == "E" and state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            self._send(self.request, events)
            if state is TransactionState.TRYING:
                self._interval = min(2 * self._interval, self.settings.t2)
            else:
                self._interval = self.settings.t2
            self._start_timer("E", self._interval, now)
        elif name == "F" and state in (TransactionState.TRYING, TransactionState.PROCEEDING):
            events.append(TransactionTimedOut(self, "F"))
            self._terminate(events)
        elif name == "K" and state is TransactionState.COMPLETED:
            self._terminate(events)


def build_ack_for_non_2xx(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK an INVITE client transaction sends for a 300-699 (RFC 3261 §17.1.1.3):
    Request-URI, Call-ID, From and CSeq number of the INVITE, its top Via only, its
    Route headers, and the To of the response."""
    headers: list[tuple[str, str]] = []
    vias = invite.header_values("Via")
    if vias:
        headers.append(("Via", vias[0]))
    headers.append(("Max-Forwards", "70"))
    for route in invite.header_lines("Route"):
        headers.append(("Route", route))
    from_value = invite.header("From")
    if from_value is not None:
        headers.append(("From", from_value))
    to_value = response.header("To") or invite.header("To")
    if to_value is not None:
        headers.append(("To", to_value))
    headers.append(("Call-ID", invite.call_id))
    headers.append(("CSeq", f"{invite.cseq.seq} ACK"))
    return SipRequest("ACK", invite.uri, headers)


_KINDS = ("client_invite", "client_non_invite", "server_invite", "server_non_invite")


def _kind(tx: Transaction) -> str:
    side = "server" if isinstance(tx, ServerTransaction) else "client"
    return f"{side}_invite" if tx.method == "INVITE" else f"{side}_non_invite"


# -- the layer ------------------------------------------------------------------------------


class TransactionLayer:
    """Every client and server transaction of one SIP element, and their timers."""

    def __init__(
        self,
        timers: TimerSettings | None = None,
        *,
        rfc6026: bool = True,
        invite_trying_delay: float | None = DEFAULT_INVITE_TRYING_DELAY,
    ) -> None:
        """`rfc6026`: use the Accepted state (Timers L and M) after a 2xx to an INVITE;
        False gives plain RFC 3261 (the transaction ends on the 2xx).
        `invite_trying_delay`: seconds after which an INVITE server transaction sends
        100 Trying itself if the TU has not answered (0: at once; None: never)."""
        self.settings = timers if timers is not None else TimerSettings()
        self.rfc6026 = rfc6026
        self.invite_trying_delay = invite_trying_delay
        self.timer_queue = TimerQueue()
        self._server: dict[tuple, ServerTransaction] = {}
        self._client: dict[tuple, ClientTransaction] = {}
        self._active = {kind: 0 for kind in _KINDS}
        self.stray_responses = 0
        self.invalid_messages = 0

    # -- counting --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._server) + len(self._client)

    def stats(self) -> dict[str, int]:
        """Active transactions by kind, live timers, and dropped-message counters."""
        counts = dict(self._active)
        counts["timers"] = len(self.timer_queue)
        counts["stray_responses"] = self.stray_responses
        counts["invalid_messages"] = self.invalid_messages
        return counts

    @property
    def server_transactions(self) -> list[ServerTransaction]:
        return list(self._server.values())

    @property
    def client_transactions(self) -> list[ClientTransaction]:
        return list(self._client.values())

    # -- server side -----------------------------------------------------------------
    def receive_request(
        self, request: SipRequest, flow: object, *, reliable: bool, now: float
    ) -> Events:
        """Match a request (§17.2.3) and run the matched transaction, or create one."""
        events: Events = []
        try:
            match = self._match_request(request)
        except _Unmatchable as exc:
            self.invalid_messages += 1
            return [InvalidMessage(request, str(exc))]
        if match is not None:
            match._on_request(request, now, events)
            return events
        if request.method == "ACK":
            events.append(RequestReceived(None, request))
            return events
        try:
            key = _server_key(request, request.method, _request_to_tag(request))
            matched_invite = (
                self.find_invite_for_cancel(request) if request.method == "CANCEL" else None
            )
        except _Unmatchable as exc:
            self.invalid_messages += 1
            return [InvalidMessage(request, str(exc))]
        tx: ServerTransaction
        if request.method == "INVITE":
            tx = InviteServerTransaction(self, key, request, flow, reliable, now)
        else:
            tx = NonInviteServerTransaction(self, key, request, flow, reliable, now)
        self._server[key] = tx
        self._active[_kind(tx)] += 1
        events.append(RequestReceived(tx, request, matched_invite))
        if isinstance(tx, InviteServerTransaction) and self.invite_trying_delay is not None:
            if self.invite_trying_delay <= 0:
                tx._send_trying(events)
            else:
                self._start_timer(tx, TIMER_TRYING, self.invite_trying_delay, now)
        return events

    def _match_request(self, request: SipRequest) -> ServerTransaction | None:
        via = _top_via(request)
        method = _key_method(request.method)
        if via.is_rfc3261_branch:
            return self._server.get(_rfc3261_server_key(via, method))
        if request.method != "ACK":
            return self._server.get(
                _rfc2543_server_key(request, via, method, _request_to_tag(request))
            )
        # RFC 2543 ACK: the INVITE's To tag was absent (initial INVITE) or equal to the
        # ACK's (re-INVITE); the ACK's To tag must equal that of the response sent.
        ack_tag = _request_to_tag(request)
        for invite_tag in (None, ack_tag) if ack_tag is not None else (None,):
            tx = self._server.get(_rfc2543_server_key(request, via, method, invite_tag))
            if tx is not None and _response_to_tag(tx.last_response) == ack_tag:
                return tx
        return None

    def find_invite_for_cancel(self, cancel: SipRequest) -> InviteServerTransaction | None:
        """The INVITE server transaction a CANCEL targets (§9.2): the §17.2.3 rules with
        the method taken as INVITE. Never raises."""
        try:
            key = _server_key(cancel, "INVITE", _request_to_tag(cancel))
        except _Unmatchable:
            return None
        tx = self._server.get(key)
        return tx if isinstance(tx, InviteServerTransaction) else None

    def send_response(
        self, transaction: ServerTransaction, response: SipResponse, now: float,
        *, stateless: bool = False,
    ) -> Events:
        """Send a response from the TU through its server transaction.

        On a terminated transaction a 2xx to an INVITE is still handed to the transport
        (the TU's own 2xx retransmissions, §13.3.1.4); anything else is dropped.
        ``stateless``: a final response to a non-INVITE request ends the transaction at
        once instead of absorbing retransmissions for Timer J — RFC 3261 §26.3.2.4's
        single stateless challenge to an unauthenticated request (a retransmission is then
        a new request and gets a new challenge).
        Raises TransactionStateError for a response the state forbids (a TU bug)."""
        events: Events = []
        if transaction.terminated:
            if isinstance(transaction, InviteServerTransaction) and 200 <= response.status < 300:
                transaction._send(response, events)
            return events
        if (stateless and response.status >= 200
                and isinstance(transaction, NonInviteServerTransaction)
                and transaction.state in (TransactionState.TRYING, TransactionState.PROCEEDING)):
            transaction.last_response = response
            transaction._send(response, events)
            self._terminate(transaction, events)
            return events
        transaction._on_response_from_tu(response, now, events)
        return events

    # -- client side -----------------------------------------------------------------
    def send_request(
        self, request: SipRequest, destination: object, *, reliable: bool, now: float
    ) -> tuple[ClientTransaction, Events]:
        """Start a client transaction; the request must carry a top Via with an RFC 3261
        branch (see `new_branch`). An ACK is not a transaction: the TU sends it directly."""
        if request.method == "ACK":
            raise ValueError("ACK starts no client transaction; send it through the transport")
        via = request.top_via
        if via is None or not via.is_rfc3261_branch:
            raise ValueError("a client request needs a top Via with an RFC 3261 branch")
        key = (via.branch, request.method)
        if key in self._client:
            raise ValueError(f"a client transaction with branch {via.branch} already exists")
        tx: ClientTransaction
        if request.method == "INVITE":
            tx = InviteClientTransaction(self, key, request, destination, reliable, now)
        else:
            tx = NonInviteClientTransaction(self, key, request, destination, reliable, now)
        self._client[key] = tx
        self._active[_kind(tx)] += 1
        events: Events = []
        tx._start(now, events)
        return tx, events

    def receive_response(self, response: SipResponse, *, now: float) -> Events:
        """Match a response to its client transaction (§17.1.3: top Via branch and CSeq
        method). A response matching nothing is dropped and counted."""
        try:
            via = _top_via(response)
            method = response.cseq.method
        except (_Unmatchable, ValueError) as exc:
            self.invalid_messages += 1
            return [InvalidMessage(response, str(exc))]
        tx = self._client.get((via.branch, method)) if via.branch else None
        if tx is None:
            if not self.rfc6026 and method == "INVITE" and 200 <= response.status < 300:
                return [ResponseReceived(None, response)]
            self.stray_responses += 1
            return []
        events: Events = []
        tx._on_response(response, now, events)
        return events

    def find_client_transaction(self, branch: str, method: str) -> ClientTransaction | None:
        return self._client.get((branch, method))

    # -- both ---------------------------------------------------------------------------
    def transport_error(self, transaction: Transaction, now: float) -> Events:
        """The transport could not send for this transaction: inform the TU, terminate."""
        if transaction.terminated:
            return []
        events: Events = [TransportFailed(transaction)]
        self._terminate(transaction, events)
        return events

    def next_deadline(self) -> float | None:
        return self.timer_queue.next_deadline()

    def on_timer(self, now: float) -> Events:
        """Fire every timer due at `now`, in deadline order."""
        events: Events = []
        queue = self.timer_queue
        while (handle := queue.pop_next_due(now)) is not None:
            tx = handle.owner
            assert isinstance(tx, Transaction)
            if tx._timers.get(handle.name) is handle:
                del tx._timers[handle.name]
            if tx.terminated:
                continue
            tx._on_timer(handle.name, now, events)
        return events

    # -- internals used by the transactions ----------------------------------------------
    def _start_timer(self, tx: Transaction, name: str, delay: float, now: float) -> None:
        old = tx._timers.get(name)
        if old is not None:
            self.timer_queue.cancel(old)
        tx._timers[name] = self.timer_queue.schedule(now + delay, tx, name)

    def _stop_timer(self, tx: Transaction, name: str) -> None:
        handle = tx._timers.pop(name, None)
        if handle is not None:
            self.timer_queue.cancel(handle)

    def _terminate(self, tx: Transaction, events: Events) -> None:
        if tx.terminated:
            return
        tx.state = TransactionState.TERMINATED
        for handle in tx._timers.values():
            self.timer_queue.cancel(handle)
        tx._timers.clear()
        table: dict = self._server if isinstance(tx, ServerTransaction) else self._client
        if table.get(tx.key) is tx:
            del table[tx.key]
            self._active[_kind(tx)] -= 1
        events.append(TransactionTerminated(tx))


__all__ = [
    "MAGIC_COOKIE",
    "ClientTransaction",
    "Events",
    "InvalidMessage",
    "InviteClientTransaction",
    "InviteServerTransaction",
    "NonInviteClientTransaction",
    "NonInviteServerTransaction",
    "RequestReceived",
    "ResponseReceived",
    "SendMessage",
    "ServerTransaction",
    "Transaction",
    "TransactionEvent",
    "TransactionLayer",
    "TransactionState",
    "TransactionStateError",
    "TransactionTerminated",
    "TransactionTimedOut",
    "TransportFailed",
    "build_ack_for_non_2xx",
    "new_branch",
]

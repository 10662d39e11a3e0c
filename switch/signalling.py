"""The SIP signalling core of the switch: transports → parser → transactions → services.

It owns the I/O around the sans-I/O protocol code: one asyncio timer drives the
transaction layer's single timer queue; received bytes are parsed (bad ones are
answered 400 with a reason where possible, counted and logged, never raised);
new requests are checked (method, URI scheme, Require, domain) and handed to the
service registered for their method. Responses go back on the flow the request
came on (symmetric response routing, RFC 3581), which is what phones behind NAT
need.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from sip.grammar import split_top_level
from sip.message import SipRequest, SipResponse, make_response
from sip.parser import SipParseError, parse_message_safe
from sip.timers import TimerSettings
from sip.transaction import (
    InvalidMessage,
    RequestReceived,
    ResponseReceived,
    SendMessage,
    ServerTransaction,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
)
from sip.transport import Flow, TransportLayer
from sip.validation import Rejection, check_request

from .metrics import SwitchMetrics, method_label

log = structlog.get_logger("switch.signalling")

# Retry-After of a request shed under overload: spread so phones do not return together
SHED_RETRY_AFTER_S = (5, 15)

# the headers a shed REGISTER's 503 copies (RFC 3261 §8.2.6.2), by raw name and compact form
_SHED_COPIED = {b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From", b"to": b"To",
                b"t": b"To", b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq"}
_SHED_REQUIRED = frozenset(_SHED_COPIED.values())

# Transports whose every unit (datagram, WebSocket message) is exactly one SIP message.
MESSAGE_FRAMED_TRANSPORTS = frozenset({"udp", "ws", "wss"})

RequestHandler = Callable[[SipRequest, Flow, float], Awaitable[SipResponse]]
# A service that answers by itself (several responses, e.g. INVITE): gets the transaction.
TransactionHandler = Callable[[SipRequest, ServerTransaction], None]
# Receives every response of a client transaction; None means it timed out / failed.
ResponseListener = Callable[[SipResponse | None], None]


def should_shed(fraction: float) -> bool:
    """Whether to refuse one new request when ``fraction`` of new work is being shed."""
    return fraction > 0.0 and (fraction >= 1.0 or random.random() < fraction)


class RequestTimeout(Exception):
    """A request the switch sent got no final response (Timer B/F) or could not be sent."""


class SignallingCore:
    def __init__(
        self,
        metrics: SwitchMetrics,
        *,
        max_message_size: int = 65535,
        server_header: str = "softswitch",
        is_local_domain: Callable[[str], bool] = lambda host: True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        timers: TimerSettings | None = None,
    ) -> None:
        self.metrics = metrics
        self.server_header = server_header
        self.is_local_domain = is_local_domain
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_message_size = max_message_size
        self.transports = TransportLayer(
            self._on_message, max_message_size=max_message_size, on_event=self._on_transport_event
        )
        self.transactions = TransactionLayer(timers)
        # read when scraped: setting the gauge after every message cost a lock per message
        metrics.transactions_active.set_function(lambda: len(self.transactions))
        self.handlers: dict[str, RequestHandler] = {}
        self._eager: set[str] = set()  # methods whose handlers start eagerly
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._listeners: dict[object, ResponseListener] = {}
        # Services that manage their own transactions (call control).
        self.invite_handler: TransactionHandler | None = None
        self.dialog_handler: TransactionHandler | None = None
        self.cancel_handler: Callable[[SipRequest, ServerTransaction, object], None] | None = None
        self.ack_handler: Callable[[SipRequest], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        # handler coroutines started eagerly and waiting on a future (see _start_eagerly)
        self._suspended: set[Coroutine[Any, Any, None]] = set()
        self.closing = False
        # the share of new registrations (and other out-of-dialog requests but OPTIONS)
        # answered 503 with Retry-After, set by Softswitch._watch_overload
        self.shed_fraction = 0.0

    # -- lifecycle -------------------------------------------------------------------
    async def listen(
        self, transport: str, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
        *, path: str = "/",
    ) -> tuple[str, int]:
        """Listen for SIP: udp, tcp, tls (needs ssl_context), ws or wss (RFC 7118; wss
        needs ssl_context; `path` is the HTTP path the WebSocket upgrade is served on)."""
        return await self.transports.listen(transport, host, port, ssl_context, path=path)

    @property
    def overloaded(self) -> bool:
        return self.shed_fraction > 0.0

    @overloaded.setter
    def overloaded(self, value: bool) -> None:
        """Shed all new work (True) or none (False)."""
        self.shed_fraction = 1.0 if value else 0.0

    def _shed(self) -> bool:
        return should_shed(self.shed_fraction)

    def register_handler(self, method: str, handler: RequestHandler, *,
                         eager: bool = False) -> None:
        """Serve a method. ``eager``: the handler runs at once in the receive callback up
        to its first wait, as most answer without waiting (see `_start_eagerly`); leave it
        off for a handler that may await code needing a task around it (redis-py's
        timeouts use ``asyncio.timeout``, which refuses to run outside a task)."""
        self.handlers[method] = handler
        if eager:
            self._eager.add(method)
        else:
            self._eager.discard(method)

    @property
    def allowed_methods(self) -> set[str]:
        methods = set(self.handlers) | {"ACK", "CANCEL"}
        if self.invite_handler is not None:
            methods |= {"INVITE", "BYE", "UPDATE", "INFO", "REFER", "NOTIFY"}
        return methods

    async def close(self) -> None:
        self.closing = True
        if self._timer:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for coro in list(self._suspended):
            coro.close()
        self._suspended.clear()
        await self.transports.close()

    # -- receive path ------------------------------------------------------------------
    def _on_transport_event(self, kind: str, flow: Flow, detail: str) -> None:
        self.metrics.transport_events.labels(flow.transport, kind).inc()
        if kind in ("oversize", "bad_framing", "error"):
            log.info("transport.event", kind=kind, transport=flow.transport,
                     remote=f"{flow.remote[0]}:{flow.remote[1]}", detail=detail)

    def _on_message(self, data: bytes, flow: Flow) -> None:
        try:
            self._receive(data, flow)
        except Exception:  # the receive path must never raise into the transport
            log.exception("sip.receive_failed", transport=flow.transport,
                          remote=f"{flow.remote[0]}:{flow.remote[1]}")

    def _receive(self, data: bytes, flow: Flow) -> None:
        if self.shed_fraction and data.startswith(b"REGISTER ") and self._shed_early(data, flow):
            return
        # a UDP datagram and a WebSocket message (RFC 7118 §5.3) each hold one whole
        # message: Content-Length is optional there (still checked when present)
        message = parse_message_safe(
            data, max_size=self.max_message_size,
            datagram=flow.transport in MESSAGE_FRAMED_TRANSPORTS,
        )
        now = self.clock()
        if isinstance(message, SipParseError):
            self._bad_message(message, flow)
            return
        if isinstance(message, SipResponse):
            self.metrics.message_in(message.cseq.method, message.status)
            self._process(self.transactions.receive_response(message, now=now))
            return
        self.metrics.message_in(message.method, None)
        _stamp_via(message, flow)
        self._process(
            self.transactions.receive_request(
                message, flow, reliable=flow.transport != "udp", now=now
            )
        )

    def _shed_early(self, data: bytes, flow: Flow) -> bool:
        """Past saturation, a share of new REGISTERs (without credentials: one carrying
        them completes a registration already challenged) is answered 503 with Retry-After
        straight from its raw header lines. Shedding after the full parse saved little:
        parsing is most of what a request costs. Anything unusual (folding, a missing
        header) goes the normal way."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = data[:end]
        if b"\nauthorization" in head.lower() or not self._shed():
            return False
        copied: list[bytes] = []
        seen: set[bytes] = set()
        for line in head.split(b"\r\n")[1:]:
            if line[:1] in (b" ", b"\t"):
                return False  # folded: leave it to the parser
            name, colon, value = line.partition(b":")
            key = _SHED_COPIED.get(name.strip().lower())
            if not colon or key is None:
                continue
            if key == b"To" and b";tag=" not in value.replace(b" ", b"").lower():
                line += b";tag=" + secrets.token_hex(6).encode()
            copied.append(line)
            seen.add(key)
        if len(seen) != len(_SHED_REQUIRED):
            return False
        retry_after = random.randint(*SHED_RETRY_AFTER_S)
        response = b"\r\n".join([
            b"SIP/2.0 503 Overloaded, try again later", *copied,
            b"Retry-After: %d" % retry_after, b"Server: " + self.server_header.encode(),
            b"Content-Length: 0", b"", b""])
        self.metrics.message_in("REGISTER", None)
        self.metrics.sip_requests_rejected.labels("REGISTER", "503").inc()
        self.metrics.message_out("REGISTER", 503)
        self.transports.send(response, flow)
        return True

    def _bad_message(self, error: SipParseError, flow: Flow) -> None:
        answered = error.can_respond
        self.metrics.sip_parse_errors.labels(flow.transport, str(answered).lower()).inc()
        log.info("sip.parse_error", reason=error.reason, status=error.status,
                 transport=flow.transport, remote=f"{flow.remote[0]}:{flow.remote[1]}",
                 answered=answered)
        if answered:
            response = make_response(
                error.headers, error.status, error.reason, to_tag=secrets.token_hex(6),
                headers=[("Server", self.server_header)],
            )
            self._send(response, flow)

    # -- transaction events --------------------------------------------------------------
    def _process(self, events: list) -> None:
        for event in events:
            if isinstance(event, SendMessage):
                self._send(event.message, event.flow)
            elif isinstance(event, RequestReceived):
                self._new_request(event.transaction, event.request, event.matched_invite)
            elif isinstance(event, ResponseReceived):
                listener = self._listeners.get(event.transaction)
                if listener is not None:
                    self._notify(listener, event.response)
            elif isinstance(event, TransactionTimedOut | TransportFailed):
                listener = self._listeners.pop(event.transaction, None)
                if listener is not None:
                    self._notify(listener, None)
            elif isinstance(event, TransactionTerminated):
                self._listeners.pop(event.transaction, None)
            elif isinstance(event, InvalidMessage):
                self.metrics.sip_parse_errors.labels("any", "false").inc()
                log.info("sip.unmatchable_message", reason=event.reason)
        self._rearm_timer()

    def _send(self, message: SipRequest | SipResponse, flow: Flow) -> None:
        if isinstance(message, SipResponse):
            self.metrics.message_out(message.cseq.method, message.status)
        else:
            self.metrics.message_out(message.method, None)
        if not self.transports.send(message.to_bytes(), flow):
            log.info("sip.send_failed", transport=flow.transport,
                     remote=f"{flow.remote[0]}:{flow.remote[1]}")

    def _rearm_timer(self) -> None:
        deadline = self.transactions.next_deadline()
        if deadline == self._timer_deadline:
            return
        if (deadline is not None and self._timer is not None
                and self._timer_deadline is not None and self._timer_deadline <= deadline):
            # the armed timer fires first: it runs what is due then and arms the next
            # one (re-arming on every new, later transaction timer churned loop handles)
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None and not self.closing:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - self.clock())
            self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        try:
            self._process(self.transactions.on_timer(self.clock()))
        except Exception:
            log.exception("sip.timer_failed")
            self._rearm_timer()

    # -- requests to services -------------------------------------------------------------
    @staticmethod
    def _notify(listener: ResponseListener, response: SipResponse | None) -> None:
        try:
            listener(response)
        except Exception:
            log.exception("sip.response_listener_failed")

    def _new_request(
        self, transaction: ServerTransaction | None, request: SipRequest, matched_invite=None
    ) -> None:
        if transaction is None:
            # an ACK for a 2xx (or a stray one): the dialog's owner takes it
            if self.ack_handler is not None:
                self.ack_handler(request)
            return
        if request.method == "CANCEL":
            if self.cancel_handler is not None and matched_invite is not None:
                self.cancel_handler(request, transaction, matched_invite)
                return
            self.respond(transaction, make_response(
                request, 481, "No matching transaction", to_tag=secrets.token_hex(6),
                headers=[("Server", self.server_header)]))
            return
        rejection = check_request(request, allowed_methods=self.allowed_methods)
        if rejection is None:
            uri = request.request_uri
            host = getattr(uri, "host", None)
            if host is not None and not self.is_local_domain(host):
                rejection = Rejection(404, "Domain not served here")
        if rejection is not None:
            self.metrics.sip_requests_rejected.labels(
                method_label(request.method), str(rejection.status),
            ).inc()
            log.info("sip.request_refused", call_id=request.call_id, method=request.method,
                     status=rejection.status, reason=rejection.reason,
                     source=f"{transaction.flow.remote[0]}:{transaction.flow.remote[1]}")
            self.respond(transaction, make_response(
                request, rejection.status, rejection.reason, to_tag=secrets.token_hex(6),
                headers=[("Server", self.server_header), *rejection.headers]))
            return
        if request.to.tag is not None and request.method not in ("REGISTER", "OPTIONS"):
            if self.dialog_handler is not None:
                self.dialog_handler(request, transaction)
            else:
                self.respond(transaction, make_response(
                    request, 481, "No such dialog", headers=[("Server", self.server_header)]))
            return
        if request.method == "INVITE" and self.invite_handler is not None:
            self.invite_handler(request, transaction)
            return
        handler = self.handlers.get(request.method)
        if (handler is not None and request.method != "OPTIONS" and self.shed_fraction
                and request.header("Authorization") is None and self._shed()):
            # past saturation new registrations are shed at once, statelessly, with a
            # spread-out Retry-After: the processor stays with the calls in progress and
            # emergency calls, and phones come back later instead of retransmitting into
            # a queue that no longer drains (OPTIONS, cheap, still tells peers we live)
            self.metrics.sip_requests_rejected.labels(method_label(request.method),
                                                      "503").inc()
            self.respond(transaction, make_response(
                request, 503, "Overloaded, try again later", to_tag=secrets.token_hex(6),
                headers=[("Server", self.server_header),
                         ("Retry-After", str(random.randint(*SHED_RETRY_AFTER_S)))]),
                stateless=True)
            return
        if handler is None:
            self.respond(transaction, make_response(
                request, 405, "Method Not Allowed outside a dialog", to_tag=secrets.token_hex(6),
                headers=[("Server", self.server_header),
                         ("Allow", ", ".join(sorted(self.allowed_methods)))]))
            return
        if request.method in self._eager:
            self._start_eagerly(self._run_handler(handler, transaction, request))
            return
        task = asyncio.get_running_loop().create_task(
            self._run_handler(handler, transaction, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_eagerly(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a handler coroutine at once, in its own context, up to its first real wait;
        only a handler that waits (a Redis store, a DNS lookup...) becomes a task. Most
        answer without waiting, and a task per request cost a loop turn and ~10 µs."""
        context = contextvars.copy_context()
        try:
            waiting_for = context.run(coro.send, None)
        except StopIteration:
            return
        except Exception:  # _run_handler answers 500 itself: this is a last resort
            log.exception("sip.handler_failed")
            return
        loop = asyncio.get_running_loop()
        self._suspended.add(coro)

        def resume(_future: object = None) -> None:
            # the coroutine carries on from its wait; Task re-sends into it, and the
            # future it waited for is done by now
            self._suspended.discard(coro)
            if self.closing:
                coro.close()
                return
            task = loop.create_task(coro, context=context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if waiting_for is None:  # a bare yield (asyncio.sleep(0)): just the next turn
            loop.call_soon(resume)
            return
        waiting_for._asyncio_future_blocking = False
        waiting_for.add_done_callback(resume)

    async def _run_handler(self, handler: RequestHandler, transaction, request) -> None:
        structlog.contextvars.bind_contextvars(call_id=request.call_id)
        try:
            response = await handler(request, transaction.flow, self.wall_clock())
        except Exception:
            log.exception("sip.handler_failed", method=request.method)
            response = make_response(
                request, 500, "Internal error while handling the request",
                to_tag=secrets.token_hex(6), headers=[("Server", self.server_header)])
        finally:
            structlog.contextvars.unbind_contextvars("call_id")
        if response is not None:
            self.respond(transaction, response)

    def respond(self, transaction: ServerTransaction, response: SipResponse,
                *, stateless: bool = False) -> None:
        """Send a response in its server transaction. A digest challenge to a request
        outside an INVITE is always sent statelessly (RFC 3261 §26.3.2.4): no transaction
        is kept for Timer J per unauthenticated request; ``stateless`` does the same for
        another final response (overload shedding)."""
        stateless = stateless or response.status in (401, 407)
        self._process(self.transactions.send_response(
            transaction, response, now=self.clock(), stateless=stateless))

    # -- requests the switch sends -----------------------------------------------------------
    def start_request(self, request: SipRequest, flow: Flow, listener: ResponseListener):
        """Send a request on a flow in a client transaction; `listener` gets every
        response, then None if the transaction times out or the transport fails.
        Returns the client transaction."""
        transaction, events = self.transactions.send_request(
            request, flow, reliable=flow.transport != "udp", now=self.clock()
        )
        self._listeners[transaction] = listener
        self._process(events)
        return transaction

    def send_stateless(self, message: SipRequest | SipResponse, flow: Flow) -> None:
        """Send outside any transaction: an ACK for a 2xx, or a 2xx retransmission."""
        self._send(message, flow)

    async def request(self, request: SipRequest, flow: Flow) -> SipResponse:
        """Send a request in a client transaction and wait for its final response;
        RequestTimeout when none comes (Timer B/F) or the transport failed."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()

        def listener(response: SipResponse | None) -> None:
            if future.done():
                return
            if response is None:
                future.set_exception(RequestTimeout("no final response"))
            elif response.status >= 200:
                future.set_result(response)

        self.start_request(request, flow, listener)
        return await future


def _stamp_via(request: SipRequest, flow: Flow) -> None:
    """Record where the request really came from in its top Via: `received` when the
    source address differs from sent-by, `rport` filled in when asked (RFC 3581)."""
    via = request.top_via
    source_host, source_port = flow.remote
    changed = False
    if "rport" in via.params and via.params["rport"] is None:
        via.params["rport"] = str(source_port)
        changed = True
    if via.host.strip("[]") != source_host or changed:
        via.params["received"] = source_host
        changed = True
    if not changed:
        return
    # Rewrite the first Via header line with the updated top value.
    for index, (name, value) in enumerate(request.headers):
        if name == "Via":
            values = split_top_level(value, ",")
            request.headers[index] = ("Via", ", ".join([str(via), *values[1:]]))
            break
    request._cache.pop("vias", None)

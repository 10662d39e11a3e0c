"""SIP over WebSocket and secure WebSocket (RFC 7118): the transport of browser softphones.

A WebSocket listener is an HTTP(S) server (aiohttp) that upgrades requests on one path
to WebSocket connections, accepting only clients that offer the ``sip`` subprotocol
(RFC 7118 §4.1: any other handshake is refused with 400 before a connection exists).
Each text or binary WebSocket message carries exactly one SIP message (§5.3), so no
Content-Length framing is needed; the parser still checks one when present.

Every accepted connection gets a :class:`~sip.transport.base.Flow` with transport
``"ws"`` or ``"wss"`` and its own connection id: responses and requests to the device
(a browser is never reachable by a new connection, §5.2) go back on that connection.
When it closes, the flow is dead: sending on it returns False.

Outgoing messages are queued per connection and written by one task in order; they go
as text frames when they are valid UTF-8 (what browser SIP stacks expect), else binary.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Final

from aiohttp import WSMsgType, web

from sip.transport.base import (
    EVENT_CONNECTION_CLOSED,
    EVENT_CONNECTION_OPENED,
    EVENT_ERROR,
    EVENT_IDLE_TIMEOUT,
    EVENT_KEEPALIVE,
    EVENT_OVERSIZE,
    EventSink,
    Flow,
    MessageHandler,
    bind_socket,
    host_port,
)

__all__ = [
    "SIP_SUBPROTOCOL",
    "WEBSOCKET_TRANSPORTS",
    "WS",
    "WSS",
    "WebSocketConnection",
    "WebSocketTransports",
]

WS: Final = "ws"
WSS: Final = "wss"
WEBSOCKET_TRANSPORTS: Final = frozenset({WS, WSS})
SIP_SUBPROTOCOL: Final = "sip"  # RFC 7118 §4.1, registered in the IANA subprotocol registry

# A peer that does not read what we send is cut off rather than eating memory.
MAX_QUEUED_BYTES: Final = 8 * 1024 * 1024
_LISTEN_BACKLOG: Final = 1024
_CLOSE_GRACE: Final = 1.0
_PONG: Final = "\r\n"
_GOING_AWAY: Final = 1001  # WebSocket close code: the server is shutting down
_NO_ADDRESS: Final = ("", 0)


class WebSocketConnection:
    """One accepted SIP-over-WebSocket connection: delivers messages, sends in order."""

    def __init__(
        self,
        transports: WebSocketTransports,
        websocket: web.WebSocketResponse,
        flow: Flow,
    ) -> None:
        self._transports = transports
        self._websocket = websocket
        self.flow = flow
        self.connection_id: int = flow.connection_id or 0
        self._outbox: asyncio.Queue[tuple[str | bytes, int] | None] = asyncio.Queue()
        self._queued_bytes = 0
        self._loop = asyncio.get_running_loop()
        self.last_activity = self._loop.time()
        self._close_reason: str | None = None
        self._closing = False

    @property
    def is_open(self) -> bool:
        return not self._closing and not self._websocket.closed

    def send(self, data: bytes) -> bool:
        """Queue one SIP message; False when the connection is closed or not reading."""
        if not self.is_open:
            return False
        if self._queued_bytes + len(data) > MAX_QUEUED_BYTES:
            self._transports.events(
                EVENT_ERROR, self.flow,
                f"peer not reading: over {MAX_QUEUED_BYTES} bytes queued; closing",
            )  # fmt: skip
            self.close("peer not reading")
            return False
        frame: str | bytes
        try:
            frame = data.decode("utf-8")
        except UnicodeDecodeError:
            frame = data
        self._queued_bytes += len(data)
        self._outbox.put_nowait((frame, len(data)))
        self.last_activity = self._loop.time()
        return True

    def close(self, reason: str) -> None:
        """Close after what is queued has been written (the writer sends the close)."""
        if self._closing:
            return
        self._closing = True
        self._close_reason = self._close_reason or reason
        self._outbox.put_nowait(None)

    async def run(self) -> None:
        """Serve the connection until it closes: read messages, write the queue."""
        writer = asyncio.ensure_future(self._write_queued())
        try:
            await self._read_messages()
        finally:
            self._closing = True
            self._outbox.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(writer), _CLOSE_GRACE)
            except (TimeoutError, asyncio.CancelledError):
                writer.cancel()
            if not self._websocket.closed:
                await self._close_websocket()

    async def _read_messages(self) -> None:
        events = self._transports.events
        idle_timeout = self._transports.idle_timeout
        websocket = self._websocket
        while not websocket.closed and not self._closing:
            timeout = None
            if idle_timeout > 0:
                timeout = max(0.01, self.last_activity + idle_timeout - self._loop.time())
            try:
                message = await websocket.receive(timeout=timeout)
            except TimeoutError:
                idle_for = self._loop.time() - self.last_activity
                if idle_for >= idle_timeout:
                    events(EVENT_IDLE_TIMEOUT, self.flow, f"idle for {idle_for:.1f} s")
                    self._close_reason = f"idle timeout ({idle_timeout:g} s)"
                    return
                continue
            self.last_activity = self._loop.time()
            if message.type == WSMsgType.TEXT:
                self._deliver(message.data.encode("utf-8"))
            elif message.type == WSMsgType.BINARY:
                self._deliver(message.data)
            elif message.type == WSMsgType.ERROR:
                detail = repr(websocket.exception() or message.data)
                kind = EVENT_OVERSIZE if "exceeds limit" in detail else EVENT_ERROR
                events(kind, self.flow, f"WebSocket error: {detail}")
                self._close_reason = f"WebSocket error: {detail}"
                return
            elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                self._close_reason = self._close_reason or "closed by peer"
                return

    def _deliver(self, data: bytes) -> None:
        events = self._transports.events
        if len(data) > self._transports.max_message_size:
            events(
                EVENT_OVERSIZE, self.flow,
                f"message of {len(data)} bytes exceeds {self._transports.max_message_size};"
                " dropped",
            )  # fmt: skip
            return
        if not data.strip(b"\r\n"):
            # not in RFC 7118 (WebSocket has its own ping), but some browser SIP stacks
            # send RFC 5626 CRLF keep-alives: answer a double CRLF with a single one
            if data.count(b"\n") >= 2:
                self.send(_PONG.encode())
            events(EVENT_KEEPALIVE, self.flow, "CRLF keep-alive over WebSocket")
            return
        try:
            self._transports.on_message(data, self.flow)
        except Exception as exc:
            events(EVENT_ERROR, self.flow, f"message handler failed: {exc!r}")

    async def _write_queued(self) -> None:
        websocket = self._websocket
        while True:
            queued = await self._outbox.get()
            if queued is None:
                break
            frame, size = queued
            self._queued_bytes -= size
            try:
                if isinstance(frame, str):
                    await websocket.send_str(frame)
                else:
                    await websocket.send_bytes(frame)
            except Exception as exc:  # connection reset, closing transport
                if not self._closing:
                    self._transports.events(EVENT_ERROR, self.flow, f"write failed: {exc!r}")
                self._closing = True
                self._close_reason = self._close_reason or f"write failed: {exc!r}"
                break
            self.last_activity = self._loop.time()
        if self._closing and not websocket.closed:
            await self._close_websocket()

    async def _close_websocket(self) -> None:
        try:
            await asyncio.wait_for(
                self._websocket.close(code=_GOING_AWAY, message=b"closing"), _CLOSE_GRACE
            )
        except Exception:  # already gone: nothing left to tell the peer
            pass

    @property
    def close_reason(self) -> str:
        return self._close_reason or "closed"


class WebSocketTransports:
    """The WS and WSS listeners and accepted connections of one transport layer."""

    def __init__(
        self,
        on_message: MessageHandler,
        events: EventSink,
        *,
        max_message_size: int,
        allocate_connection_id: Callable[[], int],
        idle_timeout: float = 0.0,
    ) -> None:
        self.on_message = on_message
        self.events = events
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self._allocate_connection_id = allocate_connection_id
        self._connections: dict[int, WebSocketConnection] = {}
        self._runners: list[tuple[str, tuple[str, int], web.AppRunner]] = []

    # -- listening ---------------------------------------------------------------------
    async def listen(
        self,
        transport: str,
        family: socket.AddressFamily,
        address: tuple[object, ...],
        ssl_context: ssl.SSLContext | None,
        path: str = "/",
    ) -> tuple[str, int]:
        """Serve WebSocket upgrades on ``path``; returns the bound (host, port)."""
        if transport not in WEBSOCKET_TRANSPORTS:
            raise ValueError(f"not a WebSocket transport: {transport!r}")
        if transport == WSS and ssl_context is None:
            raise ValueError("a WSS listener needs an ssl_context (see make_server_ssl_context)")
        if transport == WS and ssl_context is not None:
            raise ValueError("a WS listener takes no ssl_context (use wss for TLS)")
        if not path.startswith("/"):
            raise ValueError(f"WebSocket path must start with '/': {path!r}")
        application = web.Application()
        application.router.add_get(path, self._make_handler(transport))
        runner = web.AppRunner(application, access_log=None, handle_signals=False)
        await runner.setup()
        sock = bind_socket(family, socket.SOCK_STREAM, address, reuse_address=True)
        try:
            sock.listen(_LISTEN_BACKLOG)
            site = web.SockSite(runner, sock, ssl_context=ssl_context, backlog=_LISTEN_BACKLOG)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        bound = host_port(sock.getsockname())
        self._runners.append((transport, bound, runner))
        return bound

    def listeners(self) -> list[tuple[str, str, int]]:
        return [(transport, bound[0], bound[1]) for transport, bound, _ in self._runners]

    def _make_handler(self, transport: str):
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._accept(transport, request)

        return handle

    async def _accept(self, transport: str, request: web.Request) -> web.StreamResponse:
        websocket = web.WebSocketResponse(
            protocols=(SIP_SUBPROTOCOL,),
            max_msg_size=self.max_message_size,  # a larger message closes the connection
            autoping=True,
        )
        offered = {
            name.strip().lower()
            for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for name in value.split(",")
        }
        if SIP_SUBPROTOCOL not in offered:
            # RFC 7118 §4.1: the "sip" subprotocol is mandatory on both sides
            return web.Response(
                status=400, text="SIP over WebSocket needs the 'sip' WebSocket subprotocol"
            )
        readiness = websocket.can_prepare(request)
        if not readiness.ok or readiness.protocol != SIP_SUBPROTOCOL:
            return web.Response(status=400, text="SIP over WebSocket: not a WebSocket upgrade")
        transport_info = request.transport
        if transport_info is None:
            return web.Response(status=400, text="connection already gone")
        local = host_port(transport_info.get_extra_info("sockname") or _NO_ADDRESS)
        remote = host_port(transport_info.get_extra_info("peername") or _NO_ADDRESS)
        await websocket.prepare(request)
        connection_id = self._allocate_connection_id()
        flow = Flow(transport, local, remote, connection_id)
        connection = WebSocketConnection(self, websocket, flow)
        self._connections[connection_id] = connection
        self.events(EVENT_CONNECTION_OPENED, flow, "accepted")
        try:
            await connection.run()
        except Exception as exc:
            self.events(EVENT_ERROR, flow, f"WebSocket connection failed: {exc!r}")
        finally:
            self._connections.pop(connection_id, None)
            self.events(EVENT_CONNECTION_CLOSED, flow, connection.close_reason)
        return websocket

    # -- sending -----------------------------------------------------------------------
    def connection(self, connection_id: int) -> WebSocketConnection | None:
        return self._connections.get(connection_id)

    def connections(self) -> list[WebSocketConnection]:
        return list(self._connections.values())

    def open_connection_to(
        self, transport: str, remote: tuple[str, int], local: tuple[str, int] | None = None
    ) -> WebSocketConnection | None:
        """The newest open connection from ``remote``, preferring one on ``local``."""
        fallback = None
        for connection in reversed(self._connections.values()):
            flow = connection.flow
            if flow.transport != transport or flow.remote != remote or not connection.is_open:
                continue
            if local is None or flow.local == local:
                return connection
            fallback = fallback or connection
        return fallback

    def send(self, data: bytes, flow: Flow) -> bool:
        """On the flow's connection while open, else an open one from the same remote."""
        if flow.connection_id is not None:
            connection = self._connections.get(flow.connection_id)
            if connection is not None and connection.flow.transport == flow.transport:
                return connection.send(data)
        connection = self.open_connection_to(flow.transport, flow.remote, flow.local)
        if connection is None:
            return False
        return connection.send(data)

    def send_to(self, data: bytes, transport: str, remote: tuple[str, int]) -> Flow | None:
        """Send on an open connection from ``remote``: the switch never dials a WebSocket
        client (RFC 7118 §5.2), so None when the device has no connection open."""
        connection = self.open_connection_to(transport, remote)
        if connection is None or not connection.send(data):
            return None
        return connection.flow

    # -- shutdown ----------------------------------------------------------------------
    async def close(self) -> None:
        connections = self.connections()
        for connection in connections:
            connection.close("transport layer closing")
        for _, _, runner in self._runners:
            try:
                await asyncio.wait_for(runner.cleanup(), 2 * _CLOSE_GRACE)
            except (TimeoutError, Exception):
                pass
        self._runners.clear()

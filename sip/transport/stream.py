"""SIP over TCP and TLS: framed by Content-Length, connections registered for reuse.

Every accepted or opened connection is a :class:`StreamConnection` with its own
:class:`~sip.transport.framing.StreamFramer`. Connections are kept in a registry so
responses go back on the connection the request came in on (RFC 3261 §18.2.2) and
requests to a remote reuse an open connection to it.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl
from os import PathLike
from typing import Final, cast

from sip.transport.base import (
    EVENT_CONNECT_FAILED,
    EVENT_CONNECTION_CLOSED,
    EVENT_CONNECTION_OPENED,
    EVENT_ERROR,
    EVENT_IDLE_TIMEOUT,
    EVENT_KEEPALIVE,
    TLS,
    EventSink,
    Flow,
    MessageHandler,
    bind_socket,
    host_port,
)
from sip.transport.framing import FramingError, KeepAlive, StreamFramer

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_WRITE_BUFFER",
    "StreamConnection",
    "StreamTransports",
    "make_client_ssl_context",
    "make_server_ssl_context",
]

DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
# A peer that does not read what we send is cut off rather than eating memory.
MAX_WRITE_BUFFER: Final = 8 * 1024 * 1024
_LISTEN_BACKLOG: Final = 1024
_CLOSE_GRACE: Final = 1.0
_PONG: Final = b"\r\n"

StrPath = str | PathLike[str]
_RemoteKey = tuple[str, tuple[str, int]]  # (transport, remote)


def make_server_ssl_context(
    certificate: StrPath,
    private_key: StrPath,
    *,
    cafile: StrPath | None = None,
    require_client_certificate: bool = False,
) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``cafile`` client certificates are verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if cafile is not None:
        context.load_verify_locations(cafile)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return context


def make_client_ssl_context(
    verify: bool,
    cafile: StrPath | None = None,
    *,
    certificate: StrPath | None = None,
    private_key: StrPath | None = None,
) -> ssl.SSLContext:
    """A TLS 1.2+ client context.

    ``verify`` checks the server certificate chain and name, against ``cafile`` if
    given, else the system trust store. ``certificate``/``private_key`` present a
    client certificate (mutual TLS towards trunks that ask for it).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if cafile is not None:
            context.load_verify_locations(cafile)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        context.load_cert_chain(certificate, private_key)
    return context


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, accepted or opened; read the same way either way."""

    def __init__(
        self, transports: StreamTransports, transport_name: str, *, accepted: bool
    ) -> None:
        self._transports = transports
        self.transport_name = transport_name
        self.accepted = accepted
        self.connection_id = transports.allocate_connection_id()
        self.flow: Flow | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._framer = StreamFramer(transports.max_message_size)
        self._loop = asyncio.get_running_loop()
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._close_reason: str | None = None

    # asyncio.Protocol callbacks: none of them lets an exception escape.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        events = self._transports.events
        try:
            local = host_port(transport.get_extra_info("sockname"))
            remote = host_port(transport.get_extra_info("peername"))
            self.flow = Flow(self.transport_name, local, remote, self.connection_id)
            self._last_activity = self._loop.time()
            self._transports.register(self)
            self._arm_idle_timer(self._transports.idle_timeout)
            events(EVENT_CONNECTION_OPENED, self.flow, "accepted" if self.accepted else "connected")
        except Exception as exc:
            events(EVENT_ERROR, self._flow_or_placeholder(), f"connection setup failed: {exc!r}")
            self._abort(f"setup failed: {exc!r}")

    def data_received(self, data: bytes) -> None:
        flow = self.flow
        if flow is None:
            return
        events = self._transports.events
        try:
            self._last_activity = self._loop.time()
            items = self._framer.feed(data)
        except Exception as exc:
            events(EVENT_ERROR, flow, f"framing failed: {exc!r}")
            self._abort(f"framing failed: {exc!r}")
            return
        on_message = self._transports.on_message
        for item in items:
            if type(item) is bytes:
                try:
                    on_message(item, flow)
                except Exception as exc:
                    events(EVENT_ERROR, flow, f"message handler failed: {exc!r}")
            elif isinstance(item, KeepAlive):
                self._write(_PONG)
                events(EVENT_KEEPALIVE, flow, "CRLF ping answered with CRLF pong")
            elif isinstance(item, FramingError):
                events(item.kind, flow, item.reason)
                self.close(f"{item.kind}: {item.reason}")
                return

    def eof_received(self) -> bool | None:
        self._close_reason = self._close_reason or "closed by peer"
        return None  # let asyncio close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._transports.unregister(self)
            if exc is not None:
                reason = f"connection lost: {exc!r}"
            else:
                reason = self._close_reason or "closed by peer"
            if self.flow is not None:
                self._transports.events(EVENT_CONNECTION_CLOSED, self.flow, reason)
        except Exception as error:
            self._transports.events(
                EVENT_ERROR, self._flow_or_placeholder(), f"close handling failed: {error!r}"
            )
        finally:
            self._transport = None
            if not self.closed.done():
                self.closed.set_result(None)

    # Used by the transport layer.

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes) -> bool:
        if not self.is_open:
            return False
        return self._write(data)

    def close(self, reason: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._close_reason = self._close_reason or reason
            self._transport.close()

    def _abort(self, reason: str) -> None:
        if self._transport is not None:
            self._close_reason = self._close_reason or reason
            self._transport.abort()

    def _write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        try:
            if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                self._transports.events(
                    EVENT_ERROR,
                    self._flow_or_placeholder(),
                    f"peer not reading: over {MAX_WRITE_BUFFER} bytes queued; aborting",
                )
                self._abort("peer not reading")
                return False
            transport.write(data)
        except Exception as exc:
            self._transports.events(
                EVENT_ERROR, self._flow_or_placeholder(), f"write failed: {exc!r}"
            )
            self._abort(f"write failed: {exc!r}")
            return False
        self._last_activity = self._loop.time()
        return True

    def _arm_idle_timer(self, delay: float) -> None:
        if self._transports.idle_timeout > 0:
            self._idle_timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        try:
            idle_timeout = self._transports.idle_timeout
            idle_for = self._loop.time() - self._last_activity
            if idle_for < idle_timeout:
                self._arm_idle_timer(idle_timeout - idle_for)
                return
            self._transports.events(
                EVENT_IDLE_TIMEOUT, self._flow_or_placeholder(), f"idle for {idle_for:.1f} s"
            )
            self.close(f"idle timeout ({idle_timeout:g} s)")
        except Exception as exc:
            self._transports.events(
                EVENT_ERROR, self._flow_or_placeholder(), f"idle check failed: {exc!r}"
            )

    def _flow_or_placeholder(self) -> Flow:
        return self.flow or Flow(self.transport_name, ("", 0), ("", 0), self.connection_id)


class StreamTransports:
    """The TCP and TLS listeners and connections of one transport layer."""

    def __init__(
        self,
        on_message: MessageHandler,
        events: EventSink,
        *,
        max_message_size: int,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tls_client_context: ssl.SSLContext | None = None,
    ) -> None:
        self.on_message = on_message
        self.events = events
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._tls_client_context = tls_client_context
        self._connection_ids = itertools.count(1)
        self._connections: dict[int, StreamConnection] = {}
        self._by_remote: dict[_RemoteKey, dict[int, StreamConnection]] = {}
        self._pending_connects: dict[_RemoteKey, asyncio.Task[StreamConnection | None]] = {}
        self._servers: list[tuple[str, tuple[str, int], asyncio.Server]] = []

    # Registry.

    def allocate_connection_id(self) -> int:
        return next(self._connection_ids)

    def register(self, connection: StreamConnection) -> None:
        assert connection.flow is not None
        self._connections[connection.connection_id] = connection
        key = (connection.transport_name, connection.flow.remote)
        self._by_remote.setdefault(key, {})[connection.connection_id] = connection

    def unregister(self, connection: StreamConnection) -> None:
        self._connections.pop(connection.connection_id, None)
        if connection.flow is None:
            return
        key = (connection.transport_name, connection.flow.remote)
        same_remote = self._by_remote.get(key)
        if same_remote is not None:
            same_remote.pop(connection.connection_id, None)
            if not same_remote:
                del self._by_remote[key]

    def connection(self, connection_id: int) -> StreamConnection | None:
        return self._connections.get(connection_id)

    def connections(self) -> list[StreamConnection]:
        return list(self._connections.values())

    def open_connection_to(
        self, transport: str, remote: tuple[str, int], local: tuple[str, int] | None = None
    ) -> StreamConnection | None:
        """The newest open connection to ``remote``, preferring one bound to ``local``."""
        candidates = self._by_remote.get((transport, remote))
        if not candidates:
            return None
        fallback = None
        for connection in reversed(candidates.values()):
            if not connection.is_open:
                continue
            if local is None or (connection.flow is not None and connection.flow.local == local):
                return connection
            fallback = fallback or connection
        return fallback

    # Listening.

    async def listen(
        self,
        transport: str,
        family: socket.AddressFamily,
        address: tuple[object, ...],
        ssl_context: ssl.SSLContext | None,
    ) -> tuple[str, int]:
        if transport == TLS and ssl_context is None:
            raise ValueError("a TLS listener needs an ssl_context (see make_server_ssl_context)")
        sock = bind_socket(family, socket.SOCK_STREAM, address, reuse_address=True)
        try:
            sock.listen(_LISTEN_BACKLOG)
            loop = asyncio.get_running_loop()
            server = await loop.create_server(
                lambda: StreamConnection(self, transport, accepted=True),
                sock=sock,
                ssl=ssl_context if transport == TLS else None,
                backlog=_LISTEN_BACKLOG,
            )
        except BaseException:
            sock.close()
            raise
        bound = host_port(sock.getsockname())
        self._servers.append((transport, bound, server))
        return bound

    def listeners(self) -> list[tuple[str, str, int]]:
        return [(transport, bound[0], bound[1]) for transport, bound, _ in self._servers]

    # Sending.

    def send(self, data: bytes, flow: Flow) -> bool:
        """On the flow's connection if still open, else on an open one to the same remote."""
        if flow.connection_id is not None:
            connection = self._connections.get(flow.connection_id)
            if (
                connection is not None
                and connection.transport_name == flow.transport
                and connection.is_open
            ):
                return connection.send(data)
        connection = self.open_connection_to(flow.transport, flow.remote, flow.local)
        if connection is None:
            return False
        return connection.send(data)

    async def send_to(
        self,
        data: bytes,
        transport: str,
        remote: tuple[str, int],
        *,
        local: tuple[str, int] | None = None,
        server_hostname: str | None = None,
    ) -> Flow | None:
        """Send on an open connection to ``remote``, connecting one if there is none.

        ``remote`` must be an IP literal in canonical form. ``local`` chooses the
        source address of a new connection (its host only: the port is ephemeral).
        """
        connection = self.open_connection_to(transport, remote)
        if connection is None:
            key = (transport, remote)
            pending = self._pending_connects.get(key)
            if pending is None:
                pending = asyncio.ensure_future(
                    self._connect(transport, remote, local, server_hostname)
                )
                self._pending_connects[key] = pending
                pending.add_done_callback(lambda task: self._forget_connect(key, task))
            try:
                connection = await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if pending.cancelled() and current is not None and not current.cancelling():
                    return None  # the layer is closing; this caller was not cancelled
                raise
            if connection is None:
                return None
        if not connection.send(data):
            return None
        return connection.flow

    def _forget_connect(self, key: _RemoteKey, task: asyncio.Task[StreamConnection | None]) -> None:
        if self._pending_connects.get(key) is task:
            del self._pending_connects[key]

    async def _connect(
        self,
        transport: str,
        remote: tuple[str, int],
        local: tuple[str, int] | None,
        server_hostname: str | None,
    ) -> StreamConnection | None:
        loop = asyncio.get_running_loop()
        ssl_context = None
        if transport == TLS:
            if self._tls_client_context is None:
                self._tls_client_context = make_client_ssl_context(verify=True)
            ssl_context = self._tls_client_context
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(self, transport, accepted=False),
                    remote[0],
                    remote[1],
                    ssl=ssl_context,
                    server_hostname=(server_hostname or remote[0]) if ssl_context else None,
                    local_addr=(local[0], 0) if local is not None else None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self.events(
                EVENT_CONNECT_FAILED,
                Flow(transport, local or ("", 0), remote),
                f"connect to {remote[0]}:{remote[1]} failed: {exc!r}",
            )
            return None
        assert isinstance(connection, StreamConnection)
        return connection

    # Shutdown.

    async def close(self) -> None:
        for task in list(self._pending_connects.values()):
            task.cancel()
        for _, _, server in self._servers:
            server.close()
        connections = self.connections()
        for connection in connections:
            connection.close("transport layer closing")
        if connections:
            _, still_open = await asyncio.wait(
                [connection.closed for connection in connections], timeout=_CLOSE_GRACE
            )
            for connection in connections:
                if not connection.closed.done():
                    connection._abort("transport layer closing")
            if still_open:
                await asyncio.wait(still_open, timeout=_CLOSE_GRACE)
        for _, _, server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), _CLOSE_GRACE)
            except TimeoutError:
                pass
        self._servers.clear()

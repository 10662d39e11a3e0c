"""Thin asyncio SIP transports (UDP, TCP, TLS, WS, WSS) delivering whole messages as bytes.

The transports know SIP only as far as framing: a UDP datagram is one message, a
stream is split by :class:`~sip.transport.framing.StreamFramer`, a WebSocket message
is one message (RFC 7118). Each message goes
to ``on_message(data, flow)``; :class:`Flow` says how to send back.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from sip.transport.base import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EVENT_BAD_FRAMING,
    EVENT_CONNECT_FAILED,
    EVENT_CONNECTION_CLOSED,
    EVENT_CONNECTION_OPENED,
    EVENT_ERROR,
    EVENT_IDLE_TIMEOUT,
    EVENT_KEEPALIVE,
    EVENT_OVERSIZE,
    STREAM_TRANSPORTS,
    TCP,
    TLS,
    TRANSPORTS,
    UDP,
    EventHandler,
    EventSink,
    Flow,
    MessageHandler,
    canonical_host,
    family_of,
)
from sip.transport.framing import KEEPALIVE, FramingError, KeepAlive, StreamFramer
from sip.transport.stream import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    StreamTransports,
    make_client_ssl_context,
    make_server_ssl_context,
)
from sip.transport.udp import UdpEndpoint, open_udp_endpoint
from sip.transport.websocket import (
    SIP_SUBPROTOCOL,
    WEBSOCKET_TRANSPORTS,
    WS,
    WSS,
    WebSocketTransports,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EVENT_BAD_FRAMING",
    "EVENT_CONNECTION_CLOSED",
    "EVENT_CONNECTION_OPENED",
    "EVENT_CONNECT_FAILED",
    "EVENT_ERROR",
    "EVENT_IDLE_TIMEOUT",
    "EVENT_KEEPALIVE",
    "EVENT_OVERSIZE",
    "KEEPALIVE",
    "SIP_SUBPROTOCOL",
    "TCP",
    "TLS",
    "UDP",
    "WEBSOCKET_TRANSPORTS",
    "WS",
    "WSS",
    "EventHandler",
    "Flow",
    "FramingError",
    "KeepAlive",
    "MessageHandler",
    "StreamFramer",
    "TransportLayer",
    "make_client_ssl_context",
    "make_server_ssl_context",
]


class TransportLayer:
    """All listening sockets and connections of one SIP node.

    ``on_message(data, flow)`` is called for every framed message; it is synchronous
    and must not block. ``on_event(kind, flow, detail)`` reports drops, keep-alives,
    connection changes and caught errors (kinds: the ``EVENT_*`` constants).
    ``idle_timeout`` closes stream connections without traffic for that many seconds
    (0 disables it). ``tls_client_context`` is used for outgoing TLS connections
    (default: verify against the system trust store).
    """

    def __init__(
        self,
        on_message: MessageHandler,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        on_event: EventHandler | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        tls_client_context: ssl.SSLContext | None = None,
    ) -> None:
        self._on_message = on_message
        self._events = EventSink(on_event)
        self._max_message_size = max_message_size
        self._udp: dict[tuple[str, int], UdpEndpoint] = {}
        self._streams = StreamTransports(
            on_message,
            self._events,
            max_message_size=max_message_size,
            idle_timeout=idle_timeout,
            connect_timeout=connect_timeout,
            tls_client_context=tls_client_context,
        )
        self._websockets = WebSocketTransports(
            on_message,
            self._events,
            max_message_size=max_message_size,
            allocate_connection_id=self._streams.allocate_connection_id,
            idle_timeout=idle_timeout,
        )

    async def listen(
        self,
        transport: str,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        path: str = "/",
    ) -> tuple[str, int]:
        """Start listening; returns the bound (host, port) (port 0 → an ephemeral one).

        ``path`` is the HTTP path WebSocket (ws/wss) listeners upgrade on.
        """
        transport = transport.lower()
        if transport not in TRANSPORTS and transport not in WEBSOCKET_TRANSPORTS:
            raise ValueError(f"unknown SIP transport {transport!r}")
        kind = socket.SOCK_DGRAM if transport == UDP else socket.SOCK_STREAM
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            canonical_host(host) or None, port, type=kind, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(f"cannot resolve listening address {host!r}")
        family, _, _, _, address = infos[0]
        if transport in WEBSOCKET_TRANSPORTS:
            return await self._websockets.listen(transport, family, address, ssl_context, path)
        if transport == UDP:
            endpoint = await open_udp_endpoint(
                family, address, self._on_message, self._events, self._max_message_size
            )
            self._udp[endpoint.local] = endpoint
            return endpoint.local
        return await self._streams.listen(transport, family, address, ssl_context)

    def send(self, data: bytes, flow: Flow) -> bool:
        """Send back on a flow; False when there is no socket or connection left for it.

        UDP goes out of the local socket the flow came in on. Streams use the flow's
        connection while it is open, else any open connection to ``flow.remote``.
        """
        if flow.transport == UDP:
            endpoint = self._udp.get(flow.local)
            if endpoint is None:
                return False
            return endpoint.send(data, flow.remote)
        if flow.transport in STREAM_TRANSPORTS:
            return self._streams.send(data, flow)
        if flow.transport in WEBSOCKET_TRANSPORTS:
            return self._websockets.send(data, flow)
        return False

    async def send_to(
        self,
        data: bytes,
        transport: str,
        remote: tuple[str, int],
        *,
        local: tuple[str, int] | None = None,
        server_hostname: str | None = None,
    ) -> Flow | None:
        """Send a message the node originates; returns the flow used, or None.

        UDP leaves from ``local`` if given, else from the first listening socket of
        the remote's address family. TCP/TLS reuse an open connection to ``remote``
        or connect a new one (bound to ``local``'s host if given); TLS checks the
        certificate against ``server_hostname`` (default: the remote host).
        """
        transport = transport.lower()
        if transport in WEBSOCKET_TRANSPORTS:  # only over a connection the device opened
            return self._websockets.send_to(
                data, transport, (canonical_host(remote[0]), remote[1])
            )
        if transport not in TRANSPORTS:
            return None
        host = canonical_host(remote[0])
        resolved = await self._resolve(host, remote[1], transport)
        if resolved is None:
            return None
        if transport == UDP:
            endpoint = self._udp_endpoint_for(resolved, local)
            if endpoint is None:
                self._events(
                    EVENT_ERROR,
                    Flow(transport, local or ("", 0), resolved),
                    "no UDP socket of that address family to send from",
                )
                return None
            if not endpoint.send(data, resolved):
                return None
            return Flow(UDP, endpoint.local, resolved)
        if transport == TLS and server_hostname is None and host != resolved[0]:
            server_hostname = host  # verify the certificate against the name asked for
        return await self._streams.send_to(
            data, transport, resolved, local=local, server_hostname=server_hostname
        )

    def udp_receive_queue_fill(self) -> float | None:
        """The fullest UDP listener's receive buffer (0..1): a queue that builds up means
        datagrams arrive faster than they are handled. None when unknown or no UDP."""
        fills = [queue[0] for endpoint in self._udp.values()
                 if (queue := endpoint.receive_queue()) is not None]
        return max(fills) if fills else None

    def listeners(self) -> list[tuple[str, str, int]]:
        """(transport, host, port) of every listening socket."""
        udp = [(UDP, local[0], local[1]) for local in self._udp]
        return udp + self._streams.listeners() + self._websockets.listeners()

    async def close(self) -> None:
        """Close listeners and connections (stream peers see an orderly close)."""
        for endpoint in self._udp.values():
            endpoint.close()
        self._udp.clear()
        await self._streams.close()
        await self._websockets.close()

    def _udp_endpoint_for(
        self, remote: tuple[str, int], local: tuple[str, int] | None
    ) -> UdpEndpoint | None:
        if local is not None:
            endpoint = self._udp.get((canonical_host(local[0]), local[1]))
            return endpoint if endpoint is not None and endpoint.is_open else None
        family = family_of(remote[0])
        for endpoint in self._udp.values():
            if endpoint.family == family and endpoint.is_open:
                return endpoint
        return None

    async def _resolve(self, host: str, port: int, transport: str) -> tuple[str, int] | None:
        """(IP, port) for a remote given as an IP literal or a name (first address)."""
        if _is_ip_literal(host):
            return (host, port)
        kind = socket.SOCK_DGRAM if transport == UDP else socket.SOCK_STREAM
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
        except OSError as exc:
            self._events(
                EVENT_CONNECT_FAILED if transport != UDP else EVENT_ERROR,
                Flow(transport, ("", 0), (host, port)),
                f"cannot resolve {host!r}: {exc!r}",
            )
            return None
        if not infos:
            return None
        address = infos[0][4]
        return (canonical_host(str(address[0])), port)


def _is_ip_literal(host: str) -> bool:
    try:
        socket.inet_pton(family_of(host), host)
    except OSError:
        return False
    return True

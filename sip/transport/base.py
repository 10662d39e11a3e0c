"""Shared vocabulary of the SIP transports: flows, callbacks, events, sockets."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EVENT_BAD_FRAMING",
    "EVENT_CONNECTION_CLOSED",
    "EVENT_CONNECTION_OPENED",
    "EVENT_CONNECT_FAILED",
    "EVENT_ERROR",
    "EVENT_IDLE_TIMEOUT",
    "EVENT_KEEPALIVE",
    "EVENT_OVERSIZE",
    "STREAM_TRANSPORTS",
    "TCP",
    "TLS",
    "TRANSPORTS",
    "UDP",
    "EventHandler",
    "EventSink",
    "Flow",
    "MessageHandler",
    "bind_socket",
    "canonical_host",
    "family_of",
    "host_port",
]

log = logging.getLogger("sip.transport")

UDP: Final = "udp"
TCP: Final = "tcp"
TLS: Final = "tls"
STREAM_TRANSPORTS: Final = frozenset({TCP, TLS})
TRANSPORTS: Final = frozenset({UDP, TCP, TLS})

DEFAULT_MAX_MESSAGE_SIZE: Final = 65535

# Event kinds passed to on_event(kind, flow, detail).
EVENT_OVERSIZE: Final = "oversize"  # message dropped / connection closed: too large
EVENT_BAD_FRAMING: Final = "bad_framing"  # stream framing broken; connection closed
EVENT_KEEPALIVE: Final = "keepalive"  # CRLF keep-alive received (pong sent on streams)
EVENT_CONNECTION_OPENED: Final = "connection_opened"  # detail: "accepted" | "connected"
EVENT_CONNECTION_CLOSED: Final = "connection_closed"  # detail: why
EVENT_IDLE_TIMEOUT: Final = "idle_timeout"  # followed by connection_closed
EVENT_CONNECT_FAILED: Final = "connect_failed"  # send_to could not open a connection
EVENT_ERROR: Final = "error"  # an exception caught in a callback, a socket error


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from, and so how to send back to it."""

    transport: str  # "udp" | "tcp" | "tls"
    local: tuple[str, int]
    remote: tuple[str, int]
    connection_id: int | None = None  # stream connections only


MessageHandler = Callable[[bytes, Flow], None]
EventHandler = Callable[[str, Flow, str], None]


class EventSink:
    """Calls the user's on_event, never letting its exceptions escape."""

    __slots__ = ("_handler",)

    def __init__(self, handler: EventHandler | None) -> None:
        self._handler = handler

    def __call__(self, kind: str, flow: Flow, detail: str) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler(kind, flow, detail)
        except Exception:
            log.exception("transport event handler failed (event %s on %s)", kind, flow)


def host_port(address: tuple[object, ...]) -> tuple[str, int]:
    """(host, port) from a socket address (IPv6 ones carry flowinfo and scope id)."""
    return (str(address[0]), int(address[1]))  # type: ignore[call-overload]


def canonical_host(host: str) -> str:
    """The kernel's spelling of an IP literal ("0:0::1" → "::1"); names unchanged."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        return host


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    address: tuple[object, ...],
    *,
    reuse_address: bool,
    buffer_size: int | None = None,
) -> socket.socket:
    """A non-blocking socket bound to ``address``; IPv6 sockets are IPv6-only."""
    sock = socket.socket(family, kind)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if buffer_size:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:  # best effort: the kernel caps it (net.core.rmem_max / wmem_max)
                    sock.setsockopt(socket.SOL_SOCKET, option, buffer_size)
                except OSError:
                    pass
        sock.setblocking(False)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock

"""SIP over UDP: one datagram is one message."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Final, cast

from sip.transport.base import (
    EVENT_ERROR,
    EVENT_KEEPALIVE,
    EVENT_OVERSIZE,
    UDP,
    EventSink,
    Flow,
    MessageHandler,
    bind_socket,
    host_port,
)

__all__ = ["UDP_SOCKET_BUFFER_SIZE", "UdpEndpoint", "open_udp_endpoint"]

UDP_SOCKET_BUFFER_SIZE: Final = 4 * 1024 * 1024
_NO_REMOTE: Final = ("", 0)
# getsockopt(SOL_SOCKET, SO_MEMINFO) (Linux): nine u32, [0] bytes queued for reading,
# [1] the receive buffer's size, [8] datagrams dropped because it was full
_SO_MEMINFO: Final = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO = struct.Struct("9I")


class UdpEndpoint(asyncio.DatagramProtocol):
    """One bound UDP socket: delivers datagrams, sends from the same socket."""

    def __init__(
        self,
        local: tuple[str, int],
        family: socket.AddressFamily,
        on_message: MessageHandler,
        events: EventSink,
        max_message_size: int,
    ) -> None:
        self.local = local
        self.family = family
        self._on_message = on_message
        self._events = events
        self._max_message_size = max_message_size
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector transport does not subclass DatagramTransport)
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        flow = None
        try:
            flow = Flow(UDP, self.local, host_port(addr))
            if len(data) > self._max_message_size:
                self._events(
                    EVENT_OVERSIZE,
                    flow,
                    f"datagram of {len(data)} bytes exceeds {self._max_message_size}; dropped",
                )
                return
            if not data.strip(b"\r\n"):
                self._events(EVENT_KEEPALIVE, flow, "CRLF keep-alive")
                return
            self._on_message(data, flow)
        except Exception as exc:
            self._events(
                EVENT_ERROR,
                flow or Flow(UDP, self.local, _NO_REMOTE),
                f"UDP receive failed: {exc!r}",
            )

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) and failed sendto calls land here.
        self._events(EVENT_ERROR, Flow(UDP, self.local, _NO_REMOTE), f"UDP socket error: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def receive_queue(self) -> tuple[float, int] | None:
        """How full the socket's receive buffer is (0..1) and how many datagrams the kernel
        dropped so far for lack of room; None where the kernel does not tell (not Linux)."""
        transport = self._transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO,
                                                   _MEMINFO.size))
        except (OSError, struct.error):
            return None
        return (info[0] / info[1] if info[1] else 0.0), info[8]

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, data: bytes, remote: tuple[str, int]) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        try:
            transport.sendto(data, remote)
        except (OSError, ValueError, RuntimeError) as exc:
            self._events(EVENT_ERROR, Flow(UDP, self.local, remote), f"UDP send failed: {exc!r}")
            return False
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def open_udp_endpoint(
    family: socket.AddressFamily,
    address: tuple[object, ...],
    on_message: MessageHandler,
    events: EventSink,
    max_message_size: int,
) -> UdpEndpoint:
    """Bind a UDP socket (IPv6-only for v6, buffers raised towards 4 MiB) and serve it."""
    sock = bind_socket(
        family, socket.SOCK_DGRAM, address, reuse_address=False, buffer_size=UDP_SOCKET_BUFFER_SIZE
    )
    endpoint = UdpEndpoint(
        host_port(sock.getsockname()), family, on_message, events, max_message_size
    )
    loop = asyncio.get_running_loop()
    try:
        await loop.create_datagram_endpoint(lambda: endpoint, sock=sock)
    except BaseException:
        sock.close()
        raise
    return endpoint

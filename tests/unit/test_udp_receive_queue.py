"""The UDP listener reports how full its receive buffer is (the overload signal)."""

from __future__ import annotations

import asyncio
import socket

from sip.transport import TransportLayer


async def test_datagrams_not_read_yet_show_in_the_receive_queue() -> None:
    received: list[bytes] = []
    layer = TransportLayer(lambda data, flow: received.append(data))
    try:
        _host, port = await layer.listen("udp", "127.0.0.1", 0)
        assert layer.udp_receive_queue_fill() == 0.0
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(200):  # sent while the loop does not run: nothing is read yet
                sender.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n" + b"x" * 500, ("127.0.0.1", port))
            fill = layer.udp_receive_queue_fill()
            assert fill is not None and 0.0 < fill < 1.0
            for _ in range(100):
                if len(received) == 200:
                    break
                await asyncio.sleep(0.01)
            assert len(received) == 200
            assert layer.udp_receive_queue_fill() == 0.0
        finally:
            sender.close()
    finally:
        await layer.close()


async def test_no_udp_listener_means_no_queue_signal() -> None:
    layer = TransportLayer(lambda data, flow: None)
    try:
        await layer.listen("tcp", "127.0.0.1", 0)
        assert layer.udp_receive_queue_fill() is None
    finally:
        await layer.close()

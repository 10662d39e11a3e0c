"""SIP transports over loopback: UDP (v4, v6), TCP and TLS."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sip.transport import (
    EVENT_BAD_FRAMING,
    EVENT_CONNECT_FAILED,
    EVENT_CONNECTION_CLOSED,
    EVENT_ERROR,
    EVENT_IDLE_TIMEOUT,
    EVENT_KEEPALIVE,
    EVENT_OVERSIZE,
    Flow,
    TransportLayer,
    make_client_ssl_context,
    make_server_ssl_context,
)

WAIT = 3.0  # seconds any single expected thing may take on loopback


def request(call_id: str, body: bytes = b"", transport: str = "TCP") -> bytes:
    return (
        f"OPTIONS sip:alice@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:5060;branch=z9hG4bK-{call_id}\r\n"
        f"From: <sip:bob@example.com>;tag=9fxced76sl\r\n"
        f"To: <sip:alice@example.com>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def response_to(message: bytes) -> bytes:
    call_id = next(
        line.split(b":", 1)[1].strip()
        for line in message.split(b"\r\n")
        if line.lower().startswith(b"call-id:")
    )
    return b"SIP/2.0 200 OK\r\nCall-ID: " + call_id + b"\r\nContent-Length: 0\r\n\r\n"


class Collector:
    """Records what a TransportLayer delivers; optionally answers each message."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[tuple[bytes, Flow]] = asyncio.Queue()
        self.events: list[tuple[str, Flow, str]] = []
        self._event_added = asyncio.Event()
        self.responder: Callable[[bytes, Flow], None] | None = None

    def on_message(self, data: bytes, flow: Flow) -> None:
        self.messages.put_nowait((data, flow))
        if self.responder is not None:
            self.responder(data, flow)

    def on_event(self, kind: str, flow: Flow, detail: str) -> None:
        self.events.append((kind, flow, detail))
        self._event_added.set()

    async def next_message(self) -> tuple[bytes, Flow]:
        return await asyncio.wait_for(self.messages.get(), WAIT)

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.events]

    async def wait_event(self, kind: str) -> tuple[str, Flow, str]:
        deadline = asyncio.get_running_loop().time() + WAIT
        for _ in range(1000):
            for event in self.events:
                if event[0] == kind:
                    return event
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._event_added.clear()
            try:
                await asyncio.wait_for(self._event_added.wait(), remaining)
            except TimeoutError:
                break
        raise AssertionError(f"no {kind!r} event; got {self.kinds()}")


LayerFactory = Callable[..., tuple[TransportLayer, Collector]]


@pytest.fixture
async def make_layer() -> AsyncIterator[LayerFactory]:
    layers: list[TransportLayer] = []

    def factory(**options: object) -> tuple[TransportLayer, Collector]:
        collector = Collector()
        layer = TransportLayer(
            collector.on_message,
            on_event=collector.on_event,
            **options,  # type: ignore[arg-type]
        )
        layers.append(layer)
        return layer, collector

    yield factory
    for layer in layers:
        await layer.close()


def answer_on_same_flow(layer: TransportLayer) -> Callable[[bytes, Flow], None]:
    def respond(data: bytes, flow: Flow) -> None:
        assert layer.send(response_to(data), flow)

    return respond


@pytest.fixture(scope="module")
def self_signed_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(certificate), "-days", "1",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return certificate, key


def unused_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# UDP


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_udp_request_and_echo_reply_from_same_socket(
    make_layer: LayerFactory, host: str
) -> None:
    server, server_seen = make_layer()
    server_seen.responder = answer_on_same_flow(server)
    server_address = await server.listen("udp", host, 0)
    client, client_seen = make_layer()
    client_address = await client.listen("udp", host, 0)
    assert server_address[0] == host and server_address[1] != 0

    message = request("udp-echo", b"body", transport="UDP")
    sent_flow = await client.send_to(message, "udp", server_address)

    assert sent_flow == Flow("udp", client_address, server_address)
    received, flow = await server_seen.next_message()
    assert received == message
    assert flow == Flow("udp", server_address, client_address)
    reply, reply_flow = await client_seen.next_message()
    assert reply == response_to(message)
    assert reply_flow.remote == server_address


async def test_udp_send_to_other_family_without_socket_fails(make_layer: LayerFactory) -> None:
    layer, seen = make_layer()
    await layer.listen("udp", "127.0.0.1", 0)
    assert await layer.send_to(b"x", "udp", ("::1", 5060)) is None
    assert EVENT_ERROR in seen.kinds()


async def test_udp_oversize_datagram_is_dropped(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer(max_message_size=1000)
    server_address = await server.listen("udp", "127.0.0.1", 0)
    client, _ = make_layer()
    client_address = await client.listen("udp", "127.0.0.1", 0)

    await client.send_to(request("big", b"x" * 1500, "UDP"), "udp", server_address)
    small = request("small", b"", "UDP")
    await client.send_to(small, "udp", server_address)

    received, _ = await server_seen.next_message()
    assert received == small
    kind, flow, detail = await server_seen.wait_event(EVENT_OVERSIZE)
    assert flow.remote == client_address
    assert "1000" in detail
    assert server_seen.messages.empty()


async def test_udp_crlf_keepalive_is_not_delivered(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    server_address = await server.listen("udp", "127.0.0.1", 0)
    client, _ = make_layer()
    await client.listen("udp", "127.0.0.1", 0)

    await client.send_to(b"\r\n\r\n", "udp", server_address)
    message = request("after-ping", transport="UDP")
    await client.send_to(message, "udp", server_address)

    received, _ = await server_seen.next_message()
    assert received == message
    await server_seen.wait_event(EVENT_KEEPALIVE)


async def test_udp_handler_exception_is_reported_and_socket_keeps_working(
    make_layer: LayerFactory,
) -> None:
    server, server_seen = make_layer()
    calls: list[bytes] = []

    def explode_once(data: bytes, flow: Flow) -> None:
        calls.append(data)
        if len(calls) == 1:
            raise RuntimeError("handler bug")

    server_seen.responder = explode_once
    server_address = await server.listen("udp", "127.0.0.1", 0)
    client, _ = make_layer()
    await client.listen("udp", "127.0.0.1", 0)

    await client.send_to(request("one", transport="UDP"), "udp", server_address)
    _, _, detail = await server_seen.wait_event(EVENT_ERROR)
    assert "handler bug" in detail
    await client.send_to(request("two", transport="UDP"), "udp", server_address)
    await server_seen.next_message()
    second, _ = await server_seen.next_message()
    assert b"Call-ID: two" in second
    assert len(calls) == 2


# TCP


async def test_tcp_messages_sent_in_pieces_are_framed_and_answered_on_same_connection(
    make_layer: LayerFactory,
) -> None:
    server, server_seen = make_layer()
    server_seen.responder = answer_on_same_flow(server)
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        first = request("tcp-1", b"v=0\r\n\r\nnot a header\r\n")
        second = request("tcp-2")
        stream = first + second
        for cut in range(0, len(stream), 37):
            writer.write(stream[cut : cut + 37])
            await writer.drain()
            await asyncio.sleep(0.001)

        received_first, flow_first = await server_seen.next_message()
        received_second, flow_second = await server_seen.next_message()
        assert (received_first, received_second) == (first, second)
        assert flow_first.connection_id is not None
        assert flow_first == flow_second
        assert flow_first.transport == "tcp"
        assert flow_first.remote == writer.get_extra_info("sockname")[:2]

        replies = [await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT) for _ in range(2)]
        assert replies == [response_to(first), response_to(second)]
    finally:
        writer.close()


async def test_tcp_over_ipv6(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    server_seen.responder = answer_on_same_flow(server)
    server_address = await server.listen("tcp", "::1", 0)
    client, client_seen = make_layer()

    message = request("v6")
    flow = await client.send_to(message, "tcp", server_address)
    assert flow is not None and flow.remote == server_address
    received, server_flow = await server_seen.next_message()
    assert received == message and server_flow.remote == flow.local
    reply, _ = await client_seen.next_message()
    assert reply == response_to(message)


async def test_send_to_opens_one_connection_and_reuses_it(make_layer: LayerFactory) -> None:
    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append((reader, writer))

    peer = await asyncio.start_server(accept, "127.0.0.1", 0)
    peer_address = peer.sockets[0].getsockname()[:2]
    try:
        layer, seen = make_layer()
        first, second = request("reuse-1"), request("reuse-2")
        flow_first = await layer.send_to(first, "tcp", peer_address)
        flow_second = await layer.send_to(second, "tcp", peer_address)

        assert flow_first is not None and flow_first.connection_id is not None
        assert flow_second == flow_first
        assert flow_first.remote == peer_address
        peer_reader, peer_writer = accepted[0]
        data = await asyncio.wait_for(peer_reader.readexactly(len(first + second)), WAIT)
        assert data == first + second
        assert len(accepted) == 1

        # The opened connection is read like an accepted one.
        peer_writer.write(response_to(first))
        reply, reply_flow = await seen.next_message()
        assert reply == response_to(first)
        assert reply_flow == flow_first
        for _, writer in accepted:
            writer.close()
    finally:
        peer.close()


async def test_concurrent_send_to_share_one_new_connection(make_layer: LayerFactory) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    peer = await asyncio.start_server(accept, "127.0.0.1", 0)
    peer_address = peer.sockets[0].getsockname()[:2]
    try:
        layer, _ = make_layer()
        flows = await asyncio.gather(
            *(layer.send_to(request(f"c{index}"), "tcp", peer_address) for index in range(5))
        )
        assert all(flow is not None for flow in flows)
        assert len({flow.connection_id for flow in flows if flow is not None}) == 1
        await asyncio.sleep(0.05)
        assert len(accepted) == 1
        for writer in accepted:
            writer.close()
    finally:
        peer.close()


async def test_send_to_closed_port_reports_connect_failure(make_layer: LayerFactory) -> None:
    layer, seen = make_layer()
    assert await layer.send_to(request("nobody"), "tcp", ("127.0.0.1", unused_tcp_port())) is None
    _, flow, _ = await seen.wait_event(EVENT_CONNECT_FAILED)
    assert flow.transport == "tcp"


async def test_tcp_keepalive_ping_gets_single_crlf_pong(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"\r\n\r\n")
        pong = await asyncio.wait_for(reader.readexactly(2), WAIT)
        assert pong == b"\r\n"
        await server_seen.wait_event(EVENT_KEEPALIVE)
        # The connection still carries messages after the ping.
        message = request("after-ping")
        writer.write(message)
        received, _ = await server_seen.next_message()
        assert received == message
    finally:
        writer.close()


async def test_bad_framing_closes_tcp_connection(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"OPTIONS sip:alice@example.com SIP/2.0\r\nCall-ID: no-length\r\n\r\n")
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        _, _, detail = await server_seen.wait_event(EVENT_BAD_FRAMING)
        assert "Content-Length" in detail
        await server_seen.wait_event(EVENT_CONNECTION_CLOSED)
        assert server_seen.messages.empty()
    finally:
        writer.close()


async def test_oversize_stream_message_closes_tcp_connection(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer(max_message_size=600)
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request("huge", b"x" * 2000))
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        await server_seen.wait_event(EVENT_OVERSIZE)
        assert server_seen.messages.empty()
    finally:
        writer.close()


async def test_idle_connection_is_closed(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer(idle_timeout=0.2)
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request("then-silence"))
        await server_seen.next_message()
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        await server_seen.wait_event(EVENT_IDLE_TIMEOUT)
        await server_seen.wait_event(EVENT_CONNECTION_CLOSED)
    finally:
        writer.close()


async def test_send_on_closed_connection_returns_false(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request("bye"))
    _, flow = await server_seen.next_message()
    writer.close()
    await writer.wait_closed()
    await server_seen.wait_event(EVENT_CONNECTION_CLOSED)
    assert server.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", flow) is False


async def test_send_with_stale_connection_id_uses_open_connection_to_same_remote(
    make_layer: LayerFactory,
) -> None:
    server, server_seen = make_layer()
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request("stale"))
        _, flow = await server_seen.next_message()
        assert flow.connection_id is not None
        stale = Flow("tcp", flow.local, flow.remote, flow.connection_id + 1000)
        reply = b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
        assert server.send(reply, stale)
        assert await asyncio.wait_for(reader.readexactly(len(reply)), WAIT) == reply
        elsewhere = Flow("tcp", flow.local, ("127.0.0.1", 9), flow.connection_id + 1000)
        assert server.send(reply, elsewhere) is False
    finally:
        writer.close()


async def test_listeners_report_bound_ephemeral_ports(make_layer: LayerFactory) -> None:
    layer, _ = make_layer()
    udp_address = await layer.listen("udp", "127.0.0.1", 0)
    tcp_address = await layer.listen("tcp", "::1", 0)
    assert udp_address[1] != 0 and tcp_address[1] != 0
    assert sorted(layer.listeners()) == sorted(
        [("udp", "127.0.0.1", udp_address[1]), ("tcp", "::1", tcp_address[1])]
    )


async def test_close_disconnects_stream_peers(make_layer: LayerFactory) -> None:
    server, server_seen = make_layer()
    host, port = await server.listen("tcp", "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request("before-close"))
        await server_seen.next_message()
        await server.close()
        assert await asyncio.wait_for(reader.read(100), WAIT) == b""
        assert server.listeners() == []
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)
    finally:
        writer.close()


# TLS


async def test_tls_request_and_reply_with_verified_self_signed_certificate(
    make_layer: LayerFactory, self_signed_certificate: tuple[Path, Path]
) -> None:
    certificate, key = self_signed_certificate
    server, server_seen = make_layer()
    server_seen.responder = answer_on_same_flow(server)
    server_address = await server.listen(
        "tls", "127.0.0.1", 0, ssl_context=make_server_ssl_context(certificate, key)
    )
    client, client_seen = make_layer(
        tls_client_context=make_client_ssl_context(verify=True, cafile=certificate)
    )

    first, second = request("tls-1", b"secret", "TLS"), request("tls-2", transport="TLS")
    flow = await client.send_to(first, "tls", server_address)
    assert flow is not None and flow.transport == "tls" and flow.remote == server_address
    assert await client.send_to(second, "tls", server_address) == flow

    for expected in (first, second):
        received, server_flow = await server_seen.next_message()
        assert received == expected
        assert server_flow.transport == "tls" and server_flow.remote == flow.local
    for expected in (first, second):
        reply, reply_flow = await client_seen.next_message()
        assert reply == response_to(expected)
        assert reply_flow == flow


async def test_tls_client_rejects_untrusted_certificate(
    make_layer: LayerFactory, self_signed_certificate: tuple[Path, Path]
) -> None:
    certificate, key = self_signed_certificate
    server, server_seen = make_layer()
    server_address = await server.listen(
        "tls", "127.0.0.1", 0, ssl_context=make_server_ssl_context(certificate, key)
    )
    client, client_seen = make_layer(tls_client_context=make_client_ssl_context(verify=True))
    assert await client.send_to(request("untrusted"), "tls", server_address) is None
    _, _, detail = await client_seen.wait_event(EVENT_CONNECT_FAILED)
    assert "CERTIFICATE_VERIFY_FAILED" in detail
    assert server_seen.messages.empty()

    lenient, lenient_seen = make_layer(tls_client_context=make_client_ssl_context(verify=False))
    assert await lenient.send_to(request("unverified"), "tls", server_address) is not None
    received, _ = await server_seen.next_message()
    assert b"Call-ID: unverified" in received
    assert lenient_seen.kinds().count(EVENT_CONNECT_FAILED) == 0


async def test_tls_listen_without_context_is_refused(make_layer: LayerFactory) -> None:
    layer, _ = make_layer()
    with pytest.raises(ValueError):
        await layer.listen("tls", "127.0.0.1", 0)

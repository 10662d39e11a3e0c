"""The signalling core of a real `Softswitch` running in-process on loopback sockets
(UDP and TCP on 127.0.0.1, UDP and TCP on ::1): parse errors, UAS checks,
retransmissions, symmetric responses (RFC 3581) and the message metrics."""

from __future__ import annotations

import asyncio
import itertools
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port

from sip.digest import build_authorization, choose_challenge
from sip.message import SipResponse, make_response
from sip.parser import parse_message
from sip.transport import StreamFramer
from switch.app import Softswitch
from switch.metrics import SwitchMetrics
from switch.settings import load_settings_text

WAIT = 3.0  # the longest any expected answer may take on loopback
QUIET = 0.3  # how long to listen to be sure that nothing comes back

_ids = itertools.count(1)


class Ports:
    def __init__(self) -> None:
        self.udp4 = free_port("udp")
        self.tcp4 = free_port("tcp")
        self.udp6 = free_port("udp", "::1")
        self.tcp6 = free_port("tcp", "::1")


def settings_text(ports: Ports) -> str:
    return textwrap.dedent(
        f"""\
        switch:
          domains: [example.com, 127.0.0.1]
          user_agent: softswitch-test
        registrar:
          keepalive_interval: 0
        auth:
          secret: "0123456789abcdef0123456789abcdef"
        accounts:
          - id: acme
            devices:
              - {{extension: "1001", username: alice, password: alice-secret-1}}
        listen:
          - {{transport: udp, host: 127.0.0.1, port: {ports.udp4}}}
          - {{transport: tcp, host: 127.0.0.1, port: {ports.tcp4}}}
          - {{transport: udp, host: "::1", port: {ports.udp6}}}
          - {{transport: tcp, host: "::1", port: {ports.tcp6}}}
        """
    )


@pytest.fixture
async def running() -> AsyncIterator[tuple[Softswitch, Ports]]:
    ports = Ports()
    switch = Softswitch(load_settings_text(settings_text(ports), "test.yaml"))
    await switch.start()
    try:
        yield switch, ports
    finally:
        await switch.stop()


class UdpPeer(asyncio.DatagramProtocol):
    """A loopback UDP socket that queues every datagram it receives."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        self.received.put_nowait(data)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def response(self) -> SipResponse:
        data = await asyncio.wait_for(self.received.get(), WAIT)
        message = parse_message(data)
        assert isinstance(message, SipResponse)
        return message

    async def raw(self) -> bytes:
        return await asyncio.wait_for(self.received.get(), WAIT)

    async def nothing(self) -> bool:
        try:
            await asyncio.wait_for(self.received.get(), QUIET)
        except TimeoutError:
            return True
        return False


@pytest.fixture
async def udp_peer(running: tuple[Softswitch, Ports]) -> AsyncIterator[UdpPeer]:
    _, ports = running
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        UdpPeer, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", ports.udp4)
    )
    try:
        yield peer
    finally:
        transport.close()


def request(
    method: str,
    *,
    uri: str = "sip:example.com",
    via: str,
    cseq_method: str | None = None,
    extra: str = "",
    branch: str | None = None,
    call_id: str | None = None,
) -> bytes:
    number = next(_ids)
    branch = branch or f"z9hG4bK-sig-{number}"
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via};branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:alice@example.com>;tag=from-{number}\r\n"
        "To: <sip:alice@example.com>\r\n"
        f"Call-ID: {call_id or f'sig-{number}@test'}\r\n"
        f"CSeq: {number} {cseq_method or method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def udp_via(peer: UdpPeer, *, rport: bool = True) -> str:
    return f"SIP/2.0/UDP 127.0.0.1:{peer.port}" + (";rport" if rport else "")


def messages(switch: Softswitch, direction: str, method: str, status: str = "") -> float:
    return switch.metrics.value(
        "softswitch_sip_messages_total",
        {"direction": direction, "method": method, "status": status},
    )


def allowed(response: SipResponse) -> set[str]:
    return {m.strip() for m in (response.header("Allow") or "").split(",") if m.strip()}


# ---- UAS behaviour ----------------------------------------------------------------------


async def test_options_is_answered_200_with_allow(running, udp_peer: UdpPeer) -> None:
    switch, _ = running
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    response = await udp_peer.response()
    assert response.status == 200
    assert {"OPTIONS", "REGISTER", "ACK", "CANCEL"} <= allowed(response)
    assert allowed(response) == switch.core.allowed_methods
    assert response.header("Server") == "softswitch-test"
    assert response.to.tag
    assert messages(switch, "in", "OPTIONS") == 1
    assert messages(switch, "out", "OPTIONS", "200") == 1


async def test_handlers_run_in_a_task_unless_started_eagerly(running, udp_peer: UdpPeer) -> None:
    """A handler registered without ``eager`` runs inside a task (redis-py's timeouts
    need one); an eager one answers from the receive callback, before any loop turn."""
    switch, _ = running
    seen: dict[str, object] = {}

    async def in_task(request, flow, now):
        seen["task"] = asyncio.current_task()
        async with asyncio.timeout(1.0):  # refuses to run outside a task
            await asyncio.sleep(0)
        return make_response(request, 200, "OK", to_tag="t1")

    switch.core.register_handler("OPTIONS", in_task)
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 200
    assert seen["task"] is not None

    async def eager(request, flow, now):
        seen["eager_task"] = asyncio.current_task()
        return make_response(request, 200, "OK", to_tag="t2")

    switch.core.register_handler("OPTIONS", eager, eager=True)
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 200
    assert seen["eager_task"] is None


async def test_transactions_gauge_follows_the_transaction_layer(
    running, udp_peer: UdpPeer
) -> None:
    switch, _ = running
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 200
    # Over UDP the server transaction stays Completed (Timer J) to absorb retransmissions.
    assert len(switch.core.transactions) == 1
    assert switch.metrics.value("softswitch_sip_transactions_active") == 1


async def test_garbage_is_counted_and_the_switch_keeps_answering(
    running, udp_peer: UdpPeer
) -> None:
    switch, _ = running
    for garbage in (b"\x00\xff\xfe garbage", b"hello\r\n\r\n", b"SIP/2.0 999 Nope\r\n\r\n",
                    bytes(range(256))):
        udp_peer.send(garbage)
    assert await udp_peer.nothing()
    assert switch.metrics.value(
        "softswitch_sip_parse_errors_total", {"transport": "udp", "answered": "false"}
    ) == 4
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 200


async def test_malformed_request_gets_400_with_a_reason(running, udp_peer: UdpPeer) -> None:
    # In the style of RFC 4475 §3.1.2.1 (badinv01): empty Via and Contact parameters.
    switch, _ = running
    udp_peer.send(
        (
            "INVITE sip:user@example.com SIP/2.0\r\n"
            "To: sip:j.user@example.com\r\n"
            "From: sip:caller@example.net;tag=134161461246\r\n"
            "Max-Forwards: 7\r\n"
            "Call-ID: badinv01-style.0ha0isndaksdjasdf3234nas\r\n"
            "CSeq: 8 INVITE\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{udp_peer.port};;,;,,\r\n"
            "Contact: \"Joe\" <sip:joe@example.org>;;;;\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    # The 400 copies the broken Via, so read it line by line rather than parse it.
    lines = (await udp_peer.raw()).decode().split("\r\n")
    version, status, reason = lines[0].split(" ", 2)
    assert (version, status) == ("SIP/2.0", "400")
    assert reason and reason != "Bad Request"
    assert "Call-ID: badinv01-style.0ha0isndaksdjasdf3234nas" in lines
    assert switch.metrics.value(
        "softswitch_sip_parse_errors_total", {"transport": "udp", "answered": "true"}
    ) == 1
    assert messages(switch, "out", "INVITE", "400") == 1


async def test_unknown_method_is_501_with_allow(running, udp_peer: UdpPeer) -> None:
    switch, _ = running
    udp_peer.send(request("FROBNICATE", via=udp_via(udp_peer)))
    response = await udp_peer.response()
    assert response.status == 501
    assert "REGISTER" in allowed(response)
    assert switch.metrics.value(
        "softswitch_sip_requests_rejected_total", {"method": "other", "status": "501"}
    ) == 1
    assert messages(switch, "in", "other") == 1


@pytest.mark.parametrize("method", ["PUBLISH", "SUBSCRIBE"])
async def test_known_but_unserved_method_is_405_with_allow(
    running, udp_peer: UdpPeer, method: str
) -> None:
    # (INVITE was the example before call control existed; these two have no service.)
    switch, _ = running
    udp_peer.send(request(method, uri="sip:1001@example.com", via=udp_via(udp_peer)))
    response = await udp_peer.response()
    assert response.status == 405
    assert method not in allowed(response)
    assert allowed(response) == switch.core.allowed_methods
    assert switch.metrics.value(
        "softswitch_sip_requests_rejected_total", {"method": method, "status": "405"}
    ) == 1


async def test_request_for_a_foreign_domain_is_404(running, udp_peer: UdpPeer) -> None:
    udp_peer.send(request("OPTIONS", uri="sip:bob@elsewhere.test", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 404


async def test_cseq_method_mismatch_is_400(running, udp_peer: UdpPeer) -> None:
    udp_peer.send(request("OPTIONS", cseq_method="REGISTER", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 400


async def test_cancel_matching_nothing_is_481(running, udp_peer: UdpPeer) -> None:
    udp_peer.send(request("CANCEL", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 481


async def test_unauthenticated_register_is_challenged_statelessly(
    running, udp_peer: UdpPeer
) -> None:
    """RFC 3261 §26.3.2.4: one stateless 401 per unauthenticated request — no transaction
    is kept for Timer J, so a retransmission is challenged again (with a fresh nonce)."""
    switch, _ = running
    register = request(
        "REGISTER", via=udp_via(udp_peer),
        extra=f"Contact: <sip:alice@127.0.0.1:{udp_peer.port}>\r\n",
    )
    udp_peer.send(register)
    first = parse_message(await udp_peer.raw())
    assert first.status == 401
    assert len(switch.core.transactions) == 0
    udp_peer.send(register)
    second = parse_message(await udp_peer.raw())
    assert second.status == 401
    assert second.header("WWW-Authenticate") != first.header("WWW-Authenticate")
    assert switch.metrics.value(
        "softswitch_registrar_registrations_total", {"result": "challenged"}
    ) == 2
    assert len(switch.core.transactions) == 0


async def test_retransmitted_authenticated_register_is_answered_identically_once(
    running, udp_peer: UdpPeer
) -> None:
    """The REGISTER carrying credentials keeps its transaction: its retransmissions get
    the same 200 and the binding is written once (a second processing would also trip
    the nonce-count replay check)."""
    switch, _ = running
    contact = f"Contact: <sip:alice@127.0.0.1:{udp_peer.port}>\r\n"
    udp_peer.send(request("REGISTER", via=udp_via(udp_peer), extra=contact))
    challenge = await udp_peer.response()
    authorization = build_authorization(
        choose_challenge(challenge.header_lines("WWW-Authenticate")),
        "REGISTER", "sip:example.com", "alice", "alice-secret-1",
    )
    register = request("REGISTER", via=udp_via(udp_peer),
                       extra=f"{contact}Authorization: {authorization}\r\n")
    udp_peer.send(register)
    first = await udp_peer.raw()
    udp_peer.send(register)
    udp_peer.send(register)
    second = await udp_peer.raw()
    third = await udp_peer.raw()
    assert parse_message(first).status == 200
    assert first == second == third
    assert switch.metrics.value(
        "softswitch_registrar_registrations_total", {"result": "ok"}
    ) == 1
    assert messages(switch, "in", "REGISTER") == 4
    assert messages(switch, "out", "REGISTER", "200") == 3
    assert len(switch.core.transactions) == 1  # absorbing retransmissions for Timer J


async def test_registrations_are_shed_with_503_and_retry_after_while_overloaded(
    running, udp_peer: UdpPeer
) -> None:
    """Past saturation a new REGISTER gets a stateless 503 with a Retry-After of 5–15 s
    and reaches no handler (answered from its raw lines, or after the parse when they are
    unusual); OPTIONS is still answered; a REGISTER with credentials is not shed; once the
    overload ends registrations are challenged again."""
    switch, _ = running
    switch.core.overloaded = True
    contact = f"Contact: <sip:alice@127.0.0.1:{udp_peer.port}>\r\n"
    udp_peer.send(request("REGISTER", via=udp_via(udp_peer), extra=contact))
    shed = await udp_peer.response()
    assert shed.status == 503
    assert 5 <= int(shed.header("Retry-After") or "0") <= 15
    assert len(switch.core.transactions) == 0
    assert switch.metrics.value(
        "softswitch_registrar_registrations_total", {"result": "challenged"}) == 0
    assert switch.metrics.value(
        "softswitch_sip_requests_rejected_total", {"method": "REGISTER", "status": "503"}) == 1
    assert shed.to.tag and shed.call_id and shed.cseq.method == "REGISTER"
    assert shed.top_via.branch  # answered along the request's Via
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer)))
    assert (await udp_peer.response()).status == 200
    switch.core.overloaded = False
    udp_peer.send(request("REGISTER", via=udp_via(udp_peer), extra=contact))
    challenge = await udp_peer.response()
    assert challenge.status == 401
    # a REGISTER with credentials completes a registration already challenged: not shed
    switch.core.overloaded = True
    authorization = build_authorization(
        choose_challenge(challenge.header_lines("WWW-Authenticate")),
        "REGISTER", "sip:example.com", "alice", "alice-secret-1",
    )
    udp_peer.send(request("REGISTER", via=udp_via(udp_peer),
                          extra=f"{contact}Authorization: {authorization}\r\n"))
    assert (await udp_peer.response()).status == 200
    # a folded header line: not shed from raw lines, but after the full parse
    folded = request("REGISTER", via=udp_via(udp_peer),
                     extra=f"Contact:\r\n <sip:alice@127.0.0.1:{udp_peer.port}>\r\n")
    udp_peer.send(folded)
    assert (await udp_peer.response()).status == 503
    assert switch.metrics.value(
        "softswitch_sip_requests_rejected_total", {"method": "REGISTER", "status": "503"}) == 2


async def test_register_with_digest_over_udp_records_the_real_flow(
    running, udp_peer: UdpPeer
) -> None:
    switch, ports = running
    call_id = "udp-register@test"
    contact = "Contact: <sip:alice@192.0.2.55:5060>\r\nExpires: 300\r\n"
    via = "SIP/2.0/UDP 192.0.2.55:5060;rport"  # a phone behind NAT
    udp_peer.send(request("REGISTER", via=via, call_id=call_id, extra=contact))
    challenge = await udp_peer.response()
    assert challenge.status == 401
    authorization = build_authorization(
        choose_challenge(challenge.header_lines("WWW-Authenticate")),
        "REGISTER", "sip:example.com", "alice", "alice-secret-1",
    )
    udp_peer.send(request("REGISTER", via=via, call_id=call_id,
                          extra=f"{contact}Authorization: {authorization}\r\n"))
    ok = await udp_peer.response()
    assert ok.status == 200
    assert "expires=300" in (ok.header("Contact") or "")
    [binding] = await switch.store.lookup("alice@example.com", time.time())
    assert binding.contact == "sip:alice@192.0.2.55:5060"
    assert (binding.flow.remote_host, binding.flow.remote_port) == ("127.0.0.1", udp_peer.port)
    assert (binding.flow.local_host, binding.flow.local_port) == ("127.0.0.1", ports.udp4)
    assert switch.metrics.value(
        "softswitch_registrar_registrations_total", {"result": "ok"}
    ) == 1


# ---- symmetric response routing (RFC 3581) ---------------------------------------------


async def test_rport_is_filled_and_received_added(running, udp_peer: UdpPeer) -> None:
    udp_peer.send(request("OPTIONS", via="SIP/2.0/UDP 192.0.2.99:5999;rport"))
    response = await udp_peer.response()  # came back to the real source, not 192.0.2.99
    via = response.top_via
    assert via.host == "192.0.2.99" and via.port == 5999
    assert via.params["rport"] == str(udp_peer.port)
    assert via.params["received"] == "127.0.0.1"


async def test_received_is_added_when_sent_by_differs_without_rport(
    running, udp_peer: UdpPeer
) -> None:
    udp_peer.send(request("OPTIONS", via="SIP/2.0/UDP phone.example.net:5060"))
    via = (await udp_peer.response()).top_via
    assert via.params.get("received") == "127.0.0.1"
    assert "rport" not in via.params


async def test_via_is_left_alone_when_it_matches_the_source(running, udp_peer: UdpPeer) -> None:
    udp_peer.send(request("OPTIONS", via=udp_via(udp_peer, rport=False)))
    via = (await udp_peer.response()).top_via
    assert "received" not in via.params and "rport" not in via.params


async def test_only_the_top_via_is_stamped(running, udp_peer: UdpPeer) -> None:
    via = (
        "SIP/2.0/UDP 192.0.2.99:5999;rport;branch=z9hG4bK-top-1, "
        "SIP/2.0/UDP 198.51.100.1:5060;rport"
    )
    udp_peer.send(request("OPTIONS", via=via, branch="z9hG4bK-lower-1"))
    response = await udp_peer.response()
    assert len(response.vias) == 2
    assert response.vias[0].params["received"] == "127.0.0.1"
    assert response.vias[1].params.get("received") is None
    assert response.vias[1].params["rport"] is None


# ---- streams and IPv6 -------------------------------------------------------------------


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[SipResponse]:
    framer = StreamFramer()
    found: list[SipResponse] = []
    async with asyncio.timeout(WAIT):
        while len(found) < count:
            chunk = await reader.read(65536)
            assert chunk, "connection closed before every response came"
            for item in framer.feed(chunk):
                if isinstance(item, bytes):
                    message = parse_message(item)
                    assert isinstance(message, SipResponse)
                    found.append(message)
    return found


async def test_tcp_two_requests_in_one_connection_both_answered_on_it(running) -> None:
    switch, ports = running
    reader, writer = await asyncio.open_connection("127.0.0.1", ports.tcp4)
    try:
        port = writer.get_extra_info("sockname")[1]
        via = f"SIP/2.0/TCP 127.0.0.1:{port}"
        first = request("OPTIONS", via=via, call_id="tcp-one@test")
        second = request("REGISTER", via=via, call_id="tcp-two@test",
                         extra="Contact: <sip:alice@127.0.0.1;transport=tcp>\r\n")
        writer.write(first + second)
        await writer.drain()
        responses = await read_responses(reader, 2)
    finally:
        writer.close()
        await writer.wait_closed()
    by_call = {r.call_id: r.status for r in responses}
    assert by_call == {"tcp-one@test": 200, "tcp-two@test": 401}
    assert messages(switch, "in", "OPTIONS") == 1
    assert messages(switch, "in", "REGISTER") == 1


async def test_ipv6_udp_listener_answers(running) -> None:
    _, ports = running
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        UdpPeer, local_addr=("::1", 0), remote_addr=("::1", ports.udp6)
    )
    try:
        peer.send(request("OPTIONS", uri="sip:[::1]", via=f"SIP/2.0/UDP [::1]:{peer.port};rport"))
        response = await peer.response()
    finally:
        transport.close()
    assert response.status == 200
    assert response.top_via.params["rport"] == str(peer.port)
    assert "received" in response.top_via.params


async def test_ipv6_tcp_listener_answers(running) -> None:
    _, ports = running
    reader, writer = await asyncio.open_connection("::1", ports.tcp6)
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write(request("OPTIONS", via=f"SIP/2.0/TCP [::1]:{port}"))
        await writer.drain()
        [response] = await read_responses(reader, 1)
    finally:
        writer.close()
        await writer.wait_closed()
    assert response.status == 200
    assert "received" not in response.top_via.params


# ---- the metrics reference ----------------------------------------------------------------


def test_docs_metrics_lists_every_metric_with_its_type_and_labels() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")
        for line in docs.splitlines()
        if line.startswith("| `softswitch_")
    }
    metrics = SwitchMetrics()
    documented = set()
    for family in metrics.registry.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert exposed in rows, f"{exposed} is missing from docs/metrics.md"
        _, _, kind, labels, meaning, _ = rows[exposed]
        assert kind.strip() == family.type
        assert meaning.strip()
        collector = getattr(metrics, _attribute(metrics, family.name))
        for label in collector._labelnames:
            assert f"`{label}`" in labels, f"{exposed}: label {label} not documented"
        documented.add(exposed)
    assert set(rows) == documented, "docs/metrics.md lists metrics that do not exist"


def _attribute(metrics: SwitchMetrics, name: str) -> str:
    for attribute, collector in vars(metrics).items():
        if getattr(collector, "_name", None) == name:
            return attribute
    raise AssertionError(f"no SwitchMetrics attribute for {name}")

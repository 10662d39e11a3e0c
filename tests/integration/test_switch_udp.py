"""The running switch process over plain UDP sockets on loopback (IPv4 and IPv6):
OPTIONS, error responses, registrar checks, retransmissions and RFC 3581 rport."""

from __future__ import annotations

import re
import secrets
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from switch_process import (
    LOOPBACK_V6,
    SipDevice,
    SipReply,
    SipUdpClient,
    SwitchProcess,
    digest_md5_authorization,
    md5_challenge,
    running_switch,
)

RFC4475_DIR = Path("/work/shared/testdata/rfc4475")
if not RFC4475_DIR.is_dir():  # the repository may sit beside shared/ rather than in /work
    RFC4475_DIR = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"
MIN_EXPIRES = 30
DEVICES = SipDevice.numbered(2000, 2004)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchProcess]:
    workdir = tmp_path_factory.mktemp("switch-udp")
    with running_switch(
        workdir, DEVICES, ipv6=True, tls=True, registrar={"min_expires": MIN_EXPIRES}
    ) as process:
        yield process


@pytest.fixture
def client(switch: SwitchProcess) -> Iterator[SipUdpClient]:
    with SipUdpClient(switch.address("udp")) as udp_client:
        yield udp_client


def _alive(switch: SwitchProcess) -> None:
    assert switch.process is not None
    assert switch.process.poll() is None, switch.log_text()[-3000:]


def _options(client: SipUdpClient) -> SipReply | None:
    return client.request("OPTIONS", f"sip:{client.server_host_port}")


def test_options_gets_200_with_allow(client: SipUdpClient) -> None:
    reply = _options(client)
    assert reply is not None and reply.status == 200, reply
    allow = {m.strip() for m in (reply.header("Allow") or "").split(",")}
    assert {"REGISTER", "OPTIONS", "ACK", "CANCEL"} <= allow


def test_garbage_datagram_does_not_break_the_switch(
    switch: SwitchProcess, client: SipUdpClient
) -> None:
    client.send_raw(b"\x00\xff garbage \r\n\r\n" + secrets.token_bytes(300))
    client.send_raw(b"NOT SIP AT ALL\r\n\r\n")
    client.send_raw(b"")
    assert client.receive(timeout=0.3) is None  # nothing worth answering
    reply = _options(client)
    assert reply is not None and reply.status == 200, reply
    _alive(switch)


def test_rfc4475_badinv01_gets_400_with_a_reason(
    switch: SwitchProcess, client: SipUdpClient
) -> None:
    message = (RFC4475_DIR / "badinv01.dat").read_bytes()
    client.send_raw(message)
    reply = client.final()
    assert reply is not None, "no answer to badinv01 (responses go to the source address)"
    assert reply.raw.startswith(b"SIP/2.0 400 ")
    # a reason phrase saying what is wrong, not only the generic one
    assert reply.reason.strip() not in ("", "Bad Request"), reply.raw
    assert reply.header("Call-ID") == "badinv01.0ha0isndaksdjasdf3234nas"
    assert reply.header("CSeq") == "8 INVITE"
    assert _options(client) is not None
    _alive(switch)


def test_unknown_method_gets_501(client: SipUdpClient) -> None:
    reply = client.request("FROBNICATE", f"sip:2000@{client.server_host_port}")
    assert reply is not None and reply.status == 501, reply


def test_invite_final_response_is_retransmitted_until_the_ack(client: SipUdpClient) -> None:
    options = _options(client)
    assert options is not None
    calls_handled = "INVITE" in (options.header("Allow") or "")
    uri = f"sip:2001@{client.server_host_port}"
    branch, call_id, from_tag = "z9hG4bK" + secrets.token_hex(8), secrets.token_hex(8), "caller"
    invite = client.request_bytes(
        "INVITE", uri, to_uri=uri, branch=branch, call_id=call_id, cseq=1, from_tag=from_tag,
        headers=[("Contact", f"<sip:2000@{client.host_port}>")],
    )  # fmt: skip
    client.send_raw(invite)
    reply = client.final()
    # without credentials: a proxy challenge when calls are handled, else 405 + Allow
    if calls_handled:
        assert reply is not None and reply.status == 407, reply
        assert reply.header("Proxy-Authenticate"), reply.raw
    else:
        assert reply is not None and reply.status == 405, reply
        assert "REGISTER" in (reply.header("Allow") or "")
    to_tag = re.search(r"tag=([^;>,\s]+)", reply.header("To") or "")
    assert to_tag is not None, reply.raw
    # Over UDP the final response is retransmitted (Timer G, 500 ms) until the ACK comes.
    retransmitted = client.final(timeout=1.5)
    assert retransmitted is not None and retransmitted.raw == reply.raw
    ack = client.request_bytes(
        "ACK", uri, to_uri=uri, branch=branch, call_id=call_id, cseq=1, from_tag=from_tag,
        to_tag=to_tag.group(1),
    )  # fmt: skip
    client.send_raw(ack)
    # the ACK is absorbed by the transaction: no answer, and no more retransmissions
    late = client.receive(timeout=1.2)
    assert late is None, late.raw if late else None


def test_register_for_a_foreign_domain_gets_404(client: SipUdpClient) -> None:
    first, _ = client.register("2000", "pw2000", domain="example.org", contact="<sip:x@h>")
    assert first is not None and first.status == 404, first


def _shape(reply: SipReply, user: str) -> bytes:
    """The response with every per-request or random value masked."""
    text = reply.raw.decode()
    text = text.replace(user, "USER")
    text = re.sub(r'nonce="[^"]*"', 'nonce="N"', text)
    text = re.sub(r"tag=[^;>,\s]+", "tag=T", text)
    text = re.sub(r"branch=[^;,\s]+", "branch=B", text)
    text = re.sub(r"(?m)^Call-ID: .*$", "Call-ID: C", text)
    return text.encode()


def _register_with_password(client: SipUdpClient, user: str, password: str):
    client.cseq = 0  # same CSeq numbers for every attempt compared
    return client.register(user, password, contact=f"<sip:{user}@{client.host_port}>")


def test_unknown_user_and_wrong_password_look_the_same(client: SipUdpClient) -> None:
    unknown_first, unknown_last = _register_with_password(client, "2999", "pw2999")
    wrong_first, wrong_last = _register_with_password(client, "2003", "not-pw2003")
    for reply in (unknown_first, unknown_last, wrong_first, wrong_last):
        assert reply is not None and reply.status == 401, reply
    assert unknown_first is not unknown_last and wrong_first is not wrong_last
    assert _shape(unknown_first, "2999") == _shape(wrong_first, "2003")
    assert _shape(unknown_last, "2999") == _shape(wrong_last, "2003")
    # the nonces themselves have the same form too
    assert len(md5_challenge(unknown_last)["nonce"]) == len(md5_challenge(wrong_last)["nonce"])
    # and the right password still registers (no ban at these thresholds)
    _, ok = _register_with_password(client, "2003", "pw2003")
    assert ok is not None and ok.status == 200, ok


def test_expires_below_minimum_gets_423_with_min_expires(client: SipUdpClient) -> None:
    _, reply = client.register(
        "2001", "pw2001", contact=f"<sip:2001@{client.host_port}>", expires=MIN_EXPIRES - 5
    )
    assert reply is not None and reply.status == 423, reply
    assert reply.header("Min-Expires") == str(MIN_EXPIRES)
    assert client.bindings("2001", "pw2001") == []


def test_retransmitted_register_gets_the_same_response_once_processed(
    switch: SwitchProcess, client: SipUdpClient
) -> None:
    uri = f"sip:{client.server_host_port}"
    aor = f"sip:2002@{client.server_host_port}"
    call_id = secrets.token_hex(8)
    contact = ("Contact", f"<sip:2002@{client.host_port}>")
    challenge = client.request(
        "REGISTER", uri, from_uri=aor, call_id=call_id, cseq=1, headers=[contact]
    )
    assert challenge is not None and challenge.status == 401
    authorization = digest_md5_authorization(
        md5_challenge(challenge), "REGISTER", uri, "2002", "pw2002"
    )
    request = client.request_bytes(
        "REGISTER", uri, from_uri=aor, call_id=call_id, cseq=2,
        headers=[contact, ("Authorization", authorization)],
    )  # fmt: skip
    client.send_raw(request)
    first = client.final()
    assert first is not None and first.status == 200, first
    client.send_raw(request)  # same branch, same nonce count: a retransmission
    again = client.final()
    # Answered by the server transaction: the very same bytes (same To tag, same Date).
    # A second run of the registrar would pick a new tag, and would refuse nc=1 twice.
    assert again is not None and again.raw == first.raw
    assert client.bindings("2002", "pw2002") == [f"<sip:2002@{client.host_port}>;expires=3600"]


def test_rport_and_received_are_filled_in(client: SipUdpClient) -> None:
    reply = _options(client)
    assert reply is not None and reply.status == 200
    via = reply.header("Via") or ""
    assert f";rport={client.local[1]}" in via, via
    assert ";received=127.0.0.1" in via, via


def test_ipv6_options_and_register(switch: SwitchProcess) -> None:
    with SipUdpClient(switch.address("udp", LOOPBACK_V6)) as client:
        assert client.local[0] == LOOPBACK_V6
        reply = _options(client)
        assert reply is not None and reply.status == 200, reply
        via = reply.header("Via") or ""
        assert f"rport={client.local[1]}" in via, via
        _, ok = client.register("2004", "pw2004", contact=f"<sip:2004@{client.host_port}>")
        assert ok is not None and ok.status == 200, ok
        assert client.bindings("2004", "pw2004") == [
            f"<sip:2004@[::1]:{client.local[1]}>;expires=3600"
        ]


def _read_response(stream: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = stream.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_options_over_stream_transports(switch: SwitchProcess, transport: str) -> None:
    """The helper's TCP and TLS listeners (self-signed certificate) answer too."""
    host, port = switch.address(transport)
    with socket.create_connection((host, port), timeout=3) as raw:
        stream: socket.socket = raw
        if transport == "tls":
            context = ssl.create_default_context(cafile=str(switch.config_path.parent / "cert.pem"))
            stream = context.wrap_socket(raw, server_hostname=host)
        local_host, local_port = stream.getsockname()[:2]
        with SipUdpClient(switch.address("udp")) as builder:  # only builds the bytes
            request = builder.request_bytes("OPTIONS", f"sip:{host}:{port}")
        request = request.replace(
            f"SIP/2.0/UDP {builder.host_port}".encode(),
            f"SIP/2.0/{transport.upper()} {local_host}:{local_port}".encode(),
        )
        stream.sendall(request)
        reply = SipReply.parse(_read_response(stream))
    assert reply.status == 200, reply.raw
    assert (reply.header("Via") or "").startswith(f"SIP/2.0/{transport.upper()} "), reply.raw

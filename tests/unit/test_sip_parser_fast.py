"""The SIP message layer's fast paths give exactly what its careful (general) paths give.

parse_message, the Via / name-addr / URI / parameter parsers each try a quick match for
the usual well-formed shape first and fall back to the full RFC 3261 grammar otherwise.
These tests parse varied messages and header values both ways (the careful way by
switching every fast path off) and compare the results or errors field by field, and pin
that the everyday REGISTER / INVITE / 200 OK never needs the general code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import sip.grammar as grammar
import sip.headers as headers
import sip.parser as parser
import sip.uri as uri_module
from sip.message import SipRequest, make_response
from sip.parser import SipParseError, parse_message

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata"
NEVER = re.compile(r"(?!)")  # a pattern that matches nothing: turns a fast path off


def fast_paths_off(patch: pytest.MonkeyPatch) -> None:
    """Every fast path off: only the general grammar code runs."""
    patch.setattr(headers, "_SIMPLE_VIA", NEVER)
    patch.setattr(headers, "_SIMPLE_NAME_ADDR", NEVER)
    patch.setattr(headers, "_SIMPLE_SIP_NAME_ADDR", NEVER)
    patch.setattr(headers, "KNOWN_METHODS", frozenset())
    patch.setattr(uri_module, "_SIMPLE_SIP_URI", NEVER)
    patch.setattr(grammar, "SIMPLE_PARAMS", NEVER)
    patch.setattr(parser, "KNOWN_SPELLINGS", {})
    patch.setattr(parser, "KNOWN_METHODS", frozenset())
    patch.setattr(parser, "_split_lines", lambda head: (parser._unfold_lines(head), True))


def outcome(parse, data: bytes) -> tuple:
    """Everything a parse yields: the message's fields and views, or the error."""
    try:
        msg = parse(data)
    except SipParseError as exc:
        return ("error", exc.status, exc.reason, exc.is_request, exc.headers)
    fields = [type(msg).__name__, msg.start_line(), msg.headers, msg.body, msg.to_bytes()]
    for view in ("vias", "from_", "to", "call_id", "cseq", "contacts", "content_type",
                 "expires", "max_forwards"):
        fields.append(repr(getattr(msg, view)))
    if isinstance(msg, SipRequest):
        fields.append(repr(msg.request_uri))
        fields.append(make_response(msg, 200, to_tag="t1").to_bytes())
    return tuple(fields)


def both_ways(
    data: bytes, monkeypatch: pytest.MonkeyPatch, *, datagram: bool = True
) -> tuple[tuple, tuple]:
    """The outcome with the fast paths, and with the general code only."""

    def parse(raw: bytes):
        return parse_message(raw, datagram=datagram)

    fast = outcome(parse, data)
    with monkeypatch.context() as patch:
        fast_paths_off(patch)
        slow = outcome(parse, data)
    return fast, slow


def request(*header_lines: str, start: str = "INVITE sip:bob@example.com SIP/2.0",
            body: bytes = b"", eol: str = "\r\n") -> bytes:
    head = eol.join([start, *header_lines, f"Content-Length: {len(body)}"])
    return (head + eol + eol).encode("utf-8", "surrogateescape") + body


BASE = (
    "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport",
    "Max-Forwards: 70",
    'From: "Alice" <sip:alice@example.com>;tag=1928301774',
    "To: <sip:bob@example.com>",
    "Call-ID: a84b4c76e66710@192.0.2.10",
    "CSeq: 314159 INVITE",
    "Contact: <sip:alice@192.0.2.10:5060;transport=udp>",
)


def with_header(name: str, replacement: str) -> tuple[str, ...]:
    return tuple(replacement if line.startswith(name + ":") else line for line in BASE)


MESSAGES = {
    "plain": request(*BASE),
    "compact forms": request(
        "v: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", "f: <sip:a@example.com>;tag=1",
        "t: <sip:b@example.com>", "i: cid-1", "CSeq: 1 INVITE", "m: <sip:a@192.0.2.10>",
        "c: application/sdp", body=b"v=0\r\n",
    ),
    "upper-case compact forms": request(
        "V: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", "F: <sip:a@example.com>;tag=1",
        "T: <sip:b@example.com>", "I: cid-1", "CSeq: 1 INVITE",
    ),
    "header name case": request(
        "VIA: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", "from: <sip:a@example.com>;tag=1",
        "tO: <sip:b@example.com>", "call-id: cid-1", "cseq: 1 INVITE", "X-Custom: yes",
        "x-custom: again", "max-FORWARDS: 10",
    ),
    "space before the colon": request(*BASE, "Subject : hello", "X-Tab\t: tab"),
    "IPv6 everywhere": request(
        "Via: SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bK1;received=[2001:db8::9:255]",
        "From: <sip:alice@[2001:db8::10]>;tag=1", "To: <sip:bob@[2001:db8::20]:5070>",
        "Call-ID: v6", "CSeq: 1 INVITE", "Contact: <sips:alice@[::1]:5061;transport=tls>",
        start="INVITE sip:bob@[2001:db8::20] SIP/2.0",
    ),
    "quoted display names with commas and escaped quotes": request(
        *with_header("Contact",
                     r'Contact: "Doe, J" <sip:j@192.0.2.1>;q=0.5, "x\\y" <sip:k@192.0.2.2>'),
    ),
    "escaped quote display in From": request(
        *with_header("From", r'From: "Smith, \"Al\" A." <sip:al@example.com>;tag=9')
    ),
    "unquoted multi-word display name": request(
        *with_header("To", "To: Bob   The\tBuilder <sip:bob@example.com>")
    ),
    "empty quoted display name": request(*with_header("To", 'To: "" <sip:bob@example.com>')),
    "multiple Vias on one line": request(
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa, SIP/2.0/TCP proxy.example.com:5061"
        ";branch=z9hG4bKb ,SIP/2.0/UDP [::1];branch=z9hG4bKc",
        *BASE[1:],
    ),
    "Vias on several lines": request(
        "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKa", *BASE,
        "Record-Route: <sip:p1@192.0.2.1;lr>", "Record-Route: <sip:p2@192.0.2.2;lr>",
    ),
    "params without values": request(
        *with_header("Via", "Via: SIP/2.0/UDP 192.0.2.10;rport;branch=z9hG4bK1;alias"),
    ),
    "param name case": request(
        *with_header("Via", "Via: SIP/2.0/UDP 192.0.2.10;BRANCH=z9hG4bK1;Received=1.2.3.4"),
    ),
    "duplicate Via param": request(
        *with_header("Via", "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1;Branch=z9hG4bK2"),
    ),
    "duplicate To param": request(*with_header("To", "To: <sip:b@example.com>;tag=1;TAG=2")),
    "empty branch": request(*with_header("Via", "Via: SIP/2.0/UDP 192.0.2.10;branch")),
    "LWS inside Via": request(
        *with_header("Via", "Via: SIP / 2.0 / UDP 192.0.2.10 : 5060 ; branch = z9hG4bK1"),
    ),
    "lower-case Via protocol": request(
        *with_header("Via", "Via: sip/2.0/udp host.example.com;branch=z9hG4bK1"),
    ),
    "Via port out of range": request(
        *with_header("Via", "Via: SIP/2.0/UDP 192.0.2.10:65536;branch=z9hG4bK1"),
    ),
    "URI port out of range": request(
        *with_header("Contact", "Contact: <sip:alice@192.0.2.10:99999>")
    ),
    "upper-case URI scheme": request(*with_header("To", "To: <SIP:bob@Example.COM>")),
    "mixed-case URI scheme": request(*with_header("To", "To: <Sip:bob@example.com>")),
    "URI user with ; and @ in a parameter": request(
        *with_header("Contact", "Contact: <sip:1;branch=01@127.0.0.1>;tag=x")
    ),
    "URI password and parameters": request(
        *with_header("Contact",
                     "Contact: <sip:a:pw@host.example.com:5060;transport=TCP;lr;x=a=b>"),
    ),
    "URI with headers part": request(
        *with_header("Contact", "Contact: <sip:a@example.com?subject=hi>")
    ),
    "tel URI": request(*with_header("To", "To: <tel:+1-555-0100;phone-context=x>")),
    "addr-spec without brackets": request(
        *with_header("From", "From: sip:alice@example.com;tag=88"),
    ),
    "non-ASCII around the URI": request(
        *with_header("To", "To: <sip:b\u00e9@example.com;x=\u00a0>")
    ),
    "quoted header param": request(
        *with_header("Contact",
                     'Contact: <sip:a@192.0.2.1>;+sip.instance="<urn:uuid:1>";reg-id=1'),
    ),
    "wildcard contact": request(
        *with_header("Contact", "Contact: *"), "Expires: 0",
        start="REGISTER sip:example.com SIP/2.0",
    ),
    "folded lines": request(
        "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1", "Subject: a long",
        "\tsubject folded", "From: <sip:a@example.com>", "  ;tag=1", *BASE[3:],
    ),
    "folded first header": request("  Via: SIP/2.0/UDP h;branch=z9hG4bK1", *BASE),
    "LF-only line ends": request(*BASE, eol="\n"),
    "LF-only with folding": request(*BASE, "Subject: one", " two", eol="\n"),
    "fold after an empty line (bare LF)": (
        b"OPTIONS sip:u@example.com SIP/2.0\n\r\n o: x\n" + request(*BASE).split(b"\r\n", 1)[1]
    ),
    "mixed CRLF and LF": request(*BASE).replace(b"\r\nTo:", b"\nTo:"),
    "bare CR inside a value": request(*BASE, "Subject: a\rb"),
    "duplicate From": request(*BASE, "From: <sip:other@example.com>;tag=2"),
    "duplicate Call-ID and CSeq": request(*BASE, "Call-ID: x", "CSeq: 2 INVITE"),
    "missing To": request(*(line for line in BASE if not line.startswith("To:"))),
    "malformed header line": request(*BASE, "NoColonHere"),
    "header name only": request(*BASE, "Via"),
    "unknown method": request(*BASE[:-2], "CSeq: 1 FOO", start="FOO sip:b@example.com SIP/2.0"),
    "method not a token": request(*BASE, start="INV@TE sip:b@example.com SIP/2.0"),
    "CSeq method not a token": request(*with_header("CSeq", "CSeq: 1 INV\u00e9TE")),
    "response": (
        b"SIP/2.0 180 Ringing\r\n" + request(*BASE).split(b"\r\n", 1)[1]
    ),
    "response with two Vias": (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKp\r\n"
        + request(*BASE).split(b"\r\n", 1)[1]
    ),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("datagram", [True, False], ids=["datagram", "stream"])
def test_message_fast_equals_careful(
    name: str, datagram: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, slow = both_ways(MESSAGES[name], monkeypatch, datagram=datagram)
    assert fast == slow


def test_messages_cover_success_and_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = {outcome(parse_message, data)[0] == "error" for data in MESSAGES.values()}
    assert kinds == {True, False}
    assert outcome(parse_message, MESSAGES["duplicate From"])[2] == "more than one From header"
    assert outcome(parse_message, MESSAGES["multiple Vias on one line"])[0] == "SipRequest"


def torture_files() -> list[Path]:
    return sorted(TESTDATA.glob("rfc4475/*.dat")) + sorted(TESTDATA.glob("rfc5118/**/*.dat"))


def test_torture_files_present() -> None:
    # RFC 4475's 49 messages; RFC 5118's 12 with LF line ends and again with CRLF.
    assert len(torture_files()) == 49 + 12 + 12


@pytest.mark.parametrize("path", torture_files(), ids=lambda p: p.stem)
def test_torture_message_fast_equals_careful(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = path.read_bytes()
    for datagram in (True, False):  # a stream needs Content-Length
        fast, slow = both_ways(data, monkeypatch, datagram=datagram)
        assert fast == slow


def test_fast_paths_off_reaches_the_general_code(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_paths_off(monkeypatch)
    seen: list[str] = []
    general_via = headers._parse_via_general
    general_uri = uri_module._parse_uri_general

    def spy_via(text: str):
        seen.append("via")
        return general_via(text)

    def spy_uri(text: str):
        seen.append("uri")
        return general_uri(text)

    monkeypatch.setattr(headers, "_parse_via_general", spy_via)
    monkeypatch.setattr(uri_module, "_parse_uri_general", spy_uri)
    parse_message(MESSAGES["plain"])
    assert "via" in seen and "uri" in seen


TYPICAL = [
    request(*BASE, "Supported: replaces, timer", "Allow: INVITE, ACK, BYE",
            "Content-Type: application/sdp", body=b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\n"),
    request(
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-17-2;rport", "Max-Forwards: 70",
        "From: <sip:1001@127.0.0.1>;tag=benchreg17", "To: <sip:1001@127.0.0.1>",
        "Call-ID: 17-bench@127.0.0.1", "CSeq: 2 REGISTER",
        "Contact: <sip:1001@127.0.0.1:5999>", "Expires: 3600",
        'Authorization: Digest username="1001", realm="127.0.0.1", nonce="abc", '
        'uri="sip:127.0.0.1", response="0123456789abcdef0123456789abcdef", algorithm=MD5',
        start="REGISTER sip:127.0.0.1 SIP/2.0",
    ),
    b"SIP/2.0 200 OK\r\n" + request(*BASE).split(b"\r\n", 1)[1],
]


@pytest.mark.parametrize("data", TYPICAL, ids=["INVITE", "REGISTER", "200 OK"])
def test_typical_messages_never_need_the_general_code(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def general(*args, **kwargs):
        raise AssertionError("general path taken for a typical message")

    monkeypatch.setattr(headers, "_parse_via_general", general)
    monkeypatch.setattr(headers, "_parse_name_address_general", general)
    monkeypatch.setattr(uri_module, "_parse_uri_general", general)
    monkeypatch.setattr(grammar, "_parse_params_general", general)
    monkeypatch.setattr(parser, "_unfold_lines", general)
    monkeypatch.setattr(parser, "canonical_name", general)
    msg = parse_message(data)
    assert msg.vias and msg.cseq.seq > 0 and msg.to.uri.host


# --- header values: each fast parser against its general counterpart -----------------


def field_outcome(fn, text: str) -> tuple:
    try:
        return ("ok", repr(fn(text)))
    except Exception as exc:  # GrammarError expected; anything else must match too
        return ("error", type(exc).__name__, str(exc))


VIAS = [
    "SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-1;rport",
    "SIP/2.0/TCP host.example.com;branch=z9hG4bKx;received=192.0.2.1;rport=5060",
    "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKx",
    "SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bKx;alias",
    "SIP/2.0/udp h;branch=z9hG4bK1;maddr=[::1];ttl=1",
    "SIP/2.0/UDP h;branch", "SIP/2.0/UDP h;branch=z9hG4bK1;BRANCH=z9hG4bK2",
    "SIP/2.0/UDP h:65536", "SIP/2.0/UDP h:0", "SIP/2.0/UDP h!x", "SIP/2.0/UDP h;;x",
    "SIP/2.0/UDP  h:5060", "SIP/2.0/UDPh", " SIP/2.0/UDP h", "SIP/2.0/UDP h;x=\"q\"",
    "SIP/3.0/UDP h", "SIP/2.0/UDP h\u00e9", "SIP/2.0/UDP h:5\u0661",
]
NAME_ADDRS = [
    "<sip:1001@127.0.0.1>;tag=benchreg17", '"Alice" <sip:alice@example.com>;tag=1',
    r'"Smith, \"Al\"" <sip:al@example.com>', '"a<b>c" <sip:x@y>', '"" <sip:x@y>',
    "Bob  Smith <sips:bob:pw@example.com:5061;lr>;expires=60;q=0.5", "Bob<sip:b@h>",
    "sip:user@host;tag=1", "<tel:+1-555-0100>", "<sip:alice;day=tue@h?subject=x>",
    "<sip:a@b>;tag=1;TAG=2", "<sip:a@b>;tag", "<sip:a@b>;tag=", "<sip:a@b> ;tag=1",
    "<sip:a@[::1]:5060>", "<SIP:a@b>", "<Sip:a@b>", "<sip:a@b:99999>", "<sip:a@b;x=\u00a0>",
    "<sip:1;branch=01@127.0.0.1>;tag=x", "Al\u00e9 <sip:a@b>", "<sip:a@b>x", "<sip:a@b",
    "Bad\"Name <sip:a@b>", "<urn:service:sos>", "<sip:a:@b>", "<sip:@b>", "<sip:a%20b@c>",
]
URIS = [
    "sip:1001@127.0.0.1:5999", "sips:a:b:c@host;transport=tls;lr", "sip:host", "SIP:a@B",
    "sip:a@b;x=a=b;Y", "sip:a@b;;x", "sip:a@b;=x", "sip:a@b;x=", "sip:a@b?", "sip:a@b?x=1",
    "sip:a@b:65536", "sip:a@b:", "sip:a@[2001:db8::1]:5060", "sip:a@b;x@y", "sip:a;p=1@b",
    "sip:a@b c", "sip:a\u00e9@b", "tel:+15550100;ext=1", "urn:service:sos", "sip:@b",
]
PARAMS = [
    "", ";branch=z9hG4bK1;rport", ";a=b;c;D=E=F", ";a=b;A=c", ";a", ";a=", ";=a", " ;a=b",
    ";a = b", ';a="x;y"', ";a=[::1]", ";a=b c", ";a=\u00e9",
]


@pytest.mark.parametrize("text", VIAS)
def test_via_fast_equals_general(text: str) -> None:
    assert field_outcome(headers.parse_via_value, text) == field_outcome(
        headers._parse_via_general, text
    )


@pytest.mark.parametrize("text", NAME_ADDRS)
def test_name_address_fast_equals_general(text: str) -> None:
    assert field_outcome(headers.parse_name_address, text) == field_outcome(
        headers._parse_name_address_general, text
    )


@pytest.mark.parametrize("text", URIS)
def test_uri_fast_equals_general(text: str) -> None:
    assert field_outcome(uri_module.parse_uri, text) == field_outcome(
        uri_module._parse_uri_general, text
    )


@pytest.mark.parametrize("text", PARAMS)
@pytest.mark.parametrize("stop", ["", ",", ";"])
def test_params_fast_equals_general(text: str, stop: str) -> None:
    assert field_outcome(lambda t: grammar.parse_params(t, 0, stop=stop), text) == field_outcome(
        lambda t: grammar._parse_params_general(t, 0, stop), text
    )


def test_fast_parsers_cover_the_usual_shapes() -> None:
    assert headers._SIMPLE_VIA.fullmatch(VIAS[0]) is not None
    assert headers._SIMPLE_SIP_NAME_ADDR.fullmatch(NAME_ADDRS[0]) is not None
    assert headers._SIMPLE_SIP_NAME_ADDR.fullmatch(NAME_ADDRS[1]) is not None
    assert headers._SIMPLE_NAME_ADDR.fullmatch("<tel:+1-555-0100>") is not None
    assert uri_module._SIMPLE_SIP_URI.fullmatch(URIS[0]) is not None
    assert grammar.SIMPLE_PARAMS.fullmatch(PARAMS[1]) is not None
    # ...and stay away from what only the general grammar reads right.
    assert uri_module._SIMPLE_SIP_URI.fullmatch("sip:a;p=1@b") is None
    assert headers._SIMPLE_SIP_NAME_ADDR.fullmatch("<sip:1;branch=01@127.0.0.1>") is None


def test_fast_results_are_fresh_objects() -> None:
    """Cached views of one message are never shared with another message."""
    a, b = parse_message(MESSAGES["plain"]), parse_message(MESSAGES["plain"])
    a.to.params["tag"] = "mine"
    a.vias[0].params["received"] = "192.0.2.99"
    assert b.to.tag is None and "received" not in b.vias[0].params


def test_cached_views_follow_header_changes() -> None:
    msg = parse_message(MESSAGES["plain"])
    assert msg.to.tag is None
    msg.set_header("To", "<sip:bob@example.com>;tag=zz")
    assert msg.to.tag == "zz"
    msg.prepend_header("v", "SIP/2.0/TCP 192.0.2.99;branch=z9hG4bKnew")
    assert [v.host for v in msg.vias] == ["192.0.2.99", "192.0.2.10"]
    assert msg.header("via").startswith("SIP/2.0/TCP") and msg.header("X-None") is None
    assert msg.header_lines("V") == [msg.headers[0][1], BASE[0].split(": ", 1)[1]]

"""Caller identity towards trunks: the switch asserts the device's DID or its account's
main number, a device may choose only among numbers it owns (spoofed From / PPI / PAI are
replaced and logged), Privacy is honoured; inbound PAI is believed only from trusted
trunks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from sip.message import SipRequest
from switch.identity import (
    ANONYMOUS_FROM,
    asserted_identity,
    caller_identity,
    claimed_identities,
    identity_for_request,
    inbound_identity,
    owned_numbers,
    privacy_requested,
)

DOMAIN = "calls.provider.example"


@dataclass
class Dev:
    account_id: str = "demo"
    extension: str = "1000"
    username: str = "alice"
    display_name: str | None = "Alice"
    did: str | None = "+33123456790"


@dataclass
class Acct:
    id: str = "demo"
    name: str | None = "Demo SA"
    main_number: str | None = "+33123456700"


def invite(*headers: tuple[str, str], from_user: str = "1000") -> SipRequest:
    return SipRequest(
        "INVITE",
        "sip:0612345678@switch.example",
        [
            ("Via", "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKdev"),
            ("From", f'"Whoever" <sip:{from_user}@switch.example>;tag=dev1'),
            ("To", "<sip:0612345678@switch.example>"),
            ("Call-ID", "dev-call"),
            ("CSeq", "1 INVITE"),
            *headers,
        ],
    )


def test_did_is_asserted_with_sip_and_tel_uris() -> None:
    headers = identity_for_request(invite(), Dev(), Acct(), domain=DOMAIN, country="FR")
    assert headers.identity.number == "+33123456790" and headers.identity.source == "did"
    assert headers.p_asserted_identity == (
        f'"Alice" <sip:+33123456790@{DOMAIN};user=phone>',
        "<tel:+33123456790>",
    )
    assert headers.from_ == f'"Alice" <sip:+33123456790@{DOMAIN};user=phone>'
    assert headers.privacy is None
    assert headers.as_headers() == [("P-Asserted-Identity", v) for v in headers.p_asserted_identity]


def test_account_main_number_when_the_device_has_no_did() -> None:
    headers = asserted_identity(
        Dev(did=None, display_name=None), Acct(), False, domain=DOMAIN, include_tel_uri=False
    )
    assert headers.identity.source == "main_number"
    assert headers.p_asserted_identity == (f'"Demo SA" <sip:+33123456700@{DOMAIN};user=phone>',)


def test_no_number_at_all_asserts_nothing() -> None:
    headers = asserted_identity(Dev(did=None), Acct(main_number=None), False, domain=DOMAIN)
    assert headers.identity.number is None and headers.p_asserted_identity == ()
    assert headers.from_ == f'"Alice" <sip:1000@{DOMAIN}>'
    assert owned_numbers(Dev(did=None), Acct(), allow_main_number=False) == ()


@pytest.mark.parametrize(
    "spoof",
    [
        ("P-Preferred-Identity", "<sip:+33999999999@switch.example;user=phone>"),
        ("P-Asserted-Identity", "<tel:+33999999999>"),
    ],
)
def test_spoofed_identity_headers_are_replaced_and_logged(spoof: tuple[str, str]) -> None:
    with capture_logs() as logs:
        headers = identity_for_request(invite(spoof), Dev(), Acct(), domain=DOMAIN, country="FR")
    assert headers.identity.number == "+33123456790"
    assert all("+33999999999" not in value for value in headers.p_asserted_identity)
    assert "+33999999999" not in headers.from_
    ignored = [e for e in logs if e["event"] == "identity.claim_ignored"]
    assert len(ignored) == 1 and ignored[0]["header"] == spoof[0]
    assert ignored[0]["claimed"].endswith("33999999999")


def test_spoofed_from_number_is_replaced() -> None:
    request = invite(from_user="0999999999")  # national form of a number it does not own
    with capture_logs() as logs:
        headers = identity_for_request(request, Dev(), Acct(), domain=DOMAIN, country="FR")
    assert headers.identity.number == "+33123456790"
    assert [e["header"] for e in logs if e["event"] == "identity.claim_ignored"] == ["From"]


def test_extension_in_from_is_not_a_claim() -> None:
    with capture_logs() as logs:
        identity_for_request(invite(), Dev(), Acct(), domain=DOMAIN, country="FR")
    assert not [e for e in logs if e["event"] == "identity.claim_ignored"]
    assert claimed_identities(invite(from_user="alice"), Dev(), "FR") == []


def test_device_may_choose_a_number_it_owns() -> None:
    request = invite(("P-Preferred-Identity", "<sip:0123456700@switch.example;user=phone>"))
    headers = identity_for_request(request, Dev(), Acct(), domain=DOMAIN, country="FR")
    assert headers.identity.number == "+33123456700" and headers.identity.source == "claimed"
    refused = identity_for_request(
        request, Dev(), Acct(), domain=DOMAIN, country="FR", allow_main_number=False
    )
    assert refused.identity.number == "+33123456790"


@pytest.mark.parametrize("value", ["id", "user", "header;critical", "id, user"])
def test_privacy_gives_anonymous_from_keeps_pai_and_adds_privacy_id(value: str) -> None:
    request = invite(("Privacy", value))
    assert privacy_requested(request)
    headers = identity_for_request(request, Dev(), Acct(), domain=DOMAIN, country="FR")
    assert headers.from_ == ANONYMOUS_FROM == '"Anonymous" <sip:anonymous@anonymous.invalid>'
    assert headers.p_asserted_identity[0].startswith('"Alice" <sip:+33123456790@')
    assert headers.privacy == "id"
    assert ("Privacy", "id") in headers.as_headers()


@pytest.mark.parametrize("value", ["none", "critical"])
def test_privacy_none_is_not_anonymous(value: str) -> None:
    assert not privacy_requested(invite(("Privacy", value)))
    assert not caller_identity(Dev(), Acct()).privacy


def inbound(*headers: tuple[str, str]) -> SipRequest:
    return SipRequest(
        "INVITE",
        "sip:+33123456790@switch.example",
        [
            ("Via", "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKprov"),
            ("From", '"Caller" <sip:0612345678@provider.example>;tag=p1'),
            ("To", "<sip:+33123456790@switch.example>"),
            ("Call-ID", "prov-call"),
            ("CSeq", "1 INVITE"),
            *headers,
        ],
    )


def test_inbound_pai_kept_from_trusted_trunk() -> None:
    request = inbound(("P-Asserted-Identity", '"Bob" <sip:+33611111111@provider.example>'))
    identity = inbound_identity(request, trusted=True)
    assert identity.p_asserted_identity == ('"Bob" <sip:+33611111111@provider.example>',)
    assert identity.caller_number == "+33611111111" and identity.display_name == "Bob"
    assert identity.headers_for_device() == [
        ("P-Asserted-Identity", '"Bob" <sip:+33611111111@provider.example>')
    ]


def test_inbound_pai_stripped_from_untrusted_source() -> None:
    request = inbound(("P-Asserted-Identity", "<sip:+33611111111@provider.example>"))
    with capture_logs() as logs:
        identity = inbound_identity(request, trusted=False, source="203.0.113.9")
    assert identity.p_asserted_identity == () and identity.headers_for_device() == []
    assert identity.caller_number == "+33612345678"  # the From, in E.164
    assert [e["source"] for e in logs if e["event"] == "identity.pai_stripped"] == ["203.0.113.9"]


def test_inbound_privacy_hides_pai_from_the_phone() -> None:
    request = inbound(
        ("P-Asserted-Identity", "<sip:+33611111111@provider.example>"), ("Privacy", "id")
    )
    identity = inbound_identity(request, trusted=True)
    assert identity.anonymous and identity.headers_for_device() == []
    assert identity.p_asserted_identity  # still known to the switch (CDR)

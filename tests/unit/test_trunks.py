"""Trunks: their settings, RFC 3263 resolution (with a canned DNS, and dnspython against a
DNS server on loopback), DID mapping, inbound identification, the Request-URI and From
of outbound calls, answering a provider's digest challenge, and client registration."""

from __future__ import annotations

import asyncio
import random
import textwrap
import time
from collections import Counter
from collections.abc import Callable

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rrset
import pytest

from sip.digest import parse_credentials
from sip.message import SipRequest, SipResponse, make_response
from sip.transport import Flow
from switch.auth import DigestAuthenticator, NonceCountTracker, NonceIssuer, StoredCredentials
from switch.dialplan import Destination, DestinationKind
from switch.identity import CallerIdentity
from switch.settings import ConfigError, Settings, load_settings_text
from switch.signalling import RequestTimeout
from switch.trunks import (
    DnsFailure,
    DnspythonLookup,
    NaptrRecord,
    RegistrationState,
    SrvRecord,
    Trunk,
    TrunkRegistration,
    TrunkRegistry,
    TrunkResolver,
    answer_challenge,
    from_header,
    normalise_called_number,
    order_srv_records,
    request_uri_for,
)

PROVIDER_REALM = "provider.test"
SECRET = b"0123456789abcdef0123456789abcdef"

CONFIG = """\
accounts:
  - id: demo
    main_number: "+33123456700"
    devices:
      - {extension: "1000", password: pw-1000-secret, did: "+33123456790"}
      - {extension: "1001", password: pw-1001-secret}
  - id: other
    devices:
      - {extension: "2000", password: pw-2000-secret, did: "+33987654321"}
trunks:
  - id: provider1
    kind: provider
    host: sip.provider.example
    username: "trunkuser"
    password: "trunk-secret"
    realm: provider.test
    register: true
    from_domain: calls.provider.example
    addresses: [198.51.100.0/24]
    dids:
      "+33 1 23 45 67 99": demo/1001
    accounts: [demo]
  - id: peer1
    kind: peer
    host: 192.0.2.10
    port: 5070
    addresses: [192.0.2.10]
    number_format: national
"""


def settings() -> Settings:
    return load_settings_text(CONFIG, "switch.yaml")


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings_text(textwrap.dedent(text), "bad.yaml")
    return caught.value.errors


# ---- settings ----------------------------------------------------------------------------


def test_trunk_settings_load_with_normalised_values() -> None:
    provider, peer = settings().trunks
    assert provider.kind == "provider" and provider.register_to_provider is True
    assert provider.password is not None
    assert provider.password.get_secret_value() == "trunk-secret"
    assert "trunk-secret" not in repr(provider)
    assert provider.dids == {"+33123456799": "demo/1001"}
    assert provider.transport is None and provider.port is None
    assert peer.addresses == ["192.0.2.10/32"]
    assert (peer.host, peer.port, peer.number_format) == ("192.0.2.10", 5070, "national")


def test_trunk_settings_problems_point_at_their_lines() -> None:
    errors = errors_of(
        """\
        accounts:
          - id: demo
            devices:
              - {extension: "1000", password: pw}
        trunks:
          - id: t1
            host: "not a host"
            username: u
            password: p
            dids: {+33123456790: demo/1000, "+33123456791": demo/1999}
            addresses: [192.0.2.10/24]
          - id: t1
            kind: peer
            host: 192.0.2.1
            transport: sctp
        """
    )
    assert "bad.yaml:7: trunks[0].host: must be a host name or an IP address" in errors
    assert any(
        e.startswith("bad.yaml:10: trunks[0].dids.33123456790: must be an E.164")
        and '(quote it: "+33123456790")' in e
        for e in errors
    ), errors
    assert (
        "bad.yaml:10: trunks[0].dids.+33123456791: account 'demo' has no extension '1999'" in errors
    )
    assert any(
        e.startswith("bad.yaml:11: trunks[0].addresses[0]: must be an IP address or network")
        for e in errors
    ), errors
    assert (
        "bad.yaml:12: trunks[1].id: duplicate trunk id 't1' (already used by trunks[0])" in errors
    )
    assert "bad.yaml:15: trunks[1].transport: must be one of 'udp', 'tcp' or 'tls'" in errors


def test_provider_needs_credentials_and_peer_needs_addresses() -> None:
    errors = errors_of(
        """\
        trunks:
          - id: p
            host: sip.example.com
          - id: q
            kind: peer
            host: sip.example.net
            register: true
        """
    )
    assert any(
        e.startswith("bad.yaml:2: trunks[0].username: is required for a provider") for e in errors
    ), errors
    assert any(e.startswith("bad.yaml:2: trunks[0].password: is required") for e in errors)
    assert "bad.yaml:7: trunks[1].register: only a provider can be registered to" in errors
    assert "bad.yaml:4: trunks[1].addresses: a peer needs at least one source address" in errors


def test_trunk_accounts_must_exist() -> None:
    errors = errors_of(
        """\
        trunks:
          - id: p
            host: sip.example.com
            username: u
            password: p
            accounts: [ghost]
        """
    )
    assert errors == ["bad.yaml:6: trunks[0].accounts[0]: unknown account 'ghost'"]


# ---- a canned DNS --------------------------------------------------------------------------


class FakeDns:
    """Answers from dictionaries; records every question asked."""

    def __init__(
        self,
        naptr=None,
        srv=None,
        addresses=None,
        ttl: float = 300.0,
        failing: set[str] | None = None,
    ) -> None:
        self.naptr_records: dict[str, list[NaptrRecord]] = naptr or {}
        self.srv_records: dict[str, list[SrvRecord]] = srv or {}
        self.address_records: dict[str, list[str]] = addresses or {}
        self.ttl = ttl
        self.failing = failing or set()
        self.asked: list[tuple[str, str]] = []

    def _answer(self, kind: str, name: str, table: dict) -> tuple[list, float]:
        self.asked.append((kind, name))
        if name in self.failing:
            raise DnsFailure(f"{kind} {name}: timeout")
        return list(table.get(name, [])), self.ttl

    async def naptr(self, name: str):
        return self._answer("NAPTR", name, self.naptr_records)

    async def srv(self, name: str):
        return self._answer("SRV", name, self.srv_records)

    async def addresses(self, name: str):
        return self._answer("A", name, self.address_records)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def trunk(**fields) -> Trunk:
    base = dict(id="t", kind="provider", host="example.com", username="u", password="p")
    base.update(fields)
    return Trunk(**base)


async def test_ip_literal_is_used_directly_without_dns() -> None:
    dns_ = FakeDns()
    resolver = TrunkResolver(dns_)
    assert await resolver.resolve(trunk(host="192.0.2.7")) == [("udp", ("192.0.2.7", 5060))]
    assert await resolver.resolve(trunk(host="2001:db8::7", transport="tls")) == [
        ("tls", ("2001:db8::7", 5061))
    ]
    assert await resolver.resolve(trunk(host="192.0.2.7", port=5080, transport="tcp")) == [
        ("tcp", ("192.0.2.7", 5080))
    ]
    assert dns_.asked == []


async def test_explicit_port_asks_only_addresses() -> None:
    dns_ = FakeDns(
        addresses={"sip.example.com": ["192.0.2.1", "2001:db8::1"]},
        srv={"_sip._udp.sip.example.com": [SrvRecord(1, 1, 9999, "x.example.com")]},
    )
    targets = await TrunkResolver(dns_).resolve(trunk(host="sip.example.com", port=5070))
    assert targets == [("udp", ("192.0.2.1", 5070)), ("udp", ("2001:db8::1", 5070))]
    assert dns_.asked == [("A", "sip.example.com")]


async def test_explicit_transport_asks_srv_of_that_transport_then_addresses() -> None:
    dns_ = FakeDns(
        srv={
            "_sip._tcp.example.com": [
                SrvRecord(10, 0, 5080, "b.example.com"),
                SrvRecord(5, 0, 5070, "a.example.com"),
            ]
        },
        addresses={
            "a.example.com": ["192.0.2.1"],
            "b.example.com": ["192.0.2.2"],
            "example.com": ["192.0.2.99"],
        },
    )
    targets = await TrunkResolver(dns_).resolve(trunk(transport="tcp"))
    assert targets == [("tcp", ("192.0.2.1", 5070)), ("tcp", ("192.0.2.2", 5080))]
    assert ("NAPTR", "example.com") not in dns_.asked

    # no SRV record for TLS: the host's addresses on the default TLS port
    targets = await TrunkResolver(dns_).resolve(trunk(transport="tls"))
    assert targets == [("tls", ("192.0.2.99", 5061))]


async def test_naptr_then_srv_then_addresses_in_order_and_preference() -> None:
    dns_ = FakeDns(
        naptr={
            "example.com": [
                NaptrRecord(50, 10, "s", "SIP+D2U", "_sip._udp.example.com"),
                NaptrRecord(50, 5, "s", "SIP+D2T", "_sip._tcp.example.com"),
                NaptrRecord(10, 1, "s", "SIP+D2X", "_sip._sctp.example.com"),  # unsupported
                NaptrRecord(20, 1, "S", "SIPS+D2T", "_sips._tcp.example.com"),
                NaptrRecord(5, 1, "u", "SIP+D2U", "!.*!sip:x@example.com!"),  # not an "s" record
            ]
        },
        srv={
            "_sip._udp.example.com": [SrvRecord(1, 0, 5060, "udp.example.com")],
            "_sip._tcp.example.com": [SrvRecord(1, 0, 5060, "tcp.example.com")],
            "_sips._tcp.example.com": [SrvRecord(1, 0, 5061, "tls.example.com")],
            "_sip._sctp.example.com": [SrvRecord(1, 0, 5060, "sctp.example.com")],
        },
        addresses={
            "udp.example.com": ["192.0.2.1"],
            "tcp.example.com": ["192.0.2.2"],
            "tls.example.com": ["192.0.2.3"],
            "sctp.example.com": ["192.0.2.4"],
        },
    )
    targets = await TrunkResolver(dns_).resolve(trunk())
    assert targets == [
        ("tls", ("192.0.2.3", 5061)),  # order 20
        ("tcp", ("192.0.2.2", 5060)),  # order 50, preference 5
        ("udp", ("192.0.2.1", 5060)),  # order 50, preference 10
    ]
    assert ("SRV", "_sip._sctp.example.com") not in dns_.asked


async def test_without_naptr_srv_of_each_transport_then_plain_addresses() -> None:
    dns_ = FakeDns(
        srv={"_sip._tcp.example.com": [SrvRecord(1, 0, 5090, "tcp.example.com")]},
        addresses={"tcp.example.com": ["192.0.2.2"], "example.com": ["192.0.2.9"]},
    )
    assert await TrunkResolver(dns_).resolve(trunk()) == [("tcp", ("192.0.2.2", 5090))]
    assert [q for q in dns_.asked if q[0] == "SRV"] == [
        ("SRV", "_sip._udp.example.com"),
        ("SRV", "_sip._tcp.example.com"),
        ("SRV", "_sips._tcp.example.com"),
    ]
    bare = FakeDns(addresses={"example.com": ["192.0.2.9"]})
    assert await TrunkResolver(bare).resolve(trunk()) == [("udp", ("192.0.2.9", 5060))]


def test_srv_records_are_ordered_by_priority_then_weighted_draw() -> None:
    class Fixed:
        def __init__(self, picks: list[int]) -> None:
            self.picks = picks
            self.asked: list[tuple[int, int]] = []

        def randint(self, a: int, b: int) -> int:
            self.asked.append((a, b))
            return self.picks.pop(0)

    records = [
        SrvRecord(20, 0, 1, "late"),
        SrvRecord(10, 60, 1, "heavy"),
        SrvRecord(10, 40, 1, "light"),
        SrvRecord(10, 0, 1, "zero"),
        SrvRecord(5, 0, 1, ""),
    ]  # "." target: not available, dropped
    rng = Fixed([100, 50, 0])
    ordered = order_srv_records(records, rng)
    # draw 100 of 0..100 picks the last in the running sum (zero, heavy=60, light=100)
    assert [r.target for r in ordered] == ["light", "heavy", "zero", "late"]
    assert rng.asked == [(0, 100), (0, 60)]  # a lone record needs no draw


def test_srv_weights_share_first_place_proportionally() -> None:
    records = [SrvRecord(1, 90, 1, "big"), SrvRecord(1, 10, 1, "small")]
    rng = random.Random(1234)
    firsts = Counter(order_srv_records(records, rng)[0].target for _ in range(2000))
    assert 0.85 < firsts["big"] / 2000 < 0.95, firsts


async def test_resolution_is_cached_for_the_smallest_ttl_and_failures_are_not() -> None:
    clock = Clock()
    dns_ = FakeDns(addresses={"example.com": ["192.0.2.9"]}, ttl=60)
    resolver = TrunkResolver(dns_, clock=clock)
    first = await resolver.resolve(trunk(port=5060))
    asked = len(dns_.asked)
    clock.now += 59
    assert await resolver.resolve(trunk(port=5060)) == first
    assert len(dns_.asked) == asked
    clock.now += 2
    await resolver.resolve(trunk(port=5060))
    assert len(dns_.asked) == asked + 1

    failing = FakeDns(addresses={"example.com": ["192.0.2.9"]}, failing={"example.com"})
    resolver = TrunkResolver(failing, clock=clock)
    assert await resolver.resolve(trunk(port=5060)) == []
    failing.failing.clear()
    assert await resolver.resolve(trunk(port=5060)) == [("udp", ("192.0.2.9", 5060))]


async def test_system_lookup_resolves_localhost() -> None:
    lookup = DnspythonLookup()
    addresses, ttl = await lookup.addresses("localhost")
    assert "127.0.0.1" in addresses or "::1" in addresses
    assert ttl == lookup.address_ttl
    resolver = TrunkResolver(lookup)
    targets = await resolver.resolve(trunk(host="localhost", port=5099))
    assert ("udp", ("127.0.0.1", 5099)) in targets or ("udp", ("::1", 5099)) in targets


# ---- dnspython against a DNS server on loopback ---------------------------------------------

ZONE = {
    ("example.test.", "NAPTR"): [
        '10 50 "s" "SIP+D2T" "" _sip._tcp.example.test.',
        '20 50 "s" "SIP+D2U" "" _sip._udp.example.test.',
    ],
    ("_sip._tcp.example.test.", "SRV"): ["0 5 5070 sip1.example.test."],
    ("_sip._udp.example.test.", "SRV"): ["0 5 5060 sip1.example.test."],
    ("sip1.example.test.", "A"): ["127.0.0.1"],
}


class LoopbackDns(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.questions: list[tuple[str, str]] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.questions.append((name, rdtype))
        rdatas = ZONE.get((name, rdtype))
        if rdatas:
            response.answer.append(dns.rrset.from_text(name, 120, "IN", rdtype, *rdatas))
        elif not any(key[0] == name for key in ZONE):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def test_dnspython_lookup_follows_naptr_srv_a_on_a_loopback_server() -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        LoopbackDns, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = port
        lookup = DnspythonLookup(resolver, system_addresses=False, timeout=2.0)
        records, ttl = await lookup.naptr("example.test")
        assert ttl == 120
        assert sorted((r.order, r.service, r.replacement) for r in records) == [
            (10, "SIP+D2T", "_sip._tcp.example.test"),
            (20, "SIP+D2U", "_sip._udp.example.test"),
        ]
        assert await lookup.srv("_nothing._udp.example.test") == ([], lookup.negative_ttl)
        targets = await TrunkResolver(lookup).resolve(trunk(host="example.test"))
        assert targets == [("tcp", ("127.0.0.1", 5070)), ("udp", ("127.0.0.1", 5060))]
        assert ("_sip._tcp.example.test.", "SRV") in server.questions
    finally:
        transport.close()


# ---- registry: DIDs, inbound, outbound -------------------------------------------------------


def registry(**options) -> TrunkRegistry:
    return TrunkRegistry.from_settings(settings(), None, lookup=FakeDns(), **options)


@pytest.mark.parametrize(
    ("called", "expected"),
    [
        ("+33123456799", ("demo", "1001")),
        ("33123456799", ("demo", "1001")),
        ("0033123456799", ("demo", "1001")),
        ("0123456799", ("demo", "1001")),
        ("+33 1 23-45.67.99;npdi", ("demo", "1001")),
        ("sip:+33123456799@switch.example;user=phone", ("demo", "1001")),
        ("+33123456790", ("demo", "1000")),  # not in the trunk's dids: the device's own DID
        ("0987654321", ("other", "2000")),
        ("+33123456798", None),
        ("1000", None),
        ("garbage", None),
    ],
)
def test_did_target_normalises_the_called_number(called: str, expected) -> None:
    trunks = registry()
    assert trunks.did_target(trunks.get("provider1"), called) == expected


def test_normalised_forms_try_e164_before_national() -> None:
    assert normalise_called_number("33123456799", "FR")[-1] == "+33123456799"
    assert "+33123456799" in normalise_called_number("0123456799", "FR")
    assert normalise_called_number("+33123456799", "FR") == ["+33123456799"]


def test_identify_inbound_by_source_address() -> None:
    trunks = registry()
    flow = Flow("udp", ("127.0.0.1", 5060), ("192.0.2.10", 5070))
    assert trunks.identify_inbound(flow) is trunks.get("peer1")
    assert trunks.identify_inbound("198.51.100.77") is trunks.get("provider1")
    assert trunks.identify_inbound("::ffff:198.51.100.77") is trunks.get("provider1")
    assert trunks.identify_inbound("203.0.113.5") is None
    assert trunks.identify_inbound("not-an-ip") is None


async def test_providers_are_also_recognised_by_their_resolved_addresses() -> None:
    dns_ = FakeDns(
        srv={"_sip._udp.sip.provider.example": [SrvRecord(0, 0, 5060, "edge.provider.example")]},
        addresses={"edge.provider.example": ["203.0.113.44"]},
    )
    trunks = TrunkRegistry.from_settings(settings(), None, lookup=dns_)
    assert trunks.identify_inbound("203.0.113.44") is None
    await trunks.resolve(trunks.get("provider1"))
    assert trunks.identify_inbound("203.0.113.44") is trunks.get("provider1")


def test_for_outbound_picks_the_first_trunk_the_account_may_use() -> None:
    trunks = registry()
    destination = Destination(DestinationKind.EXTERNAL, "0612345678", e164="+33612345678")
    assert trunks.for_outbound("demo", destination) is trunks.get("provider1")
    assert trunks.for_outbound("other", destination) is trunks.get("peer1")
    provider = trunks.get("provider1")
    provider.registration = TrunkRegistration(provider, None, trunks.resolver)  # type: ignore[arg-type]
    provider.registration.state = RegistrationState.FAILED
    assert trunks.for_outbound("demo", destination) is trunks.get("peer1")
    only_provider = TrunkRegistry([trunks.get("provider1")], None, lookup=FakeDns())
    assert only_provider.for_outbound("demo", destination) is trunks.get("provider1")
    assert only_provider.for_outbound("other", destination) is None


def test_request_uri_in_each_number_format() -> None:
    trunks = registry()
    provider, peer = trunks.get("provider1"), trunks.get("peer1")
    national = Destination(DestinationKind.EXTERNAL, "0612345678", e164="+33612345678")
    abroad = Destination(DestinationKind.EXTERNAL, "004420", e164="+442079460000")
    short = Destination(DestinationKind.EXTERNAL, "3949", short_number="3949")
    assert request_uri_for(provider, national) == (
        "sip:+33612345678@sip.provider.example;user=phone"
    )
    assert request_uri_for(peer, national) == "sip:0612345678@192.0.2.10:5070;user=phone"
    assert request_uri_for(peer, abroad) == "sip:00442079460000@192.0.2.10:5070;user=phone"
    assert request_uri_for(peer, short) == "sip:3949@192.0.2.10:5070;user=phone"
    bare = trunk(number_format="e164_without_plus", transport="tcp", host="2001:db8::5")
    assert (
        request_uri_for(bare, national) == "sip:33612345678@[2001:db8::5];user=phone;transport=tcp"
    )
    with pytest.raises(ValueError):
        request_uri_for(provider, Destination(DestinationKind.INTERNAL, "1000", extension="1000"))


def test_from_header_uses_the_asserted_number_or_anonymous() -> None:
    provider = registry().get("provider1")
    caller = CallerIdentity("+33123456790", 'Alice "A"', False, "did")
    assert from_header(provider, caller, tag="abc") == (
        '"Alice \\"A\\"" <sip:+33123456790@calls.provider.example;user=phone>;tag=abc'
    )
    hidden = CallerIdentity("+33123456790", "Alice", True, "did")
    assert from_header(provider, hidden) == '"Anonymous" <sip:anonymous@anonymous.invalid>'
    nobody = CallerIdentity(None, None, False, "none")
    assert from_header(provider, nobody) == "<sip:trunkuser@calls.provider.example>"


# ---- digest as a client ------------------------------------------------------------------


def provider_authenticator(
    username: str = "trunkuser", password: str = "trunk-secret", algorithms=("SHA-256", "MD5")
) -> DigestAuthenticator:
    return DigestAuthenticator(
        PROVIDER_REALM,
        list(algorithms),
        NonceIssuer(SECRET, 300),
        NonceCountTracker(max_entries=100, lifetime=300),
        lambda user: StoredCredentials(user, password=password) if user == username else None,
    )


def outbound_invite() -> SipRequest:
    return SipRequest(
        "INVITE",
        "sip:+33612345678@sip.provider.example;user=phone",
        [
            ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfirst;rport"),
            ("Max-Forwards", "70"),
            ("From", "<sip:+33123456790@calls.provider.example;user=phone>;tag=f1"),
            ("To", "<sip:+33612345678@sip.provider.example;user=phone>"),
            ("Call-ID", "trunk-call-1"),
            ("CSeq", "7 INVITE"),
            ("Content-Type", "application/sdp"),
        ],
        b"v=0\r\n",
    )


def challenge_response(
    auth: DigestAuthenticator, request: SipRequest, status: int = 407, stale: bool = False
) -> SipResponse:
    name = "Proxy-Authenticate" if status == 407 else "WWW-Authenticate"
    return make_response(
        request,
        status,
        to_tag="prov1",
        headers=[(name, c) for c in auth.challenges(time.time(), stale=stale)],
    )


def verify(auth: DigestAuthenticator, request: SipRequest, header: str):
    credentials = parse_credentials(request.header(header) or "")
    return auth.verify(
        credentials, request.method, time.time(), request.body, request_uri=request.uri
    )


@pytest.mark.parametrize(
    ("status", "header"), [(407, "Proxy-Authorization"), (401, "Authorization")]
)
def test_answered_challenge_is_accepted_by_the_provider(status: int, header: str) -> None:
    provider = registry().get("provider1")
    auth = provider_authenticator()
    invite = outbound_invite()
    retry = answer_challenge(provider, invite, challenge_response(auth, invite, status))
    assert retry is not None
    assert verify(auth, retry, header).ok
    assert retry.cseq.seq == 8 and retry.cseq.method == "INVITE"
    assert retry.top_via.branch != "z9hG4bKfirst" and retry.top_via.branch.startswith("z9hG4bK")
    assert retry.body == invite.body and retry.uri == invite.uri
    assert invite.header(header) is None and invite.cseq.seq == 7  # the original is untouched
    assert parse_credentials(retry.header(header)).algorithm == "SHA-256"


def test_same_nonce_twice_is_not_answered_again() -> None:
    provider = registry().get("provider1")
    auth = provider_authenticator(password="another-password")
    invite = outbound_invite()
    first = challenge_response(auth, invite)
    retry = answer_challenge(provider, invite, first)
    assert retry is not None and not verify(auth, retry, "Proxy-Authorization").ok
    # the provider re-sends the very same challenge: wrong credentials, no loop
    again = make_response(
        retry, 407, headers=[(n, v) for n, v in first.headers if n == "Proxy-Authenticate"]
    )
    assert answer_challenge(provider, retry, again) is None
    # a fresh nonce without stale=true also means the credentials were refused
    assert answer_challenge(provider, retry, challenge_response(auth, retry)) is None
    # only a stale nonce is worth another answer
    assert answer_challenge(provider, retry, challenge_response(auth, retry, stale=True))


def test_challenges_per_call_are_bounded() -> None:
    provider = registry().get("provider1")
    auth = provider_authenticator()
    request = outbound_invite()
    answered = 0
    for _ in range(5):
        retry = answer_challenge(provider, request, challenge_response(auth, request, stale=True))
        if retry is None:
            break
        answered += 1
        request = retry
    assert answered == 2


def test_no_answer_without_credentials_or_for_another_realm() -> None:
    auth = provider_authenticator()
    invite = outbound_invite()
    response = challenge_response(auth, invite)
    peer = registry().get("peer1")
    assert answer_challenge(peer, invite, response) is None
    strict = trunk(realm="elsewhere.test")
    assert answer_challenge(strict, invite, response) is None
    assert answer_challenge(trunk(), invite, make_response(invite, 403)) is None
    assert answer_challenge(trunk(), invite, make_response(invite, 407)) is None  # no challenge


# ---- client registration against a scripted provider -------------------------------------


class FakeTransports:
    def listeners(self):
        return [("udp", "127.0.0.1", 5060), ("tcp", "127.0.0.1", 5060)]


class FakeProvider:
    """Plays the provider's registrar inside ``core.request``: digest with a real
    DigestAuthenticator, then 200 granting ``grant`` seconds."""

    def __init__(
        self,
        grant: int = 600,
        password: str = "trunk-secret",
        script: list[Callable[[SipRequest], SipResponse | None]] | None = None,
    ) -> None:
        self.auth = provider_authenticator(password=password, algorithms=("MD5",))
        self.grant = grant
        self.script = script or []
        self.requests: list[SipRequest] = []
        self.transports = FakeTransports()

    async def request(self, request: SipRequest, flow: Flow) -> SipResponse:
        self.requests.append(request)
        if self.script:
            scripted = self.script.pop(0)(request)
            if scripted is None:
                raise RequestTimeout("no final response")
            return scripted
        result = verify(self.auth, request, "Authorization")
        if not result.ok:
            return challenge_response(
                self.auth, request, 401, stale=result.outcome.value == "stale"
            )
        expires = int(request.header("Expires") or 0)
        granted = min(expires, self.grant)
        contact = request.header("Contact").split(";expires=")[0]
        return make_response(
            request, 200, to_tag="reg", headers=[("Contact", f"{contact};expires={granted}")]
        )


class Sleeps:
    """An injected sleep: records delays; blocks for good after ``limit`` calls."""

    def __init__(self, limit: int) -> None:
        self.delays: list[float] = []
        self.limit = limit
        self.reached = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.limit:
            self.reached.set()
            await asyncio.Event().wait()


def registration(core: FakeProvider, sleeps: Sleeps | None = None, **options) -> TrunkRegistration:
    provider = registry().get("provider1")
    provider.host, provider.port = "192.0.2.50", 5060  # static: no DNS
    return TrunkRegistration(
        provider,
        core,
        TrunkResolver(FakeDns()),  # type: ignore[arg-type]
        sleep=sleeps or Sleeps(1),
        **options,
    )


async def run_until(sleeps: Sleeps, reg: TrunkRegistration) -> None:
    reg.start()
    await asyncio.wait_for(sleeps.reached.wait(), 5)


async def test_registration_answers_the_challenge_then_refreshes_with_next_nc() -> None:
    core = FakeProvider(grant=600)
    sleeps = Sleeps(limit=3)
    reg = registration(core, sleeps)
    await run_until(sleeps, reg)
    assert reg.state is RegistrationState.REGISTERED and reg.registrations == 3
    assert sleeps.delays == [300.0, 300.0, 300.0]  # min(600 / 2, 600 - 32)
    first, answered, refresh, second_refresh = core.requests[:4]
    assert first.header("Authorization") is None
    assert first.uri == "sip:192.0.2.50:5060"
    assert first.header("To") == "<sip:trunkuser@calls.provider.example>"
    assert first.header("Contact") == "<sip:trunkuser@127.0.0.1:5060>"
    cseqs = [r.cseq.seq for r in core.requests]
    assert cseqs == sorted(set(cseqs))  # strictly increasing on one Call-ID
    assert len({r.call_id for r in core.requests}) == 1
    creds = [
        parse_credentials(r.header("Authorization")) for r in (answered, refresh, second_refresh)
    ]
    assert [c.nc for c in creds] == ["00000001", "00000002", "00000003"]
    assert len({c.nonce for c in creds}) == 1 and len({c.cnonce for c in creds}) == 3
    assert len(core.requests) == 4  # refreshes needed no new challenge
    await reg.stop()
    unregister = core.requests[-1]
    assert unregister.header("Expires") == "0" and unregister.header("Contact").endswith(
        ";expires=0"
    )
    assert reg.state is RegistrationState.UNREGISTERED
    sent = len(core.requests)
    await reg.stop()  # nothing left to unregister
    assert len(core.requests) == sent


async def test_wrong_password_fails_and_backs_off_bounded() -> None:
    core = FakeProvider(password="the-real-one")
    sleeps = Sleeps(limit=8)
    reg = registration(core, sleeps, retry_initial=5, retry_max=60)
    await run_until(sleeps, reg)
    assert reg.state is RegistrationState.FAILED
    assert "credentials rejected" in (reg.last_error or "")
    assert sleeps.delays == [5, 10, 20, 40, 60, 60, 60, 60]
    assert len(core.requests) == 16  # two REGISTERs per attempt, never a loop
    await reg.stop()


async def test_short_grant_is_refreshed_early_and_423_raises_expiry() -> None:
    def too_brief(request: SipRequest) -> SipResponse:
        return make_response(request, 423, headers=[("Min-Expires", "1800")])

    core = FakeProvider(grant=40, script=[too_brief])
    sleeps = Sleeps(limit=1)
    reg = registration(core, sleeps, expires=900)
    await run_until(sleeps, reg)
    assert core.requests[0].header("Expires") == "900"
    assert core.requests[1].header("Expires") == "1800"
    assert reg.granted_expires == 40
    assert sleeps.delays == [8.0]  # min(40 / 2, 40 - 32)
    assert reg.refresh_delay(1) == 1.0  # never below min_refresh
    await reg.stop()


async def test_timeout_is_a_failure_and_then_recovers() -> None:
    core = FakeProvider(script=[lambda request: None])
    sleeps = Sleeps(limit=2)
    states: list[str] = []
    reg = registration(core, sleeps, on_state_change=lambda r: states.append(str(r.state)))
    await run_until(sleeps, reg)
    assert states == ["registering", "failed", "registering", "registered"]
    assert sleeps.delays[0] == reg.retry_initial
    await reg.stop()
    assert states[-1] == "unregistered"


async def test_registry_starts_and_stops_registrations() -> None:
    core = FakeProvider()
    sleeps = Sleeps(limit=1)
    trunks = TrunkRegistry.from_settings(
        settings(),
        core,
        lookup=FakeDns(
            addresses={"sip.provider.example": ["192.0.2.50"]},
        ),
        sleep=sleeps,
    )  # type: ignore[arg-type]
    trunks.start()
    assert set(trunks.registrations) == {"provider1"}  # the peer does not register
    await asyncio.wait_for(sleeps.reached.wait(), 5)
    assert trunks.states() == {"provider1": "registered"}
    assert trunks.get("provider1").registration is trunks.registrations["provider1"]
    await trunks.stop()
    assert core.requests[-1].header("Expires") == "0"


async def test_contact_host_overrides_the_advertised_address() -> None:
    core = FakeProvider()
    sleeps = Sleeps(limit=1)
    reg = registration(core, sleeps, contact_host="2001:db8::20")
    await run_until(sleeps, reg)
    assert core.requests[0].header("Contact") == "<sip:trunkuser@[2001:db8::20]:5060>"
    assert core.requests[0].top_via.host.strip("[]") == "2001:db8::20"
    await reg.stop()

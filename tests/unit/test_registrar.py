"""The registrar (RFC 3261 §10.3) driven in-process through `Registrar.handle_register`,
with an injected clock, against the memory store and a real redis-server."""

from __future__ import annotations

import hashlib
import itertools
import textwrap
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from sip.digest import build_authorization, parse_challenge
from sip.headers import parse_contact_list
from sip.message import SipRequest, SipResponse
from sip.parser import parse_message
from sip.transport import Flow
from switch.app import Softswitch
from switch.settings import load_settings_text

T0 = 1_700_000_000.0
DOMAIN = "example.com"
REGISTRAR_URI = f"sip:{DOMAIN}"
NONCE_LIFETIME = 30
MAX_FAILURES_PER_SOURCE = 3
LOCAL = ("127.0.0.1", 5060)
PHONE = ("192.0.2.10", 5062)
ATTACKER = ("203.0.113.66", 5070)

ALICE_PASSWORD = "alice-secret-1"
BOB_PASSWORD = "bob-secret-2"
CAROL_PASSWORD = "carol-secret-3"
BOB_HA1_MD5 = hashlib.md5(f"bob:{DOMAIN}:{BOB_PASSWORD}".encode()).hexdigest()
CAROL_HA1_SHA256 = hashlib.sha256(f"carol:{DOMAIN}:{CAROL_PASSWORD}".encode()).hexdigest()

SETTINGS_YAML = textwrap.dedent(
    """\
    switch:
      domains: [@DOMAIN@, 127.0.0.1]
      user_agent: softswitch-test
    listen:
      - {transport: udp, host: 127.0.0.1, port: 5060}
    registrar:
      min_expires: 60
      max_expires: 3600
      default_expires: 1800
      max_contacts_per_aor: 5
    auth:
      realm: @DOMAIN@
      algorithms: @ALGORITHMS@
      nonce_lifetime: @NONCE_LIFETIME@
      secret: "0123456789abcdef0123456789abcdef"
      ban:
        max_failures_per_source: @MAX_FAILURES@
        max_failures_per_user: 50
        window: 60
        ban_time: 600
    store:
      backend: @BACKEND@
      redis_url: "@REDIS_URL@"
      key_prefix: "@PREFIX@"
    accounts:
      - id: acme
        devices:
          - {extension: "1001", username: alice, password: "@ALICE_PASSWORD@"}
          - {extension: "1002", username: bob, ha1_md5: "@BOB_HA1@"}
          - {extension: "1003", username: carol, ha1_sha256: "@CAROL_HA1@"}
    """
)

_counter = itertools.count(1)


def make_switch(backend: str, redis_url: str = "redis://127.0.0.1:6379/0",
                algorithms: str | None = None) -> Softswitch:
    values = {
        "@DOMAIN@": DOMAIN,
        "@ALGORITHMS@": algorithms or "[SHA-256, MD5]",
        "@NONCE_LIFETIME@": str(NONCE_LIFETIME),
        "@MAX_FAILURES@": str(MAX_FAILURES_PER_SOURCE),
        "@BACKEND@": backend,
        "@REDIS_URL@": redis_url,
        "@PREFIX@": f"test-reg-{uuid.uuid4().hex[:8]}:",
        "@ALICE_PASSWORD@": ALICE_PASSWORD,
        "@BOB_HA1@": BOB_HA1_MD5,
        "@CAROL_HA1@": CAROL_HA1_SHA256,
    }
    text = SETTINGS_YAML
    for placeholder, replacement in values.items():
        text = text.replace(placeholder, replacement)
    return Softswitch(load_settings_text(text, "test.yaml"))


@pytest.fixture(params=["memory", "redis"])
async def switch(request: pytest.FixtureRequest) -> AsyncIterator[Softswitch]:
    if request.param == "memory":
        instance = make_switch("memory")
    else:
        instance = make_switch("redis", request.getfixturevalue("redis_server"))
    try:
        yield instance
    finally:
        await instance.store.close()


def udp_flow(source: tuple[str, int] = PHONE) -> Flow:
    return Flow("udp", LOCAL, source)


def register_request(
    *,
    call_id: str,
    cseq: int,
    user: str = "alice",
    to: str | None = None,
    request_uri: str = REGISTRAR_URI,
    contacts: list[str] | None = None,
    expires: int | str | None = None,
    authorization: str | None = None,
) -> SipRequest:
    headers = [
        ("Via", f"SIP/2.0/UDP {PHONE[0]}:{PHONE[1]};branch=z9hG4bK{next(_counter):08d};rport"),
        ("Max-Forwards", "70"),
        ("From", f"<sip:{user}@{DOMAIN}>;tag=f{next(_counter)}"),
        ("To", to if to is not None else f"<sip:{user}@{DOMAIN}>"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} REGISTER"),
        ("User-Agent", "test-phone/1.0"),
    ]
    for contact in contacts or []:
        headers.append(("Contact", contact))
    if expires is not None:
        headers.append(("Expires", str(expires)))
    if authorization is not None:
        headers.append(("Authorization", authorization))
    return SipRequest("REGISTER", request_uri, headers)


def challenge_for(response: SipResponse, algorithm: str):
    for value in response.header_lines("WWW-Authenticate"):
        challenge = parse_challenge(value)
        if challenge is not None and challenge.algorithm == algorithm:
            return challenge
    raise AssertionError(f"no {algorithm} challenge in {response.header_lines('WWW-Authenticate')}")


def contact_expiries(response: SipResponse) -> dict[str, int]:
    """Contact URI → expires param of a 200 OK."""
    contacts = parse_contact_list(response.header_values("Contact"))
    assert isinstance(contacts, list)
    return {str(c.uri): int(c.params["expires"]) for c in contacts}


def value(switch: Softswitch, name: str, **labels: str) -> float:
    return switch.metrics.value(name, labels)


def registrations(switch: Softswitch, result: str) -> float:
    return value(switch, "softswitch_registrar_registrations_total", result=result)


@dataclass
class Phone:
    """A SIP user agent registering one AOR: one Call-ID, increasing CSeq."""

    switch: Softswitch
    user: str = "alice"
    password: str = ALICE_PASSWORD
    source: tuple[str, int] = PHONE
    algorithm: str = "SHA-256"
    call_id: str = field(default_factory=lambda: f"{uuid.uuid4().hex}@phone")
    cseq: int = 0

    async def send(self, now: float, **kwargs) -> SipResponse:
        self.cseq += 1
        kwargs.setdefault("user", self.user)
        request = register_request(call_id=self.call_id, cseq=self.cseq, **kwargs)
        return await self.switch.registrar.handle_register(request, udp_flow(self.source), now)

    def answer(self, challenge_response: SipResponse, password: str | None = None,
               nc: int = 1) -> str:
        challenge = challenge_for(challenge_response, self.algorithm)
        return build_authorization(
            challenge, "REGISTER", REGISTRAR_URI, self.user,
            self.password if password is None else password, nc=nc,
        )

    async def register(self, now: float, **kwargs) -> SipResponse:
        """Challenge, then the authenticated REGISTER (the usual two round trips)."""
        password = kwargs.pop("password", None)
        first = await self.send(now, **kwargs)
        assert first.status == 401, first
        return await self.send(now, authorization=self.answer(first, password), **kwargs)


CONTACT = "sip:alice@192.0.2.10:5062"


# ---- challenge and authentication ------------------------------------------------------


async def test_no_credentials_gets_one_challenge_per_algorithm_in_configured_order(
    switch: Softswitch,
) -> None:
    response = await Phone(switch).send(T0, contacts=[f"<{CONTACT}>"])
    assert response.status == 401
    challenges = [parse_challenge(v) for v in response.header_lines("WWW-Authenticate")]
    assert [c.algorithm for c in challenges] == ["SHA-256", "MD5"]
    assert all(c.realm == DOMAIN and "auth" in c.qop and not c.stale for c in challenges)
    assert len({c.nonce for c in challenges}) == 1
    assert response.to.tag
    assert registrations(switch, "challenged") == 1
    assert await switch.store.lookup(f"alice@{DOMAIN}", T0) == []


async def test_configured_md5_first_order_is_kept() -> None:
    switch = make_switch("memory", algorithms="[MD5, SHA-256]")
    response = await Phone(switch).send(T0, contacts=[f"<{CONTACT}>"])
    algorithms = [parse_challenge(v).algorithm for v in response.header_lines("WWW-Authenticate")]
    assert algorithms == ["MD5", "SHA-256"]


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
async def test_correct_answer_registers_and_lists_the_contact(
    switch: Softswitch, algorithm: str
) -> None:
    phone = Phone(switch, algorithm=algorithm)
    response = await phone.register(T0, contacts=[f"<{CONTACT}>"], expires=600)
    assert response.status == 200
    assert contact_expiries(response) == {CONTACT: 600}
    assert response.header("Date") is not None
    assert response.header("Server") == "softswitch-test"
    [binding] = await switch.store.lookup(f"alice@{DOMAIN}", T0)
    assert binding.contact == CONTACT
    assert binding.expires_at == T0 + 600
    assert binding.flow.remote_host == PHONE[0] and binding.flow.remote_port == PHONE[1]
    assert binding.account_id == "acme" and binding.device == "1001"
    assert registrations(switch, "ok") == 1
    assert registrations(switch, "challenged") == 1


@pytest.mark.parametrize(
    ("user", "password", "algorithm", "status"),
    [
        ("bob", BOB_PASSWORD, "MD5", 200),  # stored HA1 MD5 serves MD5
        ("bob", BOB_PASSWORD, "SHA-256", 401),  # ... but cannot serve SHA-256
        ("carol", CAROL_PASSWORD, "SHA-256", 200),
        ("carol", CAROL_PASSWORD, "MD5", 401),
        ("bob", "not-bobs-password", "MD5", 401),
    ],
)
async def test_ha1_only_credentials(
    switch: Softswitch, user: str, password: str, algorithm: str, status: int
) -> None:
    phone = Phone(switch, user=user, password=password, algorithm=algorithm)
    response = await phone.register(T0, contacts=[f"<sip:{user}@192.0.2.10:5062>"])
    assert response.status == status
    bindings = await switch.store.lookup(f"{user}@{DOMAIN}", T0)
    assert len(bindings) == (1 if status == 200 else 0)
    if status == 401:
        assert value(
            switch, "softswitch_registrar_auth_failures_total", reason="bad_credentials"
        ) == 1


async def test_stale_nonce_gets_a_challenge_with_stale_true_then_works(
    switch: Softswitch,
) -> None:
    phone = Phone(switch)
    first = await phone.send(T0, contacts=[f"<{CONTACT}>"])
    later = T0 + NONCE_LIFETIME + 1
    stale = await phone.send(later, contacts=[f"<{CONTACT}>"], authorization=phone.answer(first))
    assert stale.status == 401
    challenges = [parse_challenge(v) for v in stale.header_lines("WWW-Authenticate")]
    assert len(challenges) == 2 and all(c.stale for c in challenges)
    assert registrations(switch, "stale") == 1
    assert value(switch, "softswitch_registrar_auth_failures_total",
                 reason="bad_nonce") == 0
    ok = await phone.send(later, contacts=[f"<{CONTACT}>"], authorization=phone.answer(stale))
    assert ok.status == 200


async def test_replayed_nonce_count_is_refused(switch: Softswitch) -> None:
    phone = Phone(switch)
    first = await phone.send(T0, contacts=[f"<{CONTACT}>"])
    authorization = phone.answer(first, nc=1)
    assert (await phone.send(T0, contacts=[f"<{CONTACT}>"], authorization=authorization)).status \
        == 200
    replay = await phone.send(T0 + 1, contacts=[f"<{CONTACT}>"], authorization=authorization)
    assert replay.status == 401
    assert not any(parse_challenge(v).stale for v in replay.header_lines("WWW-Authenticate"))
    assert value(switch, "softswitch_registrar_auth_failures_total", reason="bad_nonce") == 1
    assert registrations(switch, "auth_failed") == 1
    # The next count on the same nonce is accepted.
    following = phone.answer(first, nc=2)
    assert (await phone.send(T0 + 2, contacts=[f"<{CONTACT}>"],
                             authorization=following)).status == 200


async def test_unknown_user_and_wrong_password_look_identical(switch: Softswitch) -> None:
    wrong_password = Phone(switch, source=("192.0.2.20", 5060))
    first = await wrong_password.send(T0, contacts=[f"<{CONTACT}>"])
    refused_wrong = await wrong_password.send(
        T0, contacts=[f"<{CONTACT}>"], authorization=wrong_password.answer(first, "guess")
    )
    unknown = Phone(switch, user="mallory", password="guess", source=("192.0.2.21", 5060))
    first = await unknown.send(T0, contacts=["<sip:mallory@192.0.2.21>"])
    refused_unknown = await unknown.send(
        T0, contacts=["<sip:mallory@192.0.2.21>"], authorization=unknown.answer(first)
    )
    assert refused_wrong.status == refused_unknown.status == 401
    assert refused_wrong.reason == refused_unknown.reason
    assert [n for n, _ in refused_wrong.headers] == [n for n, _ in refused_unknown.headers]
    assert len(refused_wrong.header_lines("WWW-Authenticate")) == 2
    assert value(switch, "softswitch_registrar_auth_failures_total",
                 reason="bad_credentials") == 2


async def test_credentials_for_another_realm_are_challenged_not_failed(
    switch: Softswitch,
) -> None:
    phone = Phone(switch)
    first = await phone.send(T0, contacts=[f"<{CONTACT}>"])
    foreign = phone.answer(first).replace(f'realm="{DOMAIN}"', 'realm="elsewhere.test"')
    response = await phone.send(T0, contacts=[f"<{CONTACT}>"], authorization=foreign)
    assert response.status == 401
    assert registrations(switch, "challenged") == 2
    assert registrations(switch, "auth_failed") == 0


# ---- who may register what ------------------------------------------------------------


async def test_to_of_another_user_is_forbidden(switch: Softswitch) -> None:
    phone = Phone(switch)
    response = await phone.register(
        T0, to=f"<sip:bob@{DOMAIN}>", contacts=[f"<{CONTACT}>"]
    )
    assert response.status == 403
    assert await switch.store.lookup(f"bob@{DOMAIN}", T0) == []
    assert await switch.store.lookup(f"alice@{DOMAIN}", T0) == []
    assert registrations(switch, "rejected") == 1


async def test_to_by_extension_registers_the_device_aor(switch: Softswitch) -> None:
    phone = Phone(switch)
    response = await phone.register(T0, to=f"<sip:1001@{DOMAIN}>", contacts=[f"<{CONTACT}>"])
    assert response.status == 200
    assert len(await switch.store.lookup(f"alice@{DOMAIN}", T0)) == 1


async def test_foreign_domain_in_request_uri_is_404(switch: Softswitch) -> None:
    response = await Phone(switch).send(
        T0, request_uri="sip:other.example.net", contacts=[f"<{CONTACT}>"]
    )
    assert response.status == 404
    assert not response.header_lines("WWW-Authenticate")


async def test_to_with_an_unknown_scheme_is_400(switch: Softswitch) -> None:
    # In the style of RFC 4475 §3.1.2.12 (unksm2): To and Contact hold non-SIP URIs.
    raw = (
        b"REGISTER sip:example.com SIP/2.0\r\n"
        b"To: isbn:2983792873\r\n"
        b"From: <http://www.example.com>;tag=3234233\r\n"
        b"Call-ID: unksm2-style.1@host.example.com\r\n"
        b"CSeq: 234902 REGISTER\r\n"
        b"Max-Forwards: 70\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.21:5060;branch=z9hG4bKkdjuw-style\r\n"
        b"Contact: <name:John_Smith>\r\n"
        b"l: 0\r\n\r\n"
    )
    request = parse_message(raw)
    assert isinstance(request, SipRequest)
    response = await switch.registrar.handle_register(request, udp_flow(), T0)
    assert response.status == 400
    assert "To" in response.reason


# ---- Expires and Contact handling ------------------------------------------------------


@pytest.mark.parametrize(
    ("contact", "expires_header", "granted"),
    [
        (f"<{CONTACT}>;expires=120", 600, 120),  # the parameter wins over the header
        (f"<{CONTACT}>", 600, 600),  # the header
        (f"<{CONTACT}>", None, 1800),  # the configured default
        (f"<{CONTACT}>;expires=7200", None, 3600),  # clamped to max_expires
        (f"<{CONTACT}>", 99999999999, 3600),  # absurd values too
        (f"<{CONTACT}>", 60, 60),  # exactly min_expires is fine
    ],
)
async def test_expiry_choice(
    switch: Softswitch, contact: str, expires_header: int | None, granted: int
) -> None:
    response = await Phone(switch).register(T0, contacts=[contact], expires=expires_header)
    assert response.status == 200
    assert contact_expiries(response) == {CONTACT: granted}
    [binding] = await switch.store.lookup(f"alice@{DOMAIN}", T0)
    assert binding.expires_at == T0 + granted


@pytest.mark.parametrize(
    ("contact", "expires_header"),
    [(f"<{CONTACT}>;expires=30", None), (f"<{CONTACT}>", 59), (f"<{CONTACT}>;expires=1", 600)],
)
async def test_too_brief_is_423_with_min_expires(
    switch: Softswitch, contact: str, expires_header: int | None
) -> None:
    response = await Phone(switch).register(T0, contacts=[contact], expires=expires_header)
    assert response.status == 423
    assert response.header("Min-Expires") == "60"
    assert await switch.store.lookup(f"alice@{DOMAIN}", T0) == []


async def test_wildcard_with_expires_zero_removes_every_binding(switch: Softswitch) -> None:
    phone = Phone(switch)
    ok = await phone.register(
        T0, contacts=[f"<{CONTACT}>", "<sip:alice@192.0.2.11:5060>"], expires=600
    )
    assert ok.status == 200 and len(contact_expiries(ok)) == 2
    removed = await phone.register(T0 + 10, contacts=["*"], expires=0)
    assert removed.status == 200
    assert removed.header("Contact") is None
    assert await switch.store.lookup(f"alice@{DOMAIN}", T0 + 10) == []
    assert registrations(switch, "unregister") == 1


@pytest.mark.parametrize("expires_header", [None, 600])
async def test_wildcard_without_expires_zero_is_400(
    switch: Softswitch, expires_header: int | None
) -> None:
    phone = Phone(switch)
    assert (await phone.register(T0, contacts=[f"<{CONTACT}>"])).status == 200
    response = await phone.register(T0 + 1, contacts=["*"], expires=expires_header)
    assert response.status == 400
    assert len(await switch.store.lookup(f"alice@{DOMAIN}", T0 + 1)) == 1


@pytest.mark.parametrize("contacts", [["*", f"<{CONTACT}>"], [f"*, <{CONTACT}>"]])
async def test_wildcard_mixed_with_contacts_is_400(
    switch: Softswitch, contacts: list[str]
) -> None:
    phone = Phone(switch)
    assert (await phone.register(T0, contacts=[f"<{CONTACT}>"])).status == 200
    response = await phone.register(T0 + 1, contacts=contacts, expires=0)
    assert response.status == 400
    assert len(await switch.store.lookup(f"alice@{DOMAIN}", T0 + 1)) == 1


async def test_more_contacts_than_allowed_is_403_and_changes_nothing(switch: Softswitch) -> None:
    phone = Phone(switch)
    assert (await phone.register(T0, contacts=[f"<{CONTACT}>"])).status == 200
    many = [f"<sip:alice@198.51.100.{i}>" for i in range(1, 6)]  # 1 + 5 > 5
    response = await phone.register(T0 + 1, contacts=many)
    assert response.status == 403
    assert [b.contact for b in await switch.store.lookup(f"alice@{DOMAIN}", T0 + 1)] == [CONTACT]


async def test_removing_one_contact_with_expires_zero(switch: Softswitch) -> None:
    phone = Phone(switch)
    await phone.register(T0, contacts=[f"<{CONTACT}>", "<sip:alice@192.0.2.11>"], expires=600)
    response = await phone.register(T0 + 5, contacts=[f"<{CONTACT}>;expires=0"])
    assert response.status == 200
    assert contact_expiries(response) == {"sip:alice@192.0.2.11": 595}


async def test_query_without_contact_lists_the_bindings(switch: Softswitch) -> None:
    phone = Phone(switch)
    await phone.register(T0, contacts=[f"<{CONTACT}>"], expires=600)
    query = await phone.register(T0 + 100, contacts=[])
    assert query.status == 200
    assert contact_expiries(query) == {CONTACT: 500}
    [binding] = await switch.store.lookup(f"alice@{DOMAIN}", T0 + 100)
    assert binding.expires_at == T0 + 600  # a query changes nothing


async def test_several_contacts_with_q_are_listed_by_preference(switch: Softswitch) -> None:
    phone = Phone(switch)
    response = await phone.register(
        T0,
        contacts=[
            "<sip:alice@192.0.2.11>;q=0.2",
            f"<{CONTACT}>;q=0.9, <sip:alice@192.0.2.12>;q=0.5;expires=300",
        ],
        expires=900,
    )
    assert response.status == 200
    contacts = parse_contact_list(response.header_values("Contact"))
    assert [(str(c.uri), c.params["q"], c.params["expires"]) for c in contacts] == [
        (CONTACT, "0.9", "900"),
        ("sip:alice@192.0.2.12", "0.5", "300"),
        ("sip:alice@192.0.2.11", "0.2", "900"),
    ]


@pytest.mark.parametrize(
    ("contact", "reason"),
    [
        ("<sip:alice@192.0.2.10:5062", "Bad Contact"),  # unterminated
        ("<http://www.example.com/alice>", "Contact must be a SIP or tel URI"),
        (f"<{CONTACT}>;q=1.5", "Bad q parameter"),
        (f"<{CONTACT}>;expires=soon", "Bad expires parameter"),
        ("<>", "Bad Contact"),
    ],
)
async def test_bad_contact_is_400_with_a_reason(
    switch: Softswitch, contact: str, reason: str
) -> None:
    response = await Phone(switch).register(T0, contacts=[contact])
    assert response.status == 400
    assert response.reason.startswith(reason)
    assert await switch.store.lookup(f"alice@{DOMAIN}", T0) == []


async def test_refresh_with_an_older_cseq_is_refused(switch: Softswitch) -> None:
    phone = Phone(switch)
    assert (await phone.register(T0, contacts=[f"<{CONTACT}>"])).status == 200
    phone.cseq -= 3  # a delayed copy of an earlier REGISTER of the same Call-ID
    response = await phone.register(T0 + 1, contacts=[f"<{CONTACT}>"], expires=120)
    assert response.status == 500
    [binding] = await switch.store.lookup(f"alice@{DOMAIN}", T0 + 1)
    assert binding.expires_at == T0 + 1800


# ---- bans -------------------------------------------------------------------------------


async def test_repeated_failures_ban_the_source(switch: Softswitch) -> None:
    attacker = Phone(switch, password="wrong", source=ATTACKER)
    for attempt in range(MAX_FAILURES_PER_SOURCE):
        response = await attacker.register(T0 + attempt, contacts=[f"<{CONTACT}>"])
        assert response.status == 401
    assert value(switch, "softswitch_registrar_bans_total", trigger="source") == 1
    assert switch.metrics.value("softswitch_registrar_banned_sources") == 1
    # Banned: even the right password is refused, before any challenge.
    banned = await Phone(switch, source=ATTACKER).send(T0 + 5, contacts=[f"<{CONTACT}>"])
    assert banned.status == 403
    assert not banned.header_lines("WWW-Authenticate")
    assert registrations(switch, "banned") == 1
    assert registrations(switch, "auth_failed") == MAX_FAILURES_PER_SOURCE
    # Another address is not affected.
    assert (await Phone(switch).register(T0 + 5, contacts=[f"<{CONTACT}>"])).status == 200
    # The ban ends after ban_time.
    after = await Phone(switch, source=ATTACKER).register(T0 + 700, contacts=[f"<{CONTACT}>"])
    assert after.status == 200
    assert value(switch, "softswitch_registrar_bans_total", trigger="source") == 1


async def test_a_success_forgets_earlier_failures(switch: Softswitch) -> None:
    phone = Phone(switch)
    for attempt in range(MAX_FAILURES_PER_SOURCE - 1):
        response = await phone.register(T0 + attempt, contacts=[f"<{CONTACT}>"], password="typo")
        assert response.status == 401
    assert (await phone.register(T0 + 3, contacts=[f"<{CONTACT}>"])).status == 200
    response = await phone.register(T0 + 4, contacts=[f"<{CONTACT}>"], password="typo")
    assert response.status == 401
    assert value(switch, "softswitch_registrar_bans_total", trigger="source") == 0

"""SIP trunks: where external calls leave and arrive.

A trunk is either a *provider* (the switch authenticates to it with digest credentials,
and may register to it) or a *peer* (trusted by source address both ways). This module
holds, for the call control:

- :class:`Trunk`, the runtime form of one ``trunks:`` entry of the settings, and
  :class:`TrunkRegistry`, which picks the trunk for an outbound call
  (:meth:`~TrunkRegistry.for_outbound`), recognises inbound calls by source address
  (:meth:`~TrunkRegistry.identify_inbound`) and maps called numbers to devices
  (:meth:`~TrunkRegistry.did_target`);
- RFC 3263 server location (:class:`TrunkResolver`: NAPTR → SRV → A/AAAA with the
  RFC 2782 priority/weight order, and the shortcuts for IP literals, explicit ports and
  explicit transports), cached for the records' TTL. NAPTR and SRV are asked through
  dnspython's asyncio resolver; addresses through the system resolver (``/etc/hosts``,
  nsswitch) by default. Tests inject a :class:`DnsLookup` of their own;
- what an outbound request to a trunk carries (:func:`request_uri_for`,
  :func:`from_header`) and the client side of digest authentication for INVITEs
  (:func:`answer_challenge`);
- :class:`TrunkRegistration`, the client REGISTER to a provider, refreshed before expiry
  and retried with a bounded backoff.

Passwords never reach a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import random
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

import phonenumbers
import structlog

from sip.dialog import new_call_id, new_tag
from sip.digest import (
    DigestChallenge,
    build_authorization,
    choose_challenge,
    parse_challenge,
    parse_credentials,
)
from sip.grammar import GrammarError, split_top_level
from sip.headers import parse_contact_list, parse_via_value
from sip.message import SipRequest, SipResponse
from sip.transaction import new_branch
from sip.transport import Flow
from sip.uri import SipUri

from .dialplan import Destination
from .identity import ANONYMOUS_FROM, CallerIdentity
from .signalling import RequestTimeout

if TYPE_CHECKING:
    from .settings import Settings, TrunkSettings
    from .signalling import SignallingCore

__all__ = [
    "DEFAULT_PORTS",
    "DnsFailure",
    "DnsLookup",
    "DnspythonLookup",
    "NaptrRecord",
    "RegistrationState",
    "SrvRecord",
    "Target",
    "Trunk",
    "TrunkRegistration",
    "TrunkRegistry",
    "TrunkResolver",
    "answer_challenge",
    "format_number_for_trunk",
    "from_header",
    "normalise_called_number",
    "open_flow",
    "order_srv_records",
    "request_uri_for",
    "sent_by",
]

log = structlog.get_logger("switch.trunks")

Target = tuple[str, tuple[str, int]]
"""One place to send to: (transport, (IP address, port))."""

DEFAULT_PORTS: dict[str, int] = {"udp": 5060, "tcp": 5060, "tls": 5061}
# RFC 3263 §4.1 NAPTR services the switch can use, and the transport each means.
NAPTR_SERVICES: dict[str, str] = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
# SRV owner prefixes per transport (RFC 3263 §4.2).
SRV_PREFIXES: dict[str, str] = {"udp": "_sip._udp.", "tcp": "_sip._tcp.", "tls": "_sips._tcp."}
# Without NAPTR records nor a configured transport, the SRV names are asked in this order
# (the client's preference, RFC 3263 §4.1): UDP is what every provider offers.
SRV_FALLBACK_ORDER: tuple[str, ...] = ("udp", "tcp", "tls")

MAX_CHALLENGE_ANSWERS = 2  # per Call-ID: one challenge, plus one stale/new nonce
_CHALLENGE_MEMORY = 4096  # Call-IDs remembered for the loop guard
_AUTH_HEADERS = {
    401: ("WWW-Authenticate", "Authorization"),
    407: ("Proxy-Authenticate", "Proxy-Authorization"),
}


# --------------------------------------------------------------------------------------
# Trunks
# --------------------------------------------------------------------------------------


def _ip_literal(host: str) -> str | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _uri_host(host: str) -> str:
    """A host as written in a SIP URI (IPv6 literals in brackets)."""
    literal = _ip_literal(host)
    if literal is not None and ":" in literal:
        return f"[{literal}]"
    return literal or host


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True, eq=False)
class Trunk:
    """One configured trunk, ready for the call control.

    ``dids`` maps E.164 numbers (with ``+``) to ``(account_id, extension)``.
    ``accounts`` empty means every account may call out through it.
    ``number_format`` says how called and calling numbers are written towards it:
    ``e164`` (``+33123456789``), ``e164_without_plus`` (``33123456789``) or ``national``
    (``0123456789`` for numbers of ``country``, the international dialling form from
    ``country`` for the others).
    """

    id: str
    kind: str  # "provider" | "peer"
    host: str  # a name, or an IP literal in canonical form (no brackets)
    port: int | None = None
    transport: str | None = None  # None: chosen by RFC 3263 (NAPTR, then SRV, then UDP)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    realm: str | None = None
    register: bool = False
    register_expires: int = 3600
    from_domain: str | None = None
    networks: tuple[Network, ...] = ()
    dids: dict[str, tuple[str, str]] = field(default_factory=dict)
    accounts: frozenset[str] = frozenset()
    number_format: str = "e164"
    trust_identity: bool = True
    country: str = "FR"
    channels: int | None = None  # concurrent calls the trunk carries (None: no limit)
    emergency: object | None = None  # the trunk's emergency profile settings, if any
    # runtime state
    resolved_addresses: set[str] = field(default_factory=set, repr=False)
    registration: TrunkRegistration | None = field(default=None, repr=False)
    _challenge_answers: OrderedDict[str, int] = field(default_factory=OrderedDict, repr=False)

    @classmethod
    def from_settings(cls, section: TrunkSettings, country: str = "FR") -> Trunk:
        dids: dict[str, tuple[str, str]] = {}
        for number, target in section.dids.items():
            account_id, _, extension = target.partition("/")
            dids[number] = (account_id, extension)
        password = section.password.get_secret_value() if section.password else None
        return cls(
            id=section.id,
            kind=section.kind,
            host=section.host,
            port=section.port,
            transport=section.transport,
            username=section.username,
            password=password,
            realm=section.realm,
            register=section.register_to_provider,
            register_expires=section.register_expires,
            from_domain=section.from_domain,
            networks=tuple(ipaddress.ip_network(a) for a in section.addresses),
            dids=dids,
            accounts=frozenset(section.accounts),
            number_format=section.number_format,
            trust_identity=section.trust_identity,
            country=country,
            channels=section.channels,
            emergency=section.emergency,
        )

    @property
    def is_provider(self) -> bool:
        return self.kind == "provider"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username) and self.password is not None

    @property
    def domain(self) -> str:
        """The SIP domain of the trunk as written in From / To / AORs."""
        return _uri_host(self.from_domain or self.host)

    @property
    def hostport(self) -> str:
        host = _uri_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    def allows(self, account_id: str) -> bool:
        return not self.accounts or account_id in self.accounts

    def matches_source(self, address: str) -> bool:
        """True when ``address`` is in the trunk's networks, or (providers) is one of the
        addresses its host last resolved to."""
        literal = _ip_literal(address)
        if literal is None:
            return False
        ip = ipaddress.ip_address(literal)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in network for network in self.networks):
            return True
        return self.is_provider and str(ip) in self.resolved_addresses

    def __repr__(self) -> str:
        return f"Trunk({self.id}, {self.kind}, host={self.hostport})"


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------

_VISUAL = str.maketrans("", "", " \t-.()/")


def normalise_called_number(number: str, country: str) -> list[str]:
    """The E.164 forms (with ``+``) a number received from a trunk may stand for, most
    likely first: ``+33123456789`` as is; ``33123456789`` (E.164 without ``+``);
    ``0033…`` (international prefix); ``0123456789`` (national, for ``country``)."""
    text = number.split(";", 1)[0].strip().translate(_VISUAL)
    if text.lower().startswith(("sip:", "sips:", "tel:")):
        text = text.split(":", 1)[1].split("@", 1)[0]
    forms: list[str] = []
    digits = text[1:] if text.startswith("+") else text
    if not digits.isdigit() or not 2 <= len(digits) <= 17:
        return forms
    if text.startswith("+"):
        forms.append("+" + digits)
    else:
        if digits.startswith("00"):
            forms.append("+" + digits[2:])
        with contextlib.suppress(phonenumbers.NumberParseException):
            parsed = phonenumbers.parse(digits, country)
            if phonenumbers.is_possible_number(parsed):
                forms.append(
                    phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
                )
        forms.append("+" + digits)
    unique: list[str] = []
    for form in forms:
        if form not in unique and len(form) > 2:
            unique.append(form)
    return unique


def format_number_for_trunk(trunk: Trunk, e164: str) -> str:
    """An E.164 number written as the trunk wants it (see :class:`Trunk`)."""
    if trunk.number_format == "e164":
        return e164
    if trunk.number_format == "e164_without_plus":
        return e164.lstrip("+")
    try:
        parsed = phonenumbers.parse(e164, None)
    except phonenumbers.NumberParseException:
        return e164.lstrip("+")
    region = phonenumbers.region_code_for_number(parsed)
    if region == trunk.country or parsed.country_code == phonenumbers.country_code_for_region(
        trunk.country
    ):
        text = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    else:
        text = phonenumbers.format_out_of_country_calling_number(parsed, trunk.country)
    return "".join(c for c in text if c.isdigit())


def _destination_number(trunk: Trunk, destination: Destination) -> str:
    if destination.e164:
        return format_number_for_trunk(trunk, destination.e164)
    if destination.short_number:
        return destination.short_number
    if destination.emergency_number:
        return destination.emergency_number
    raise ValueError(f"destination {destination.kind} has no number to send to a trunk")


def request_uri_for(trunk: Trunk, destination: Destination) -> str:
    """The Request-URI of an outbound INVITE to the trunk, e.g.
    ``sip:+33123456789@sip.provider.example;user=phone`` (``;transport=`` added for a
    configured TCP/TLS transport). ValueError for a destination without a number
    (internal or invalid)."""
    number = _destination_number(trunk, destination)
    params = ";user=phone"
    if trunk.transport in ("tcp", "tls"):
        params += f";transport={trunk.transport}"
    return f"sip:{number}@{trunk.hostport}{params}"


def _quoted(display: str) -> str:
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def from_header(trunk: Trunk, identity: CallerIdentity, *, tag: str | None = None) -> str:
    """The From of a call leaving to ``trunk`` for a caller identity: the asserted number
    in the trunk's number format at the trunk's domain (``from_domain`` or host), or
    ``"Anonymous" <sip:anonymous@anonymous.invalid>`` when the caller asked for privacy.
    A caller without any number gets the trunk's username as user part."""
    suffix = f";tag={tag}" if tag else ""
    if identity.privacy:
        return ANONYMOUS_FROM + suffix
    if identity.number:
        user = format_number_for_trunk(trunk, identity.number)
        uri = f"sip:{user}@{trunk.domain};user=phone"
    else:
        uri = f"sip:{trunk.username or 'anonymous'}@{trunk.domain}"
    display = f"{_quoted(identity.display_name)} " if identity.display_name else ""
    return f"{display}<{uri}>{suffix}"


# --------------------------------------------------------------------------------------
# Digest as a client
# --------------------------------------------------------------------------------------


def _replace_top_via_branch(request: SipRequest, branch: str) -> None:
    for index, (name, value) in enumerate(request.headers):
        if name.lower() in ("via", "v"):
            values = split_top_level(value, ",")
            via = parse_via_value(values[0])
            via.params["branch"] = branch
            via.params.pop("received", None)
            request.headers[index] = ("Via", ", ".join([str(via), *values[1:]]))
            break
    request._cache.clear()


def _pick_challenge(trunk: Trunk, values: Iterable[str]) -> DigestChallenge | None:
    candidates = list(values)
    if trunk.realm is not None:
        candidates = [
            value
            for value in candidates
            if (parsed := parse_challenge(value)) is not None and parsed.realm == trunk.realm
        ]
    return choose_challenge(candidates)


def _answered_nonces(request: SipRequest, header: str, realm: str) -> set[str]:
    """Nonces the request's credentials for ``realm`` answer."""
    nonces: set[str] = set()
    for value in request.header_lines(header):
        credentials = parse_credentials(value)
        if credentials is not None and credentials.realm == realm:
            nonces.add(credentials.nonce)
    return nonces


def _credentials_refused(request: SipRequest, header: str, challenge: DigestChallenge) -> bool:
    """A challenge to a request that already answered one for this realm means the
    credentials were refused, unless the server says only the nonce was stale (and it
    is a new nonce): answering again would loop."""
    answered = _answered_nonces(request, header, challenge.realm)
    if not answered:
        return False
    return challenge.nonce in answered or not challenge.stale


def answer_challenge(
    trunk: Trunk, request: SipRequest, response: SipResponse, *, cnonce: str | None = None
) -> SipRequest | None:
    """Answer a provider's 401/407 to one of our requests (INVITE, or any other).

    Returns a copy of ``request`` with CSeq + 1, a new top Via branch and the
    ``Authorization`` (401) or ``Proxy-Authorization`` (407) for the strongest usable
    challenge. None when the trunk has no credentials, no challenge is usable (or none
    is for the configured ``realm``), the request already carried credentials for that
    realm and the challenge is not a ``stale=true`` one with a new nonce (wrong
    credentials: answering again would loop), or this Call-ID was already answered
    :data:`MAX_CHALLENGE_ANSWERS` times.
    """
    headers = _AUTH_HEADERS.get(response.status)
    if headers is None:
        return None
    challenge_name, credentials_name = headers
    if not trunk.has_credentials:
        log.info("trunk.challenge_without_credentials", trunk=trunk.id, status=response.status)
        return None
    challenge = _pick_challenge(trunk, response.header_lines(challenge_name))
    if challenge is None:
        log.info(
            "trunk.challenge_unusable",
            trunk=trunk.id,
            status=response.status,
            realm_expected=trunk.realm,
        )
        return None
    if _credentials_refused(request, credentials_name, challenge):
        log.warning(
            "trunk.credentials_rejected",
            trunk=trunk.id,
            realm=challenge.realm,
            method=request.method,
        )
        return None
    call_id = request.call_id
    answered = trunk._challenge_answers.get(call_id, 0)
    if answered >= MAX_CHALLENGE_ANSWERS:
        log.warning("trunk.challenge_loop", trunk=trunk.id, call_id=call_id)
        return None
    try:
        value = build_authorization(
            challenge,
            request.method,
            request.uri,
            trunk.username or "",
            trunk.password or "",
            nc=1,
            cnonce=cnonce,
            body=request.body,
        )
    except ValueError as exc:
        log.info("trunk.challenge_unusable", trunk=trunk.id, error=str(exc))
        return None
    trunk._challenge_answers[call_id] = answered + 1
    trunk._challenge_answers.move_to_end(call_id)
    while len(trunk._challenge_answers) > _CHALLENGE_MEMORY:
        trunk._challenge_answers.popitem(last=False)

    retry = SipRequest(request.method, request.uri, list(request.headers), request.body)
    _replace_top_via_branch(retry, new_branch())
    retry.set_header("CSeq", f"{request.cseq.seq + 1} {request.method}")
    retry.remove_header(credentials_name)
    retry.add_header(credentials_name, value)
    return retry


# --------------------------------------------------------------------------------------
# RFC 3263 resolution
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NaptrRecord:
    order: int
    preference: int
    flags: str
    service: str
    replacement: str  # without the trailing dot


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # without the trailing dot; "" means "service not available here"


class DnsFailure(Exception):
    """A lookup that could not be answered (timeout, SERVFAIL, no name server): unlike
    "no such record", it is not cached."""


class DnsLookup(Protocol):
    """What :class:`TrunkResolver` asks of DNS. Each method returns the records and the
    TTL in seconds to cache them (for an empty answer: how long to remember that), and
    raises :class:`DnsFailure` when the question could not be answered."""

    async def naptr(self, name: str) -> tuple[list[NaptrRecord], float]: ...

    async def srv(self, name: str) -> tuple[list[SrvRecord], float]: ...

    async def addresses(self, name: str) -> tuple[list[str], float]: ...


class DnspythonLookup:
    """NAPTR and SRV through dnspython's asyncio resolver; addresses through the system
    resolver (``getaddrinfo``: ``/etc/hosts``, then DNS) unless ``system_addresses`` is
    False, in which case A and AAAA are asked through dnspython too.

    ``resolver`` is a ``dns.asyncresolver.Resolver`` (default: one reading
    ``/etc/resolv.conf``, made on first use).
    """

    def __init__(
        self,
        resolver: Any = None,
        *,
        system_addresses: bool = True,
        address_ttl: float = 60.0,
        negative_ttl: float = 30.0,
        timeout: float = 3.0,
    ) -> None:
        self._resolver = resolver
        self.system_addresses = system_addresses
        self.address_ttl = address_ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout

    def _dns(self) -> Any:
        if self._resolver is None:
            import dns.asyncresolver

            try:
                self._resolver = dns.asyncresolver.Resolver()
            except Exception as exc:  # no /etc/resolv.conf, unreadable configuration
                raise DnsFailure(f"no DNS resolver configuration: {exc}") from None
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> tuple[list[Any], float]:
        import dns.exception
        import dns.resolver

        resolver = self._dns()
        try:
            answer = await resolver.resolve(name, rdtype, lifetime=self.timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], self.negative_ttl
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"{rdtype} {name}: {exc.__class__.__name__}") from None
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self.negative_ttl
        return list(answer), ttl

    async def naptr(self, name: str) -> tuple[list[NaptrRecord], float]:
        rdatas, ttl = await self._query(name, "NAPTR")
        records = [
            NaptrRecord(
                order=int(r.order),
                preference=int(r.preference),
                flags=_text(r.flags),
                service=_text(r.service),
                replacement=r.replacement.to_text(omit_final_dot=True),
            )
            for r in rdatas
        ]
        return records, ttl

    async def srv(self, name: str) -> tuple[list[SrvRecord], float]:
        rdatas, ttl = await self._query(name, "SRV")
        records = []
        for r in rdatas:
            target = r.target.to_text(omit_final_dot=True)
            records.append(
                SrvRecord(
                    int(r.priority),
                    int(r.weight),
                    int(r.port),
                    "" if target in (".", "") else target,
                )
            )
        return records, ttl

    async def addresses(self, name: str) -> tuple[list[str], float]:
        if not self.system_addresses:
            found: list[str] = []
            ttls: list[float] = []
            failures = 0
            for rdtype in ("AAAA", "A"):
                try:
                    rdatas, ttl = await self._query(name, rdtype)
                except DnsFailure:
                    failures += 1
                    continue
                found.extend(str(r.address) for r in rdatas)
                ttls.append(ttl)
            if failures == 2:
                raise DnsFailure(f"A/AAAA {name}: no answer")
            return found, min(ttls) if ttls else self.negative_ttl
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), self.timeout
            )
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return [], self.negative_ttl
            raise DnsFailure(f"getaddrinfo {name}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise DnsFailure(f"getaddrinfo {name}: {exc!r}") from None
        addresses: list[str] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
            if address not in addresses:
                addresses.append(address)
        return addresses, self.address_ttl


def _text(value: bytes | str) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


class _RandomInt(Protocol):
    def randint(self, a: int, b: int) -> int: ...


def order_srv_records(records: Iterable[SrvRecord], rng: _RandomInt) -> list[SrvRecord]:
    """RFC 2782 order: lowest priority first; within one priority, a weighted random
    draw (records of weight 0 first in the running sum, so they are rarely picked
    first when others have weight)."""
    by_priority: dict[int, list[SrvRecord]] = {}
    for record in records:
        if record.target:
            by_priority.setdefault(record.priority, []).append(record)
    ordered: list[SrvRecord] = []
    for priority in sorted(by_priority):
        group = sorted(by_priority[priority], key=lambda r: r.weight != 0)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total) if total > 0 else 0
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


class TrunkResolver:
    """RFC 3263 §4 for a trunk's host, with a TTL cache.

    - an IP literal: used as is (port: configured, else 5060 / 5061 for TLS);
    - a name with an explicit port: A/AAAA only (transport: configured, else UDP);
    - a name with an explicit transport: SRV of that transport, else A/AAAA on the
      default port;
    - otherwise NAPTR (services ``SIP+D2U``, ``SIP+D2T``, ``SIPS+D2T`` with flag ``s``,
      by order then preference) → SRV of each replacement; without usable NAPTR, SRV for
      UDP, TCP then TLS; without any, A/AAAA over UDP on port 5060.

    The result is cached for the smallest TTL met on the way; lookups that failed
    (:class:`DnsFailure`) are not cached.
    """

    def __init__(
        self,
        lookup: DnsLookup | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: _RandomInt | None = None,
        negative_ttl: float = 30.0,
        max_targets: int = 16,
    ) -> None:
        self.lookup: DnsLookup = lookup if lookup is not None else DnspythonLookup()
        self.clock = clock
        self.rng: _RandomInt = rng if rng is not None else random.SystemRandom()
        self.negative_ttl = negative_ttl
        self.max_targets = max_targets
        self._cache: dict[tuple[str, int | None, str | None], tuple[float, list[Target]]] = {}

    def clear(self) -> None:
        self._cache.clear()

    async def resolve(self, trunk: Trunk) -> list[Target]:
        """Where to send to ``trunk``, in order of preference (empty when unresolvable)."""
        key = (trunk.host.lower(), trunk.port, trunk.transport)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return list(cached[1])
        failures: list[str] = []
        targets, ttl = await self._resolve(trunk.host, trunk.port, trunk.transport, failures)
        targets = _unique(targets)[: self.max_targets]
        if not targets:
            ttl = min(ttl, self.negative_ttl)
        if not failures and ttl > 0:
            self._cache[key] = (now + ttl, targets)
        trunk.resolved_addresses.update(address for _, (address, _) in targets)
        if not targets:
            log.warning("trunk.unresolvable", trunk=trunk.id, host=trunk.host)
        return list(targets)

    # each helper returns (targets, ttl)
    async def _ask(self, method: str, name: str, failures: list[str]) -> tuple[list[Any], float]:
        try:
            return await getattr(self.lookup, method)(name)
        except DnsFailure as exc:
            failures.append(str(exc))
            log.info("trunk.dns_failure", name=name, error=str(exc))
            return [], 0.0

    async def _addresses(
        self, name: str, transport: str, port: int, failures: list[str]
    ) -> tuple[list[Target], float]:
        addresses, ttl = await self._ask("addresses", name, failures)
        return [(transport, (address, port)) for address in addresses], ttl

    async def _srv(
        self, name: str, transport: str, failures: list[str]
    ) -> tuple[list[Target], float, bool]:
        """Targets of one SRV name, their TTL, and whether any SRV record existed."""
        records, ttl = await self._ask("srv", name, failures)
        ttls = [ttl]
        targets: list[Target] = []
        for record in order_srv_records(records, self.rng):
            found, address_ttl = await self._addresses(
                record.target, transport, record.port, failures
            )
            targets.extend(found)
            ttls.append(address_ttl)
        return targets, min(ttls), bool(records)

    async def _resolve(
        self, host: str, port: int | None, transport: str | None, failures: list[str]
    ) -> tuple[list[Target], float]:
        literal = _ip_literal(host)
        if literal is not None:
            chosen = transport or "udp"
            return [(chosen, (literal, port or DEFAULT_PORTS[chosen]))], math.inf
        if port is not None:
            return await self._addresses(host, transport or "udp", port, failures)
        if transport is not None:
            targets, ttl, had_srv = await self._srv(
                SRV_PREFIXES[transport] + host, transport, failures
            )
            if had_srv:
                return targets, ttl
            found, address_ttl = await self._addresses(
                host, transport, DEFAULT_PORTS[transport], failures
            )
            return found, min(ttl, address_ttl)

        records, naptr_ttl = await self._ask("naptr", host, failures)
        ttls = [naptr_ttl]
        usable = sorted(
            (
                r
                for r in records
                if r.flags.lower() == "s"
                and r.service.upper() in NAPTR_SERVICES
                and r.replacement not in ("", ".")
            ),
            key=lambda r: (r.order, r.preference),
        )
        targets: list[Target] = []
        for record in usable:
            found, ttl, _ = await self._srv(
                record.replacement, NAPTR_SERVICES[record.service.upper()], failures
            )
            targets.extend(found)
            ttls.append(ttl)
        if targets:
            return targets, min(ttls)
        for chosen in SRV_FALLBACK_ORDER:
            found, ttl, _ = await self._srv(SRV_PREFIXES[chosen] + host, chosen, failures)
            targets.extend(found)
            ttls.append(ttl)
        if targets:
            return targets, min(ttls)
        found, ttl = await self._addresses(host, "udp", DEFAULT_PORTS["udp"], failures)
        ttls.append(ttl)
        return found, min(ttls)


def _unique(targets: Iterable[Target]) -> list[Target]:
    seen: set[Target] = set()
    out: list[Target] = []
    for target in targets:
        if target not in seen:
            seen.add(target)
            out.append(target)
    return out


# --------------------------------------------------------------------------------------
# Flows to a trunk
# --------------------------------------------------------------------------------------


def _same_scope(local_host: str, remote_host: str) -> int:
    """How well a listening address suits a remote: 2 same scope, 1 wildcard, 0 other."""
    try:
        local = ipaddress.ip_address(local_host)
        remote = ipaddress.ip_address(remote_host)
    except ValueError:
        return 0
    if local.version != remote.version:
        return -1
    if local.is_unspecified:
        return 1
    return 2 if local.is_loopback == remote.is_loopback else 0


async def open_flow(
    core: SignallingCore,
    transport: str,
    address: tuple[str, int],
    *,
    server_hostname: str | None = None,
) -> Flow | None:
    """A flow to send requests to ``address``: UDP leaves from a listening UDP socket of
    the right address family (loopback for loopback remotes); TCP/TLS reuse or open a
    connection (opened with a CRLF keep-alive ping, RFC 5626 §4.4.1). None when there is
    no way to reach it."""
    if transport == "udp":
        best: tuple[int, tuple[str, int]] | None = None
        for kind, host, port in core.transports.listeners():
            if kind != "udp":
                continue
            score = _same_scope(host, address[0])
            if score >= 0 and (best is None or score > best[0]):
                best = (score, (host, port))
        return Flow("udp", best[1], address) if best is not None else None
    return await core.transports.send_to(
        b"\r\n\r\n", transport, address, server_hostname=server_hostname
    )


def sent_by(core: SignallingCore, flow: Flow) -> str:
    """host:port for Via and Contact on a flow (streams: the listening port)."""
    host, port = flow.local
    if flow.transport != "udp":
        for kind, listen_host, listen_port in core.transports.listeners():
            if kind == flow.transport and listen_host == host:
                port = listen_port
                break
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------
# Registration to a provider
# --------------------------------------------------------------------------------------


class RegistrationState(StrEnum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"


class _RegistrationFailed(Exception):
    pass


class TrunkRegistration:
    """Keeps the switch registered to a provider (``register: true``).

    REGISTER goes through ``core.request`` to the first reachable RFC 3263 target;
    401/407 are answered with the trunk's credentials (a new challenge is answered with
    nc=1; a refresh re-uses the last challenge with the next nc and a new cnonce;
    a challenge for a nonce already answered means wrong credentials → FAILED).
    423 raises the asked expiry to the provider's Min-Expires. A success is refreshed
    after ``min(granted / 2, granted - refresh_margin)`` (at least ``min_refresh``); a
    failure is retried after ``retry_initial * 2**(n-1)`` capped at ``retry_max``.
    :meth:`stop` unregisters (Expires: 0), bounded by ``stop_timeout``.

    ``contact_host`` replaces the local address in Via and Contact (a public address in
    front of a NAT). ``state``, ``registrations``, ``failures``, ``last_status`` and
    ``last_error`` are for metrics and logs; ``on_state_change`` is called on each change.
    ``sleep`` is injected so tests drive the refresh/backoff timing without waiting.
    """

    def __init__(
        self,
        trunk: Trunk,
        core: SignallingCore,
        resolver: TrunkResolver,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        expires: int | None = None,
        refresh_margin: float = 32.0,
        min_refresh: float = 1.0,
        retry_initial: float = 5.0,
        retry_max: float = 300.0,
        request_timeout: float = 40.0,
        stop_timeout: float = 5.0,
        contact_host: str | None = None,
        user_agent: str = "softswitch",
        on_state_change: Callable[[TrunkRegistration], None] | None = None,
    ) -> None:
        self.trunk = trunk
        self.core = core
        self.resolver = resolver
        self.clock = clock
        self.sleep = sleep
        self.expires = expires if expires is not None else trunk.register_expires
        self.refresh_margin = refresh_margin
        self.min_refresh = min_refresh
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.request_timeout = request_timeout
        self.stop_timeout = stop_timeout
        self.contact_host = contact_host
        self.user_agent = user_agent
        self.on_state_change = on_state_change

        self.state = RegistrationState.UNREGISTERED
        self.granted_expires: int | None = None
        self.registered_until: float | None = None
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.registrations = 0  # successful REGISTERs (first one and refreshes)
        self.failures = 0  # consecutive failed attempts
        self.flow: Flow | None = None
        self._call_id = new_call_id(trunk.domain.strip("[]"))
        self._from_tag = new_tag()
        self._cseq = 0
        self._contact: str | None = None
        self._challenge: tuple[DigestChallenge, str, int] | None = None  # (challenge, header, nc)
        self._fresh_answer = False
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop refreshing and, while a registration may still be live at the provider,
        unregister (bounded by ``stop_timeout``); state becomes UNREGISTERED."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.registered_until is not None and self.registered_until > self.clock():
            try:
                await asyncio.wait_for(self._register(0), self.stop_timeout)
            except (TimeoutError, _RegistrationFailed, RequestTimeout) as exc:
                log.info("trunk.unregister_failed", trunk=self.trunk.id, error=str(exc))
            except Exception:
                log.exception("trunk.unregister_failed", trunk=self.trunk.id)
        self.registered_until = None
        self._set_state(RegistrationState.UNREGISTERED)

    @property
    def registered(self) -> bool:
        return self.state is RegistrationState.REGISTERED

    def refresh_delay(self, granted: int) -> float:
        return max(self.min_refresh, min(granted / 2, granted - self.refresh_margin))

    def retry_delay(self, failures: int) -> float:
        return min(self.retry_max, self.retry_initial * 2 ** max(0, failures - 1))

    async def _run(self) -> None:
        while True:
            if self.state is not RegistrationState.REGISTERED:
                self._set_state(RegistrationState.REGISTERING)
            try:
                granted = await self._register(self.expires)
            except asyncio.CancelledError:
                raise
            except (_RegistrationFailed, RequestTimeout, TimeoutError) as exc:
                self.failures += 1
                self.last_error = str(exc) or exc.__class__.__name__
                self._set_state(RegistrationState.FAILED)
                delay = self.retry_delay(self.failures)
                log.warning(
                    "trunk.register_failed",
                    trunk=self.trunk.id,
                    error=self.last_error,
                    retry_in=delay,
                    failures=self.failures,
                )
            except Exception as exc:
                self.failures += 1
                self.last_error = repr(exc)
                self._set_state(RegistrationState.FAILED)
                delay = self.retry_delay(self.failures)
                log.exception("trunk.register_error", trunk=self.trunk.id, retry_in=delay)
            else:
                self.failures = 0
                self.last_error = None
                self.registrations += 1
                self.granted_expires = granted
                self.registered_until = self.clock() + granted
                self._set_state(RegistrationState.REGISTERED)
                delay = self.refresh_delay(granted)
                log.info("trunk.registered", trunk=self.trunk.id, expires=granted, refresh_in=delay)
            await self.sleep(delay)

    def _set_state(self, state: RegistrationState) -> None:
        if state is self.state:
            return
        self.state = state
        log.info("trunk.registration_state", trunk=self.trunk.id, state=str(state))
        if self.on_state_change is not None:
            try:
                self.on_state_change(self)
            except Exception:
                log.exception("trunk.state_listener_failed")

    # -- one registration (any number of targets, challenges, 423s) ---------------------
    async def _register(self, expires: int) -> int:
        """REGISTER with ``expires``; returns the granted expiry. Raises
        _RegistrationFailed (with the reason) or RequestTimeout."""
        targets = await self.resolver.resolve(self.trunk)
        if not targets:
            raise _RegistrationFailed(f"cannot resolve {self.trunk.host}")
        if self.flow is not None and self.flow.remote in [a for _, a in targets]:
            ordered = [(self.flow.transport, self.flow.remote)]
            ordered += [t for t in targets if t[1] != self.flow.remote]
            targets = ordered
        last: Exception | None = None
        for transport, address in targets:
            flow = await open_flow(
                self.core,
                transport,
                address,
                server_hostname=None if _ip_literal(self.trunk.host) else self.trunk.host,
            )
            if flow is None:
                last = _RegistrationFailed(f"no way to send {transport} to {address[0]}")
                continue
            try:
                return await self._transaction(flow, expires)
            except (RequestTimeout, TimeoutError) as exc:
                last = RequestTimeout(f"no answer from {address[0]}:{address[1]} ({exc})")
                continue
        raise last if last is not None else _RegistrationFailed("no target")

    def _build(self, flow: Flow, expires: int) -> SipRequest:
        trunk = self.trunk
        via_host = sent_by(self.core, flow)
        if self.contact_host:  # e.g. the public address in front of a NAT
            port = via_host.rsplit(":", 1)[1]
            via_host = f"{_uri_host(self.contact_host)}:{port}"
        user = trunk.username or "switch"
        transport_param = "" if flow.transport == "udp" else f";transport={flow.transport}"
        self._contact = f"<sip:{user}@{via_host}{transport_param}>"
        self._cseq += 1
        aor = f"sip:{user}@{trunk.domain}"
        uri = f"sip:{trunk.hostport}"
        if trunk.transport in ("tcp", "tls"):
            uri += f";transport={trunk.transport}"
        headers = [
            ("Via", f"SIP/2.0/{flow.transport.upper()} {via_host};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={self._from_tag}"),
            ("To", f"<{aor}>"),
            ("Call-ID", self._call_id),
            ("CSeq", f"{self._cseq} REGISTER"),
            ("Contact", self._contact + ("" if expires else ";expires=0")),
            ("Expires", str(expires)),
            ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO"),
            ("User-Agent", self.user_agent),
        ]
        request = SipRequest("REGISTER", uri, headers)
        if self._challenge is not None:  # pre-emptive answer: same nonce, next nc
            challenge, header, nc = self._challenge
            self._challenge = (challenge, header, nc + 1)
            request.add_header(header, self._authorization(challenge, request, nc + 1))
        return request

    def _authorization(self, challenge: DigestChallenge, request: SipRequest, nc: int) -> str:
        return build_authorization(
            challenge,
            request.method,
            request.uri,
            self.trunk.username or "",
            self.trunk.password or "",
            nc=nc,
            cnonce=secrets.token_hex(8),
            body=request.body,
        )

    async def _transaction(self, flow: Flow, expires: int) -> int:
        request = self._build(flow, expires)
        self._fresh_answer = False  # credentials in `request` answer no challenge of its own
        asked = expires
        for _ in range(4):  # at most: challenge, stale/new nonce, 423
            response = await asyncio.wait_for(
                self.core.request(request, flow), self.request_timeout
            )
            self.last_status = response.status
            self.flow = flow
            status = response.status
            if 200 <= status < 300:
                return self._granted(response, asked)
            if status in _AUTH_HEADERS:
                challenge_name, credentials_name = _AUTH_HEADERS[status]
                if not self.trunk.has_credentials:
                    raise _RegistrationFailed(f"{status} and no credentials configured")
                challenge = _pick_challenge(self.trunk, response.header_lines(challenge_name))
                if challenge is None:
                    raise _RegistrationFailed(f"{status} without a usable digest challenge")
                if self._fresh_answer and _credentials_refused(
                    request, credentials_name, challenge
                ):
                    # we answered a challenge of this very transaction: wrong credentials
                    self._challenge = None
                    raise _RegistrationFailed(f"{status}: credentials rejected")
                # a first challenge, or our pre-emptive re-use of an old nonce was refused
                same_nonce = challenge.nonce in _answered_nonces(
                    request, credentials_name, challenge.realm
                )
                previous_nc = self._challenge[2] if same_nonce and self._challenge else 0
                self._challenge = (challenge, credentials_name, previous_nc)
                request = self._build(flow, asked)
                self._fresh_answer = True
                continue
            if status == 423 and asked:
                minimum = _int_header(response, "Min-Expires")
                if minimum is None or minimum <= asked:
                    raise _RegistrationFailed("423 without a usable Min-Expires")
                asked = minimum
                self.expires = max(self.expires, minimum)
                request = self._build(flow, asked)
                continue
            raise _RegistrationFailed(f"{status} {response.reason}")
        raise _RegistrationFailed("too many challenges")

    def _granted(self, response: SipResponse, asked: int) -> int:
        if asked == 0:
            return 0
        ours = _contact_uri(self._contact or "")
        contacts = response.header_values("Contact")
        try:
            parsed = parse_contact_list(contacts) if contacts else []
        except GrammarError:
            parsed = []
        if isinstance(parsed, list):
            for contact in parsed:
                uri = contact.sip_uri
                if uri is None or ours is None:
                    continue
                if (uri.user, uri.host.lower().strip("[]"), uri.port) == (
                    ours.user,
                    ours.host.lower().strip("[]"),
                    ours.port,
                ):
                    value = contact.params.get("expires")
                    if value is not None and value.isdigit():
                        return int(value)
        header = _int_header(response, "Expires")
        return header if header is not None else asked


def _contact_uri(contact: str) -> SipUri | None:
    try:
        parsed = parse_contact_list([contact])
    except GrammarError:
        return None
    if isinstance(parsed, list) and parsed:
        return parsed[0].sip_uri
    return None


def _int_header(message: SipResponse, name: str) -> int | None:
    value = message.header(name)
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


class TrunkRegistry:
    """Every configured trunk, for the call control.

    ``device_dids`` (``E.164 → (account_id, extension)``) is the fall-back for inbound
    numbers no trunk lists in its ``dids`` (devices' own ``did``); ``country`` reads
    national numbers. ``lookup`` / ``rng`` are the DNS and randomness hooks of the
    resolver (tests inject fakes).
    """

    def __init__(
        self,
        trunks: Iterable[TrunkSettings | Trunk],
        core: SignallingCore | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        country: str = "FR",
        device_dids: Mapping[str, tuple[str, str]] | None = None,
        lookup: DnsLookup | None = None,
        rng: _RandomInt | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        user_agent: str = "softswitch",
        registration_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.core = core
        self.clock = clock
        self.country = country
        self.trunks: list[Trunk] = [
            t if isinstance(t, Trunk) else Trunk.from_settings(t, country) for t in trunks
        ]
        self.by_id: dict[str, Trunk] = {t.id: t for t in self.trunks}
        self.device_dids: dict[str, tuple[str, str]] = dict(device_dids or {})
        self.resolver = TrunkResolver(lookup, clock=clock, rng=rng)
        self.sleep = sleep
        self.user_agent = user_agent
        self.registration_options = dict(registration_options or {})
        self.registrations: dict[str, TrunkRegistration] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        core: SignallingCore | None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> TrunkRegistry:
        device_dids = {
            device.did: (account.id, device.extension)
            for account, device in settings.iter_devices()
            if device.did
        }
        return cls(
            settings.trunks,
            core,
            clock,
            country=settings.dialplan.country,
            device_dids=device_dids,
            user_agent=settings.switch.user_agent,
            **options,
        )

    def __len__(self) -> int:
        return len(self.trunks)

    def get(self, trunk_id: str) -> Trunk | None:
        return self.by_id.get(trunk_id)

    # -- outbound ------------------------------------------------------------------------
    def for_outbound(self, account_id: str, destination: Destination | None = None) -> Trunk | None:
        """The first trunk (file order) the account may use, preferring trunks whose
        registration has not failed; None when no trunk allows the account."""
        allowed = [t for t in self.trunks if t.allows(account_id)]
        for trunk in allowed:
            registration = trunk.registration
            if registration is None or registration.state is not RegistrationState.FAILED:
                return trunk
        return allowed[0] if allowed else None

    async def resolve(self, trunk: Trunk) -> list[Target]:
        return await self.resolver.resolve(trunk)

    async def flow_for(self, trunk: Trunk) -> Flow | None:
        """A flow to the first reachable target of the trunk (None if none)."""
        if self.core is None:
            return None
        hostname = None if _ip_literal(trunk.host) else trunk.host
        for transport, address in await self.resolve(trunk):
            flow = await open_flow(self.core, transport, address, server_hostname=hostname)
            if flow is not None:
                return flow
        return None

    async def emergency_flow(self, trunk: Trunk) -> tuple[Flow | None, list[str]]:
        """A flow for an emergency call: the trunk's own targets first; when TLS (or every
        target) fails, the same hosts over TCP, then UDP (RFC 6881 SP-30: an emergency
        call falls back rather than fails). Also returns what failed, for the audit."""
        failures: list[str] = []
        flow = await self.flow_for(trunk)
        if flow is not None or self.core is None:
            return flow, failures
        targets = await self.resolve(trunk)
        failures.extend(f"{transport} {address[0]}:{address[1]} unreachable"
                        for transport, address in targets)
        for fallback in ("tcp", "udp"):
            for transport, (host, port) in targets:
                if transport == fallback:
                    continue
                if transport == "tls" and port == 5061:
                    port = 5060
                flow = await open_flow(self.core, fallback, (host, port))
                if flow is not None:
                    return flow, failures
                failures.append(f"{fallback} {host}:{port} unreachable")
        return None, failures

    # -- inbound -------------------------------------------------------------------------
    def identify_inbound(self, source: Flow | str) -> Trunk | None:
        """The trunk a request comes from, by its source IP (peers' and providers'
        ``addresses``, and providers' last resolved addresses); None if unknown."""
        address = source.remote[0] if isinstance(source, Flow) else source
        for trunk in self.trunks:
            if trunk.matches_source(address):
                return trunk
        return None

    def did_target(self, trunk: Trunk | None, called_number: str) -> tuple[str, str] | None:
        """``(account_id, extension)`` for a number called through ``trunk``: its
        ``dids`` first, then devices' own DIDs; the number may arrive as E.164 with or
        without ``+``, with the international prefix, or in national form."""
        for form in normalise_called_number(
            called_number, trunk.country if trunk else self.country
        ):
            if trunk is not None and form in trunk.dids:
                return trunk.dids[form]
            if form in self.device_dids:
                return self.device_dids[form]
        return None

    # -- registrations -------------------------------------------------------------------
    def start(self) -> None:
        """Start registering to every provider with ``register: true`` (needs a loop)."""
        if self.core is None:
            return
        for trunk in self.trunks:
            if not trunk.register or trunk.id in self.registrations:
                continue
            registration = TrunkRegistration(
                trunk,
                self.core,
                self.resolver,
                clock=self.clock,
                sleep=self.sleep,
                user_agent=self.user_agent,
                **self.registration_options,
            )
            trunk.registration = registration
            self.registrations[trunk.id] = registration
            registration.start()

    async def stop(self) -> None:
        """Unregister everywhere (each bounded by its stop timeout)."""
        registrations = list(self.registrations.values())
        self.registrations.clear()
        if registrations:
            await asyncio.gather(*(r.stop() for r in registrations), return_exceptions=True)

    def states(self) -> dict[str, str]:
        """Registration state per trunk id (for metrics and the dashboard)."""
        return {trunk_id: str(r.state) for trunk_id, r in self.registrations.items()}

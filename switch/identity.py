"""Caller identity on calls crossing a trunk (RFC 3325 P-Asserted-Identity, RFC 3323
Privacy).

Outbound (device → trunk): the switch asserts who calls from its own configuration,
never from what the device wrote. The asserted number is the device's DID, else its
account's main number. A device may *choose* among the numbers it owns by sending them
in P-Preferred-Identity, P-Asserted-Identity or From; any other number it sends there
is ignored and logged (no spoofing). A device asking for privacy (``Privacy: id``,
``user`` or ``header``) gets an anonymous From while the PAI is kept for the provider
with ``Privacy: id``.

Inbound (trunk → device): a PAI is believed only from a trusted trunk; from anyone else
it is stripped (and logged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import phonenumbers
import structlog

from sip.grammar import GrammarError, split_top_level
from sip.headers import NameAddress, parse_name_address
from sip.message import SipRequest
from sip.uri import SipUri, TelUri

__all__ = [
    "ANONYMOUS_FROM",
    "CallerIdentity",
    "ClaimedIdentity",
    "IdentityHeaders",
    "InboundIdentity",
    "asserted_identity",
    "caller_identity",
    "claimed_identities",
    "identity_for_request",
    "inbound_identity",
    "owned_numbers",
    "privacy_requested",
]

log = structlog.get_logger("switch.identity")

ANONYMOUS_FROM = '"Anonymous" <sip:anonymous@anonymous.invalid>'
_PRIVACY_HIDING = frozenset({"id", "user", "header"})
_CLAIM_HEADERS = ("P-Preferred-Identity", "P-Asserted-Identity", "From")


class DeviceLike(Protocol):
    account_id: str
    extension: str
    username: str
    display_name: str | None
    did: str | None


class AccountLike(Protocol):
    id: str
    main_number: str | None


@dataclass(frozen=True, slots=True)
class CallerIdentity:
    """Who the switch says is calling. ``number`` is E.164 (with ``+``) or None when the
    caller owns no number; ``source`` says where it came from: ``did``, ``main_number``,
    ``claimed`` (a number the device chose among its own) or ``none``."""

    number: str | None
    display_name: str | None
    privacy: bool
    source: str


@dataclass(frozen=True, slots=True)
class ClaimedIdentity:
    header: str  # the header it was read from
    user: str  # the user part / tel number as written
    number: str | None  # its E.164 form, None when it is not a phone number


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """The identity headers of an outbound request to a trunk. ``from_`` has no tag."""

    identity: CallerIdentity
    from_: str
    p_asserted_identity: tuple[str, ...]
    privacy: str | None

    def as_headers(self) -> list[tuple[str, str]]:
        """P-Asserted-Identity lines and Privacy (From is set separately, with its tag)."""
        headers = [("P-Asserted-Identity", value) for value in self.p_asserted_identity]
        if self.privacy:
            headers.append(("Privacy", self.privacy))
        return headers


def owned_numbers(
    device: DeviceLike, account: AccountLike | None, *, allow_main_number: bool = True
) -> tuple[str, ...]:
    """The numbers a device may present: its DID, then (if allowed) its account's main
    number."""
    numbers: list[str] = []
    if device.did:
        numbers.append(device.did)
    main = getattr(account, "main_number", None) if account is not None else None
    if allow_main_number and main and main not in numbers:
        numbers.append(main)
    return tuple(numbers)


def privacy_requested(request: SipRequest) -> bool:
    """True when the request asks to hide the caller (``Privacy: id``, ``user`` or
    ``header``; ``none`` and ``critical`` alone do not)."""
    for line in request.header_lines("Privacy"):
        for value in line.replace(",", ";").split(";"):
            if value.strip().lower() in _PRIVACY_HIDING:
                return True
    return False


def _e164(user: str, country: str) -> str | None:
    text = "".join(c for c in user if c not in " -.()")
    digits = text[1:] if text.startswith("+") else text
    if not digits.isdigit() or not 3 <= len(digits) <= 17:
        return None
    with contextlib.suppress(phonenumbers.NumberParseException):
        parsed = phonenumbers.parse(text, None if text.startswith("+") else country)
        if phonenumbers.is_possible_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return None


def _user_of(address: NameAddress) -> str | None:
    uri = address.uri
    if isinstance(uri, SipUri):
        return uri.user_unescaped
    if isinstance(uri, TelUri):
        return uri.digits
    return None


def claimed_identities(
    request: SipRequest, device: DeviceLike, country: str
) -> list[ClaimedIdentity]:
    """Numbers the device put in P-Preferred-Identity, P-Asserted-Identity and From, in
    that order. Its own extension or username (the normal internal From) is no claim."""
    claims: list[ClaimedIdentity] = []
    own_names = {device.extension, device.username}
    for header in _CLAIM_HEADERS:
        for line in request.header_lines(header):
            values = [line] if header == "From" else split_top_level(line, ",")
            for value in values:
                try:
                    address = parse_name_address(value.strip())
                except (GrammarError, ValueError):
                    continue
                user = _user_of(address)
                if not user or user in own_names:
                    continue
                claims.append(ClaimedIdentity(header, user, _e164(user, country)))
    return claims


def caller_identity(
    device: DeviceLike,
    account: AccountLike | None,
    *,
    privacy: bool = False,
    claimed: Iterable[ClaimedIdentity | str] = (),
    allow_main_number: bool = True,
) -> CallerIdentity:
    """The identity to assert: the first claimed number the device owns, else its DID,
    else its account's main number. Claims it does not own are logged and ignored."""
    owned = owned_numbers(device, account, allow_main_number=allow_main_number)
    display = device.display_name or (getattr(account, "name", None) if account else None)
    for claim in claimed:
        number = claim if isinstance(claim, str) else claim.number
        if number is not None and number in owned:
            return CallerIdentity(number, display, privacy, "claimed")
        log.warning(
            "identity.claim_ignored",
            account=device.account_id,
            device=device.extension,
            header=claim.header if isinstance(claim, ClaimedIdentity) else "claimed",
            claimed=claim.user if isinstance(claim, ClaimedIdentity) else claim,
            reason="number not owned by the device",
        )
    if device.did:
        return CallerIdentity(device.did, display, privacy, "did")
    if owned:
        return CallerIdentity(owned[0], display, privacy, "main_number")
    return CallerIdentity(None, display, privacy, "none")


def _quoted(display: str) -> str:
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def asserted_identity(
    device: DeviceLike,
    account: AccountLike | None,
    privacy_requested: bool,
    *,
    domain: str,
    claimed: Iterable[ClaimedIdentity | str] = (),
    allow_main_number: bool = True,
    include_tel_uri: bool = True,
) -> IdentityHeaders:
    """Identity headers for a call leaving to a trunk at ``domain``:

    - ``P-Asserted-Identity: "Name" <sip:+33123456789@domain;user=phone>`` and (with
      ``include_tel_uri``) ``<tel:+33123456789>``, for the number of
      :func:`caller_identity`; none when the caller owns no number;
    - ``from_``: that identity, or ``"Anonymous" <sip:anonymous@anonymous.invalid>``
      when privacy is requested (the caller without a number: its extension);
    - ``privacy``: ``id`` when privacy is requested, else None.
    """
    identity = caller_identity(
        device,
        account,
        privacy=privacy_requested,
        claimed=claimed,
        allow_main_number=allow_main_number,
    )
    display = f"{_quoted(identity.display_name)} " if identity.display_name else ""
    pai: list[str] = []
    if identity.number:
        sip_uri = f"sip:{identity.number}@{domain};user=phone"
        pai.append(f"{display}<{sip_uri}>")
        if include_tel_uri:
            pai.append(f"<tel:{identity.number}>")
        from_ = f"{display}<{sip_uri}>"
    else:
        from_ = f"{display}<sip:{device.extension}@{domain}>"
    if privacy_requested:
        from_ = ANONYMOUS_FROM
    return IdentityHeaders(identity, from_, tuple(pai), "id" if privacy_requested else None)


def identity_for_request(
    request: SipRequest,
    device: DeviceLike,
    account: AccountLike | None,
    *,
    domain: str,
    country: str,
    allow_main_number: bool = True,
    include_tel_uri: bool = True,
) -> IdentityHeaders:
    """:func:`asserted_identity` for a device's INVITE: reads its Privacy and the
    numbers it claims (P-Preferred-Identity, P-Asserted-Identity, From)."""
    return asserted_identity(
        device,
        account,
        privacy_requested(request),
        domain=domain,
        claimed=claimed_identities(request, device, country),
        allow_main_number=allow_main_number,
        include_tel_uri=include_tel_uri,
    )


@dataclass(frozen=True, slots=True)
class InboundIdentity:
    """What an inbound call from a trunk says about its caller, after the trust check.

    ``p_asserted_identity`` holds the PAI values kept (only from a trusted source);
    ``caller_number`` is the E.164 (or as written) number from the kept PAI, else the
    From user; ``privacy`` is the caller's Privacy header value if any.
    """

    p_asserted_identity: tuple[str, ...]
    privacy: str | None
    caller_number: str | None
    display_name: str | None
    trusted: bool

    @property
    def anonymous(self) -> bool:
        return self.privacy is not None and any(
            v.strip().lower() in _PRIVACY_HIDING for v in self.privacy.split(";")
        )

    def headers_for_device(self) -> list[tuple[str, str]]:
        """Identity headers to pass on to a phone: the trusted PAI unless the caller
        asked for privacy (a phone is outside the trust domain, RFC 3325 §7)."""
        if self.anonymous:
            return []
        return [("P-Asserted-Identity", value) for value in self.p_asserted_identity]


def inbound_identity(
    request: SipRequest, *, trusted: bool, country: str = "FR", source: str | None = None
) -> InboundIdentity:
    """Read an inbound request's identity: PAI kept from a trusted trunk, stripped (and
    logged) from an untrusted source."""
    pai_lines = request.header_lines("P-Asserted-Identity")
    kept: list[str] = []
    if pai_lines and not trusted:
        log.warning("identity.pai_stripped", source=source, reason="untrusted source")
    elif trusted:
        for line in pai_lines:
            kept.extend(v.strip() for v in split_top_level(line, ",") if v.strip())
    privacy_lines = request.header_lines("Privacy")
    privacy = ";".join(p.strip() for p in privacy_lines) if privacy_lines else None
    number: str | None = None
    display: str | None = None
    candidates = list(kept)
    from_line = request.header("From")
    if from_line:
        candidates.append(from_line)
    for value in candidates:
        try:
            address = parse_name_address(value)
        except (GrammarError, ValueError):
            continue
        user = _user_of(address)
        if not user or user.lower() == "anonymous":
            continue
        number = _e164(user, country) or user
        display = address.display_name
        break
    return InboundIdentity(tuple(kept), privacy, number, display, trusted)

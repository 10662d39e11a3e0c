"""The dial plan: what a dialled string means for one site.

:meth:`DialPlan.classify` turns what a device dialled (digits, a SIP URI user part, a
``sip:``/``tel:`` URI, or an ``urn:service:sos`` URN) into a :class:`Destination` of one of
four kinds:

``EMERGENCY``
    A number of the site's country in the emergency number table
    (:class:`e911.numbers.EmergencyNumberTable`: the packaged per-country data, an operator
    file, libphonenumber's short-number data, 112 and 911 everywhere) or a configured
    extra; with or without the outside-line prefix (``9911``, ``0112``), with visual
    separators removed, a ``+`` in front or a ``#`` after; or ``urn:service:sos`` and its
    sub-services (and ``urn:service:test.sos``). Matching is exact: ``1120`` is not 112.
    ``emergency_class`` tells the call layer which treatment applies: ``emergency`` (a
    PSAP call), ``test`` (933, ``urn:service:test.sos``: routed like a real call, marked
    TEST) or ``helpline`` (US 988, France's 119, 116000, ...: never barred, but not sent
    as ``urn:service:sos``). This is the hand-off point to ``e911``.
``INTERNAL``
    A configured extension, matched exactly.
``EXTERNAL``
    A valid public number normalised to E.164 with libphonenumber for the site's country
    (outside-line prefix stripped, national and international dialling understood), with
    its number type (``MOBILE``, ``PREMIUM_RATE``, ...) and destination country; or a
    valid short number of the site's country (``3949``, ``118712``, US ``411``), which has
    no E.164 form and is carried as ``short_number`` with its expected cost.
``INVALID``
    Everything else, with a ``reason``: an unconfigured extension-length string
    (``no such extension``, so a typo never reaches the public network), feature codes
    (``*``/``#``), malformed URIs, numbers libphonenumber does not know as valid.

Order of the checks, which is the precedence: emergency first, then extensions, then
public numbers. Extensions never shadow an emergency number: an extension equal to one
(or to the outside-line prefix followed by one) is refused when the plan is built
(:class:`DialPlanError`), and by the settings loader at the extension's line. When a
reloaded number table is swapped in (:meth:`DialPlan.with_numbers`), emergency recognition
still comes first: extensions it shadows are listed in ``shadowed_extensions``, not refused.

Nothing here raises on bad input: :meth:`DialPlan.classify` always returns a
:class:`Destination`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import phonenumbers
from phonenumbers import shortnumberinfo

from e911.numbers import (
    UNIVERSAL_EMERGENCY_NUMBERS,
    EmergencyNumberTable,
    NumberClass,
    default_table,
)
from sip.grammar import GrammarError, unescape
from sip.uri import AbsoluteUri, SipUri, TelUri, Uri, parse_uri

if TYPE_CHECKING:
    from switch.settings import DialPlanSection

__all__ = [
    "UNIVERSAL_EMERGENCY_NUMBERS",
    "DestinationKind",
    "Destination",
    "DialPlan",
    "DialPlanError",
    "EmergencyNumbers",
    "REASON_FEATURE_CODE",
    "REASON_NO_SUCH_EXTENSION",
]

REASON_NO_SUCH_EXTENSION = "no such extension"
REASON_FEATURE_CODE = "feature codes not supported"

MAX_DIALLED_LENGTH = 256
"""Longer input is refused outright (no real dial string or URI comes close)."""

# RFC 3966 §5.1.1 visual separators, plus the spaces people type in the admin API.
_VISUAL_SEPARATORS = str.maketrans("", "", " \t-.()")
_EMERGENCY_DIGITS = re.compile(r"[0-9]{1,15}")
_PLUS_DIGITS = re.compile(r"\+?[0-9]+")
_DIAL_CHARS = frozenset("0123456789*#")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SERVICE_URN = re.compile(r"service:((?:test\.)?sos)((?:\.[a-z0-9-]+)*)")

_COST_NAMES: dict[int, str] = {
    getattr(shortnumberinfo.ShortNumberCost, name): name
    for name in ("TOLL_FREE", "STANDARD_RATE", "PREMIUM_RATE", "UNKNOWN_COST")
}


class DialPlanError(ValueError):
    """The dial plan's configuration is unusable; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems: list[str] = list(problems)


class DestinationKind(StrEnum):
    INTERNAL = "internal"
    EXTERNAL = "external"
    EMERGENCY = "emergency"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Destination:
    """What a dialled string means. Only the fields of its ``kind`` are set:

    - INTERNAL: ``extension``.
    - EXTERNAL: ``e164``, ``number_type`` (a libphonenumber ``PhoneNumberType`` name) and
      ``region`` (ISO 3166 alpha-2 of the destination); or, for a short number of the
      site's country, ``short_number``, ``number_type="SHORT_CODE"``, ``region`` and
      ``short_number_cost`` (``TOLL_FREE``, ``STANDARD_RATE``, ``PREMIUM_RATE``,
      ``UNKNOWN_COST``).
    - EMERGENCY: ``emergency_number`` (the short number, prefix removed) for a dialled
      number; ``service_urn`` (lower-cased, e.g. ``urn:service:sos.fire``) for a URN,
      whose ``emergency_number`` is None (the emergency profile picks the digits); and
      always ``emergency_class``: ``"emergency"``, ``"test"`` or ``"helpline"``.
    - INVALID: ``reason``.

    ``dialled`` is always the input as received (a URI is given back in text form).
    """

    kind: DestinationKind
    dialled: str
    extension: str | None = None
    e164: str | None = None
    short_number: str | None = None
    number_type: str | None = None
    short_number_cost: str | None = None
    region: str | None = None
    emergency_number: str | None = None
    service_urn: str | None = None
    emergency_class: str | None = None
    reason: str | None = None

    @property
    def is_emergency(self) -> bool:
        """True for every emergency class (emergency, test, helpline): none of them is
        ever barred or limited; the call layer picks the treatment by ``emergency_class``."""
        return self.kind is DestinationKind.EMERGENCY

    @property
    def is_test_call(self) -> bool:
        """A test call (933, ``urn:service:test.sos``, RFC 5031 test service): routed like
        a real emergency call, but marked TEST (EM-07)."""
        return self.emergency_class == NumberClass.TEST

    @property
    def is_helpline(self) -> bool:
        """A protected helpline (EM-08): never barred, not a PSAP call."""
        return self.emergency_class == NumberClass.HELPLINE

    @property
    def is_premium(self) -> bool:
        return self.number_type == "PREMIUM_RATE" or self.short_number_cost == "PREMIUM_RATE"


class EmergencyNumbers:
    """The emergency, test and helpline numbers of one country: those of the number
    table (``numbers``, by default the packaged one) and configured extras, which are
    EMERGENCY unless the table gives them another class. Exact matches only."""

    __slots__ = ("country", "extras", "numbers")

    def __init__(
        self,
        country: str,
        extras: Iterable[str] = (),
        numbers: EmergencyNumberTable | None = None,
    ) -> None:
        self.country = country.upper()
        if self.country not in phonenumbers.SUPPORTED_REGIONS:
            raise DialPlanError([f"unknown country {country!r} (ISO 3166 alpha-2 expected)"])
        extras = tuple(extras)
        problems = [
            f"extra emergency number {extra!r} must be 1 to 15 digits"
            for extra in extras
            if not isinstance(extra, str) or not _EMERGENCY_DIGITS.fullmatch(extra)
        ]
        if problems:
            raise DialPlanError(problems)
        self.extras: frozenset[str] = frozenset(extras)
        self.numbers: EmergencyNumberTable = numbers if numbers is not None else default_table()

    def classify(self, digits: str, also_region: str | None = None) -> NumberClass | None:
        """The class of ``digits`` (digits only, no prefix) here, or else in
        ``also_region`` (the country a ``phone-context`` named); None for none."""
        if not isinstance(digits, str) or not _EMERGENCY_DIGITS.fullmatch(digits):
            return None
        found = self.numbers.classify(digits, self.country)
        if found is None and digits in self.extras:
            found = NumberClass.EMERGENCY
        if (
            found is None
            and also_region
            and also_region != self.country
            and also_region in phonenumbers.SUPPORTED_REGIONS
        ):
            found = self.numbers.classify(digits, also_region)
        return found

    def is_emergency(self, digits: str, also_region: str | None = None) -> bool:
        """True when ``digits`` (digits only, no prefix) is an emergency, test or helpline
        number here, or in ``also_region`` (the country a ``phone-context`` named)."""
        return self.classify(digits, also_region) is not None

    def after_prefix(self, digits: str, outside_line_prefix: str | None) -> str | None:
        """The emergency number ``digits`` dials, with or without the outside-line prefix;
        None when it dials none."""
        if self.is_emergency(digits):
            return digits
        if outside_line_prefix and digits.startswith(outside_line_prefix):
            rest = digits[len(outside_line_prefix) :]
            if self.is_emergency(rest):
                return rest
        return None


def extension_conflicts(
    extensions: Iterable[str], emergency: EmergencyNumbers, outside_line_prefix: str | None
) -> dict[str, str]:
    """Extensions that an emergency, test or helpline number would shadow, each with the
    problem to report."""
    conflicts: dict[str, str] = {}
    for extension in extensions:
        number = emergency.after_prefix(extension, outside_line_prefix)
        if number is None:
            continue
        if number == extension:
            conflicts[extension] = (
                f"extension {extension!r} is the emergency number {number}:"
                " it would never ring, choose another"
            )
        else:
            conflicts[extension] = (
                f"extension {extension!r} is the outside-line prefix {outside_line_prefix!r}"
                f" followed by the emergency number {number}: it would never ring,"
                " choose another"
            )
    return conflicts


@dataclass(slots=True)
class _DialString:
    number: str  # separators removed: digits, optionally a leading "+", "*" and "#"
    context_region: str | None  # from phone-context=+CC, when it names a country
    context_global: bool  # phone-context was a global number prefix


class DialPlan:
    """Classifies dialled strings for one site (one country, one outside-line prefix,
    one set of extensions, one emergency number table). Immutable; build a new one when
    the configuration changes, or :meth:`with_numbers` after a number table reload."""

    __slots__ = (
        "country",
        "outside_line_prefix",
        "extensions",
        "emergency",
        "shadowed_extensions",
        "_lengths",
    )

    def __init__(
        self,
        country: str,
        outside_line_prefix: str | None = None,
        extensions: Iterable[str] = (),
        extra_emergency_numbers: Iterable[str] = (),
        numbers: EmergencyNumberTable | None = None,
    ) -> None:
        self.emergency = EmergencyNumbers(country, extra_emergency_numbers, numbers)
        self.country: str = self.emergency.country
        problems: list[str] = []
        if outside_line_prefix is not None and not re.fullmatch(r"[0-9]{1,4}", outside_line_prefix):
            problems.append(f"outside-line prefix {outside_line_prefix!r} must be 1 to 4 digits")
        self.outside_line_prefix: str | None = outside_line_prefix or None
        self.extensions: frozenset[str] = frozenset(extensions)
        for extension in sorted(self.extensions):
            if not re.fullmatch(r"[0-9]{1,15}", extension):
                problems.append(f"extension {extension!r} must be 1 to 15 digits")
        if not problems:
            conflicts = extension_conflicts(
                self.extensions, self.emergency, self.outside_line_prefix
            )
            problems.extend(conflicts[extension] for extension in sorted(conflicts))
        if problems:
            raise DialPlanError(problems)
        self._lengths: frozenset[int] = frozenset(len(e) for e in self.extensions)
        # Extensions a swapped-in number table shadows (see with_numbers); none here.
        self.shadowed_extensions: dict[str, str] = {}

    @classmethod
    def from_settings(
        cls,
        section: DialPlanSection,
        extensions: Iterable[str],
        numbers: EmergencyNumberTable | None = None,
    ) -> DialPlan:
        """The plan of the ``dialplan:`` settings section for one account's extensions."""
        return cls(
            country=section.country,
            outside_line_prefix=section.outside_line_prefix,
            extensions=extensions,
            extra_emergency_numbers=section.extra_emergency_numbers,
            numbers=numbers,
        )

    @property
    def numbers(self) -> EmergencyNumberTable:
        """The emergency number table in use."""
        return self.emergency.numbers

    def with_numbers(self, numbers: EmergencyNumberTable) -> DialPlan:
        """This plan with another number table (after :meth:`EmergencyNumberTable.reload`),
        without a restart. Never raises: an extension that a new number would shadow
        stops ringing (emergency recognition comes first) and is listed, with the problem
        to report, in the new plan's ``shadowed_extensions``."""
        plan = object.__new__(DialPlan)
        plan.country = self.country
        plan.outside_line_prefix = self.outside_line_prefix
        plan.extensions = self.extensions
        plan.emergency = EmergencyNumbers(self.country, self.emergency.extras, numbers)
        plan._lengths = self._lengths
        plan.shadowed_extensions = extension_conflicts(
            self.extensions, plan.emergency, self.outside_line_prefix
        )
        return plan

    # ---- classification ------------------------------------------------------------

    def classify(self, dialled: str | Uri) -> Destination:
        """What ``dialled`` means: a dial string or SIP URI user part (``"0 01 23 45 67
        89"``, ``"911;phone-context=+1"``), a URI in text form (``sip:``, ``sips:``,
        ``tel:``, ``urn:``), or a parsed :mod:`sip.uri` URI. Never raises."""
        text = str(dialled) if isinstance(dialled, SipUri | TelUri | AbsoluteUri) else dialled
        if not isinstance(text, str):
            return self._invalid(repr(dialled), "not a dial string")
        if len(text) > MAX_DIALLED_LENGTH:
            return self._invalid(text[:MAX_DIALLED_LENGTH], "dialled string too long")
        try:
            uri = dialled if not isinstance(dialled, str) else self._parse_if_uri(text.strip())
        except GrammarError:
            return self._invalid(text, "malformed URI")
        if isinstance(uri, AbsoluteUri):
            return self._classify_urn(uri, text)
        if isinstance(uri, SipUri):
            if uri.user is None:
                return self._invalid(text, "no user part to dial")
            user = uri.user_unescaped or ""
        elif isinstance(uri, TelUri):
            user = uri.number + "".join(
                f";{name}" if value is None else f";{name}={value}"
                for name, value in uri.params.items()
            )
        else:
            user = unescape(text.strip())
        try:
            return self._classify_user(user, text)
        except phonenumbers.NumberParseException:
            return self._invalid(text, f"not a valid number for {self.country}")

    @staticmethod
    def _parse_if_uri(text: str) -> Uri | None:
        if _SCHEME.match(text):
            return parse_uri(text)
        return None

    def _classify_urn(self, uri: AbsoluteUri, text: str) -> Destination:
        if uri.scheme != "urn":
            return self._invalid(text, f"unsupported URI scheme {uri.scheme}:")
        match = _SERVICE_URN.fullmatch(uri.rest.strip().lower())
        if match is None:
            return self._invalid(text, "unsupported URN (only urn:service:sos is dialled)")
        test = match.group(1).startswith("test.")
        number_class = NumberClass.TEST if test else NumberClass.EMERGENCY
        return Destination(
            DestinationKind.EMERGENCY,
            text,
            service_urn=f"urn:{match.group(0)}",
            emergency_class=number_class.value,
        )

    def _split_user(self, user: str) -> _DialString | str:
        """The number and its phone-context, or a reason why ``user`` is not dialable."""
        number, _, raw_params = user.partition(";")
        context = ""
        for param in raw_params.split(";") if raw_params else ():
            name, _, value = param.partition("=")
            if name.strip().lower() == "phone-context":
                context = value.strip()
        number = number.translate(_VISUAL_SEPARATORS)
        if not number:
            return "nothing dialled"
        body = number[1:] if number.startswith("+") else number
        if not body or any(c not in _DIAL_CHARS for c in body):
            return "not a telephone number"
        context_region: str | None = None
        context_global = context.startswith("+")
        if context_global:
            digits = context[1:].translate(_VISUAL_SEPARATORS)
            if _EMERGENCY_DIGITS.fullmatch(digits):
                context_region = self._region_of_prefix(digits)
        return _DialString(number, context_region, context_global)

    @staticmethod
    def _region_of_prefix(digits: str) -> str | None:
        for length in (1, 2, 3):
            if len(digits) >= length:
                region = phonenumbers.region_code_for_country_code(int(digits[:length]))
                if region in phonenumbers.SUPPORTED_REGIONS:
                    return region
        return None

    def _classify_user(self, user: str, text: str) -> Destination:
        split = self._split_user(user)
        if isinstance(split, str):
            return self._invalid(text, split)
        number = split.number
        # A "#" typed as the send key after a number is not part of it.
        if number.endswith("#") and _PLUS_DIGITS.fullmatch(number[:-1]):
            number = number[:-1]

        emergency = self._emergency_number(number, split.context_region)
        if emergency is not None:
            digits, number_class = emergency
            return Destination(
                DestinationKind.EMERGENCY,
                text,
                emergency_number=digits,
                emergency_class=number_class.value,
            )
        if "*" in number or "#" in number:
            return self._invalid(text, REASON_FEATURE_CODE)
        if number in self.extensions and not split.context_global:
            return Destination(DestinationKind.INTERNAL, text, extension=number)
        if number.startswith("+"):
            return self._international(number, text)
        return self._national(
            number, split.context_region or self.country, text, in_context=split.context_global
        )

    def _emergency_number(
        self, number: str, context_region: str | None
    ) -> tuple[str, NumberClass] | None:
        """The emergency, test or helpline number dialled (prefix and ``+`` removed) and
        its class, or None."""
        if number.startswith("+"):
            digits = number[1:]
            found = self.emergency.classify(digits, context_region)
            if found is None:
                return None
            # "+911" is no E.164 number; a valid one that happens to match stays a number.
            if self._valid_e164(number) is not None:
                return None
            return digits, found
        found = self.emergency.classify(number, context_region)
        if found is not None:
            return number, found
        prefix = self.outside_line_prefix
        if prefix and number.startswith(prefix):
            rest = number[len(prefix) :]
            found = self.emergency.classify(rest, context_region)
            if found is not None:
                return rest, found
        return None

    @staticmethod
    def _valid_e164(number: str) -> phonenumbers.PhoneNumber | None:
        try:
            parsed = phonenumbers.parse(number, None)
        except phonenumbers.NumberParseException:
            return None
        return parsed if phonenumbers.is_valid_number(parsed) else None

    def _international(self, number: str, text: str) -> Destination:
        parsed = self._valid_e164(number)
        if parsed is None:
            return self._invalid(text, "not a valid international number")
        return self._external(parsed, text)

    def _national(
        self, digits: str, region: str, text: str, *, in_context: bool = False
    ) -> Destination:
        prefix = self.outside_line_prefix
        if prefix and digits.startswith(prefix) and len(digits) > len(prefix):
            rest = digits[len(prefix) :]
            found = self._full_number(rest, region, text) or self._short_number(rest, text)
            # Some dial the national number with its own leading digit only ("0612..."
            # in France, where the outside-line prefix and the trunk prefix are both 0).
            found = found or self._full_number(digits, region, text)
            return found or self._invalid(text, f"not a valid number for {region}")
        if len(digits) in self._lengths and not in_context:
            return self._invalid(text, REASON_NO_SUCH_EXTENSION)
        found = self._full_number(digits, region, text)
        if found is not None:
            return found
        short = self._short_number(digits, text)
        if short is not None:
            if prefix:
                return self._invalid(
                    text, f"short numbers are dialled after the outside-line prefix {prefix}"
                )
            return short
        return self._invalid(text, f"not a valid number for {region}")

    def _full_number(self, digits: str, region: str, text: str) -> Destination | None:
        try:
            parsed = phonenumbers.parse(digits, region)
        except phonenumbers.NumberParseException:
            return None
        if not phonenumbers.is_valid_number(parsed):
            return None
        return self._external(parsed, text)

    def _short_number(self, digits: str, text: str) -> Destination | None:
        """A short number valid in the site's own country (only there can it be reached)."""
        try:
            parsed = phonenumbers.parse(digits, self.country)
        except phonenumbers.NumberParseException:
            return None
        if not shortnumberinfo.is_valid_short_number_for_region(parsed, self.country):
            return None
        cost = shortnumberinfo.expected_cost_for_region(parsed, self.country)
        return Destination(
            DestinationKind.EXTERNAL,
            text,
            short_number=digits,
            number_type="SHORT_CODE",
            short_number_cost=_COST_NAMES.get(cost, "UNKNOWN_COST"),
            region=self.country,
        )

    @staticmethod
    def _external(parsed: phonenumbers.PhoneNumber, text: str) -> Destination:
        return Destination(
            DestinationKind.EXTERNAL,
            text,
            e164=phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164),
            number_type=phonenumbers.PhoneNumberType.to_string(phonenumbers.number_type(parsed)),
            region=phonenumbers.region_code_for_number(parsed),
        )

    @staticmethod
    def _invalid(text: str, reason: str) -> Destination:
        return Destination(DestinationKind.INVALID, text, reason=reason)

"""Destination classes of outgoing calls and the fair-use rules on them.

The dial plan (``switch.dialplan``) has already turned the dialled string into a
``Destination``: for a public number its E.164 form, libphonenumber's number type and the
destination country; for a short number of the site's country its expected cost. This
module puts such an EXTERNAL destination into one fair-use *destination class*
(:class:`DestinationClass`: premium rate, shared cost, toll free, mobile, fixed, ...,
``special`` for short numbers) and says whether an account may call it:

1. the class comes from libphonenumber, unless an operator-configured prefix
   (``fair_use.prefix_classes``) reclassifies the number (longest prefix wins);
2. **blacklist**: a fraud-prone country (ISO 3166 alpha-2 of the number) or E.164 prefix
   refuses the call, unless the account has an exception for that country, or an
   exception prefix at least as long as the blacklisted prefix that matched;
3. **international**: a number of another country than the site's is refused unless the
   plan allows international calls or lists that country in ``allowed_countries``
   (a blacklist exception does not open international calling by itself);
4. **class**: a class in ``refused_classes`` (by default premium rate) is refused.

Every lookup is a dictionary probe or a walk down a digit trie, so checking a number
costs O(len(number)) whether 10 or 10,000 prefixes are configured. Emergency, test and
helpline destinations never reach this module (``fairuse.admission`` allows them first).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "DEFAULT_REFUSED_CLASSES",
    "DEFAULT_UNCOUNTED_CLASSES",
    "DestinationClass",
    "DestinationRules",
    "DestinationTables",
    "DestinationVerdict",
    "PrefixTrie",
    "destination_class",
    "limit_label",
    "parse_prefix",
]


class DestinationClass(StrEnum):
    """What kind of number a public destination is, for fair-use purposes."""

    FIXED = "fixed"
    MOBILE = "mobile"
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    SHARED_COST = "shared_cost"
    VOIP = "voip"
    PERSONAL_NUMBER = "personal_number"
    PAGER = "pager"
    UAN = "uan"
    VOICEMAIL = "voicemail"
    SPECIAL = "special"  # a short number of the site's country (directory enquiries, ...)
    UNKNOWN = "unknown"


# libphonenumber PhoneNumberType names -> class. FIXED_LINE_OR_MOBILE (all of NANP, among
# others) cannot be told apart and is treated as fixed.
_TYPE_CLASSES: dict[str, DestinationClass] = {
    "FIXED_LINE": DestinationClass.FIXED,
    "FIXED_LINE_OR_MOBILE": DestinationClass.FIXED,
    "MOBILE": DestinationClass.MOBILE,
    "TOLL_FREE": DestinationClass.TOLL_FREE,
    "PREMIUM_RATE": DestinationClass.PREMIUM_RATE,
    "SHARED_COST": DestinationClass.SHARED_COST,
    "VOIP": DestinationClass.VOIP,
    "PERSONAL_NUMBER": DestinationClass.PERSONAL_NUMBER,
    "PAGER": DestinationClass.PAGER,
    "UAN": DestinationClass.UAN,
    "VOICEMAIL": DestinationClass.VOICEMAIL,
}

DEFAULT_REFUSED_CLASSES: tuple[DestinationClass, ...] = (DestinationClass.PREMIUM_RATE,)
"""Refused unless a plan says otherwise ("premium and special numbers excluded")."""

DEFAULT_UNCOUNTED_CLASSES: tuple[DestinationClass, ...] = (
    DestinationClass.PREMIUM_RATE,
    DestinationClass.SHARED_COST,
    DestinationClass.TOLL_FREE,
    DestinationClass.SPECIAL,
)
"""Classes whose minutes are outside the flat-rate quotas (billed apart, or free)."""

_PREFIX = re.compile(r"^\+?([1-9][0-9]{0,14})$")
_SEPARATORS = str.maketrans("", "", " -.()")


def parse_prefix(text: Any) -> str:
    """The digits of an E.164 prefix written ``"+881"`` (separators allowed); ValueError
    with the reason otherwise."""
    if not isinstance(text, str):
        raise ValueError(f'prefix {text!r} must be a quoted string like "+881"')
    cleaned = text.strip().translate(_SEPARATORS)
    if not cleaned.startswith("+"):
        raise ValueError(f'prefix {text!r} must start with "+" (E.164), e.g. "+881"')
    match = _PREFIX.match(cleaned)
    if match is None:
        raise ValueError(f"prefix {text!r} must be '+' then 1 to 15 digits, not starting with 0")
    return match.group(1)


class PrefixTrie:
    """E.164 digit prefixes, each with a value; :meth:`longest` finds the longest prefix
    of a number in O(len(number)), independent of how many prefixes are stored."""

    __slots__ = ("_root", "_size")

    _VALUE = ""  # key of a node's value: never a digit

    def __init__(self, items: Iterable[tuple[str, Any]] = ()) -> None:
        self._root: dict[str, Any] = {}
        self._size = 0
        for prefix, value in items:
            self.insert(prefix, value)

    def __len__(self) -> int:
        return self._size

    def insert(self, digits: str, value: Any = True) -> None:
        """Stores ``value`` under ``digits`` (a later insert of the same prefix wins)."""
        if not digits or not digits.isdigit() or not digits.isascii():
            raise ValueError(f"prefix {digits!r} must be ASCII digits")
        node = self._root
        for digit in digits:
            node = node.setdefault(digit, {})
        if self._VALUE not in node:
            self._size += 1
        node[self._VALUE] = value

    def longest(self, digits: str) -> tuple[str, Any] | None:
        """The longest stored prefix of ``digits`` and its value, or None."""
        node = self._root
        found: tuple[str, Any] | None = None
        for index, digit in enumerate(digits):
            node = node.get(digit)
            if node is None:
                break
            if self._VALUE in node:
                found = (digits[: index + 1], node[self._VALUE])
        return found


class _DestinationLike(Protocol):
    """The fields of ``switch.dialplan.Destination`` this module reads."""

    @property
    def kind(self) -> Any: ...
    @property
    def e164(self) -> str | None: ...
    @property
    def number_type(self) -> str | None: ...
    @property
    def short_number_cost(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...


def destination_class(destination: _DestinationLike) -> DestinationClass:
    """The class libphonenumber's data gives an EXTERNAL destination: short numbers are
    ``special`` (``premium_rate`` when their expected cost is premium), public numbers by
    number type, anything else ``unknown``."""
    if destination.number_type == "SHORT_CODE" or destination.e164 is None:
        if destination.short_number_cost == "PREMIUM_RATE":
            return DestinationClass.PREMIUM_RATE
        return DestinationClass.SPECIAL
    return _TYPE_CLASSES.get(destination.number_type or "", DestinationClass.UNKNOWN)


def limit_label(destination_class_: DestinationClass) -> str:
    """The low-cardinality limit label of a refused class (``destination_premium``, ...)."""
    if destination_class_ is DestinationClass.PREMIUM_RATE:
        return "destination_premium"
    return f"destination_{destination_class_.value}"


@dataclass(frozen=True, slots=True)
class DestinationTables:
    """The switch-wide tables, built once per configuration: blacklisted countries and
    prefixes (the fraud list plus the YAML's own) and operator prefix classes."""

    blacklist_countries: frozenset[str] = frozenset()
    blacklist_prefixes: PrefixTrie = field(default_factory=PrefixTrie)
    prefix_classes: PrefixTrie = field(default_factory=PrefixTrie)

    @classmethod
    def build(
        cls,
        countries: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        prefix_classes: Mapping[str, DestinationClass | str] | None = None,
    ) -> DestinationTables:
        """Tables from countries (ISO alpha-2), ``"+881"``-style prefixes and a mapping of
        prefix to class; ValueError naming the first bad entry."""
        blacklist = PrefixTrie((parse_prefix(p), True) for p in prefixes)
        classes = PrefixTrie(
            (parse_prefix(p), DestinationClass(c)) for p, c in (prefix_classes or {}).items()
        )
        codes = frozenset(c.strip().upper() for c in countries)
        return cls(codes, blacklist, classes)


@dataclass(frozen=True, slots=True)
class DestinationVerdict:
    """What fair use makes of one EXTERNAL destination."""

    destination_class: DestinationClass
    country: str | None  # ISO 3166 alpha-2 of the number
    international: bool  # another country than the site's
    allowed: bool
    counted: bool  # its minutes count against the quotas
    limit: str | None = None  # label of the refusing rule (None when allowed)
    reason: str | None = None  # human text naming the rule (None when allowed)
    matched_prefix: str | None = None  # "+881" when a prefix rule decided


@dataclass(frozen=True, slots=True)
class DestinationRules:
    """One account's destination rules (its plan's, with its exceptions) over the shared
    :class:`DestinationTables`."""

    home_country: str
    international: bool = False
    allowed_countries: frozenset[str] = frozenset()
    refused_classes: frozenset[DestinationClass] = frozenset(DEFAULT_REFUSED_CLASSES)
    uncounted_classes: frozenset[DestinationClass] = frozenset(DEFAULT_UNCOUNTED_CLASSES)
    tables: DestinationTables = field(default_factory=DestinationTables)
    exception_countries: frozenset[str] = frozenset()
    exception_prefixes: PrefixTrie = field(default_factory=PrefixTrie)

    def check(self, destination: _DestinationLike) -> DestinationVerdict:
        """The verdict on an EXTERNAL destination (ValueError for any other kind)."""
        kind = getattr(destination.kind, "value", destination.kind)
        if kind != "external":
            raise ValueError(f"only external destinations have a class (got {kind!r})")
        digits = (destination.e164 or "").lstrip("+")
        klass = destination_class(destination)
        matched: str | None = None
        if digits:
            override = self.tables.prefix_classes.longest(digits)
            if override is not None:
                matched, klass = f"+{override[0]}", override[1]
        country = (destination.region or "").upper() or None
        international = country is not None and country != self.home_country
        counted = klass not in self.uncounted_classes

        def refuse(limit: str, reason: str, prefix: str | None = matched) -> DestinationVerdict:
            return DestinationVerdict(
                klass, country, international, False, counted, limit, reason, prefix
            )

        # 2. blacklist, with the account's exceptions
        exempt_country = country is not None and country in self.exception_countries
        exception = self.exception_prefixes.longest(digits) if digits else None
        if not exempt_country:
            listed = self.tables.blacklist_prefixes.longest(digits) if digits else None
            if listed is not None and (exception is None or len(exception[0]) < len(listed[0])):
                prefix = f"+{listed[0]}"
                return refuse(
                    "destination_blacklist_prefix",
                    f"calls to {prefix} are barred (fraud-prone destination)",
                    prefix,
                )
            if country in self.tables.blacklist_countries and exception is None:
                return refuse(
                    "destination_blacklist_country",
                    f"calls to {country} are barred (fraud-prone destination)",
                )
        # 3. international calling
        if international and not self.international and country not in self.allowed_countries:
            return refuse(
                "destination_international",
                f"international calls are not enabled for this account ({country})",
            )
        # 4. the class
        if klass in self.refused_classes:
            words = klass.value.replace("_", "-")
            return refuse(limit_label(klass), f"calls to {words} numbers are not allowed")
        return DestinationVerdict(klass, country, international, True, counted, None, None, matched)

"""Emergency dial strings per country (EM-04), held as data.

A call to one of these numbers gets emergency treatment from the switch: it is never
barred or limited, and it takes the emergency route (EM-01..EM-11). Every number has one
:class:`NumberClass`:

``emergency``
    Reaches a public safety answering point or an emergency service (911, 112, 999,
    France's 15/17/18, ...).
``test``
    A carrier test line that reads back the callback number and the address the PSAP
    would get (933 in the US and Canada); routed like a real call, marked TEST (EM-07).
``helpline``
    A protected helpline (US 988, France's 114, 115, 116000, 116111, 116117, 119):
    never barred and free, but not a PSAP call (EM-08).

:class:`EmergencyNumberTable` merges, in order, each later source winning for a number it
lists: the packaged ``e911/data/numbers.yaml``, an optional operator file of the same
format, and configured extras. On top of the listed numbers, 112 and 911 are emergency
numbers in every country (:data:`UNIVERSAL_EMERGENCY_NUMBERS`), and so is every number
libphonenumber's short-number data marks as an emergency number for the country.

File format (YAML; dial strings are quoted so that leading zeros survive)::

    FR:
      emergency: ["15", "17", "18", "112"]
      helpline: ["119"]

Loading problems raise :class:`NumberTableError`, one ``file:line: key: problem`` line per
problem. :meth:`EmergencyNumberTable.reload` re-reads the same sources into a new table,
which the caller swaps in; a bad file leaves the table in use untouched.

:func:`is_emergency_target` says whether a dial string or URI (a call-forward target, a
speed dial) would dial one of these numbers, so that settings can refuse it (EM-06).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import phonenumbers
from phonenumbers import shortnumberinfo
from phonenumbers.phonemetadata import PhoneMetadata
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from sip.grammar import GrammarError, unescape
from sip.uri import AbsoluteUri, SipUri, TelUri, parse_uri

__all__ = [
    "EU_MEMBER_STATES",
    "EXTRAS_SOURCE",
    "UNIVERSAL_EMERGENCY_NUMBERS",
    "EmergencyNumberTable",
    "NumberClass",
    "NumberTableError",
    "classify_target",
    "default_table",
    "is_emergency_target",
]

UNIVERSAL_EMERGENCY_NUMBERS: frozenset[str] = frozenset({"112", "911"})
"""Emergency numbers whatever the site's country (GSM 112, NANP 911): travellers and
visitors dial them from habit. No table can give them another class."""

EU_MEMBER_STATES: frozenset[str] = frozenset(
    "AT BE BG CY CZ DE DK EE ES FI FR GR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK".split()
)
"""The 27 member states, where 112 is the emergency number (EECC Art. 109)."""

EXTRAS_SOURCE = "(configured extras)"
"""The source named in problems found in configured extras (they have no file lines)."""

_PACKAGED = ("data", "numbers.yaml")
_DIGITS = re.compile(r"[0-9]{1,15}")
_COUNTRY = re.compile(r"[A-Za-z]{2}")
_VISUAL_SEPARATORS = str.maketrans("", "", " \t-.()")  # RFC 3966 §5.1.1, plus spaces
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_SERVICE_URN = re.compile(r"service:(test\.)?sos(?:\.[a-z0-9-]+)*")
_RAW_TOKEN = re.compile(r"[^\s,\]}#]+")
_MAX_ENUMERATED_LENGTH = 6  # libphonenumber's longest emergency number has 6 digits


class NumberClass(StrEnum):
    EMERGENCY = "emergency"
    TEST = "test"
    HELPLINE = "helpline"


class NumberTableError(ValueError):
    """A numbers file or the extras cannot be used; ``problems`` holds one
    ``file:line: key: problem`` line per problem (the message joins them, one a line)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems: list[str] = list(problems)


# country -> number -> class
_Entries = dict[str, dict[str, NumberClass]]


@dataclass(frozen=True, slots=True, eq=False)
class EmergencyNumberTable:
    """The emergency, test and helpline numbers of every country. Immutable: a reload
    gives a new table. Build it with :meth:`load`."""

    entries: Mapping[str, Mapping[str, NumberClass]]
    """The listed numbers (all sources merged): country -> number -> class."""
    path: Path | None = None
    """The operator file loaded on top of the packaged one, if any."""
    extras: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None
    """The configured extras loaded last, as given (country -> class -> numbers)."""
    sources: tuple[str, ...] = ()
    """What was read, in order (file names, then :data:`EXTRAS_SOURCE`)."""

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        extras: dict[str, dict[str, list[str]]] | None = None,
    ) -> EmergencyNumberTable:
        """The packaged table, the operator file at ``path`` merged on top (a number it
        lists takes its class there), then ``extras`` (same shape as a file:
        ``{"FR": {"helpline": ["3114"]}}``). Raises :class:`NumberTableError` listing
        every problem of every source."""
        problems: list[str] = []
        layers: list[_Entries] = []
        sources: list[str] = []
        files: list[Any] = [resources.files("e911").joinpath(*_PACKAGED)]
        if path is not None:
            files.append(Path(path))
        for file in files:
            name = str(file)
            sources.append(name)
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{name}:1: (file): not UTF-8 text ({exc.reason})")
                continue
            except OSError as exc:
                problems.append(f"{name}:1: (file): cannot read: {exc.strerror or exc}")
                continue
            entries, found = _parse_file(text, name)
            layers.append(entries)
            problems.extend(found)
        frozen_extras: dict[str, Mapping[str, tuple[str, ...]]] | None = None
        if extras is not None:
            sources.append(EXTRAS_SOURCE)
            entries, found = _parse_extras(extras)
            layers.append(entries)
            problems.extend(found)
            if not found:
                frozen_extras = _freeze_extras(extras)
        if problems:
            raise NumberTableError(problems)
        merged: _Entries = {}
        for layer in layers:
            for country, numbers in layer.items():
                merged.setdefault(country, {}).update(numbers)
        return cls(
            entries=MappingProxyType(
                {country: MappingProxyType(numbers) for country, numbers in merged.items()}
            ),
            path=Path(path) if path is not None else None,
            extras=MappingProxyType(frozen_extras) if frozen_extras is not None else None,
            sources=tuple(sources),
        )

    def reload(self) -> EmergencyNumberTable:
        """A new table re-read from the same sources (the packaged file, the operator
        file, the same extras). Raises :class:`NumberTableError` on a bad file; this
        table is unchanged and stays usable."""
        extras = None
        if self.extras is not None:
            extras = {
                country: {name: list(numbers) for name, numbers in classes.items()}
                for country, classes in self.extras.items()
            }
        return EmergencyNumberTable.load(self.path, extras)

    def classify(self, digits: str, country: str) -> NumberClass | None:
        """The class of ``digits`` (digits only, no prefix, no ``+``) dialled in
        ``country`` (ISO alpha-2), or None when it is none of these numbers. A listed
        number has its listed class; otherwise 112, 911 and libphonenumber's emergency
        numbers of the country are EMERGENCY. Never raises."""
        if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
            return None
        region = country.upper() if isinstance(country, str) else ""
        listed = self.entries.get(region, {}).get(digits)
        if listed is not None:
            return listed
        if digits in UNIVERSAL_EMERGENCY_NUMBERS:
            return NumberClass.EMERGENCY
        if region in phonenumbers.SUPPORTED_SHORT_REGIONS and shortnumberinfo.is_emergency_number(
            digits, region
        ):
            return NumberClass.EMERGENCY
        return None

    def numbers(self, country: str) -> dict[NumberClass, frozenset[str]]:
        """Every number of ``country`` by class (each class present, maybe empty): the
        listed ones, 112, 911 and libphonenumber's emergency numbers. For generated
        phone dial plans (EM-05) and admin display."""
        region = country.upper() if isinstance(country, str) else ""
        listed = self.entries.get(region, {})
        found: dict[NumberClass, set[str]] = {number_class: set() for number_class in NumberClass}
        for number in UNIVERSAL_EMERGENCY_NUMBERS | _short_data_emergency_numbers(region):
            if number not in listed:
                found[NumberClass.EMERGENCY].add(number)
        for number, number_class in listed.items():
            found[number_class].add(number)
        return {number_class: frozenset(numbers) for number_class, numbers in found.items()}

    def countries(self) -> frozenset[str]:
        """The countries with listed numbers."""
        return frozenset(self.entries)


@functools.cache
def default_table() -> EmergencyNumberTable:
    """The packaged table, loaded once (NumberTableError if the package data is bad)."""
    return EmergencyNumberTable.load()


# ---- recognising a target as an emergency number (EM-06) ------------------------------


def classify_target(
    text: str,
    country: str,
    outside_line_prefix: str | None,
    *,
    table: EmergencyNumberTable | None = None,
    extra_numbers: Iterable[str] = (),
) -> NumberClass | None:
    """The class of the number a dial string or URI would reach (``"911"``, ``"9-911"``,
    ``"sip:+112@x"``, ``"tel:911"``, ``"sip:17;phone-context=+33@pbx"``,
    ``"urn:service:sos.fire"``), with or without the outside-line prefix; None when it
    reaches none. ``extra_numbers`` are more EMERGENCY numbers (the dial plan's
    configured extras). Never raises."""
    if not isinstance(text, str):
        return None
    table = table if table is not None else default_table()
    text = text.strip()
    if _SCHEME.match(text):
        try:
            uri = parse_uri(text)
        except (GrammarError, ValueError):
            return None
        if isinstance(uri, AbsoluteUri):
            if uri.scheme.lower() != "urn":
                return None
            match = _SERVICE_URN.fullmatch(uri.rest.strip().lower())
            if match is None:
                return None
            return NumberClass.TEST if match.group(1) else NumberClass.EMERGENCY
        if isinstance(uri, SipUri):
            user = uri.user_unescaped or ""
        elif isinstance(uri, TelUri):
            user = uri.number + "".join(
                f";{name}={value}" for name, value in uri.params.items() if value is not None
            )
        else:
            return None
    else:
        user = unescape(text)
    number, _, raw_params = user.partition(";")
    number = number.translate(_VISUAL_SEPARATORS).removeprefix("+").removesuffix("#")
    if not _DIGITS.fullmatch(number):
        return None
    regions = [country.upper() if isinstance(country, str) else ""]
    context_region = _phone_context_region(raw_params)
    if context_region:
        regions.append(context_region)
    extras = frozenset(extra_numbers)
    candidates = [number]
    if outside_line_prefix and number.startswith(outside_line_prefix):
        candidates.append(number[len(outside_line_prefix) :])
    for candidate in candidates:
        for region in regions:
            found = table.classify(candidate, region)
            if found is not None:
                return found
        if candidate in extras:
            return NumberClass.EMERGENCY
    return None


def is_emergency_target(
    text: str,
    country: str,
    outside_line_prefix: str | None,
    *,
    table: EmergencyNumberTable | None = None,
    extra_numbers: Iterable[str] = (),
) -> bool:
    """True when ``text`` (a forward target, speed dial, hotline number, as a dial string
    or URI) would dial an emergency, test or helpline number: such targets are refused
    (EM-06). See :func:`classify_target`."""
    return (
        classify_target(
            text, country, outside_line_prefix, table=table, extra_numbers=extra_numbers
        )
        is not None
    )


def _phone_context_region(raw_params: str) -> str | None:
    """The country a ``phone-context=+CC`` user parameter names, if any."""
    for param in raw_params.split(";") if raw_params else ():
        name, _, value = param.partition("=")
        value = value.strip()
        if name.strip().lower() != "phone-context" or not value.startswith("+"):
            continue
        digits = value[1:].translate(_VISUAL_SEPARATORS)
        if not _DIGITS.fullmatch(digits):
            return None
        for length in (1, 2, 3):
            if len(digits) >= length:
                region = phonenumbers.region_code_for_country_code(int(digits[:length]))
                if region in phonenumbers.SUPPORTED_REGIONS:
                    return region
    return None


# ---- libphonenumber's emergency numbers -----------------------------------------------


@functools.cache
def _short_data_emergency_numbers(region: str) -> frozenset[str]:
    """Every emergency number libphonenumber's short-number data gives ``region``: its
    pattern is tried on every digit string of the possible lengths (at most 6 digits)."""
    metadata = PhoneMetadata.short_metadata_for_region(region)
    if metadata is None or metadata.emergency is None:
        return frozenset()
    pattern = metadata.emergency.national_number_pattern
    if not pattern:
        return frozenset()
    compiled = re.compile(pattern)
    lengths = metadata.emergency.possible_length or metadata.general_desc.possible_length or ()
    found: set[str] = set()
    for length in sorted({n for n in lengths if 0 < n <= _MAX_ENUMERATED_LENGTH}):
        for digits in itertools.product("0123456789", repeat=length):
            candidate = "".join(digits)
            if compiled.fullmatch(candidate):
                found.add(candidate)
    return frozenset(n for n in found if shortnumberinfo.is_emergency_number(n, region))


# ---- reading the data -----------------------------------------------------------------


class _Reader:
    """Checks one source and collects its entries and problems."""

    def __init__(self, source: str, text: str | None = None) -> None:
        self.source = source
        self.lines = text.splitlines() if text is not None else []
        self.entries: _Entries = {}
        self.problems: list[str] = []
        # (country, number) -> where it was first listed, for duplicates
        self._seen: dict[tuple[str, str], str] = {}

    def problem(self, line: int | None, key: str, message: str) -> None:
        where = f"{self.source}:{line}" if line is not None else self.source
        self.problems.append(f"{where}: {key}: {message}")

    def raw(self, line: int | None, column: int | None, value: Any) -> str:
        """The value's text as written (``015``, not the 15 YAML made of it)."""
        if line is not None and column is not None and 0 < line <= len(self.lines):
            match = _RAW_TOKEN.match(self.lines[line - 1], column)
            if match:
                return match.group(0)
        return str(value)

    def country(self, key: Any, body: Any, line: int | None) -> None:
        code = str(key)
        if not isinstance(key, str) or not _COUNTRY.fullmatch(key):
            self.problem(line, code, "not a country code (ISO 3166 alpha-2 expected, e.g. \"FR\")")
            return
        if key.upper() == "UK":
            self.problem(line, code, 'unknown country code: the United Kingdom is "GB"')
            return
        if key.upper() not in phonenumbers.SUPPORTED_REGIONS:
            self.problem(line, code, "unknown country code (ISO 3166 alpha-2 expected)")
            return
        if key != key.upper():
            self.problem(line, code, f"country codes are upper case: write {key.upper()!r}")
            return
        if body is None:
            self.entries.setdefault(code, {})
            return
        if not isinstance(body, Mapping):
            self.problem(line, code, "must be a mapping of emergency, test and helpline lists")
            return
        self.entries.setdefault(code, {})
        for name, numbers in body.items():
            name_line = _key_line(body, name) or line
            path = f"{code}.{name}"
            try:
                number_class = NumberClass(name)
            except ValueError:
                expected = ", ".join(c.value for c in NumberClass)
                self.problem(name_line, path, f"unknown key {str(name)!r} (expected {expected})")
                continue
            if numbers is None:
                continue
            if isinstance(numbers, str) or not isinstance(numbers, list | tuple):
                self.problem(name_line, path, 'must be a list of quoted numbers, e.g. ["112"]')
                continue
            for index, number in enumerate(numbers):
                item_line, item_column = _item_position(numbers, index)
                self.number(
                    code, number_class, number, f"{path}[{index}]", item_line or name_line,
                    item_column,
                )

    def number(
        self,
        country: str,
        number_class: NumberClass,
        number: Any,
        path: str,
        line: int | None,
        column: int | None,
    ) -> None:
        if isinstance(number, bool) or isinstance(number, int | float):
            raw = self.raw(line, column, number)
            self.problem(line, path, f'must be a quoted string (write it as "{raw}")')
            return
        if not isinstance(number, str) or not _DIGITS.fullmatch(number):
            self.problem(line, path, f"{str(number)!r} is not a dial string of 1 to 15 digits")
            return
        if number in UNIVERSAL_EMERGENCY_NUMBERS and number_class is not NumberClass.EMERGENCY:
            self.problem(
                line,
                path,
                f"{number!r} is an emergency number in every country: it cannot be"
                f" listed as {number_class.value}",
            )
            return
        first = self._seen.get((country, number))
        if first is not None:
            self.problem(line, path, f"{number!r} is already listed for {country} at {first}")
            return
        self._seen[(country, number)] = f"line {line}" if line is not None else path
        self.entries[country][number] = number_class


def _key_line(node: Any, key: Any) -> int | None:
    if isinstance(node, CommentedMap):
        try:
            return int(node.lc.key(key)[0]) + 1
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    return None


def _item_position(node: Any, index: int) -> tuple[int | None, int | None]:
    if isinstance(node, CommentedSeq):
        try:
            line, column = node.lc.item(index)
            return int(line) + 1, int(column)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None, None
    return None, None


def _yaml_problem(exc: YAMLError, source: str) -> str:
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = str(exc.problem or exc.context or "invalid YAML")
        duplicate = re.search(r'found duplicate key "([^"]*)"', problem)
        if duplicate:
            problem = f'duplicate key "{duplicate.group(1)}"'
        return f"{source}:{line}: (yaml): {problem}"
    first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
    return f"{source}:1: (yaml): {first}"


def _parse_file(text: str, source: str) -> tuple[_Entries, list[str]]:
    reader = _Reader(source, text)
    try:
        tree = YAML(typ="rt").load(text)
    except YAMLError as exc:
        return {}, [_yaml_problem(exc, source)]
    except Exception as exc:  # noqa: BLE001 - any loader failure is a data problem
        return {}, [f"{source}:1: (yaml): {exc}"]
    if tree is None:
        return {}, []
    if not isinstance(tree, CommentedMap):
        return {}, [f"{source}:1: (root): must be a mapping of country codes to number lists"]
    for key, body in tree.items():
        reader.country(key, body, _key_line(tree, key))
    return reader.entries, reader.problems


def _parse_extras(extras: Any) -> tuple[_Entries, list[str]]:
    reader = _Reader(EXTRAS_SOURCE)
    if not isinstance(extras, Mapping):
        return {}, [f"{EXTRAS_SOURCE}: (root): must be a mapping of country codes"]
    for key, body in extras.items():
        reader.country(key, body, None)
    return reader.entries, reader.problems


def _freeze_extras(extras: Mapping[str, Any]) -> dict[str, Mapping[str, tuple[str, ...]]]:
    return {
        str(country): MappingProxyType(
            {str(name): tuple(numbers or ()) for name, numbers in (classes or {}).items()}
        )
        for country, classes in extras.items()
    }

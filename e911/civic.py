"""Civic addresses of emergency calls (RFC 5139 civicAddress, RFC 4776 CAtypes).

A `CivicAddress` holds the RFC 5139 elements under readable attribute names;
`CIVIC_ELEMENTS` maps each element to its attribute in the RFC 5139 schema
order (an `xs:sequence`: emitting `ROOM` before `PC` is invalid). `elements()`
gives the non-empty elements in that order, ready for a PIDF-LO (e911.pidf).

A site's validated address refined by where a device is inside it (BLD, FLR,
UNIT, ROOM, SEAT: `refine()` / `merged_with()`) is the dispatchable location
(RAY BAUM'S Act § 506) that goes to the PSAP. `validate()` returns a list of
human-readable problems (empty when the address is usable as a validated
emergency address); it never raises. `summary()` is the one-line form for
on-site notifications and logs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

# (RFC 5139 element, CivicAddress attribute), in the RFC 5139 schema order.
CIVIC_ELEMENTS: tuple[tuple[str, str], ...] = (
    ("country", "country"),
    ("A1", "subdivision"),  # national subdivision: state, region, province, département
    ("A2", "county"),  # county, parish, district
    ("A3", "city"),  # city, township
    ("A4", "city_division"),  # borough, city district, ward
    ("A5", "neighborhood"),  # neighbourhood, block
    ("A6", "street_group"),  # group of streets below neighbourhood level
    ("PRM", "road_pre_modifier"),
    ("PRD", "leading_street_direction"),
    ("RD", "road"),
    ("STS", "street_suffix"),
    ("POD", "trailing_street_suffix"),
    ("POM", "road_post_modifier"),
    ("RDSEC", "road_section"),
    ("RDBR", "road_branch"),
    ("RDSUBBR", "road_sub_branch"),
    ("HNO", "house_number"),
    ("HNS", "house_number_suffix"),
    ("LMK", "landmark"),
    ("LOC", "location_info"),
    ("FLR", "floor"),
    ("NAM", "name"),
    ("PC", "postal_code"),
    ("BLD", "building"),
    ("UNIT", "unit"),
    ("ROOM", "room"),
    ("SEAT", "seat"),
    ("PLC", "place_type"),
    ("PCN", "postal_community"),
    ("POBOX", "po_box"),
    ("ADDCODE", "additional_code"),
)
ELEMENT_ORDER: tuple[str, ...] = tuple(element for element, _ in CIVIC_ELEMENTS)
ATTRIBUTE_FOR_ELEMENT: dict[str, str] = dict(CIVIC_ELEMENTS)

# ISO 3166-1 alpha-2 officially assigned codes (249).
ISO_3166_1_ALPHA2: frozenset[str] = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET
    FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU
    ID IE IL IM IN IO IQ IR IS IT
    JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ
    LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ
    OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA
    RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ
    UA UG UM US UY UZ
    VA VC VE VG VI VN VU
    WF WS
    YE YT
    ZA ZM ZW
    """.split()
)

# Countries without a postal-code system in general use: PC is not required there.
# Deliberately short and conservative; every other country must have a PC.
COUNTRIES_WITHOUT_POSTAL_CODES: frozenset[str] = frozenset(
    """
    AE AG AO AW BF BI BJ BO BS BW BZ CD CF CG CI CK CM DJ DM ER FJ GA GD GH GM GQ
    GY HK JM KI KM KN KP LC ML MO MR MW NR NU QA RW SB SC SL SO SR ST SY TD TF TG
    TK TL TO TV UG VU YE ZW
    """.split()
)

# ISO 3166-2 subdivision codes (without the country prefix) for the countries this
# switch is deployed in; elsewhere A1 only has to look like a code or a name.
_US_SUBDIVISIONS = frozenset(
    """
    AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE
    NV NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC
    AS GU MP PR UM VI
    """.split()
)
_CA_SUBDIVISIONS = frozenset("AB BC MB NB NL NS NT NU ON PE QC SK YT".split())
_FR_SUBDIVISIONS = frozenset(
    [f"{n:02d}" for n in range(1, 96) if n != 20]
    + ["2A", "2B", "971", "972", "973", "974", "976"]
    # regions (ISO 3166-2:FR since 2016) and special collectivities
    + "ARA BFC BRE CVL COR GES HDF IDF NOR NAQ OCC PDL PAC 6AE 69M 75C".split()
    + "BL MF PM NC PF TF WF YT".split()
)
KNOWN_SUBDIVISIONS: dict[str, frozenset[str]] = {
    "US": _US_SUBDIVISIONS,
    "CA": _CA_SUBDIVISIONS,
    "FR": _FR_SUBDIVISIONS,
}

# Postal-code shapes for a few countries; elsewhere only a generic shape is checked.
POSTAL_CODE_PATTERNS: dict[str, re.Pattern[str]] = {
    "US": re.compile(r"\d{5}(-\d{4})?"),
    "FR": re.compile(r"\d{5}"),
    "DE": re.compile(r"\d{5}"),
    "CA": re.compile(r"[A-Z]\d[A-Z] ?\d[A-Z]\d"),
    "GB": re.compile(r"[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}"),
}
_GENERIC_POSTAL_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 -]{1,11}")
_SUBDIVISION_CODE = re.compile(r"[A-Z0-9]{1,3}")
_SUBDIVISION_NAME = re.compile(r"[^\W\d_][\w .'’()-]{1,63}")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")

MAX_VALUE_LENGTH = 128
MAX_HOUSE_NUMBER_LENGTH = 16
# Characters XML 1.0 cannot carry, whatever the escaping.
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

# The parts of a site that a location inside it refines (dispatchable location:
# RAY BAUM'S Act "floor, suite or room"), by element name.
LOCATION_ELEMENTS: tuple[str, ...] = ("BLD", "FLR", "UNIT", "ROOM", "SEAT", "LOC")


def clean_value(value: str | None) -> str:
    """A value as it goes on the wire: XML-illegal characters removed, whitespace
    collapsed (RFC 5139 values are xs:token). Empty string means "omit"."""
    if not value:
        return ""
    return " ".join(_XML_ILLEGAL.sub("", value).split())


def _collapse(value: str) -> str:
    return " ".join(value.split())


def _attribute_for(key: str) -> str:
    """The attribute for an RFC 5139 element name or an attribute name."""
    if key in ATTRIBUTE_FOR_ELEMENT:
        return ATTRIBUTE_FOR_ELEMENT[key]
    if key in _ATTRIBUTES:
        return key
    raise ValueError(f"unknown civic address element {key!r} "
                     f"(RFC 5139 elements: {', '.join(ELEMENT_ORDER)})")


_ATTRIBUTES = frozenset(attribute for _, attribute in CIVIC_ELEMENTS)


@dataclass(frozen=True, slots=True)
class CivicAddress:
    """An RFC 5139 civic address. Attribute ↔ element mapping: `CIVIC_ELEMENTS`.

    Values are stored whitespace-collapsed (RFC 5139 values are xs:token) and the
    country in uppercase, so two spellings of one address compare equal.
    `language` is the `xml:lang` of the civicAddress element (e.g. "en-US"), not
    an element. The street goes in `road` (RD), never in `street_group` (A6).
    """

    country: str = ""
    subdivision: str = ""
    county: str = ""
    city: str = ""
    city_division: str = ""
    neighborhood: str = ""
    street_group: str = ""
    road_pre_modifier: str = ""
    leading_street_direction: str = ""
    road: str = ""
    street_suffix: str = ""
    trailing_street_suffix: str = ""
    road_post_modifier: str = ""
    road_section: str = ""
    road_branch: str = ""
    road_sub_branch: str = ""
    house_number: str = ""
    house_number_suffix: str = ""
    landmark: str = ""
    location_info: str = ""
    floor: str = ""
    name: str = ""
    postal_code: str = ""
    building: str = ""
    unit: str = ""
    room: str = ""
    seat: str = ""
    place_type: str = ""
    postal_community: str = ""
    po_box: str = ""
    additional_code: str = ""
    language: str | None = None

    def __post_init__(self) -> None:
        for _, attribute in CIVIC_ELEMENTS:
            value = getattr(self, attribute)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise TypeError(f"civic address {attribute} must be text, "
                                f"not {type(value).__name__}")
            value = _collapse(value)
            if attribute == "country":
                value = value.upper()
            object.__setattr__(self, attribute, value)
        if self.language is not None:
            if not isinstance(self.language, str):
                raise TypeError("civic address language must be text or None")
            object.__setattr__(self, "language", self.language.strip() or None)

    @classmethod
    def from_elements(cls, mapping: Mapping[str, str | None], language: str | None = None
                      ) -> CivicAddress:
        """Build from RFC 5139 element names ({"country": "US", "A1": "IL", "RD": ...}).

        Raises ValueError naming an unknown element (element names are
        case-sensitive, as in the schema); None values are treated as absent.
        """
        values: dict[str, str] = {}
        for element, value in mapping.items():
            if element not in ATTRIBUTE_FOR_ELEMENT:
                raise ValueError(f"unknown civic address element {element!r} "
                                 f"(RFC 5139 elements: {', '.join(ELEMENT_ORDER)})")
            if value is not None:
                values[ATTRIBUTE_FOR_ELEMENT[element]] = value
        return cls(**values, language=language)

    def elements(self) -> list[tuple[str, str]]:
        """Non-empty (element, cleaned value) pairs in RFC 5139 schema order."""
        out: list[tuple[str, str]] = []
        for element, attribute in CIVIC_ELEMENTS:
            value = clean_value(getattr(self, attribute))
            if value:
                out.append((element, value))
        return out

    def as_mapping(self) -> dict[str, str]:
        """`elements()` as a dict (element name → value), schema-ordered."""
        return dict(self.elements())

    def refine(self, **elements: str | None) -> CivicAddress:
        """This site refined by a location inside it: keys are RFC 5139 element
        names (BLD, FLR, UNIT, ROOM, SEAT, LOC, or any other) or attribute names
        (floor=...). A value replaces the site's, "" clears it, None keeps it.
        Raises ValueError naming an unknown key."""
        changes: dict[str, str] = {}
        for key, value in elements.items():
            attribute = _attribute_for(key)
            if value is not None:
                changes[attribute] = value
        return dataclasses.replace(self, **changes)

    def merged_with(self, other: CivicAddress) -> CivicAddress:
        """This address with every non-empty element of `other` laid over it (a
        site address merged with the location's own parts gives the dispatchable
        location). `other.language` wins when set."""
        changes = {attribute: getattr(other, attribute) for _, attribute in CIVIC_ELEMENTS
                   if getattr(other, attribute)}
        if other.language:
            changes["language"] = other.language
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """One human-readable line, e.g.
        "10 Rue de la République, FLR 3, ROOM B312, 69002 Lyon, FR"."""
        def v(attribute: str) -> str:
            return clean_value(getattr(self, attribute))

        number = " ".join(p for p in (v("house_number"), v("house_number_suffix")) if p)
        street = " ".join(p for p in (
            number, v("road_pre_modifier"), v("leading_street_direction"), v("road"),
            v("street_suffix"), v("trailing_street_suffix"), v("road_post_modifier")) if p)
        parts = [p for p in (v("name"), street) if p]
        for element in ("BLD", "FLR", "UNIT", "ROOM", "SEAT"):
            value = v(ATTRIBUTE_FOR_ELEMENT[element])
            if value:
                parts.append(f"{element} {value}")
        if v("location_info"):
            parts.append(v("location_info"))
        town = " ".join(p for p in (v("postal_code"), v("city") or v("postal_community")) if p)
        parts.extend(p for p in (town, v("country")) if p)
        return ", ".join(parts)

    def validate(self) -> list[str]:
        """Problems that make this address unfit as a validated emergency address
        ([] = valid). Never raises."""
        problems: list[str] = []
        for element, attribute in CIVIC_ELEMENTS:
            raw = getattr(self, attribute)
            if _XML_ILLEGAL.search(raw):
                problems.append(f"{element} ({attribute}) contains control characters")
            if len(clean_value(raw)) > MAX_VALUE_LENGTH:
                problems.append(f"{element} ({attribute}) is longer than "
                                f"{MAX_VALUE_LENGTH} characters")

        country = clean_value(self.country)
        if not country:
            problems.append("country missing")
        elif country not in ISO_3166_1_ALPHA2:
            problems.append(f"country {country!r} is not an ISO 3166-1 alpha-2 code "
                            "(e.g. US, FR)")
        problems.extend(_subdivision_problems(country, clean_value(self.subdivision)))

        if not clean_value(self.road):
            if clean_value(self.street_group):
                problems.append("street (RD) missing: the street name goes in RD, "
                                "not in A6")
            else:
                problems.append("street (RD) missing")

        house_number = clean_value(self.house_number)
        if not house_number:
            problems.append("house number (HNO) missing")
        elif len(house_number) > MAX_HOUSE_NUMBER_LENGTH:
            problems.append(f"house number (HNO) is longer than {MAX_HOUSE_NUMBER_LENGTH} "
                            "characters")
        elif not any(ch.isdigit() for ch in house_number):
            problems.append(f"house number (HNO) {house_number!r} has no digit "
                            "(a house name goes in NAM or LMK)")

        problems.extend(_postal_code_problems(country, clean_value(self.postal_code)))

        if self.language is not None and not _LANGUAGE_TAG.fullmatch(self.language):
            problems.append(f"language {self.language!r} is not a language tag")
        return problems


def _subdivision_problems(country: str, subdivision: str) -> list[str]:
    if not subdivision:
        return ["subdivision (A1) missing"]
    code = subdivision
    if "-" in subdivision and subdivision.split("-", 1)[0] == country:
        code = subdivision.split("-", 1)[1]  # full ISO 3166-2 form "US-IL"
    known = KNOWN_SUBDIVISIONS.get(country)
    if _SUBDIVISION_CODE.fullmatch(code):
        if known is not None and code not in known:
            return [f"subdivision (A1) {subdivision!r} is not an ISO 3166-2:{country} code"]
        return []
    if known is not None and code.upper() in known:
        return [f"subdivision (A1) {subdivision!r}: ISO 3166-2 codes are uppercase "
                f"({code.upper()!r})"]
    if _SUBDIVISION_NAME.fullmatch(subdivision):
        return []
    return [f"subdivision (A1) {subdivision!r} is neither an ISO 3166-2 code nor a name"]


def _postal_code_problems(country: str, postal_code: str) -> list[str]:
    if not postal_code:
        if country in COUNTRIES_WITHOUT_POSTAL_CODES:
            return []
        return ["postal code (PC) missing"]
    pattern = POSTAL_CODE_PATTERNS.get(country, _GENERIC_POSTAL_CODE)
    if not pattern.fullmatch(postal_code):
        return [f"postal code (PC) {postal_code!r} is not valid for {country or 'country'}"]
    return []

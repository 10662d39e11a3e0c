"""Civic addresses of emergency calls (RFC 5139): element order, refinement into a
dispatchable location, validation and the one-line summary (EMERGENCY.md §3.4.1, EM-22)."""

from __future__ import annotations

import pytest

from e911.civic import CIVIC_ELEMENTS, ELEMENT_ORDER, CivicAddress

CHICAGO = {"country": "US", "A1": "IL", "A3": "Chicago", "RD": "Wacker Dr", "HNO": "233",
           "FLR": "12", "PC": "60606", "ROOM": "1204"}
LYON = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République", "HNO": "10",
        "FLR": "3", "PC": "69002", "ROOM": "B312"}
LYON_SITE = {key: value for key, value in LYON.items() if key not in ("FLR", "ROOM")}


def test_schema_order_is_rfc_5139() -> None:
    assert ELEMENT_ORDER == (
        "country", "A1", "A2", "A3", "A4", "A5", "A6", "PRM", "PRD", "RD", "STS", "POD", "POM",
        "RDSEC", "RDBR", "RDSUBBR", "HNO", "HNS", "LMK", "LOC", "FLR", "NAM", "PC", "BLD",
        "UNIT", "ROOM", "SEAT", "PLC", "PCN", "POBOX", "ADDCODE")
    assert len({attribute for _, attribute in CIVIC_ELEMENTS}) == len(CIVIC_ELEMENTS)


def test_elements_come_out_in_schema_order_whatever_the_input_order() -> None:
    # A form ordered "..., FLR, ROOM, PC" must still give "..., FLR, PC, ROOM".
    form_order = {"ROOM": "B312", "FLR": "3", "country": "FR", "HNO": "10", "PC": "69002",
                  "A3": "Lyon", "RD": "Rue de la République", "A1": "69"}
    address = CivicAddress.from_elements(form_order)
    assert [name for name, _ in address.elements()] == [
        "country", "A1", "A3", "RD", "HNO", "FLR", "PC", "ROOM"]
    assert address == CivicAddress.from_elements(LYON)


def test_elements_omit_empty_values_and_collapse_whitespace() -> None:
    address = CivicAddress.from_elements({
        "country": " us ", "A1": "IL", "A3": "  Chicago ", "RD": "Wacker\n\t Dr", "HNO": "233",
        "FLR": "", "UNIT": "   ", "PC": "60606", "ROOM": None})
    assert address.elements() == [("country", "US"), ("A1", "IL"), ("A3", "Chicago"),
                                  ("RD", "Wacker Dr"), ("HNO", "233"), ("PC", "60606")]
    assert address.road == "Wacker Dr"
    assert address.country == "US"


def test_unknown_element_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'STREET'"):
        CivicAddress.from_elements({"country": "US", "STREET": "Wacker Dr"})
    with pytest.raises(ValueError, match="'flr'"):
        CivicAddress.from_elements({"flr": "3"})  # element names are case-sensitive


def test_non_text_value_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="house_number"):
        CivicAddress(house_number=233)  # type: ignore[arg-type]


def test_refine_a_site_into_the_dispatchable_location() -> None:
    site = CivicAddress.from_elements(LYON_SITE)
    assert site.refine(FLR="3", ROOM="B312") == CivicAddress.from_elements(LYON)
    assert site.refine(floor="3", room="B312") == CivicAddress.from_elements(LYON)
    refined = site.refine(BLD="B", FLR="3", UNIT="Suite 4", ROOM="B312", SEAT="12")
    assert refined.elements()[5:] == [("FLR", "3"), ("PC", "69002"), ("BLD", "B"),
                                      ("UNIT", "Suite 4"), ("ROOM", "B312"), ("SEAT", "12")]
    assert site.elements() == CivicAddress.from_elements(LYON_SITE).elements()  # unchanged


def test_refine_keeps_on_none_clears_on_empty_and_refuses_unknown_keys() -> None:
    desk = CivicAddress.from_elements(LYON)
    assert desk.refine(FLR=None).floor == "3"
    assert desk.refine(FLR="").floor == ""
    assert "FLR" not in dict(desk.refine(FLR="").elements())
    with pytest.raises(ValueError, match="'DESK'"):
        desk.refine(DESK="7")


def test_merged_with_lays_the_location_over_the_site() -> None:
    site = CivicAddress.from_elements(LYON_SITE, language="fr")
    location = CivicAddress(floor="3", room="B312")
    merged = site.merged_with(location)
    assert merged.elements() == CivicAddress.from_elements(LYON).elements()
    assert merged.language == "fr"
    # The location's own non-empty parts win; its empty parts keep the site's.
    moved = merged.merged_with(CivicAddress(room="C001", language="fr-FR"))
    assert (moved.floor, moved.room, moved.language) == ("3", "C001", "fr-FR")


@pytest.mark.parametrize("mapping", [CHICAGO, LYON], ids=["chicago", "lyon"])
def test_reference_addresses_are_valid(mapping: dict[str, str]) -> None:
    assert CivicAddress.from_elements(mapping).validate() == []


@pytest.mark.parametrize("country", ["XX", "USA", "U1", "ZZ", "EU", "UK"])
def test_bad_country_fails_validation(country: str) -> None:
    problems = CivicAddress.from_elements({**CHICAGO, "country": country}).validate()
    assert any("country" in problem and country in problem for problem in problems), problems


def test_missing_country_and_lowercase_country() -> None:
    missing = {key: value for key, value in CHICAGO.items() if key != "country"}
    assert "country missing" in CivicAddress.from_elements(missing).validate()
    # A lowercase code is the same code: it is stored and emitted in uppercase.
    lower = CivicAddress.from_elements({**LYON, "country": "fr"})
    assert lower.validate() == [] and lower.country == "FR"


@pytest.mark.parametrize(("element", "expected"), [
    ("A1", "subdivision (A1) missing"),
    ("RD", "street (RD) missing"),
    ("HNO", "house number (HNO) missing"),
    ("PC", "postal code (PC) missing"),
])
def test_required_elements(element: str, expected: str) -> None:
    mapping = {key: value for key, value in CHICAGO.items() if key != element}
    assert expected in CivicAddress.from_elements(mapping).validate()


def test_street_in_a6_is_not_a_street() -> None:
    mapping = {key: value for key, value in CHICAGO.items() if key != "RD"}
    problems = CivicAddress.from_elements({**mapping, "A6": "Wacker Dr"}).validate()
    assert any("RD" in problem and "A6" in problem for problem in problems), problems


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("A1", "ZZ", "ISO 3166-2:US"),
    ("A1", "il", "uppercase"),
    ("PC", "6060", "postal code"),
    ("HNO", "Rose Cottage", "no digit"),
    ("RD", "Wacker\x00Dr", "control characters"),
    ("NAM", "x" * 200, "longer than"),
])
def test_field_problems(field: str, value: str, fragment: str) -> None:
    problems = CivicAddress.from_elements({**CHICAGO, field: value}).validate()
    assert any(fragment in problem for problem in problems), problems


def test_country_specific_postal_codes() -> None:
    assert CivicAddress.from_elements({**LYON, "PC": "6900"}).validate() != []
    canada = {"country": "CA", "A1": "ON", "A3": "Toronto", "RD": "King St W", "HNO": "100",
              "PC": "M5X 1A9"}
    assert CivicAddress.from_elements(canada).validate() == []
    assert CivicAddress.from_elements({**canada, "PC": "12345"}).validate() != []
    london = {"country": "GB", "A1": "LND", "A3": "London", "RD": "Downing St", "HNO": "10",
              "PC": "SW1A 2AA"}
    assert CivicAddress.from_elements(london).validate() == []


def test_bad_language_tag() -> None:
    address = CivicAddress.from_elements(CHICAGO, language="en US!")
    assert any("language" in problem for problem in address.validate())
    assert CivicAddress.from_elements(CHICAGO, language="en-US").validate() == []


def test_summary_lyon_and_chicago() -> None:
    assert CivicAddress.from_elements(LYON).summary() == \
        "10 Rue de la République, FLR 3, ROOM B312, 69002 Lyon, FR"
    assert CivicAddress.from_elements(CHICAGO).summary() == \
        "233 Wacker Dr, FLR 12, ROOM 1204, 60606 Chicago, US"
    detailed = CivicAddress.from_elements({
        **CHICAGO, "PRD": "N", "STS": "Ave", "HNS": "A", "BLD": "East", "UNIT": "Suite 9",
        "SEAT": "7", "NAM": "Acme HQ"})
    assert detailed.summary() == ("Acme HQ, 233 A N Wacker Dr Ave, BLD East, FLR 12, "
                                  "UNIT Suite 9, ROOM 1204, SEAT 7, 60606 Chicago, US")
    site = CivicAddress.from_elements(LYON_SITE)
    assert site.summary() == "10 Rue de la République, 69002 Lyon, FR"

"""PIDF-LO bodies of emergency INVITEs: building, schema validation and reading back
(RFC 4119, 5139, 5491, 4479, 3863, 7852; EMERGENCY.md §3.4.1, EM-22, EM-23)."""

from __future__ import annotations

import pytest
from lxml import etree

from e911.civic import CIVIC_ELEMENTS, CivicAddress
from e911.pidf import (
    NS_AD,
    NS_CA,
    NS_DM,
    NS_GBP,
    NS_GP,
    build_pidf,
    device_element_id,
    parse_civic,
    rfc3339_utc,
    validate_pidf,
)

CHICAGO = {"country": "US", "A1": "IL", "A3": "Chicago", "RD": "Wacker Dr", "HNO": "233",
           "FLR": "12", "PC": "60606", "ROOM": "1204"}
LYON = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République", "HNO": "10",
        "FLR": "3", "PC": "69002", "ROOM": "B312"}
T_2025_01_15_140322 = 1736949802.0
PROVINFO = "https://pbx.example.com/ecd/provinfo/1"

# The reference PIDF-LO of EMERGENCY.md §3.4.1, verbatim.
REFERENCE = b"""<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf"
    xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
    xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10"
    xmlns:gbp="urn:ietf:params:xml:ns:pidf:geopriv10:basicPolicy"
    xmlns:ca="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"
    xmlns:ad="urn:ietf:params:xml:ns:EmergencyCallData"
    entity="sip:+13125550101@pbx.example.com">
  <dm:device id="ext101">
    <gp:geopriv>
      <gp:location-info>
        <ca:civicAddress xml:lang="en-US">
          <ca:country>US</ca:country>
          <ca:A1>IL</ca:A1>
          <ca:A3>Chicago</ca:A3>
          <ca:RD>Wacker Dr</ca:RD>
          <ca:HNO>233</ca:HNO>
          <ca:FLR>12</ca:FLR>
          <ca:PC>60606</ca:PC>
          <ca:ROOM>1204</ca:ROOM>
        </ca:civicAddress>
      </gp:location-info>
      <gp:usage-rules>
        <gbp:retransmission-allowed>true</gbp:retransmission-allowed>
      </gp:usage-rules>
      <gp:method>Manual</gp:method>
      <gp:provided-by>
        <ad:EmergencyCallDataReference purpose="EmergencyCallData.ProviderInfo"
            ref="https://pbx.example.com/ecd/provinfo/1"/>
      </gp:provided-by>
    </gp:geopriv>
    <dm:deviceID>mac:0004f2a1b2c3</dm:deviceID>
    <dm:timestamp>2025-01-15T14:03:22Z</dm:timestamp>
  </dm:device>
</presence>
"""


def chicago_pidf(**overrides: object) -> bytes:
    arguments: dict[str, object] = dict(
        entity="sip:+13125550101@pbx.example.com", device_id="mac:0004f2a1b2c3",
        timestamp=T_2025_01_15_140322, provided_by=PROVINFO, element_id="ext101")
    arguments.update(overrides)
    civic = CivicAddress.from_elements(CHICAGO, language="en-US")
    return build_pidf(civic, **arguments)  # type: ignore[arg-type]


def canonical(document: bytes) -> bytes:
    parser = etree.XMLParser(remove_blank_text=True)
    return etree.tostring(etree.fromstring(document, parser), method="c14n")


def civic_children(document: bytes) -> list[tuple[str, str]]:
    root = etree.fromstring(document)
    address = root.find(f".//{{{NS_CA}}}civicAddress")
    assert address is not None
    return [(etree.QName(child).localname, child.text or "") for child in address]


def test_reference_document_is_valid_and_reads_back() -> None:
    assert validate_pidf(REFERENCE) == []
    assert validate_pidf(REFERENCE, strict=True) == []
    assert parse_civic(REFERENCE) == CivicAddress.from_elements(CHICAGO, language="en-US")


def test_chicago_is_built_as_the_reference_document() -> None:
    document = chicago_pidf()
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<presence ')
    assert canonical(document) == canonical(REFERENCE)


@pytest.mark.parametrize(("mapping", "language"), [(CHICAGO, "en-US"), (LYON, "fr")],
                         ids=["chicago", "lyon"])
def test_examples_validate_and_read_back_equal(mapping: dict[str, str], language: str) -> None:
    civic = CivicAddress.from_elements(mapping, language=language)
    document = build_pidf(civic, entity="sip:+33472000001@pbx.example.fr",
                          device_id="urn:uuid:6ba7b810-9dad-11d1-80b4-00c04fd430c8",
                          timestamp=T_2025_01_15_140322, provided_by=PROVINFO)
    assert validate_pidf(document, strict=True) == []
    assert parse_civic(document) == civic
    assert civic_children(document) == list(mapping.items())  # already in schema order


def test_lyon_civic_elements_are_in_schema_order() -> None:
    document = build_pidf(CivicAddress.from_elements(LYON), entity="sip:1@x.example",
                          device_id="mac:1", timestamp=0)
    assert [name for name, _ in civic_children(document)] == [
        "country", "A1", "A3", "RD", "HNO", "FLR", "PC", "ROOM"]
    assert "Rue de la République".encode() in document  # UTF-8, not character references


def test_room_before_pc_fails_validation() -> None:
    room_first = REFERENCE.replace(
        b"<ca:PC>60606</ca:PC>\n          <ca:ROOM>1204</ca:ROOM>",
        b"<ca:ROOM>1204</ca:ROOM>\n          <ca:PC>60606</ca:PC>")
    assert room_first != REFERENCE
    problems = validate_pidf(room_first)
    assert problems and any("PC" in problem for problem in problems), problems
    # And the builder never emits that order, whatever the input order.
    form_order = dict(reversed(list(CHICAGO.items())))
    document = build_pidf(CivicAddress.from_elements(form_order), entity="sip:1@x.example",
                          device_id="mac:1", timestamp=0)
    names = [name for name, _ in civic_children(document)]
    assert names.index("PC") < names.index("ROOM")


def test_location_without_floor_has_no_flr_element() -> None:
    no_floor = {key: value for key, value in CHICAGO.items() if key != "FLR"}
    document = build_pidf(CivicAddress.from_elements({**no_floor, "UNIT": " "}),
                          entity="sip:1@x.example", device_id="mac:1", timestamp=0,
                          provided_by=PROVINFO)
    assert b"FLR" not in document and b"UNIT" not in document
    assert [name for name, _ in civic_children(document)] == [
        "country", "A1", "A3", "RD", "HNO", "PC", "ROOM"]
    assert validate_pidf(document, strict=True) == []


def test_bad_country_fails_civic_and_schema_validation() -> None:
    civic = CivicAddress.from_elements({**CHICAGO, "country": "USA"})
    assert any("country" in problem for problem in civic.validate())
    document = build_pidf(civic, entity="sip:1@x.example", device_id="mac:1", timestamp=0)
    problems = validate_pidf(document)
    assert any("country" in problem for problem in problems), problems


def test_round_trip_of_every_element() -> None:
    values = {element: f"{element} value {index} <&> ü" for index, (element, _)
              in enumerate(CIVIC_ELEMENTS)}
    values["country"] = "DE"
    civic = CivicAddress.from_elements(values, language="de-DE")
    document = build_pidf(civic, entity="sip:100@pbx.example.de", device_id="mac:1",
                          timestamp=0, provided_by=PROVINFO)
    assert validate_pidf(document, strict=True) == []
    assert [name for name, _ in civic_children(document)] == [e for e, _ in CIVIC_ELEMENTS]
    back = parse_civic(document)
    assert back == civic
    assert back is not None and back.as_mapping() == values


def test_output_is_deterministic() -> None:
    assert chicago_pidf() == chicago_pidf()
    reordered = CivicAddress.from_elements(dict(reversed(list(CHICAGO.items()))),
                                           language="en-US")
    rebuilt = build_pidf(reordered, entity="sip:+13125550101@pbx.example.com",
                         device_id="mac:0004f2a1b2c3", timestamp=T_2025_01_15_140322,
                         provided_by=PROVINFO, element_id="ext101")
    assert rebuilt == chicago_pidf()


def test_device_geopriv_and_usage_rules_structure() -> None:
    expiry = T_2025_01_15_140322 + 86400
    document = chicago_pidf(method="Default", retransmission_allowed=False,
                            retention_expiry=expiry, provided_by=None, lang="en")
    assert validate_pidf(document) == []
    root = etree.fromstring(document)
    devices = root.findall(f"{{{NS_DM}}}device")
    assert len(devices) == 1
    device = devices[0]
    assert [etree.QName(child).localname for child in device] == [
        "geopriv", "deviceID", "timestamp"]
    geopriv = device[0]
    assert [etree.QName(child).localname for child in geopriv] == [
        "location-info", "usage-rules", "method"]
    assert geopriv.findtext(f"{{{NS_GP}}}method") == "Default"
    rules = geopriv.find(f"{{{NS_GP}}}usage-rules")
    assert rules is not None
    assert rules.findtext(f"{{{NS_GBP}}}retransmission-allowed") == "false"
    assert rules.findtext(f"{{{NS_GBP}}}retention-expiry") == "2025-01-16T14:03:22Z"
    address = root.find(f".//{{{NS_CA}}}civicAddress")
    assert address is not None
    assert address.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    # Without provided-by the document is schema-valid but not the EM-22 profile.
    assert any("provided-by" in problem for problem in validate_pidf(document, strict=True))


def test_provided_by_reference() -> None:
    document = chicago_pidf(provided_by="cid:provinfo-101@pbx.example.com")
    reference = etree.fromstring(document).find(
        f".//{{{NS_GP}}}provided-by/{{{NS_AD}}}EmergencyCallDataReference")
    assert reference is not None
    assert reference.get("purpose") == "EmergencyCallData.ProviderInfo"
    assert reference.get("ref") == "cid:provinfo-101@pbx.example.com"
    assert validate_pidf(document, strict=True) == []


def test_timestamps_and_device_ids() -> None:
    assert rfc3339_utc(T_2025_01_15_140322) == "2025-01-15T14:03:22Z"
    assert rfc3339_utc(T_2025_01_15_140322 + 0.999) == "2025-01-15T14:03:22Z"
    assert rfc3339_utc(0) == "1970-01-01T00:00:00Z"
    assert device_element_id("mac:0004f2a1b2c3") == "mac-0004f2a1b2c3"
    assert device_element_id("101") == "dev-101"
    document = chicago_pidf(element_id=None)
    assert b'<dm:device id="mac-0004f2a1b2c3">' in document
    assert validate_pidf(document) == []


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"provided_by": "Example Telecom"}, "provided_by"),
    ({"entity": ""}, "entity"),
    ({"entity": "alice at example"}, "entity"),
    ({"device_id": ""}, "device_id"),
    ({"device_id": "mac 0004"}, "device_id"),
    ({"element_id": "101"}, "element_id"),
    ({"method": "  "}, "method"),
    ({"lang": "en US"}, "lang"),
    ({"timestamp": float("nan")}, "timestamp"),
    ({"retention_expiry": float("inf")}, "timestamp"),
])
def test_bad_arguments_are_clear_errors(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        chicago_pidf(**overrides)


def test_empty_or_wrong_civic_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_pidf(CivicAddress(), entity="sip:1@x.example", device_id="mac:1", timestamp=0)
    with pytest.raises(TypeError, match="CivicAddress"):
        build_pidf(CHICAGO, entity="sip:1@x.example", device_id="mac:1",  # type: ignore[arg-type]
                   timestamp=0)


@pytest.mark.parametrize("body", [
    b"", b"<presence", b"\xff\xfe\x00garbage", b"not xml at all", "<?xml version='1.0'?>",
    b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY e "x">]><p>&e;</p>', 42,
], ids=["empty", "truncated", "binary", "text", "str-decl", "doctype", "int"])
def test_parse_civic_never_raises_on_bad_input(body: object) -> None:
    assert parse_civic(body) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [b"", b"<presence", b"\xff\xfe", b"<a/>"])
def test_validate_pidf_reports_bad_input(body: bytes) -> None:
    problems = validate_pidf(body)
    assert problems and all(isinstance(problem, str) for problem in problems)


def test_parse_civic_without_civic_address() -> None:
    geodetic = REFERENCE.replace(
        REFERENCE[REFERENCE.index(b"<ca:civicAddress"):
                  REFERENCE.index(b"</ca:civicAddress>") + len(b"</ca:civicAddress>")],
        b'<gml:Point xmlns:gml="http://www.opengis.net/gml" srsName="urn:ogc:def:crs:EPSG::4326">'
        b"<gml:pos>41.8868 -87.6375</gml:pos></gml:Point>")
    assert b"civicAddress" not in geodetic
    assert parse_civic(geodetic) is None


def test_parse_civic_prefers_device_to_tuple_and_reads_rfc_4119_civic() -> None:
    # A device PIDF (EM-23): a tuple first in the document, then a device; the
    # device's location wins (RFC 5491). The tuple uses RFC 4119's civicLoc.
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf"
    xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
    xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10"
    xmlns:cl="urn:ietf:params:xml:ns:pidf:geopriv10:civicLoc"
    xmlns:ca="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"
    entity="pres:dev1@example.com">
  <tuple id="t1"><status><gp:geopriv><gp:location-info>
    <cl:civicAddress><cl:country>US</cl:country><cl:A1>NY</cl:A1></cl:civicAddress>
  </gp:location-info><gp:usage-rules/></gp:geopriv></status></tuple>
  <dm:device id="d1"><gp:geopriv><gp:location-info>
    <ca:civicAddress xml:lang="en"><ca:country>US</ca:country><ca:A1>IL</ca:A1>
      <ca:RD>Wacker Dr</ca:RD><ca:ROOM>Lab-3</ca:ROOM><ca:ROOM>ignored</ca:ROOM>
      <x:ext xmlns:x="urn:example:ext">extension</x:ext>
    </ca:civicAddress>
  </gp:location-info><gp:usage-rules/></gp:geopriv>
  <dm:deviceID>mac:1</dm:deviceID></dm:device>
</presence>"""
    assert parse_civic(body) == CivicAddress.from_elements(
        {"country": "US", "A1": "IL", "RD": "Wacker Dr", "ROOM": "Lab-3"}, language="en")
    tuple_only = body[:body.index(b"<dm:device")] + b"</presence>"
    assert parse_civic(tuple_only) == CivicAddress.from_elements({"country": "US", "A1": "NY"})


def test_strict_profile_problems() -> None:
    empty_floor = REFERENCE.replace(b"<ca:FLR>12</ca:FLR>", b"<ca:FLR/>")
    assert validate_pidf(empty_floor) == []  # schema-valid (an empty token) ...
    assert any("FLR" in problem for problem in validate_pidf(empty_floor, strict=True))
    no_device_id = REFERENCE.replace(b"<dm:deviceID>mac:0004f2a1b2c3</dm:deviceID>", b"")
    assert validate_pidf(no_device_id)  # dm:deviceID is required by RFC 4479 too
    second = REFERENCE.replace(b"    </gp:geopriv>\n",
                               b"    </gp:geopriv>\n<gp:geopriv><gp:location-info/>"
                               b"<gp:usage-rules/></gp:geopriv>\n")
    assert validate_pidf(second) == []
    assert any("exactly 1" in problem for problem in validate_pidf(second, strict=True))


def test_provided_by_content_is_checked_against_rfc_7852() -> None:
    no_purpose = REFERENCE.replace(b'purpose="EmergencyCallData.ProviderInfo"', b"")
    problems = validate_pidf(no_purpose)
    assert any("purpose" in problem for problem in problems), problems


def test_documents_with_a_doctype_are_refused() -> None:
    # Entity expansion (XXE, "billion laughs") has no place in a SIP body.
    with_doctype = REFERENCE.replace(
        b"<presence ", b'<!DOCTYPE presence [<!ENTITY room "1204">]>\n<presence ', 1)
    assert parse_civic(with_doctype) is None
    assert any("DOCTYPE" in problem for problem in validate_pidf(with_doctype))

"""PIDF-LO location objects of emergency calls (RFC 4119, 5139, 5491, 4479, 3863, 7852).

`build_pidf()` writes the `application/pidf+xml` body that an emergency INVITE
carries by value (RFC 6442): a `<presence>` whose single `<dm:device>` holds one
`<gp:geopriv>` with the civic address (RFC 5139 element order, no empty
elements), the usage rules, the location method and, by reference, who
provided it (RFC 7852 `EmergencyCallDataReference`), then the device ID and the
time the location was determined (EMERGENCY.md §3.4.1, EM-22).

`parse_civic()` reads back the first civic address of a PIDF-LO (a device's
own, EM-23, or ours) in RFC 5491 order: device before tuple before person. It
never raises. `validate_pidf()` checks a document against the RFC schemas kept
in `e911/schemas` (offline, with lxml); `strict=True` adds the EM-22 checks.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree

from e911.civic import ATTRIBUTE_FOR_ELEMENT, CivicAddress

PIDF_CONTENT_TYPE = "application/pidf+xml"

NS_PIDF = "urn:ietf:params:xml:ns:pidf"
NS_DM = "urn:ietf:params:xml:ns:pidf:data-model"
NS_GP = "urn:ietf:params:xml:ns:pidf:geopriv10"
NS_GBP = "urn:ietf:params:xml:ns:pidf:geopriv10:basicPolicy"
NS_CA = "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"
NS_AD = "urn:ietf:params:xml:ns:EmergencyCallData"
# RFC 4119's original civic format, replaced by RFC 5139 but still sent by devices.
NS_CIVIC_LOC = "urn:ietf:params:xml:ns:pidf:geopriv10:civicLoc"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

NSMAP: dict[str | None, str] = {
    None: NS_PIDF,
    "dm": NS_DM,
    "gp": NS_GP,
    "gbp": NS_GBP,
    "ca": NS_CA,
    "ad": NS_AD,
}
PROVIDER_INFO_PURPOSE = "EmergencyCallData.ProviderInfo"
SCHEMA_DIR = Path(__file__).with_name("schemas")
# Namespace → schema file; each file is a transcription of its RFC's schema
# (EmergencyCallData.xsd is a reduced stand-in, see its header).
SCHEMA_FILES: dict[str, str] = {
    NS_PIDF: "pidf.xsd",
    NS_DM: "data-model.xsd",
    NS_GP: "geopriv10.xsd",
    NS_GBP: "basicPolicy.xsd",
    NS_CA: "civicAddr.xsd",
    NS_AD: "EmergencyCallData.xsd",
}
MAX_PIDF_BYTES = 1 << 20

_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]+")
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")
_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def rfc3339_utc(timestamp: float) -> str:
    """POSIX time as an RFC 3339 UTC date-time with whole seconds
    ("2025-01-15T14:03:22Z"), as dm:timestamp and gbp:retention-expiry carry it."""
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool) \
            or not math.isfinite(timestamp):
        raise ValueError(f"timestamp must be a finite number of seconds, not {timestamp!r}")
    moment = datetime.fromtimestamp(math.floor(timestamp), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def device_element_id(device_id: str) -> str:
    """An xs:ID (NCName) for the `<dm:device id=...>` attribute derived from a
    device ID ("mac:0004f2a1b2c3" → "mac-0004f2a1b2c3")."""
    ncname = re.sub(r"[^A-Za-z0-9._-]", "-", device_id)
    if not _NCNAME.fullmatch(ncname):
        ncname = f"dev-{ncname}"
    return ncname


def build_pidf(civic: CivicAddress, *, entity: str, device_id: str, timestamp: float,
               method: str = "Manual", provided_by: str | None = None,
               lang: str | None = None, retransmission_allowed: bool = True,
               retention_expiry: float | None = None,
               element_id: str | None = None) -> bytes:
    """The PIDF-LO document (UTF-8 bytes with an XML declaration) for one device.

    `entity` is the presentity URI (the caller's SIP URI), `device_id` the
    dm:deviceID URN ("mac:0004f2a1b2c3"), `timestamp` when the location was
    determined (POSIX seconds), `method` the RFC 4119 method token ("Manual",
    "Default", "DHCP", ...), `provided_by` a URI for RFC 7852 ProviderInfo sent
    by reference (https: or cid:), `lang` the civicAddress xml:lang (default:
    `civic.language`), `element_id` the dm:device id attribute (default: derived
    from `device_id`). Raises ValueError (TypeError for a non-CivicAddress) on
    arguments that cannot make a well-formed PIDF-LO; the address content itself
    is written as given: check it with `civic.validate()` / `validate_pidf()`.
    The output is deterministic: equal arguments give equal bytes.
    """
    if not isinstance(civic, CivicAddress):
        raise TypeError(f"civic must be a CivicAddress, not {type(civic).__name__}")
    elements = civic.elements()
    if not elements:
        raise ValueError("civic address is empty: nothing to locate")
    if not isinstance(entity, str) or not _URI.fullmatch(entity):
        raise ValueError(f"entity must be a URI such as sip:+13125550101@pbx.example.com, "
                         f"not {entity!r}")
    if not isinstance(device_id, str) or not device_id or _CONTROL.search(device_id):
        raise ValueError(f"device_id must be a non-empty URN without spaces, "
                         f"not {device_id!r}")
    method_token = " ".join(method.split()) if isinstance(method, str) else ""
    if not method_token:
        raise ValueError("method must be a non-empty token (Manual, Default, DHCP, ...)")
    if provided_by is not None and (not isinstance(provided_by, str)
                                    or not _URI.fullmatch(provided_by)):
        raise ValueError(f"provided_by must be a URI (https:... or cid:...), "
                         f"not {provided_by!r}")
    language = lang if lang is not None else civic.language
    if language is not None and not _LANGUAGE_TAG.fullmatch(language):
        raise ValueError(f"lang {language!r} is not a language tag such as en-US")
    if element_id is None:
        element_id = device_element_id(device_id)
    elif not _NCNAME.fullmatch(element_id):
        raise ValueError(f"element_id {element_id!r} is not an XML NCName")
    when = rfc3339_utc(timestamp)
    expiry = rfc3339_utc(retention_expiry) if retention_expiry is not None else None

    presence = etree.Element(_q(NS_PIDF, "presence"), nsmap=NSMAP)
    presence.set("entity", entity)
    device = etree.SubElement(presence, _q(NS_DM, "device"))
    device.set("id", element_id)
    geopriv = etree.SubElement(device, _q(NS_GP, "geopriv"))

    location_info = etree.SubElement(geopriv, _q(NS_GP, "location-info"))
    address = etree.SubElement(location_info, _q(NS_CA, "civicAddress"))
    if language:
        address.set(XML_LANG, language)
    for element, value in elements:
        etree.SubElement(address, _q(NS_CA, element)).text = value

    usage_rules = etree.SubElement(geopriv, _q(NS_GP, "usage-rules"))
    etree.SubElement(usage_rules, _q(NS_GBP, "retransmission-allowed")).text = (
        "true" if retransmission_allowed else "false")
    if expiry is not None:
        etree.SubElement(usage_rules, _q(NS_GBP, "retention-expiry")).text = expiry

    etree.SubElement(geopriv, _q(NS_GP, "method")).text = method_token
    if provided_by is not None:
        provider = etree.SubElement(geopriv, _q(NS_GP, "provided-by"))
        reference = etree.SubElement(provider, _q(NS_AD, "EmergencyCallDataReference"))
        reference.set("purpose", PROVIDER_INFO_PURPOSE)
        reference.set("ref", provided_by)

    etree.SubElement(device, _q(NS_DM, "deviceID")).text = device_id
    etree.SubElement(device, _q(NS_DM, "timestamp")).text = when
    return _XML_DECLARATION + etree.tostring(presence, encoding="UTF-8",
                                             xml_declaration=False, pretty_print=True)


class _PidfError(ValueError):
    """A body that is not a parseable, DTD-free XML document."""


def _parse(pidf: bytes | str) -> etree._Element:
    if isinstance(pidf, str):
        pidf = pidf.encode("utf-8")
    if not isinstance(pidf, bytes | bytearray | memoryview):
        raise _PidfError(f"expected bytes, not {type(pidf).__name__}")
    data = bytes(pidf)
    if len(data) > MAX_PIDF_BYTES:
        raise _PidfError(f"document larger than {MAX_PIDF_BYTES} bytes")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise _PidfError(f"not well-formed XML: {exc}") from None
    if root is None:
        raise _PidfError("empty document")
    if root.getroottree().docinfo.doctype:
        raise _PidfError("a DOCTYPE is not allowed in a PIDF-LO")
    return root


_CIVIC_TAGS = (_q(NS_CA, "civicAddress"), _q(NS_CIVIC_LOC, "civicAddress"))


def _first_civic_element(root: etree._Element) -> etree._Element | None:
    # RFC 5491 §3.4: a device's location is preferred to a tuple's, a tuple's to
    # a person's; within each, document order ("the first device wins").
    for tag in (_q(NS_DM, "device"), _q(NS_PIDF, "tuple"), _q(NS_DM, "person")):
        for container in root.iterchildren(tag):
            for civic in container.iter(*_CIVIC_TAGS):
                return civic
    for civic in root.iter(*_CIVIC_TAGS):
        return civic
    return None


def parse_civic(pidf: bytes) -> CivicAddress | None:
    """The first civic address of a PIDF-LO (RFC 5139, or RFC 4119's civicLoc),
    or None when the body is not XML or holds no civic address. Unknown and
    extension elements are ignored; a repeated element keeps its first value.
    Never raises."""
    try:
        root = _parse(pidf)
        element = _first_civic_element(root)
        if element is None:
            return None
        namespace = etree.QName(element).namespace
        values: dict[str, str] = {}
        for child in element:
            if not isinstance(child.tag, str):
                continue  # comment or processing instruction
            name = etree.QName(child)
            if name.namespace == namespace and name.localname in ATTRIBUTE_FOR_ELEMENT:
                values.setdefault(name.localname, "".join(child.itertext()))
        language = element.get(XML_LANG)
        return CivicAddress.from_elements(values, language=language or None)
    except Exception:  # bad input from a device must never raise here
        return None


@functools.cache
def _schema() -> etree.XMLSchema:
    imports = "".join(
        f'<xs:import namespace="{namespace}" schemaLocation="{filename}"/>'
        for namespace, filename in SCHEMA_FILES.items())
    driver = ('<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
              f"{imports}</xs:schema>")
    parser = etree.XMLParser(no_network=True, resolve_entities=False)
    document = etree.fromstring(driver.encode(), parser,
                                base_url=SCHEMA_DIR.resolve().as_uri() + "/")
    return etree.XMLSchema(document)


def _schema_errors(schema: etree.XMLSchema, where: str = "") -> list[str]:
    return [f"{where}line {error.line}: {error.message}" for error in schema.error_log]


def validate_pidf(pidf: bytes, *, strict: bool = False) -> list[str]:
    """Problems of a PIDF-LO document ([] = valid).

    Checks well-formedness, that the root is a PIDF `<presence>`, and validity
    against the RFC 3863/4479/4119/5139 schemas (plus the RFC 7852
    EmergencyCallData elements inside `gp:provided-by`, which RFC 4119's schema
    skips). With `strict=True` also the EM-22 profile: a `dm:device` first
    holding exactly one `gp:geopriv` with one civic address that has no empty
    elements, country and A1, and `gp:method`, `gp:provided-by`, `dm:deviceID`,
    `dm:timestamp`. Never raises on bad input."""
    try:
        root = _parse(pidf)
    except _PidfError as exc:
        return [str(exc)]
    if root.tag != _q(NS_PIDF, "presence"):
        return [f"root element is {root.tag!r}, not a PIDF <presence> "
                f"({{{NS_PIDF}}}presence)"]
    schema = _schema()
    problems: list[str] = []
    if not schema.validate(root.getroottree()):
        problems.extend(_schema_errors(schema))
    for provided_by in root.iter(_q(NS_GP, "provided-by")):
        for child in provided_by:
            if isinstance(child.tag, str) and etree.QName(child).namespace == NS_AD:
                subtree = etree.ElementTree(_detached_copy(child))
                if not schema.validate(subtree):
                    problems.extend(_schema_errors(
                        schema, f"provided-by/{etree.QName(child).localname} "))
    if strict:
        problems.extend(_profile_problems(root))
    return problems


def _detached_copy(element: etree._Element) -> etree._Element:
    copy = etree.fromstring(etree.tostring(element))
    copy.sourceline = element.sourceline
    return copy


def _profile_problems(root: etree._Element) -> list[str]:
    """EM-22 / RFC 5491 checks beyond the schemas, on the first device."""
    device = root.find(_q(NS_DM, "device"))
    if device is None:
        return ["no <dm:device> (RFC 5491: a device's location is preferred; EM-22)"]
    problems: list[str] = []
    geoprivs = device.findall(_q(NS_GP, "geopriv"))
    if len(geoprivs) != 1:
        problems.append(f"<dm:device> holds {len(geoprivs)} <gp:geopriv>, expected exactly 1")
    for name in ("deviceID", "timestamp"):
        if device.find(_q(NS_DM, name)) is None:
            problems.append(f"<dm:device> has no <dm:{name}>")
    if not geoprivs:
        return problems
    geopriv = geoprivs[0]
    for name in ("method", "provided-by", "usage-rules"):
        if geopriv.find(_q(NS_GP, name)) is None:
            problems.append(f"<gp:geopriv> has no <gp:{name}>")
    location_info = geopriv.find(_q(NS_GP, "location-info"))
    locations = [] if location_info is None else [
        child for child in location_info if isinstance(child.tag, str)]
    if len(locations) != 1:
        problems.append(f"<gp:location-info> holds {len(locations)} locations, "
                        "expected exactly 1 (RFC 5491)")
    civic = next((loc for loc in locations if loc.tag == _q(NS_CA, "civicAddress")), None)
    if civic is None:
        problems.append("<gp:location-info> has no RFC 5139 <ca:civicAddress>")
        return problems
    present: set[str] = set()
    for child in civic:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        present.add(name)
        if not "".join(child.itertext()).strip():
            problems.append(f"empty civic element <ca:{name}/>")
    for required in ("country", "A1"):
        if required not in present:
            problems.append(f"civic address has no <ca:{required}>")
    return problems

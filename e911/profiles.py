"""Per-trunk emergency profiles: the INVITE the switch sends towards an emergency trunk.

An emergency trunk has one profile (EMERGENCY.md EM-20, §3.4.2–3.4.3) that fixes the
Request-URI and To form, the callback identity (P-Asserted-Identity and From, EM-25,
never anonymous, EM-14), whether PIDF-LO is sent by value in a ``multipart/mixed`` body
with ``Geolocation``/``Geolocation-Routing`` (RFC 6442, EM-21, EM-23), and whether
``Priority: emergency`` and ``Resource-Priority`` are sent (EM-29):

- ``dlr``: US dynamic location routing. ``sip:911@trunk``, identity only, no body.
- ``pidf``: ``sip:911@trunk`` plus PIDF-LO by value.
- ``i3``: NENA i3. Request-URI and To ``urn:service:sos[.x]``, Route to the ESRP,
  PIDF-LO by value, ``Geolocation-Routing``.
- ``nat``: EU national. The dialled short number (112, 15, 18, ...) and the site's DID.

Helplines (FR 119, US 988, ...) are never sent as ``urn:service:sos``, never carry
PIDF-LO, Priority or Resource-Priority, whatever the profile (EM-08). Test calls take the
carrier test forms: ``933`` or ``urn:service:test.sos`` (EM-07).

A location the device supplied is forwarded byte for byte, ahead of the switch's own,
which is appended last (RFC 6442 §4); on a 424 the call is retried with only the
switch's validated default location, or none (EM-31, :func:`without_location`).

This module decides header values and bodies only; the call layer adds Via, Call-ID,
CSeq, tags and Contact (or uses :meth:`EmergencyInvite.to_request`) and sends it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

from sip.grammar import GrammarError, quote
from sip.headers import canonical_name, parse_content_type
from sip.message import SipRequest
from sip.multipart import BodyPart, build_multipart, parse_multipart
from sip.uri import SipUri, parse_uri

SDP_TYPE = "application/sdp"
PIDF_TYPE = "application/pidf+xml"
ACCEPT_WITH_LOCATION = f"{SDP_TYPE}, {PIDF_TYPE}"

# Headers of the device's INVITE the call layer must not copy to the emergency leg: the
# switch alone asserts identity (EM-14, EM-25), priority (EM-09, EM-29), routing and
# location headers (RFC 6442: Geolocation-Routing at most once, cids must resolve).
STRIP_HEADERS: tuple[str, ...] = (
    "Privacy",
    "P-Preferred-Identity",
    "P-Asserted-Identity",
    "Remote-Party-ID",
    "Resource-Priority",
    "Priority",
    "Geolocation",
    "Geolocation-Routing",
    "Route",
    "Accept",
)
_STRIP_LOWER = frozenset(name.lower() for name in STRIP_HEADERS)

NumberClass = Literal["emergency", "test", "helpline"]
NUMBER_CLASSES: frozenset[str] = frozenset(("emergency", "test", "helpline"))
NUMBER_FORMATS: frozenset[str] = frozenset(("digits", "user-phone"))

# Digits that a US/CA dynamic-location-routing trunk takes as they were dialled.
NANP_EMERGENCY_FORMS = frozenset(("911", "933"))
NANP_TEST_NUMBER = "933"

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")
_DIGITS = re.compile(r"[0-9]{1,15}")
# RFC 4412 r-value: namespace "." r-priority, both tokens.
_RP_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_R_VALUE = re.compile(rf"[A-Za-z0-9\-!%*_+`'~]+\.{_RP_TOKEN}")
# RFC 5031 service URN under sos or test.sos, labels of letters, digits and hyphens.
_SOS_URN = re.compile(r"urn:service:(test\.)?sos((\.[a-z0-9-]+)*)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ANONYMOUS_NAMES = frozenset(("anonymous", "unknown", "restricted", "unavailable"))


class EmergencyProfileError(ValueError):
    """A profile or a build request that cannot give a well-formed emergency INVITE."""


class ProfileKind(StrEnum):
    DLR = "dlr"  # US dynamic location routing: 911, identity in From/PAI, no body
    PIDF = "pidf"  # 911 with PIDF-LO by value
    I3 = "i3"  # NENA i3: urn:service:sos, Route to the ESRP, PIDF-LO by value
    NAT = "nat"  # EU national: the dialled short number, the site's DID, no body


def _strip_angles(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1].strip()
    return text


@dataclass(frozen=True)
class EmergencyProfile:
    """How one emergency trunk wants its INVITE (EM-20).

    ``send_location`` None means the kind's default (pidf and i3 send PIDF-LO by value,
    dlr and nat do not). ``emergency_number`` is what dlr/pidf send when the dialled form
    was not 911/933 (a URN, or 112 at a US site), and what nat sends for a dialled URN.
    ``number_format`` "digits" gives ``sip:911@trunk``; "user-phone" adds ``;user=phone``
    for the dialled-number forms. ``provider_info_url`` is sent as the RFC 7852
    ``Call-Info ...;purpose=EmergencyCallData.ProviderInfo`` when set.
    """

    kind: ProfileKind
    esrp_route: str | None = None
    resource_priority: str | None = None
    trusted_esnet: bool = False
    priority: bool = False
    geolocation_routing: bool = True
    send_location: bool | None = None
    device_location_first: bool = True
    emergency_number: str = "911"
    number_format: str = "digits"
    provider_info_url: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", ProfileKind(self.kind))
        except ValueError:
            valid = ", ".join(k.value for k in ProfileKind)
            raise EmergencyProfileError(
                f"emergency profile kind {self.kind!r} is not one of {valid}"
            ) from None
        if self.esrp_route is not None:
            route = _strip_angles(self.esrp_route)
            try:
                uri = parse_uri(route)
            except GrammarError as exc:
                raise EmergencyProfileError(f"esrp_route {self.esrp_route!r}: {exc}") from None
            if not isinstance(uri, SipUri):
                raise EmergencyProfileError(
                    f"esrp_route {self.esrp_route!r} must be a sip: or sips: URI"
                )
            object.__setattr__(self, "esrp_route", route)
        if self.resource_priority is not None:
            values = [v.strip() for v in self.resource_priority.split(",")]
            if not all(_R_VALUE.fullmatch(v) for v in values):
                raise EmergencyProfileError(
                    f"resource_priority {self.resource_priority!r} is not a Resource-Priority"
                    " value like esnet.1 (RFC 4412 namespace.priority)"
                )
            object.__setattr__(self, "resource_priority", ", ".join(values))
        if _DIGITS.fullmatch(self.emergency_number) is None:
            raise EmergencyProfileError(
                f"emergency_number {self.emergency_number!r} must be 1 to 15 digits"
            )
        if self.number_format not in NUMBER_FORMATS:
            raise EmergencyProfileError(
                f"number_format {self.number_format!r} is not one of"
                f" {', '.join(sorted(NUMBER_FORMATS))}"
            )
        if self.provider_info_url is not None:
            url = _strip_angles(self.provider_info_url)
            try:
                uri = parse_uri(url)
            except GrammarError as exc:
                raise EmergencyProfileError(
                    f"provider_info_url {self.provider_info_url!r}: {exc}"
                ) from None
            if uri.scheme not in ("https", "http", "cid"):
                raise EmergencyProfileError(
                    f"provider_info_url {self.provider_info_url!r} must be an https:, http:"
                    " or cid: URI (RFC 7852)"
                )
            object.__setattr__(self, "provider_info_url", url)

    @property
    def sends_location(self) -> bool:
        """Whether PIDF-LO goes by value to this trunk (the kind's default when unset)."""
        if self.send_location is not None:
            return self.send_location
        return self.kind in (ProfileKind.PIDF, ProfileKind.I3)

    @property
    def sends_resource_priority(self) -> bool:
        """Resource-Priority only towards a trusted emergency network (EM-29, RFC 7135)."""
        return self.trusted_esnet and self.resource_priority is not None


@dataclass(frozen=True)
class EmergencyInvite:
    """The profile-dependent parts of an emergency INVITE.

    ``headers`` are the extra headers in sending order (Route, P-Asserted-Identity,
    Priority, Resource-Priority, Geolocation, Geolocation-Routing, Call-Info, Accept);
    From (``from_uri``/``from_display``), To, Content-Type and the body are separate.
    ``geolocation_cids`` are the Content-IDs that ``Geolocation`` lists, in order, and
    ``location_documents`` the (content-id, PIDF bytes) pairs sent, in the same order, as
    the audit record keeps them (EM-70). ``sdp`` and ``other_parts`` are what the body was
    built from, kept for :func:`without_location`.
    """

    request_uri: str
    to: str
    from_uri: str
    from_display: str | None
    headers: list[tuple[str, str]]
    content_type: str | None
    body: bytes
    geolocation_cids: list[str]
    location_documents: tuple[tuple[str, bytes], ...] = ()
    sdp: bytes = b""
    other_parts: tuple[BodyPart, ...] = ()

    def header(self, name: str) -> str | None:
        """The first value of one of ``headers``, or None."""
        lower = canonical_name(name).lower()
        for hname, value in self.headers:
            if hname.lower() == lower:
                return value
        return None

    def from_header(self, tag: str | None = None) -> str:
        """The From header value, with the display name quoted and the tag when given."""
        head = f"{quote(self.from_display)} " if self.from_display else ""
        return f"{head}<{self.from_uri}>" + (f";tag={tag}" if tag else "")

    def to_request(
        self,
        *,
        call_id: str,
        from_tag: str,
        contact: str,
        cseq: int = 1,
        via: str | None = None,
        max_forwards: int = 70,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> SipRequest:
        """A complete INVITE in the §3.4.2 header order. ``extra_headers`` (e.g. copied
        from the device) are appended after the profile's headers, minus STRIP_HEADERS;
        Content-Length is written by serialisation."""
        headers: list[tuple[str, str]] = []
        if via is not None:
            headers.append(("Via", via))
        headers.append(("Max-Forwards", str(max_forwards)))
        headers.extend((n, v) for n, v in self.headers if n == "Route")
        headers.append(("From", self.from_header(from_tag)))
        headers.append(("To", self.to))
        headers.append(("Call-ID", call_id))
        headers.append(("CSeq", f"{cseq} INVITE"))
        headers.append(("Contact", contact if contact.startswith("<") else f"<{contact}>"))
        headers.extend((n, v) for n, v in self.headers if n != "Route")
        managed = {"via", "max-forwards", "from", "to", "call-id", "cseq", "contact",
                   "content-type", "content-length"}
        headers.extend(
            (n, v) for n, v in strip_device_headers(extra_headers) if n.lower() not in managed
        )
        if self.content_type is not None:
            headers.append(("Content-Type", self.content_type))
        return SipRequest("INVITE", self.request_uri, headers, self.body)


def strip_device_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The device's headers without those in STRIP_HEADERS (compact forms included)."""
    return [
        (canonical_name(name), value)
        for name, value in headers
        if canonical_name(name).lower() not in _STRIP_LOWER
    ]


def location_parts(
    content_type: str | None, body: bytes
) -> tuple[bytes, list[BodyPart], list[BodyPart]]:
    """Split a device's INVITE body into (SDP, location parts, other parts).

    A plain ``application/sdp`` body is the SDP; in a multipart body the first SDP part
    is the SDP (later SDP parts are dropped, so the trunk sees exactly one), every
    ``application/pidf+xml`` part is a location part and the rest (an eCall MSD, ...)
    are other parts, each kept as received. Raises EmergencyProfileError on a
    malformed Content-Type or multipart framing.
    """
    if not body:
        return b"", [], []
    if content_type is None:
        raise EmergencyProfileError("a body without a Content-Type")
    try:
        mtype, _ = parse_content_type(content_type)
    except GrammarError as exc:
        raise EmergencyProfileError(f"Content-Type {content_type!r}: {exc}") from None
    if mtype == SDP_TYPE:
        return body, [], []
    if mtype == PIDF_TYPE:
        return b"", [BodyPart([("Content-Type", content_type)], body)], []
    if mtype != "multipart/mixed":
        return b"", [], [BodyPart([("Content-Type", content_type)], body)]
    try:
        parts = parse_multipart(content_type, body)
    except GrammarError as exc:
        raise EmergencyProfileError(f"multipart body: {exc}") from None
    sdp: bytes | None = None
    locations: list[BodyPart] = []
    others: list[BodyPart] = []
    for part in parts:
        try:
            ptype = part.content_type
        except GrammarError as exc:
            raise EmergencyProfileError(f"body part Content-Type: {exc}") from None
        if ptype == SDP_TYPE:
            if sdp is None:
                sdp = part.body
        elif ptype == PIDF_TYPE:
            locations.append(part)
        else:
            others.append(part)
    return sdp or b"", locations, others


def _content_id(part: BodyPart) -> str | None:
    value = part.header("Content-ID")
    if value is None:
        return None
    cid = _strip_angles(value)
    return cid or None


def _is_sdp(part: BodyPart) -> bool:
    try:
        return part.content_type == SDP_TYPE
    except GrammarError:
        return False


def _clean_display_name(name: str | None) -> str | None:
    """A display name safe in a header; None for empty or anonymous-looking names (EM-14)."""
    if name is None:
        return None
    cleaned = " ".join(_CONTROL.sub(" ", name).split())
    if not cleaned or cleaned.lower() in _ANONYMOUS_NAMES:
        return None
    return cleaned


def _validate_domain(domain: str, what: str) -> str:
    try:
        uri = parse_uri(f"sip:{domain}")
    except GrammarError as exc:
        raise EmergencyProfileError(f"{what} {domain!r}: {exc}") from None
    if not isinstance(uri, SipUri) or uri.user is not None or uri.params or uri.headers:
        raise EmergencyProfileError(f"{what} {domain!r} must be a host[:port]")
    return domain


def _service_urn(text: str) -> tuple[str, bool]:
    """(lower-cased sos URN, whether it is a test.sos URN)."""
    urn = text.strip().lower()
    match = _SOS_URN.fullmatch(urn)
    if match is None:
        raise EmergencyProfileError(
            f"service URN {text!r} is not urn:service:sos[.x] or urn:service:test.sos[.x]"
        )
    return urn, match.group(1) is not None


def _digits_uri(digits: str, domain: str, profile: EmergencyProfile) -> str:
    suffix = ";user=phone" if profile.number_format == "user-phone" else ""
    return f"sip:{digits}@{domain}{suffix}"


def _request_uri(
    profile: EmergencyProfile,
    *,
    dialled: str | None,
    urn: str | None,
    test: bool,
    number_class: str,
    domain: str,
) -> str:
    if number_class == "helpline":
        if dialled is None:
            raise EmergencyProfileError("a helpline call needs the dialled number")
        return _digits_uri(dialled, domain, profile)
    kind = profile.kind
    if kind is ProfileKind.I3:
        if test:
            if urn is not None and urn.startswith("urn:service:test."):
                return urn
            if urn is not None:
                return "urn:service:test." + urn.removeprefix("urn:service:")
            return "urn:service:test.sos"
        return urn or "urn:service:sos"
    if kind is ProfileKind.NAT:
        if dialled is not None:
            return _digits_uri(dialled, domain, profile)
        if test:
            # Sending the real emergency number would place a real emergency call.
            raise EmergencyProfileError(
                "a P-NAT trunk has no test form for a test URN without a dialled test number"
            )
        return _digits_uri(profile.emergency_number, domain, profile)
    # DLR and PIDF: the US/CA digits.
    if test:
        digits = NANP_TEST_NUMBER
    elif dialled in NANP_EMERGENCY_FORMS:
        digits = dialled
    else:
        digits = profile.emergency_number
    return _digits_uri(digits, domain, profile)


def _location_objects(
    device_parts: Sequence[BodyPart],
    switch_pidf: tuple[str, bytes] | None,
    cid_domain: str,
) -> tuple[list[tuple[str, BodyPart]], list[tuple[str, BodyPart]]]:
    """(cid, part) for the device's location objects and for the switch's own."""
    device: list[tuple[str, BodyPart]] = []
    used: set[str] = set()
    for index, part in enumerate(device_parts):
        cid = _content_id(part)
        if cid is None or cid in used:
            # A location must be referenced to mean anything (RFC 6442 §4.1): give the part
            # a Content-ID of its own; its body stays byte for byte.
            cid = f"dev-loc-{index}-{secrets.token_hex(4)}@{cid_domain}"
            headers = [(n, v) for n, v in part.headers if n.lower() != "content-id"]
            part = BodyPart(headers + [("Content-ID", f"<{cid}>")], part.body)
        else:
            part = BodyPart(list(part.headers), part.body)
        used.add(cid)
        device.append((cid, part))
    own: list[tuple[str, BodyPart]] = []
    if switch_pidf is not None:
        cid = _strip_angles(switch_pidf[0])
        if not cid or any(c in cid for c in "<> \t\r\n,"):
            raise EmergencyProfileError(f"switch PIDF Content-ID {switch_pidf[0]!r} is not valid")
        if cid in used:
            raise EmergencyProfileError(
                f"switch PIDF Content-ID {cid!r} is also a Content-ID of the device's location"
            )
        headers = [("Content-Type", PIDF_TYPE), ("Content-ID", f"<{cid}>")]
        own.append((cid, BodyPart(headers, switch_pidf[1])))
    return device, own


def _multipart(parts: list[BodyPart], boundary: str | None) -> tuple[str, bytes]:
    if boundary is not None:
        try:
            return build_multipart(parts, "mixed", boundary)
        except ValueError as exc:
            raise EmergencyProfileError(f"boundary {boundary!r}: {exc}") from None
    for _ in range(8):
        try:
            return build_multipart(parts, "mixed", "em-" + secrets.token_hex(12))
        except ValueError:
            continue
    raise EmergencyProfileError("no multipart boundary found that is absent from the parts")


def _body(sdp: bytes, parts: list[BodyPart], boundary: str | None) -> tuple[str | None, bytes]:
    """The INVITE body: plain SDP when nothing else goes with it, else multipart/mixed with
    the SDP part first and ``parts`` after it, in order."""
    if not parts:
        return (SDP_TYPE, sdp) if sdp else (None, b"")
    head = [BodyPart([("Content-Type", SDP_TYPE)], sdp)] if sdp else []
    return _multipart(head + parts, boundary)


def _copies(parts: Iterable[BodyPart]) -> list[BodyPart]:
    return [BodyPart(list(p.headers), p.body) for p in parts]


def _geolocation_headers(
    locations: list[tuple[str, BodyPart]], routing: bool
) -> list[tuple[str, str]]:
    if not locations:
        return []
    return [
        ("Geolocation", ", ".join(f"<cid:{cid}>" for cid, _ in locations)),
        ("Geolocation-Routing", "yes" if routing else "no"),
    ]


def build_emergency_invite(
    profile: EmergencyProfile,
    *,
    dialled_number: str | None,
    service_urn: str | None,
    number_class: NumberClass,
    trunk_domain: str,
    callback_number: str,
    display_name: str | None,
    sdp: bytes,
    switch_pidf: tuple[str, bytes] | None,
    device_parts: Sequence[BodyPart],
    test_call: bool,
    other_parts: Sequence[BodyPart] = (),
    identity_domain: str | None = None,
    boundary: str | None = None,
    fallback_user: str | None = None,
) -> EmergencyInvite:
    """The emergency INVITE towards a trunk of ``profile``.

    ``dialled_number``: the digits dialled, outside-line prefix removed (None for a URN).
    ``service_urn``: the dialled ``urn:service:[test.]sos[.x]`` (any case), or None.
    ``number_class``: "emergency", "test" (933) or "helpline" (119, 988...).
    ``callback_number``: E.164 with "+", put in From and the single P-Asserted-Identity
    (host ``identity_domain``, default ``trunk_domain``). ``switch_pidf``: (Content-ID,
    PIDF-LO) of the switch's own location; ``device_parts``: the device's location parts,
    forwarded byte for byte; ``other_parts``: the device's other non-SDP parts (eCall
    MSD...), carried once. ``boundary`` fixes the multipart boundary (tests).
    ``fallback_user``: when there is no callback number at all (a misconfiguration the
    readiness check reports), the From user instead, with no P-Asserted-Identity: the
    call still goes out.
    Raises EmergencyProfileError on inconsistent input.
    """
    if not isinstance(profile, EmergencyProfile):
        raise EmergencyProfileError("profile must be an EmergencyProfile")
    if number_class not in NUMBER_CLASSES:
        raise EmergencyProfileError(
            f"number_class {number_class!r} is not one of {', '.join(sorted(NUMBER_CLASSES))}"
        )
    domain = _validate_domain(trunk_domain, "trunk_domain")
    id_domain = _validate_domain(identity_domain or trunk_domain, "identity_domain")
    no_callback = not callback_number and fallback_user is not None
    if no_callback:
        if _DIGITS.fullmatch(fallback_user or "") is None:
            raise EmergencyProfileError(f"fallback_user {fallback_user!r} must be digits")
    elif _E164.fullmatch(callback_number or "") is None:
        raise EmergencyProfileError(
            f"callback_number {callback_number!r} is not an E.164 number with '+'"
        )
    if not isinstance(sdp, bytes):
        raise EmergencyProfileError("sdp must be bytes")
    if switch_pidf is not None and not isinstance(switch_pidf[1], bytes):
        raise EmergencyProfileError("the switch PIDF document must be bytes")
    if dialled_number is not None and _DIGITS.fullmatch(dialled_number) is None:
        raise EmergencyProfileError(f"dialled_number {dialled_number!r} must be 1 to 15 digits")
    urn: str | None = None
    urn_is_test = False
    if service_urn is not None:
        urn, urn_is_test = _service_urn(service_urn)
    if dialled_number is None and urn is None:
        raise EmergencyProfileError("neither a dialled number nor a service URN")
    # The switch's SDP is the only one (EM-21: a duplicated SDP part confuses trunks).
    other_parts = [p for p in other_parts if not _is_sdp(p)]
    helpline = number_class == "helpline"
    test = not helpline and (test_call or number_class == "test" or urn_is_test)

    request_uri = _request_uri(
        profile, dialled=dialled_number, urn=urn, test=test, number_class=number_class,
        domain=domain,
    )
    headers: list[tuple[str, str]] = []
    if profile.kind is ProfileKind.I3 and profile.esrp_route is not None:
        headers.append(("Route", f"<{profile.esrp_route}>"))
    from_uri = f"sip:{fallback_user if no_callback else callback_number}@{id_domain}"
    if not no_callback:
        headers.append(("P-Asserted-Identity", f"<{from_uri};user=phone>"))
    if not helpline:
        if profile.priority:
            headers.append(("Priority", "emergency"))
        if profile.trusted_esnet and profile.resource_priority is not None:
            headers.append(("Resource-Priority", profile.resource_priority))

    send_location = profile.sends_location and not helpline
    device_locs, own_locs = (
        _location_objects(device_parts, switch_pidf, id_domain) if send_location else ([], [])
    )
    own_first = not profile.device_location_first
    locations = own_locs + device_locs if own_first else device_locs + own_locs
    headers.extend(_geolocation_headers(locations, profile.geolocation_routing))
    if profile.provider_info_url is not None and not helpline:
        headers.append(
            ("Call-Info", f"<{profile.provider_info_url}>;purpose=EmergencyCallData.ProviderInfo")
        )
    if locations:
        headers.append(("Accept", ACCEPT_WITH_LOCATION))
    # The device's parts keep their place ahead of the switch's location, which is
    # appended last (RFC 6442 §4) unless the profile puts the switch's first.
    device_body = [part for _, part in device_locs] + _copies(other_parts)
    own_body = [part for _, part in own_locs]
    ordered = own_body + device_body if own_first else device_body + own_body
    content_type, body = _body(sdp, ordered, boundary)
    return EmergencyInvite(
        request_uri=request_uri,
        to=f"<{request_uri}>",
        from_uri=from_uri,
        from_display=_clean_display_name(display_name),
        headers=headers,
        content_type=content_type,
        body=body,
        geolocation_cids=[cid for cid, _ in locations],
        location_documents=tuple((cid, part.body) for cid, part in locations),
        sdp=sdp,
        other_parts=tuple(_copies(other_parts)),
    )


def without_location(
    invite: EmergencyInvite,
    default_pidf: tuple[str, bytes] | None,
    *,
    boundary: str | None = None,
) -> EmergencyInvite:
    """The INVITE to retry after a 424 or another location error (EM-31): the same call
    with only the switch's validated default location, or no location body at all when
    ``default_pidf`` is None. An INVITE that carried no location gets none either."""
    routing_value = invite.header("Geolocation-Routing")
    locations: list[tuple[str, BodyPart]] = []
    if invite.geolocation_cids and default_pidf is not None:
        cid = _strip_angles(default_pidf[0])
        if not cid or any(c in cid for c in "<> \t\r\n,"):
            raise EmergencyProfileError(f"default PIDF Content-ID {default_pidf[0]!r} is not valid")
        part_headers = [("Content-Type", PIDF_TYPE), ("Content-ID", f"<{cid}>")]
        locations.append((cid, BodyPart(part_headers, default_pidf[1])))
    location_names = {"geolocation", "geolocation-routing", "accept"}
    headers: list[tuple[str, str]] = []
    placed = False
    for name, value in invite.headers:
        if name.lower() not in location_names:
            headers.append((name, value))
        elif not placed and locations:
            headers.extend(_geolocation_headers(locations, routing_value != "no"))
            placed = True
    if locations:
        headers.append(("Accept", ACCEPT_WITH_LOCATION))
    ordered = _copies(invite.other_parts) + [part for _, part in locations]
    content_type, body = _body(invite.sdp, ordered, boundary)
    return replace(
        invite,
        headers=headers,
        content_type=content_type,
        body=body,
        geolocation_cids=[cid for cid, _ in locations],
        location_documents=tuple((cid, part.body) for cid, part in locations),
    )


__all__ = [
    "ACCEPT_WITH_LOCATION",
    "NANP_EMERGENCY_FORMS",
    "NANP_TEST_NUMBER",
    "STRIP_HEADERS",
    "EmergencyInvite",
    "EmergencyProfile",
    "EmergencyProfileError",
    "NumberClass",
    "ProfileKind",
    "build_emergency_invite",
    "location_parts",
    "strip_device_headers",
    "without_location",
]

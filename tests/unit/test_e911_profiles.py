"""Per-trunk emergency profiles (EMERGENCY.md EM-20): the INVITE towards an emergency trunk
under P-DLR, P-PIDF, P-I3 and P-NAT; the multipart body with PIDF-LO by value (EM-21), the
device's location forwarded byte for byte and first (EM-23), the callback identity (EM-14,
EM-25), Priority/Resource-Priority (EM-29), helplines (EM-08), test calls (EM-07) and the
424 retry (EM-31)."""

from __future__ import annotations

import pytest

from e911.profiles import (
    STRIP_HEADERS,
    EmergencyInvite,
    EmergencyProfile,
    EmergencyProfileError,
    ProfileKind,
    build_emergency_invite,
    location_parts,
    strip_device_headers,
    without_location,
)
from sip.multipart import BodyPart, build_multipart, parse_multipart
from sip.parser import parse_message

SDP = (
    b"v=0\r\n"
    b"o=- 1 1 IN IP4 203.0.113.10\r\n"
    b"s=-\r\n"
    b"c=IN IP4 203.0.113.10\r\n"
    b"t=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
)
SWITCH_PIDF = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:+13125550101@pbx.example.com">'
    b"<ca:FLR>12</ca:FLR><ca:PC>60606</ca:PC><ca:ROOM>1204</ca:ROOM></presence>\n"
)
DEVICE_PIDF = (
    b'<?xml version="1.0"?>\r\n<presence xmlns="urn:ietf:params:xml:ns:pidf">'
    b"<ca:ROOM>Lab-3</ca:ROOM></presence>\r\n"
)
DEFAULT_PIDF = b"<presence><gp:method>Default</gp:method></presence>"
# An eCall MSD (RFC 8147): binary, with NUL, CR, LF and high bytes.
MSD = bytes([0x02, 0x29, 0x00, 0x0D, 0x0A, 0xFF, 0x81]) + b"\r\n--not-a-boundary\r\n" + b"\x00" * 40

SWITCH_CID = "loc-101@pbx.example.com"
DEVICE_CID = "dev-ab12@192.0.2.7"


def device_location() -> BodyPart:
    return BodyPart(
        [("Content-Type", "application/pidf+xml"), ("Content-ID", f"<{DEVICE_CID}>")],
        DEVICE_PIDF,
    )


def build(profile: EmergencyProfile, **overrides) -> EmergencyInvite:
    args: dict = dict(
        dialled_number="911",
        service_urn=None,
        number_class="emergency",
        trunk_domain="trunk.example.net",
        callback_number="+13125550101",
        display_name="Ext 101 Reception",
        sdp=SDP,
        switch_pidf=(SWITCH_CID, SWITCH_PIDF),
        device_parts=[],
        test_call=False,
        identity_domain="pbx.example.com",
        boundary="em-boundary",
    )
    args.update(overrides)
    return build_emergency_invite(profile, **args)


def part_summary(invite: EmergencyInvite) -> list[tuple[list[tuple[str, str]], bytes]]:
    assert invite.content_type is not None
    return [(p.headers, p.body) for p in parse_multipart(invite.content_type, invite.body)]


def geolocation_cids(invite: EmergencyInvite) -> list[str]:
    value = invite.header("Geolocation")
    assert value is not None
    out = []
    for item in value.split(","):
        item = item.strip()
        assert item.startswith("<cid:") and item.endswith(">"), item
        out.append(item[5:-1])
    return out


# -- golden INVITEs, one per profile ---------------------------------------------------------


def test_p_i3_golden_matches_reference_invite():
    """§3.4.2: the P-I3 INVITE, header for header and byte for byte."""
    profile = EmergencyProfile(
        ProfileKind.I3,
        esrp_route="sip:esrp.trunk.example.net;lr",
        provider_info_url="https://pbx.example.com/ecd/provinfo/1",
    )
    invite = build(profile)
    request = invite.to_request(
        via="SIP/2.0/TLS 203.0.113.10:5061;branch=z9hG4bK-em-1",
        call_id="em-20250115-140322-101@pbx.example.com",
        from_tag="a1",
        contact="sip:+13125550101@203.0.113.10:5061;transport=tls",
    )
    body = (
        b"--em-boundary\r\n"
        b"Content-Type: application/sdp\r\n\r\n" + SDP + b"\r\n"
        b"--em-boundary\r\n"
        b"Content-Type: application/pidf+xml\r\n"
        b"Content-ID: <loc-101@pbx.example.com>\r\n\r\n" + SWITCH_PIDF + b"\r\n"
        b"--em-boundary--\r\n"
    )
    head = (
        "INVITE urn:service:sos SIP/2.0\r\n"
        "Via: SIP/2.0/TLS 203.0.113.10:5061;branch=z9hG4bK-em-1\r\n"
        "Max-Forwards: 70\r\n"
        "Route: <sip:esrp.trunk.example.net;lr>\r\n"
        'From: "Ext 101 Reception" <sip:+13125550101@pbx.example.com>;tag=a1\r\n'
        "To: <urn:service:sos>\r\n"
        "Call-ID: em-20250115-140322-101@pbx.example.com\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:+13125550101@203.0.113.10:5061;transport=tls>\r\n"
        "P-Asserted-Identity: <sip:+13125550101@pbx.example.com;user=phone>\r\n"
        "Geolocation: <cid:loc-101@pbx.example.com>\r\n"
        "Geolocation-Routing: yes\r\n"
        "Call-Info: <https://pbx.example.com/ecd/provinfo/1>;purpose=EmergencyCallData.ProviderInfo\r\n"
        "Accept: application/sdp, application/pidf+xml\r\n"
        "Content-Type: multipart/mixed;boundary=em-boundary\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    assert request.to_bytes() == head.encode() + body
    assert invite.geolocation_cids == [SWITCH_CID]
    assert invite.location_documents == ((SWITCH_CID, SWITCH_PIDF),)


def test_p_pidf_golden_with_device_location_first():
    profile = EmergencyProfile(ProfileKind.PIDF)
    invite = build(profile, device_parts=[device_location()])
    assert invite.request_uri == "sip:911@trunk.example.net"
    assert invite.to == "<sip:911@trunk.example.net>"
    assert invite.from_uri == "sip:+13125550101@pbx.example.com"
    assert invite.from_display == "Ext 101 Reception"
    assert invite.headers == [
        ("P-Asserted-Identity", "<sip:+13125550101@pbx.example.com;user=phone>"),
        ("Geolocation", f"<cid:{DEVICE_CID}>, <cid:{SWITCH_CID}>"),
        ("Geolocation-Routing", "yes"),
        ("Accept", "application/sdp, application/pidf+xml"),
    ]
    assert invite.content_type == "multipart/mixed;boundary=em-boundary"
    assert part_summary(invite) == [
        ([("Content-Type", "application/sdp")], SDP),
        ([("Content-Type", "application/pidf+xml"), ("Content-ID", f"<{DEVICE_CID}>")],
         DEVICE_PIDF),
        ([("Content-Type", "application/pidf+xml"), ("Content-ID", f"<{SWITCH_CID}>")],
         SWITCH_PIDF),
    ]


def test_p_dlr_golden_identity_only_no_location():
    profile = EmergencyProfile(ProfileKind.DLR)
    invite = build(profile, device_parts=[device_location()])
    assert invite.request_uri == "sip:911@trunk.example.net"
    assert invite.to == "<sip:911@trunk.example.net>"
    assert invite.from_uri == "sip:+13125550101@pbx.example.com"
    assert invite.headers == [
        ("P-Asserted-Identity", "<sip:+13125550101@pbx.example.com;user=phone>"),
    ]
    assert invite.content_type == "application/sdp"
    assert invite.body == SDP
    assert invite.geolocation_cids == []
    assert invite.location_documents == ()


def test_p_nat_golden_dialled_short_number_and_site_did():
    """EM-26: a Lyon device dials 18; the operator gets 18 and the site's 04 number."""
    profile = EmergencyProfile(ProfileKind.NAT, priority=True)
    invite = build(
        profile,
        dialled_number="18",
        trunk_domain="sip.operateur.example.fr",
        identity_domain="sip.operateur.example.fr",
        callback_number="+33478000100",
        display_name="Accueil Lyon",
    )
    assert invite.request_uri == "sip:18@sip.operateur.example.fr"
    assert invite.to == "<sip:18@sip.operateur.example.fr>"
    assert invite.from_uri == "sip:+33478000100@sip.operateur.example.fr"
    assert invite.headers == [
        ("P-Asserted-Identity", "<sip:+33478000100@sip.operateur.example.fr;user=phone>"),
        ("Priority", "emergency"),
    ]
    assert invite.content_type == "application/sdp"
    assert invite.body == SDP


@pytest.mark.parametrize("number", ["112", "15", "17", "18", "119", "196", "116000"])
def test_p_nat_sends_each_dialled_number_as_is(number):
    number_class = "helpline" if number in ("119", "116000") else "emergency"
    invite = build(EmergencyProfile(ProfileKind.NAT), dialled_number=number,
                   number_class=number_class)
    assert invite.request_uri == f"sip:{number}@trunk.example.net"


# -- multipart body (EM-21, EM-23) ------------------------------------------------------------


def test_device_body_round_trip_keeps_one_sdp_device_part_first_and_msd_once():
    """A device INVITE body with SDP, its PIDF and an eCall MSD, split and rebuilt: one SDP,
    the device's PIDF byte-identical and first, the MSD once and untruncated."""
    msd_part = BodyPart(
        [("Content-Type", "application/emergencycalldata.ecall.msd"),
         ("Content-ID", "<msd1@192.0.2.7>")],
        MSD,
    )
    ctype, device_body = build_multipart(
        [BodyPart([("Content-Type", "application/sdp")], b"v=0\r\ndevice-sdp\r\n"),
         device_location(), msd_part],
        boundary="dev-bnd",
    )
    sdp, dev_parts, others = location_parts(ctype, device_body)
    assert sdp == b"v=0\r\ndevice-sdp\r\n"
    assert [p.body for p in dev_parts] == [DEVICE_PIDF]
    assert [p.body for p in others] == [MSD]

    invite = build(EmergencyProfile(ProfileKind.I3), sdp=SDP, device_parts=dev_parts,
                   other_parts=others, boundary=None)
    parts = parse_multipart(invite.content_type, invite.body)
    types = [p.content_type for p in parts]
    assert types.count("application/sdp") == 1
    assert parts[0].content_type == "application/sdp" and parts[0].body == SDP
    assert parts[1].body == DEVICE_PIDF
    assert parts[1].header("Content-ID") == f"<{DEVICE_CID}>"
    assert parts[-1].body == SWITCH_PIDF
    msds = [p for p in parts if p.content_type == "application/emergencycalldata.ecall.msd"]
    assert len(msds) == 1 and msds[0].body == MSD
    assert msds[0].header("Content-ID") == "<msd1@192.0.2.7>"


def test_geolocation_cids_resolve_to_content_ids_in_body_order():
    invite = build(EmergencyProfile(ProfileKind.I3), device_parts=[device_location()])
    parts = parse_multipart(invite.content_type, invite.body)
    body_cids = [p.header("Content-ID")[1:-1] for p in parts if p.header("Content-ID")]
    assert geolocation_cids(invite) == body_cids == invite.geolocation_cids
    assert invite.geolocation_cids == [DEVICE_CID, SWITCH_CID]
    assert [h for h, _ in invite.headers].count("Geolocation-Routing") == 1


def test_switch_location_first_when_configured():
    profile = EmergencyProfile(ProfileKind.PIDF, device_location_first=False)
    invite = build(profile, device_parts=[device_location()])
    assert invite.geolocation_cids == [SWITCH_CID, DEVICE_CID]
    assert geolocation_cids(invite) == [SWITCH_CID, DEVICE_CID]
    bodies = [b for _, b in part_summary(invite)]
    assert bodies == [SDP, SWITCH_PIDF, DEVICE_PIDF]


def test_switch_first_order_with_other_parts_and_no_second_sdp():
    msd = BodyPart([("Content-Type", "application/emergencycalldata.ecall.msd")], MSD)
    stray_sdp = BodyPart([("Content-Type", "application/sdp")], b"v=0\r\nstray\r\n")
    profile = EmergencyProfile(ProfileKind.I3, device_location_first=False)
    invite = build(profile, device_parts=[device_location()], other_parts=[msd, stray_sdp])
    assert [b for _, b in part_summary(invite)] == [SDP, SWITCH_PIDF, DEVICE_PIDF, MSD]
    assert invite.other_parts == (msd,)


def test_device_part_without_content_id_gets_one_and_keeps_its_bytes():
    bare = BodyPart([("Content-Type", "application/pidf+xml")], DEVICE_PIDF)
    invite = build(EmergencyProfile(ProfileKind.PIDF), device_parts=[bare])
    parts = parse_multipart(invite.content_type, invite.body)
    assert parts[1].body == DEVICE_PIDF
    cid = parts[1].header("Content-ID")
    assert cid is not None and cid[1:-1] == invite.geolocation_cids[0]
    assert bare.headers == [("Content-Type", "application/pidf+xml")]  # caller's part untouched


def test_switch_cid_equal_to_device_cid_is_refused():
    with pytest.raises(EmergencyProfileError, match="also a Content-ID"):
        build(EmergencyProfile(ProfileKind.PIDF), device_parts=[device_location()],
              switch_pidf=(DEVICE_CID, SWITCH_PIDF))


def test_geolocation_routing_no_when_disabled():
    invite = build(EmergencyProfile(ProfileKind.I3, geolocation_routing=False))
    assert invite.header("Geolocation-Routing") == "no"


def test_no_location_gives_plain_sdp_and_no_geolocation_headers():
    invite = build(EmergencyProfile(ProfileKind.PIDF), switch_pidf=None)
    assert invite.content_type == "application/sdp" and invite.body == SDP
    names = {h for h, _ in invite.headers}
    assert not names & {"Geolocation", "Geolocation-Routing", "Accept"}


def test_send_location_overrides_the_kind_default():
    nat = build(EmergencyProfile(ProfileKind.NAT, send_location=True), dialled_number="112")
    assert nat.geolocation_cids == [SWITCH_CID]
    pidf = build(EmergencyProfile(ProfileKind.PIDF, send_location=False))
    assert pidf.body == SDP and pidf.geolocation_cids == []


def test_non_location_parts_carried_even_without_location():
    msd = BodyPart([("Content-Type", "application/emergencycalldata.ecall.msd")], MSD)
    invite = build(EmergencyProfile(ProfileKind.NAT), dialled_number="112", other_parts=[msd])
    parts = parse_multipart(invite.content_type, invite.body)
    assert [p.body for p in parts] == [SDP, MSD]
    assert invite.header("Geolocation") is None


# -- identity (EM-14, EM-25) ------------------------------------------------------------------


def test_exactly_one_pai_with_the_from_number_and_no_privacy():
    invite = build(EmergencyProfile(ProfileKind.I3))
    request = invite.to_request(
        call_id="c1", from_tag="t1", contact="sip:pbx@203.0.113.10",
        extra_headers=[
            ("Privacy", "id"), ("P-Preferred-Identity", "<sip:anonymous@anonymous.invalid>"),
            ("P-Asserted-Identity", "<sip:+19995550000@evil.example>"),
            ("Resource-Priority", "esnet.0"), ("Priority", "emergency"),
            ("Geolocation", "<cid:forged@x>"), ("Route", "<sip:elsewhere.example;lr>"),
            ("User-Agent", "Phone/1.0"),
        ],
    )
    assert request.header_lines("P-Asserted-Identity") == [
        "<sip:+13125550101@pbx.example.com;user=phone>"
    ]
    assert request.from_.uri.user == "+13125550101"
    assert request.header("Privacy") is None
    assert request.header("Resource-Priority") is None and request.header("Priority") is None
    assert request.header_lines("Geolocation") == [f"<cid:{SWITCH_CID}>"]
    assert request.header_lines("Route") == []
    assert request.header("User-Agent") == "Phone/1.0"


def test_anonymous_display_name_is_not_sent():
    invite = build(EmergencyProfile(ProfileKind.DLR), display_name="Anonymous")
    assert invite.from_display is None
    assert invite.from_header("x") == "<sip:+13125550101@pbx.example.com>;tag=x"


def test_display_name_control_characters_cannot_inject_headers():
    invite = build(EmergencyProfile(ProfileKind.DLR), display_name='Bob\r\nPrivacy: id "x"')
    assert "\r" not in invite.from_header() and "\n" not in invite.from_header()
    assert invite.from_header() == '"Bob Privacy: id \\"x\\"" <sip:+13125550101@pbx.example.com>'


def test_strip_device_headers_covers_compact_and_case_variants():
    kept = strip_device_headers([("privacy", "id"), ("RESOURCE-PRIORITY", "esnet.1"),
                                 ("Subject", "help"), ("v", "SIP/2.0/UDP h")])
    assert kept == [("Subject", "help"), ("Via", "SIP/2.0/UDP h")]
    for name in ("Privacy", "P-Preferred-Identity", "P-Asserted-Identity", "Resource-Priority",
                 "Priority", "Geolocation", "Geolocation-Routing", "Route"):
        assert name in STRIP_HEADERS


# -- helplines, priority (EM-08, EM-29) -------------------------------------------------------


@pytest.mark.parametrize("kind", list(ProfileKind))
def test_helpline_never_sos_never_pidf_never_priority(kind):
    profile = EmergencyProfile(kind, priority=True, trusted_esnet=True,
                               resource_priority="esnet.1", send_location=True,
                               provider_info_url="https://pbx.example.com/pi")
    invite = build(profile, dialled_number="119", number_class="helpline",
                   device_parts=[device_location()])
    assert invite.request_uri == "sip:119@trunk.example.net"
    assert "sos" not in invite.request_uri and "sos" not in invite.to
    names = {h for h, _ in invite.headers}
    assert not names & {"Priority", "Resource-Priority", "Geolocation", "Geolocation-Routing",
                        "Call-Info"}
    assert invite.content_type == "application/sdp" and invite.body == SDP


def test_helpline_without_dialled_number_is_an_error():
    with pytest.raises(EmergencyProfileError, match="helpline"):
        build(EmergencyProfile(ProfileKind.NAT), dialled_number=None,
              service_urn="urn:service:sos", number_class="helpline")


@pytest.mark.parametrize(
    ("trusted", "value", "expected"),
    [(True, "esnet.1", "esnet.1"), (False, "esnet.1", None), (True, None, None),
     (True, "esnet.0, esnet.2", "esnet.0, esnet.2")],
)
def test_resource_priority_only_to_a_trusted_esnet(trusted, value, expected):
    profile = EmergencyProfile(ProfileKind.I3, trusted_esnet=trusted, resource_priority=value)
    assert build(profile).header("Resource-Priority") == expected


def test_priority_only_when_enabled():
    assert build(EmergencyProfile(ProfileKind.I3)).header("Priority") is None
    assert build(EmergencyProfile(ProfileKind.I3, priority=True)).header("Priority") == "emergency"


# -- Request-URI forms, test calls (EM-03, EM-07) ---------------------------------------------


def test_i3_lower_cases_the_sub_service():
    invite = build(EmergencyProfile(ProfileKind.I3), dialled_number=None,
                   service_urn="urn:service:SOS.Fire")
    assert invite.request_uri == "urn:service:sos.fire"
    assert invite.to == "<urn:service:sos.fire>"


def test_i3_dialled_digits_become_urn_service_sos():
    assert build(EmergencyProfile(ProfileKind.I3), dialled_number="112").request_uri == (
        "urn:service:sos"
    )


@pytest.mark.parametrize("kind", [ProfileKind.DLR, ProfileKind.PIDF])
@pytest.mark.parametrize(
    ("dialled", "urn", "expected"),
    [("911", None, "911"), ("112", None, "911"), (None, "urn:service:sos.police", "911"),
     ("933", None, "933")],
)
def test_dlr_and_pidf_send_the_us_digits(kind, dialled, urn, expected):
    number_class = "test" if dialled == "933" else "emergency"
    invite = build(EmergencyProfile(kind), dialled_number=dialled, service_urn=urn,
                   number_class=number_class)
    assert invite.request_uri == f"sip:{expected}@trunk.example.net"


def test_configured_emergency_number_replaces_a_non_us_form():
    profile = EmergencyProfile(ProfileKind.DLR, emergency_number="9911")
    assert build(profile, dialled_number="112").request_uri == "sip:9911@trunk.example.net"
    assert build(profile, dialled_number="911").request_uri == "sip:911@trunk.example.net"


def test_user_phone_number_format():
    profile = EmergencyProfile(ProfileKind.DLR, number_format="user-phone")
    assert build(profile).request_uri == "sip:911@trunk.example.net;user=phone"


@pytest.mark.parametrize("kind", [ProfileKind.DLR, ProfileKind.PIDF])
def test_test_call_is_933_with_same_identity_and_location(kind):
    real = build(EmergencyProfile(kind))
    test = build(EmergencyProfile(kind), dialled_number=None,
                 service_urn="urn:service:test.sos", test_call=True)
    assert test.request_uri == "sip:933@trunk.example.net"
    assert test.headers == real.headers and test.body == real.body


def test_i3_test_call_forms():
    profile = EmergencyProfile(ProfileKind.I3)
    assert build(profile, dialled_number="933", number_class="test").request_uri == (
        "urn:service:test.sos"
    )
    assert build(profile, test_call=True).request_uri == "urn:service:test.sos"
    fire = build(profile, dialled_number=None, service_urn="urn:service:sos.fire",
                 test_call=True)
    assert fire.request_uri == "urn:service:test.sos.fire"
    urn = build(profile, dialled_number=None, service_urn="urn:service:TEST.sos")
    assert urn.request_uri == "urn:service:test.sos"


def test_nat_test_urn_without_a_test_number_is_refused_not_sent_as_112():
    with pytest.raises(EmergencyProfileError, match="test"):
        build(EmergencyProfile(ProfileKind.NAT), dialled_number=None,
              service_urn="urn:service:test.sos", test_call=True)


def test_i3_route_only_when_set():
    assert build(EmergencyProfile(ProfileKind.I3)).header("Route") is None
    profile = EmergencyProfile(ProfileKind.I3, esrp_route="<sip:esrp.example.net;lr>")
    assert build(profile).header("Route") == "<sip:esrp.example.net;lr>"


# -- 424 retry (EM-31) ------------------------------------------------------------------------


def test_424_retry_with_only_the_switch_default_location():
    original = build(EmergencyProfile(ProfileKind.I3, esrp_route="sip:esrp.example.net;lr",
                                      provider_info_url="https://pbx.example.com/pi"),
                     device_parts=[device_location()])
    retry = without_location(original, ("default-s1@pbx.example.com", DEFAULT_PIDF),
                             boundary="em-boundary")
    assert retry.request_uri == original.request_uri and retry.to == original.to
    assert retry.headers == [
        ("Route", "<sip:esrp.example.net;lr>"),
        ("P-Asserted-Identity", "<sip:+13125550101@pbx.example.com;user=phone>"),
        ("Geolocation", "<cid:default-s1@pbx.example.com>"),
        ("Geolocation-Routing", "yes"),
        ("Call-Info", "<https://pbx.example.com/pi>;purpose=EmergencyCallData.ProviderInfo"),
        ("Accept", "application/sdp, application/pidf+xml"),
    ]
    assert part_summary(retry) == [
        ([("Content-Type", "application/sdp")], SDP),
        ([("Content-Type", "application/pidf+xml"),
          ("Content-ID", "<default-s1@pbx.example.com>")], DEFAULT_PIDF),
    ]
    assert retry.geolocation_cids == ["default-s1@pbx.example.com"]
    assert retry.location_documents == (("default-s1@pbx.example.com", DEFAULT_PIDF),)


def test_424_retry_without_any_location_keeps_other_parts():
    msd = BodyPart([("Content-Type", "application/emergencycalldata.ecall.msd")], MSD)
    original = build(EmergencyProfile(ProfileKind.PIDF, priority=True), other_parts=[msd])
    retry = without_location(original, None)
    assert retry.headers == [
        ("P-Asserted-Identity", "<sip:+13125550101@pbx.example.com;user=phone>"),
        ("Priority", "emergency"),
    ]
    assert [p.body for p in parse_multipart(retry.content_type, retry.body)] == [SDP, MSD]
    assert retry.geolocation_cids == []
    plain = without_location(build(EmergencyProfile(ProfileKind.PIDF)), None)
    assert plain.content_type == "application/sdp" and plain.body == SDP


def test_424_retry_of_an_invite_without_location_adds_none():
    original = build(EmergencyProfile(ProfileKind.DLR))
    retry = without_location(original, ("d@pbx.example.com", DEFAULT_PIDF))
    assert retry.headers == original.headers and retry.body == SDP


# -- serialisation (Content-Length), device bodies --------------------------------------------


def test_serialised_request_content_length_matches_and_parses_back():
    invite = build(EmergencyProfile(ProfileKind.I3), device_parts=[device_location()],
                   other_parts=[BodyPart([("Content-Type", "application/octet-stream")], MSD)],
                   boundary=None)
    wire = invite.to_request(call_id="c@h", from_tag="f", contact="sip:pbx@192.0.2.1",
                             via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1").to_bytes()
    parsed = parse_message(wire, datagram=False)
    assert int(parsed.header("Content-Length")) == len(invite.body)
    assert parsed.body == invite.body
    parts = parse_multipart(parsed.header("Content-Type"), parsed.body)
    assert [p.content_type for p in parts].count("application/sdp") == 1
    assert parts[-1].body == SWITCH_PIDF and MSD in [p.body for p in parts]


def test_location_parts_plain_sdp_and_empty_body():
    assert location_parts("application/sdp", SDP) == (SDP, [], [])
    assert location_parts(None, b"") == (b"", [], [])


def test_location_parts_drops_a_duplicated_sdp():
    ctype, body = build_multipart(
        [BodyPart([("Content-Type", "application/sdp")], b"first"),
         BodyPart([("Content-Type", "application/sdp")], b"second"), device_location()],
        boundary="b1",
    )
    sdp, locs, others = location_parts(ctype, body)
    assert sdp == b"first" and len(locs) == 1 and others == []


@pytest.mark.parametrize(
    ("ctype", "body"),
    [("multipart/mixed", b"--x\r\n\r\nabc"), ("multipart/mixed;boundary=x", b"no framing"),
     ("not a type", b"v=0"), (None, b"v=0")],
)
def test_location_parts_rejects_malformed_bodies_clearly(ctype, body):
    with pytest.raises(EmergencyProfileError):
        location_parts(ctype, body)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "e911"}, "kind"), ({"kind": "i3", "resource_priority": "esnet"}, "esnet"),
     ({"kind": "i3", "esrp_route": "https://esrp.example"}, "sip"),
     ({"kind": "dlr", "emergency_number": "9-1-1"}, "digits"),
     ({"kind": "dlr", "number_format": "e164"}, "number_format"),
     ({"kind": "i3", "provider_info_url": "mailto:a@b"}, "https")],
)
def test_bad_profiles_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(EmergencyProfileError, match=message):
        EmergencyProfile(**kwargs)


def test_profile_kind_accepts_its_string_value():
    assert EmergencyProfile("i3").kind is ProfileKind.I3
    assert EmergencyProfile("i3").sends_location and not EmergencyProfile("nat").sends_location


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"callback_number": "13125550101"}, "E.164"),
     ({"number_class": "premium"}, "number_class"),
     ({"dialled_number": "9#11"}, "digits"),
     ({"dialled_number": None, "service_urn": "urn:service:counseling"}, "urn:service:sos"),
     ({"dialled_number": None}, "neither"),
     ({"trunk_domain": "bad domain"}, "trunk_domain"),
     ({"switch_pidf": ("a b", SWITCH_PIDF)}, "Content-ID")],
)
def test_bad_build_input_is_refused_with_a_reason(overrides, message):
    with pytest.raises(EmergencyProfileError, match=message):
        build(EmergencyProfile(ProfileKind.PIDF), **overrides)

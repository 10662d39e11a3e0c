"""SDP parse, serialize and relay rewrite (media/sdp.py)."""

from __future__ import annotations

import pytest

from media.backend import SdpError
from media.sdp import (
    Connection,
    RelayStreamPorts,
    parse_sdp,
    rewrite_for_relay,
)


def sdp(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


AUDIO_WITH_DTMF = sdp(
    "v=0",
    "o=alice 2890844526 2890844526 IN IP4 192.168.1.20",
    "s=-",
    "c=IN IP4 192.168.1.20",
    "t=0 0",
    "a=x-vendor-thing:keep me",
    "m=audio 49170 RTP/AVP 0 8 101",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:101 telephone-event/8000",
    "a=fmtp:101 0-16",
    "a=ptime:20",
    "a=sendrecv",
)

T38 = sdp(
    "v=0",
    "o=fax 1 2 IN IP4 10.0.0.9",
    "s=fax",
    "c=IN IP4 10.0.0.9",
    "t=0 0",
    "m=image 40000 udptl t38",
    "a=T38FaxVersion:0",
    "a=T38MaxBitRate:14400",
    "a=T38FaxRateManagement:transferredTCF",
    "a=T38FaxMaxDatagram:316",
    "a=T38FaxUdpEC:t38UDPRedundancy",
)

SRTP = sdp(
    "v=0",
    "o=- 77 1 IN IP4 10.1.1.1",
    "s=-",
    "t=0 0",
    "m=audio 5004 RTP/SAVP 0",
    "c=IN IP4 10.1.1.1",
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
    "a=rtcp-mux",
)

IPV6 = sdp(
    "v=0",
    "o=bob 5 5 IN IP6 2001:db8::5",
    "s=-",
    "c=IN IP6 2001:db8::5",
    "t=0 0",
    "m=audio 6000 RTP/AVP 8",
    "a=rtcp:6001 IN IP6 2001:db8::5",
)

RELAY_V4 = "203.0.113.7"


def test_round_trip_keeps_every_line_and_order() -> None:
    for body in (AUDIO_WITH_DTMF, T38, SRTP, IPV6):
        assert parse_sdp(body).serialize() == body


def test_parse_reads_media_connection_and_telephone_event() -> None:
    parsed = parse_sdp(AUDIO_WITH_DTMF)
    (audio,) = parsed.media
    assert (audio.media, audio.port, audio.proto, audio.formats) == (
        "audio",
        49170,
        "RTP/AVP",
        ["0", "8", "101"],
    )
    assert parsed.stream_connection(0) == Connection("IN", "IP4", "192.168.1.20")
    assert audio.attributes("rtpmap")[2] == "101 telephone-event/8000"
    assert audio.clock_rate() == 8000
    assert parsed.origin.session_version == 2890844526
    assert parsed.session_attribute("x-vendor-thing") == "keep me"


def test_rewrite_replaces_address_and_port_and_keeps_payloads() -> None:
    parsed = parse_sdp(AUDIO_WITH_DTMF)
    out = rewrite_for_relay(parsed, RELAY_V4, [RelayStreamPorts(30000, 30001)])
    text = out.serialize().decode()
    assert "c=IN IP4 203.0.113.7\r\n" in text
    assert "m=audio 30000 RTP/AVP 0 8 101\r\n" in text
    assert "192.168.1.20\r\n" not in text.split("o=")[1].split("\r\n", 1)[1]
    for kept in (
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=x-vendor-thing:keep me",
        "a=sendrecv",
    ):
        assert kept + "\r\n" in text
    # the original is untouched: rewriting returns a copy
    assert parsed.media[0].port == 49170


def test_t38_image_stream_is_rewritten_like_audio() -> None:
    out = rewrite_for_relay(parse_sdp(T38), RELAY_V4, [RelayStreamPorts(31000, 31001)])
    reparsed = parse_sdp(out.serialize())
    (image,) = reparsed.media
    assert (image.media, image.port, image.proto, image.formats) == (
        "image",
        31000,
        "udptl",
        ["t38"],
    )
    assert image.is_udp and not image.is_rtp
    assert image.attributes("T38FaxUdpEC") == ["t38UDPRedundancy"]
    assert reparsed.connection == Connection("IN", "IP4", RELAY_V4)


def test_srtp_crypto_untouched_and_rtcp_mux_kept_when_negotiated() -> None:
    original = parse_sdp(SRTP)
    crypto = original.media[0].attributes("crypto")
    out = rewrite_for_relay(original, RELAY_V4, [RelayStreamPorts(32000, 32001, rtcp_mux=True)])
    media = parse_sdp(out.serialize()).media[0]
    assert media.attributes("crypto") == crypto
    assert media.rtcp_mux
    assert media.is_srtp
    assert media.connection == Connection("IN", "IP4", RELAY_V4)


def test_rtcp_mux_dropped_when_not_negotiated() -> None:
    out = rewrite_for_relay(parse_sdp(SRTP), RELAY_V4, [RelayStreamPorts(32000, 32001, False)])
    assert b"a=rtcp-mux" not in out.serialize()


def test_ipv6_and_rtcp_attribute_rewritten_to_relay() -> None:
    parsed = parse_sdp(IPV6)
    rtcp = parsed.media[0].rtcp
    assert rtcp is not None and rtcp.port == 6001
    assert rtcp.connection == Connection("IN", "IP6", "2001:db8::5")
    out = parse_sdp(
        rewrite_for_relay(parsed, "2001:db8::100", [RelayStreamPorts(33000, 33001)]).serialize()
    )
    assert out.connection == Connection("IN", "IP6", "2001:db8::100")
    new_rtcp = out.media[0].rtcp
    assert new_rtcp is not None and new_rtcp.port == 33001
    assert new_rtcp.connection == Connection("IN", "IP6", "2001:db8::100")


def test_rtcp_attribute_points_at_rtp_port_when_muxed() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "a=rtcp:4001",
        "a=rtcp-mux",
    )
    out = parse_sdp(
        rewrite_for_relay(
            parse_sdp(body), RELAY_V4, [RelayStreamPorts(34000, 34001, True)]
        ).serialize()
    )
    rtcp = out.media[0].rtcp
    assert rtcp is not None and rtcp.port == 34000 and rtcp.connection is None


def test_disabled_stream_stays_at_port_zero() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "m=audio 4000 RTP/AVP 0",
        "m=video 0 RTP/AVP 31",
    )
    out = rewrite_for_relay(parse_sdp(body), RELAY_V4, [RelayStreamPorts(35000, 35001), None])
    text = out.serialize().decode()
    assert "m=audio 35000 RTP/AVP 0\r\n" in text
    assert "m=video 0 RTP/AVP 31\r\n" in text


def test_media_level_connection_only() -> None:
    parsed = parse_sdp(SRTP)
    assert parsed.connection is None
    assert parsed.stream_connection(0) == Connection("IN", "IP4", "10.1.1.1")


def test_ice_attributes_stripped_by_rewrite() -> None:
    body = sdp(
        "v=0",
        "o=- 1 1 IN IP4 10.0.0.1",
        "s=-",
        "c=IN IP4 10.0.0.1",
        "t=0 0",
        "a=ice-lite",
        "m=audio 4000 RTP/AVP 0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:x" * 1,
        "a=candidate:1 1 UDP 2130706431 10.0.0.1 4000 typ host",
        "a=ptime:20",
    )
    out = rewrite_for_relay(parse_sdp(body), RELAY_V4, [RelayStreamPorts(36000, 36001)])
    text = out.serialize().decode()
    assert "ice" not in text and "candidate" not in text
    assert "a=ptime:20" in text


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"hello world\r\n",
        sdp("o=- 1 1 IN IP4 10.0.0.1", "v=0"),  # v= is not first
        sdp("v=0", "s=-", "t=0 0"),  # no o=
        sdp("v=0", "o=- 1 x IN IP4 10.0.0.1", "s=-"),  # version not a number
        sdp(
            "v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "c=IN IP4 10.0.0.1", "m=audio 70000 RTP/AVP 0"
        ),
        sdp("v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "c=IN IP4 10.0.0.1", "m=audio 4000"),
        sdp("v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "m=audio 4000 RTP/AVP 0"),  # no c=
        sdp("v=0", "o=- 1 1 IN IP4 10.0.0.1", "s=-", "c=IN IPX 10.0.0.1", "m=audio 4 RTP/AVP 0"),
        sdp(
            "v=0",
            "o=- 1 1 IN IP4 10.0.0.1",
            "s=-",
            "c=IN IP4 10.0.0.1",
            "m=audio 4000 RTP/AVP 0",
            "a=rtcp:abc",
        ),
    ],
)
def test_bad_sdp_is_sdp_error_488(body: bytes) -> None:
    with pytest.raises(SdpError) as caught:
        parse_sdp(body)
    assert caught.value.status == 488


def test_lf_only_input_parses_and_serializes_with_crlf() -> None:
    body = AUDIO_WITH_DTMF.replace(b"\r\n", b"\n")
    assert parse_sdp(body).serialize() == AUDIO_WITH_DTMF


def test_body_without_origin_ignores_version_only() -> None:
    first = parse_sdp(AUDIO_WITH_DTMF)
    bumped = parse_sdp(AUDIO_WITH_DTMF.replace(b"2890844526 IN", b"2890844527 IN"))
    assert first.body_without_origin() == bumped.body_without_origin()
    changed = parse_sdp(AUDIO_WITH_DTMF.replace(b"a=ptime:20", b"a=ptime:30"))
    assert first.body_without_origin() != changed.body_without_origin()

"""RTCP SR/RR parsing (media/rtcp.py) on packets built here byte by byte."""

from __future__ import annotations

import struct

from media.rtcp import RTCP_RR, RTCP_SR, is_rtcp, parse_rtcp


def report_block(ssrc: int, fraction: int, cumulative: int, highest: int, jitter: int) -> bytes:
    lost24 = (cumulative & 0xFFFFFF).to_bytes(3, "big")
    return (
        struct.pack("!IB", ssrc, fraction)
        + lost24
        + struct.pack("!IIII", highest, jitter, 0x11223344, 65536)
    )


def header(packet_type: int, count: int, body_len: int) -> bytes:
    return struct.pack("!BBH", 0x80 | count, packet_type, (4 + body_len) // 4 - 1)


def receiver_report(ssrc: int, blocks: list[bytes]) -> bytes:
    body = struct.pack("!I", ssrc) + b"".join(blocks)
    return header(RTCP_RR, len(blocks), len(body)) + body


def sender_report(
    ssrc: int, ntp: int, rtp_ts: int, packets: int, octets: int, blocks: list[bytes]
) -> bytes:
    body = struct.pack("!IQIII", ssrc, ntp, rtp_ts, packets, octets) + b"".join(blocks)
    return header(RTCP_SR, len(blocks), len(body)) + body


def sdes_cname(ssrc: int, cname: bytes) -> bytes:
    chunk = struct.pack("!I", ssrc) + bytes([1, len(cname)]) + cname + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)
    return header(202, 1, len(chunk)) + chunk


def test_receiver_report_block_fields() -> None:
    packet = receiver_report(0xAABBCCDD, [report_block(0x01020304, 64, 12, 70000, 160)])
    result = parse_rtcp(packet)
    assert result.ok, result.error
    (report,) = result.reports
    assert report.packet_type == RTCP_RR and report.ssrc == 0xAABBCCDD
    assert report.sender_info is None
    (block,) = report.blocks
    assert block.ssrc == 0x01020304
    assert block.fraction_lost == 0.25
    assert block.cumulative_lost == 12
    assert block.highest_sequence == 70000
    assert block.jitter == 160
    assert block.jitter_ms(8000) == 20.0
    assert block.delay_since_last_sr == 65536


def test_compound_sender_report_with_sdes() -> None:
    packet = sender_report(
        7,
        ntp=0x0102030405060708,
        rtp_ts=1600,
        packets=50,
        octets=8600,
        blocks=[report_block(9, 0, 0, 10, 8), report_block(10, 255, 3, 20, 16)],
    ) + sdes_cname(7, b"alice@example")
    result = parse_rtcp(packet)
    assert result.ok, result.error
    (report,) = result.reports  # the SDES is skipped
    assert report.packet_type == RTCP_SR
    assert report.sender_info is not None
    assert report.sender_info.ntp_timestamp == 0x0102030405060708
    assert (report.sender_info.packet_count, report.sender_info.octet_count) == (50, 8600)
    assert [b.ssrc for b in report.blocks] == [9, 10]
    assert report.blocks[1].fraction_lost == 255 / 256


def test_negative_cumulative_loss_from_duplicates() -> None:
    result = parse_rtcp(receiver_report(1, [report_block(2, 0, -5, 1, 0)]))
    assert result.reports[0].blocks[0].cumulative_lost == -5


def test_malformed_rtcp_is_an_error_value_not_an_exception() -> None:
    good = receiver_report(1, [report_block(2, 0, 0, 1, 0)])
    assert parse_rtcp(b"").error is not None
    assert parse_rtcp(b"\x00\x00\x00\x00").error is not None  # version 0
    truncated = parse_rtcp(good[:-4])
    assert truncated.error is not None and truncated.reports == []
    # a count that claims more blocks than the length holds
    lying = bytearray(good)
    lying[0] = 0x80 | 3
    assert parse_rtcp(bytes(lying)).error is not None
    trailing = parse_rtcp(good + b"\x01\x02")
    assert trailing.error is not None and len(trailing.reports) == 1


def test_is_rtcp_distinguishes_muxed_rtcp_from_rtp() -> None:
    rtp = bytes([0x80, 0]) + struct.pack("!HII", 1, 160, 99) + b"\xff" * 160
    assert not is_rtcp(rtp)
    assert is_rtcp(receiver_report(1, []))

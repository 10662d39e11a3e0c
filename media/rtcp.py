"""RTCP (RFC 3550 §6.4) sender and receiver reports: just enough to read loss and jitter.

:func:`parse_rtcp` walks a compound RTCP packet and returns the SR and RR reports it
holds; other packet types (SDES, BYE, APP, feedback) are skipped. Malformed input never
raises: the result carries the reports read so far and an ``error`` string.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RTCP_SR = 200
RTCP_RR = 201

_HEADER = struct.Struct("!BBH")
_SSRC = struct.Struct("!I")
_SENDER_INFO = struct.Struct("!QIII")
_REPORT_BLOCK = struct.Struct("!IB3sIIII")


@dataclass(slots=True)
class ReportBlock:
    """One reception report: how the reporter receives source ``ssrc``."""

    ssrc: int
    fraction_lost: float  # 0.0 - 1.0 since the previous report
    cumulative_lost: int  # signed 24-bit: may be negative with duplicates
    highest_sequence: int  # extended highest sequence number received
    jitter: int  # interarrival jitter, RTP timestamp units
    last_sr: int
    delay_since_last_sr: int  # units of 1/65536 s

    def jitter_ms(self, clock_rate: int) -> float:
        return self.jitter * 1000.0 / clock_rate if clock_rate > 0 else 0.0


@dataclass(slots=True)
class SenderInfo:
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int


@dataclass(slots=True)
class RtcpReport:
    """An SR (``packet_type`` 200, with ``sender_info``) or an RR (201)."""

    packet_type: int
    ssrc: int
    sender_info: SenderInfo | None
    blocks: list[ReportBlock] = field(default_factory=list)


@dataclass(slots=True)
class RtcpParse:
    reports: list[RtcpReport]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def is_rtcp(data: bytes) -> bool:
    """True when a packet on a muxed RTP port is RTCP (RFC 5761 §4: PT byte 192-223)."""
    return len(data) >= 8 and (data[0] & 0xC0) == 0x80 and 192 <= data[1] <= 223


def parse_rtcp(data: bytes) -> RtcpParse:
    reports: list[RtcpReport] = []
    offset = 0
    total = len(data)
    if total < 4:
        return RtcpParse(reports, "RTCP packet shorter than its header")
    while offset + 4 <= total:
        first, packet_type, length_words = _HEADER.unpack_from(data, offset)
        if first >> 6 != 2:
            return RtcpParse(reports, f"RTCP version {first >> 6} at offset {offset}")
        size = (length_words + 1) * 4
        if offset + size > total:
            return RtcpParse(reports, f"RTCP length {size} overruns the datagram at {offset}")
        count = first & 0x1F
        if packet_type in (RTCP_SR, RTCP_RR):
            fixed = 8 + (_SENDER_INFO.size if packet_type == RTCP_SR else 0)
            if size < fixed + count * _REPORT_BLOCK.size:
                return RtcpParse(reports, f"RTCP {packet_type} too short for {count} blocks")
            (ssrc,) = _SSRC.unpack_from(data, offset + 4)
            sender: SenderInfo | None = None
            if packet_type == RTCP_SR:
                sender = SenderInfo(*_SENDER_INFO.unpack_from(data, offset + 8))
            report = RtcpReport(packet_type, ssrc, sender)
            position = offset + fixed
            for _ in range(count):
                source, fraction, lost_raw, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(
                    data, position
                )
                lost = int.from_bytes(lost_raw, "big")
                if lost & 0x800000:
                    lost -= 0x1000000
                report.blocks.append(
                    ReportBlock(source, fraction / 256.0, lost, highest, jitter, lsr, dlsr)
                )
                position += _REPORT_BLOCK.size
            reports.append(report)
        offset += size
    if offset != total:
        return RtcpParse(reports, f"{total - offset} trailing bytes after RTCP packets")
    return RtcpParse(reports)

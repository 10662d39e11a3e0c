"""The RTP relay (media/relay.py) on loopback with UDP "phones" made of asyncio sockets."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import AsyncIterator

import pytest

from media.backend import PortsExhausted, SdpError
from media.relay import RtpRelay
from media.sdp import parse_sdp

HOST = "127.0.0.1"
WAIT_S = 3.0


class Phone(asyncio.DatagramProtocol):
    """A UDP socket that records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        self.arrived.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))

    async def wait_for(self, count: int, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(self.received)} datagrams, wanted {count}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass


async def open_phone(sockets: list[asyncio.DatagramTransport]) -> Phone:
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=(HOST, 0))
    sockets.append(transport)
    return phone


async def open_phones(sockets: list[asyncio.DatagramTransport], count: int) -> list[Phone]:
    return [await open_phone(sockets) for _ in range(count)]


def rtp(seq: int, payload: bytes = b"\xd5" * 160, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, ssrc) + payload


def receiver_report(jitter: int, cumulative_lost: int, fraction: int = 0) -> bytes:
    block = struct.pack("!IB", 0x1234, fraction) + cumulative_lost.to_bytes(3, "big")
    block += struct.pack("!IIII", 100, jitter, 0, 0)
    body = struct.pack("!I", 0x9999) + block
    return struct.pack("!BBH", 0x81, 201, len(body) // 4) + body


def phone_sdp(port: int, *extra: str, version: int = 1, rtcp_port: int | None = None) -> bytes:
    lines = [
        "v=0",
        f"o=phone 1000 {version} IN IP4 {HOST}",
        "s=-",
        f"c=IN IP4 {HOST}",
        "t=0 0",
        f"m=audio {port} RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
    ]
    if rtcp_port is not None:
        lines.append(f"a=rtcp:{rtcp_port}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n").encode()


def relay_port_in(body: bytes, index: int = 0) -> int:
    return parse_sdp(body).media[index].port


def port_window(pairs: int) -> tuple[int, int]:
    low = random.randrange(42000, 60000, 2)
    return low, low + 2 * pairs - 1


@pytest.fixture
async def sockets() -> AsyncIterator[list[asyncio.DatagramTransport]]:
    opened: list[asyncio.DatagramTransport] = []
    yield opened
    for transport in opened:
        transport.close()


@pytest.fixture
async def relay() -> AsyncIterator[RtpRelay]:
    backend = RtpRelay(bind_host=HOST, port_range=port_window(64), media_timeout=30.0)
    yield backend
    await backend.close()


async def setup_call(
    relay: RtpRelay,
    a: Phone,
    b: Phone,
    offer_extra: tuple[str, ...] = (),
    answer_extra: tuple[str, ...] = (),
    a_sdp_port: int | None = None,
) -> tuple[int, int, bytes, bytes]:
    """Offer from A, answer from B. Returns (relay port facing A, facing B, SDPs out)."""
    to_b = await relay.offer("call-1", "tag-a", phone_sdp(a_sdp_port or a.port, *offer_extra))
    to_a = await relay.answer("call-1", "tag-a", "tag-b", phone_sdp(b.port, *answer_extra))
    return relay_port_in(to_a), relay_port_in(to_b), to_a, to_b


async def test_rtp_flows_both_ways_and_is_counted(relay: RtpRelay, sockets: list) -> None:
    a, b = await open_phone(sockets), await open_phone(sockets)
    facing_a, facing_b, to_a, to_b = await setup_call(relay, a, b)
    assert facing_a != facing_b
    assert parse_sdp(to_b).connection is not None
    for seq in range(20):
        a.send(rtp(seq), facing_a)
    await b.wait_for(20)
    for seq in range(15):
        b.send(rtp(seq, b"\x55" * 80, ssrc=7), facing_b)
    await a.wait_for(15)
    # symmetric RTP: each phone hears the relay from the port written in its SDP
    assert {addr[1] for _, addr in b.received} == {facing_b}
    assert {addr[1] for _, addr in a.received} == {facing_a}
    assert [data for data, _ in b.received] == [rtp(seq) for seq in range(20)]
    stats = await relay.query("call-1")
    assert stats is not None
    assert (stats.a_to_b.packets, stats.a_to_b.bytes) == (20, 20 * 172)
    assert (stats.b_to_a.packets, stats.b_to_a.bytes) == (15, 15 * 92)
    assert stats.a_to_b.lost == 0 and stats.b_to_a.lost == 0
    assert stats.a_to_b.last_packet_at is not None


async def test_sequence_gaps_count_as_loss(relay: RtpRelay, sockets: list) -> None:
    a, b = await open_phone(sockets), await open_phone(sockets)
    facing_a, _, _, _ = await setup_call(relay, a, b)
    sent = [0, 1, 2, 5, 6, 10]  # 3, 4, 7, 8, 9 missing before the relay
    for seq in sent:
        a.send(rtp(seq), facing_a)
    await b.wait_for(len(sent))
    stats = await relay.query("call-1")
    assert stats is not None and stats.a_to_b.lost == 5


async def test_latching_learns_the_real_source(relay: RtpRelay, sockets: list) -> None:
    """A NATed phone: its SDP names one port, its packets come from another."""
    a_real, a_advertised, b = await open_phones(sockets, 3)
    facing_a, facing_b, _, _ = await setup_call(relay, a_real, b, a_sdp_port=a_advertised.port)
    a_real.send(rtp(0), facing_a)  # first packet: the relay latches on its source
    await b.wait_for(1)
    for seq in range(5):
        b.send(rtp(seq, ssrc=9), facing_b)
    await a_real.wait_for(5)
    assert a_advertised.received == []


async def test_other_source_after_latching_is_dropped(relay: RtpRelay, sockets: list) -> None:
    a, b, intruder = await open_phones(sockets, 3)
    facing_a, _, _, _ = await setup_call(relay, a, b)
    a.send(rtp(0), facing_a)
    await b.wait_for(1)
    for seq in range(10):
        intruder.send(rtp(100 + seq, b"EVIL" * 40), facing_a)
    a.send(rtp(1), facing_a)  # sent after the intruder's packets on the same path
    await b.wait_for(2)
    await asyncio.sleep(0.05)
    assert [data for data, _ in b.received] == [rtp(0), rtp(1)]
    stats = await relay.query("call-1")
    assert stats is not None
    assert stats.a_to_b.dropped == 10 and stats.a_to_b.packets == 2


async def test_same_sdp_reoffer_allows_relatch_after_nat_rebinding(
    relay: RtpRelay, sockets: list
) -> None:
    a_old, a_new, b = await open_phones(sockets, 3)
    advertised = await open_phone(sockets)  # the phone's SDP address: never the source
    facing_a, facing_b, _, _ = await setup_call(relay, a_old, b, a_sdp_port=advertised.port)
    a_old.send(rtp(0), facing_a)
    await b.wait_for(1)
    a_new.send(rtp(1), facing_a)  # new NAT mapping, no re-offer yet: refused
    await asyncio.sleep(0.05)
    assert len(b.received) == 1
    # session refresh with the same SDP: until A talks, B's audio still goes to the latch
    await relay.offer("call-1", "tag-a", phone_sdp(advertised.port))
    await relay.answer("call-1", "tag-a", "tag-b", phone_sdp(b.port))
    b.send(rtp(0, ssrc=3), facing_b)
    await a_old.wait_for(1)
    a_new.send(rtp(2), facing_a)  # now the new mapping latches
    await b.wait_for(2)
    a_old.send(rtp(3), facing_a)  # and the old one is refused
    b.send(rtp(1, ssrc=3), facing_b)
    await a_new.wait_for(1)
    await asyncio.sleep(0.05)
    assert [data for data, _ in b.received] == [rtp(0), rtp(2)]
    assert advertised.received == []
    stats = await relay.query("call-1")
    assert stats is not None and stats.a_to_b.dropped == 2


async def test_reoffer_keeps_ports_and_allows_relatch(relay: RtpRelay, sockets: list) -> None:
    a, b, a_moved = await open_phones(sockets, 3)
    facing_a, facing_b, to_a, to_b = await setup_call(relay, a, b)
    a.send(rtp(0), facing_a)
    await b.wait_for(1)
    # A re-INVITEs from a new port (e.g. after a network change): same relay ports
    to_b2 = await relay.offer("call-1", "tag-a", phone_sdp(a_moved.port, version=2))
    to_a2 = await relay.answer("call-1", "tag-a", "tag-b", phone_sdp(b.port))
    assert relay_port_in(to_b2) == facing_b and relay_port_in(to_a2) == facing_a
    a_moved.send(rtp(1), facing_a)  # re-latch on the new source is allowed
    await b.wait_for(2)
    b.send(rtp(0, ssrc=5), facing_b)
    await a_moved.wait_for(1)
    # B puts the call on hold: the SDP sent to A changes, so its o= version grows
    version_before = parse_sdp(to_a2).origin.session_version
    to_a3 = await relay.offer("call-1", "tag-b", phone_sdp(b.port, "a=sendonly", version=2))
    assert relay_port_in(to_a3) == facing_a
    assert b"a=sendonly" in to_a3
    assert parse_sdp(to_a3).origin.session_version == version_before + 1
    # and an unchanged re-offer keeps the version
    to_a4 = await relay.offer("call-1", "tag-b", phone_sdp(b.port, "a=sendonly", version=2))
    assert parse_sdp(to_a4).origin.session_version == version_before + 1
    to_b3 = await relay.answer(
        "call-1", "tag-b", "tag-a", phone_sdp(a_moved.port, "a=recvonly", version=3)
    )
    assert relay_port_in(to_b3) == facing_b
    assert relay.ports.in_use == 2


async def test_rtcp_relayed_on_rtcp_port_and_read_for_jitter(
    relay: RtpRelay, sockets: list
) -> None:
    a, a_rtcp, b, b_rtcp = await open_phones(sockets, 4)
    to_b = await relay.offer("call-1", "tag-a", phone_sdp(a.port, rtcp_port=a_rtcp.port))
    to_a = await relay.answer("call-1", "tag-a", "tag-b", phone_sdp(b.port, rtcp_port=b_rtcp.port))
    rtcp_facing_a = parse_sdp(to_a).media[0].rtcp
    rtcp_facing_b = parse_sdp(to_b).media[0].rtcp
    assert rtcp_facing_a is not None and rtcp_facing_b is not None
    assert rtcp_facing_a.port == relay_port_in(to_a) + 1
    report = receiver_report(jitter=240, cumulative_lost=3, fraction=32)  # 240/8000 s = 30 ms
    b_rtcp.send(report, rtcp_facing_b.port)  # B reports on what it receives from A
    await a_rtcp.wait_for(1)
    assert a_rtcp.received[0] == (report, (HOST, rtcp_facing_a.port))
    assert a.received == []  # not on the RTP port
    stats = await relay.query("call-1")
    assert stats is not None
    assert stats.a_to_b.jitter_ms == pytest.approx(30.0)
    assert stats.a_to_b.fraction_lost == pytest.approx(0.125)
    assert stats.a_to_b.lost == 3
    assert stats.b_to_a.rtcp_packets == 1 and stats.b_to_a.jitter_ms is None


async def test_rtcp_mux_when_both_sides_offer_it(relay: RtpRelay, sockets: list) -> None:
    a, b = await open_phone(sockets), await open_phone(sockets)
    facing_a, facing_b, to_a, to_b = await setup_call(
        relay, a, b, offer_extra=("a=rtcp-mux",), answer_extra=("a=rtcp-mux",)
    )
    assert b"a=rtcp-mux" in to_b and b"a=rtcp-mux" in to_a
    report = receiver_report(jitter=80, cumulative_lost=0)
    a.send(rtp(0), facing_a)
    a.send(report, facing_a)  # RTCP on the RTP port
    await b.wait_for(2)
    assert [data for data, _ in b.received] == [rtp(0), report]
    stats = await relay.query("call-1")
    assert stats is not None
    assert stats.a_to_b.packets == 1 and stats.a_to_b.rtcp_packets == 1
    assert stats.b_to_a.jitter_ms == pytest.approx(10.0)  # A's report: what A receives
    b.send(report, facing_b)
    await a.wait_for(1)
    assert a.received[0][0] == report


async def test_rtcp_mux_dropped_when_answer_lacks_it(relay: RtpRelay, sockets: list) -> None:
    a, b, b_rtcp = await open_phones(sockets, 3)
    to_b = await relay.offer("call-1", "tag-a", phone_sdp(a.port, "a=rtcp-mux"))
    to_a = await relay.answer("call-1", "tag-a", "tag-b", phone_sdp(b.port, rtcp_port=b_rtcp.port))
    assert b"a=rtcp-mux" in to_b and b"a=rtcp-mux" not in to_a
    report = receiver_report(jitter=8, cumulative_lost=0)
    a_rtcp_port = relay_port_in(to_a) + 1
    sender = await open_phone(sockets)
    sender.send(report, a_rtcp_port)  # A now sends RTCP to the RTCP port
    await b_rtcp.wait_for(1)
    assert b_rtcp.received[0][0] == report and b.received == []


async def test_disabled_stream_gets_no_ports(relay: RtpRelay, sockets: list) -> None:
    a = await open_phone(sockets)
    body = phone_sdp(a.port) + b"m=video 0 RTP/AVP 31\r\n"
    to_b = await relay.offer("call-1", "tag-a", body)
    media = parse_sdp(to_b).media
    assert media[0].port != 0 and media[1].port == 0
    assert relay.ports.in_use == 2  # one pair facing each leg, none for video


async def test_bad_sdp_is_488_and_leaves_nothing(relay: RtpRelay) -> None:
    with pytest.raises(SdpError) as caught:
        await relay.offer("call-x", "tag-a", b"v=0\r\nnot sdp\r\n")
    assert caught.value.status == 488
    assert relay.session_count == 0 and relay.ports.in_use == 0


async def test_ports_exhausted_then_released_by_delete(sockets: list) -> None:
    relay = RtpRelay(bind_host=HOST, port_range=port_window(4), media_timeout=None)
    try:
        a = await open_phone(sockets)
        await relay.offer("call-1", "t1", phone_sdp(a.port))
        await relay.offer("call-2", "t2", phone_sdp(a.port))
        assert relay.ports.available == 0
        with pytest.raises(PortsExhausted) as caught:
            await relay.offer("call-3", "t3", phone_sdp(a.port))
        assert (caught.value.status, caught.value.reason) == (503, "No media ports available")
        assert relay.session_count == 2 and relay.ports.in_use == 4
        stats = await relay.delete("call-1")
        assert stats is not None and stats.a_to_b.packets == 0
        assert await relay.delete("call-1") is None
        to_b = await relay.offer("call-3", "t3", phone_sdp(a.port))
        assert relay_port_in(to_b) > 0
    finally:
        await relay.close()
    assert relay.ports.in_use == 0


async def test_media_timeout_fires_after_silence(sockets: list) -> None:
    relay = RtpRelay(
        bind_host=HOST, port_range=port_window(8), media_timeout=0.3, check_interval=0.05
    )
    fired: list[str] = []
    done = asyncio.Event()

    def timed_out(call_id: str) -> None:
        fired.append(call_id)
        done.set()

    relay.on_timeout = timed_out
    try:
        a, b = await open_phone(sockets), await open_phone(sockets)
        facing_a, _, _, _ = await setup_call(relay, a, b)
        a.send(rtp(0), facing_a)
        await b.wait_for(1)
        last_rtp = time.monotonic()
        await asyncio.wait_for(done.wait(), WAIT_S)
        assert time.monotonic() - last_rtp >= 0.3
        await asyncio.sleep(0.2)
        assert fired == ["call-1"]  # once, not on every check
    finally:
        await relay.close()


async def test_media_timeout_with_injected_clock(sockets: list) -> None:
    now = [1000.0]
    relay = RtpRelay(
        bind_host=HOST,
        port_range=port_window(8),
        media_timeout=10.0,
        clock=lambda: now[0],
        check_interval=3600.0,  # only the explicit checks below run
    )
    try:
        a, b = await open_phone(sockets), await open_phone(sockets)
        await relay.offer("ringing", "x", phone_sdp(a.port))
        now[0] += 100.0
        assert relay.check_timeouts(now[0]) == []  # not answered: ringing has no RTP
        await setup_call(relay, a, b)
        assert relay.check_timeouts(now[0] + 9.9) == []
        assert relay.check_timeouts(now[0] + 10.0) == ["call-1"]
        # on hold (a=inactive both ways) is not a dead call
        await relay.offer("held", "h", phone_sdp(a.port, "a=inactive"))
        await relay.answer("held", "h", "g", phone_sdp(b.port, "a=inactive"))
        assert relay.check_timeouts(now[0] + 50.0) == []
    finally:
        await relay.close()


async def test_t38_image_stream_relayed(relay: RtpRelay, sockets: list) -> None:
    a, b = await open_phone(sockets), await open_phone(sockets)

    def fax_sdp(port: int) -> bytes:
        return (
            f"v=0\r\no=fax 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=image {port} udptl t38\r\na=T38FaxVersion:0\r\n"
        ).encode()

    to_b = await relay.offer("fax", "a", fax_sdp(a.port))
    to_a = await relay.answer("fax", "a", "b", fax_sdp(b.port))
    udptl = b"\x00\x01" + b"\x07" * 30  # not RTP: carried opaquely
    a.send(udptl, relay_port_in(to_a))
    await b.wait_for(1)
    b.send(udptl, relay_port_in(to_b))
    await a.wait_for(1)
    assert b.received[0][0] == udptl and a.received[0][0] == udptl


async def test_ipv6_loopback_relay() -> None:
    relay = RtpRelay(bind_host="::1", port_range=port_window(8), media_timeout=None)
    loop = asyncio.get_running_loop()
    opened = []
    try:
        phones: list[Phone] = []
        for _ in range(2):
            transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=("::1", 0))
            opened.append(transport)
            phones.append(phone)
        a, b = phones

        def v6_sdp(port: int) -> bytes:
            return (
                "v=0\r\no=- 1 1 IN IP6 ::1\r\ns=-\r\nc=IN IP6 ::1\r\nt=0 0\r\n"
                f"m=audio {port} RTP/AVP 0\r\n"
            ).encode()

        to_b = await relay.offer("v6", "a", v6_sdp(a.port))
        to_a = await relay.answer("v6", "a", "b", v6_sdp(b.port))
        assert b"c=IN IP6 ::1\r\n" in to_b and b"c=IN IP6 ::1\r\n" in to_a
        assert a.transport is not None and b.transport is not None
        b.transport.sendto(rtp(0, ssrc=2), ("::1", relay_port_in(to_b)))  # B talks first
        await a.wait_for(1)
        a.transport.sendto(rtp(0), ("::1", relay_port_in(to_a)))
        await b.wait_for(1)
        assert a.received[0][0] == rtp(0, ssrc=2) and b.received[0][0] == rtp(0)
        stats = await relay.query("v6")
        assert stats is not None and (stats.a_to_b.packets, stats.b_to_a.packets) == (1, 1)
    finally:
        for transport in opened:
            transport.close()
        await relay.close()

"""The rtpengine backend against the real Debian ``rtpengine`` daemon (userspace, loopback).

The daemon is started by these tests on a free ng port with a private RTP port range in
31000-31999 and stopped by its PID. Two "phones" are asyncio UDP sockets that send RTP
through rtpengine after an offer/answer made by :class:`RtpengineBackend`.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from conftest import free_port

from media.backend import MediaError, PortsExhausted, SdpError, UnknownCall
from media.bencode import decode, encode
from media.rtpengine import NgClient, RtpengineBackend, RtpengineUnavailable

pytestmark = pytest.mark.integration

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RTP_HEADER_BYTES = 12
PCMU_PAYLOAD = b"\xff" * 160


# ---------------------------------------------------------------- the daemon
@dataclass(frozen=True, slots=True)
class Rtpengine:
    ng_address: tuple[str, int]
    port_min: int
    port_max: int
    pid: int


def _rtpengine_binary() -> str:
    found = shutil.which("rtpengine")
    if found is None and Path("/usr/sbin/rtpengine").exists():
        found = "/usr/sbin/rtpengine"
    if found is None:
        pytest.fail(
            "rtpengine is not installed (Debian package rtpengine-daemon): run `make test`, "
            "which installs it before running the suite"
        )
    return found


def _free_udp_block(first: int, last: int, size: int) -> int:
    """The lowest base in [first, last] whose ``size`` UDP ports are all free right now."""
    for base in range(first, last - size + 2, size):
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((LOOPBACK, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {size} free UDP ports in {first}-{last}")


def _answers_ping(ng_address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(b"probe " + encode({"command": "ping"}), ng_address)
            data, _ = sock.recvfrom(4096)
        except OSError:
            return False
    return data.startswith(b"probe ") and decode(data[6:]) == {"result": b"pong"}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _run_rtpengine(workdir: Path, port_min: int, port_max: int) -> Iterator[Rtpengine]:
    binary = _rtpengine_binary()
    ng_address = (LOOPBACK, free_port("udp"))
    log_path = workdir / f"rtpengine-{port_min}.log"
    command = [
        binary,
        "--config-file=none",
        "--foreground",
        "--log-stderr",
        "--log-level=5",
        "--table=-1",
        f"--interface={LOOPBACK}",
        f"--listen-ng={ng_address[0]}:{ng_address[1]}",
        f"--port-min={port_min}",
        f"--port-max={port_max}",
        "--timeout=60",
        "--delete-delay=0",
        "--num-threads=2",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_ping(ng_address):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"rtpengine did not answer ping (exit={process.poll()}):\n{tail}")
            time.sleep(0.05)
        yield Rtpengine(ng_address, port_min, port_max, process.pid)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def rtpengine() -> Iterator[Rtpengine]:
    """An rtpengine with 100 RTP ports of its own."""
    with tempfile.TemporaryDirectory(prefix="softswitch-rtpengine-") as tmp:
        base = _free_udp_block(31000, 31899, 100)
        yield from _run_rtpengine(Path(tmp), base, base + 99)


@pytest.fixture(scope="module")
def tiny_rtpengine() -> Iterator[Rtpengine]:
    """An rtpengine with only 4 RTP ports: room for one offer."""
    with tempfile.TemporaryDirectory(prefix="softswitch-rtpengine-tiny-") as tmp:
        base = _free_udp_block(31900, 31999, 4)
        yield from _run_rtpengine(Path(tmp), base, base + 3)


@pytest.fixture
async def backend(rtpengine: Rtpengine) -> RtpengineBackend:
    media = RtpengineBackend(rtpengine.ng_address)
    await media.start()
    yield media
    await media.close()


# ---------------------------------------------------------------- the phones
class Phone(asyncio.DatagramProtocol):
    """A UDP endpoint that counts the RTP packets it receives."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[bytes] = []
        self.sources: set[tuple[str, int]] = set()
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.sources.add(addr)
        self.arrived.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def sdp(self, session_id: int, direction: str = "sendrecv") -> bytes:
        return (
            "v=0\r\n"
            f"o=phone {session_id} 1 IN IP4 {LOOPBACK}\r\n"
            "s=call\r\n"
            f"c=IN IP4 {LOOPBACK}\r\n"
            "t=0 0\r\n"
            f"m=audio {self.port} RTP/AVP 0 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\n"
            f"a={direction}\r\n"
        ).encode()

    def send_rtp(self, port: int, count: int, ssrc: int, first_seq: int = 0) -> None:
        assert self.transport is not None
        for i in range(count):
            seq = first_seq + i
            header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc)
            self.transport.sendto(header + PCMU_PAYLOAD, (LOOPBACK, port))

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_phone() -> Phone:
    loop = asyncio.get_running_loop()
    _, phone = await loop.create_datagram_endpoint(Phone, local_addr=(LOOPBACK, 0))
    return phone


@pytest.fixture
async def phones() -> tuple[Phone, Phone]:
    alice, bob = await open_phone(), await open_phone()
    yield alice, bob
    alice.close()
    bob.close()


def media_address(sdp: bytes) -> tuple[str, int]:
    text = sdp.decode()
    connection = re.search(r"^c=IN IP4 (\S+)\r?$", text, re.M)
    media = re.search(r"^m=audio (\d+) ", text, re.M)
    assert connection is not None and media is not None, text
    return connection.group(1), int(media.group(1))


async def set_up_call(
    backend: RtpengineBackend, call_id: str, alice: Phone, bob: Phone
) -> tuple[int, int]:
    """Offer from alice (tag "a-tag"), answer from bob ("b-tag"); relay ports (to_a, to_b)."""
    sdp_for_bob = await backend.offer(call_id, "a-tag", alice.sdp(1))
    sdp_for_alice = await backend.answer(call_id, "a-tag", "b-tag", bob.sdp(2))
    return media_address(sdp_for_alice)[1], media_address(sdp_for_bob)[1]


# ---------------------------------------------------------------- tests
async def test_ping_gets_pong(backend: RtpengineBackend) -> None:
    await backend.ping()


async def test_offer_answer_relays_rtp_both_ways_and_query_counts_it(
    backend: RtpengineBackend, rtpengine: Rtpengine, phones: tuple[Phone, Phone]
) -> None:
    alice, bob = phones
    sdp_for_bob = await backend.offer("call-relay", "a-tag", alice.sdp(1))
    relay_host, port_for_bob = media_address(sdp_for_bob)
    assert relay_host == LOOPBACK
    assert rtpengine.port_min <= port_for_bob <= rtpengine.port_max
    assert b"telephone-event/8000" in sdp_for_bob
    sdp_for_alice = await backend.answer("call-relay", "a-tag", "b-tag", bob.sdp(2))
    _, port_for_alice = media_address(sdp_for_alice)
    assert rtpengine.port_min <= port_for_alice <= rtpengine.port_max
    assert port_for_alice != port_for_bob

    alice.send_rtp(port_for_alice, 20, ssrc=0xA)
    bob.send_rtp(port_for_bob, 15, ssrc=0xB)
    await bob.wait_for(20)
    await alice.wait_for(15)
    assert len(bob.received) == 20
    assert len(alice.received) == 15
    assert bob.sources == {(LOOPBACK, port_for_bob)}  # relayed from the port bob was given
    assert alice.sources == {(LOOPBACK, port_for_alice)}
    assert all(packet.endswith(PCMU_PAYLOAD) for packet in bob.received)

    stats = await backend.query("call-relay")
    assert stats is not None
    assert stats.a_to_b.packets == 20
    assert stats.a_to_b.bytes == 20 * (RTP_HEADER_BYTES + len(PCMU_PAYLOAD))
    assert stats.b_to_a.packets == 15
    assert stats.b_to_a.bytes == 15 * (RTP_HEADER_BYTES + len(PCMU_PAYLOAD))
    assert stats.last_packet_at is not None
    assert abs(stats.last_packet_at - time.time()) < 5
    assert abs(stats.started_at - time.time()) < 5

    final = await backend.delete("call-relay")
    assert final is not None
    assert (final.a_to_b.packets, final.b_to_a.packets) == (20, 15)
    assert await backend.query("call-relay") is None
    assert await backend.delete("call-relay") is None


async def test_reoffer_from_callee_keeps_the_relay_ports(
    backend: RtpengineBackend, phones: tuple[Phone, Phone]
) -> None:
    alice, bob = phones
    port_for_alice, port_for_bob = await set_up_call(backend, "call-hold", alice, bob)
    # bob puts alice on hold: a re-INVITE from bob's leg, answered by alice
    sdp_for_alice = await backend.offer("call-hold", "b-tag", bob.sdp(2, "sendonly"))
    assert media_address(sdp_for_alice)[1] == port_for_alice
    assert b"a=sendonly" in sdp_for_alice
    sdp_for_bob = await backend.answer("call-hold", "b-tag", "a-tag", alice.sdp(1, "recvonly"))
    assert media_address(sdp_for_bob)[1] == port_for_bob
    bob.send_rtp(port_for_bob, 5, ssrc=0xB)
    await alice.wait_for(5)
    assert len(alice.received) == 5
    stats = await backend.delete("call-hold")
    assert stats is not None and stats.b_to_a.packets == 5 and stats.a_to_b.packets == 0


async def test_answer_for_unknown_call_is_a_media_error(backend: RtpengineBackend) -> None:
    with pytest.raises(MediaError) as caught:
        await backend.answer("no-such-call", "a-tag", "b-tag", b"v=0\r\n")
    assert isinstance(caught.value, UnknownCall)
    assert "Unknown call-id" in str(caught.value)


async def test_unparsable_sdp_is_an_sdp_error_488(backend: RtpengineBackend) -> None:
    with pytest.raises(SdpError) as caught:
        await backend.offer("call-bad-sdp", "a-tag", b"this is not SDP")
    assert caught.value.status == 488
    assert "parse SDP" in caught.value.detail


async def test_running_out_of_relay_ports_is_ports_exhausted_503(
    tiny_rtpengine: Rtpengine, phones: tuple[Phone, Phone]
) -> None:
    alice, bob = phones
    media = RtpengineBackend(tiny_rtpengine.ng_address)
    try:
        await media.offer("call-fits", "a-tag", alice.sdp(1))
        with pytest.raises(PortsExhausted) as caught:
            await media.offer("call-too-many", "a-tag", bob.sdp(2))
        assert caught.value.status == 503
        assert "Ran out of ports" in caught.value.detail
        await media.delete("call-fits")  # ports come back
        await media.offer("call-after-release", "a-tag", bob.sdp(3))
    finally:
        await media.close()


async def test_media_timeout_fires_once_after_rtp_stops(
    rtpengine: Rtpengine, phones: tuple[Phone, Phone]
) -> None:
    alice, bob = phones
    media = RtpengineBackend(rtpengine.ng_address, media_timeout=1.0, poll_interval=0.1)
    timed_out: list[str] = []
    media.on_timeout = timed_out.append
    await media.start()
    try:
        port_for_alice, _ = await set_up_call(media, "call-idle", alice, bob)
        sending_until = time.monotonic() + 1.6
        seq = 0
        while time.monotonic() < sending_until:  # 40 packets at most
            alice.send_rtp(port_for_alice, 1, ssrc=0xA, first_seq=seq)
            seq += 1
            await asyncio.sleep(0.04)
        assert timed_out == []  # RTP kept it alive past media_timeout
        stopped = time.monotonic()
        deadline = stopped + 4.0
        while not timed_out and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert timed_out == ["call-idle"]
        assert time.monotonic() - stopped >= 1.0  # never early
        await asyncio.sleep(0.3)
        assert timed_out == ["call-idle"]  # reported once
    finally:
        await media.close()


async def test_no_answer_from_rtpengine_is_503_not_answering() -> None:
    silent_port = free_port("udp")
    client = NgClient((LOOPBACK, silent_port), timeout=0.05, retries=2)
    started = time.monotonic()
    try:
        with pytest.raises(RtpengineUnavailable) as caught:
            await client.request("ping")
    finally:
        client.close()
    assert caught.value.status == 503
    assert caught.value.reason == "rtpengine not answering"
    assert time.monotonic() - started < 2.0


class _ForgetfulNgServer(asyncio.DatagramProtocol):
    """Drops the first request, sends garbage and a stranger's cookie, then answers."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.requests.append(data)
        if len(self.requests) == 1:
            return
        cookie, _, body = data.partition(b" ")
        self.transport.sendto(cookie + b" d6:result", addr)  # truncated bencode
        self.transport.sendto(b"someone-else " + encode({"result": "ok"}), addr)
        command = decode(body)
        assert isinstance(command, dict)
        reply = {"result": "error", "error-reason": "Unknown call-id"}
        if command["command"] == b"ping":
            reply = {"result": "pong"}
        self.transport.sendto(cookie + b" " + encode(reply), addr)


async def test_ng_client_retransmits_with_the_same_cookie_and_ignores_bad_replies() -> None:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        _ForgetfulNgServer, local_addr=(LOOPBACK, 0)
    )
    client = NgClient(transport.get_extra_info("sockname")[:2], timeout=0.1, retries=3)
    try:
        await client.ping()
        assert len(server.requests) == 2
        assert server.requests[0] == server.requests[1]
        assert client.bad_replies == 2
        with pytest.raises(UnknownCall):
            await client.request("query", {"call-id": b"x"})
        cookies = {request.partition(b" ")[0] for request in server.requests}
        assert len(cookies) == 2  # a new request gets a new cookie
    finally:
        client.close()
        transport.close()

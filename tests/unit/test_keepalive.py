"""OPTIONS keepalive to registered UDP contacts (switch.keepalive) over loopback, with a
real SignallingCore whose transaction timers are shortened (T1 = 10 ms, so Timer F,
64*T1, fires after 0.64 s instead of 32 s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from sip.message import SipRequest, make_response
from sip.parser import parse_message
from sip.timers import TimerSettings
from switch.keepalive import ContactKeepalive
from switch.location import ContactUpdate, Flow, MemoryBindingStore
from switch.metrics import SwitchMetrics
from switch.signalling import SignallingCore

FAST_TIMERS = TimerSettings(t1=0.01, t2=0.08, t4=0.1)
REALM = "example.com"
MAX_FAILURES = 2
WAIT = 5.0  # bound on anything that should happen well before it


class PhoneSocket(asyncio.DatagramProtocol):
    """A registered phone's UDP socket: records each OPTIONS; answers when `status` is set."""

    def __init__(self) -> None:
        self.status: int | None = 200
        self.received: list[SipRequest] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        request = parse_message(data)
        assert isinstance(request, SipRequest)
        self.received.append(request)
        if self.status is not None and self.transport is not None:
            response = make_response(request, self.status, to_tag="phone")
            self.transport.sendto(response.to_bytes(), addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def branches(self) -> set[str | None]:
        return {r.top_via.branch for r in self.received}


class Node:
    def __init__(self) -> None:
        self.metrics = SwitchMetrics()
        self.core = SignallingCore(self.metrics, timers=FAST_TIMERS)
        self.store = MemoryBindingStore()
        self.keepalive = ContactKeepalive(
            self.core, self.store, self.metrics,
            realm=REALM, interval=0, max_failures=MAX_FAILURES, user_agent="softswitch-test",
        )
        self.local: tuple[str, int] = ("127.0.0.1", 0)
        self.phones: list[asyncio.DatagramTransport] = []

    async def start(self) -> None:
        self.local = await self.core.listen("udp", "127.0.0.1", 0)
        self.keepalive.listeners = [("udp", *self.local)]

    async def phone(self) -> PhoneSocket:
        transport, phone = await asyncio.get_running_loop().create_datagram_endpoint(
            PhoneSocket, local_addr=("127.0.0.1", 0)
        )
        self.phones.append(transport)
        return phone

    async def bind(self, user: str, phone: PhoneSocket, *, transport: str = "udp",
                   local: tuple[str, int] | None = None) -> str:
        contact = f"sip:{user}@127.0.0.1:{phone.port}"
        local_host, local_port = local or self.local
        await self.store.register(
            f"{user}@{REALM}",
            [ContactUpdate(contact=contact, expires=600)],
            call_id=f"{user}-reg@test",
            cseq=1,
            flow=Flow(transport, "127.0.0.1", phone.port, local_host, local_port),
            now=time.time(),
        )
        return contact

    async def contacts(self, user: str) -> list[str]:
        return [b.contact for b in await self.store.lookup(f"{user}@{REALM}", time.time())]

    def evictions(self) -> float:
        return self.metrics.value("softswitch_registrar_keepalive_evictions_total")

    async def close(self) -> None:
        for transport in self.phones:
            transport.close()
        await self.core.close()
        await self.store.close()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    instance = Node()
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def sweep(node: Node) -> int:
    return await asyncio.wait_for(node.keepalive.sweep(), WAIT)


async def test_answering_contact_stays(node: Node) -> None:
    phone = await node.phone()
    contact = await node.bind("alice", phone)
    for _ in range(MAX_FAILURES + 1):
        assert await sweep(node) == 1
    assert await node.contacts("alice") == [contact]
    assert len(phone.received) == MAX_FAILURES + 1
    options = phone.received[0]
    assert options.method == "OPTIONS" and options.uri == contact
    assert options.top_via.sent_by == f"127.0.0.1:{node.local[1]}"
    assert options.header("User-Agent") == "softswitch-test"
    assert node.keepalive.failures == {}
    assert node.evictions() == 0


async def test_an_error_response_still_proves_the_contact_alive(node: Node) -> None:
    phone = await node.phone()
    phone.status = 481
    contact = await node.bind("alice", phone)
    for _ in range(MAX_FAILURES + 1):
        assert await sweep(node) == 1
    assert await node.contacts("alice") == [contact]


async def test_silent_contact_is_evicted_after_max_failures(node: Node) -> None:
    phone = await node.phone()
    phone.status = None
    await node.bind("bob", phone)
    started = time.monotonic()
    assert await sweep(node) == 1
    elapsed = time.monotonic() - started
    # Timer F (64*T1) ended the first ping: not sooner, and not the default 32 s.
    assert FAST_TIMERS.timer_f <= elapsed < WAIT
    assert len(await node.contacts("bob")) == 1  # one miss is not enough
    # Timer E retransmitted the same request (same branch) while waiting.
    assert len(phone.received) > 1 and len(phone.branches()) == 1
    assert await sweep(node) == 1
    assert await node.contacts("bob") == []
    assert node.evictions() == 1
    assert node.keepalive.failures == {}
    assert await sweep(node) == 0  # nothing left to ping


async def test_only_consecutive_misses_count(node: Node) -> None:
    phone = await node.phone()
    await node.bind("carol", phone)
    for status in (None, 200, None):  # miss, answer, miss: never two in a row
        phone.status = status
        await sweep(node)
    assert len(await node.contacts("carol")) == 1
    assert node.evictions() == 0


async def test_one_silent_contact_does_not_affect_the_others(node: Node) -> None:
    alive, dead = await node.phone(), await node.phone()
    dead.status = None
    alive_contact = await node.bind("alice", alive)
    await node.bind("bob", dead)
    for _ in range(MAX_FAILURES):
        assert await sweep(node) == 2
    assert await node.contacts("alice") == [alive_contact]
    assert await node.contacts("bob") == []
    assert node.evictions() == 1


async def test_only_udp_bindings_of_this_node_are_pinged(node: Node) -> None:
    tcp_phone, other_node_phone = await node.phone(), await node.phone()
    await node.bind("alice", tcp_phone, transport="tcp")
    await node.bind("bob", other_node_phone, local=("127.0.0.1", 1))
    assert await sweep(node) == 0
    await asyncio.sleep(0.05)
    assert tcp_phone.received == [] and other_node_phone.received == []


async def test_run_loop_pings_every_interval_and_evicts(node: Node) -> None:
    phone = await node.phone()
    phone.status = None
    await node.bind("dave", phone)
    node.keepalive.interval = 0.05
    task = asyncio.create_task(node.keepalive.run())
    try:
        async with asyncio.timeout(WAIT):
            while await node.contacts("dave"):
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert node.evictions() == 1
    assert len(phone.branches()) == MAX_FAILURES


async def test_misses_of_a_binding_that_went_away_are_forgotten(node: Node) -> None:
    phone = await node.phone()
    phone.status = None
    contact = await node.bind("erin", phone)
    await sweep(node)
    assert node.keepalive.failures == {(f"erin@{REALM}", contact): 1}
    assert await node.store.remove(f"erin@{REALM}", contact)  # unregistered meanwhile
    assert await sweep(node) == 0
    assert node.keepalive.failures == {}

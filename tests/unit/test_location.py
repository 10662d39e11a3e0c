"""The location service (RFC 3261 §10.3 steps 6-8), run against both stores."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from switch.location import (
    Binding,
    BindingStore,
    ContactUpdate,
    Flow,
    MemoryBindingStore,
    RedisBindingStore,
    RegistrationRejected,
    binding_key,
    create_store,
    normalize_contact,
)

T0 = 1_000_000.0
AOR = "alice@example.com"
UDP_FLOW = Flow("udp", "198.51.100.7", 40123, "127.0.0.1", 5060)
TCP_FLOW = Flow("tcp", "198.51.100.8", 51000, "127.0.0.1", 5060, connection_id=42)
_prefixes = itertools.count()


def unique_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}-{next(_prefixes)}:"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BindingStore]:
    if request.param == "memory":
        location: BindingStore = MemoryBindingStore()
    else:
        url = request.getfixturevalue("redis_server")
        location = RedisBindingStore(url, unique_prefix())
    try:
        yield location
    finally:
        await location.close()


@pytest.fixture
async def redis_pair(
    redis_server: str,
) -> AsyncIterator[tuple[RedisBindingStore, RedisBindingStore]]:
    prefix = unique_prefix()
    first, second = RedisBindingStore(redis_server, prefix), RedisBindingStore(redis_server, prefix)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def register(
    store: BindingStore,
    *updates: ContactUpdate,
    aor: str = AOR,
    call_id: str = "call-1",
    cseq: int = 1,
    now: float = T0,
    flow: Flow = UDP_FLOW,
    max_contacts: int | None = None,
) -> list[Binding]:
    return await store.register(
        aor,
        list(updates),
        call_id=call_id,
        cseq=cseq,
        flow=flow,
        user_agent="Yealink SIP-T54W",
        account_id="acme",
        device="201",
        now=now,
        max_contacts=max_contacts,
    )


def contacts(bindings: list[Binding]) -> list[str]:
    return [b.contact for b in bindings]


async def test_add_one_binding_stores_every_field(store: BindingStore) -> None:
    result = await register(store, ContactUpdate("sip:alice@198.51.100.7:40123", 3600, q=0.7))
    assert len(result) == 1
    binding = result[0]
    assert binding == Binding(
        aor=AOR,
        contact="sip:alice@198.51.100.7:40123",
        q=0.7,
        expires_at=T0 + 3600,
        call_id="call-1",
        cseq=1,
        flow=UDP_FLOW,
        instance_id=None,
        reg_id=None,
        user_agent="Yealink SIP-T54W",
        registered_at=T0,
        account_id="acme",
        device="201",
    )
    assert binding.expires_in(T0) == 3600
    assert binding.expires_in(T0 + 3599.5) == 1
    assert await store.lookup(AOR, T0 + 1) == result
    assert await store.lookup("bob@example.com", T0) == []


async def test_refresh_extends_expiry_keeps_registered_at_and_updates_flow(
    store: BindingStore,
) -> None:
    await register(store, ContactUpdate("sip:alice@198.51.100.7:40123", 60), cseq=1)
    result = await register(
        store,
        ContactUpdate("sip:alice@198.51.100.7:40123", 120),
        cseq=2,
        now=T0 + 30,
        flow=TCP_FLOW,
    )
    assert len(result) == 1
    assert result[0].expires_at == T0 + 150
    assert result[0].cseq == 2
    assert result[0].registered_at == T0
    assert result[0].flow == TCP_FLOW
    assert await store.lookup(AOR, T0 + 100) == result


async def test_expires_zero_removes_only_that_binding(store: BindingStore) -> None:
    await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 3600),
        ContactUpdate("sip:alice@10.0.0.2", 3600),
    )
    result = await register(store, ContactUpdate("sip:alice@10.0.0.1", 0), cseq=2, now=T0 + 5)
    assert contacts(result) == ["sip:alice@10.0.0.2"]
    assert contacts(await store.lookup(AOR, T0 + 6)) == ["sip:alice@10.0.0.2"]
    # removing a contact that is not bound changes nothing and is not an error
    result = await register(store, ContactUpdate("sip:alice@10.9.9.9", 0), cseq=3, now=T0 + 7)
    assert contacts(result) == ["sip:alice@10.0.0.2"]


async def test_unregister_all_removes_every_binding(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 3600), call_id="a", cseq=1)
    await register(store, ContactUpdate("sip:alice@10.0.0.2", 3600), call_id="b", cseq=9)
    assert await store.count(T0) == 2
    result = await store.unregister_all(AOR, call_id="a", cseq=2, now=T0 + 1)
    assert result == []
    assert await store.lookup(AOR, T0 + 1) == []
    assert await store.count(T0 + 1) == 0
    assert await store.aor_count(T0 + 1) == 0


async def test_unregister_all_with_stale_cseq_is_refused_and_changes_nothing(
    store: BindingStore,
) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 3600), call_id="a", cseq=5)
    await register(store, ContactUpdate("sip:alice@10.0.0.2", 3600), call_id="b", cseq=1)
    before = await store.lookup(AOR, T0 + 1)
    with pytest.raises(RegistrationRejected) as refused:
        await store.unregister_all(AOR, call_id="a", cseq=5, now=T0 + 1)
    assert refused.value.status == 500
    assert refused.value.reason == "CSeq out of order"
    assert await store.lookup(AOR, T0 + 1) == before
    assert len(before) == 2


async def test_several_contacts_are_returned_by_q_descending(store: BindingStore) -> None:
    result = await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 3600, q=0.1),
        ContactUpdate("sip:alice@10.0.0.2", 3600, q=0.9),
        ContactUpdate("sip:alice@10.0.0.3", 3600, q=0.5),
        ContactUpdate("sip:alice@10.0.0.4", 3600, q=None),
    )
    expected = [
        "sip:alice@10.0.0.4",
        "sip:alice@10.0.0.2",
        "sip:alice@10.0.0.3",
        "sip:alice@10.0.0.1",
    ]
    assert contacts(result) == expected
    assert contacts(await store.lookup(AOR, T0)) == expected
    assert [b.q for b in result] == [None, 0.9, 0.5, 0.1]


async def test_expired_bindings_are_never_returned_and_are_purged(store: BindingStore) -> None:
    await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 60),
        ContactUpdate("sip:alice@10.0.0.2", 600),
    )
    await register(store, ContactUpdate("sip:bob@10.0.0.3", 60), aor="bob@example.com")
    assert contacts(await store.lookup(AOR, T0 + 59.9)) == [
        "sip:alice@10.0.0.1",
        "sip:alice@10.0.0.2",
    ]
    assert contacts(await store.lookup(AOR, T0 + 60)) == ["sip:alice@10.0.0.2"]
    assert await store.lookup("bob@example.com", T0 + 60) == []
    assert await store.count(T0 + 60) == 1
    assert await store.aor_count(T0 + 60) == 1
    assert contacts(await store.lookup(AOR, T0 + 61)) == ["sip:alice@10.0.0.2"]
    assert await store.count(T0 + 600) == 0
    assert await store.aor_count(T0 + 600) == 0
    assert await store.lookup(AOR, T0 + 600) == []


async def test_expire_counts_purged_bindings(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 60))
    await register(store, ContactUpdate("sip:bob@10.0.0.3", 30), aor="bob@example.com")
    assert await store.expire(T0 + 29) == 0
    assert await store.expire(T0 + 30) == 1
    assert await store.expire(T0 + 61) == 1
    assert await store.expire(T0 + 61) == 0


async def test_refreshed_binding_survives_its_first_expiry_time(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 30), cseq=1)
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 3600), cseq=2, now=T0 + 20)
    assert await store.expire(T0 + 31) == 0
    assert contacts(await store.lookup(AOR, T0 + 31)) == ["sip:alice@10.0.0.1"]
    assert await store.count(T0 + 31) == 1


async def test_cseq_out_of_order_aborts_whole_request(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 60, q=0.5), cseq=5)
    before = await store.lookup(AOR, T0)
    for stale_cseq in (5, 4):
        with pytest.raises(RegistrationRejected) as refused:
            await register(
                store,
                ContactUpdate("sip:alice@10.0.0.2", 3600),  # new contact, would be fine alone
                ContactUpdate("sip:alice@10.0.0.1", 3600, q=1.0),  # stale refresh
                cseq=stale_cseq,
                now=T0 + 10,
            )
        assert refused.value.status == 500
        assert refused.value.reason == "CSeq out of order"
        assert await store.lookup(AOR, T0 + 10) == before
        assert await store.count(T0 + 10) == 1
    # removal with a stale CSeq is refused too
    with pytest.raises(RegistrationRejected):
        await register(store, ContactUpdate("sip:alice@10.0.0.1", 0), cseq=3, now=T0 + 10)
    assert await store.lookup(AOR, T0 + 10) == before


async def test_same_contact_twice_in_one_request_is_not_out_of_order(store: BindingStore) -> None:
    result = await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 60),
        ContactUpdate("sip:alice@10.0.0.1", 120),
    )
    assert len(result) == 1
    assert result[0].expires_at == T0 + 120


async def test_new_call_id_replaces_binding_whatever_its_cseq(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@10.0.0.1", 60), call_id="before-reboot", cseq=90)
    result = await register(
        store, ContactUpdate("sip:alice@10.0.0.1", 60), call_id="after-reboot", cseq=1, now=T0 + 5
    )
    assert len(result) == 1
    assert result[0].call_id == "after-reboot"
    assert result[0].cseq == 1
    assert result[0].registered_at == T0 + 5
    assert result[0].expires_at == T0 + 65


async def test_max_contacts_refuses_growth_and_changes_nothing(store: BindingStore) -> None:
    await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 60),
        ContactUpdate("sip:alice@10.0.0.2", 60),
        max_contacts=2,
    )
    with pytest.raises(RegistrationRejected) as refused:
        await register(
            store,
            ContactUpdate("sip:alice@10.0.0.1", 0),  # would make room, but applied only with all
            ContactUpdate("sip:alice@10.0.0.3", 60),
            ContactUpdate("sip:alice@10.0.0.4", 60),
            call_id="other",
            max_contacts=2,
            now=T0 + 1,
        )
    assert refused.value.status == 403
    assert refused.value.reason == "Too many contacts for this address-of-record"
    assert sorted(contacts(await store.lookup(AOR, T0 + 1))) == [
        "sip:alice@10.0.0.1",
        "sip:alice@10.0.0.2",
    ]
    # refreshing an existing contact, or swapping one for another, stays allowed
    result = await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 0),
        ContactUpdate("sip:alice@10.0.0.3", 60),
        ContactUpdate("sip:alice@10.0.0.2", 120),
        cseq=2,
        max_contacts=2,
        now=T0 + 2,
    )
    assert sorted(contacts(result)) == ["sip:alice@10.0.0.2", "sip:alice@10.0.0.3"]
    # expired bindings do not count against the limit
    result = await register(
        store, ContactUpdate("sip:alice@10.0.0.9", 60), cseq=3, max_contacts=2, now=T0 + 200
    )
    assert contacts(result) == ["sip:alice@10.0.0.9"]


async def test_same_instance_and_reg_id_replaces_binding(store: BindingStore) -> None:
    instance = "<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>"
    await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1:5060;ob", 3600, instance_id=instance, reg_id=1),
        call_id="x",
        cseq=1,
    )
    # the same device, new address and new Call-ID: its flow 1 binding is replaced
    result = await register(
        store,
        ContactUpdate("sip:alice@10.0.0.77:5060;ob", 3600, instance_id=instance.lower(), reg_id=1),
        call_id="y",
        cseq=1,
        now=T0 + 10,
    )
    assert contacts(result) == ["sip:alice@10.0.0.77:5060;ob"]
    # a second flow (reg-id 2) of the same instance is a second binding
    result = await register(
        store,
        ContactUpdate("sip:alice@10.0.0.78:5060;ob", 3600, instance_id=instance, reg_id=2),
        call_id="y",
        cseq=2,
        now=T0 + 11,
        flow=TCP_FLOW,
    )
    assert sorted(contacts(result)) == [
        "sip:alice@10.0.0.77:5060;ob",
        "sip:alice@10.0.0.78:5060;ob",
    ]
    by_reg_id = {b.reg_id: b for b in result}
    assert by_reg_id[2].flow == TCP_FLOW
    assert by_reg_id[2].instance_id == instance


async def test_contact_matching_ignores_host_case_but_not_user_case(store: BindingStore) -> None:
    await register(store, ContactUpdate("sip:alice@PBX.Example.COM:5060;Transport=TCP", 60))
    result = await register(
        store, ContactUpdate("SIP:alice@pbx.example.com:5060;transport=tcp", 120), cseq=2
    )
    assert len(result) == 1
    assert result[0].expires_at == T0 + 120
    result = await register(store, ContactUpdate("sip:Alice@pbx.example.com:5060", 60), cseq=3)
    assert len(result) == 2


async def test_count_iter_and_remove(store: BindingStore) -> None:
    await register(
        store,
        ContactUpdate("sip:alice@10.0.0.1", 60),
        ContactUpdate("sip:alice@10.0.0.2", 60),
    )
    await register(store, ContactUpdate("sip:bob@10.0.0.3", 60), aor="bob@example.com")
    await register(store, ContactUpdate("sip:carol@10.0.0.4", 10), aor="carol@example.com")
    assert await store.count(T0) == 4
    assert await store.aor_count(T0) == 3
    live = [b async for b in store.iter_bindings(T0 + 20)]
    assert sorted((b.aor, b.contact) for b in live) == [
        (AOR, "sip:alice@10.0.0.1"),
        (AOR, "sip:alice@10.0.0.2"),
        ("bob@example.com", "sip:bob@10.0.0.3"),
    ]
    assert await store.remove(AOR, "sip:alice@10.0.0.1") is True
    assert await store.remove(AOR, "sip:alice@10.0.0.1") is False
    assert await store.remove("nobody@example.com", "sip:x@10.0.0.1") is False
    assert contacts(await store.lookup(AOR, T0)) == ["sip:alice@10.0.0.2"]
    assert await store.count(T0) == 3
    assert await store.remove("bob@example.com", "sip:bob@10.0.0.3") is True
    assert await store.aor_count(T0) == 2
    assert await store.lookup("bob@example.com", T0) == []


async def test_thousand_aors_register_and_expire_in_bulk(store: BindingStore) -> None:
    started = time.perf_counter()
    for n in range(1000):
        await register(
            store,
            ContactUpdate(f"sip:user{n}@10.1.{n // 250}.{n % 250}:5060", 60 if n % 2 else 120),
            aor=f"user{n}@example.com",
            call_id=f"c{n}",
            now=T0 + n * 0.001,
        )
    assert await store.count(T0 + 2) == 1000
    assert await store.aor_count(T0 + 2) == 1000
    assert len([b async for b in store.iter_bindings(T0 + 2)]) == 1000
    assert await store.expire(T0 + 59) == 0
    assert await store.expire(T0 + 62) == 500  # the odd users, registered for 60 s
    assert await store.count(T0 + 62) == 500
    assert len([b async for b in store.iter_bindings(T0 + 62)]) == 500
    assert await store.expire(T0 + 122) == 500
    assert await store.count(T0 + 122) == 0
    assert await store.aor_count(T0 + 122) == 0
    assert [b async for b in store.iter_bindings(T0 + 122)] == []
    elapsed = time.perf_counter() - started
    assert elapsed < 10.0, f"1,000 registrations and their expiry took {elapsed:.1f}s"


async def test_two_redis_stores_share_bindings(
    redis_pair: tuple[RedisBindingStore, RedisBindingStore],
) -> None:
    node_a, node_b = redis_pair
    await register(node_a, ContactUpdate("sip:alice@10.0.0.1", 60, q=0.5), cseq=3)
    seen = await node_b.lookup(AOR, T0 + 1)
    assert contacts(seen) == ["sip:alice@10.0.0.1"]
    assert seen[0].flow == UDP_FLOW
    # the CSeq rule holds across nodes
    with pytest.raises(RegistrationRejected):
        await register(node_b, ContactUpdate("sip:alice@10.0.0.1", 60), cseq=2, now=T0 + 1)
    await register(node_b, ContactUpdate("sip:alice@10.0.0.2", 60), cseq=4, now=T0 + 1)
    assert sorted(contacts(await node_a.lookup(AOR, T0 + 2))) == [
        "sip:alice@10.0.0.1",
        "sip:alice@10.0.0.2",
    ]
    assert await node_a.count(T0 + 2) == 2
    await node_a.unregister_all(AOR, call_id="call-1", cseq=5, now=T0 + 2)
    assert await node_b.lookup(AOR, T0 + 2) == []


async def test_two_redis_nodes_racing_refreshes_keep_the_highest_cseq(
    redis_pair: tuple[RedisBindingStore, RedisBindingStore],
) -> None:
    node_a, node_b = redis_pair
    order = [7, 20, 3, 11, 1, 15, 9, 18, 5, 13, 2, 19, 8, 16, 4, 12, 6, 17, 10, 14]
    attempts = [
        register(node, ContactUpdate("sip:alice@10.0.0.1", 60 + cseq), call_id="same", cseq=cseq)
        for cseq, node in zip(order, itertools.cycle((node_a, node_b)), strict=False)
    ]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, RegistrationRejected) and o.status == 500 for o in refused)
    assert not isinstance(outcomes[order.index(20)], BaseException)
    final = await node_b.lookup(AOR, T0)
    assert [(b.cseq, b.expires_at) for b in final] == [(20, T0 + 80)]
    assert await node_a.count(T0) == 1


async def test_redis_aor_key_has_ttl_and_really_expires(redis_server: str) -> None:
    location = RedisBindingStore(redis_server, unique_prefix())
    try:
        now = time.time()
        await register(location, ContactUpdate("sip:alice@10.0.0.1", 3600), now=now)
        ttl_ms = await location.redis.pttl(location.aor_key(AOR))
        assert 3_590_000 < ttl_ms <= 3_600_000
        await register(location, ContactUpdate("sip:alice@10.0.0.1", 1), cseq=2, now=time.time())
        ttl_ms = await location.redis.pttl(location.aor_key(AOR))
        assert 0 < ttl_ms <= 1_000
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and await location.redis.exists(location.aor_key(AOR)):
            await asyncio.sleep(0.05)
        assert await location.redis.exists(location.aor_key(AOR)) == 0
        assert await location.lookup(AOR, time.time()) == []
    finally:
        await location.close()


async def test_redis_store_ignores_a_corrupt_value(redis_server: str) -> None:
    location = RedisBindingStore(redis_server, unique_prefix())
    try:
        await register(location, ContactUpdate("sip:alice@10.0.0.1", 60))
        await location.redis.hset(location.aor_key(AOR), "c:garbage", "{not json")
        assert contacts(await location.lookup(AOR, T0)) == ["sip:alice@10.0.0.1"]
        result = await register(location, ContactUpdate("sip:alice@10.0.0.2", 60), cseq=2)
        assert sorted(contacts(result)) == ["sip:alice@10.0.0.1", "sip:alice@10.0.0.2"]
        assert await location.redis.hexists(location.aor_key(AOR), "c:garbage") == 0
    finally:
        await location.close()


async def test_redis_unreachable_register_is_a_503_rejection(redis_server: str) -> None:
    location = RedisBindingStore("redis://127.0.0.1:1/0", unique_prefix())
    try:
        with pytest.raises(RegistrationRejected) as refused:
            await register(location, ContactUpdate("sip:alice@10.0.0.1", 60))
        assert refused.value.status == 503
    finally:
        await location.close()


def test_binding_key_prefers_instance_and_reg_id() -> None:
    assert binding_key("sip:a@h", "<urn:uuid:AB>", 1) == "i:<urn:uuid:ab>:1"
    assert binding_key("sip:a@h", "<urn:uuid:AB>", None) == "i:<urn:uuid:ab>"
    assert binding_key("<sip:a@H;ob>", None, None) == "c:sip:a@h;ob"
    assert normalize_contact("sip:Bob@H.example;b=2;A=1") == "sip:Bob@h.example;a=1;b=2"
    assert normalize_contact("sip:bob@h") != normalize_contact("sip:Bob@h")


async def test_create_store_by_name() -> None:
    assert isinstance(create_store("memory", "", "x:"), MemoryBindingStore)
    redis_store = create_store("redis", "redis://127.0.0.1:6379/0", "x:")
    assert isinstance(redis_store, RedisBindingStore)
    await redis_store.close()
    with pytest.raises(ValueError):
        create_store("cassandra", "", "x:")
    with pytest.raises(ValueError):
        create_store("redis", "", "x:")

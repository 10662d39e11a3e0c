"""Fair-use counter stores: concurrency leases, monthly minutes and call-pattern counters,
one suite run against the memory and the Redis store, then the Redis store with a local
fallback while its redis-server is killed and restarted, and the rebuild from CDRs."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import free_port
from structlog.testing import capture_logs

from fairuse.rebuild import month_range, rebuild_minutes, tally_minutes
from fairuse.store import (
    NO_LIMIT,
    FairUseStore,
    FallbackFairUseStore,
    MemoryFairUseStore,
    PatternCounters,
    RedisFairUseStore,
    create_fairuse_store,
    month_of,
)
from switch.cdr import BillingPolicy, CallRecord, CdrLedger

# 2026-03-10 12:00:00 UTC, well inside a month, a day and an hour.
T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC).timestamp()
MONTH = "2026-03"
TTL = 30.0
_prefixes = itertools.count()


def unique_prefix() -> str:
    return f"fu-test-{uuid.uuid4().hex[:8]}-{next(_prefixes)}:"


def scopes(
    account: int = 3, device: int = 2, trunk: int = 5, line: str = "acme/101"
) -> list[tuple[str, str, int]]:
    return [("account", "acme", account), ("device", line, device), ("trunk", "orange", trunk)]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[FairUseStore]:
    if request.param == "memory":
        counters: FairUseStore = MemoryFairUseStore()
    else:
        url = request.getfixturevalue("redis_server")
        counters = RedisFairUseStore(url, unique_prefix(), "node-a")
    try:
        yield counters
    finally:
        await counters.close()


# ---- leases -----------------------------------------------------------------------------


async def test_leases_are_granted_up_to_each_scope_limit_then_refused(
    store: FairUseStore,
) -> None:
    first = await store.acquire("c1", scopes(), TTL, T0)
    second = await store.acquire("c2", scopes(), TTL, T0)
    assert first.granted and second.granted
    assert second.counts == {"account:acme": 2, "device:acme/101": 2, "trunk:orange": 2}

    third = await store.acquire("c3", scopes(), TTL, T0)
    assert not third.granted
    assert (third.refused_scope, third.refused_id) == ("device", "acme/101")
    # all or nothing: the refused call took no slot in the account or the trunk
    assert await store.active("account", "acme", T0) == 2
    assert await store.active("trunk", "orange", T0) == 2

    other_line = await store.acquire("c3", scopes(line="acme/102"), TTL, T0)
    assert other_line.granted
    assert other_line.counts["account:acme"] == 3
    fourth = await store.acquire("c4", scopes(line="acme/103"), TTL, T0)
    assert (fourth.granted, fourth.refused_scope, fourth.refused_id) == (False, "account", "acme")
    assert fourth.counts["account:acme"] == 3
    assert await store.active("device", "acme/103", T0) == 0


async def test_the_same_call_id_twice_holds_one_slot(store: FairUseStore) -> None:
    one = [("account", "acme", 1)]
    assert (await store.acquire("c1", one, TTL, T0)).granted
    again = await store.acquire("c1", one, TTL, T0 + 1)
    assert again.granted
    assert again.counts == {"account:acme": 1}
    assert await store.active("account", "acme", T0 + 1) == 1
    assert not (await store.acquire("c2", one, TTL, T0 + 1)).granted


async def test_release_frees_the_slot_exactly_once(store: FairUseStore) -> None:
    one = [("account", "acme", 1), ("device", "acme/101", 1)]
    assert (await store.acquire("c1", one, TTL, T0)).granted
    assert await store.release("c1") is True
    assert await store.release("c1") is False
    assert await store.release("never-admitted") is False
    assert await store.active("account", "acme", T0) == 0
    assert await store.active("device", "acme/101", T0) == 0
    assert (await store.acquire("c2", one, TTL, T0)).granted
    assert await store.active("account", "acme", T0) == 1  # never negative, never double


async def test_an_unrefreshed_lease_lapses_at_its_expiry(store: FairUseStore) -> None:
    one = [("account", "acme", 1)]
    assert (await store.acquire("crashed-node-call", one, 10.0, T0)).granted
    assert await store.active("account", "acme", T0 + 9.9) == 1
    assert not (await store.acquire("c2", one, TTL, T0 + 9.9)).granted
    assert await store.active("account", "acme", T0 + 10.0) == 0
    assert (await store.acquire("c2", one, TTL, T0 + 10.5)).granted
    assert await store.refresh("crashed-node-call", 10.0, T0 + 11) is False


async def test_refresh_keeps_a_lease_alive_in_all_its_scopes(store: FairUseStore) -> None:
    assert (await store.acquire("c1", scopes(1, 1, 1), 10.0, T0)).granted
    for step in range(1, 6):  # every ttl/3 for 50 s
        assert await store.refresh("c1", 10.0, T0 + step * 3.3) is True
    now = T0 + 5 * 3.3 + 9.0
    for kind, scope_id in (("account", "acme"), ("device", "acme/101"), ("trunk", "orange")):
        assert await store.active(kind, scope_id, now) == 1
    assert not (await store.acquire("c2", scopes(1, 1, 1), 10.0, now)).granted
    assert await store.refresh("unknown-call", 10.0, now) is False
    assert await store.active("account", "acme", now + 1.1) == 0


async def test_emergency_calls_are_recorded_over_the_limit(store: FairUseStore) -> None:
    one = [("account", "acme", 1)]
    assert (await store.acquire("c1", one, TTL, T0)).granted
    sos = await store.acquire("sos", one, TTL, T0, enforce=False)
    assert sos.granted and sos.counts == {"account:acme": 2}
    unlimited = await store.acquire("c3", [("trunk", "orange", NO_LIMIT)], TTL, T0)
    assert unlimited.granted


async def test_concurrent_admissions_never_exceed_the_limit(store: FairUseStore) -> None:
    limit = 7
    contenders = [store]
    if isinstance(store, RedisFairUseStore):  # a second client: another node's connections
        contenders.append(RedisFairUseStore(_url_of(store), store._prefix, "node-b"))
    try:
        results = await asyncio.gather(
            *(
                contenders[i % len(contenders)].acquire(
                    f"call-{i}", [("account", "acme", limit), ("trunk", "orange", NO_LIMIT)],
                    TTL, T0,
                )
                for i in range(60)
            )
        )  # fmt: skip
    finally:
        for other in contenders[1:]:
            await other.close()
    assert sum(r.granted for r in results) == limit
    assert await store.active("account", "acme", T0) == limit
    assert await store.active("trunk", "orange", T0) == limit
    assert all(r.refused_scope == "account" for r in results if not r.granted)


def _url_of(store: RedisFairUseStore) -> str:
    kwargs = store._redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


async def test_bad_lease_requests_are_clear_errors(store: FairUseStore) -> None:
    bad: list[tuple[object, ...]] = [
        ("c1", [], TTL, T0),
        ("c1", [("account", "acme", -1)], TTL, T0),
        ("c1", [("Account!", "acme", 1)], TTL, T0),
        ("c1", [("account", "", 1)], TTL, T0),
        ("c1", [("account", "acme")], TTL, T0),
        ("c1", [("account", "acme", 1)], 0, T0),
        ("c1", [("account", "acme", 1)], TTL, float("nan")),
        ("", [("account", "acme", 1)], TTL, T0),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            await store.acquire(*args)  # type: ignore[arg-type]
    assert await store.active("account", "acme", T0) == 0


# ---- minutes ----------------------------------------------------------------------------


async def test_minutes_add_up_per_line_and_account_per_month(store: FairUseStore) -> None:
    assert await store.minutes("acme", "101", MONTH) == (0, 0)
    await store.add_minutes("acme", "101", MONTH, 60)
    await store.add_minutes("acme", "101", MONTH, 18)
    await store.add_minutes("acme", "102", MONTH, 30)
    await store.add_minutes("acme", "101", "2026-04", 600)
    await store.add_minutes("globex", "101", MONTH, 5)
    assert await store.minutes("acme", "101", MONTH) == (78, 108)
    assert await store.minutes("acme", "102", MONTH) == (30, 108)
    assert await store.minutes("acme", "101", "2026-04") == (600, 600)
    assert await store.minutes("globex", "101", MONTH) == (5, 5)

    await store.set_minutes("acme", MONTH, 500, {"101": 400, "103": 100})
    assert await store.minutes("acme", "101", MONTH) == (400, 500)
    assert await store.minutes("acme", "102", MONTH) == (0, 500)  # replaced, not merged

    for bad in (
        store.add_minutes("acme", "101", "2026-13", 1),
        store.add_minutes("acme", "101", MONTH, -5),
        store.add_minutes("acme", "", MONTH, 5),
        store.minutes("acme", "101", "March"),
    ):
        with pytest.raises(ValueError):
            await bad


# ---- pattern counters -------------------------------------------------------------------


async def test_pattern_counters_count_attempts_destinations_and_short_calls(
    store: FairUseStore,
) -> None:
    assert await store.pattern_counters("acme", T0) == PatternCounters()
    first = await store.record_attempt("acme", "+33140000001", T0)
    assert (first.calls_last_second, first.calls_last_minute, first.calls_today) == (1, 1, 1)
    await store.record_attempt("acme", "+33140000002", T0 + 0.5)
    await store.record_attempt("acme", "+33140000001", T0 + 30)
    now = T0 + 59.2
    latest = await store.record_attempt("acme", "+442071234567", now)
    assert latest.calls_last_second == 1
    assert latest.calls_last_minute == 4
    assert latest.calls_today == 4
    assert latest.distinct_destinations_hour == 3
    assert latest.distinct_destinations_month == 3
    assert latest.recent_numbers == [
        "+33140000001", "+33140000002", "+33140000001", "+442071234567",
    ]  # fmt: skip
    assert await store.pattern_counters("acme", now) == latest

    later = await store.pattern_counters("acme", T0 + 60.0)
    assert later.calls_last_minute == 2  # the attempts of second T0 are 60 s old
    assert later.calls_last_second == 0
    next_hour = await store.pattern_counters("acme", T0 + 3600)
    assert next_hour.distinct_destinations_hour == 0
    assert next_hour.distinct_destinations_month == 3
    tomorrow = await store.pattern_counters("acme", T0 + 86400)
    assert tomorrow.calls_today == 0

    for i in range(25):
        await store.record_attempt("acme", f"+3314000{i:04d}", now + 1)
    counters = await store.pattern_counters("acme", now + 1)
    assert len(counters.recent_numbers) == 20
    assert counters.recent_numbers[-1] == "+33140000024"
    assert counters.recent_numbers[0] == "+33140000005"
    assert counters.calls_last_second == 25

    assert (await store.pattern_counters("acme", now)).short_calls_share_today == 0.0
    for duration in (2.0, 4.0, 3.0, 120.0):
        await store.record_call_end("acme", duration, now)
    await store.record_call_end("acme", 20.0, now, short_call_seconds=30)
    counters = await store.pattern_counters("acme", now)
    assert (counters.ended_calls_today, counters.short_calls_today) == (5, 4)
    assert counters.short_calls_share_today == pytest.approx(0.8)
    assert (await store.pattern_counters("globex", now)).calls_today == 0
    with pytest.raises(ValueError):
        await store.record_call_end("acme", -1.0, now)
    with pytest.raises(ValueError):
        await store.record_attempt("acme", "", now)


# ---- memory bounds ----------------------------------------------------------------------


async def test_memory_store_drops_idle_and_least_recent_accounts() -> None:
    store = MemoryFairUseStore(max_accounts=100, idle_seconds=3600)
    for i in range(250):
        await store.record_attempt(f"account-{i}", "+33140000001", T0 + i * 0.01)
    assert store.tracked_accounts == 100
    assert (await store.pattern_counters("account-0", T0 + 3)).calls_today == 0
    assert (await store.pattern_counters("account-249", T0 + 3)).calls_today == 1

    await store.record_attempt("busy", "+33140000001", T0 + 3000)
    await store.record_attempt("new", "+33140000001", T0 + 3700)
    assert store.tracked_accounts == 2  # the 100 others were idle for over an hour
    assert (await store.pattern_counters("busy", T0 + 3700)).calls_today == 1
    assert (await store.pattern_counters("busy", T0 + 6601)).calls_today == 0
    assert store.tracked_accounts == 1
    await store.pattern_counters("new", T0 + 7301)
    assert store.tracked_accounts == 0


async def test_memory_store_keeps_bounded_leases_minutes_and_destinations() -> None:
    store = MemoryFairUseStore(keep_months=1)
    for i in range(2000):  # callers that never release: swept once lapsed
        await store.acquire(f"leaked-{i}", [("account", f"a{i % 50}", 100)], 5.0, T0)
    assert store.lease_count(T0) == 2000
    assert store.lease_count(T0 + 5) == 0
    assert not store._scopes and len(store._heap) == 0

    await store.add_minutes("acme", "101", "2026-01", 60)
    await store.add_minutes("acme", "101", "2026-02", 60)
    await store.add_minutes("acme", "101", "2026-03", 60)
    assert sorted(store._minutes) == ["2026-02", "2026-03"]

    for i in range(5000):
        await store.record_attempt("dialer", f"+1202555{i:04d}", T0)
    counters = await store.pattern_counters("dialer", T0)
    assert abs(counters.distinct_destinations_month - 5000) <= 750  # HLL, ~3 % error
    registers = store._activity["dialer"].month_distinct._registers
    assert registers is not None and len(registers) == 1024


# ---- Redis keys -------------------------------------------------------------------------


async def test_redis_keys_all_carry_an_expiry(redis_server: str) -> None:
    prefix = unique_prefix()
    store = RedisFairUseStore(redis_server, prefix, "node-a")
    try:
        await store.acquire("c1", scopes(), TTL, T0)
        await store.add_minutes("acme", "101", MONTH, 60)
        await store.record_attempt("acme", "+33140000001", T0)
        await store.record_call_end("acme", 3.0, T0)
        keys = [key async for key in store.redis.scan_iter(match=f"{prefix}*")]
        assert len(keys) >= 9
        for key in keys:
            assert await store.redis.ttl(key) > 0, key
        lease = await store.redis.hgetall(f"{prefix}{{fu}}:lease:c1")
        assert lease["@node"] == "node-a"
        assert await store.release("c1")
        assert not await store.redis.exists(f"{prefix}{{fu}}:lease:c1")
    finally:
        await store.close()


async def test_a_lease_lost_by_redis_is_recorded_again_on_refresh(redis_server: str) -> None:
    prefix = unique_prefix()
    store = FallbackFairUseStore(
        RedisFairUseStore(redis_server, prefix, "node-a"), MemoryFairUseStore()
    )
    try:
        assert (await store.acquire("c1", scopes(), TTL, T0)).granted
        keys = [key async for key in store.primary.redis.scan_iter(match=f"{prefix}*")]
        await store.primary.redis.delete(*keys)  # what a restart without persistence does
        assert await store.primary.active("account", "acme", T0) == 0
        assert await store.refresh("c1", TTL, T0 + 10) is True
        assert await store.primary.active("account", "acme", T0 + 10) == 1
        assert await store.release("c1") is True
        assert await store.primary.active("account", "acme", T0 + 10) == 0
    finally:
        await store.close()


# ---- fallback while redis-server is down ------------------------------------------------


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _launch_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not installed (make test installs it)"
    process = subprocess.Popen(
        [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile", "",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and process.poll() is None:
        if _answers_ping(port):
            return process
        time.sleep(0.02)
    _kill(process)
    raise RuntimeError(f"redis-server did not start on port {port}")


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=5.0)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A redis-server of this test alone, which the test may kill and start again."""
    port = free_port("tcp")
    state: dict[str, object] = {"port": port, "process": _launch_redis(port, tmp_path)}
    try:
        yield state
    finally:
        process = state["process"]
        assert isinstance(process, subprocess.Popen)
        _kill(process)


async def test_fallback_goes_on_local_counters_while_redis_is_down_then_recovers(
    private_redis: dict[str, object], tmp_path: Path
) -> None:
    port = private_redis["port"]
    changes: list[bool] = []
    store = FallbackFairUseStore(
        RedisFairUseStore(f"redis://127.0.0.1:{port}/0", unique_prefix(), "node-a"),
        MemoryFairUseStore(),
        on_state_change=changes.append,
        clock=lambda: T0 + 2,  # the probe's clock: which held leases are still live
    )
    two = [("account", "acme", 2)]
    try:
        assert await store.probe() is True and not store.degraded
        assert (await store.acquire("c1", two, TTL, T0)).granted
        assert await store.primary.active("account", "acme", T0) == 1
        await store.add_minutes("acme", "101", MONTH, 60)

        process = private_redis["process"]
        assert isinstance(process, subprocess.Popen)
        _kill(process)

        with capture_logs() as logs:
            started = time.monotonic()
            admitted = await store.acquire("c2", two, TTL, T0 + 1)  # local counters: c1 + c2
            assert admitted.granted and store.degraded
            refused = await store.acquire("c3", two, TTL, T0 + 1)
            assert (refused.granted, refused.refused_scope) == (False, "account")
            assert await store.active("account", "acme", T0 + 1) == 2
            await store.add_minutes("acme", "101", MONTH, 30)
            assert await store.minutes("acme", "101", MONTH) == (90, 90)
            counters = await store.record_attempt("acme", "+33140000001", T0 + 1)
            assert counters.calls_today == 1
            assert await store.refresh("c2", TTL, T0 + 2) is True
            assert await store.release("c1") is True
            assert await store.release("c1") is False
            assert await store.probe() is False
            assert time.monotonic() - started < 3.0  # short timeouts, no retries
        assert changes == [True]
        unreachable = [e for e in logs if e["event"] == "fairuse.redis_unreachable"]
        assert len(unreachable) == 1 and unreachable[0]["log_level"] == "warning"

        private_redis["process"] = _launch_redis(int(str(port)), tmp_path)
        assert await store.probe() is True
        assert not store.degraded and changes == [True, False]
        # the call admitted during the outage is now counted in Redis, and the minutes
        # counted meanwhile were added there (the 60 before were lost with the empty Redis:
        # the rebuild from CDRs is for that)
        assert await store.primary.active("account", "acme", T0 + 2) == 1
        assert await store.primary.minutes("acme", "101", MONTH) == (30, 30)
        assert (await store.acquire("c4", two, TTL, T0 + 2)).granted
        assert not (await store.acquire("c5", two, TTL, T0 + 2)).granted
        assert await store.release("c2") is True
        assert await store.primary.active("account", "acme", T0 + 2) == 1
    finally:
        await store.close()


async def test_fallback_ping_notices_an_outage_without_traffic(
    private_redis: dict[str, object], tmp_path: Path
) -> None:
    port = int(str(private_redis["port"]))
    changes: list[bool] = []
    store = create_fairuse_store(
        "redis", f"redis://127.0.0.1:{port}/0", unique_prefix(), "node-a",
        on_state_change=changes.append,
    )  # fmt: skip
    assert isinstance(store, FallbackFairUseStore)
    store.probe_interval = 0.05
    await store.start()
    try:
        process = private_redis["process"]
        assert isinstance(process, subprocess.Popen)
        _kill(process)
        for _ in range(100):
            if store.degraded:
                break
            await asyncio.sleep(0.02)
        assert store.degraded and changes == [True]
        private_redis["process"] = _launch_redis(port, tmp_path)
        for _ in range(100):
            if not store.degraded:
                break
            await asyncio.sleep(0.02)
        assert not store.degraded and changes == [True, False]
    finally:
        await store.close()


def test_create_fairuse_store_names_the_backends() -> None:
    assert isinstance(create_fairuse_store("memory"), MemoryFairUseStore)
    with pytest.raises(ValueError, match="redis_url"):
        create_fairuse_store("redis")
    with pytest.raises(ValueError, match="unknown"):
        create_fairuse_store("etcd")


# ---- rebuild from the CDR ledger --------------------------------------------------------


def _record(
    call_id: str,
    account: str,
    device: str,
    start: float,
    seconds: float | None,
    classification: str = "external",
) -> CallRecord:
    answer = None if seconds is None else start + 5
    end = start + 5 + (seconds or 0)
    return CallRecord.for_call(
        call_id=call_id, account=account, device=device, caller="+33140000100",
        callee_dialled="0140000001", callee_e164="+33140000001",
        classification=classification, trunk="orange", start=start, answer=answer, end=end,
        end_cause="normal" if answer else "no_answer", hangup_by="caller",
        sip_status=200 if answer else 480,
    )  # fmt: skip


async def test_rebuild_sets_the_months_minutes_from_the_ledger(
    store: FairUseStore, tmp_path: Path
) -> None:
    start, end = month_range(MONTH)
    records = [
        _record("a", "acme", "101", start + 10, 60.0),  # 60 s
        _record("b", "acme", "101", T0, 7.0),  # billed 18 s (minimum)
        _record("c", "acme", "102", end - 100, 30.0),  # 30 s, started in the month
        _record("d", "acme", "101", T0, None),  # unanswered: nothing
        _record("e", "acme", "101", T0, 600.0, "emergency"),  # never counted
        _record("f", "acme", "101", end + 10, 60.0),  # next month
        _record("g", "acme", "101", start - 100, 60.0),  # previous month
        _record("h", "globex", "200", T0, 12.0),  # 18 s
    ]
    ledger = CdrLedger(tmp_path / "cdr", fsync=False, clock=lambda: T0)
    async with ledger:
        for record in records:
            await ledger.append(record)
    await store.add_minutes("acme", "101", MONTH, 9999)  # stale figures are replaced

    summary = await rebuild_minutes(store, tmp_path / "cdr", MONTH, BillingPolicy())
    assert summary["records"] == 6
    assert summary["emergency"] == 1
    assert summary["counted"] == 4
    assert summary["account_seconds"] == {"acme": 108, "globex": 18}
    assert await store.minutes("acme", "101", MONTH) == (78, 108)
    assert await store.minutes("acme", "102", MONTH) == (30, 108)
    assert await store.minutes("globex", "200", MONTH) == (18, 18)
    assert month_of(T0) == MONTH

    coarse = tally_minutes(records, MONTH, BillingPolicy(increment=60, minimum=60))
    assert (coarse.records, coarse.emergency, coarse.counted) == (6, 1, 4)
    assert coarse.accounts == {"acme": 180, "globex": 60}
    assert coarse.lines == {"acme": {"101": 120, "102": 60}, "globex": {"200": 60}}
    external_only = tally_minutes(records, MONTH, counted_classifications={"internal"})
    assert external_only.accounts == {}
    with pytest.raises(FileNotFoundError):
        await rebuild_minutes(store, tmp_path / "missing", MONTH)
    with pytest.raises(ValueError):
        await rebuild_minutes(store, tmp_path / "cdr", "2026-3")


def test_rebuilt_minutes_count_outbound_calls_only() -> None:
    from fairuse.rebuild import tally_minutes
    from switch.cdr import CallRecord

    def record(call_id: str, direction: str, classification: str = "external") -> CallRecord:
        return CallRecord.for_call(
            call_id=call_id, account="acme", device="101", caller="101",
            callee_dialled="0478000000", callee_e164="+33478000000",
            classification=classification, trunk="orange", start=T0, answer=T0 + 1,
            end=T0 + 61, end_cause="normal", hangup_by="caller", sip_status=200,
            direction=direction)

    records = [record("out", "outbound"), record("in", "inbound"),
               record("int", "internal", "internal"), record("legacy", "")]
    tally = tally_minutes(records, MONTH)
    assert tally.counted == 2  # the outbound call and the legacy record without a direction

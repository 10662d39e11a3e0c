"""Fair-use admission cost: what deciding whether an outgoing call may leave costs the
switch, with 10 and with 10,000 destination rules, and how many Redis round trips one
call makes.

Issue 5's benchmark (not a test). Every outgoing INVITE gets one admission decision
before the callee's leg is created, so its cost is added to every call's setup time.
Three measures, each run with ``rules`` = 10 and 10,000:

1. **Destination rules** (``DestinationRules.check``: blacklisted prefixes and countries,
   the account's exceptions, operator prefix classes, international calling, refused
   classes) and the whole **decision** (``fairuse.admission.decide``: the same plus
   concurrency, minute quotas and the seven call-pattern thresholds), in process, over
   ``decisions`` calls to a fixed mix of numbers (below).
2. **FairUseService.admit end to end** with the in-memory store: the policy lookup, the
   minute counters, the pattern counters (one attempt recorded), the decision and the
   concurrency leases (account and device); then ``call_ended`` for the admitted calls
   (lease released, minutes and the call's end counted).
3. The same with **Redis**: a private ``redis-server`` on a free loopback port (no
   persistence), started here and stopped by its PID, behind the store the switch builds
   for ``store.backend: redis`` (Redis with a local fallback; its once-a-second probe is
   not started: it is not per call), and on the Redis store alone (``redis direct``) to
   show what the fallback's bookkeeping adds. Round trips are counted on the client (each
   request or pipeline written to the socket is one) and commands on the server (``INFO
   commandstats`` before and after each step), over a run where every call is admitted.

Each measure runs half its calls with 10 rules, then 10,000, then 10,000 again, then 10
(A B B A), so that neither table size always runs first on a machine that warms up and
that other work shares.

Rules: ``rules`` blacklisted E.164 prefixes (a handful that hit numbers of the mix, the
rest random prefixes 5 to 10 digits long that share their first digits with the mix's
numbers, so lookups walk deep into a dense table), as many operator prefix classes, and
``rules / 10`` blacklist exception prefixes for the measured account. The mix: 130
numbers, French fixed, mobile, toll-free, shared-cost, premium and short numbers, and
international numbers (GB, US, DE, ES, IT, JM, +881), some blacklisted by prefix or by
country, some with an exception; the plan allows international calls, so every check is
reached. Calls are spread over ``accounts`` accounts so that no account reaches a
call-rate threshold. Logging is filtered to errors during the runs (the switch logs each
refusal at info: that is the logger's cost, not the decision's). Times come from
``time.perf_counter_ns`` around each call; the timer's own cost is given.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import shutil
import socket
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from fairuse.admission import AdmissionCounters, decide
from fairuse.patterns import PatternCounters
from fairuse.policy import FairUse
from fairuse.service import FairUseService
from fairuse.store import FallbackFairUseStore, MemoryFairUseStore, RedisFairUseStore
from switch.dialplan import Destination, DestinationKind, DialPlan

from .procs import LOOPBACK, BenchError, stop_pid

RULE_COUNTS = (10, 10_000)
ACCOUNT = "acme"
DEVICE = "101"
SEED = 5
REDIS_START_TIMEOUT_S = 10.0


class Plan:
    """How many decisions and calls each measure runs."""

    def __init__(self, quick: bool) -> None:
        self.decisions = 2_000 if quick else 20_000
        self.service_calls = 2_000 if quick else 20_000
        self.redis_calls = 1_000 if quick else 10_000
        self.round_trip_calls = 200 if quick else 1_000
        self.accounts = 5_000


# --------------------------------------------------------------------------------------
# The numbers and the rules
# --------------------------------------------------------------------------------------


def _numbers(rng: random.Random) -> list[str]:
    """The mix of dialled numbers (E.164, and two French short numbers)."""

    def some(prefix: str, width: int, count: int) -> list[str]:
        return [prefix + "".join(rng.choice("0123456789") for _ in range(width))
                for _ in range(count)]

    return [
        *some("+3314000", 4, 30),   # Paris fixed (some reclassified premium by prefix)
        *some("+3314000900", 1, 5),  # the operator's premium range
        *some("+3361234", 4, 20),   # mobile
        *some("+338001234", 2, 5),  # toll free: not counted
        *some("+338201234", 2, 3),  # shared cost: not counted
        *some("+338991234", 2, 5),  # premium rate: refused
        "3010", "3949",             # short numbers
        *some("+44207946", 4, 10),  # GB: +4420794 6 blacklisted, +44207946 1 excepted
        *some("+1202555", 4, 10),   # US
        *some("+4930123", 4, 10),   # DE: +49301234 blacklisted
        *some("+3491234", 4, 10),   # ES
        *some("+390612", 6, 10),    # IT
        *some("+1876234", 4, 5),    # JM: blacklisted country
        *some("+8816123", 5, 5),    # +881 (global satellite): blacklisted prefix
    ]


DELIBERATE_BLACKLIST = ["+4420794", "+49301234", "+881"]
DELIBERATE_EXCEPTIONS = ["+442079461"]
DELIBERATE_CLASSES = {"+3314000900": "premium_rate", "+3361234": "mobile"}


def _fillers(rng: random.Random, count: int, digits: list[str], taken: set[str]) -> list[str]:
    """``count`` random prefixes sharing their first 2 to 5 digits with the mix's numbers
    and matching none of them."""
    found: list[str] = []
    attempts = 0
    while len(found) < count:
        attempts += 1
        if attempts > count * 50:
            raise BenchError("could not generate enough distinct filler prefixes")
        source = rng.choice(digits)
        keep = rng.randint(2, min(5, len(source) - 1))
        length = rng.randint(max(5, keep + 1), 10)
        prefix = source[:keep] + "".join(rng.choice("0123456789")
                                         for _ in range(length - keep))
        if prefix[0] == "0" or prefix in taken or any(n.startswith(prefix) for n in digits):
            continue
        taken.add(prefix)
        found.append("+" + prefix)
    return found


def build_fair_use(rules: int, numbers: list[str]) -> tuple[FairUse, dict[str, Any]]:
    """The ``fair_use`` section with ``rules`` blacklisted prefixes and prefix classes and
    ``rules // 10`` exception prefixes; also what it holds and how long loading took."""
    rng = random.Random(SEED + rules)
    digits = [n.lstrip("+") for n in numbers if n.startswith("+")]
    taken = {p.lstrip("+") for p in (*DELIBERATE_BLACKLIST, *DELIBERATE_EXCEPTIONS,
                                       *DELIBERATE_CLASSES)}
    blacklist = DELIBERATE_BLACKLIST + _fillers(
        rng, max(0, rules - len(DELIBERATE_BLACKLIST)), digits, taken)
    classes = dict(DELIBERATE_CLASSES)
    for prefix in _fillers(rng, max(0, rules - len(classes)), digits, taken):
        classes[prefix] = rng.choice(["premium_rate", "shared_cost", "toll_free", "voip"])
    exceptions = DELIBERATE_EXCEPTIONS + _fillers(
        rng, max(0, rules // 10 - len(DELIBERATE_EXCEPTIONS)), digits, taken)
    section = {
        "default_plan": "bench",
        "plans": {"bench": {
            "concurrency": {"account": 1000, "device": 100},
            "destinations": {"international": True},
        }},
        "blacklist": {"countries": ["JM", "CK", "NU", "TV", "NR"], "prefixes": blacklist},
        "prefix_classes": classes,
        "accounts": {ACCOUNT: {"plan": "bench",
                               "blacklist_exceptions": {"prefixes": exceptions}}},
    }
    started = time.perf_counter()
    fair_use = FairUse.model_validate(section)
    load_ms = (time.perf_counter() - started) * 1000
    return fair_use, {
        "rules": rules,
        "blacklist_prefixes": len(fair_use.tables.blacklist_prefixes),
        "prefix_classes": len(fair_use.tables.prefix_classes),
        "exception_prefixes": len(exceptions),
        "policy_load_ms": round(load_ms, 1),
    }


def destinations(numbers: list[str]) -> list[Destination]:
    plan = DialPlan("FR")
    found = [plan.classify(n) for n in numbers]
    bad = [d.dialled for d in found if d.kind is not DestinationKind.EXTERNAL]
    if bad:
        raise BenchError(f"numbers of the mix that are not external: {bad}")
    return found


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def summary(samples_ns: list[int]) -> dict[str, float]:
    """p50, p90, p99, mean and max of nanosecond samples, in microseconds."""
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)

    def rank(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "p50_us": round(rank(0.50) / 1000, 2),
        "p90_us": round(rank(0.90) / 1000, 2),
        "p99_us": round(rank(0.99) / 1000, 2),
        "mean_us": round(sum(ordered) / len(ordered) / 1000, 2),
        "max_us": round(ordered[-1] / 1000, 1),
    }


def timer_overhead_ns(rounds: int = 20_000) -> int:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(rounds):
        start = clock()
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2]


def _counters(rng: random.Random, numbers: list[str]) -> AdmissionCounters:
    """What the store could say about a busy but well-behaved account."""
    return AdmissionCounters(
        line_seconds=60 * 1200,
        account_seconds=60 * 9000,
        patterns=PatternCounters(
            calls_last_second=1, calls_last_minute=6, calls_today=180,
            distinct_last_hour=25, distinct_this_month=900,
            recent_numbers=tuple(rng.choice(numbers) for _ in range(20)),
            answered_calls=120, short_calls=9,
        ),
        at=datetime.now(UTC),
    )


class Samples:
    """Raw timings (ns) of one measure, gathered over several rounds, and the outcomes."""

    def __init__(self) -> None:
        self.times: dict[str, list[int]] = {}
        self.outcomes: Counter[str] = Counter()

    def add(self, name: str, elapsed_ns: int) -> None:
        self.times.setdefault(name, []).append(elapsed_ns)

    def result(self) -> dict[str, Any]:
        found: dict[str, Any] = {name: summary(values) for name, values in self.times.items()}
        found["outcomes"] = dict(self.outcomes.most_common())
        return found


def measure_decisions(fair_use: FairUse, sequence: list[Destination],
                      counters: AdmissionCounters, samples: Samples) -> None:
    """``DestinationRules.check`` then ``decide`` on every destination of ``sequence``."""
    policy = fair_use.resolve(ACCOUNT, DEVICE, None, users=10, home_country="FR")
    check = policy.destinations.check
    clock = time.perf_counter_ns
    for destination in sequence[:500]:  # warm up
        check(destination)
        decide(policy, destination, counters)
    gc.collect()
    for destination in sequence:
        start = clock()
        check(destination)
        samples.add("destination_check", clock() - start)
    gc.collect()
    for destination in sequence:
        start = clock()
        admission = decide(policy, destination, counters)
        samples.add("decide", clock() - start)
        samples.outcomes[admission.limit if not admission.allowed else "allowed"] += 1


async def measure_service(fair_use: FairUse, store: Any, sequence: list[Destination],
                          accounts: list[str], calls: int, samples: Samples,
                          tag: str = "") -> None:
    """``admit`` for ``calls`` calls (the mix), ``call_ended`` for the admitted ones."""
    service = FairUseService(fair_use, store, country="FR", lease_ttl=60.0,
                             users=lambda account_id: 10)
    for account in accounts:
        service.policy(account, DEVICE, None)  # the policy cache, as in a running switch
    clock = time.perf_counter_ns
    gc.collect()
    for index in range(calls):
        call_id = f"bench-{tag}-{index}"
        destination = sequence[index % len(sequence)]
        start = clock()
        admission = await service.admit(call_id, accounts[index % len(accounts)], DEVICE,
                                        None, destination)
        samples.add("admit", clock() - start)
        samples.outcomes[admission.limit if not admission.allowed else "allowed"] += 1
        if admission.allowed:
            start = clock()
            await service.call_ended(call_id, duration=42.0, start=time.time())
            samples.add("call_ended", clock() - start)
    if service.leases:
        raise BenchError(f"{len(service.leases)} leases left after every call ended")


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private redis-server on a free loopback port, stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is not installed (apt-get install redis-server)")
        self.port = _free_tcp_port()
        self.log = workdir / "redis.log"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir),
             "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
        )
        import redis

        self.admin = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2.0)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            try:
                self.admin.ping()
                break
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"redis-server did not answer PING on {self.port}"
                                     f" (log: {self.log})") from None
                time.sleep(0.05)
        self.version = str(self.admin.info("server").get("redis_version", ""))

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command_counts(self) -> Counter[str]:
        stats = self.admin.info("commandstats")
        return Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                        for name, value in stats.items() if name != "cmdstat_info"})

    def stop(self) -> None:
        self.admin.close()
        stop_pid(self.process.pid)


class RoundTrips:
    """Counts requests written to Redis by the asyncio client: one per command, one per
    pipeline (MULTI ... EXEC included), i.e. one per network round trip."""

    def __init__(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.count = 0
        self._class = AbstractConnection
        self._original = AbstractConnection.send_packed_command
        original, counter = self._original, self

        async def counted(connection: Any, command: Any, check_health: bool = True) -> None:
            counter.count += 1
            await original(connection, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]

    def close(self) -> None:
        self._class.send_packed_command = self._original  # type: ignore[method-assign]


def _redis_store(url: str) -> FallbackFairUseStore:
    """What ``store.backend: redis`` builds (``fairuse.store.create_fairuse_store``)."""
    return FallbackFairUseStore(RedisFairUseStore(url, "bench:", "bench-node"),
                                MemoryFairUseStore())


async def measure_round_trips(fair_use: FairUse, server: RedisServer, sequence: list[Destination],
                              accounts: list[str], calls: int) -> dict[str, Any]:
    """Round trips and commands per admitted call: admit, then call_ended."""
    allowed = [d for d in sequence if d.e164 and d.e164.startswith("+3361234")]
    store = _redis_store(server.url)
    service = FairUseService(fair_use, store, country="FR", lease_ttl=60.0,
                             users=lambda account_id: 10)
    trips = RoundTrips()
    try:
        # connect and load the Lua scripts first: not per call
        await service.admit("warm-up", accounts[0], DEVICE, None, allowed[0])
        await service.call_ended("warm-up", duration=42.0, start=time.time())
        admit_trips = end_trips = 0
        admit_commands: Counter[str] = Counter()
        end_commands: Counter[str] = Counter()
        for index in range(calls):
            call_id = f"trips-{index}"
            before, commands = trips.count, server.command_counts()
            admission = await service.admit(call_id, accounts[index % len(accounts)], DEVICE,
                                            None, allowed[index % len(allowed)])
            if not admission.allowed:
                raise BenchError(f"a call of the round-trip run was refused: {admission}")
            middle, middle_commands = trips.count, server.command_counts()
            await service.call_ended(call_id, duration=42.0, start=time.time())
            after, after_commands = trips.count, server.command_counts()
            admit_trips += middle - before
            end_trips += after - middle
            admit_commands.update(middle_commands - commands)
            end_commands.update(after_commands - middle_commands)
    finally:
        trips.close()
        await service.close()
    return {
        "calls": calls,
        "admit": round(admit_trips / calls, 2),
        "call_ended": round(end_trips / calls, 2),
        "total": round((admit_trips + end_trips) / calls, 2),
        "commands_admit": round(sum(admit_commands.values()) / calls, 2),
        "commands_call_ended": round(sum(end_commands.values()) / calls, 2),
        "commands_by_name": {
            name: round(count / calls, 2)
            for name, count in (admit_commands + end_commands).most_common()
        },
        "degraded": store.degraded,
    }


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------


def _abba(rules: tuple[int, ...]) -> list[tuple[int, int]]:
    """(rules, half) rounds in the order A B B A: neither table size always runs first
    (the machine warms up, other work on it comes and goes)."""
    return [(rules[0], 0), (rules[-1], 0), (rules[-1], 1), (rules[0], 1)]


def _halves(items: list[Any], half: int) -> list[Any]:
    middle = len(items) // 2
    return items[:middle] if half == 0 else items[middle:]


def run_fairuse(quick: bool, workdir: Path) -> dict[str, Any]:
    plan = Plan(quick)
    rng = random.Random(SEED)
    numbers = _numbers(rng)
    mix = destinations(numbers)
    sequence = [rng.choice(mix) for _ in range(plan.decisions)]
    accounts = [ACCOUNT] + [f"customer{n}" for n in range(1, plan.accounts)]
    counters = _counters(rng, numbers)
    results: dict[str, Any] = {
        "plan": {"decisions": plan.decisions, "service_calls": plan.service_calls,
                 "redis_calls": plan.redis_calls, "round_trip_calls": plan.round_trip_calls,
                 "accounts": plan.accounts, "numbers_in_mix": len(numbers),
                 "order": "ABBA: each measure runs half its calls with 10 rules, then 10,000,"
                          " then 10,000 again, then 10"},
        "timer_overhead_ns": timer_overhead_ns(),
    }
    tables: dict[int, tuple[FairUse, dict[str, Any]]] = {
        rules: build_fair_use(rules, numbers) for rules in RULE_COUNTS}
    measures = ("decisions", "service_memory", "service_redis", "service_redis_direct")
    samples = {(rules, name): Samples() for rules in RULE_COUNTS for name in measures}
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    server: RedisServer | None = None
    round_trips: dict[int, dict[str, Any]] = {}
    try:
        server = RedisServer(workdir)
        results["redis_version"] = server.version
        for rules, half in _abba(RULE_COUNTS):
            fair_use = tables[rules][0]
            tag = f"{rules}-{half}"
            print(f"bench: fairuse: {rules} rules, round {half + 1}/2: decisions, memory"
                  " store, redis store", flush=True)
            measure_decisions(fair_use, _halves(sequence, half), counters,
                              samples[rules, "decisions"])
            calls = plan.service_calls // 2
            asyncio.run(measure_service(
                fair_use, MemoryFairUseStore(), _halves(sequence, half), accounts, calls,
                samples[rules, "service_memory"], tag))
            for name, direct in (("service_redis", False), ("service_redis_direct", True)):
                server.admin.flushall()
                asyncio.run(_redis_service(
                    fair_use, server.url, _halves(sequence, half), accounts,
                    plan.redis_calls // 2, samples[rules, name], tag, direct=direct))
        for rules in RULE_COUNTS:
            server.admin.flushall()
            print(f"bench: fairuse: {rules} rules: Redis round trips per call", flush=True)
            round_trips[rules] = asyncio.run(measure_round_trips(
                tables[rules][0], server, sequence, accounts, plan.round_trip_calls))
    finally:
        structlog.reset_defaults()
        if server is not None:
            server.stop()
    runs = []
    for rules in RULE_COUNTS:
        run = dict(tables[rules][1])
        run.update(samples[rules, "decisions"].result())
        for name in measures[1:]:
            run[name] = samples[rules, name].result()
        run["round_trips"] = round_trips[rules]
        runs.append(run)
    results["runs"] = runs
    small, large = runs[0], runs[-1]
    pairs = [
        ("destination_check", small["destination_check"], large["destination_check"]),
        ("decide", small["decide"], large["decide"]),
        *((f"admit_{name.removeprefix('service_')}", small[name]["admit"],
           large[name]["admit"]) for name in measures[1:]),
    ]
    results["flatness"] = {
        f"{name}_{stat}": round(big[f"{stat}_us"] / little[f"{stat}_us"], 2)
        for name, little, big in pairs for stat in ("p50", "p99") if little[f"{stat}_us"]
    }
    return results


async def _redis_service(fair_use: FairUse, url: str, sequence: list[Destination],
                         accounts: list[str], calls: int, samples: Samples, tag: str,
                         *, direct: bool = False) -> None:
    """The service on Redis: through the fallback store the switch builds, or (``direct``)
    on the Redis store alone, to show what the fallback's bookkeeping costs."""
    store: Any = (RedisFairUseStore(url, "bench:", "bench-node") if direct
                  else _redis_store(url))
    try:
        await (store if direct else store.primary).ping()  # connect before timing
        await measure_service(fair_use, store, sequence, accounts, calls, samples, tag)
        if not direct and store.degraded:
            raise BenchError("the Redis store fell back to local counters during the run")
    finally:
        await store.close()

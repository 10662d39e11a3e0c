"""Fair-use counter stores: concurrency leases, monthly minutes and call-pattern counters.

What the fair-use policy counts, shared by every switch node that handles an account's
calls:

* **Concurrency leases.** Each admitted call (an INVITE that passed the policy) holds one
  lease, identified by its SIP Call-ID, in every scope it counts against: the account,
  the calling device (line) and the trunk, for instance. A lease has an expiry that the
  node holding the call refreshes while the dialog lives (every ``ttl / 3``), and it is
  released exactly once when the call ends, whatever the ending (BYE after answer,
  CANCEL, a failure response, a media timeout, a duration cut). A node that crashes stops
  refreshing, so its leases lapse within ``ttl`` instead of holding slots forever.
  Admission is all or nothing: the call gets a slot in every scope or in none.
* **Monthly minutes.** Billable seconds per account and per line, per calendar month
  ("YYYY-MM", UTC). They are derived from the CDR ledger, so ``fairuse.rebuild`` can set
  them again after Redis lost its data.
* **Pattern counters.** Call attempts per second, minute and day, distinct destinations
  per hour and month, the last numbers dialled and the share of short calls today: the
  raw signals the policy uses to spot toll fraud (IRSF, wangiri call-backs) and dialers.

Stores:

* :class:`MemoryFairUseStore`, the embedded default: dicts with an expiry heap for leases,
  per-second buckets and a small HyperLogLog for distinct destinations, and an LRU of
  accounts that drops idle ones, so memory stays bounded with millions of accounts.
* :class:`RedisFairUseStore`, shared by several switch processes. Admission is one Lua
  script (one sorted set of Call-IDs per scope, scored by expiry; expired members removed,
  every scope checked, then added to all or none). Every key has a TTL. Lease keys carry
  the ``{fu}`` hash tag (one admission touches several scopes, so they share a cluster
  slot); per-account keys carry ``{fu:<account>}``.
* :class:`FallbackFairUseStore`: Redis first; when Redis is unreachable it answers from a
  local :class:`MemoryFairUseStore`, says so (``degraded``, one log event per transition,
  an ``on_state_change`` callback for metrics and readiness) and never raises for it. A
  periodic ping brings it back to Redis, where the leases held meanwhile are re-asserted
  and the minutes counted meanwhile are added.

Time is injected: ``now`` is wall-clock epoch seconds (all nodes must agree on it, NTP),
as lease expiries are compared across nodes. Emergency calls are never refused here:
record them with ``enforce=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

__all__ = [
    "NO_LIMIT",
    "FairUseStore",
    "FallbackFairUseStore",
    "LeaseResult",
    "MemoryFairUseStore",
    "PatternCounters",
    "RedisFairUseStore",
    "create_fairuse_store",
    "month_of",
    "scope_name",
]

log = structlog.get_logger("fairuse.store")

#: A limit that never refuses: pass it for a scope that is counted but not limited.
NO_LIMIT = 1 << 40
#: How many recently dialled numbers are kept per account.
RECENT_NUMBERS = 20
#: Seconds of per-second attempt buckets behind ``calls_last_minute``.
MINUTE_WINDOW = 60
#: Monthly minute counters outlive their month by a little over a billing cycle.
MINUTES_TTL_SECONDS = 70 * 86400
#: Pattern keys in Redis (recent numbers, monthly distinct destinations).
MONTH_PATTERN_TTL_SECONDS = 35 * 86400
DAY_TTL_SECONDS = 2 * 86400
HOUR_TTL_SECONDS = 2 * 3600
SECOND_TTL_SECONDS = MINUTE_WINDOW + 1

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MONTH = re.compile(r"^(?P<year>[0-9]{4})-(?P<month>0[1-9]|1[0-2])$")
_NODE_FIELD = "@node"  # the lease hash's field naming the node; no scope name starts with @

T = TypeVar("T")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LeaseResult:
    """The outcome of one admission.

    ``counts`` maps each scope's name (``"kind:id"``, see :func:`scope_name`) to its number
    of live leases afterwards (this call included when granted). When refused,
    ``refused_scope`` is the kind of the first full scope ("account", "device", "trunk"
    ...) and ``refused_id`` its id; nothing was taken anywhere.
    """

    granted: bool
    refused_scope: str | None
    counts: dict[str, int]
    refused_id: str | None = None


@dataclass(slots=True, frozen=True)
class PatternCounters:
    """Raw call-pattern signals of one account at ``now`` (UTC calendar buckets).

    ``calls_last_second`` counts attempts in the current whole second, ``calls_last_minute``
    in the 60 whole seconds ending with it; ``calls_today`` since 00:00 UTC;
    ``distinct_destinations_hour`` / ``_month`` are (HyperLogLog) estimates for the current
    clock hour and calendar month; ``recent_numbers`` oldest first (the last one is the
    newest attempt). The short-call share is
    ``short_calls_today / ended_calls_today`` (0.0 before any call ended today).
    """

    calls_last_second: int = 0
    calls_last_minute: int = 0
    calls_today: int = 0
    distinct_destinations_hour: int = 0
    distinct_destinations_month: int = 0
    recent_numbers: list[str] = field(default_factory=list)
    short_calls_share_today: float = 0.0
    ended_calls_today: int = 0
    short_calls_today: int = 0


def scope_name(kind: str, scope_id: str) -> str:
    """``"device:acme/101"``: the name of a concurrency scope in counts and keys."""
    return f"{kind}:{scope_id}"


def month_of(now: float) -> str:
    """The calendar month ("YYYY-MM", UTC) of an epoch timestamp."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def _day_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")


def _hour_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H")


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    return value


def _check_now(now: Any) -> float:
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


def _check_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    if not math.isfinite(ttl):
        raise ValueError("ttl must be finite")
    return float(ttl)


def _check_month(month: Any) -> str:
    if not isinstance(month, str) or not _MONTH.match(month):
        raise ValueError(f"month must look like 'YYYY-MM', not {month!r}")
    return month


def _check_seconds(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of seconds >= 0, not {value!r}")
    return value


def _check_scopes(scopes: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Validated scopes, duplicates (same kind and id) merged keeping the lowest limit."""
    if isinstance(scopes, str | bytes) or not scopes:
        raise ValueError("scopes must be a non-empty list of (kind, id, limit)")
    merged: dict[str, tuple[str, str, int]] = {}
    for entry in scopes:
        if not isinstance(entry, tuple | list) or len(entry) != 3:
            raise ValueError(f"a scope must be (kind, id, limit), not {entry!r}")
        kind, scope_id, limit = entry
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"scope kind must be a lower-case word, not {kind!r}")
        _check_text("scope id", scope_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit of {kind}:{scope_id} must be an integer >= 0")
        name = scope_name(kind, scope_id)
        if name in merged:
            limit = min(limit, merged[name][2])
        merged[name] = (kind, scope_id, limit)
    return list(merged.values())


def _check_duration(duration: Any, threshold: float | None, default: float) -> float:
    """The short-call threshold to apply, after checking the call's duration."""
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise ValueError(f"duration_seconds must be a number, not {duration!r}")
    if not duration >= 0 or not math.isfinite(duration):
        raise ValueError(f"duration_seconds must be finite and >= 0, not {duration!r}")
    if threshold is None:
        return default
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
        raise ValueError(f"short_call_seconds must be a number >= 0, not {threshold!r}")
    return float(threshold)


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


class FairUseStore(ABC):
    """Counters behind the fair-use policy. All methods are coroutines."""

    @abstractmethod
    async def acquire(
        self,
        call_id: str,
        scopes: Sequence[tuple[str, str, int]],
        ttl: float,
        now: float,
        *,
        enforce: bool = True,
    ) -> LeaseResult:
        """Take a concurrency slot for ``call_id`` in every scope ``(kind, id, limit)``, or
        in none. A scope is full when it holds ``limit`` live leases. Idempotent: the same
        Call-ID again keeps its slots (and extends their expiry to ``now + ttl``). With
        ``enforce=False`` (emergency calls) the lease is recorded whatever the counts."""

    @abstractmethod
    async def refresh(self, call_id: str, ttl: float, now: float) -> bool:
        """Extend a live lease to ``now + ttl`` in all its scopes. False when it is not
        held (released, or lapsed because it was not refreshed in time)."""

    @abstractmethod
    async def release(self, call_id: str) -> bool:
        """Free the call's slots everywhere. True the first time; a second release of the
        same Call-ID is a no-op returning False."""

    @abstractmethod
    async def active(self, scope_kind: str, scope_id: str, now: float) -> int:
        """Number of live leases in one scope."""

    @abstractmethod
    async def add_minutes(
        self, account_id: str, line_id: str, month: str, billable_seconds: int
    ) -> None:
        """Add a finished call's billable seconds to its line and account for ``month``."""

    @abstractmethod
    async def minutes(self, account_id: str, line_id: str, month: str) -> tuple[int, int]:
        """``(line_seconds, account_seconds)`` billed in ``month``."""

    @abstractmethod
    async def set_minutes(
        self, account_id: str, month: str, account_seconds: int, line_seconds: Mapping[str, int]
    ) -> None:
        """Replace an account's counters for ``month`` (used by the rebuild from CDRs)."""

    @abstractmethod
    async def record_attempt(
        self, account_id: str, dialled_e164: str, now: float
    ) -> PatternCounters:
        """Count one call attempt of the account towards a destination number, and return
        the account's counters with this attempt included (one atomic step)."""

    @abstractmethod
    async def record_call_end(
        self,
        account_id: str,
        duration_seconds: float,
        now: float,
        *,
        short_call_seconds: float | None = None,
    ) -> None:
        """Count one answered call that ended after ``duration_seconds`` (answer to end);
        one shorter than ``short_call_seconds`` (default: the store's) counts as short."""

    @abstractmethod
    async def pattern_counters(self, account_id: str, now: float) -> PatternCounters:
        """The account's call-pattern signals at ``now``."""

    @abstractmethod
    async def ping(self) -> None:
        """Raise if the store cannot be reached (never for the memory store)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and tasks."""


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


class _DistinctCounter:
    """Distinct destinations: an exact set while small, then a HyperLogLog with 1024
    one-byte registers (about 3 % standard error, 1 kB however many numbers)."""

    __slots__ = ("_small", "_registers")

    EXACT_UP_TO = 32
    _P = 10
    _M = 1 << _P
    _ALPHA = 0.7213 / (1 + 1.079 / _M)

    def __init__(self) -> None:
        self._small: set[int] | None = set()
        self._registers: bytearray | None = None

    @staticmethod
    def _hash(value: str) -> int:
        # 64 bits of the process's (seeded) string hash, mixed so low bits are uniform.
        h = hash(value) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 33
        return h

    def add(self, value: str) -> None:
        h = self._hash(value)
        if self._small is not None:
            self._small.add(h)
            if len(self._small) <= self.EXACT_UP_TO:
                return
            small, self._small = self._small, None
            self._registers = bytearray(self._M)
            for item in small:
                self._add_hash(item)
            return
        self._add_hash(h)

    def _add_hash(self, h: int) -> None:
        registers = self._registers
        assert registers is not None
        index = h & (self._M - 1)
        rest = h >> self._P
        rank = (64 - self._P) - rest.bit_length() + 1
        if rank > registers[index]:
            registers[index] = rank

    def count(self) -> int:
        if self._small is not None:
            return len(self._small)
        registers = self._registers
        assert registers is not None
        zeros = registers.count(0)
        estimate = self._ALPHA * self._M * self._M / sum(2.0**-r for r in registers)
        if estimate <= 2.5 * self._M and zeros:
            estimate = self._M * math.log(self._M / zeros)
        return int(round(estimate))


class _AccountActivity:
    """One account's pattern state in memory; everything in it is bounded."""

    __slots__ = (
        "last_seen", "seconds", "day", "attempts_today", "ended_today", "short_today",
        "hour", "hour_distinct", "month", "month_distinct", "recent",
    )  # fmt: skip

    def __init__(self) -> None:
        self.last_seen = 0.0
        self.seconds: deque[list[int]] = deque(maxlen=MINUTE_WINDOW)  # [second, attempts]
        self.day = ""
        self.attempts_today = 0
        self.ended_today = 0
        self.short_today = 0
        self.hour = ""
        self.hour_distinct = _DistinctCounter()
        self.month = ""
        self.month_distinct = _DistinctCounter()
        self.recent: deque[str] = deque(maxlen=RECENT_NUMBERS)

    def roll_day(self, now: float) -> None:
        day = _day_of(now)
        if day != self.day:
            self.day, self.attempts_today, self.ended_today, self.short_today = day, 0, 0, 0


@dataclass(slots=True)
class _MemoryLease:
    scopes: set[str]
    expires_at: float


class MemoryFairUseStore(FairUseStore):
    """In-process counters (the ``make run`` default). Each method runs without awaiting,
    so each is atomic on the event loop.

    Leases are swept through an expiry heap. Pattern state lives in an LRU of accounts:
    an account not seen for ``idle_seconds`` is dropped, and at most ``max_accounts`` are
    kept (the least recently active go first). Minute counters are kept for the newest
    month seen and the ``keep_months`` before it.
    """

    _HEAP_SLACK = 1024

    def __init__(
        self,
        *,
        max_accounts: int = 200_000,
        idle_seconds: float = 35 * 86400.0,
        short_call_seconds: float = 10.0,
        keep_months: int = 2,
    ) -> None:
        if max_accounts < 1:
            raise ValueError("max_accounts must be at least 1")
        if not idle_seconds > 0:
            raise ValueError("idle_seconds must be positive")
        if keep_months < 0:
            raise ValueError("keep_months must not be negative")
        self.max_accounts = max_accounts
        self.idle_seconds = float(idle_seconds)
        self.short_call_seconds = float(short_call_seconds)
        self.keep_months = keep_months
        self._leases: dict[str, _MemoryLease] = {}
        self._scopes: dict[str, set[str]] = {}
        self._heap: list[tuple[float, str]] = []
        # month -> account -> {"": account seconds, line: line seconds}
        self._minutes: dict[str, dict[str, dict[str, int]]] = {}
        self._activity: OrderedDict[str, _AccountActivity] = OrderedDict()

    # ---- leases -------------------------------------------------------------------------

    def _drop_lease(self, call_id: str, lease: _MemoryLease) -> None:
        del self._leases[call_id]
        for name in lease.scopes:
            members = self._scopes.get(name)
            if members is not None:
                members.discard(call_id)
                if not members:
                    del self._scopes[name]

    def _sweep(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, call_id = heapq.heappop(heap)
            lease = self._leases.get(call_id)
            if lease is not None and lease.expires_at == when:
                self._drop_lease(call_id, lease)

    def _schedule(self, call_id: str, expires_at: float) -> None:
        heapq.heappush(self._heap, (expires_at, call_id))
        if len(self._heap) > 2 * len(self._leases) + self._HEAP_SLACK:
            self._heap = [(lease.expires_at, cid) for cid, lease in self._leases.items()]
            heapq.heapify(self._heap)

    async def acquire(
        self,
        call_id: str,
        scopes: Sequence[tuple[str, str, int]],
        ttl: float,
        now: float,
        *,
        enforce: bool = True,
    ) -> LeaseResult:
        _check_text("call_id", call_id)
        checked = _check_scopes(scopes)
        ttl, now = _check_ttl(ttl), _check_now(now)
        self._sweep(now)
        counts: dict[str, int] = {}
        refused: tuple[str, str] | None = None
        for kind, scope_id, limit in checked:
            name = scope_name(kind, scope_id)
            members = self._scopes.get(name, ())
            counts[name] = len(members)
            if enforce and refused is None and call_id not in members and len(members) >= limit:
                refused = (kind, scope_id)
        if refused is not None:
            return LeaseResult(False, refused[0], counts, refused[1])
        lease = self._leases.get(call_id)
        if lease is None:
            lease = self._leases[call_id] = _MemoryLease(set(), now + ttl)
        lease.expires_at = now + ttl
        for kind, scope_id, _ in checked:
            name = scope_name(kind, scope_id)
            members = self._scopes.setdefault(name, set())
            members.add(call_id)
            lease.scopes.add(name)
            counts[name] = len(members)
        self._schedule(call_id, lease.expires_at)
        return LeaseResult(True, None, counts)

    async def refresh(self, call_id: str, ttl: float, now: float) -> bool:
        ttl, now = _check_ttl(ttl), _check_now(now)
        self._sweep(now)
        lease = self._leases.get(call_id)
        if lease is None:
            return False
        lease.expires_at = now + ttl
        self._schedule(call_id, lease.expires_at)
        return True

    async def release(self, call_id: str) -> bool:
        lease = self._leases.get(call_id)
        if lease is None:
            return False
        self._drop_lease(call_id, lease)
        return True

    async def active(self, scope_kind: str, scope_id: str, now: float) -> int:
        self._sweep(_check_now(now))
        return len(self._scopes.get(scope_name(scope_kind, scope_id), ()))

    def lease_count(self, now: float) -> int:
        """Live leases held in this store (all scopes)."""
        self._sweep(now)
        return len(self._leases)

    def _lease_snapshot(self, call_id: str) -> tuple[list[str], float] | None:
        lease = self._leases.get(call_id)
        return None if lease is None else (sorted(lease.scopes), lease.expires_at)

    # ---- minutes ------------------------------------------------------------------------

    def _month_table(self, month: str) -> dict[str, dict[str, int]]:
        table = self._minutes.get(month)
        if table is None:
            table = self._minutes[month] = {}
            self._forget_old_months()
        return table

    def _forget_old_months(self) -> None:
        def index(month: str) -> int:
            match = _MONTH.match(month)
            assert match is not None
            return int(match["year"]) * 12 + int(match["month"])

        newest = max(index(m) for m in self._minutes)
        for month in [m for m in self._minutes if index(m) < newest - self.keep_months]:
            del self._minutes[month]

    async def add_minutes(
        self, account_id: str, line_id: str, month: str, billable_seconds: int
    ) -> None:
        _check_text("account_id", account_id)
        _check_text("line_id", line_id)
        _check_month(month)
        _check_seconds("billable_seconds", billable_seconds)
        counters = self._month_table(month).setdefault(account_id, {})
        counters[""] = counters.get("", 0) + billable_seconds
        counters[line_id] = counters.get(line_id, 0) + billable_seconds

    async def minutes(self, account_id: str, line_id: str, month: str) -> tuple[int, int]:
        _check_month(month)
        counters = self._minutes.get(month, {}).get(account_id, {})
        return counters.get(line_id, 0), counters.get("", 0)

    async def set_minutes(
        self, account_id: str, month: str, account_seconds: int, line_seconds: Mapping[str, int]
    ) -> None:
        _check_text("account_id", account_id)
        _check_month(month)
        _check_seconds("account_seconds", account_seconds)
        counters = {"": account_seconds}
        for line_id, seconds in line_seconds.items():
            counters[_check_text("line_id", line_id)] = _check_seconds("line seconds", seconds)
        self._month_table(month)[account_id] = counters

    def remember_minutes(
        self, account_id: str, line_id: str, month: str, line_seconds: int, account_seconds: int
    ) -> None:
        """Raise the local counters to figures read from a shared store (never lowers)."""
        counters = self._month_table(month).setdefault(account_id, {})
        counters[""] = max(counters.get("", 0), account_seconds)
        counters[line_id] = max(counters.get(line_id, 0), line_seconds)

    # ---- pattern counters ---------------------------------------------------------------

    def _touch(self, account_id: str, now: float) -> _AccountActivity:
        activity = self._activity.get(account_id)
        if activity is None:
            activity = self._activity[account_id] = _AccountActivity()
        else:
            self._activity.move_to_end(account_id)
        activity.last_seen = max(activity.last_seen, now)
        self._evict(now)
        return activity

    def _evict(self, now: float) -> None:
        activity = self._activity
        idle_before = now - self.idle_seconds
        while activity:
            oldest_id, oldest = next(iter(activity.items()))
            if len(activity) > self.max_accounts or oldest.last_seen <= idle_before:
                del activity[oldest_id]
            else:
                break

    @property
    def tracked_accounts(self) -> int:
        """Accounts whose pattern state is held in memory."""
        return len(self._activity)

    async def record_attempt(
        self, account_id: str, dialled_e164: str, now: float
    ) -> PatternCounters:
        _check_text("account_id", account_id)
        _check_text("dialled_e164", dialled_e164)
        now = _check_now(now)
        activity = self._touch(account_id, now)
        second = math.floor(now)
        if activity.seconds and activity.seconds[-1][0] == second:
            activity.seconds[-1][1] += 1
        else:
            activity.seconds.append([second, 1])
        activity.roll_day(now)
        activity.attempts_today += 1
        hour, month = _hour_of(now), month_of(now)
        if hour != activity.hour:
            activity.hour, activity.hour_distinct = hour, _DistinctCounter()
        if month != activity.month:
            activity.month, activity.month_distinct = month, _DistinctCounter()
        activity.hour_distinct.add(dialled_e164)
        activity.month_distinct.add(dialled_e164)
        activity.recent.append(dialled_e164)
        return self._counters(activity, now)

    async def record_call_end(
        self,
        account_id: str,
        duration_seconds: float,
        now: float,
        *,
        short_call_seconds: float | None = None,
    ) -> None:
        _check_text("account_id", account_id)
        now = _check_now(now)
        threshold = _check_duration(duration_seconds, short_call_seconds, self.short_call_seconds)
        activity = self._touch(account_id, now)
        activity.roll_day(now)
        activity.ended_today += 1
        if duration_seconds < threshold:
            activity.short_today += 1

    async def pattern_counters(self, account_id: str, now: float) -> PatternCounters:
        now = _check_now(now)
        self._evict(now)
        activity = self._activity.get(account_id)
        if activity is None:
            return PatternCounters()
        return self._counters(activity, now)

    @staticmethod
    def _counters(activity: _AccountActivity, now: float) -> PatternCounters:
        second = math.floor(now)
        last_second = sum(n for s, n in activity.seconds if s == second)
        last_minute = sum(n for s, n in activity.seconds if second - MINUTE_WINDOW < s <= second)
        today = activity.day == _day_of(now)
        attempts, ended, short = (
            (activity.attempts_today, activity.ended_today, activity.short_today)
            if today
            else (0, 0, 0)
        )
        return PatternCounters(
            calls_last_second=last_second,
            calls_last_minute=last_minute,
            calls_today=attempts,
            distinct_destinations_hour=(
                activity.hour_distinct.count() if activity.hour == _hour_of(now) else 0
            ),
            distinct_destinations_month=(
                activity.month_distinct.count() if activity.month == month_of(now) else 0
            ),
            recent_numbers=list(activity.recent),
            short_calls_share_today=short / ended if ended else 0.0,
            ended_calls_today=ended,
            short_calls_today=short,
        )

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._leases.clear()
        self._scopes.clear()
        self._heap.clear()
        self._minutes.clear()
        self._activity.clear()


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------

_LUA_ACQUIRE = r"""
-- KEYS[1]: the lease hash of the call; KEYS[2..]: one sorted set per scope
-- ARGV: call_id, now, expires_at, key_ttl_ms, enforce (1/0), node, then per scope:
--       scope name, limit
local call_id, now, expires_at = ARGV[1], ARGV[2], ARGV[3]
local key_ttl, enforce, node = tonumber(ARGV[4]), ARGV[5] == '1', ARGV[6]
local counts, refused = {}, 0
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local held = redis.call('ZSCORE', KEYS[i], call_id)
  local count = redis.call('ZCARD', KEYS[i])
  counts[i - 1] = count
  if enforce and refused == 0 and not held and count >= tonumber(ARGV[6 + 2 * (i - 1)]) then
    refused = i - 1
  end
end
if refused > 0 then
  return {0, refused, unpack(counts)}
end
for i = 2, #KEYS do
  counts[i - 1] = counts[i - 1] + redis.call('ZADD', KEYS[i], expires_at, call_id)
  if redis.call('PTTL', KEYS[i]) < key_ttl then redis.call('PEXPIRE', KEYS[i], key_ttl) end
  redis.call('HSET', KEYS[1], ARGV[5 + 2 * (i - 1)], '1')
end
redis.call('HSET', KEYS[1], '@node', node)
if redis.call('PTTL', KEYS[1]) < key_ttl then redis.call('PEXPIRE', KEYS[1], key_ttl) end
return {1, 0, unpack(counts)}
"""

_LUA_REFRESH = r"""
-- KEYS[1]: the lease hash; ARGV: scope key prefix, call_id, now, expires_at, key_ttl_ms
local prefix, call_id, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local expires_at, key_ttl = ARGV[4], tonumber(ARGV[5])
local live = 0
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if name ~= '@node' then
    local key = prefix .. name
    local score = redis.call('ZSCORE', key, call_id)
    if score and tonumber(score) > now then
      redis.call('ZADD', key, 'XX', expires_at, call_id)
      if redis.call('PTTL', key) < key_ttl then redis.call('PEXPIRE', key, key_ttl) end
      live = live + 1
    end
  end
end
if live == 0 then
  redis.call('DEL', KEYS[1])
else
  if redis.call('PTTL', KEYS[1]) < key_ttl then redis.call('PEXPIRE', KEYS[1], key_ttl) end
end
return live
"""

_LUA_RELEASE = r"""
-- KEYS[1]: the lease hash; ARGV: scope key prefix, call_id
local names = redis.call('HKEYS', KEYS[1])
if #names == 0 then return 0 end
for _, name in ipairs(names) do
  if name ~= '@node' then redis.call('ZREM', ARGV[1] .. name, ARGV[2]) end
end
redis.call('DEL', KEYS[1])
return 1
"""


def _key_ttl_ms(ttl: float) -> int:
    """Real-time TTL of lease keys: twice the lease's life plus a second of slack, so a
    key never vanishes before its members' expiry (scores) has passed."""
    return int(math.ceil(ttl * 2000)) + 1000


class RedisFairUseStore(FairUseStore):
    """Counters in Redis, shared by every switch node pointed at it.

    ``socket_timeout`` bounds every command (connect included) and no command is retried,
    so an unreachable Redis shows up as an exception within about that time; wrap the
    store in :class:`FallbackFairUseStore` to keep going on local counters then.
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = "softswitch:",
        node_id: str = "",
        *,
        socket_timeout: float = 0.25,
        short_call_seconds: float = 10.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://: {url!r}")
        self.node_id = node_id
        self.short_call_seconds = float(short_call_seconds)
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._prefix = key_prefix
        self._scope_prefix = f"{key_prefix}{{fu}}:scope:"
        self._lease_prefix = f"{key_prefix}{{fu}}:lease:"
        self._acquire_script = self._redis.register_script(_LUA_ACQUIRE)
        self._refresh_script = self._redis.register_script(_LUA_REFRESH)
        self._release_script = self._redis.register_script(_LUA_RELEASE)

    @property
    def redis(self) -> Any:
        """The underlying ``redis.asyncio`` client (for tests and admin tools)."""
        return self._redis

    def _account_key(self, account_id: str, suffix: str) -> str:
        return f"{self._prefix}{{fu:{account_id}}}:{suffix}"

    # ---- leases -------------------------------------------------------------------------

    async def acquire(
        self,
        call_id: str,
        scopes: Sequence[tuple[str, str, int]],
        ttl: float,
        now: float,
        *,
        enforce: bool = True,
    ) -> LeaseResult:
        _check_text("call_id", call_id)
        checked = _check_scopes(scopes)
        ttl, now = _check_ttl(ttl), _check_now(now)
        names = [scope_name(kind, scope_id) for kind, scope_id, _ in checked]
        keys = [self._lease_prefix + call_id] + [self._scope_prefix + name for name in names]
        args: list[str | int] = [
            call_id, repr(now), repr(now + ttl), _key_ttl_ms(ttl), int(enforce), self.node_id,
        ]  # fmt: skip
        for name, (_, _, limit) in zip(names, checked, strict=True):
            args += [name, limit]
        reply = await self._acquire_script(keys=keys, args=args)
        counts = {name: int(count) for name, count in zip(names, reply[2:], strict=True)}
        if int(reply[0]) == 1:
            return LeaseResult(True, None, counts)
        kind, scope_id, _ = checked[int(reply[1]) - 1]
        return LeaseResult(False, kind, counts, scope_id)

    async def refresh(self, call_id: str, ttl: float, now: float) -> bool:
        _check_text("call_id", call_id)
        ttl, now = _check_ttl(ttl), _check_now(now)
        args = [self._scope_prefix, call_id, repr(now), repr(now + ttl), _key_ttl_ms(ttl)]
        live = await self._refresh_script(keys=[self._lease_prefix + call_id], args=args)
        return int(live) > 0

    async def release(self, call_id: str) -> bool:
        _check_text("call_id", call_id)
        done = await self._release_script(
            keys=[self._lease_prefix + call_id], args=[self._scope_prefix, call_id]
        )
        return int(done) == 1

    async def active(self, scope_kind: str, scope_id: str, now: float) -> int:
        now = _check_now(now)
        key = self._scope_prefix + scope_name(scope_kind, scope_id)
        return int(await self._redis.zcount(key, f"({now!r}", "+inf"))

    # ---- minutes ------------------------------------------------------------------------

    async def add_minutes(
        self, account_id: str, line_id: str, month: str, billable_seconds: int
    ) -> None:
        _check_text("account_id", account_id)
        _check_text("line_id", line_id)
        _check_month(month)
        _check_seconds("billable_seconds", billable_seconds)
        key = self._account_key(account_id, f"min:{month}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "account", billable_seconds)
            pipe.hincrby(key, f"line:{line_id}", billable_seconds)
            pipe.expire(key, MINUTES_TTL_SECONDS)
            await pipe.execute()

    async def minutes(self, account_id: str, line_id: str, month: str) -> tuple[int, int]:
        _check_month(month)
        key = self._account_key(account_id, f"min:{month}")
        line, account = await self._redis.hmget(key, [f"line:{line_id}", "account"])
        return int(line or 0), int(account or 0)

    async def set_minutes(
        self, account_id: str, month: str, account_seconds: int, line_seconds: Mapping[str, int]
    ) -> None:
        _check_text("account_id", account_id)
        _check_month(month)
        _check_seconds("account_seconds", account_seconds)
        mapping: dict[str, int] = {"account": account_seconds}
        for line_id, seconds in line_seconds.items():
            _check_text("line_id", line_id)
            mapping[f"line:{line_id}"] = _check_seconds("line seconds", seconds)
        key = self._account_key(account_id, f"min:{month}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, MINUTES_TTL_SECONDS)
            await pipe.execute()

    # ---- pattern counters ---------------------------------------------------------------

    async def record_attempt(
        self, account_id: str, dialled_e164: str, now: float
    ) -> PatternCounters:
        _check_text("account_id", account_id)
        _check_text("dialled_e164", dialled_e164)
        now = _check_now(now)
        second_key = self._account_key(account_id, f"s:{math.floor(now)}")
        day_key = self._account_key(account_id, f"d:{_day_of(now)}")
        hour_key = self._account_key(account_id, f"h:{_hour_of(now)}")
        month_key = self._account_key(account_id, f"m:{month_of(now)}")
        recent_key = self._account_key(account_id, "recent")
        # One MULTI: the counts read back include this attempt and no half of another's.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(second_key)
            pipe.expire(second_key, SECOND_TTL_SECONDS)
            pipe.hincrby(day_key, "attempts", 1)
            pipe.expire(day_key, DAY_TTL_SECONDS)
            pipe.pfadd(hour_key, dialled_e164)
            pipe.expire(hour_key, HOUR_TTL_SECONDS)
            pipe.pfadd(month_key, dialled_e164)
            pipe.expire(month_key, MONTH_PATTERN_TTL_SECONDS)
            pipe.rpush(recent_key, dialled_e164)
            pipe.ltrim(recent_key, -RECENT_NUMBERS, -1)
            pipe.expire(recent_key, MONTH_PATTERN_TTL_SECONDS)
            self._queue_reads(pipe, account_id, now)
            replies = await pipe.execute()
        return self._counters_from(replies[-5:])

    async def record_call_end(
        self,
        account_id: str,
        duration_seconds: float,
        now: float,
        *,
        short_call_seconds: float | None = None,
    ) -> None:
        _check_text("account_id", account_id)
        now = _check_now(now)
        threshold = _check_duration(duration_seconds, short_call_seconds, self.short_call_seconds)
        day_key = self._account_key(account_id, f"d:{_day_of(now)}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(day_key, "ended", 1)
            if duration_seconds < threshold:
                pipe.hincrby(day_key, "short", 1)
            pipe.expire(day_key, DAY_TTL_SECONDS)
            await pipe.execute()

    def _queue_reads(self, pipe: Any, account_id: str, now: float) -> None:
        """Queue the five reads behind :class:`PatternCounters` on a pipeline."""
        second = math.floor(now)
        second_keys = [
            self._account_key(account_id, f"s:{s}")
            for s in range(second - MINUTE_WINDOW + 1, second + 1)
        ]
        pipe.mget(second_keys)
        pipe.hgetall(self._account_key(account_id, f"d:{_day_of(now)}"))
        pipe.pfcount(self._account_key(account_id, f"h:{_hour_of(now)}"))
        pipe.pfcount(self._account_key(account_id, f"m:{month_of(now)}"))
        pipe.lrange(self._account_key(account_id, "recent"), -RECENT_NUMBERS, -1)

    async def pattern_counters(self, account_id: str, now: float) -> PatternCounters:
        _check_text("account_id", account_id)
        now = _check_now(now)
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_reads(pipe, account_id, now)
            replies = await pipe.execute()
        return self._counters_from(replies)

    @staticmethod
    def _counters_from(replies: Sequence[Any]) -> PatternCounters:
        per_second, day, hour_distinct, month_distinct, recent = replies
        ended, short = int(day.get("ended", 0)), int(day.get("short", 0))
        return PatternCounters(
            calls_last_second=int(per_second[-1] or 0),
            calls_last_minute=sum(int(n or 0) for n in per_second),
            calls_today=int(day.get("attempts", 0)),
            distinct_destinations_hour=int(hour_distinct),
            distinct_destinations_month=int(month_distinct),
            recent_numbers=list(recent),
            short_calls_share_today=short / ended if ended else 0.0,
            ended_calls_today=ended,
            short_calls_today=short,
        )

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


# --------------------------------------------------------------------------------------
# Redis with a local fallback
# --------------------------------------------------------------------------------------


class _Failed:
    """Marker: the primary store did not answer."""


_FAILED = _Failed()


@dataclass(slots=True)
class _HeldLease:
    scopes: list[tuple[str, str, int]]
    ttl: float
    expires_at: float
    in_primary: bool


class FallbackFairUseStore(FairUseStore):
    """Redis when it answers, local counters when it does not; never raises for Redis.

    Every lease, minute and attempt is also counted in ``local``, so when Redis becomes
    unreachable this node goes on with what it knows: its own live calls (admission then
    checks limits against this node's calls only), the minute totals it last read from
    Redis plus its own since, and its own call patterns. ``degraded`` is True meanwhile;
    each transition is logged once and reported to ``on_state_change(degraded)``.

    A background task (:meth:`start`) pings Redis every ``probe_interval`` seconds. When
    the ping succeeds again, the leases this node holds are re-asserted in Redis (without
    limit checks: those calls are up), and the minutes counted while degraded are added
    there; then Redis answers again. Minutes beyond ``max_pending_minutes`` accounts
    during an outage are left to the rebuild from CDRs (``fairuse.rebuild``).
    """

    def __init__(
        self,
        primary: RedisFairUseStore,
        local: MemoryFairUseStore,
        *,
        on_state_change: Callable[[bool], None] | None = None,
        probe_interval: float = 1.0,
        operation_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
        max_pending_minutes: int = 100_000,
    ) -> None:
        if not probe_interval > 0 or not operation_timeout > 0:
            raise ValueError("probe_interval and operation_timeout must be positive")
        self.primary = primary
        self.local = local
        self.on_state_change = on_state_change
        self.probe_interval = float(probe_interval)
        self.operation_timeout = float(operation_timeout)
        self.clock = clock
        self.max_pending_minutes = max_pending_minutes
        self.degraded = False
        self._held: dict[str, _HeldLease] = {}
        self._pending_minutes: dict[tuple[str, str, str], int] = {}
        self._probe_task: asyncio.Task[None] | None = None
        self._recovering = False

    # ---- state --------------------------------------------------------------------------

    def _set_degraded(self, degraded: bool, reason: str = "") -> None:
        if degraded == self.degraded:
            return
        self.degraded = degraded
        if degraded:
            log.warning("fairuse.redis_unreachable", reason=reason, fallback="local counters")
        else:
            log.info("fairuse.redis_restored", leases=len(self._held))
        if self.on_state_change is not None:
            try:
                self.on_state_change(degraded)
            except Exception as exc:  # a callback's bug must not stop call handling
                log.error("fairuse.state_callback_failed", error=repr(exc))

    async def _on_primary(self, operation: Callable[[], Awaitable[T]]) -> T | _Failed:
        """Run one Redis operation unless degraded; a failure degrades and gives _FAILED."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self.degraded:
            return _FAILED
        try:
            return await asyncio.wait_for(operation(), self.operation_timeout)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            self._set_degraded(True, f"{type(exc).__name__}: {exc}")
        except RedisError as exc:  # answered, but not as expected: use local this time
            log.error("fairuse.redis_error", error=f"{type(exc).__name__}: {exc}")
        return _FAILED

    async def start(self) -> None:
        """Start the periodic Redis ping (idempotent)."""
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe_loop(), name="fairuse-probe")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.probe()
            except Exception as exc:  # the loop must survive anything
                log.error("fairuse.probe_failed", error=repr(exc))

    async def probe(self) -> bool:
        """Ping Redis once: degrade on failure, recover on success. True when healthy."""
        self._forget_stale_leases(self.clock())
        try:
            await asyncio.wait_for(self.primary.ping(), self.operation_timeout)
        except Exception as exc:
            self._set_degraded(True, f"{type(exc).__name__}: {exc}")
            return False
        if self.degraded and not self._recovering:
            self._recovering = True
            try:
                recovered = await self._recover()
            finally:
                self._recovering = False
            if not recovered:
                return False
            self._set_degraded(False)
        return not self.degraded

    async def _recover(self) -> bool:
        now = self.clock()
        try:
            for call_id, held in list(self._held.items()):
                if held.expires_at <= now:
                    continue
                result = await asyncio.wait_for(
                    self.primary.acquire(
                        call_id, held.scopes, held.expires_at - now, now, enforce=False
                    ),
                    self.operation_timeout,
                )
                held.in_primary = result.granted
            while self._pending_minutes:
                (account_id, line_id, month), seconds = next(iter(self._pending_minutes.items()))
                await asyncio.wait_for(
                    self.primary.add_minutes(account_id, line_id, month, seconds),
                    self.operation_timeout,
                )
                del self._pending_minutes[(account_id, line_id, month)]
        except Exception as exc:
            log.warning("fairuse.redis_recovery_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _forget_stale_leases(self, now: float) -> None:
        for call_id in [c for c, held in self._held.items() if held.expires_at <= now]:
            del self._held[call_id]

    # ---- leases -------------------------------------------------------------------------

    async def acquire(
        self,
        call_id: str,
        scopes: Sequence[tuple[str, str, int]],
        ttl: float,
        now: float,
        *,
        enforce: bool = True,
    ) -> LeaseResult:
        _check_text("call_id", call_id)
        checked = _check_scopes(scopes)
        ttl, now = _check_ttl(ttl), _check_now(now)
        result = await self._on_primary(
            lambda: self.primary.acquire(call_id, checked, ttl, now, enforce=enforce)
        )
        if isinstance(result, LeaseResult):
            if result.granted:
                await self.local.acquire(call_id, checked, ttl, now, enforce=False)
                self._held[call_id] = _HeldLease(checked, ttl, now + ttl, True)
            return result
        local = await self.local.acquire(call_id, checked, ttl, now, enforce=enforce)
        if local.granted:
            held = self._held.get(call_id)
            in_primary = held is not None and held.in_primary
            self._held[call_id] = _HeldLease(checked, ttl, now + ttl, in_primary)
        return local

    async def refresh(self, call_id: str, ttl: float, now: float) -> bool:
        ttl, now = _check_ttl(ttl), _check_now(now)
        local = await self.local.refresh(call_id, ttl, now)
        held = self._held.get(call_id)
        if held is None:
            refreshed = await self._on_primary(lambda: self.primary.refresh(call_id, ttl, now))
            return refreshed is True or local
        held.ttl, held.expires_at = ttl, now + ttl
        if held.in_primary:
            refreshed = await self._on_primary(lambda: self.primary.refresh(call_id, ttl, now))
            if refreshed is False:  # Redis lost it (restarted empty): the call is up, record it
                again = await self._on_primary(
                    lambda: self.primary.acquire(call_id, held.scopes, ttl, now, enforce=False)
                )
                held.in_primary = isinstance(again, LeaseResult) and again.granted
        return True

    async def release(self, call_id: str) -> bool:
        _check_text("call_id", call_id)
        held = self._held.pop(call_id, None)
        local = await self.local.release(call_id)
        if held is not None and not held.in_primary and not self.degraded:
            # granted locally during an outage and never re-asserted: nothing in Redis
            return True
        primary = await self._on_primary(lambda: self.primary.release(call_id))
        if isinstance(primary, _Failed):
            # Unreachable: the Redis lease (if any) lapses at its expiry, never refreshed.
            return held is not None or local
        return primary or held is not None or local

    async def active(self, scope_kind: str, scope_id: str, now: float) -> int:
        count = await self._on_primary(lambda: self.primary.active(scope_kind, scope_id, now))
        if isinstance(count, int):
            return count
        return await self.local.active(scope_kind, scope_id, now)

    # ---- minutes ------------------------------------------------------------------------

    async def add_minutes(
        self, account_id: str, line_id: str, month: str, billable_seconds: int
    ) -> None:
        await self.local.add_minutes(account_id, line_id, month, billable_seconds)
        done = await self._on_primary(
            lambda: self.primary.add_minutes(account_id, line_id, month, billable_seconds)
        )
        if isinstance(done, _Failed):
            key = (account_id, line_id, month)
            if (
                key in self._pending_minutes
                or len(self._pending_minutes) < self.max_pending_minutes
            ):
                self._pending_minutes[key] = self._pending_minutes.get(key, 0) + billable_seconds
            else:
                log.warning("fairuse.pending_minutes_dropped", account=account_id, month=month)

    async def minutes(self, account_id: str, line_id: str, month: str) -> tuple[int, int]:
        figures = await self._on_primary(lambda: self.primary.minutes(account_id, line_id, month))
        if isinstance(figures, tuple):
            self.local.remember_minutes(account_id, line_id, month, figures[0], figures[1])
            return figures
        return await self.local.minutes(account_id, line_id, month)

    async def set_minutes(
        self, account_id: str, month: str, account_seconds: int, line_seconds: Mapping[str, int]
    ) -> None:
        await self.local.set_minutes(account_id, month, account_seconds, line_seconds)
        await self._on_primary(
            lambda: self.primary.set_minutes(account_id, month, account_seconds, line_seconds)
        )

    # ---- pattern counters ---------------------------------------------------------------

    async def record_attempt(
        self, account_id: str, dialled_e164: str, now: float
    ) -> PatternCounters:
        local = await self.local.record_attempt(account_id, dialled_e164, now)
        shared = await self._on_primary(
            lambda: self.primary.record_attempt(account_id, dialled_e164, now)
        )
        return shared if isinstance(shared, PatternCounters) else local

    async def record_call_end(
        self,
        account_id: str,
        duration_seconds: float,
        now: float,
        *,
        short_call_seconds: float | None = None,
    ) -> None:
        await self.local.record_call_end(
            account_id, duration_seconds, now, short_call_seconds=short_call_seconds
        )
        await self._on_primary(
            lambda: self.primary.record_call_end(
                account_id, duration_seconds, now, short_call_seconds=short_call_seconds
            )
        )

    async def pattern_counters(self, account_id: str, now: float) -> PatternCounters:
        counters = await self._on_primary(lambda: self.primary.pattern_counters(account_id, now))
        if isinstance(counters, PatternCounters):
            return counters
        return await self.local.pattern_counters(account_id, now)

    async def ping(self) -> None:
        return None  # answers in every state

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        await self.primary.close()
        await self.local.close()


def create_fairuse_store(
    backend: str,
    redis_url: str = "",
    key_prefix: str = "softswitch:",
    node_id: str = "",
    *,
    on_state_change: Callable[[bool], None] | None = None,
) -> FairUseStore:
    """The store named by the settings: ``memory`` (default) or ``redis`` (Redis with a
    local fallback; call its ``start()`` to run the periodic ping)."""
    name = backend.strip().lower()
    if name == "memory":
        return MemoryFairUseStore()
    if name == "redis":
        if not redis_url:
            raise ValueError("the redis fair-use backend needs a redis_url")
        return FallbackFairUseStore(
            RedisFairUseStore(redis_url, key_prefix, node_id),
            MemoryFairUseStore(),
            on_state_change=on_state_change,
        )
    raise ValueError(f"unknown fair-use backend {backend!r} (expected 'memory' or 'redis')")

"""Lifecycle of a switch process: availability accounting and graceful shutdown.

Availability (so operators can check a 99 % service commitment)
    The switch is *available* while it takes calls: from the moment its SIP listeners are
    up until it starts draining for a shutdown. :class:`AvailabilityTracker` keeps those
    periods in a small state file (``availability.json`` beside the CDR directory, e.g.
    ``var/availability.json``), written atomically (temporary file, fsync, rename, fsync
    of the directory):

    * at start, a period opens; while it runs a heartbeat is written every 30 s;
    * at a clean stop (or when draining begins) the period closes at that instant;
    * after a crash (``kill -9``, power loss, OOM) the file still holds an open period:
      the next start closes it at its last heartbeat, so the time from then until the
      restart counts as unavailable (up to 30 s before the crash is counted down too:
      the accounting errs against the switch, never for it).

    Monthly availability follows the usual service-level definition::

        availability = (minutes of the month - minutes unavailable) / minutes of the month

    where "unavailable" is every moment of the month since accounting began (the first
    start with this state file) that no period covers — crashes, stops, restarts and
    drains alike (planned maintenance is not told apart). For the current month the
    moments still to come are not unavailable, so the figure can only go down as the month
    goes on; ``availability_so_far`` gives the ratio over the elapsed part instead.
    Periods older than 14 months are dropped from the file.

    Metrics: ``softswitch_uptime_seconds`` (since this process became available) and
    ``softswitch_availability_ratio`` (this UTC month, as above).

Graceful shutdown
    :func:`drain` is what the switch does on SIGTERM before it stops: new out-of-dialog
    INVITEs are answered ``503 Service Unavailable`` with ``Retry-After`` (a caller's
    phone or an upstream proxy can use another node), except emergency calls, which are
    still routed (EMERGENCY.md §3.3: emergency calls are never blocked). Calls in
    progress keep working — in-dialog requests, BYE, re-INVITE — until they end or until
    ``calls.shutdown_grace`` seconds have passed; the switch's ``stop()`` then hangs up
    whatever is left (cause ``shutdown``) and closes the CDR ledger and the emergency
    journal, which writes out everything pending. REGISTER is still served while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sip.message import make_response

if TYPE_CHECKING:
    from sip.message import SipRequest
    from sip.transaction import ServerTransaction

    from .app import Softswitch
    from .metrics import SwitchMetrics

__all__ = [
    "HEARTBEAT_SECONDS",
    "AvailabilityError",
    "AvailabilityTracker",
    "MonthAvailability",
    "ShutdownGate",
    "availability_path",
    "drain",
    "month_bounds",
    "month_of",
    "read_availability",
    "report_from_file",
    "state_in_use",
]

log = structlog.get_logger("switch.lifecycle")

STATE_VERSION = 1
STATE_NAME = "availability.json"
HEARTBEAT_SECONDS = 30.0
KEEP_SECONDS = 14 * 31 * 86400.0  # periods older than this are dropped from the file
RETRY_AFTER_SECONDS = 30  # what a 503 during a shutdown asks callers to wait
DRAIN_POLL_SECONDS = 0.05


class AvailabilityError(ValueError):
    """A month or state file that cannot be used (the message says why)."""


# --------------------------------------------------------------------------------------
# Months
# --------------------------------------------------------------------------------------


def month_of(timestamp: float) -> str:
    """``YYYY-MM`` of a UTC instant."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[float, float]:
    """(first instant, first instant of the next month) of a UTC ``YYYY-MM`` month."""
    try:
        year_text, month_text = month.split("-")
        if len(year_text) != 4 or len(month_text) != 2:
            raise ValueError
        year, number = int(year_text), int(month_text)
        start = datetime(year, number, 1, tzinfo=UTC)
        end = datetime(year + (number == 12), number % 12 + 1, 1, tzinfo=UTC)
        return start.timestamp(), end.timestamp()
    except (ValueError, OverflowError):
        raise AvailabilityError(f"not a month (YYYY-MM): {month!r}") from None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def availability_path(cdr_directory: Path | str) -> Path:
    """Where a switch with this CDR directory keeps its availability state."""
    return Path(cdr_directory).parent / STATE_NAME


# --------------------------------------------------------------------------------------
# The figures of a month
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MonthAvailability:
    month: str
    month_seconds: float
    monitored_seconds: float  # of the month, since accounting began, up to now
    unavailable_seconds: float
    outages: list[tuple[float, float]]  # (from, to) within the month, oldest first

    @property
    def ratio(self) -> float:
        """(minutes of the month - minutes unavailable) / minutes of the month."""
        return max(0.0, (self.month_seconds - self.unavailable_seconds) / self.month_seconds)

    @property
    def ratio_so_far(self) -> float | None:
        """Available share of the monitored part of the month (None before any)."""
        if self.monitored_seconds <= 0:
            return None
        return max(0.0, 1.0 - self.unavailable_seconds / self.monitored_seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "month": self.month,
            "minutes_in_month": round(self.month_seconds / 60.0, 3),
            "monitored_minutes": round(self.monitored_seconds / 60.0, 3),
            "unavailable_minutes": round(self.unavailable_seconds / 60.0, 3),
            "availability": round(self.ratio, 6),
            "availability_percent": round(self.ratio * 100.0, 4),
            "availability_so_far": (None if self.ratio_so_far is None
                                    else round(self.ratio_so_far, 6)),
            "outages": [{"from": _iso(start), "to": _iso(end),
                         "minutes": round((end - start) / 60.0, 3)}
                        for start, end in self.outages],
        }


def _merge(periods: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(p for p in periods if p[1] > p[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def compute_month(month: str, first_start: float | None,
                  periods: list[tuple[float, float]], now: float) -> MonthAvailability:
    """The figures of ``month`` from the available ``periods`` (closed, plus the running
    one up to ``now``), counting from ``first_start``."""
    low, high = month_bounds(month)
    window_start = max(low, first_start if first_start is not None else math.inf)
    window_end = min(high, now)
    outages: list[tuple[float, float]] = []
    unavailable = 0.0
    monitored = max(0.0, window_end - window_start)
    if monitored > 0:
        cursor = window_start
        for start, end in _merge(periods):
            start, end = max(start, window_start), min(end, window_end)
            if end <= start:
                continue
            if start > cursor:
                outages.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < window_end:
            outages.append((cursor, window_end))
        unavailable = sum(end - start for start, end in outages)
    return MonthAvailability(month, high - low, monitored, unavailable, outages)


# --------------------------------------------------------------------------------------
# The state file
# --------------------------------------------------------------------------------------


def _valid_period(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in value)
            and value[1] >= value[0])


def _parse_state(data: Any) -> dict[str, Any]:
    """The state as stored, checked; AvailabilityError naming the first problem."""
    if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
        raise AvailabilityError("not an availability state (version 1)")
    first = data.get("first_start")
    if first is not None and not (isinstance(first, int | float) and math.isfinite(first)):
        raise AvailabilityError("first_start must be a number")
    periods = data.get("periods", [])
    if not isinstance(periods, list) or not all(_valid_period(p) for p in periods):
        raise AvailabilityError("periods must be a list of [start, end] pairs")
    current = data.get("current")
    if current is not None:
        if not isinstance(current, dict):
            raise AvailabilityError("current must be an object or null")
        for key in ("start", "heartbeat"):
            value = current.get(key)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise AvailabilityError(f"current.{key} must be a number")
    return data


def read_availability(path: Path | str) -> dict[str, Any]:
    """The stored state (``{"v": 1, "first_start", "periods", "current", ...}``) of a
    state file, without changing it; an empty state when the file does not exist yet.
    AvailabilityError when it is unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"v": STATE_VERSION, "first_start": None, "periods": [], "current": None}
    except OSError as exc:
        raise AvailabilityError(f"{path}: {exc}") from None
    try:
        return _parse_state(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AvailabilityError(f"{path}: {exc}") from None


def state_in_use(path: Path | str) -> bool:
    """Whether a running switch holds the state file (its lock is taken)."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def report_from_file(path: Path | str, now: float, month: str | None = None
                     ) -> dict[str, Any]:
    """What ``python -m switch availability`` prints: the figures of ``month`` (this
    month by default) from a state file, read without changing it. A running period
    counts up to now when a switch holds the file, else (a crash not yet seen by a
    restart) up to its last heartbeat. AvailabilityError for a bad file or month."""
    state = read_availability(path)
    periods = [(float(a), float(b)) for a, b in state.get("periods", [])]
    current = state.get("current")
    running = current is not None and state_in_use(path)
    running_since = float(current["start"]) if running and current is not None else None
    if current is not None:
        start = float(current["start"])
        end = now if running else float(current["heartbeat"])
        periods.append((start, max(start, end)))
    figures = compute_month(month or month_of(now), state.get("first_start"), periods, now)
    return {
        "uptime_seconds": (None if running_since is None
                           else round(max(0.0, now - running_since), 3)),
        "running_since": _iso(running_since),
        "monitored_since": _iso(state.get("first_start")),
        "persistent": True,
        **figures.as_dict(),
    }


class AvailabilityTracker:
    """The availability periods of one switch, persisted in ``path`` (see the module
    docstring). ``open()`` at start, ``run()`` as a background task (heartbeats),
    ``close()`` at a stop (or when draining begins); ``report()`` for the API.

    A state file that is unreadable is moved aside (``.corrupt-<ms>``) and accounting
    starts afresh; one held by another switch process (same CDR parent directory) is left
    alone and this process keeps its figures in memory only. Write failures are logged,
    never raised: accounting never stops the switch."""

    def __init__(self, path: Path | str, *, metrics: SwitchMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.path = Path(path)
        self.clock = clock
        self.heartbeat_interval = float(heartbeat)
        self.first_start: float | None = None
        self.periods: list[tuple[float, float]] = []
        self.started_at: float | None = None  # the running period's start
        self.last_heartbeat: float | None = None
        self.persistent = True
        self.write_failures = 0
        self._lock_fd: int | None = None
        if metrics is not None:
            metrics.uptime_seconds.set_function(self.uptime)
            metrics.availability_ratio.set_function(self.current_ratio)

    # -- lifecycle ------------------------------------------------------------------------
    def open(self) -> tuple[float, float] | None:
        """Start a period now. Returns the outage found (from the last heartbeat of a run
        that did not stop cleanly, to now), or None."""
        now = self.clock()
        outage = None
        if self._lock():
            state = self._load()
            self.first_start = state.get("first_start")
            self.periods = [(float(a), float(b)) for a, b in state.get("periods", [])]
            current = state.get("current")
            if current is not None:  # the previous run crashed: it was up to its heartbeat
                start = float(current["start"])
                end = max(start, min(float(current["heartbeat"]), now))
                self.periods.append((start, end))
                outage = (end, now)
                log.warning("availability.unclean_stop", since=_iso(end),
                            down_seconds=round(now - end, 3), pid=current.get("pid"))
        if self.first_start is None:
            self.first_start = now
        self.started_at = now
        self.last_heartbeat = now
        self._prune(now)
        self._save()
        return outage

    def beat(self) -> None:
        """Record that the switch is up now (every ``heartbeat_interval`` from run())."""
        if self.started_at is None:
            return
        self.last_heartbeat = max(self.clock(), self.started_at)
        self._save()

    async def run(self) -> None:
        """Heartbeats until cancelled (a background task of the switch)."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await asyncio.to_thread(self.beat)
            except Exception:  # noqa: BLE001 - accounting never stops the switch
                log.exception("availability.heartbeat_failed")

    def close(self) -> None:
        """End the running period now (a clean stop, or draining begins). Idempotent."""
        if self.started_at is not None:
            now = max(self.clock(), self.started_at)
            self.periods.append((self.started_at, now))
            self.started_at = None
            self.last_heartbeat = None
            self._save()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- figures --------------------------------------------------------------------------
    def uptime(self) -> float:
        """Seconds since the running period began (0 when not running)."""
        if self.started_at is None:
            return 0.0
        return max(0.0, self.clock() - self.started_at)

    def month(self, month: str | None = None) -> MonthAvailability:
        now = self.clock()
        periods = list(self.periods)
        if self.started_at is not None:
            periods.append((self.started_at, max(now, self.started_at)))
        return compute_month(month or month_of(now), self.first_start, periods, now)

    def current_ratio(self) -> float:
        return self.month().ratio

    def report(self, month: str | None = None) -> dict[str, Any]:
        """The API's availability document (AvailabilityError for a bad month)."""
        figures = self.month(month)
        return {
            "uptime_seconds": round(self.uptime(), 3),
            "running_since": _iso(self.started_at),
            "monitored_since": _iso(self.first_start),
            "persistent": self.persistent,
            **figures.as_dict(),
        }

    # -- the file -------------------------------------------------------------------------
    def _lock(self) -> bool:
        """Take the state file's lock (a sibling ``.lock`` file); False when another
        process holds it (figures then stay in memory) or the directory is unusable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"),
                         os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.error("availability.state_unusable", path=str(self.path), error=str(exc))
            self.persistent = False
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("availability.state_in_use", path=str(self.path),
                        detail="another switch process keeps this file: figures of this"
                               " one are kept in memory only")
            self.persistent = False
            return False
        self._lock_fd = fd
        return True

    def _load(self) -> dict[str, Any]:
        try:
            return read_availability(self.path)
        except AvailabilityError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time() * 1000)}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.error("availability.state_unreadable", path=str(self.path), error=str(exc),
                      moved_to=aside.name)
            return {"v": STATE_VERSION, "first_start": None, "periods": [], "current": None}

    def _prune(self, now: float) -> None:
        self.periods = [p for p in _merge(self.periods) if p[1] >= now - KEEP_SECONDS]

    def _state(self) -> dict[str, Any]:
        current = None
        if self.started_at is not None:
            current = {"start": self.started_at,
                       "heartbeat": self.last_heartbeat or self.started_at,
                       "pid": os.getpid()}
        return {"v": STATE_VERSION, "first_start": self.first_start,
                "periods": [[round(a, 3), round(b, 3)] for a, b in self.periods],
                "current": current}

    def _save(self) -> None:
        if not self.persistent or self._lock_fd is None:
            return
        data = (json.dumps(self._state(), separators=(",", ":")) + "\n").encode()
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            self.write_failures += 1
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            log.error("availability.write_failed", path=str(self.path), error=str(exc))


# --------------------------------------------------------------------------------------
# Graceful shutdown
# --------------------------------------------------------------------------------------


class ShutdownGate:
    """While installed, the signalling core's INVITE handler answers new calls ``503``
    with ``Retry-After`` instead of routing them; emergency calls go through."""

    def __init__(self, switch: Softswitch, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        self.switch = switch
        self.retry_after = retry_after
        self.refused = 0
        self._routed: Callable[[SipRequest, ServerTransaction], None] | None = None

    def install(self) -> None:
        core = self.switch.core
        if self._routed is None:
            self._routed = core.invite_handler
            core.invite_handler = self._on_invite

    def _on_invite(self, request: SipRequest, transaction: ServerTransaction) -> None:
        calls = self.switch.calls
        if self._routed is not None and calls._dials_emergency(request):
            log.warning("call.emergency_while_draining", call_id=request.call_id)
            self._routed(request, transaction)
            return
        self.refused += 1
        self.switch.metrics.sip_requests_rejected.labels("INVITE", "503").inc()
        log.info("call.refused", call_id=request.call_id, status=503,
                 reason="shutting down", source=transaction.flow.remote[0])
        response = make_response(
            request, 503, "Service Unavailable (shutting down)",
            to_tag=secrets.token_hex(6),
            headers=[("Server", self.switch.server_header),
                     ("Retry-After", str(self.retry_after))])
        try:
            self.switch.core.respond(transaction, response)
        except Exception as exc:  # noqa: BLE001 - a transaction already answered
            log.info("calls.response_dropped", status=503, error=str(exc))


async def drain(switch: Softswitch, grace: float, *,
                interrupted: asyncio.Event | None = None) -> dict[str, Any]:
    """Refuse new calls (503, see :class:`ShutdownGate`) and wait until the calls in
    progress have ended, at most ``grace`` seconds or until ``interrupted`` is set (a
    second SIGTERM). Availability stops counting the switch as up. Returns what happened
    (calls at the start, left at the end, seconds waited, INVITEs refused)."""
    gate = ShutdownGate(switch)
    gate.install()
    tracker = getattr(switch, "availability", None)
    if tracker is not None:
        tracker.close()
    active = switch.calls.calls
    at_start = len(active)
    started = time.monotonic()
    deadline = started + max(0.0, grace)
    log.info("switch.draining", calls=len(active), grace_seconds=grace)
    while active and time.monotonic() < deadline:
        if interrupted is not None and interrupted.is_set():
            break
        await asyncio.sleep(min(DRAIN_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    outcome = {"calls_at_start": at_start, "calls_left": len(active),
               "waited_seconds": round(time.monotonic() - started, 3),
               "invites_refused": gate.refused}
    log.info("switch.drained", calls_left=outcome["calls_left"],
             waited_seconds=outcome["waited_seconds"], invites_refused=gate.refused)
    return outcome

"""Memory per active call: N SIP calls held open at once through the switch (and through
the Sippy B2BUA, the reference), and the resident memory they add.

A SIPp caller (``sipp/uac_call_digest_hold.xml``: INVITE, 407, ACK, INVITE with
credentials, 180, 200, ACK, then a pause before the BYE) sets up N calls at a fixed rate
to a SIPp callee (``sipp/uas_answer.xml``) through the switch (``media: {backend: none}``:
no relay, the SDP passes through), and holds each one long enough that all N are
established at the same time. VmRSS of the server (``/proc/PID/status``) is read before
the first call, right after the last call is established (the calls' transactions are
still alive: Timer H/J/L keep them 32 s) and again ``settle_seconds`` later (only the
dialogs and the calls remain). RSS growth divided by N is the memory per active call.
Then every caller hangs up (BYE) and RSS is read once more. Sippy gets the same calls
without the 407 (``uac_call_plain_hold.xml``). Every process is stopped by its PID and
every wait is bounded.

RSS growth can be masked in the switch: CPython keeps the heap freed after loading the
configuration and reuses it for the calls. So the switch runs under
``tests/bench/heap_probe.py`` and, once the first N calls have ended, holds N more calls
with allocation tracing on (SIGUSR1 before the first call, SIGUSR2 at the settled
reading): the heap still allocated then, divided by N, is the traced memory per call.
Tracing inflates RSS, so the RSS figures come from the first, untraced, round only.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .calls import (
    CALLEE_SCENARIO,
    SippyProcess,
    _stats_rows,
    caller_row,
    calls_config_text,
    ensure_sippy,
    register_contacts,
    start_callee,
    stop_process,
    write_call_injection,
)
from .configs import device_users
from .procs import LOOPBACK, BenchError, SwitchProcess, free_udp_port, rss_bytes
from .register import _log_errors
from .sipp import SCENARIO_DIR, SOCKET_BUFFER

HOLD_CALLER_SCENARIO = SCENARIO_DIR / "uac_call_digest_hold.xml"
PLAIN_HOLD_CALLER_SCENARIO = SCENARIO_DIR / "uac_call_plain_hold.xml"
# after SIPp has created the last call: time for it to be answered and acknowledged
ESTABLISH_GRACE_S = 3.0
# extra hold beyond the settled reading, so no call has ended when RSS is read
HOLD_MARGIN_S = 15.0
# RSS before the calls: the median of this many readings, SAMPLE_INTERVAL_S apart
BASELINE_READINGS = 5
SAMPLE_INTERVAL_S = 0.5


@dataclass
class CallMemoryPlan:
    """How many calls are held, how fast they are set up, how long RSS settles."""

    calls: int
    rate: int
    settle_seconds: float
    # few devices: a smaller configuration leaves less freed heap to mask RSS growth
    callers: int = 100

    @classmethod
    def full(cls) -> CallMemoryPlan:
        return cls(calls=2000, rate=50, settle_seconds=35.0)

    @classmethod
    def quick(cls) -> CallMemoryPlan:
        return cls(calls=200, rate=50, settle_seconds=35.0)

    @property
    def setup_seconds(self) -> float:
        return self.calls / self.rate

    @property
    def hold_seconds(self) -> float:
        """Each call's pause between ACK and BYE: the last call set up is still held when
        the settled reading is taken."""
        return self.setup_seconds + ESTABLISH_GRACE_S + self.settle_seconds + HOLD_MARGIN_S

    @property
    def wall_limit(self) -> float:
        """Hard limit of the SIPp caller: setup, hold, teardown, and slack."""
        return 2 * self.setup_seconds + self.hold_seconds + 60.0

    def criteria(self) -> dict:
        return {
            "calls": self.calls,
            "setup_rate": self.rate,
            "hold_seconds": round(self.hold_seconds, 1),
            "settle_seconds": self.settle_seconds,
            "call": ("INVITE -> 407 -> ACK, INVITE with credentials -> 180 -> 200 -> ACK, "
                     "held, BYE -> 200 (Sippy: no 407)"),
            "memory_per_call": ("(VmRSS with all calls established, settle_seconds after the "
                                "last one - VmRSS before the first) / calls"),
            "clean": ("every call completed on both sides, none failed, all N in progress at "
                      "both readings, the caller not killed at its wall-clock limit"),
        }


@dataclass
class HeldCalls:
    """What one server did with N held calls."""

    label: str
    calls: int
    rate: int
    rss_before: int = 0
    rss_established: int = 0
    rss_settled: int = 0
    rss_after_calls_ended: int = 0
    in_progress_at_established: int = 0
    in_progress_at_settled: int = 0
    established_after_s: float = 0.0
    ok: int = 0
    failed: int = 0
    retransmissions: int = 0
    callee_ok: int = 0
    callee_failed: int = 0
    killed_at_wall_limit: bool = False
    samples: list[tuple[float, int]] = field(default_factory=list)
    clean: bool = False
    problems: list[str] = field(default_factory=list)

    def per_call(self, rss: int) -> int | None:
        if not self.calls or not rss or not self.rss_before:
            return None
        return round((rss - self.rss_before) / self.calls)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["samples"] = [[round(t, 2), rss] for t, rss in self.samples]
        data["bytes_per_call"] = self.per_call(self.rss_settled)
        data["bytes_per_call_established"] = self.per_call(self.rss_established)
        data["bytes_per_call_after_calls_ended"] = self.per_call(self.rss_after_calls_ended)
        return data

    def summary(self) -> str:
        state = "clean" if self.clean else "NOT clean: " + "; ".join(self.problems)
        per_call = self.per_call(self.rss_settled)
        return (f"[{self.label}] {self.calls} calls held: RSS {self.rss_before / 1048576:.1f} "
                f"-> {self.rss_established / 1048576:.1f} -> {self.rss_settled / 1048576:.1f} "
                f"MiB, {per_call if per_call is not None else '?'} bytes per call; ok={self.ok} "
                f"failed={self.failed} retrans={self.retransmissions} -> {state}")


def _last_int(rows: list[dict[str, str]], column: str) -> int | None:
    """The column of the last complete statistics row (SIPp may be writing the file)."""
    for row in reversed(rows):
        try:
            return int(row[column])
        except (KeyError, ValueError, TypeError):
            continue
    return None


def judge(held: HeldCalls) -> None:
    """Fill ``problems`` and ``clean`` (pure: reads only the counters)."""
    problems = held.problems
    if held.killed_at_wall_limit:
        problems.append("the caller was killed at its wall-clock limit")
    if held.failed:
        problems.append(f"{held.failed} failed")
    if held.callee_failed:
        problems.append(f"{held.callee_failed} failed at the callee")
    if held.ok < held.calls:
        problems.append(f"only {held.ok} of {held.calls} completed")
    for name, count in (("established", held.in_progress_at_established),
                        ("settled", held.in_progress_at_settled)):
        if count != held.calls:
            problems.append(f"{count} of {held.calls} calls in progress at the {name} reading")
    if not (held.rss_before and held.rss_established and held.rss_settled):
        problems.append("the server's RSS could not be read")
    held.clean = not problems


def hold_calls(
    *, label: str, plan: CallMemoryPlan, target: str, caller_scenario: Path, injection: Path,
    callee_port: int, server_pid: int, alive: Callable[[], bool],
    before_calls: Callable[[], None] | None = None,
    at_settled: Callable[[], None] | None = None,
) -> HeldCalls:
    """Set up ``plan.calls`` calls through ``target`` (pid ``server_pid``) to a SIPp callee
    on ``callee_port``, hold them, read the server's RSS before, with all established and
    settled, and after the BYEs. ``before_calls`` runs right after the RSS baseline,
    ``at_settled`` right after the settled reading (the heap probe's signals)."""
    if not target.startswith("127."):
        raise BenchError(f"refusing a non-loopback target {target!r}")
    held = HeldCalls(label=label, calls=plan.calls, rate=plan.rate)
    started = time.monotonic()

    def sample() -> int:
        rss = rss_bytes(server_pid)
        held.samples.append((time.monotonic() - started, rss))
        return rss

    baseline = []
    for _ in range(BASELINE_READINGS):
        baseline.append(sample())
        time.sleep(SAMPLE_INTERVAL_S)
    held.rss_before = int(statistics.median(baseline))
    if before_calls is not None:
        before_calls()
    with tempfile.TemporaryDirectory(prefix="bench-sipp-hold-") as tmp:
        folder = Path(tmp)
        caller_stats, callee_stats = folder / "caller.csv", folder / "callee.csv"
        callee = start_callee(scenario=CALLEE_SCENARIO, port=callee_port, calls=None,
                              workdir=folder, stats_path=callee_stats,
                              wall_limit=plan.wall_limit + 15)
        command = [
            "sipp", target, "-sf", str(caller_scenario), "-inf", str(injection),
            "-i", LOOPBACK, "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
            "-mp", str(free_udp_port()),
            "-m", str(plan.calls), "-r", str(plan.rate), "-rp", "1000",
            "-l", str(plan.calls + 10), "-d", str(int(plan.hold_seconds * 1000)),
            "-default_behaviors", "-abortunexp",
            "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(plan.wall_limit)),
            "-nostdin", "-trace_stat", "-stf", str(caller_stats), "-fd", "1",
        ]
        caller: subprocess.Popen | None = None
        try:
            # SIPp's screen goes to a file: a pipe nobody reads during the hold would fill
            # up and block it
            with open(folder / "caller.out", "wb") as screen:
                caller = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL,
                                          stdout=screen, stderr=subprocess.STDOUT)
            sipp_started = time.monotonic()
            deadline = sipp_started + plan.wall_limit
            # 1. until SIPp has created every call, then the grace for the last ones
            while time.monotonic() < deadline and caller.poll() is None:
                sample()
                created = _last_int(_stats_rows(caller_stats), "TotalCallCreated") or 0
                if created >= plan.calls:
                    break
                if not alive():
                    raise BenchError(f"{label}: the server died while the calls were set up")
                time.sleep(SAMPLE_INTERVAL_S)
            if caller.poll() is not None:
                raise BenchError(f"{label}: SIPp ended (exit {caller.returncode}) before "
                                 f"setting up {plan.calls} calls: "
                                 + (folder / "caller.out").read_text(errors="replace")[-600:])
            _sample_for(sample, ESTABLISH_GRACE_S)
            held.established_after_s = round(time.monotonic() - sipp_started, 1)
            held.rss_established = sample()
            held.in_progress_at_established = _in_progress(caller_stats)
            print(f"bench: [{label}] {held.in_progress_at_established} calls in progress, "
                  f"RSS {held.rss_established / 1048576:.1f} MiB; settling "
                  f"{plan.settle_seconds:g} s", flush=True)
            # 2. the settled reading, all calls still held
            _sample_for(sample, plan.settle_seconds)
            held.rss_settled = sample()
            if at_settled is not None:
                at_settled()
            held.in_progress_at_settled = _in_progress(caller_stats)
            # 3. the BYEs: wait for the caller to finish (bounded by its wall limit)
            while time.monotonic() < deadline and caller.poll() is None:
                sample()
                time.sleep(SAMPLE_INTERVAL_S)
            if caller.poll() is None:
                held.killed_at_wall_limit = True
                stop_process(caller)
            _sample_for(sample, 2.0)
            held.rss_after_calls_ended = sample()
        finally:
            if caller is not None and caller.poll() is None:  # interrupted or failed
                stop_process(caller)
            stop_process(callee, grace=2.0)
        rows, callee_rows = _stats_rows(caller_stats), _stats_rows(callee_stats)
    held.ok = _last_int(rows, "SuccessfulCall(C)") or 0
    held.failed = _last_int(rows, "FailedCall(C)") or 0
    held.retransmissions = _last_int(rows, "Retransmissions(C)") or 0
    held.callee_ok = _last_int(callee_rows, "SuccessfulCall(C)") or 0
    held.callee_failed = _last_int(callee_rows, "FailedCall(C)") or 0
    judge(held)
    print("bench:", held.summary(), flush=True)
    return held


def _sample_for(sample: Callable[[], int], seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sample()
        time.sleep(min(SAMPLE_INTERVAL_S, max(0.0, end - time.monotonic())))


def _in_progress(stats: Path) -> int:
    """Calls the caller has open (CurrentCall); statistics rows come every second, so
    wait for the next one."""
    time.sleep(1.1)
    return _last_int(_stats_rows(stats), "CurrentCall") or 0


# --------------------------------------------------------------------------------------
# the switch and Sippy
# --------------------------------------------------------------------------------------


def switch_callmemory(plan: CallMemoryPlan, workdir: Path) -> dict:
    port, callee_port = free_udp_port(), free_udp_port()
    config = workdir / "switch-callmemory.yaml"
    config.write_text(calls_config_text(port, plan.callers + 1))
    users = device_users(1, plan.callers + 1)
    callers, (callee_user, callee_password) = users[:-1], users[-1]
    callee_extension = str(1000 + plan.callers)
    injection = workdir / "callmemory-callers.csv"
    write_call_injection(
        injection, [caller_row(user, password, callee_extension) for user, password in callers]
    )
    switch = SwitchProcess(config, workdir / "switch-callmemory.log", port, heap_probe=True)
    switch.start(ready_timeout=120)
    target = f"{LOOPBACK}:{port}"
    print(f"bench: switch pid {switch.pid} (callmemory, media: none)", flush=True)
    heap: dict = {}

    def take_heap_report() -> None:
        heap.update(switch.heap_report())

    try:
        register_contacts(
            target=target, rows=[caller_row(callee_user, callee_password, callee_user)],
            contact_port=callee_port, workdir=workdir,
        )
        common = dict(plan=plan, target=target, caller_scenario=HOLD_CALLER_SCENARIO,
                      injection=injection, callee_port=callee_port, server_pid=switch.pid,
                      alive=switch.alive)
        held = hold_calls(label="switch", **common)
        time.sleep(2.0)
        traced = hold_calls(label="switch, heap traced", before_calls=switch.start_heap_trace,
                            at_settled=take_heap_report, **common)
    finally:
        switch.stop()
    result = held.as_dict()
    result.update(server="softswitch (one process), media backend none, CDR ledger on",
                  errors_in_log=_log_errors(switch.log_path),
                  heap_traced=traced_summary(traced, heap))
    return result


def traced_summary(traced: HeldCalls, heap: dict) -> dict:
    """The traced round: heap still allocated at the settled reading per held call."""
    traced_bytes = heap.get("traced_bytes")
    return {
        "clean": traced.clean,
        "problems": traced.problems,
        "calls": traced.calls,
        "ok": traced.ok,
        "in_progress_at_report": traced.in_progress_at_settled,
        "traced_bytes": traced_bytes,
        "bytes_per_call": (round(traced_bytes / traced.calls)
                           if isinstance(traced_bytes, int) and traced.calls else None),
        "by_file": heap.get("by_file") or [],
    }


def sippy_callmemory(plan: CallMemoryPlan, workdir: Path) -> dict:
    script = ensure_sippy()
    if script is None:
        return {"skipped": "the Sippy B2BUA could not be installed (pip install sippy)"}
    sippy = SippyProcess(script, workdir / "sippy-callmemory", free_udp_port(), free_udp_port())
    injection = workdir / "callmemory-sippy-callers.csv"
    write_call_injection(injection, [caller_row(user, password, "callee")
                                     for user, password in device_users(1, plan.callers)])
    sippy.start()
    print(f"bench: sippy b2bua pid {sippy.pid} (callmemory)", flush=True)
    try:
        held = hold_calls(
            label="sippy", plan=plan, target=f"{LOOPBACK}:{sippy.sip_port}",
            caller_scenario=PLAIN_HOLD_CALLER_SCENARIO, injection=injection,
            callee_port=sippy.route_port, server_pid=sippy.pid, alive=sippy.alive,
        )
    finally:
        sippy.stop()
    result = held.as_dict()
    result["server"] = "Sippy B2BUA 2.5 (PyPI sippy), static route, no auth, no accounting"
    return result


def run_callmemory(quick: bool, workdir: Path) -> dict:
    """The switch then Sippy; a server that cannot run records its error."""
    plan = CallMemoryPlan.quick() if quick else CallMemoryPlan.full()
    results: dict = {"criteria": plan.criteria()}
    for key, function in (("switch", switch_callmemory), ("sippy", sippy_callmemory)):
        if key != "switch":
            time.sleep(3.0)
        try:
            results[key] = function(plan, workdir)
        except BenchError as error:
            print(f"bench: callmemory {key}: {error}", file=sys.stderr, flush=True)
            results[key] = {"error": str(error)}
    switch = results["switch"].get("bytes_per_call") if results["switch"].get("clean") else None
    sippy = results["sippy"].get("bytes_per_call") if results["sippy"].get("clean") else None
    if switch and sippy:
        results["switch_to_sippy_ratio"] = round(switch / sippy, 3)
    return results

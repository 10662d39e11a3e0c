"""REGISTER scenarios: rate ramp against the switch and against Kamailio, memory per
binding at 100,000 registrations, and a py-spy profile of the switch at its clean rate."""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .configs import kamailio_users, write_switch_config
from .procs import (
    BenchError,
    KamailioProcess,
    SwitchProcess,
    ensure_kamailio,
    free_udp_port,
    peers_dir,
    rss_bytes,
)
from .sipp import MAX_RETRANSMISSION_SHARE, MIN_ACHIEVED_SHARE, SippRun, run_sipp, write_users_csv

KAMAILIO_PORT = 5080
# completed UDP server transactions live for Timer J = 64*T1 = 32 s: wait them out
# before reading memory
TRANSACTION_SETTLE_S = 35.0
# share of the highest clean rate used to register every device of the memory scenario
BULK_RATE_SHARE = 0.5
# the last bindings registered with allocation tracing on, at this share of the clean rate
TRACED_BINDINGS = 10_000
TRACED_RATE_SHARE = 0.25


@dataclass
class Plan:
    """How big and how long the runs are (``--quick`` shrinks everything)."""

    steps: list[int]
    step_seconds: float
    pause_between_steps_s: float
    ramp_accounts: int
    ramp_devices_per_account: int
    memory_accounts: int
    memory_devices_per_account: int
    settle_s: float
    profile_seconds: int
    # a clean short step is run again this long: completed transactions are kept for
    # Timer J (32 s), so only a run longer than that shows the steady state
    sustain_seconds: float
    # a step that is not clean is run again this many times before the ramp stops (the
    # machine is shared: one disturbed step should not end the ramp)
    retries_of_unclean_step: int = 1

    @classmethod
    def full(cls) -> Plan:
        return cls(
            steps=[250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000, 16000],
            step_seconds=6.0, pause_between_steps_s=5.0,
            ramp_accounts=10, ramp_devices_per_account=1000,
            memory_accounts=100, memory_devices_per_account=1000,
            settle_s=TRANSACTION_SETTLE_S, profile_seconds=10,
            sustain_seconds=60.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            steps=[500, 1000, 2000, 4000],
            step_seconds=3.0, pause_between_steps_s=3.0,
            ramp_accounts=2, ramp_devices_per_account=1000,
            memory_accounts=10, memory_devices_per_account=1000,
            settle_s=5.0, profile_seconds=5,
            sustain_seconds=15.0,
        )

    def criteria(self) -> dict:
        return {
            "step_seconds": self.step_seconds,
            "calls_per_step": "rate x step_seconds",
            "clean": (
                "0 failed, every registration completed, retransmissions <= "
                f"{100 * MAX_RETRANSMISSION_SHARE:.1f}% of requests sent, achieved >= "
                f"{100 * MIN_ACHIEVED_SHARE:.0f}% of offered"
            ),
            "stop": (
                f"at the first step that is not clean {1 + self.retries_of_unclean_step} "
                "times in a row"
            ),
        }


def _step_wall_limit(seconds: float) -> float:
    return 2 * seconds + 40.0


def _ramp(
    plan: Plan, *, label: str, target: str, users_csv: Path, watch: list[int], alive
) -> dict:
    """Offer each step's rate in turn; stop after the first step that is not clean."""
    steps: list[dict] = []
    best: SippRun | None = None
    for index, rate in enumerate(plan.steps):
        if index:
            time.sleep(plan.pause_between_steps_s)
        if not alive():
            raise BenchError(f"{label}: the server under test died before step {rate}/s")
        attempts = []
        for attempt in range(1 + plan.retries_of_unclean_step):
            if attempt:
                time.sleep(plan.pause_between_steps_s)
            run = run_sipp(
                label=f"{label} {rate}/s" + (f" (retry {attempt})" if attempt else ""),
                target=target, users_csv=users_csv, rate=rate,
                calls=int(rate * plan.step_seconds), watch=watch,
                wall_limit=_step_wall_limit(plan.step_seconds),
            )
            print("bench:", run.summary(), flush=True)
            attempts.append(run)
            if run.clean:
                break
        step = run.as_dict()
        step["cpu_ms_per_registration"] = _cpu_ms_per_registration(run)
        step["earlier_attempts"] = [earlier.as_dict() for earlier in attempts[:-1]]
        steps.append(step)
        if not run.clean:
            break
        best = run
    return {
        "steps": steps,
        "highest_clean_rate": best.offered_rate if best else 0,
        "achieved_at_highest_clean": round(best.achieved_rate, 1) if best else 0,
        "cpu_percent_at_highest_clean": round(best.target_cpu_percent, 1) if best else None,
        "cpu_ms_per_registration": _cpu_ms_per_registration(best) if best else None,
        "reached_last_step_cleanly": (bool(best) and len(steps) == len(plan.steps)
                                      and bool(steps[-1]["clean"])),
    }


def _sustain(
    plan: Plan, *, target: str, users_csv: Path, watch: list[int], best_rate: float, alive
) -> list[dict]:
    """The highest clean rate held for ``plan.sustain_seconds``; when that is not clean,
    half of it too."""
    runs: list[dict] = []
    for rate in (best_rate, best_rate / 2):
        if rate < 50 or not alive():
            break
        time.sleep(plan.settle_s)
        run = run_sipp(
            label=f"sustained {rate:.0f}/s for {plan.sustain_seconds:.0f} s", target=target,
            users_csv=users_csv, rate=rate, calls=int(rate * plan.sustain_seconds),
            watch=watch, wall_limit=_step_wall_limit(plan.sustain_seconds),
        )
        print("bench:", run.summary(), flush=True)
        runs.append(run.as_dict() | {"cpu_ms_per_registration": _cpu_ms_per_registration(run)})
        if run.clean:
            break
    return runs


def _cpu_ms_per_registration(run: SippRun) -> float | None:
    return round(1000.0 * run.target_cpu_s / run.ok, 4) if run.ok else None


# --------------------------------------------------------------------------------------
# 1. the switch
# --------------------------------------------------------------------------------------


def switch_ramp(plan: Plan, workdir: Path) -> dict:
    port = free_udp_port()
    config = workdir / "switch-ramp.yaml"
    users = write_switch_config(
        config, port=port, accounts=plan.ramp_accounts,
        devices_per_account=plan.ramp_devices_per_account,
    )
    users_csv = workdir / "switch-ramp-users.csv"
    write_users_csv(users_csv, users)
    switch = SwitchProcess(config, workdir / "switch-ramp.log", port)
    switch.start(ready_timeout=300)
    print(f"bench: switch pid {switch.pid}, {len(users)} devices, ready in "
          f"{switch.load_seconds:.1f} s", flush=True)
    try:
        result = _ramp(
            plan, label="switch", target=f"127.0.0.1:{port}", users_csv=users_csv,
            watch=[switch.pid], alive=switch.alive,
        )
        result["rss_bytes_after_ramp"] = rss_bytes(switch.pid)
        result["sustained"] = _sustain(
            plan, target=f"127.0.0.1:{port}", users_csv=users_csv, watch=[switch.pid],
            best_rate=result["highest_clean_rate"], alive=switch.alive,
        )
        result["rss_bytes_after_sustained"] = rss_bytes(switch.pid)
    finally:
        switch.stop()
    result.update(
        server="softswitch (one process)",
        devices=len(users),
        accounts=plan.ramp_accounts,
        start_seconds=round(switch.load_seconds, 2),
        errors_in_log=_log_errors(switch.log_path),
    )
    return result


def _log_errors(log_path: Path, limit: int = 5) -> list[str]:
    """The first warning/error lines the switch logged (its level is warning)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in lines if line.strip()][:limit]


# --------------------------------------------------------------------------------------
# 2. Kamailio, the peer reference
# --------------------------------------------------------------------------------------


def kamailio_ramp(plan: Plan, workdir: Path) -> dict:
    peers = peers_dir()
    if peers is None:
        return {"skipped": "shared peer configs not found (set PEERS_DIR)"}
    if ensure_kamailio() is None:
        return {"skipped": "kamailio is not installed and could not be installed"}
    users = kamailio_users(1000)
    users_csv = workdir / "kamailio-users.csv"
    write_users_csv(users_csv, users)
    kamailio = KamailioProcess(peers, workdir / "kam", children=4)
    kamailio.start()
    print(f"bench: kamailio pids {kamailio.pids}", flush=True)
    try:
        result = _ramp(
            plan, label="kamailio", target=f"127.0.0.1:{KAMAILIO_PORT}", users_csv=users_csv,
            watch=kamailio.pids, alive=lambda: _pid_alive(kamailio.main_pid),
        )
    finally:
        kamailio.stop()
    result.update(server="kamailio (4 UDP workers, htable credentials)", devices=len(users))
    return result


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# --------------------------------------------------------------------------------------
# 3. memory per binding, and the REGISTER cost with 1k vs 100k bindings
# --------------------------------------------------------------------------------------


def memory_per_binding(plan: Plan, workdir: Path, clean_rate: float) -> dict:
    """Start the switch (under the heap probe) with many devices and register them all;
    the heap left by the last, traced, registrations gives the memory per binding. The
    same short step (1,000 users of the first account) runs with 1k and with all
    bindings present."""
    port = free_udp_port()
    config = workdir / "switch-memory.yaml"
    started = time.monotonic()
    users = write_switch_config(
        config, port=port, accounts=plan.memory_accounts,
        devices_per_account=plan.memory_devices_per_account,
    )
    generate_seconds = time.monotonic() - started
    first_account = users[: plan.memory_devices_per_account]
    others = users[plan.memory_devices_per_account:]
    first_csv = workdir / "memory-first.csv"
    write_users_csv(first_csv, first_account)

    # the bulk registration runs below the clean rate (with margin) so every device registers
    bulk_rate = max(50.0, BULK_RATE_SHARE * clean_rate // 50 * 50)
    traced_rate = max(50.0, TRACED_RATE_SHARE * clean_rate // 50 * 50)
    switch = SwitchProcess(config, workdir / "switch-memory.log", port, heap_probe=True)
    switch.start(ready_timeout=900)
    print(f"bench: switch pid {switch.pid} with {len(users)} devices ready in "
          f"{switch.load_seconds:.1f} s", flush=True)
    result: dict = {
        "devices": len(users),
        "accounts": plan.memory_accounts,
        "config_bytes": config.stat().st_size,
        "config_generate_seconds": round(generate_seconds, 2),
        "start_seconds": round(switch.load_seconds, 2),
        "rate": clean_rate,
        "bulk_rate": bulk_rate,
        "traced_rate": traced_rate,
    }
    target = f"127.0.0.1:{port}"
    step_calls = int(clean_rate * plan.step_seconds)
    try:
        time.sleep(2.0)
        result["rss_after_start"] = rss_bytes(switch.pid)

        small = run_sipp(
            label=f"1k bindings {clean_rate:.0f}/s", target=target, users_csv=first_csv,
            rate=clean_rate, calls=max(step_calls, len(first_account)), watch=[switch.pid],
            wall_limit=_step_wall_limit(plan.step_seconds),
        )
        print("bench:", small.summary(), flush=True)
        time.sleep(plan.settle_s)
        result["rss_with_1k_bindings"] = rss_bytes(switch.pid)

        # most devices register untraced; allocations are traced (tracemalloc doubles the
        # switch's CPU, hence the lower rate) while the last ones register: what is still
        # allocated once their transactions have expired is what those bindings cost
        traced_count = min(TRACED_BINDINGS, max(1, len(others) // 5))
        parts = (
            ("untraced", others[:-traced_count], bulk_rate),
            ("traced", others[-traced_count:], traced_rate),
        )
        bulk_runs: list[SippRun] = []
        rss_after_part: list[int] = []
        for name, part, rate in parts:
            part_csv = workdir / f"memory-{name}.csv"
            write_users_csv(part_csv, part)
            if name == "traced":
                switch.start_heap_trace()
            run = run_sipp(
                label=f"register {len(part)} ({name}) at {rate:.0f}/s",
                target=target, users_csv=part_csv, rate=rate, calls=len(part),
                watch=[switch.pid], wall_limit=2 * len(part) / rate + 60,
            )
            print("bench:", run.summary(), flush=True)
            bulk_runs.append(run)
            rss_after_part.append(rss_bytes(switch.pid))
        result["rss_right_after_all_registered"] = rss_after_part[-1]
        time.sleep(plan.settle_s)
        result["rss_with_all_bindings"] = rss_bytes(switch.pid)
        result["heap"] = switch.heap_report()

        large = run_sipp(
            label=f"{len(users) // 1000}k bindings {clean_rate:.0f}/s", target=target,
            users_csv=first_csv, rate=clean_rate, calls=max(step_calls, len(first_account)),
            watch=[switch.pid], wall_limit=_step_wall_limit(plan.step_seconds),
        )
        print("bench:", large.summary(), flush=True)
        result["rss_at_end"] = rss_bytes(switch.pid)
        if not switch.alive():
            raise BenchError("the switch died during the memory scenario")
    finally:
        switch.stop()

    bulk_ok = sum(run.ok for run in bulk_runs)
    bindings = len(first_account) + bulk_ok
    result.update(
        bindings_registered=bindings,
        bulk_registration=[run.as_dict() for run in bulk_runs],
        rss_after_each_part=rss_after_part,
        traced_bindings=bulk_runs[1].ok,
        step_with_1k_bindings=small.as_dict() | {
            "cpu_ms_per_registration": _cpu_ms_per_registration(small)},
        step_with_all_bindings=large.as_dict() | {
            "cpu_ms_per_registration": _cpu_ms_per_registration(large)},
        bytes_per_binding=round(
            (result["rss_with_all_bindings"] - result["rss_after_start"]) / max(bindings, 1)
        ),
        bytes_per_binding_after_1k=round(
            (result["rss_with_all_bindings"] - result["rss_with_1k_bindings"]) / max(bulk_ok, 1)
        ),
        traced_bytes_per_binding=round(
            result["heap"]["traced_bytes"] / max(bulk_runs[1].ok, 1)
        ),
        settle_seconds=plan.settle_s,
        errors_in_log=_log_errors(switch.log_path),
    )
    small_cost = _cpu_ms_per_registration(small)
    large_cost = _cpu_ms_per_registration(large)
    if small_cost and large_cost:
        result["cpu_cost_growth"] = round(large_cost / small_cost, 3)
    return result


# --------------------------------------------------------------------------------------
# 4. where the switch spends its CPU at the clean rate (py-spy)
# --------------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("py-spy")


def profile_switch(plan: Plan, workdir: Path, rate: float, top: int = 15) -> dict:
    """Sample the switch with py-spy while SIPp offers ``rate`` registrations/s; return
    the functions with the most own (leaf) samples."""
    py_spy = find_py_spy()
    if py_spy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    port = free_udp_port()
    config = workdir / "switch-profile.yaml"
    users = write_switch_config(
        config, port=port, accounts=plan.ramp_accounts,
        devices_per_account=plan.ramp_devices_per_account,
    )
    users_csv = workdir / "profile-users.csv"
    write_users_csv(users_csv, users)
    switch = SwitchProcess(config, workdir / "switch-profile.log", port)
    switch.start(ready_timeout=300)
    raw = workdir / "profile.raw"
    load_seconds = plan.profile_seconds + 6
    outcome: dict = {}

    def offer_load() -> None:
        outcome["run"] = run_sipp(
            label=f"profile {rate:.0f}/s", target=f"127.0.0.1:{port}", users_csv=users_csv,
            rate=rate, calls=int(rate * load_seconds), watch=[switch.pid],
            wall_limit=_step_wall_limit(load_seconds),
        )

    sipp_thread = threading.Thread(target=offer_load, daemon=True)
    try:
        sipp_thread.start()
        time.sleep(2.0)
        sampler = subprocess.run(
            [py_spy, "record", "--pid", str(switch.pid), "--duration",
             str(plan.profile_seconds), "--rate", "200", "--nonblocking",
             "--format", "raw", "--output", str(raw)],
            capture_output=True, text=True, timeout=plan.profile_seconds + 60,
        )
        sipp_thread.join(timeout=_step_wall_limit(load_seconds) + 10)
    finally:
        switch.stop()
    if sampler.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed: {(sampler.stderr or sampler.stdout)[-400:]}"}
    own, total = own_time_by_function(raw.read_text())
    run = outcome.get("run")
    return {
        "rate": rate,
        "seconds": plan.profile_seconds,
        "samples": total,
        "load_run": run.as_dict() if run else None,
        "top_own_time": [
            {"function": name, "samples": count, "percent": round(100.0 * count / total, 1)}
            for name, count in own.most_common(top)
        ] if total else [],
    }


def own_time_by_function(collapsed: str) -> tuple[collections.Counter, int]:
    """Leaf-frame sample counts per ``function (file)`` from py-spy's raw (collapsed
    stack) output; line numbers are merged."""
    own: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.rsplit(";", 1)[-1]
        match = _FRAME.match(leaf)
        name = f"{match['function']} ({match['file']})" if match else leaf
        own[name] += count
        total += count
    return own, total

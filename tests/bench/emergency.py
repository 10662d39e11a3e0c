"""Emergency call setup latency through the switch, idle and under ordinary call load.

Issue 4's benchmark: how long the switch takes to route an emergency call, from the
device's INVITE (the one carrying its digest credentials) to the INVITE the emergency
trunk receives, with the switch idle and while it carries ordinary calls near its
capacity.

One switch process (``media: {backend: none}``: SDP passes through, as in the calls
benchmark; digest on; CDR ledger on; the emergency audit journal on, fsync'd; fair use
off, as when the switch's clean calls/s was measured: its default per-account call-rate
limits would refuse the background load) with two
accounts, the background callers' and one of ``devices`` emergency devices (an account
holds at most 1,000), all at site "lyon" (FR, fixed location b312). Two peer trunks, the ordinary one first (file order: the
account's outbound calls leave through it):

- ``carrier`` → a SIPp callee (``uas_answer.xml``) on 127.0.0.3;
- ``psap`` → an :class:`EmergencyTrunkUAS` on 127.0.0.2 with ``emergency: {profile:
  pidf}``; it is the site's route, answers 200 at once, and the device then hangs up.

The measuring side (the SipUA devices and the emergency trunk) runs in a child process
(``python -m tests.bench.emergency measure SPEC.json OUT.json``) with its own event
loop, so that nothing else the harness does delays its timestamps. The devices place
the calls one at a time (112, the FR site), at most ``pace`` per second; for each,
latency = the trunk's ``time.monotonic()`` at the INVITE's arrival minus ``Call.sent_at``
(just before the INVITE with credentials is sent): same process, same clock. The child
also samples its own event-loop lag (a 10 ms ticker), to show how much of the latency
the measuring side itself could add.

The phases: idle (nothing else calls), then loaded: a SIPp caller
(``uac_call_digest.xml``, the calls benchmark's call) places ordinary calls to
``0 01 23 45 67 89`` through the carrier trunk at ``background_rate`` calls/s during the
whole measurement (started ``warmup_s`` before it, stopped by PID after it).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .calls import (
    CALLEE_SCENARIO,
    CALLER_SCENARIO,
    _communicate_bounded,
    _stats_rows,
    caller_row,
    stop_process,
    udp_port_bound,
    write_call_injection,
)
from .procs import (
    CLOCK_TICKS,
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    SwitchProcess,
    cpu_seconds,
    free_udp_port,
)
from .sipp import MIN_ACHIEVED_SHARE, SOCKET_BUFFER, _last_number

# the switch's measured highest clean calls/s (docs/bench/calls.md) and the share of it
# offered as background load
CLEAN_CALLS_PER_SECOND = 300
DEFAULT_BACKGROUND_RATE = 220
TRUNK_HOST = "127.0.0.2"  # the emergency trunk (EmergencyTrunkUAS's default host)
CARRIER_HOST = "127.0.0.3"  # the ordinary trunk's SIPp callee
SITE = "lyon"
LOCATION = "b312"
DIALLED = "112"
BACKGROUND_DIALLED = "00123456789"  # outside-line prefix 0, then 01 23 45 67 89
FIRST_CALLER_EXTENSION = 1000
FIRST_EMERGENCY_EXTENSION = 3000
LOOP_TICK_S = 0.01
PERCENTILES = (50, 90, 95, 99)


@dataclass
class EmergencyPlan:
    """Emergency calls per phase, their pace, devices, and the background load."""

    calls: int
    pace_per_s: float
    devices: int
    background_rate: int
    background_callers: int = 999
    warmup_s: float = 5.0
    call_timeout_s: float = 10.0
    pause_between_phases_s: float = 5.0

    @classmethod
    def full(cls, background_rate: int | None = None) -> EmergencyPlan:
        return cls(calls=200, pace_per_s=5.0, devices=10,
                   background_rate=background_rate or DEFAULT_BACKGROUND_RATE)

    @classmethod
    def quick(cls, background_rate: int | None = None) -> EmergencyPlan:
        return cls(calls=50, pace_per_s=5.0, devices=5, warmup_s=3.0,
                   pause_between_phases_s=3.0,
                   background_rate=background_rate or DEFAULT_BACKGROUND_RATE)

    def measure_seconds(self) -> float:
        """Planned length of one phase's calls (one call per 1/pace s)."""
        return self.calls / self.pace_per_s

    def child_wall_limit(self) -> float:
        """The measuring child is stopped after this long: registration, every call at
        its worst (INVITE timeout + BYE timeout) is far beyond it only if calls hang."""
        return self.measure_seconds() + 60.0 + 0.2 * self.calls * self.call_timeout_s

    def criteria(self) -> dict:
        return {
            "latency": (
                "emergency trunk's INVITE arrival (time.monotonic() when the datagram is "
                "read) minus the time the device sent its INVITE with digest credentials "
                "(Call.sent_at), both in the measuring child process"
            ),
            "calls_per_phase": self.calls,
            "pace_per_s": self.pace_per_s,
            "devices": self.devices,
            "dialled": f"{DIALLED} (FR, site {SITE}, fixed location {LOCATION})",
            "trunk_profile": "pidf (Geolocation + PIDF-LO by value)",
            "background": (
                f"SIPp uac_call_digest.xml (INVITE/407/INVITE/180/200/ACK/BYE) to "
                f"{BACKGROUND_DIALLED} through the ordinary trunk to a SIPp callee, offered "
                f"{self.background_rate} calls/s (the switch's clean rate is "
                f"{CLEAN_CALLS_PER_SECOND} calls/s, docs/bench/calls.md), started "
                f"{self.warmup_s:g} s before the first emergency call"
            ),
            "failure": (
                "no final 200 within the timeout, no INVITE at the emergency trunk, "
                "or an INVITE there without the device's number in P-Asserted-Identity"
            ),
        }


# --------------------------------------------------------------------------------------
# The switch configuration
# --------------------------------------------------------------------------------------


def caller_username(index: int) -> str:
    return f"bg{FIRST_CALLER_EXTENSION + index}"


def emergency_username(index: int) -> str:
    return f"em{FIRST_EMERGENCY_EXTENSION + index}"


def emergency_did(index: int) -> str:
    return f"+334780{FIRST_EMERGENCY_EXTENSION + index:05d}"


def password_of(username: str) -> str:
    return f"pw{username}"


def emergency_config_text(
    *, port: int, plan: EmergencyPlan, trunk_port: int, carrier_port: int
) -> str:
    """YAML: two accounts at site lyon (the background callers; the emergency devices),
    the ordinary trunk first, the emergency trunk (pidf) as the site's route."""
    lines = [
        "# generated by tests/bench/emergency.py: do not edit",
        "switch:",
        "  node_id: bench-emergency",
        "  domains: [127.0.0.1]",
        "listen:",
        f"  - {{transport: udp, host: 127.0.0.1, port: {port}}}",
        "registrar: {min_expires: 60, max_expires: 7200, default_expires: 3600,"
        " keepalive_interval: 0}",
        "auth:",
        "  algorithms: [MD5, SHA-256]",
        "  ban: {max_failures_per_source: 1000000, max_failures_per_user: 1000000,"
        " window: 60, ban_time: 0}",
        "store: {backend: memory}",
        "logging: {level: warning, format: json}",
        "media: {backend: none}",
        "calls: {no_answer_timeout: 60, session_expires: 1800}",
        "dialplan: {country: FR, outside_line_prefix: \"0\"}",
        "fair_use: {enabled: false}",
        "trunks:",
        f"  - {{id: carrier, kind: peer, host: {CARRIER_HOST}, port: {carrier_port},"
        f" transport: udp, addresses: [{CARRIER_HOST}/32]}}",
        f"  - {{id: psap, kind: peer, host: {TRUNK_HOST}, port: {trunk_port},"
        f" transport: udp, addresses: [{TRUNK_HOST}/32], emergency: {{profile: pidf}}}}",
        "emergency:",
        "  journal_dir: emergency-journal",
        "  sites:",
        f"    - id: {SITE}",
        "      country: FR",
        "      address: {country: FR, A1: \"69\", A3: Lyon, RD: Rue de la République,"
        " HNO: \"10\", PC: \"69002\"}",
        "      callback_number: \"+33478000100\"",
        "      routes: [psap]",
        "      locations:",
        f"        - {{id: {LOCATION}, FLR: \"3\", ROOM: B312}}",
        "accounts:",
        "  - id: bench001",
        "    main_number: \"+33478000000\"",
        "    devices:",
    ]
    where = f"site: {SITE}, location: {LOCATION}"
    for index in range(plan.background_callers):
        user = caller_username(index)
        lines.append(f'      - {{extension: "{FIRST_CALLER_EXTENSION + index}", username: '
                     f'"{user}", password: "{password_of(user)}", {where}}}')
    lines += ["  - id: bench-emergency", "    main_number: \"+33478000001\"", "    devices:"]
    for index in range(plan.devices):
        user = emergency_username(index)
        lines.append(f'      - {{extension: "{FIRST_EMERGENCY_EXTENSION + index}", username: '
                     f'"{user}", password: "{password_of(user)}", '
                     f'display_name: "Bench phone {index}", did: "{emergency_did(index)}", '
                     f'{where}}}')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The measuring child: devices and the emergency trunk in their own process
# --------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    """Nearest-rank p50/p90/p95/p99, min, max, mean and count of ``values``."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out: dict = {"count": len(ordered), "min": round(ordered[0], 3),
                 "mean": round(sum(ordered) / len(ordered), 3)}
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[f"p{p}"] = round(ordered[rank - 1], 3)
    out["max"] = round(ordered[-1], 3)
    return out


async def _loop_lag(samples: list[float], stop: asyncio.Event, limit: int) -> None:
    """Lateness of a 10 ms sleep, in ms: the event loop's own scheduling delay."""
    loop = asyncio.get_running_loop()
    while not stop.is_set() and len(samples) < limit:
        expected = loop.time() + LOOP_TICK_S
        await asyncio.sleep(LOOP_TICK_S)
        samples.append(1000.0 * max(0.0, loop.time() - expected))


async def _measure(spec: dict) -> dict:
    peers = str(REPO_ROOT / "tests" / "peers")
    if peers not in sys.path:
        sys.path.append(peers)
    from etrunk import EmergencyTrunkUAS
    from sipua import SipUA

    switch = (spec["switch_host"], int(spec["switch_port"]))
    calls, pace, timeout = int(spec["calls"]), float(spec["pace_per_s"]), float(spec["timeout"])
    results: list[dict] = []
    lag: list[float] = []
    stop = asyncio.Event()
    trunk = EmergencyTrunkUAS([200], host=spec["trunk_host"], port=int(spec["trunk_port"]))
    devices = [SipUA(user, password, switch) for user, password, _ in spec["devices"]]
    dids = [did for _, _, did in spec["devices"]]
    await trunk.start()
    for device in devices:
        await device.start()
    lag_task: asyncio.Task | None = None
    try:
        for device in devices:
            response = await device.register(3600, timeout=5.0)
            if response is None or response.status != 200:
                raise RuntimeError(f"{device.username} could not register: "
                                   f"{response.status if response else 'no response'}")
        lag_task = asyncio.create_task(_loop_lag(lag, stop, limit=int(3600 / LOOP_TICK_S)))
        wall_started = time.time()
        started = time.monotonic()
        for index in range(calls):
            slot = started + index / pace
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            device, did = devices[index % len(devices)], dids[index % len(devices)]
            results.append(await _one_call(trunk, device, did, index, timeout))
        wall_ended = time.time()
    finally:
        stop.set()
        if lag_task is not None:
            await asyncio.gather(lag_task, return_exceptions=True)
        for device in devices:
            await device.close()
        await trunk.close()
    return {"calls": results, "wall_started": wall_started, "wall_ended": wall_ended,
            "loop_lag_ms": percentiles(lag)}


async def _one_call(trunk, device, did: str, index: int, timeout: float) -> dict:
    """One emergency call: INVITE (407, INVITE with credentials), the trunk's INVITE, the
    200, then the device's BYE. The trunk INVITE is the first new one naming ``did``."""
    seen = len(trunk.invites)
    call = await device.invite(DIALLED, timeout=timeout)
    answered_at = time.monotonic()
    row: dict = {"index": index, "device": device.username, "status": call.status}
    arrivals = [record for record in trunk.invites[seen:]
                if did in (record.request.header("P-Asserted-Identity") or "")]
    if call.answered:
        bye = await call.bye(timeout=5.0)
        row["bye_status"] = bye.status if bye is not None else None
    if not arrivals or call.sent_at is None:
        row["problem"] = "no INVITE with the device's number reached the emergency trunk"
    elif not call.answered:
        row["problem"] = f"final status {call.status}"
    else:
        row["latency_ms"] = round(1000.0 * (arrivals[0].at - call.sent_at), 3)
        row["answer_ms"] = round(1000.0 * (answered_at - call.sent_at), 3)
        row["trunk_request_uri"] = arrivals[0].request.uri if index == 0 else None
    return row


def measure_main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "measure":
        print("usage: python -m tests.bench.emergency measure SPEC.json OUT.json",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    result = asyncio.run(_measure(spec))
    Path(argv[2]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------
# The harness: switch, SIPp, the measuring child
# --------------------------------------------------------------------------------------


def _run_child(plan: EmergencyPlan, *, name: str, workdir: Path, switch_port: int,
               trunk_port: int) -> dict:
    """The measuring child for one phase, bounded in wall-clock time; its JSON result."""
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    out_path.unlink(missing_ok=True)
    devices = [(emergency_username(i), password_of(emergency_username(i)), emergency_did(i))
               for i in range(plan.devices)]
    spec_path.write_text(json.dumps({
        "switch_host": LOOPBACK, "switch_port": switch_port, "trunk_host": TRUNK_HOST,
        "trunk_port": trunk_port, "calls": plan.calls, "pace_per_s": plan.pace_per_s,
        "timeout": plan.call_timeout_s, "devices": devices,
    }))
    env = dict(os.environ)
    existing = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)
    command = [sys.executable, "-m", "tests.bench.emergency", "measure", str(spec_path),
               str(out_path)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=plan.child_wall_limit())
    except subprocess.TimeoutExpired:
        raise BenchError(f"the measuring child ({name}) hung and was stopped") from None
    finally:
        if process.poll() is None:
            stop_process(process)
    if process.returncode != 0 or not out_path.exists():
        raise BenchError(f"the measuring child ({name}) failed with {process.returncode}: "
                         f"{output.decode(errors='replace')[-1200:]}")
    return json.loads(out_path.read_text())


def _start_carrier(port: int, stats: Path, workdir: Path, wall_limit: float) -> subprocess.Popen:
    """The ordinary trunk's far end: a SIPp callee on CARRIER_HOST:port."""
    command = [
        "sipp", "-sf", str(CALLEE_SCENARIO), "-i", CARRIER_HOST, "-p", str(port),
        "-cp", str(free_udp_port(CARRIER_HOST)), "-mp", str(free_udp_port(CARRIER_HOST)),
        "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(wall_limit)), "-nostdin",
        "-trace_stat", "-stf", str(stats), "-fd", "1",
    ]
    process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not udp_port_bound(port, CARRIER_HOST):
        if process.poll() is not None:
            raise BenchError(f"the SIPp callee exited with {process.returncode} at start")
        time.sleep(0.05)
    return process


def _start_background(plan: EmergencyPlan, *, target: str, injection: Path, stats: Path,
                      workdir: Path, calls: int, wall_limit: float) -> subprocess.Popen:
    command = [
        "sipp", target, "-sf", str(CALLER_SCENARIO), "-inf", str(injection),
        "-i", LOOPBACK, "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
        "-mp", str(free_udp_port()),
        "-m", str(calls), "-r", str(plan.background_rate), "-rp", "1000",
        "-l", str(max(1000, plan.background_rate * 10)),
        "-default_behaviors", "-abortunexp",
        "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(wall_limit)), "-nostdin",
        "-trace_stat", "-stf", str(stats), "-fd", "1",
    ]
    return subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop_sipp(process: subprocess.Popen) -> str:
    """SIGTERM a SIPp run by its PID (SIGKILL after 5 s); its output."""
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return _communicate_bounded(process, 5.0)


def background_summary(rows: list[dict[str, str]], window: tuple[float, float]) -> dict:
    """What the SIPp caller did: totals, and the successful calls/s while the emergency
    calls were placed (statistics rows inside ``window``, epoch seconds)."""
    if not rows:
        return {"error": "SIPp wrote no statistics"}
    last = rows[-1]
    out: dict = {
        "created": int(last["TotalCallCreated"]),
        "ok": int(last["SuccessfulCall(C)"]),
        "failed": int(last["FailedCall(C)"]),
        "retransmissions": int(last["Retransmissions(C)"]),
        "unfinished_at_end": int(last.get("CurrentCall") or 0),
        "elapsed_s": round(_last_number(last["CurrentTime"]) - _last_number(last["StartTime"]),
                           1),
    }
    out["achieved_rate"] = round(out["ok"] / out["elapsed_s"], 1) if out["elapsed_s"] else 0.0
    start, end = window
    timed = [(_last_number(row["CurrentTime"]), int(row["SuccessfulCall(C)"]),
              int(row["FailedCall(C)"])) for row in rows]
    before = [t for t in timed if t[0] <= start]
    after = [t for t in timed if t[0] >= end]
    first = before[-1] if before else timed[0]
    final = after[0] if after else timed[-1]
    out["covered_whole_window"] = bool(before) and bool(after)
    if final[0] > first[0]:
        out["rate_during_emergency_calls"] = round((final[1] - first[1]) / (final[0] - first[0]),
                                                   1)
        out["failed_during_emergency_calls"] = final[2] - first[2]
    return out


def background_problems(background: dict) -> list[str]:
    """Why the loaded phase may not have been under the intended load (empty: it was)."""
    if "error" in background:
        return [background["error"]]
    problems = []
    rate = background.get("rate_during_emergency_calls")
    offered = background.get("offered_rate") or 0
    if rate is None or rate < MIN_ACHIEVED_SHARE * offered:
        problems.append(f"background achieved {rate} calls/s of {offered} offered "
                        "while the emergency calls were placed")
    if background.get("failed"):
        problems.append(f"{background['failed']} background calls failed")
    if not background.get("covered_whole_window"):
        problems.append("the background load did not cover every emergency call")
    return problems


def log_summary(log_path: Path, limit: int = 5) -> dict:
    """The switch's log (level warning): events counted by level and name (each emergency
    call logs warning-level events by design), and the first error lines."""
    counts: dict[str, int] = {}
    errors: list[str] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"level": "unparsed", "event": line[:80]}
        if not isinstance(event, dict):
            continue
        key = f"{event.get('level', '?')} {event.get('event', '?')}"
        counts[key] = counts.get(key, 0) + 1
        if event.get("level") in ("error", "critical", "unparsed") and len(errors) < limit:
            errors.append(line[:300])
    return {"events": dict(sorted(counts.items())), "first_errors": errors}


def summarise_phase(child: dict) -> dict:
    """Latency percentiles (ms) and failures of one phase from the child's rows."""
    rows = child["calls"]
    latencies = [row["latency_ms"] for row in rows if "latency_ms" in row]
    answers = [row["answer_ms"] for row in rows if "answer_ms" in row]
    failures = [row for row in rows if "problem" in row]
    return {
        "calls": len(rows),
        "ok": len(latencies),
        "failures": len(failures),
        "failure_reasons": sorted({row["problem"] for row in failures}),
        "failed_calls": failures,
        "latency_ms": percentiles(latencies),
        "answer_ms": percentiles(answers),
        "loop_lag_ms": child.get("loop_lag_ms", {}),
        "latencies_ms": latencies,
        "duration_s": round(child["wall_ended"] - child["wall_started"], 1),
        "trunk_request_uri": next((row["trunk_request_uri"] for row in rows
                                   if row.get("trunk_request_uri")), None),
    }


def run_emergency(quick: bool, workdir: Path, background_rate: int | None = None) -> dict:
    plan = (EmergencyPlan.quick if quick else EmergencyPlan.full)(background_rate)
    results: dict = {"criteria": plan.criteria(),
                     "server": "softswitch (one process), media backend none, digest on, "
                               "CDR ledger on, emergency audit journal on, fair use off",
                     "loadavg_before": [round(value, 2) for value in os.getloadavg()]}
    port, trunk_port = free_udp_port(), free_udp_port(TRUNK_HOST)
    carrier_port = free_udp_port(CARRIER_HOST)
    config = workdir / "switch-emergency.yaml"
    config.write_text(emergency_config_text(port=port, plan=plan, trunk_port=trunk_port,
                                            carrier_port=carrier_port))
    injection = workdir / "emergency-background.csv"
    write_call_injection(injection, [
        caller_row(caller_username(i), password_of(caller_username(i)), BACKGROUND_DIALLED)
        for i in range(plan.background_callers)])
    switch = SwitchProcess(config, workdir / "switch-emergency.log", port)
    switch.start(ready_timeout=120)
    print(f"bench: switch pid {switch.pid} (emergency, media: none), ready in "
          f"{switch.load_seconds:.1f} s", flush=True)
    phase_wall = plan.measure_seconds() + plan.warmup_s + 60
    carrier = None
    try:
        carrier = _start_carrier(carrier_port, workdir / "carrier.csv", workdir,
                                 wall_limit=3 * phase_wall + 120)
        for name in ("idle", "loaded"):
            if name == "loaded":
                time.sleep(plan.pause_between_phases_s)
            if not switch.alive():
                raise BenchError(f"the switch died before the {name} phase: "
                                 f"{switch.log_tail()}")
            results[name] = _phase(plan, name, switch, carrier.pid, workdir, port,
                                   trunk_port, injection, phase_wall)
            summary = results[name]
            lat = summary["latency_ms"]
            print(f"bench: [emergency {name}] {summary['ok']}/{summary['calls']} ok, latency "
                  f"p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms max {lat.get('max')} ms"
                  + (f"; background {summary['background'].get('rate_during_emergency_calls')}"
                     " calls/s" if "background" in summary else ""), flush=True)
    finally:
        if carrier is not None:
            stop_process(carrier, grace=0.0)
        switch.stop()
    carrier_rows = _stats_rows(workdir / "carrier.csv")
    if carrier_rows:
        results["carrier_callee"] = {"ok": int(carrier_rows[-1]["SuccessfulCall(C)"]),
                                     "failed": int(carrier_rows[-1]["FailedCall(C)"])}
    results["switch_log"] = log_summary(switch.log_path)
    idle, loaded = results["idle"]["latency_ms"], results["loaded"]["latency_ms"]
    if idle.get("p50") and loaded.get("p50"):
        results["loaded_to_idle_p50"] = round(loaded["p50"] / idle["p50"], 2)
    return results


def machine_busy_seconds() -> float:
    """CPU seconds every core spent busy since boot (/proc/stat: all but idle, iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS


def _own_seconds() -> float:
    """CPU of this harness and of its waited-for children (SIPp caller, measuring child)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _phase(plan: EmergencyPlan, name: str, switch: SwitchProcess, carrier_pid: int,
           workdir: Path, port: int, trunk_port: int, injection: Path,
           phase_wall: float) -> dict:
    """One phase: the measuring child, alone (idle) or with the SIPp caller (loaded).
    CPU is read around it: the switch's, ours (harness, SIPp, child), and the rest of the
    machine's (other processes sharing the cores)."""
    background = None
    stats = workdir / f"background-{name}.csv"
    cpu_before, started = cpu_seconds(switch.pid), time.monotonic()
    carrier_before, own_before = cpu_seconds(carrier_pid), _own_seconds()
    busy_before = machine_busy_seconds()
    try:
        if name == "loaded":
            calls = int(plan.background_rate * (phase_wall + plan.warmup_s))
            background = _start_background(plan, target=f"{LOOPBACK}:{port}",
                                           injection=injection, stats=stats, workdir=workdir,
                                           calls=calls, wall_limit=phase_wall + 30)
            time.sleep(plan.warmup_s)
            if background.poll() is not None:
                raise BenchError(f"the SIPp caller exited with {background.returncode}: "
                                 f"{_communicate_bounded(background, 1.0)[-800:]}")
        child = _run_child(plan, name=name, workdir=workdir, switch_port=port,
                           trunk_port=trunk_port)
    finally:
        output = _stop_sipp(background) if background is not None else ""
    wall = time.monotonic() - started
    summary = summarise_phase(child)
    switch_s = cpu_seconds(switch.pid) - cpu_before
    bench_s = cpu_seconds(carrier_pid) - carrier_before + _own_seconds() - own_before
    busy_s = machine_busy_seconds() - busy_before
    summary["switch_cpu_percent"] = round(100.0 * switch_s / wall, 1)
    summary["sipp_and_measuring_cpu_percent"] = round(100.0 * bench_s / wall, 1)
    summary["machine_busy_percent"] = round(100.0 * busy_s / wall, 1)
    summary["other_processes_cpu_percent"] = round(
        max(0.0, 100.0 * (busy_s - switch_s - bench_s) / wall), 1)
    summary["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]
    if background is not None:
        rows = _stats_rows(stats)
        summary["background"] = background_summary(
            rows, (child["wall_started"], child["wall_ended"]))
        summary["background"]["offered_rate"] = plan.background_rate
        summary["background"]["problems"] = background_problems(summary["background"])
        if not rows:
            summary["background"]["sipp_output"] = output[-800:]
    return summary


if __name__ == "__main__":
    sys.exit(measure_main(sys.argv[1:]))

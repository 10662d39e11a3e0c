"""Calls per second through the B2BUA without media; the Sippy B2BUA and Kamailio as a
stateful proxy as the references.

One "call" is one SIPp caller call of ``sipp/uac_call_digest.xml`` through the switch
(INVITE, 407, ACK, INVITE with credentials, 180, 200, ACK, BYE, 200) to a SIPp callee
(``sipp/uas_answer.xml``) that the switch finds through a registration; the caller hangs
up as soon as it has sent the ACK. The switch runs with ``media: {backend: none}`` (the
SDP passes through) and writes its CDR ledger as usual. Each step offers a fixed rate;
the ramp stops after the first step that is not clean, as for REGISTER.

Kamailio (the shared benchmark cfg, 4 UDP workers) proxies the same call statefully (tm,
record-route, digest on INVITE: the same 407 round trip) to the SIPp callee, its static
destination; the caller is ``sipp/uac_call_digest_rr.xml`` (ACK and BYE carry the
Record-Route set as Route headers). Sippy does not authenticate: ``uac_call_plain.xml``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .configs import device_users, kamailio_users, switch_config_text
from .procs import (
    LOOPBACK,
    BenchError,
    KamailioProcess,
    SwitchProcess,
    cpu_seconds,
    ensure_kamailio,
    free_udp_port,
    peers_dir,
)
from .register import _log_errors
from .sipp import (
    MIN_ACHIEVED_SHARE,
    SCENARIO_DIR,
    SOCKET_BUFFER,
    SippRun,
    _last_number,
    _rates,
    _udp_rcvbuf_errors,
)

CALLER_SCENARIO = SCENARIO_DIR / "uac_call_digest.xml"
PLAIN_CALLER_SCENARIO = SCENARIO_DIR / "uac_call_plain.xml"
PROXIED_CALLER_SCENARIO = SCENARIO_DIR / "uac_call_digest_rr.xml"
CALLEE_SCENARIO = SCENARIO_DIR / "uas_answer.xml"
# behind Kamailio's several UDP workers a call's BYE may overtake its ACK
UNORDERED_CALLEE_SCENARIO = SCENARIO_DIR / "uas_answer_unordered.xml"
REGISTER_CONTACT_SCENARIO = SCENARIO_DIR / "register_contact.xml"
# retransmissions may be at most this share of the messages that can be retransmitted
MAX_CALL_RETRANSMISSION_SHARE = 0.001
# messages of one call a timer retransmits: the caller's INVITE, INVITE with credentials
# and BYE, and the callee's 200 OK to the INVITE (through Sippy: no challenged INVITE)
RETRANSMITTABLE_PER_CALL = 4
RETRANSMITTABLE_PER_PLAIN_CALL = 3
# the callee runs without -m (stray retransmissions from an earlier step would count as
# calls): it is stopped this long after the caller ended, once its statistics (written
# every second) include the last calls
CALLEE_GRACE_S = 2.0
SIPPY_VENV_NAME = "venv-sippy"
# the shared Kamailio cfg listens on this UDP port only
KAMAILIO_PORT = 5080
KAMAILIO_CHILDREN = 4
SIPPY_START_TIMEOUT_S = 15.0


@dataclass
class CallsPlan:
    """Rates, step length and pauses of the calls ramp (``--quick`` shrinks them)."""

    steps: list[int]
    step_seconds: float
    pause_between_steps_s: float
    # callers in the generated account; the callee is one more device of it
    callers: int = 999
    retries_of_unclean_step: int = 1
    # before retrying an unclean step: the switch's transactions of the failed calls
    # (Timer B/F/H = 64*T1 = 32 s) stop retransmitting to the callee's port
    retry_pause_s: float = 35.0

    @classmethod
    def full(cls) -> CallsPlan:
        return cls(
            steps=[50, 100, 200, 300, 400, 600, 800, 1000, 1200, 1600, 2000, 3000],
            step_seconds=6.0, pause_between_steps_s=5.0,
        )

    @classmethod
    def quick(cls) -> CallsPlan:
        return cls(steps=[50, 100, 200, 400], step_seconds=3.0, pause_between_steps_s=3.0,
                   retry_pause_s=10.0)

    def criteria(self) -> dict:
        return {
            "step_seconds": self.step_seconds,
            "calls_per_step": "rate x step_seconds",
            "call": (
                "INVITE -> 407 -> ACK, INVITE with credentials -> 180 -> 200 -> ACK, "
                "BYE at once -> 200 (Sippy: no 407; Kamailio: the same call, ACK and BYE "
                "with the Record-Route set as Route)"
            ),
            "clean": (
                "0 failed on either side, every call completed, retransmissions (caller and "
                f"callee) <= {100 * MAX_CALL_RETRANSMISSION_SHARE:.1f}% of the retransmittable "
                f"messages, achieved >= {100 * MIN_ACHIEVED_SHARE:.0f}% of offered"
            ),
            "stop": (
                f"at the first step that is not clean {1 + self.retries_of_unclean_step} "
                f"times in a row (a retry waits {self.retry_pause_s:g} s)"
            ),
        }


@dataclass
class CallRun(SippRun):
    """A SIPp caller run plus what its callee saw."""

    callee_ok: int = 0
    callee_failed: int = 0
    callee_retransmissions: int = 0
    caller_retransmissions: int = 0


# --------------------------------------------------------------------------------------
# SIPp helpers
# --------------------------------------------------------------------------------------


def write_call_injection(path: Path, rows: list[list[str]]) -> None:
    """SIPp injection file, read in order: each row is the fields of one call."""
    with open(path, "w") as out:
        out.write("SEQUENTIAL\n")
        for row in rows:
            out.write(";".join(row) + "\n")
    os.chmod(path, 0o644)


def caller_row(username: str, password: str, *extra: str) -> list[str]:
    """username;password;domain;[authentication ...];extra... (the 4th field carries the
    whole keyword: SIPp 3.6 mis-parses fields nested inside it)."""
    return [username, password, LOOPBACK,
            f"[authentication username={username} password={password}]", *extra]


def register_contacts(
    *, target: str, rows: list[list[str]], contact_port: int, workdir: Path, rate: int = 500
) -> None:
    """Register one binding per row (``caller_row(user, password, contact_user)``) whose
    Contact is ``contact_user@127.0.0.1:contact_port``; BenchError when any fails."""
    csv = workdir / f"register-{contact_port}.csv"
    write_call_injection(csv, rows)
    wall = 2 * len(rows) / rate + 30
    command = [
        "sipp", target, "-sf", str(REGISTER_CONTACT_SCENARIO), "-inf", str(csv),
        "-i", LOOPBACK, "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
        "-m", str(len(rows)), "-r", str(rate), "-key", "contact_port", str(contact_port),
        "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(wall)), "-nostdin",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-sipp-reg-") as tmp:
        process = subprocess.Popen(command, cwd=tmp, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = _communicate_bounded(process, wall + 10)
        if process.returncode != 0:
            errors = "".join(p.read_text(errors="replace")[-800:]
                             for p in Path(tmp).glob("*_errors.log"))
            raise BenchError(f"registering {len(rows)} callees failed (SIPp exit "
                             f"{process.returncode}): {output[-600:]} {errors}")


def _communicate_bounded(process: subprocess.Popen, timeout: float) -> str:
    """Wait for a SIPp process; SIGTERM then SIGKILL it (by its PID) after ``timeout``."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    return output.decode(errors="replace") if output else ""


def udp_port_bound(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def start_callee(
    *, scenario: Path, port: int, calls: int | None, workdir: Path, stats_path: Path | None,
    wall_limit: float,
) -> subprocess.Popen:
    """A SIPp callee (UAS) on ``port`` (exiting after ``calls`` calls when given);
    returns once its port is bound."""
    command = [
        "sipp", "-sf", str(scenario), "-i", LOOPBACK, "-p", str(port),
        "-cp", str(free_udp_port()), "-mp", str(free_udp_port()),
        "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(wall_limit)), "-nostdin",
    ]
    if calls is not None:
        command += ["-m", str(calls)]
    if stats_path is not None:
        command += ["-trace_stat", "-stf", str(stats_path), "-fd", "1"]
    process = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not udp_port_bound(port):
        if process.poll() is not None:
            raise BenchError(f"the SIPp callee exited with {process.returncode} at start")
        time.sleep(0.05)
    return process


def stop_process(process: subprocess.Popen, grace: float = 0.0) -> None:
    """Wait up to ``grace`` s for it to end, then SIGTERM, then SIGKILL (by its PID)."""
    try:
        process.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _stats_rows(path: Path) -> list[dict[str, str]]:
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
    if len(lines) < 2:
        return []
    header = lines[0].split(";")
    return [dict(zip(header, line.split(";"), strict=False)) for line in lines[1:]]


def run_call_step(
    *, label: str, target: str, caller_scenario: Path, injection: Path, callee_port: int,
    rate: float, calls: int, watch: list[int], wall_limit: float, retransmittable_per_call: int,
    callee_scenario: Path = CALLEE_SCENARIO,
) -> CallRun:
    """``calls`` calls at ``rate``/s from a SIPp caller to ``target`` (the B2BUA), which
    sends them to a fresh SIPp callee on ``callee_port``; judged on both sides."""
    if not target.startswith("127."):
        raise BenchError(f"refusing a non-loopback target {target!r}")
    result = CallRun(label=label, offered_rate=rate, calls=calls)
    with tempfile.TemporaryDirectory(prefix="bench-sipp-calls-") as tmp:
        workdir = Path(tmp)
        caller_stats, callee_stats = workdir / "caller.csv", workdir / "callee.csv"
        callee = start_callee(scenario=callee_scenario, port=callee_port, calls=None,
                              workdir=workdir, stats_path=callee_stats,
                              wall_limit=wall_limit + 10)
        command = [
            "sipp", target, "-sf", str(caller_scenario), "-inf", str(injection),
            "-i", LOOPBACK, "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
            "-mp", str(free_udp_port()),
            "-m", str(calls), "-r", str(int(rate)), "-rp", "1000",
            "-l", str(max(1000, int(rate * 10))),
            "-default_behaviors", "-abortunexp",
            "-buff_size", str(SOCKET_BUFFER), "-timeout", str(int(wall_limit)), "-nostdin",
            "-trace_stat", "-stf", str(caller_stats), "-fd", "1",
        ]
        cpu_before = {pid: cpu_seconds(pid) for pid in watch}
        drops_before = _udp_rcvbuf_errors()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        caller = None
        try:
            caller = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                output, _ = caller.communicate(timeout=wall_limit)
            except subprocess.TimeoutExpired:
                result.killed_at_wall_limit = True
                output = _communicate_bounded(caller, 0.01).encode()
            result.wall_s = time.monotonic() - started
            result.returncode = caller.returncode
            result.target_cpu_s = sum(cpu_seconds(pid) - cpu_before[pid] for pid in watch)
        finally:
            if caller is not None and caller.poll() is None:  # interrupted
                stop_process(caller)
            stop_process(callee, grace=CALLEE_GRACE_S)
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.target_cpu_percent = 100.0 * result.target_cpu_s / max(result.wall_s, 1e-9)
        result.udp_rcvbuf_errors = _udp_rcvbuf_errors() - drops_before
        result.sipp_cpu_s = (usage_after.ru_utime + usage_after.ru_stime) - (
            usage_before.ru_utime + usage_before.ru_stime)
        rows = _stats_rows(caller_stats)
        callee_rows = _stats_rows(callee_stats)
        if not rows:
            tail = output.decode(errors="replace")[-1500:] if output else ""
            raise BenchError(f"SIPp wrote no statistics ({label}): {tail}")
    last = rows[-1]
    result.elapsed_s = _last_number(last["CurrentTime"]) - _last_number(last["StartTime"])
    result.created = int(last["TotalCallCreated"])
    result.ok = int(last["SuccessfulCall(C)"])
    result.failed = int(last["FailedCall(C)"])
    result.caller_retransmissions = int(last["Retransmissions(C)"])
    if callee_rows:
        result.callee_ok = int(callee_rows[-1]["SuccessfulCall(C)"])
        result.callee_failed = int(callee_rows[-1]["FailedCall(C)"])
        result.callee_retransmissions = int(callee_rows[-1]["Retransmissions(C)"])
    result.retransmissions = result.caller_retransmissions + result.callee_retransmissions
    result.achieved_rate = result.ok / result.elapsed_s if result.elapsed_s > 0 else 0.0
    result.steady_rate, result.peak_rate = _rates(rows)
    _judge_calls(result, retransmittable_per_call)
    return result


def _judge_calls(run: CallRun, retransmittable_per_call: int) -> None:
    if run.killed_at_wall_limit:
        run.problems.append("killed at the wall-clock limit")
    if run.failed:
        run.problems.append(f"{run.failed} failed")
    if run.callee_failed:
        run.problems.append(f"{run.callee_failed} failed at the callee")
    if run.ok < run.calls:
        run.problems.append(f"only {run.ok} of {run.calls} completed")
    allowed = MAX_CALL_RETRANSMISSION_SHARE * retransmittable_per_call * run.calls
    if run.retransmissions > allowed:
        run.problems.append(f"{run.retransmissions} retransmissions (> {allowed:.0f})")
    if run.achieved_rate < MIN_ACHIEVED_SHARE * run.offered_rate:
        run.problems.append(f"achieved {run.achieved_rate:.0f}/s")
    run.clean = not run.problems


def _cpu_ms_per_call(run: SippRun | None) -> float | None:
    return round(1000.0 * run.target_cpu_s / run.ok, 3) if run and run.ok else None


def _step_wall_limit(seconds: float) -> float:
    return 2 * seconds + 40.0


def _ramp(
    plan: CallsPlan, *, label: str, target: str, caller_scenario: Path, injection: Path,
    callee_port: int, watch: list[int], alive, retransmittable_per_call: int,
    callee_scenario: Path = CALLEE_SCENARIO,
) -> dict:
    """Offer each step's rate in turn; stop after the first step that is not clean."""
    steps: list[dict] = []
    best: CallRun | None = None
    for index, rate in enumerate(plan.steps):
        if index:
            time.sleep(plan.pause_between_steps_s)
        if not alive():
            raise BenchError(f"{label}: the B2BUA under test died before step {rate}/s")
        attempts: list[CallRun] = []
        for attempt in range(1 + plan.retries_of_unclean_step):
            if attempt:
                time.sleep(plan.retry_pause_s)
            run = run_call_step(
                label=f"{label} {rate} calls/s" + (f" (retry {attempt})" if attempt else ""),
                target=target, caller_scenario=caller_scenario, injection=injection,
                callee_port=callee_port, rate=rate, calls=int(rate * plan.step_seconds),
                watch=watch, wall_limit=_step_wall_limit(plan.step_seconds),
                retransmittable_per_call=retransmittable_per_call,
                callee_scenario=callee_scenario,
            )
            print("bench:", run.summary(), flush=True)
            attempts.append(run)
            if run.clean:
                break
        step = run.as_dict()
        step["cpu_ms_per_call"] = _cpu_ms_per_call(run)
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
        "cpu_ms_per_call": _cpu_ms_per_call(best),
        "reached_last_step_cleanly": (bool(best) and len(steps) == len(plan.steps)
                                      and bool(steps[-1]["clean"])),
    }


# --------------------------------------------------------------------------------------
# 1. the switch
# --------------------------------------------------------------------------------------


def calls_config_text(port: int, devices: int) -> str:
    """One account of ``devices`` devices (the REGISTER bench's generator), no media
    anchoring, long no-answer and session timers (nothing fires during a step), fair use
    off (one account placing hundreds of calls a second is what its call-rate limits
    refuse; Sippy has no such policy either)."""
    return switch_config_text(port=port, accounts=1, devices_per_account=devices) + (
        "media: {backend: none}\n"
        "calls: {no_answer_timeout: 60, session_expires: 1800}\n"
        "fair_use: {enabled: false}\n"
    )


def switch_calls(plan: CallsPlan, workdir: Path) -> dict:
    port = free_udp_port()
    callee_port = free_udp_port()
    config = workdir / "switch-calls.yaml"
    config.write_text(calls_config_text(port, plan.callers + 1))
    users = device_users(1, plan.callers + 1)
    callers, (callee_user, callee_password) = users[:-1], users[-1]
    callee_extension = str(1000 + plan.callers)  # FIRST_EXTENSION + offset of the last
    injection = workdir / "switch-calls-callers.csv"
    write_call_injection(
        injection, [caller_row(user, password, callee_extension) for user, password in callers]
    )
    switch = SwitchProcess(config, workdir / "switch-calls.log", port)
    switch.start(ready_timeout=120)
    target = f"{LOOPBACK}:{port}"
    print(f"bench: switch pid {switch.pid} (calls, media: none), ready in "
          f"{switch.load_seconds:.1f} s", flush=True)
    try:
        register_contacts(
            target=target, rows=[caller_row(callee_user, callee_password, callee_user)],
            contact_port=callee_port, workdir=workdir,
        )
        result = _ramp(
            plan, label="switch", target=target, caller_scenario=CALLER_SCENARIO,
            injection=injection, callee_port=callee_port, watch=[switch.pid],
            alive=switch.alive, retransmittable_per_call=RETRANSMITTABLE_PER_CALL,
        )
    finally:
        switch.stop()
    result.update(
        server="softswitch (one process), media backend none, CDR ledger on",
        callers=len(callers),
        errors_in_log=_log_errors(switch.log_path),
    )
    return result


# --------------------------------------------------------------------------------------
# 2. the Sippy B2BUA, the peer reference
# --------------------------------------------------------------------------------------


def _scratch_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or "/tmp")


def ensure_sippy() -> Path | None:
    """The ``b2bua`` script of the Sippy B2BUA (PyPI ``sippy``) in its own virtualenv under
    $TMPDIR, created with pip when missing. None (reason printed) when it cannot be had."""
    venv = _scratch_dir() / SIPPY_VENV_NAME
    script = venv / "bin" / "b2bua"
    if script.exists():
        return script
    python = shutil.which("python3") or sys.executable
    print(f"bench: Sippy B2BUA not found, installing it into {venv}", flush=True)
    for command in (
        [python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "sippy"],
    ):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"bench: {' '.join(command)} failed: {error}", flush=True)
            return None
        if done.returncode != 0:
            print(f"bench: {' '.join(command)} failed: {done.stderr[-500:]}", flush=True)
            return None
    return script if script.exists() else None


@dataclass
class SippyProcess:
    """``b2bua`` daemonized, static route to the SIPp callee, no auth or accounting;
    stopped by the PID of its pidfile (it ignores SIGTERM)."""

    script: Path
    run_dir: Path
    sip_port: int
    route_port: int
    pid: int = 0

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pidfile = self.run_dir / "b2bua.pid"
        pidfile.unlink(missing_ok=True)
        command = [
            str(self.script), f"--sip_address={LOOPBACK}", f"--sip_port={self.sip_port}",
            f"--static_route={LOOPBACK}:{self.route_port}", "--auth_enable=off",
            "--acct_enable=off", f"--b2bua_socket={self.run_dir / 'b2bua.sock'}",
            f"--pidfile={pidfile}", f"--logfile={self.run_dir / 'b2bua.log'}",
        ]
        # output to a file, not a pipe: the daemon keeps the descriptors it inherits
        start_log = self.run_dir / "b2bua.start.log"
        with open(start_log, "wb") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=60,
                                  cwd=self.run_dir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + SIPPY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = pidfile.read_text().strip() if pidfile.exists() else ""
            if text.isdigit() and udp_port_bound(self.sip_port):
                self.pid = int(text)
                return
            time.sleep(0.1)
        raise BenchError(f"Sippy b2bua did not start (exit {done.returncode}): "
                         f"{start_log.read_text(errors='replace')[-800:]}")

    def alive(self) -> bool:
        return bool(self.pid) and Path(f"/proc/{self.pid}").exists()

    def stop(self) -> None:
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def sippy_calls(plan: CallsPlan, workdir: Path) -> dict:
    script = ensure_sippy()
    if script is None:
        return {"skipped": "the Sippy B2BUA could not be installed (pip install sippy)"}
    sippy = SippyProcess(script, workdir / "sippy", free_udp_port(), free_udp_port())
    injection = workdir / "sippy-callers.csv"
    write_call_injection(
        injection, [caller_row(user, password, "callee")
                    for user, password in device_users(1, plan.callers)]
    )
    sippy.start()
    print(f"bench: sippy b2bua pid {sippy.pid}", flush=True)
    try:
        result = _ramp(
            plan, label="sippy", target=f"{LOOPBACK}:{sippy.sip_port}",
            caller_scenario=PLAIN_CALLER_SCENARIO, injection=injection,
            callee_port=sippy.route_port, watch=[sippy.pid], alive=sippy.alive,
            retransmittable_per_call=RETRANSMITTABLE_PER_PLAIN_CALL,
        )
    finally:
        sippy.stop()
    result["server"] = "Sippy B2BUA 2.5 (PyPI sippy), static route, no auth, no accounting"
    return result


# --------------------------------------------------------------------------------------
# 3. Kamailio as a stateful proxy, the other peer reference
# --------------------------------------------------------------------------------------


def kamailio_calls(plan: CallsPlan, workdir: Path) -> dict:
    """The same ramp through Kamailio (tm, record-route, 407 on INVITE) to the SIPp callee,
    its static destination; callers are the 1000..1998 its htable knows."""
    peers = peers_dir()
    if peers is None:
        return {"skipped": "shared peer configs not found (set PEERS_DIR)"}
    if ensure_kamailio() is None:
        return {"skipped": "kamailio is not installed and could not be installed"}
    if udp_port_bound(KAMAILIO_PORT):
        raise BenchError(f"UDP {LOOPBACK}:{KAMAILIO_PORT} is taken (another Kamailio?)")
    callee_port = free_udp_port()
    callers = kamailio_users(1000)[:plan.callers]
    injection = workdir / "kamailio-callers.csv"
    write_call_injection(injection, [caller_row(user, password, "callee")
                                     for user, password in callers])
    kamailio = KamailioProcess(
        peers, workdir / "kam-calls", children=KAMAILIO_CHILDREN,
        defines=["WITH_INVITE_AUTH", f'STATIC_DST="sip:{LOOPBACK}:{callee_port}"'],
    )
    kamailio.start()
    print(f"bench: kamailio pids {kamailio.pids} (stateful proxy to {callee_port})", flush=True)
    try:
        result = _ramp(
            plan, label="kamailio", target=f"{LOOPBACK}:{KAMAILIO_PORT}",
            caller_scenario=PROXIED_CALLER_SCENARIO, injection=injection,
            callee_port=callee_port, watch=kamailio.pids, alive=kamailio.alive,
            retransmittable_per_call=RETRANSMITTABLE_PER_CALL,
            callee_scenario=UNORDERED_CALLEE_SCENARIO,
        )
    finally:
        kamailio.stop()
    result.update(
        server=(f"Kamailio 5.6 stateful proxy ({KAMAILIO_CHILDREN} UDP workers): tm, "
                "record-route, digest on INVITE (htable), static destination"),
        callers=len(callers),
    )
    return result


def call_ratios(results: dict) -> dict[str, float]:
    """switch / peer of the highest clean calls/s, for each peer that has one."""
    switch = (results.get("switch_calls") or {}).get("highest_clean_rate")
    ratios: dict[str, float] = {}
    for key, name in (("sippy_calls", "switch_to_sippy_ratio"),
                      ("kamailio_proxy", "switch_to_kamailio_ratio")):
        peer = (results.get(key) or {}).get("highest_clean_rate")
        if switch and peer:
            ratios[name] = round(switch / peer, 3)
    return ratios


def run_calls(quick: bool, workdir: Path) -> dict:
    """The three ramps and the ratios; a ramp that cannot run records its error."""
    plan = CallsPlan.quick() if quick else CallsPlan.full()
    results: dict = {"criteria": plan.criteria()}
    for key, function in (("switch_calls", switch_calls), ("sippy_calls", sippy_calls),
                          ("kamailio_proxy", kamailio_calls)):
        if key != "switch_calls":
            time.sleep(plan.pause_between_steps_s)
        try:
            results[key] = function(plan, workdir)
        except BenchError as error:
            print(f"bench: {key}: {error}", file=sys.stderr, flush=True)
            results[key] = {"error": str(error)}
    results.update(call_ratios(results))
    return results

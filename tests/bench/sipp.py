"""One bounded SIPp run against a loopback target, summarised from SIPp's own statistics.

SIPp runs in the foreground with ``-trace_stat -fd 1`` (one statistics row per second);
a hard wall-clock limit kills it, because at overload SIPp can hang despite ``-timeout``.
CPU seconds of the watched processes are read from /proc before and after.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .procs import BenchError, cpu_seconds, free_udp_port

SCENARIO_DIR = Path(__file__).resolve().parent / "sipp"
REGISTER_SCENARIO = SCENARIO_DIR / "register_digest.xml"
SOCKET_BUFFER = 4 * 1024 * 1024
# retransmissions may be at most this share of the requests sent (2 per registration)
MAX_RETRANSMISSION_SHARE = 0.001
# a clean step must also complete at this share of the offered rate
MIN_ACHIEVED_SHARE = 0.9


@dataclass
class SippRun:
    """Summary of one SIPp run (a 'call' is one registration: REGISTER, 401, REGISTER, 200)."""

    label: str
    offered_rate: float
    calls: int
    created: int = 0
    ok: int = 0
    failed: int = 0
    retransmissions: int = 0
    elapsed_s: float = 0.0
    wall_s: float = 0.0
    achieved_rate: float = 0.0
    steady_rate: float = 0.0
    peak_rate: float = 0.0
    udp_rcvbuf_errors: int = 0
    sipp_cpu_s: float = 0.0
    target_cpu_s: float = 0.0
    target_cpu_percent: float = 0.0
    killed_at_wall_limit: bool = False
    returncode: int | None = None
    clean: bool = False
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        state = "clean" if self.clean else "NOT clean: " + "; ".join(self.problems)
        return (
            f"[{self.label}] offered {self.offered_rate:.0f}/s achieved {self.achieved_rate:.0f}/s "
            f"(steady {self.steady_rate:.0f}/s) ok={self.ok} failed={self.failed} "
            f"retrans={self.retransmissions} target_cpu={self.target_cpu_percent:.0f}% "
            f"sipp_cpu={100 * self.sipp_cpu_s / max(self.wall_s, 1e-9):.0f}% -> {state}"
        )


def _udp_rcvbuf_errors() -> int:
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def _last_number(cell: str) -> float:
    # time cells look like "2026-11-23\t10:00:00.123456\t1795432800.123456"
    return float(cell.split("\t")[-1])


def _rates(rows: list[dict[str, str]]) -> tuple[float, float]:
    """Median and peak of per-interval successful registrations/s while calls were still
    being created (the tail of retransmissions is left out)."""
    rates: list[float] = []
    previous: tuple[float, int] | None = None
    for row in rows:
        now = _last_number(row["CurrentTime"])
        ok = int(row["SuccessfulCall(C)"])
        created_in_period = int(row["OutgoingCall(P)"]) + int(row["IncomingCall(P)"])
        if previous is not None and created_in_period > 0 and now > previous[0]:
            rates.append((ok - previous[1]) / (now - previous[0]))
        previous = (now, ok)
    if not rates:
        return 0.0, 0.0
    rates.sort()
    return rates[len(rates) // 2], rates[-1]


def run_sipp(
    *,
    label: str,
    target: str,
    users_csv: Path,
    rate: float,
    calls: int,
    watch: list[int],
    wall_limit: float,
    expires: int = 3600,
    scenario: Path = REGISTER_SCENARIO,
) -> SippRun:
    """Run ``calls`` registrations at ``rate``/s from ``users_csv`` against ``target``
    (``host:port`` on loopback) and judge whether the run was clean."""
    if not target.startswith(("127.", "[::1]")):
        raise BenchError(f"refusing a non-loopback target {target!r}")
    result = SippRun(label=label, offered_rate=rate, calls=calls)
    with tempfile.TemporaryDirectory(prefix="bench-sipp-") as workdir:
        stats_path = Path(workdir) / "stats.csv"
        command = [
            "sipp", target,
            "-sf", str(scenario), "-inf", str(users_csv),
            "-i", "127.0.0.1", "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
            "-m", str(calls), "-r", str(int(rate)), "-rp", "1000",
            "-l", str(max(1000, int(rate * 10))),
            "-set", "expires", str(expires),
            "-buff_size", str(SOCKET_BUFFER),
            "-timeout", str(int(wall_limit)), "-nostdin",
            "-trace_stat", "-stf", str(stats_path), "-fd", "1",
        ]
        cpu_before = {pid: cpu_seconds(pid) for pid in watch}
        drops_before = _udp_rcvbuf_errors()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        process = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            output, _ = process.communicate(timeout=wall_limit)
        except subprocess.TimeoutExpired:
            result.killed_at_wall_limit = True
            process.terminate()
            try:
                output, _ = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                output, _ = process.communicate()
        result.wall_s = time.monotonic() - started
        result.returncode = process.returncode
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.target_cpu_s = sum(cpu_seconds(pid) - cpu_before[pid] for pid in watch)
        result.target_cpu_percent = 100.0 * result.target_cpu_s / max(result.wall_s, 1e-9)
        result.udp_rcvbuf_errors = _udp_rcvbuf_errors() - drops_before
        result.sipp_cpu_s = (usage_after.ru_utime + usage_after.ru_stime) - (
            usage_before.ru_utime + usage_before.ru_stime
        )
        try:
            lines = [ln.rstrip("\n") for ln in stats_path.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            tail = output.decode(errors="replace")[-1500:] if output else ""
            raise BenchError(f"SIPp wrote no statistics ({label}): {tail}") from None
    header = lines[0].split(";")
    rows = [dict(zip(header, line.split(";"), strict=False)) for line in lines[1:]]
    if not rows:
        raise BenchError(f"SIPp wrote no statistics rows ({label})")
    last = rows[-1]
    result.elapsed_s = _last_number(last["CurrentTime"]) - _last_number(last["StartTime"])
    result.created = int(last["TotalCallCreated"])
    result.ok = int(last["SuccessfulCall(C)"])
    result.failed = int(last["FailedCall(C)"])
    result.retransmissions = int(last["Retransmissions(C)"])
    result.achieved_rate = result.ok / result.elapsed_s if result.elapsed_s > 0 else 0.0
    result.steady_rate, result.peak_rate = _rates(rows)
    _judge(result)
    return result


def _judge(run: SippRun) -> None:
    if run.killed_at_wall_limit:
        run.problems.append("killed at the wall-clock limit")
    if run.failed:
        run.problems.append(f"{run.failed} failed")
    if run.ok < run.calls:
        run.problems.append(f"only {run.ok} of {run.calls} completed")
    allowed = MAX_RETRANSMISSION_SHARE * 2 * run.calls
    if run.retransmissions > allowed:
        run.problems.append(f"{run.retransmissions} retransmissions (> {allowed:.0f})")
    if run.achieved_rate < MIN_ACHIEVED_SHARE * run.offered_rate:
        run.problems.append(f"achieved {run.achieved_rate:.0f}/s")
    run.clean = not run.problems


def write_users_csv(path: Path, users: list[tuple[str, str]], domain: str = "127.0.0.1") -> None:
    """SIPp injection file, read in order. The 4th field carries the whole
    ``[authentication ...]`` keyword: SIPp 3.6 mis-parses fields nested inside it."""
    with open(path, "w") as out:
        out.write("SEQUENTIAL\n")
        for username, password in users:
            out.write(
                f"{username};{password};{domain};"
                f"[authentication username={username} password={password}]\n"
            )
    os.chmod(path, 0o644)

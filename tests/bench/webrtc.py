"""Bridged DTLS-SRTP calls per core: browser softphones (WebRTC: ICE, DTLS-SRTP, G.711)
bridged to desk phones (plain RTP) by ``media.webrtc.WebRtcBridge``.

Each step runs ``media.webrtc.run_bench(calls, seconds)`` in a child process
(``python -m tests.bench.webrtc measure N SECONDS OUT``: nothing else on its event loop,
stopped by its PID at a hard wall-clock limit). ``run_bench`` bridges N calls at once,
the browser peers (aiortc) and the phones simulated in the same process, and returns its
counters; a step is clean when no call failed and every call's media flowed both ways
(see :func:`judge_bridge`). The ramp stops at the first step that is not clean twice in
a row. The figure is N / CPU cores used at the largest clean N: bridged calls per core,
the simulated peers included (so the bridge alone costs less).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import REPO_ROOT, BenchError

# G.711 at 20 ms packets: 50 packets per second each way
EXPECTED_PACKETS_PER_SECOND = 50.0
# a call's media is clean when its packet rate is within this share of 50/s
PACKET_RATE_TOLERANCE = 0.05
CHILD_SLACK_S = 60.0


@dataclass
class WebRtcPlan:
    """Concurrent bridged calls per step and how long each step sends media."""

    steps: list[int]
    seconds: float
    pause_between_steps_s: float = 2.0
    retries_of_unclean_step: int = 1

    @classmethod
    def full(cls) -> WebRtcPlan:
        return cls(steps=[2, 4, 8, 12, 16], seconds=10.0)

    @classmethod
    def quick(cls) -> WebRtcPlan:
        return cls(steps=[2, 4], seconds=5.0)

    def criteria(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "call": ("a browser peer (aiortc, ICE on 127.0.0.1, DTLS-SRTP, G.711) sending a "
                     "tone, bridged to a plain-RTP phone sending PCMU at 50 packets/s; the "
                     "bridge decodes and re-encodes both ways"),
            "clean": ("no call failed (errors 0), every call flowing (run_bench: at least 90 % "
                      "of 50 packets/s received at both ends), and every per-call packet rate "
                      f"run_bench reports within {100 * PACKET_RATE_TOLERANCE:.0f} % of "
                      f"{EXPECTED_PACKETS_PER_SECOND:.0f}/s, nothing dropped or lost"),
            "stop": (f"at the first step that is not clean {1 + self.retries_of_unclean_step} "
                     "times in a row"),
            "cpu": ("run_bench's own process CPU time over the measuring window: the bridges "
                    "and the simulated browsers and phones, all in one Python process"),
        }


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, list | tuple):
        return [float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
    return []


def judge_bridge(result: dict, calls: int) -> list[str]:
    """Problems of one run_bench result (empty: clean). Pure: reads only the counters.

    Always: ``errors`` is 0 and ``calls_flowing`` equals ``calls``. When the result also
    carries per-call packet rates (keys containing ``packets_per_second``, a number or one
    per call) each must be within 5 % of 50/s; counters named ``drop``/``lost`` must be 0.
    """
    problems: list[str] = []
    if "error" in result:
        problems.append(str(result["error"]))
        return problems
    errors = result.get("errors")
    if errors is None:
        problems.append("run_bench returned no error count")
    elif errors:
        problems.append(f"{errors} calls failed")
    flowing = result.get("calls_flowing")
    if flowing is None:
        problems.append("run_bench returned no calls_flowing count")
    elif flowing < calls:
        problems.append(f"media flowed in {flowing} of {calls} calls")
    low = EXPECTED_PACKETS_PER_SECOND * (1 - PACKET_RATE_TOLERANCE)
    high = EXPECTED_PACKETS_PER_SECOND * (1 + PACKET_RATE_TOLERANCE)
    for key, value in result.items():
        name = key.lower()
        if "packets_per_second" in name:
            outside = [rate for rate in _numbers(value) if not low <= rate <= high]
            if outside:
                problems.append(f"{key}: {len(outside)} outside {low:g}–{high:g}/s "
                                f"(e.g. {outside[0]:.1f})")
        elif "drop" in name or "lost" in name:
            total = sum(_numbers(value))
            if total:
                problems.append(f"{key}: {total:g}")
    return problems


def packet_rates_reported(result: dict) -> bool:
    """Whether run_bench's result carries per-call packet rates the 5 % rule applies to."""
    return any("packets_per_second" in key.lower() and _numbers(value)
               for key, value in result.items())


def cpu_figures(result: dict, calls: int) -> dict:
    """CPU per bridged call (% of one core) and bridged calls per core, from run_bench's
    ``cpu_cores_used``; empty when it is missing or zero."""
    cores = result.get("cpu_cores_used")
    if not isinstance(cores, int | float) or cores <= 0 or calls <= 0:
        return {}
    return {"cpu_percent_per_call": round(100.0 * cores / calls, 2),
            "calls_per_core": round(calls / cores, 2)}


# --------------------------------------------------------------------------------------
# the child process: one run_bench call
# --------------------------------------------------------------------------------------


def measure(calls: int, seconds: float) -> dict:
    """Call ``media.webrtc.run_bench`` whatever its shape: coroutine or function, with or
    without ``seconds``, returning a mapping or a dataclass."""
    from media import webrtc

    function = webrtc.run_bench
    parameters = inspect.signature(function).parameters
    kwargs = {"seconds": seconds} if "seconds" in parameters else {}
    outcome = function(calls, **kwargs)
    if inspect.isawaitable(outcome):
        async def wait():
            return await outcome

        outcome = asyncio.run(wait())
    if dataclasses.is_dataclass(outcome) and not isinstance(outcome, type):
        outcome = dataclasses.asdict(outcome)
    if not isinstance(outcome, dict):
        raise BenchError(f"run_bench returned {type(outcome).__name__}, not a mapping")
    return dict(outcome)


def _child_main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] != "measure":
        print("usage: python -m tests.bench.webrtc measure CALLS SECONDS OUT", file=sys.stderr)
        return 2
    calls, seconds, out = int(argv[1]), float(argv[2]), Path(argv[3])
    try:
        result = measure(calls, seconds)
    except Exception as error:  # noqa: BLE001 - reported to the harness, not raised
        result = {"error": f"{type(error).__name__}: {error}"}
    out.write_text(json.dumps(result, default=str))
    return 0


def run_step(calls: int, seconds: float, workdir: Path) -> dict:
    """One run_bench in a child process, killed (by its PID) at its wall-clock limit."""
    out = workdir / f"webrtc-{calls}.json"
    out.unlink(missing_ok=True)
    log = workdir / f"webrtc-{calls}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                        if p)
    wall_limit = seconds + CHILD_SLACK_S + 3 * calls
    started = time.monotonic()
    with open(log, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.webrtc", "measure", str(calls), str(seconds),
             str(out)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    killed = False
    try:
        child.wait(timeout=wall_limit)
    except subprocess.TimeoutExpired:
        killed = True
        child.terminate()
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=5)
    finally:
        if child.poll() is None:  # interrupted
            child.kill()
            child.wait(timeout=5)
    wall = time.monotonic() - started
    if killed:
        result: dict = {"error": f"killed at the wall-clock limit ({wall_limit:.0f} s)"}
    elif out.exists():
        result = json.loads(out.read_text())
    else:
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        result = {"error": f"the child exited with {child.returncode} and no result: {tail}"}
    step = {"calls": calls, "wall_seconds": round(wall, 1), "result": result}
    step.update(cpu_figures(result, calls))
    step["problems"] = judge_bridge(result, calls)
    step["clean"] = not step["problems"]
    return step


def _summary(step: dict) -> str:
    result = step["result"]
    state = "clean" if step["clean"] else "NOT clean: " + "; ".join(step["problems"])
    return (f"[webrtc {step['calls']} calls] flowing {result.get('calls_flowing', '?')}, "
            f"errors {result.get('errors', '?')}, CPU {result.get('cpu_cores_used', 0):.2f} "
            f"cores, {step.get('calls_per_core', '?')} calls/core -> {state}")


def run_webrtc(quick: bool, workdir: Path) -> dict:
    plan = WebRtcPlan.quick() if quick else WebRtcPlan.full()
    steps: list[dict] = []
    best: dict | None = None
    with tempfile.TemporaryDirectory(prefix="bench-webrtc-", dir=workdir) as tmp:
        folder = Path(tmp)
        for index, calls in enumerate(plan.steps):
            if index:
                time.sleep(plan.pause_between_steps_s)
            attempts: list[dict] = []
            for attempt in range(1 + plan.retries_of_unclean_step):
                if attempt:
                    time.sleep(plan.pause_between_steps_s)
                step = run_step(calls, plan.seconds, folder)
                print("bench:", _summary(step), flush=True)
                attempts.append(step)
                if step["clean"]:
                    break
            step = attempts[-1]
            step["earlier_attempts"] = [
                {"problems": earlier["problems"], "result": earlier["result"]}
                for earlier in attempts[:-1]]
            steps.append(step)
            if not step["clean"]:
                break
            best = step
    return {
        "criteria": plan.criteria(),
        "steps": steps,
        "packet_rates_checked": any(packet_rates_reported(step["result"]) for step in steps),
        "max_clean_calls": best["calls"] if best else 0,
        "cpu_cores_at_max": (best["result"].get("cpu_cores_used") if best else None),
        "cpu_percent_per_call_at_max": best.get("cpu_percent_per_call") if best else None,
        "calls_per_core": best.get("calls_per_core") if best else None,
        "reached_last_step_cleanly": (bool(best) and len(steps) == len(plan.steps)
                                      and bool(steps[-1]["clean"])),
        "server": "media.webrtc.WebRtcBridge via media.webrtc.run_bench (one Python process, "
                  "simulated browsers and phones included)",
    }


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

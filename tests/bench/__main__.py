"""``python -m tests.bench [--quick] [--only SCENARIO] [--emergency-load CPS]``

SCENARIO: register, kamailio, memory, profile, calls, callmemory, relay, emergency,
fairuse, webrtc or summary (repeatable).

Runs the REGISTER benchmarks (bench-results/register.{json,md,png}; with ``--only``, the
other sections of an existing register.json are kept), the calls-per-second benchmark
with the Sippy B2BUA and Kamailio as a stateful proxy (calls.{json,md,png}), memory per
active call (callmemory.{json,md,png}), the relayed-calls benchmark (relay.{json,md,png})
and the emergency call setup latency benchmark (emergency.{json,md,png}). ``fairuse`` (no
SIP: the fair-use admission cost and Redis round trips per call) writes
fairuse.{json,md,png}; ``webrtc`` (no SIP: bridged DTLS-SRTP calls per core) writes
webrtc.{json,md,png}. Only the files of the scenarios that ran are written. After any run
summary.{json,md,png} is rebuilt from every <scenario>.json in the output folder
(``--only summary`` runs nothing else).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import callmemory, calls, emergency, fairuse, register, relay, report, summary, webrtc
from .procs import REPO_ROOT, BenchError, machine_description

REGISTER_SCENARIOS = ("register", "kamailio", "memory", "profile")
SCENARIOS = (*REGISTER_SCENARIOS, "calls", "callmemory", "relay", "emergency", "fairuse",
             "webrtc", "summary")
# scenarios that need no SIPp
WITHOUT_SIPP = {"fairuse", "webrtc", "summary"}
FALLBACK_CLEAN_RATE = 1000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="fewer and shorter steps, 10k bindings: a smoke run")
    parser.add_argument("--only", action="append", choices=SCENARIOS,
                        help="run only this scenario (repeatable)")
    parser.add_argument("--rate", type=int, default=None,
                        help="clean rate for memory/profile when the ramp is not run")
    parser.add_argument("--emergency-load", type=int, default=None, metavar="CPS",
                        help="emergency: background calls/s while the emergency calls are "
                             f"placed (default {emergency.DEFAULT_BACKGROUND_RATE})")
    parser.add_argument("--output", default=str(REPO_ROOT / "bench-results"),
                        help="results folder (default: bench-results/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for tool in ("sipp",) if set(args.only or SCENARIOS) - WITHOUT_SIPP else ():
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (apt-get install sip-tester)", file=sys.stderr)
            return 2
    chosen = set(args.only or SCENARIOS)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    command = "python -m tests.bench" + (" " + " ".join(argv) if argv else (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""))
    status = 0
    if chosen & set(REGISTER_SCENARIOS):
        status = _register_benchmarks(args, chosen, output, command.strip())
    for name, runner, markdown, plot in (
        ("calls", calls.run_calls, report.calls_markdown, report.calls_plot),
        ("callmemory", callmemory.run_callmemory, report.callmemory_markdown,
         report.callmemory_plot),
        ("relay", relay.run_relay, report.relay_markdown, report.relay_plot),
        ("emergency",
         lambda quick, workdir: emergency.run_emergency(
             quick, workdir, background_rate=args.emergency_load),
         report.emergency_markdown, report.emergency_plot),
        ("fairuse", fairuse.run_fairuse, report.fairuse_markdown, report.fairuse_plot),
        ("webrtc", webrtc.run_webrtc, report.webrtc_markdown, report.webrtc_plot),
    ):
        if name in chosen and status != 130:
            status = max(status, _other_benchmark(
                name, runner, markdown, plot, args, output, command.strip()))
    _summary(output)
    return status


def _summary(output: Path) -> None:
    """summary.{json,md,png} from whatever results the output folder holds."""
    built = summary.build_summary(output)
    if built is None:
        print(f"bench: no scenario results in {output}: no summary", flush=True)
        return
    print(f"bench: wrote {output / 'summary.json'}, summary.md"
          + (", summary.png" if built.get("plotted") else " (no plot)")
          + f"; targets met {built['targets_met']} of {built['targets_total']}", flush=True)


def _other_benchmark(name: str, runner, markdown, plot, args: argparse.Namespace,
                     output: Path, command: str) -> int:
    """One of the call benchmarks: runner(quick, workdir) -> results, written as
    ``<name>.json``, ``<name>.md`` and ``<name>.png``."""
    results: dict = {"machine": machine_description(), "command": command,
                     "quick": args.quick}
    started = time.monotonic()
    status = 0
    with tempfile.TemporaryDirectory(prefix=f"softswitch-bench-{name}-") as tmp:
        try:
            results.update(runner(args.quick, Path(tmp)))
        except BenchError as error:
            print(f"bench: {name}: {error}", file=sys.stderr)
            results["error"] = str(error)
            status = 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            status = 130
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    if any(isinstance(v, dict) and "error" in v for v in results.values()):
        status = max(status, 1)
    json_path = output / f"{name}.json"
    report.write_json(results, json_path)
    (output / f"{name}.md").write_text(markdown(results))
    plotted = plot(results, output / f"{name}.png")
    print(f"bench: wrote {json_path}, {name}.md" + (f", {name}.png" if plotted else
          " (no plot: matplotlib missing, pip install -e '.[bench]')"), flush=True)
    return status


def _register_benchmarks(args: argparse.Namespace, chosen: set[str], output: Path,
                         command: str) -> int:
    plan = register.Plan.quick() if args.quick else register.Plan.full()
    json_path = output / "register.json"
    results: dict = {}
    if args.only and json_path.exists():
        try:
            results = json.loads(json_path.read_text())
        except ValueError:
            results = {}
    results.update(machine=machine_description(), command=command,
                   quick=args.quick, criteria=plan.criteria())
    started = time.monotonic()
    status = 0
    with tempfile.TemporaryDirectory(prefix="softswitch-bench-") as tmp:
        workdir = Path(tmp)
        try:
            status = _run_scenarios(args, chosen, plan, workdir, results)
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            status = 130
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    report.write_json(results, json_path)
    (output / "register.md").write_text(report.markdown(results))
    plotted = report.plot(results, output / "register.png")
    print(f"bench: wrote {json_path}, register.md" + (", register.png" if plotted else
          " (no plot: matplotlib missing, pip install -e '.[bench]')"), flush=True)
    return status


def _run_scenarios(
    args: argparse.Namespace, chosen: set[str], plan: register.Plan, workdir: Path,
    results: dict,
) -> int:
    """Run each chosen scenario; one that cannot run records its error and the others
    still run. Returns the exit status (1 when any scenario failed to run)."""
    status = 0

    def attempt(key: str, function, *extra) -> None:
        nonlocal status
        try:
            results[key] = function(plan, workdir, *extra)
        except BenchError as error:
            print(f"bench: {key}: {error}", file=sys.stderr)
            results[key] = {"error": str(error)}
            status = 1

    if "register" in chosen:
        attempt("switch_register", register.switch_ramp)
    if "kamailio" in chosen:
        time.sleep(plan.pause_between_steps_s)
        attempt("kamailio_register", register.kamailio_ramp)
    results.pop("switch_to_kamailio_ratio", None)
    _ratio(results)
    clean_rate = args.rate or (results.get("switch_register") or {}).get(
        "highest_clean_rate") or FALLBACK_CLEAN_RATE
    if "memory" in chosen:
        time.sleep(plan.pause_between_steps_s)
        attempt("memory", register.memory_per_binding, clean_rate)
    if "profile" in chosen:
        time.sleep(plan.pause_between_steps_s)
        attempt("profile", register.profile_switch, clean_rate)
    return status


def _ratio(results: dict) -> None:
    switch = (results.get("switch_register") or {}).get("highest_clean_rate")
    kamailio = (results.get("kamailio_register") or {}).get("highest_clean_rate")
    if switch and kamailio:
        results["switch_to_kamailio_ratio"] = round(switch / kamailio, 3)


if __name__ == "__main__":
    sys.exit(main())

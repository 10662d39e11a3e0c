"""bench-results/register.{json,md,png} from the results dictionary."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 1048576:.1f} MiB"


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def markdown(results: dict) -> str:
    machine = results.get("machine", {})
    out = [
        "# REGISTER benchmark",
        "",
        f"{machine.get('date', '')}: {machine.get('nproc', '?')} × {machine.get('cpu_model', '?')}, "
        f"Python {machine.get('python', '?')}, SIPp {machine.get('sipp', '?')}; "
        "load generator and server share the machine. "
        f"Command: `{results.get('command', 'python -m tests.bench')}`.",
        "",
    ]
    criteria = results.get("criteria")
    if criteria:
        out += [f"A step lasts {criteria['step_seconds']:g} s; it is clean with "
                f"{criteria['clean']}. The ramp stops {criteria['stop']}.", ""]

    summary = [("| measure | softswitch | Kamailio 5.6 |"), "| --- | --- | --- |"]
    switch = results.get("switch_register") or {}
    kamailio = results.get("kamailio_register") or {}
    if switch or kamailio:
        summary.append(
            f"| highest clean REGISTER/s (with digest) | {_num(switch.get('highest_clean_rate'))} "
            f"| {_num(kamailio.get('highest_clean_rate'))} |"
        )
        summary.append(
            f"| CPU at that rate (% of one core) | {_num(switch.get('cpu_percent_at_highest_clean'))} "
            f"| {_num(kamailio.get('cpu_percent_at_highest_clean'))} (all workers) |"
        )
        summary.append(
            f"| CPU per registration (ms) | {_num(switch.get('cpu_ms_per_registration'), 3)} "
            f"| {_num(kamailio.get('cpu_ms_per_registration'), 3)} |"
        )
        summary.append(
            f"| users | {_num(switch.get('devices'))} | {_num(kamailio.get('devices'))} |"
        )
        for run in switch.get("sustained") or []:
            verdict = "clean" if run["clean"] else "not clean: " + "; ".join(run["problems"])
            summary.append(
                f"| {run['label']} | {run['achieved_rate']:,.0f}/s achieved, "
                f"CPU {run['target_cpu_percent']:.0f} %, {verdict} | — |"
            )
        out += summary
        ratio = results.get("switch_to_kamailio_ratio")
        if ratio is not None:
            out += ["", f"softswitch / Kamailio (highest clean rate): **{ratio:.2f}**"]
        if kamailio.get("reached_last_step_cleanly"):
            out += ["", "Kamailio was clean at the last step: its figure is a lower bound "
                    "(the load generator shares the CPU)."]
        out.append("")

    for key, title in (
        ("switch_register", "softswitch"), ("kamailio_register", "Kamailio"),
        ("memory", "memory"), ("profile", "profile"),
    ):
        data = results.get(key) or {}
        for outcome in ("skipped", "error"):
            if outcome in data:
                out += [f"{title}: {outcome} ({data[outcome]})", ""]

    for key, title in (("switch_register", "softswitch"), ("kamailio_register", "Kamailio")):
        data = results.get(key) or {}
        if not data.get("steps"):
            continue
        out += [
            f"## {title}: steps",
            "",
            "| offered /s | achieved /s | steady /s | ok | failed | retrans | CPU % | "
            "CPU ms/reg | clean |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for step in data["steps"]:
            clean = "yes" if step["clean"] else "no: " + "; ".join(step["problems"])
            for earlier in step.get("earlier_attempts") or []:
                clean += " (earlier try: " + "; ".join(earlier["problems"]) + ")"
            out.append(
                f"| {step['offered_rate']:,.0f} | {step['achieved_rate']:,.0f} | "
                f"{step['steady_rate']:,.0f} | {step['ok']:,} | {step['failed']:,} | "
                f"{step['retransmissions']:,} | {step['target_cpu_percent']:.0f} | "
                f"{_num(step.get('cpu_ms_per_registration'), 3)} | {clean} |"
            )
        out.append("")

    memory = results.get("memory") or {}
    if memory.get("step_with_all_bindings"):
        small = memory["step_with_1k_bindings"]
        large = memory["step_with_all_bindings"]
        bindings = memory["bindings_registered"]
        out += [
            f"## Memory with {bindings:,} bindings",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| devices in the configuration | {memory['devices']:,} "
            f"({memory['accounts']} accounts) |",
            f"| switch start with that configuration | {memory['start_seconds']:.1f} s |",
            f"| RSS after start | {_mib(memory['rss_after_start'])} |",
            f"| RSS with 1,000 bindings | {_mib(memory['rss_with_1k_bindings'])} |",
            f"| RSS right after registering all | "
            f"{_mib(memory['rss_right_after_all_registered'])} |",
            f"| RSS with all bindings, {memory['settle_seconds']:.0f} s later | "
            f"{_mib(memory['rss_with_all_bindings'])} |",
            f"| **memory per binding** (heap still allocated {memory['settle_seconds']:.0f} s "
            f"after registering the last {memory.get('traced_bindings', 0):,}, traced) | "
            f"**{_num(memory.get('traced_bytes_per_binding'))} bytes** |",
            f"| ΔRSS from start / bindings (masked by the heap freed after loading) | "
            f"{memory['bytes_per_binding']:,} bytes |",
        ]
        for bulk in memory["bulk_registration"]:
            out.append(
                f"| {bulk['label']} | "
                f"{bulk['ok']:,} ok, {bulk['failed']:,} failed, "
                f"{bulk['retransmissions']:,} retrans, CPU {bulk['target_cpu_percent']:.0f} % |"
            )
        heap = memory.get("heap") or {}
        if heap.get("by_file"):
            out += [
                "",
                f"Heap still allocated from the last {memory.get('traced_bindings', 0):,} "
                "registrations, by source file "
                f"(tracemalloc; {heap['traced_bytes'] / 1048576:.1f} MiB in all):",
                "",
                "| file | bytes | blocks |",
                "| --- | ---: | ---: |",
            ]
            out += [f"| `{row['file']}` | {row['bytes']:,} | {row['blocks']:,} |"
                    for row in heap["by_file"][:8]]
        out += [
            "",
            f"Same step ({memory['rate']:,.0f}/s over the 1,000 users of the first account) "
            "with few and with all bindings present:",
            "",
            "| bindings present | achieved /s | failed | retrans | CPU % | CPU ms/reg |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for count, step in (("1,000", small), (f"{bindings:,}", large)):
            out.append(
                f"| {count} | {step['achieved_rate']:,.0f} | {step['failed']:,} | "
                f"{step['retransmissions']:,} | {step['target_cpu_percent']:.0f} | "
                f"{_num(step.get('cpu_ms_per_registration'), 3)} |"
            )
        if memory.get("cpu_cost_growth") is not None:
            out += ["", f"CPU per registration grows × {memory['cpu_cost_growth']:.2f} "
                    f"from 1,000 to {bindings:,} bindings."]
        out.append("")

    profile = results.get("profile") or {}
    if profile.get("top_own_time"):
        out += [
            f"## Where the switch spends its CPU at {profile['rate']:,.0f} REGISTER/s",
            "",
            f"py-spy, {profile['seconds']} s, {profile['samples']:,} samples; own time "
            "(the function itself, not its callees):",
            "",
            "| % | function |",
            "| ---: | --- |",
        ]
        out += [f"| {row['percent']:.1f} | `{row['function']}` |"
                for row in profile["top_own_time"]]
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    """Offered vs achieved REGISTER/s for the switch and Kamailio; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (axes, cpu_axes) = plt.subplots(1, 2, figsize=(12, 5))
    highest = 0.0
    for key, name, marker, order in (
        ("kamailio_register", "Kamailio 5.6 (4 workers)", "s", 2),
        ("switch_register", "softswitch (1 process)", "o", 3),
    ):
        steps = (results.get(key) or {}).get("steps") or []
        if not steps:
            continue
        offered = [s["offered_rate"] for s in steps]
        achieved = [s["achieved_rate"] for s in steps]
        cpu = [s["target_cpu_percent"] for s in steps]
        highest = max(highest, *offered, *achieved)
        line = axes.plot(offered, achieved, marker=marker, label=name, zorder=order)[0]
        cpu_axes.plot(offered, cpu, marker=marker, label=name, color=line.get_color())
        bad = [(o, a) for o, a, s in zip(offered, achieved, steps, strict=True) if not s["clean"]]
        if bad:
            axes.scatter(*zip(*bad, strict=True), s=160, facecolors="none", zorder=order,
                         edgecolors=line.get_color(), linewidths=2)
    if highest:
        axes.plot([0, highest], [0, highest], linestyle=":", color="grey", label="offered = achieved")
    axes.set_xlabel("offered REGISTER/s (with digest: 2 transactions each)")
    axes.set_ylabel("achieved successful REGISTER/s")
    axes.set_title("REGISTER rate (circled: step not clean; ramp stops)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    cpu_axes.set_xlabel("offered REGISTER/s")
    cpu_axes.set_ylabel("CPU of the server, % of one core")
    cpu_axes.set_title("server CPU per step (same machine as SIPp)")
    cpu_axes.grid(True, alpha=0.3)
    cpu_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True

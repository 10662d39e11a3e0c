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


# --------------------------------------------------------------------------------------
# calls.{md,png}: calls per second through the B2BUA
# --------------------------------------------------------------------------------------


def _machine_line(results: dict) -> str:
    machine = results.get("machine", {})
    return (
        f"{machine.get('date', '')}: {machine.get('nproc', '?')} × "
        f"{machine.get('cpu_model', '?')}, Python {machine.get('python', '?')}, SIPp "
        f"{machine.get('sipp', '?')}; load generator and server share the machine. "
        f"Command: `{results.get('command', 'python -m tests.bench')}`."
    )


def _outcomes(results: dict, sections: tuple[tuple[str, str], ...]) -> list[str]:
    out: list[str] = []
    if "error" in results:
        out += [f"error: {results['error']}", ""]
    for key, title in sections:
        data = results.get(key) or {}
        for outcome in ("skipped", "error"):
            if outcome in data:
                out += [f"{title}: {outcome} ({data[outcome]})", ""]
    return out


def _verdict(step: dict) -> str:
    verdict = "yes" if step["clean"] else "no: " + "; ".join(step["problems"])
    for earlier in step.get("earlier_attempts") or []:
        verdict += " (earlier try: " + "; ".join(earlier["problems"]) + ")"
    return verdict


CALL_SERVERS = (
    ("switch_calls", "softswitch"),
    ("sippy_calls", "Sippy B2BUA"),
    ("kamailio_proxy", "Kamailio proxy"),
)


def calls_markdown(results: dict) -> str:
    out = ["# Calls per second through the B2BUA (no media)", "", _machine_line(results), ""]
    criteria = results.get("criteria")
    if criteria:
        out += [f"One call: {criteria['call']}. A step lasts {criteria['step_seconds']:g} s; "
                f"it is clean with {criteria['clean']}. The ramp stops {criteria['stop']}.", ""]
    servers = [(results.get(key) or {}, name) for key, name in CALL_SERVERS]
    if any(data.get("steps") for data, _ in servers):
        switch = servers[0][0]
        out += [
            "| measure | " + " | ".join(name for _, name in servers) + " |",
            "| --- |" + " --- |" * len(servers),
            "| highest clean calls/s | "
            + " | ".join(_num(data.get("highest_clean_rate")) for data, _ in servers) + " |",
            "| CPU at that rate (% of one core) | "
            + " | ".join(_num(data.get("cpu_percent_at_highest_clean")) for data, _ in servers)
            + " |",
            "| CPU per call (ms) | "
            + " | ".join(_num(data.get("cpu_ms_per_call"), 3) for data, _ in servers) + " |",
            f"| what it does per call | {switch.get('server', '—')}; digest on INVITE | "
            + " | ".join(data.get("server", "—") for data, _ in servers[1:]) + " |",
        ]
        ratios = [(results.get(key), name) for key, name in (
            ("switch_to_sippy_ratio", "Sippy"), ("switch_to_kamailio_ratio", "Kamailio"))]
        lines = [f"softswitch / {name} (highest clean calls/s): **{ratio:.2f}**"
                 for ratio, name in ratios if ratio is not None]
        if lines:
            out += ["", *(f"- {line}" for line in lines)]
        for data, name in servers:
            if data.get("reached_last_step_cleanly"):
                out += ["", f"{name} was clean at the last step: its figure is a lower bound."]
        if (results.get("kamailio_proxy") or {}).get("steps"):
            out += ["", "Kamailio's caller is `uac_call_digest_rr.xml`: the softswitch's call "
                    "(`uac_call_digest.xml`, 407 on the first INVITE) with the 200's "
                    "Record-Route set sent back as Route headers on the ACK and the BYE, as a "
                    "UA does through a record-routing proxy. Kamailio's CPU is the sum of all "
                    "its processes (several cores), the softswitch's that of its one process."]
        out.append("")
    out += _outcomes(results, CALL_SERVERS)
    for key, title in CALL_SERVERS:
        data = results.get(key) or {}
        if not data.get("steps"):
            continue
        out += [
            f"## {title}: steps",
            "",
            "| offered calls/s | achieved /s | steady /s | ok | failed | retrans (caller + "
            "callee) | CPU % | CPU ms/call | clean |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for step in data["steps"]:
            out.append(
                f"| {step['offered_rate']:,.0f} | {step['achieved_rate']:,.0f} | "
                f"{step['steady_rate']:,.0f} | {step['ok']:,} | "
                f"{step['failed'] + step.get('callee_failed', 0):,} | "
                f"{step.get('caller_retransmissions', 0):,} + "
                f"{step.get('callee_retransmissions', 0):,} | "
                f"{step['target_cpu_percent']:.0f} | {_num(step.get('cpu_ms_per_call'), 3)} | "
                f"{_verdict(step)} |"
            )
        out.append("")
    return "\n".join(out)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def calls_plot(results: dict, path: Path) -> bool:
    """Offered vs achieved calls/s and CPU per step: switch, Sippy and Kamailio."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, (axes, cpu_axes) = plt.subplots(1, 2, figsize=(12, 5))
    highest = 0.0
    for key, name, marker in (("kamailio_proxy", "Kamailio 5.6 proxy (4 workers)", "^"),
                              ("sippy_calls", "Sippy B2BUA 2.5", "s"),
                              ("switch_calls", "softswitch (1 process)", "o")):
        steps = (results.get(key) or {}).get("steps") or []
        if not steps:
            continue
        offered = [s["offered_rate"] for s in steps]
        achieved = [s["achieved_rate"] for s in steps]
        highest = max(highest, *offered, *achieved)
        line = axes.plot(offered, achieved, marker=marker, label=name)[0]
        cpu_axes.plot(offered, [s["target_cpu_percent"] for s in steps], marker=marker,
                      label=name, color=line.get_color())
        bad = [(o, a) for o, a, s in zip(offered, achieved, steps, strict=True) if not s["clean"]]
        if bad:
            axes.scatter(*zip(*bad, strict=True), s=160, facecolors="none",
                         edgecolors=line.get_color(), linewidths=2)
    if highest:
        axes.plot([0, highest], [0, highest], linestyle=":", color="grey",
                  label="offered = achieved")
    axes.set_xlabel("offered calls/s (INVITE ... BYE, no media)")
    axes.set_ylabel("achieved successful calls/s")
    axes.set_title("call rate (circled: step not clean; ramp stops)")
    axes.grid(True, alpha=0.3)
    if highest:
        axes.legend()
    cpu_axes.set_xlabel("offered calls/s")
    cpu_axes.set_ylabel("CPU of the server (all its processes), % of one core")
    cpu_axes.set_title("server CPU per step (same machine as SIPp)")
    cpu_axes.grid(True, alpha=0.3)
    if highest:
        cpu_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------
# relay.{md,png}: concurrent relayed G.711 calls
# --------------------------------------------------------------------------------------


def _latency(values: dict | None, key: str) -> str:
    if not values or key not in values:
        return "—"
    return f"{values[key]:,.0f}"


def relay_markdown(results: dict) -> str:
    out = ["# Relayed G.711 calls with zero loss", "", _machine_line(results), ""]
    criteria = results.get("criteria")
    if criteria:
        out += [
            f"Each step sets up N calls, then sends {criteria['packets']} for "
            f"{criteria['rtp_seconds']:g} s. A step is clean with {criteria['clean']}. The "
            f"ramp stops {criteria['stop']}. Latency: {criteria['latency']}.", ""]
    switch = results.get("switch_relay") or {}
    peer = results.get("rtpengine_relay") or {}
    if switch.get("steps") or peer.get("steps"):
        rows = [
            ("most concurrent calls with zero loss", "max_zero_loss_calls", 0),
            ("packets/s relayed at that N", "packets_per_second_at_max", 0),
            ("CPU at that N (% of one core)", "cpu_percent_at_max", 0),
            ("CPU per relayed packet (µs)", "cpu_us_per_packet_at_max", 1),
        ]
        out += ["| measure | softswitch | rtpengine |", "| --- | --- | --- |"]
        for title, key, digits in rows:
            out.append(f"| {title} | {_num(switch.get(key), digits)} | "
                       f"{_num(peer.get(key), digits)} |")
        for label, key in (("p50", "p50"), ("p99", "p99")):
            out.append(
                f"| latency added by the relay, {label} (µs) | "
                f"{_latency(switch.get('added_latency_us_at_max'), key)} | "
                f"{_latency(peer.get('added_latency_us_at_max'), key)} |")
        out.append(f"| ramp stopped by | {switch.get('stopped_by', '—')} | "
                   f"{peer.get('stopped_by', '—')} |")
        out.append(f"| what it is | {switch.get('server', '—')} | {peer.get('server', '—')} |")
        ratio = results.get("switch_to_rtpengine_ratio")
        if ratio is not None:
            out += ["", f"softswitch / rtpengine (most calls with zero loss): **{ratio:.2f}**"]
        for data, name in ((switch, "softswitch"), (peer, "rtpengine")):
            if data.get("lower_bound"):
                out += ["", f"{name}: the ramp ended without loss ({data.get('stopped_by')}): "
                        "its figure is a lower bound."]
        out.append("")
    out += _outcomes(results, (("switch_relay", "softswitch"), ("rtpengine_relay", "rtpengine")))
    for key, title in (("switch_relay", "softswitch"), ("rtpengine_relay", "rtpengine")):
        data = results.get(key) or {}
        if not data.get("steps"):
            continue
        out += [
            f"## {title}: steps",
            "",
            "| calls | set up | sent | lost | relayed pkt/s | relay CPU % | µs CPU/pkt | "
            "generator CPU % | latency p50 / p99 (µs) | direct p50 / p99 | added p50 / p99 "
            "| clean |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| --- |",
        ]
        for step in data["steps"]:
            lat, base, added = (step.get("latency_us"), step.get("baseline_latency_us"),
                                step.get("added_latency_us"))
            out.append(
                f"| {step['calls']:,} | {step['calls_set_up']:,} | {step['sent']:,} | "
                f"{step['lost']:,} | {step['relayed_packets_per_s']:,.0f} | "
                f"{step['relay_cpu_percent']:.0f} | "
                f"{_num(step.get('relay_cpu_us_per_packet'), 1)} | "
                f"{step['generator_cpu_percent']:.0f} | {_latency(lat, 'p50')} / "
                f"{_latency(lat, 'p99')} | {_latency(base, 'p50')} / {_latency(base, 'p99')} "
                f"| {_latency(added, 'p50')} / {_latency(added, 'p99')} | {_verdict(step)} |"
            )
        out.append("")
    return "\n".join(out)


def relay_plot(results: dict, path: Path) -> bool:
    """Relayed packets/s, relay CPU and added latency against concurrent calls."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, (rate_axes, cpu_axes, latency_axes) = plt.subplots(1, 3, figsize=(16, 5))
    highest = 0
    for key, name, marker in (("rtpengine_relay", "rtpengine (userspace, 1 thread)", "s"),
                              ("switch_relay", "softswitch (1 process)", "o")):
        steps = [s for s in (results.get(key) or {}).get("steps") or [] if s["sent"]]
        if not steps:
            continue
        calls = [s["calls"] for s in steps]
        highest = max(highest, *calls)
        line = rate_axes.plot(calls, [s["relayed_packets_per_s"] for s in steps],
                              marker=marker, label=name)[0]
        color = line.get_color()
        lossy = [(s["calls"], s["relayed_packets_per_s"]) for s in steps if not s["clean"]]
        if lossy:
            rate_axes.scatter(*zip(*lossy, strict=True), s=160, facecolors="none",
                              edgecolors=color, linewidths=2)
        cpu_axes.plot(calls, [s["relay_cpu_percent"] for s in steps], marker=marker,
                      label=name, color=color)
        for percentile, style in (("p50", "-"), ("p99", "--")):
            points = [(s["calls"], s["added_latency_us"][percentile]) for s in steps
                      if percentile in (s.get("added_latency_us") or {})]
            if points:
                latency_axes.plot(*zip(*points, strict=True), marker=marker, linestyle=style,
                                  color=color, label=f"{name}, {percentile}")
    if highest:
        rate_axes.plot([0, highest], [0, 2 * 50 * highest], linestyle=":", color="grey",
                       label="sent (100 pkt/s per call)")
    rate_axes.set_xlabel("concurrent G.711 calls")
    rate_axes.set_ylabel("packets/s received at the far ends")
    rate_axes.set_title("relayed packets (circled: step not clean; ramp stops)")
    cpu_axes.set_xlabel("concurrent G.711 calls")
    cpu_axes.set_ylabel("CPU of the relay, % of one core")
    cpu_axes.set_title("relay CPU (same machine as the generator)")
    latency_axes.set_xlabel("concurrent G.711 calls")
    latency_axes.set_ylabel("one-way latency added by the relay (µs)")
    latency_axes.set_title("added latency, relay − direct")
    latency_axes.set_yscale("symlog", linthresh=100)
    for axes in (rate_axes, cpu_axes, latency_axes):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------
# emergency.{md,png}: emergency call setup latency, idle and under call load
# --------------------------------------------------------------------------------------


def _stat(phase: dict, group: str, key: str, digits: int = 1) -> str:
    return _num((phase.get(group) or {}).get(key), digits)


def emergency_markdown(results: dict) -> str:
    out = ["# Emergency call setup latency (device INVITE → emergency trunk INVITE)", "",
           _machine_line(results), ""]
    criteria = results.get("criteria")
    if criteria:
        out += [
            f"Latency: {criteria['latency']}. Each phase places {criteria['calls_per_phase']} "
            f"emergency calls one at a time (at most {criteria['pace_per_s']:g}/s, rotating "
            f"over {criteria['devices']} devices), dialling {criteria['dialled']}; the "
            f"emergency trunk, profile {criteria['trunk_profile']}, answers 200 at once and "
            f"the device hangs up. Loaded: {criteria['background']}. A failure: "
            f"{criteria['failure']}.", "",
            f"Switch: {results.get('server', '—')}. Everything shares the machine's "
            f"{(results.get('machine') or {}).get('nproc', '?')} cores: the switch, the SIPp "
            "caller and callee of the background load, the measuring child process (the "
            "devices and the emergency trunk, Python asyncio) and the harness. Under load the "
            "figures include CPU contention on those cores, not only the switch's own queueing; "
            "the measuring child's event-loop lag is given so its share can be judged.", "",
        ]
    out += _outcomes(results, ())
    idle, loaded = results.get("idle") or {}, results.get("loaded") or {}
    if idle or loaded:
        background = loaded.get("background") or {}
        out += ["| measure | idle | loaded |", "| --- | ---: | ---: |"]
        out.append(f"| emergency calls ok / placed | {_num(idle.get('ok'))} / "
                   f"{_num(idle.get('calls'))} | {_num(loaded.get('ok'))} / "
                   f"{_num(loaded.get('calls'))} |")
        out.append(f"| failures | {_num(idle.get('failures'))} | "
                   f"{_num(loaded.get('failures'))} |")
        for key in ("p50", "p90", "p95", "p99", "max", "mean"):
            label = f"**{key}**" if key in ("p50", "p99") else key
            out.append(f"| setup latency {label} (ms) | {_stat(idle, 'latency_ms', key, 2)} | "
                       f"{_stat(loaded, 'latency_ms', key, 2)} |")
        for key in ("p50", "p99"):
            out.append(f"| INVITE with credentials → 200 at the device, {key} (ms) | "
                       f"{_stat(idle, 'answer_ms', key, 2)} | "
                       f"{_stat(loaded, 'answer_ms', key, 2)} |")
        out.append(f"| background offered calls/s | — | "
                   f"{_num(background.get('offered_rate'))} |")
        out.append(f"| background successful calls/s during the emergency calls | — | "
                   f"{_num(background.get('rate_during_emergency_calls'), 1)} |")
        out.append(f"| background calls ok / failed (whole SIPp run) | — | "
                   f"{_num(background.get('ok'))} / {_num(background.get('failed'))} |")
        out.append(f"| background retransmissions (SIPp caller) | — | "
                   f"{_num(background.get('retransmissions'))} |")
        out.append(f"| switch CPU over the phase (% of one core) | "
                   f"{_num(idle.get('switch_cpu_percent'))} | "
                   f"{_num(loaded.get('switch_cpu_percent'))} |")
        for title, key in (
            ("SIPp, measuring child and harness CPU (% of one core)",
             "sipp_and_measuring_cpu_percent"),
            ("other processes on the machine, not this benchmark (% of one core)",
             "other_processes_cpu_percent"),
            ("whole machine busy (% of one core; 100 × cores = all busy)",
             "machine_busy_percent"),
        ):
            out.append(f"| {title} | {_num(idle.get(key))} | {_num(loaded.get(key))} |")
        out.append(f"| measuring child's event-loop lag p99 / max (ms) | "
                   f"{_stat(idle, 'loop_lag_ms', 'p99', 2)} / "
                   f"{_stat(idle, 'loop_lag_ms', 'max', 2)} | "
                   f"{_stat(loaded, 'loop_lag_ms', 'p99', 2)} / "
                   f"{_stat(loaded, 'loop_lag_ms', 'max', 2)} |")
        out.append("")
        ratio = results.get("loaded_to_idle_p50")
        if ratio is not None:
            out += [f"Loaded / idle (p50 setup latency): **{ratio:.2f}**", ""]
        if background.get("problems"):
            out += ["**The loaded phase was not under the intended load:** "
                    + "; ".join(background["problems"]) + ".", ""]
        reasons = [f"- {name} failure: {reason}" for name, phase in
                   (("idle", idle), ("loaded", loaded))
                   for reason in phase.get("failure_reasons") or []]
        if reasons:
            out += [*reasons, ""]
        uri = idle.get("trunk_request_uri") or loaded.get("trunk_request_uri")
        if uri:
            out += [f"Request-URI at the emergency trunk: `{uri}`.", ""]
    log = results.get("switch_log") or {}
    if log.get("events"):
        out += ["Switch log (level warning) by event:", "", "| level event | lines |",
                "| --- | ---: |"]
        out += [f"| `{name}` | {count:,} |" for name, count in log["events"].items()]
        out.append("")
        for line in log.get("first_errors") or []:
            out.append(f"- `{line}`")
        out.append("")
    return "\n".join(out)


def emergency_plot(results: dict, path: Path) -> bool:
    """Latency CDF idle vs loaded, and each call's latency in order."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, (cdf_axes, series_axes) = plt.subplots(1, 2, figsize=(12, 5))
    plotted = False
    background = ((results.get("loaded") or {}).get("background") or {})
    for key, name, marker in (("idle", "idle", "o"), ("loaded", "under call load", "s")):
        values = (results.get(key) or {}).get("latencies_ms") or []
        if not values:
            continue
        if key == "loaded" and background.get("rate_during_emergency_calls") is not None:
            name += f" ({background['rate_during_emergency_calls']:,.0f} calls/s)"
        ordered = sorted(values)
        shares = [(index + 1) / len(ordered) for index in range(len(ordered))]
        line = cdf_axes.step(ordered, shares, where="post", label=name)[0]
        series_axes.plot(range(1, len(values) + 1), values, marker=marker, markersize=3,
                         linestyle="none", label=name, color=line.get_color())
        plotted = True
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    cdf_axes.set_xscale("log")
    cdf_axes.set_xlabel("setup latency, device INVITE → emergency trunk INVITE (ms)")
    cdf_axes.set_ylabel("share of emergency calls")
    cdf_axes.set_title("emergency call setup latency (CDF)")
    series_axes.set_yscale("log")
    series_axes.set_xlabel("emergency call, in order")
    series_axes.set_ylabel("setup latency (ms)")
    series_axes.set_title("each call (same machine as the load generator)")
    for axes, scale in ((cdf_axes, cdf_axes.xaxis), (series_axes, series_axes.yaxis)):
        scale.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        scale.set_major_formatter(ScalarFormatter())
        scale.set_minor_formatter(NullFormatter())
        axes.grid(True, alpha=0.3, which="both")
        if plotted:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------
# fair use (bench-results/fairuse.{json,md,png})
# --------------------------------------------------------------------------------------

_FAIRUSE_ROWS = (
    ("destination rules (`DestinationRules.check`)", None, "destination_check"),
    ("decision (`fairuse.admission.decide`)", None, "decide"),
    ("`FairUseService.admit`, memory store", "service_memory", "admit"),
    ("`FairUseService.call_ended`, memory store", "service_memory", "call_ended"),
    ("`admit`, Redis (fallback store, as the switch)", "service_redis", "admit"),
    ("`call_ended`, Redis (fallback store)", "service_redis", "call_ended"),
    ("`admit`, Redis store alone", "service_redis_direct", "admit"),
    ("`call_ended`, Redis store alone", "service_redis_direct", "call_ended"),
)


def _fairuse_stats(run: dict, section: str | None, key: str) -> dict:
    holder = run if section is None else (run.get(section) or {})
    return holder.get(key) or {}


def fairuse_markdown(results: dict) -> str:
    """The fair-use admission benchmark as Markdown."""
    machine = results.get("machine", {})
    plan = results.get("plan", {})
    runs = results.get("runs") or []
    out = [
        "# Fair-use admission benchmark",
        "",
        f"{machine.get('date', '')}: {machine.get('nproc', '?')} × "
        f"{machine.get('cpu_model', '?')}, Python {machine.get('python', '?')}, "
        f"redis-server {results.get('redis_version', '?')} on loopback; other work may share "
        f"the machine. Command: `{results.get('command', 'python -m tests.bench')}`.",
        "",
    ]
    if "error" in results:
        out += [f"error: {results['error']}", ""]
    if not runs:
        return "\n".join(out) + "\n"
    out += [
        f"{plan.get('decisions', 0):,} decisions on a mix of {plan.get('numbers_in_mix', '?')} "
        f"numbers; {plan.get('service_calls', 0):,} calls through `FairUseService` with the "
        f"memory store, {plan.get('redis_calls', 0):,} with Redis, spread over "
        f"{plan.get('accounts', 0):,} accounts. {plan.get('order', '')}. Times in µs per call "
        f"(`perf_counter_ns` around each call; the timer itself costs "
        f"{results.get('timer_overhead_ns', '?')} ns).",
        "",
    ]
    header = "| measure |"
    rule_line = "| --- |"
    for run in runs:
        header += f" {run['rules']:,} rules p50 | p99 | mean |"
        rule_line += " ---: | ---: | ---: |"
    if len(runs) > 1:
        header += " p50 ratio |"
        rule_line += " ---: |"
    out += [header, rule_line]
    for label, section, key in _FAIRUSE_ROWS:
        stats = [_fairuse_stats(run, section, key) for run in runs]
        if not any(stats):
            continue
        row = f"| {label} |"
        for stat in stats:
            row += (f" {_num(stat.get('p50_us'), 1)} | {_num(stat.get('p99_us'), 1)} |"
                    f" {_num(stat.get('mean_us'), 1)} |")
        if len(runs) > 1:
            first, last = stats[0].get("p50_us"), stats[-1].get("p50_us")
            row += f" {last / first:.2f} |" if first and last else " — |"
        out.append(row)
    out += ["", "| rules | blacklisted prefixes | prefix classes | exception prefixes "
                "(the account's) | policy load (ms) | outcomes of the mix (decide) |",
            "| ---: | ---: | ---: | ---: | ---: | --- |"]
    for run in runs:
        outcomes = ", ".join(f"{name} {count:,}"
                             for name, count in (run.get("outcomes") or {}).items())
        out.append(f"| {run['rules']:,} | {run.get('blacklist_prefixes', 0):,} | "
                   f"{run.get('prefix_classes', 0):,} | {run.get('exception_prefixes', 0):,} | "
                   f"{_num(run.get('policy_load_ms'), 1)} | {outcomes} |")
    out += ["", "Redis round trips and commands per admitted call (client requests written, "
                "a pipeline counting once; server `INFO commandstats`):", "",
            "| rules | calls | round trips: admit | call_ended | total | commands: admit "
            "| call_ended |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        trips = run.get("round_trips") or {}
        out.append(f"| {run['rules']:,} | {trips.get('calls', 0):,} | {trips.get('admit')} | "
                   f"{trips.get('call_ended')} | {trips.get('total')} | "
                   f"{trips.get('commands_admit')} | {trips.get('commands_call_ended')} |")
    names = (runs[-1].get("round_trips") or {}).get("commands_by_name") or {}
    if names:
        out += ["", "Commands per call: " + ", ".join(
            f"{name.upper()} {count:g}" for name, count in names.items()) + "."]
    flatness = results.get("flatness") or {}
    if flatness:
        out += ["", "10,000 rules / 10 rules: " + ", ".join(
            f"{name.replace('_', ' ')} {value:.2f}" for name, value in flatness.items()) + "."]
    return "\n".join(out) + "\n"


def fairuse_plot(results: dict, path: Path) -> bool:
    """p50 and p99 per measure with 10 and 10,000 rules; Redis round trips per call."""
    plt = _pyplot()
    runs = results.get("runs") or []
    if plt is None or not runs:
        return False
    figure, (cost_axes, trips_axes) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    labels = ["check", "decide", "admit\nmemory", "ended\nmemory", "admit\nredis",
              "ended\nredis", "admit\nredis alone", "ended\nredis alone"]
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        p50 = [_fairuse_stats(run, s, k).get("p50_us") or 0 for _, s, k in _FAIRUSE_ROWS]
        p99 = [_fairuse_stats(run, s, k).get("p99_us") or 0 for _, s, k in _FAIRUSE_ROWS]
        positions = [x + (index - (len(runs) - 1) / 2) * width for x in range(len(labels))]
        bars = cost_axes.bar(positions, p50, width, label=f"{run['rules']:,} rules, p50")
        cost_axes.scatter(positions, p99, marker="_", s=200, color=bars.patches[0].get_facecolor(),
                          label=f"{run['rules']:,} rules, p99")
    cost_axes.set_yscale("log")
    cost_axes.set_xticks(range(len(labels)), labels)
    cost_axes.set_ylabel("µs per call")
    cost_axes.set_title("fair-use admission cost, 10 vs 10,000 rules")
    cost_axes.grid(True, axis="y", alpha=0.3, which="both")
    cost_axes.legend(fontsize=8)
    trips = runs[-1].get("round_trips") or {}
    names = ["admit", "call_ended"]
    trips_axes.bar([0, 1], [trips.get(n) or 0 for n in names], 0.4, label="round trips")
    trips_axes.bar([0.4, 1.4], [trips.get(f"commands_{n}") or 0 for n in names], 0.4,
                   label="commands")
    trips_axes.set_xticks([0.2, 1.2], names)
    trips_axes.set_title("Redis, per admitted call")
    trips_axes.grid(True, axis="y", alpha=0.3)
    trips_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------
# callmemory.{md,png}: memory per active call
# --------------------------------------------------------------------------------------

_HELD_SERVERS = (("switch", "softswitch"), ("sippy", "Sippy B2BUA"))


def callmemory_markdown(results: dict) -> str:
    """Memory per active call, switch and Sippy, as Markdown."""
    out = ["# Memory per active call", "", _machine_line(results), ""]
    criteria = results.get("criteria")
    if criteria:
        out += [
            f"{criteria['calls']:,} calls set up at {criteria['setup_rate']} calls/s and held "
            f"{criteria['hold_seconds']:g} s each: {criteria['call']}. Memory per call = "
            f"{criteria['memory_per_call']}; the settled reading is taken "
            f"{criteria['settle_seconds']:g} s after the last call was established (the "
            "calls' transactions, kept 32 s by Timers H, J and L, are gone by then). "
            f"Clean: {criteria['clean']}.", ""]
    servers = [(results.get(key) or {}, name) for key, name in _HELD_SERVERS]
    if any("rss_before" in data for data, _ in servers):
        def row(title: str, render) -> str:
            return f"| {title} | " + " | ".join(
                render(data) if "rss_before" in data else "—" for data, _ in servers) + " |"

        out += [
            "| measure | " + " | ".join(name for _, name in servers) + " |",
            "| --- |" + " ---: |" * len(servers),
            row("**memory per active call** (settled)",
                lambda d: f"**{_num(d.get('bytes_per_call'))} bytes**"),
            row("per call right after the last was established",
                lambda d: f"{_num(d.get('bytes_per_call_established'))} bytes"),
            row("per call after every call ended", lambda d: (
                f"{_num(d.get('bytes_per_call_after_calls_ended'))} bytes")),
            row("RSS before the calls", lambda d: _mib(d.get("rss_before"))),
            row("RSS with all calls established", lambda d: _mib(d.get("rss_established"))),
            row("RSS settled, calls still held", lambda d: _mib(d.get("rss_settled"))),
            row("RSS after the calls ended", lambda d: _mib(d.get("rss_after_calls_ended"))),
            row("calls in progress at the two readings", lambda d: (
                f"{_num(d.get('in_progress_at_established'))} / "
                f"{_num(d.get('in_progress_at_settled'))}")),
            row("calls ok / failed (caller)", lambda d: (
                f"{_num(d.get('ok'))} / {_num(d.get('failed'))}")),
            row("retransmissions (caller)", lambda d: _num(d.get("retransmissions"))),
            row("clean", lambda d: "yes" if d.get("clean") else
                "no: " + "; ".join(d.get("problems") or [])),
            "| what it is | " + " | ".join(data.get("server", "—") for data, _ in servers)
            + " |",
        ]
        ratio = results.get("switch_to_sippy_ratio")
        if ratio is not None:
            out += ["", f"softswitch / Sippy (memory per active call, ΔRSS): **{ratio:.2f}**"]
        heap = (results.get("switch") or {}).get("heap_traced") or {}
        if heap:
            verdict = "clean" if heap.get("clean") else (
                "not clean: " + "; ".join(heap.get("problems") or []))
            out += [
                "",
                "RSS growth can be masked in the softswitch: CPython reuses the heap freed "
                "after loading the configuration. A second round of "
                f"{_num(heap.get('calls'))} held calls ran with allocation tracing on "
                f"(`heap_probe.py`; {verdict}): **{_num(heap.get('bytes_per_call'))} bytes "
                "of heap per active call** still allocated at the settled reading "
                f"({_mib(heap.get('traced_bytes'))} in all, "
                f"{_num(heap.get('in_progress_at_report'))} calls in progress).",
            ]
            if heap.get("by_file"):
                out += ["", "| file | bytes | blocks |", "| --- | ---: | ---: |"]
                out += [f"| `{row['file']}` | {row['bytes']:,} | {row['blocks']:,} |"
                        for row in heap["by_file"][:8]]
        out.append("")
    out += _outcomes(results, _HELD_SERVERS)
    errors = (results.get("switch") or {}).get("errors_in_log") or []
    if errors:
        out += ["Switch log (level warning), first lines:", ""]
        out += [f"- `{line}`" for line in errors]
        out.append("")
    return "\n".join(out)


def callmemory_plot(results: dict, path: Path) -> bool:
    """RSS of each server over the run (before, set-up, held, after the BYEs)."""
    plt = _pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(10, 5))
    plotted = False
    for key, name in _HELD_SERVERS:
        data = results.get(key) or {}
        samples = data.get("samples") or []
        if not samples:
            continue
        times = [t for t, _ in samples]
        rss = [value / 1048576 for _, value in samples]
        per_call = data.get("bytes_per_call")
        label = name + (f" ({per_call:,} bytes per call)" if per_call is not None else "")
        line = axes.plot(times, rss, label=label)[0]
        for reading in ("rss_before", "rss_established", "rss_settled"):
            if data.get(reading):
                axes.axhline(data[reading] / 1048576, color=line.get_color(), linestyle=":",
                             linewidth=0.8)
        plotted = True
    calls = (results.get("criteria") or {}).get("calls")
    axes.set_xlabel("seconds since the first reading")
    axes.set_ylabel("VmRSS (MiB)")
    axes.set_title(f"resident memory while {calls or 'N'} calls are set up, held and ended "
                   "(dotted: the readings)")
    axes.grid(True, alpha=0.3)
    if plotted:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# --------------------------------------------------------------------------------------
# webrtc.{md,png}: bridged DTLS-SRTP calls per core
# --------------------------------------------------------------------------------------


def webrtc_markdown(results: dict) -> str:
    """Bridged WebRTC calls per core, as Markdown."""
    out = ["# Bridged DTLS-SRTP calls per core (WebRTC ↔ RTP)", "", _machine_line(results), ""]
    criteria = results.get("criteria")
    if criteria:
        out += [
            f"One call: {criteria['call']}. Each step bridges N calls at once for "
            f"{criteria['seconds']:g} s (N = {', '.join(str(n) for n in criteria['steps'])}). "
            f"Clean: {criteria['clean']}. The ramp stops {criteria['stop']}. CPU: "
            f"{criteria['cpu']}.", ""]
    if "error" in results:
        out += [f"error: {results['error']}", ""]
    steps = results.get("steps") or []
    if steps:
        out += [
            "| measure | value |",
            "| --- | ---: |",
            f"| largest N with clean bridged media | {_num(results.get('max_clean_calls'))} |",
            f"| CPU per bridged call there (% of one core) | "
            f"{_num(results.get('cpu_percent_per_call_at_max'), 2)} |",
            f"| **bridged calls per core** (simulated peers included) | "
            f"**{_num(results.get('calls_per_core'), 1)}** |",
            "",
            "The simulated browsers and phones run in the bridge's process, so the CPU is "
            "theirs and the bridges' together: the bridge alone does more calls per core.",
            "",
        ]
        cores = results.get("cpu_cores_at_max")
        if isinstance(cores, int | float) and cores < 0.9:
            out += [f"At that N the process used {cores:.2f} of a core: calls per core is "
                    "N divided by that share, an extrapolation, not a load a core was seen "
                    "to carry.", ""]
        if not results.get("packet_rates_checked"):
            out += ["`run_bench` reports no per-call packet rates, so the 5 % rule could "
                    "not be applied: a call counts as flowing (its `calls_flowing`) when at "
                    "least 90 % of 50 packets/s arrived at both ends.", ""]
        if results.get("reached_last_step_cleanly"):
            out += ["Clean at the largest N tried: larger N were not measured.", ""]
        out += ["| N | calls flowing | errors | CPU (cores) | CPU per call (% of a core) | "
                "calls per core | wall (s) | clean |",
                "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for step in steps:
            result = step.get("result") or {}
            verdict = "yes" if step["clean"] else "no: " + "; ".join(step["problems"])
            for earlier in step.get("earlier_attempts") or []:
                verdict += " (earlier try: " + "; ".join(earlier["problems"]) + ")"
            out.append(
                f"| {step['calls']} | {_num(result.get('calls_flowing'))} | "
                f"{_num(result.get('errors'))} | {_num(result.get('cpu_cores_used'), 2)} | "
                f"{_num(step.get('cpu_percent_per_call'), 2)} | "
                f"{_num(step.get('calls_per_core'), 1)} | {_num(step.get('wall_seconds'), 1)} "
                f"| {verdict} |")
        out.append("")
    return "\n".join(out)


def webrtc_plot(results: dict, path: Path) -> bool:
    """CPU cores used and calls per core against the number of bridged calls."""
    plt = _pyplot()
    steps = [s for s in results.get("steps") or []
             if (s.get("result") or {}).get("cpu_cores_used") is not None]
    if plt is None or not steps:
        return False
    figure, (cpu_axes, per_core_axes) = plt.subplots(1, 2, figsize=(12, 5))
    calls = [s["calls"] for s in steps]
    cores = [s["result"]["cpu_cores_used"] for s in steps]
    per_core = [s.get("calls_per_core") or 0 for s in steps]
    cpu_axes.plot(calls, cores, marker="o", label="bridge + simulated peers")
    per_core_axes.plot(calls, per_core, marker="o", label="calls per core")
    bad = [(s["calls"], s["result"]["cpu_cores_used"]) for s in steps if not s["clean"]]
    if bad:
        cpu_axes.scatter(*zip(*bad, strict=True), s=160, facecolors="none", edgecolors="red",
                         linewidths=2, label="not clean")
    cpu_axes.axhline(1.0, color="grey", linestyle=":", label="one core")
    cpu_axes.set_xlabel("bridged calls at once")
    cpu_axes.set_ylabel("CPU cores used")
    cpu_axes.set_title("CPU of the bridging process (circled: not clean)")
    per_core_axes.set_xlabel("bridged calls at once")
    per_core_axes.set_ylabel("bridged calls per core")
    per_core_axes.set_title("bridged DTLS-SRTP calls per core")
    for axes in (cpu_axes, per_core_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True

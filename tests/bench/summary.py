"""The benchmarks side by side with the peers: bench-results/summary.{json,md,png}.

Built after any run from whichever ``<scenario>.json`` files the results folder holds:
each headline figure of the switch (REGISTER/s, calls/s, relayed calls with zero loss,
CPU per REGISTER and per call, memory per binding and per active call, cost growth with
bindings and with fair-use rules, bridged WebRTC calls per core), the peer's figure from
the same run (Kamailio, the Sippy B2BUA, rtpengine), the ratio switch / peer, the target
the issue sets for it and whether it is met. ``summary.md``'s table is meant to be copied
into the README as is. The functions here are pure except :func:`build_summary`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("register", "calls", "relay", "fairuse", "callmemory", "webrtc")
# the rule-dependent fair-use measures whose p50 growth 10 -> 10,000 rules is judged
FAIRUSE_GROWTH_KEYS = ("destination_check_p50", "decide_p50", "admit_memory_p50")


@dataclass(frozen=True)
class Target:
    """A target of the issue: ``op`` is ">=" (at least) or "<=" (at most)."""

    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"target operator must be '>=' or '<=', not {self.op!r}")

    def met(self, figure: float | None) -> bool | None:
        if figure is None:
            return None
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def text(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:g}×"


def _get(data: dict, *path: str):
    """``data[path[0]][path[1]]...``; None where a level is missing or not a mapping."""
    value = data
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def ratio(switch: float | None, peer: float | None) -> float | None:
    """switch / peer, None when either is missing or the peer's is zero."""
    if switch is None or peer is None or peer == 0:
        return None
    return round(switch / peer, 3)


@dataclass(frozen=True)
class Headline:
    """How to read one headline figure (and its peer's) from the scenarios' results."""

    key: str
    figure: str
    unit: str
    source: str
    switch: Callable[[dict], float | None]
    peer_name: str = ""
    peer: Callable[[dict], float | None] | None = None
    # applied to the ratio switch / peer, or (without a peer) to the switch's figure
    target: Target | None = None
    better: str = "higher"
    notes: Callable[[dict], list[str]] | None = None


def _path(*keys: str) -> Callable[[dict], float | None]:
    return lambda data: _number(_get(data, *keys))


def _if_clean(*keys: str) -> Callable[[dict], float | None]:
    """The figure of a section only when that section's run was clean."""
    def read(data: dict) -> float | None:
        section = _get(data, *keys[:-1])
        if not isinstance(section, dict) or not section.get("clean"):
            return None
        return _number(section.get(keys[-1]))
    return read


def _fairuse_growth(data: dict) -> float | None:
    values = [_number(_get(data, "flatness", key)) for key in FAIRUSE_GROWTH_KEYS]
    present = [value for value in values if value is not None]
    return max(present) if present else None


def _lower_bound_notes(*sections: tuple[str, str]) -> Callable[[dict], list[str]]:
    def notes(data: dict) -> list[str]:
        out = []
        for key, name in sections:
            section = data.get(key)
            if not isinstance(section, dict):
                continue
            if section.get("reached_last_step_cleanly") or section.get("lower_bound"):
                out.append(f"{name} was still clean at its last step: a lower bound")
            for outcome in ("error", "skipped"):
                if outcome in section:
                    out.append(f"{name}: {outcome} ({str(section[outcome])[:120]})")
        return out
    return notes


def _held_notes(data: dict) -> list[str]:
    out = []
    for key, name in (("switch", "softswitch"), ("sippy", "Sippy")):
        section = data.get(key)
        if not isinstance(section, dict):
            continue
        for outcome in ("error", "skipped"):
            if outcome in section:
                out.append(f"{name}: {outcome} ({str(section[outcome])[:120]})")
        if section.get("problems"):
            out.append(f"{name} not clean, no figure: " + "; ".join(section["problems"])[:160])
    calls = _get(data, "criteria", "calls")
    if isinstance(calls, int):
        out.append(f"{calls:,} calls held")
    traced = _number(_get(data, "switch", "heap_traced", "bytes_per_call"))
    if traced is not None:
        out.append(f"softswitch heap traced (RSS growth can be masked by reused heap): "
                   f"{traced:,.0f} B per call")
    return out


def _webrtc_notes(data: dict) -> list[str]:
    out = []
    cores = _number(data.get("cpu_cores_at_max"))
    if cores is not None and cores < 0.9:
        out.append(f"extrapolated: {data.get('max_clean_calls')} calls used {cores:.2f} of a "
                   "core")
    if data.get("reached_last_step_cleanly"):
        out.append(f"clean at the largest N tried ({data.get('max_clean_calls')}): "
                   "more calls not tried")
    if "error" in data:
        out.append(f"error ({str(data['error'])[:120]})")
    return out


def _growth_notes(data: dict) -> list[str]:
    bindings = _get(data, "memory", "bindings_registered")
    if isinstance(bindings, int) and bindings < 100_000:
        return [f"measured with {bindings:,} bindings, not 100,000 (--quick)"]
    return []


def _fairuse_notes(data: dict) -> list[str]:
    values = {key: _number(_get(data, "flatness", key)) for key in FAIRUSE_GROWTH_KEYS}
    present = {key: value for key, value in values.items() if value is not None}
    if not present:
        return []
    worst = max(present, key=lambda key: present[key])
    names = {"destination_check_p50": "destination check", "decide_p50": "decision",
             "admit_memory_p50": "admit on the memory store"}
    return [f"the worst p50 growth of {', '.join(names[key] for key in present)}: "
            f"{names[worst]}"]


HEADLINES: tuple[Headline, ...] = (
    Headline("register_rate", "REGISTER/s with digest, clean", "/s", "register",
             _path("switch_register", "highest_clean_rate"), "Kamailio 5.6 (4 workers)",
             _path("kamailio_register", "highest_clean_rate"), Target(">=", 0.5),
             notes=_lower_bound_notes(("switch_register", "softswitch"),
                                      ("kamailio_register", "Kamailio"))),
    Headline("calls_rate_sippy", "calls/s, clean (no media)", "/s", "calls",
             _path("switch_calls", "highest_clean_rate"), "Sippy B2BUA 2.5",
             _path("sippy_calls", "highest_clean_rate"), Target(">=", 10.0),
             notes=_lower_bound_notes(("switch_calls", "softswitch"), ("sippy_calls", "Sippy"))),
    Headline("calls_rate_kamailio", "calls/s, clean (no media)", "/s", "calls",
             _path("switch_calls", "highest_clean_rate"), "Kamailio 5.6 stateful proxy",
             _path("kamailio_proxy", "highest_clean_rate"),
             notes=_lower_bound_notes(("kamailio_proxy", "Kamailio"))),
    Headline("relay_calls", "relayed G.711 calls with zero loss", "calls", "relay",
             _path("switch_relay", "max_zero_loss_calls"), "rtpengine 10.5 (1 thread)",
             _path("rtpengine_relay", "max_zero_loss_calls"), Target(">=", 1.0),
             notes=_lower_bound_notes(("switch_relay", "softswitch"),
                                      ("rtpengine_relay", "rtpengine"))),
    Headline("cpu_per_register", "CPU per REGISTER", "ms", "register",
             _path("switch_register", "cpu_ms_per_registration"), "Kamailio 5.6 (4 workers)",
             _path("kamailio_register", "cpu_ms_per_registration"), better="lower"),
    Headline("cpu_per_call_sippy", "CPU per call", "ms", "calls",
             _path("switch_calls", "cpu_ms_per_call"), "Sippy B2BUA 2.5",
             _path("sippy_calls", "cpu_ms_per_call"), better="lower"),
    Headline("cpu_per_call_kamailio", "CPU per call", "ms", "calls",
             _path("switch_calls", "cpu_ms_per_call"), "Kamailio 5.6 stateful proxy",
             _path("kamailio_proxy", "cpu_ms_per_call"), better="lower"),
    Headline("memory_per_binding", "memory per binding (heap traced)", "bytes", "register",
             _path("memory", "traced_bytes_per_binding"), better="lower"),
    Headline("memory_per_call", "memory per active call (ΔRSS / calls)", "bytes",
             "callmemory", _if_clean("switch", "bytes_per_call"), "Sippy B2BUA 2.5",
             _if_clean("sippy", "bytes_per_call"), better="lower", notes=_held_notes),
    Headline("growth_bindings", "cost growth 1k → 100k bindings (CPU per REGISTER)", "×",
             "register", _path("memory", "cpu_cost_growth"), target=Target("<=", 1.2),
             better="lower", notes=_growth_notes),
    Headline("growth_rules", "cost growth 10 → 10,000 fair-use rules (p50)", "×",
             "fairuse", _fairuse_growth, target=Target("<=", 1.2), better="lower",
             notes=_fairuse_notes),
    Headline("webrtc_per_core", "bridged DTLS-SRTP calls per core (simulated peers included)",
             "calls", "webrtc", _path("calls_per_core"), notes=_webrtc_notes),
)


def headline_rows(results: dict[str, dict]) -> list[dict]:
    """One row per headline figure from ``{scenario: its results}``; a figure whose
    scenario is missing has None values and ``available`` False."""
    rows = []
    for headline in HEADLINES:
        data = results.get(headline.source)
        available = isinstance(data, dict)
        data = data if available else {}
        switch = headline.switch(data)
        peer = headline.peer(data) if headline.peer else None
        compared = ratio(switch, peer) if headline.peer else switch
        row = {
            "key": headline.key,
            "figure": headline.figure,
            "unit": headline.unit,
            "source": f"{headline.source}.json",
            "available": available,
            "switch": switch,
            "peer_name": headline.peer_name or None,
            "peer": peer,
            "ratio": ratio(switch, peer) if headline.peer else None,
            "better": headline.better,
            "target": None,
            "target_applies_to": None,
            "compared": compared,
            "met": None,
            "notes": headline.notes(data) if headline.notes and available else [],
        }
        if headline.target is not None:
            row["target"] = {"op": headline.target.op, "value": headline.target.value,
                             "text": headline.target.text()}
            row["target_applies_to"] = "ratio" if headline.peer else "switch"
            row["met"] = headline.target.met(compared)
        rows.append(row)
    return rows


def summarize(results: dict[str, dict], generated: str | None = None) -> dict:
    """The summary document: sources, rows, and how many targets are met."""
    rows = headline_rows(results)
    judged = [row for row in rows if row["met"] is not None]
    return {
        "generated": generated or datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"),
        "sources": {
            name: {"date": _get(data, "machine", "date"), "quick": bool(data.get("quick")),
                   "command": data.get("command")}
            for name, data in results.items() if isinstance(data, dict)
        },
        "rows": rows,
        "targets_met": sum(1 for row in judged if row["met"]),
        "targets_judged": len(judged),
        "targets_total": sum(1 for row in rows if row["target"] is not None),
    }


def format_value(value: float | None, unit: str) -> str:
    """A figure in its unit for the table: rates and counts whole, ms with 3 digits,
    growth factors with 2."""
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:,.3f} ms"
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "calls" and value != int(value):
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def _met_text(row: dict) -> str:
    if row["target"] is None:
        return "—"
    if row["met"] is None:
        return "not measured" if not row["available"] else "no figure"
    return "**yes**" if row["met"] else "**no**"


def summary_table(summary: dict) -> list[str]:
    """The Markdown table (README-ready): one line per headline figure."""
    out = [
        "| figure | softswitch | peer | peer's figure | softswitch / peer | target | met |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in summary["rows"]:
        ratio_text = "—" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        target = "—"
        if row["target"] is not None:
            target = row["target"]["text"]
            if row["target_applies_to"] == "switch":
                target += " (the figure)"
        out.append(
            f"| {row['figure']} | {format_value(row['switch'], row['unit'])} | "
            f"{row['peer_name'] or '—'} | {format_value(row['peer'], row['unit'])} | "
            f"{ratio_text} | {target} | {_met_text(row)} |"
        )
    return out


def summary_markdown(summary: dict) -> str:
    out = [
        "# Benchmarks side by side with the peers",
        "",
        f"Built {summary['generated']} from "
        + (", ".join(
            f"`{name}.json` ({source.get('date') or 'undated'}"
            + (", --quick" if source.get("quick") else "") + ")"
            for name, source in summary["sources"].items()) or "no results")
        + ". Every peer ran on the same machine in the same run as the softswitch, under the "
        "same load generator. Ratios are softswitch / peer; for CPU and memory lower is "
        "better, for rates and calls higher is better. A target applies to the ratio, or "
        "to the figure itself for the cost growths.",
        "",
        *summary_table(summary),
        "",
        f"Targets met: {summary['targets_met']} of {summary['targets_total']}"
        + (f" ({summary['targets_total'] - summary['targets_judged']} not measured in these "
           "results)" if summary["targets_judged"] < summary["targets_total"] else "") + ".",
        "",
    ]
    notes = [(row["figure"] + (f" vs {row['peer_name']}" if row["peer_name"] else ""), note)
             for row in summary["rows"] for note in row["notes"]]
    if notes:
        out += ["Notes:", ""]
        out += [f"- {figure}: {note}" for figure, note in notes]
        out.append("")
    return "\n".join(out)


def plot_rows(summary: dict) -> list[dict]:
    """The rows the plot shows: those with a ratio, or a target on the figure itself."""
    return [row for row in summary["rows"]
            if row["compared"] is not None and (row["ratio"] is not None
                                                or row["target_applies_to"] == "switch")]


def summary_plot(summary: dict, path: Path) -> bool:
    """Bar chart of the ratios (and of the growth factors) with their target lines;
    False without matplotlib or without any figure to show."""
    rows = plot_rows(summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    figure, axes = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.8))
    positions = list(range(len(rows)))[::-1]
    colours = {True: "tab:green", False: "tab:red", None: "tab:grey"}
    values = [row["compared"] for row in rows]
    axes.barh(positions, values, color=[colours[row["met"]] for row in rows], height=0.6)
    for position, row in zip(positions, rows, strict=True):
        label = f"{row['compared']:.2f}×"
        axes.text(row["compared"], position, f" {label}", va="center", fontsize=8)
        if row["target"] is not None:
            axes.plot([row["target"]["value"]] * 2, [position - 0.4, position + 0.4],
                      color="black", linewidth=2.5)
            axes.text(row["target"]["value"], position + 0.42, row["target"]["text"],
                      ha="center", va="bottom", fontsize=7)
    labels = [row["figure"] + (f"\nvs {row['peer_name']}" if row["peer_name"] else "")
              for row in rows]
    axes.set_yticks(positions, labels, fontsize=8)
    axes.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    positive = [value for value in values if value > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_xscale("log")
    axes.set_xlabel("softswitch / peer (growth rows: the growth factor); black bar: target")
    axes.set_title("softswitch against its peers (green: target met, red: missed, "
                   "grey: no target)")
    axes.grid(True, axis="x", alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def load_results(folder: Path) -> dict[str, dict]:
    """The ``<scenario>.json`` files of ``folder`` that exist and parse."""
    results: dict[str, dict] = {}
    for name in SOURCES:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            results[name] = data
    return results


def build_summary(folder: Path) -> dict | None:
    """Write summary.json, summary.md and summary.png in ``folder``; None (nothing
    written) when it holds no scenario results."""
    results = load_results(folder)
    if not results:
        return None
    summary = summarize(results)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(summary_markdown(summary))
    summary["plotted"] = summary_plot(summary, folder / "summary.png")
    return summary

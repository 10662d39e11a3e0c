"""The benchmark reports' pure logic: the summary of the switch against its SIP and media
peers (ratios, the issue's targets, the README table), the WebRTC bridge's clean-media
verdict, the held-calls verdict of memory per active call, and the calls report with
Kamailio as a stateful proxy beside the Sippy B2BUA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench import callmemory, calls, report, summary, webrtc  # noqa: E402


def _results(**overrides: dict) -> dict[str, dict]:
    """Scenario results shaped like the harness writes them."""
    results = {
        "register": {
            "quick": False,
            "machine": {"date": "2026-12-01T10:00:00+00:00"},
            "switch_register": {"highest_clean_rate": 4000, "cpu_ms_per_registration": 0.2},
            "kamailio_register": {"highest_clean_rate": 10000, "cpu_ms_per_registration": 0.05,
                                  "reached_last_step_cleanly": True},
            "memory": {"traced_bytes_per_binding": 1500, "cpu_cost_growth": 1.1,
                       "bindings_registered": 100_000},
        },
        "calls": {
            "switch_calls": {"highest_clean_rate": 1200, "cpu_ms_per_call": 0.8},
            "sippy_calls": {"highest_clean_rate": 100, "cpu_ms_per_call": 7.5},
            "kamailio_proxy": {"highest_clean_rate": 3000, "cpu_ms_per_call": 0.3},
        },
        "relay": {
            "switch_relay": {"max_zero_loss_calls": 500},
            "rtpengine_relay": {"max_zero_loss_calls": 750},
        },
        "fairuse": {"flatness": {"destination_check_p50": 1.16, "decide_p50": 1.07,
                                 "admit_memory_p50": 0.95, "admit_redis_p50": 3.0}},
    }
    results.update(overrides)
    return results


def _row(rows: list[dict], key: str) -> dict:
    return next(row for row in rows if row["key"] == key)


# -- targets and ratios ------------------------------------------------------------------


def test_target_at_least_and_at_most() -> None:
    assert summary.Target(">=", 0.5).met(0.5) is True
    assert summary.Target(">=", 0.5).met(0.49) is False
    assert summary.Target("<=", 1.2).met(1.21) is False
    assert summary.Target("<=", 1.2).met(None) is None
    assert summary.Target(">=", 10).text() == "≥ 10×"
    assert summary.Target("<=", 1.2).text() == "≤ 1.2×"


def test_target_rejects_an_unknown_operator() -> None:
    with pytest.raises(ValueError, match="operator"):
        summary.Target(">", 1.0)


def test_ratio_needs_both_figures_and_a_nonzero_peer() -> None:
    assert summary.ratio(4000, 10000) == 0.4
    assert summary.ratio(None, 10000) is None
    assert summary.ratio(4000, None) is None
    assert summary.ratio(4000, 0) is None


# -- headline rows -----------------------------------------------------------------------


def test_rows_compare_each_figure_with_its_peer_and_target() -> None:
    rows = summary.headline_rows(_results())
    register = _row(rows, "register_rate")
    assert (register["switch"], register["peer"], register["ratio"]) == (4000, 10000, 0.4)
    assert register["met"] is False  # REGISTER target: >= 0.5 x Kamailio
    assert any("lower bound" in note for note in register["notes"])
    sippy = _row(rows, "calls_rate_sippy")
    assert sippy["ratio"] == 12.0 and sippy["met"] is True  # >= 10 x Sippy
    kamailio = _row(rows, "calls_rate_kamailio")
    assert kamailio["ratio"] == 0.4 and kamailio["target"] is None and kamailio["met"] is None
    relay = _row(rows, "relay_calls")
    assert relay["ratio"] == pytest.approx(0.667) and relay["met"] is False
    cpu = _row(rows, "cpu_per_call_sippy")
    assert cpu["better"] == "lower" and cpu["ratio"] == pytest.approx(0.107)


def test_growth_targets_apply_to_the_figure_itself() -> None:
    rows = summary.headline_rows(_results())
    bindings = _row(rows, "growth_bindings")
    assert bindings["target_applies_to"] == "switch" and bindings["ratio"] is None
    assert bindings["compared"] == 1.1 and bindings["met"] is True
    rules = _row(rows, "growth_rules")
    # the worst of the rule-dependent measures; Redis round-trip noise is left out
    assert rules["switch"] == 1.16 and rules["met"] is True
    worse = _results(fairuse={"flatness": {"decide_p50": 1.3, "admit_memory_p50": 1.0}})
    assert _row(summary.headline_rows(worse), "growth_rules")["met"] is False


def test_a_scenario_not_run_leaves_its_rows_unmeasured() -> None:
    results = _results()
    del results["relay"]
    relay = _row(summary.headline_rows(results), "relay_calls")
    assert relay["available"] is False
    assert relay["switch"] is None and relay["met"] is None


def test_memory_per_call_only_from_a_clean_run() -> None:
    held = {"criteria": {"calls": 200},
            "switch": {"clean": True, "bytes_per_call": 9000},
            "sippy": {"clean": False, "bytes_per_call": 30000, "problems": ["3 failed"]}}
    row = _row(summary.headline_rows(_results(callmemory=held)), "memory_per_call")
    assert row["switch"] == 9000 and row["peer"] is None and row["ratio"] is None
    assert any("3 failed" in note for note in row["notes"])
    held["sippy"] = {"clean": True, "bytes_per_call": 30000}
    row = _row(summary.headline_rows(_results(callmemory=held)), "memory_per_call")
    assert row["ratio"] == 0.3


def test_quick_results_are_flagged() -> None:
    results = _results()
    results["register"]["quick"] = True
    results["register"]["memory"]["bindings_registered"] = 10_000
    growth = _row(summary.headline_rows(results), "growth_bindings")
    assert any("10,000 bindings" in note for note in growth["notes"])
    document = summary.summarize(results)
    assert document["sources"]["register"]["quick"] is True
    assert "`register.json` (2026-12-01T10:00:00+00:00, --quick)" in (
        summary.summary_markdown(document))


# -- the Markdown and the files ---------------------------------------------------------


def test_table_has_one_line_per_headline_and_counts_targets() -> None:
    document = summary.summarize(_results(), generated="2026-12-01T12:00:00+00:00")
    table = summary.summary_table(document)
    assert len(table) == 2 + len(summary.HEADLINES)
    register_line = next(line for line in table if line.startswith("| REGISTER/s"))
    assert "4,000/s" in register_line and "10,000/s" in register_line
    assert "0.40×" in register_line and "≥ 0.5×" in register_line and "**no**" in register_line
    # met: calls vs Sippy, both growths; missed: REGISTER, relay
    assert (document["targets_met"], document["targets_total"]) == (3, 5)
    markdown = summary.summary_markdown(document)
    assert "Targets met: 3 of 5." in markdown
    assert "| figure | softswitch | peer |" in markdown


def test_format_value_by_unit() -> None:
    assert summary.format_value(None, "ms") == "—"
    assert summary.format_value(0.12345, "ms") == "0.123 ms"
    assert summary.format_value(1.156, "×") == "1.16×"
    assert summary.format_value(12000, "/s") == "12,000/s"
    assert summary.format_value(2048.4, "bytes") == "2,048 B"
    assert summary.format_value(11.07, "calls") == "11.1"


def test_plot_rows_are_the_ratios_and_the_judged_growths() -> None:
    rows = summary.plot_rows(summary.summarize(_results()))
    keys = {row["key"] for row in rows}
    assert "register_rate" in keys and "growth_bindings" in keys
    assert "memory_per_binding" not in keys  # no peer, no target


def test_build_summary_reads_the_scenario_files(tmp_path: Path) -> None:
    assert summary.build_summary(tmp_path) is None
    assert not (tmp_path / "summary.json").exists()
    for name, data in _results().items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "webrtc.json").write_text("{not json")
    built = summary.build_summary(tmp_path)
    assert built is not None and set(built["sources"]) == {"register", "calls", "relay",
                                                           "fairuse"}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert _row(written["rows"], "calls_rate_sippy")["met"] is True
    assert "Targets met: 3 of 5" in (tmp_path / "summary.md").read_text()


# -- WebRTC: clean bridged media ----------------------------------------------------------


def _bench(**fields) -> dict:
    result = {"calls": 4, "seconds": 10.0, "cpu_cores_used": 0.5, "calls_flowing": 4,
              "errors": 0}
    result.update(fields)
    return result


def test_webrtc_clean_when_every_call_flows_without_errors() -> None:
    assert webrtc.judge_bridge(_bench(), 4) == []
    assert webrtc.cpu_figures(_bench(), 4) == {"cpu_percent_per_call": 12.5,
                                                "calls_per_core": 8.0}


def test_webrtc_not_clean_on_errors_silence_or_wrong_packet_rates() -> None:
    assert webrtc.judge_bridge(_bench(errors=1), 4) == ["1 calls failed"]
    assert webrtc.judge_bridge(_bench(calls_flowing=3), 4) == ["media flowed in 3 of 4 calls"]
    rates = _bench(phone_packets_per_second=[50.0, 49.0, 47.0, 51.0])
    assert webrtc.packet_rates_reported(rates) and not webrtc.packet_rates_reported(_bench())
    problems = webrtc.judge_bridge(rates, 4)
    assert len(problems) == 1 and "47.0" in problems[0]
    assert webrtc.judge_bridge(_bench(packets_dropped=2), 4) == ["packets_dropped: 2"]
    assert webrtc.judge_bridge({"error": "boom"}, 4) == ["boom"]
    assert webrtc.judge_bridge({"calls_flowing": 4}, 4) == ["run_bench returned no error count"]
    assert webrtc.cpu_figures(_bench(cpu_cores_used=0), 4) == {}


# -- memory per active call ------------------------------------------------------------


def _held(**fields) -> callmemory.HeldCalls:
    held = callmemory.HeldCalls(label="switch", calls=100, rate=50, rss_before=50_000_000,
                                rss_established=52_000_000, rss_settled=51_000_000, ok=100,
                                callee_ok=100, in_progress_at_established=100,
                                in_progress_at_settled=100)
    for name, value in fields.items():
        setattr(held, name, value)
    return held


def test_held_calls_clean_and_memory_per_call() -> None:
    held = _held()
    callmemory.judge(held)
    assert held.clean and held.problems == []
    data = held.as_dict()
    assert data["bytes_per_call"] == 10_000
    assert data["bytes_per_call_established"] == 20_000


def test_held_calls_not_clean_when_calls_missing_or_failed() -> None:
    held = _held(ok=90, failed=10, in_progress_at_settled=95)
    callmemory.judge(held)
    assert not held.clean
    assert "10 failed" in held.problems
    assert "only 90 of 100 completed" in held.problems
    assert "95 of 100 calls in progress at the settled reading" in held.problems
    unread = _held(rss_settled=0)
    callmemory.judge(unread)
    assert "the server's RSS could not be read" in unread.problems
    assert unread.per_call(0) is None


def test_hold_outlasts_the_settled_reading() -> None:
    plan = callmemory.CallMemoryPlan.quick()
    assert plan.hold_seconds > plan.setup_seconds + plan.settle_seconds
    assert plan.wall_limit > plan.setup_seconds + plan.hold_seconds


# -- calls: Kamailio beside Sippy ------------------------------------------------------------


def test_call_ratios_and_markdown_show_all_three() -> None:
    results = {
        "switch_calls": {"highest_clean_rate": 300, "steps": [], "cpu_ms_per_call": 2.0},
        "sippy_calls": {"highest_clean_rate": 100, "cpu_ms_per_call": 7.0},
        "kamailio_proxy": {"highest_clean_rate": 400, "cpu_ms_per_call": 0.3,
                           "reached_last_step_cleanly": True,
                           "steps": [{"offered_rate": 400, "achieved_rate": 399,
                                      "steady_rate": 400, "ok": 1200, "failed": 0,
                                      "target_cpu_percent": 12.0, "cpu_ms_per_call": 0.3,
                                      "clean": True, "problems": []}]},
    }
    ratios = calls.call_ratios(results)
    assert ratios == {"switch_to_sippy_ratio": 3.0, "switch_to_kamailio_ratio": 0.75}
    results.update(ratios)
    markdown = report.calls_markdown(results)
    assert "| measure | softswitch | Sippy B2BUA | Kamailio proxy |" in markdown
    assert "softswitch / Kamailio (highest clean calls/s): **0.75**" in markdown
    assert "softswitch / Sippy (highest clean calls/s): **3.00**" in markdown
    assert "Kamailio proxy was clean at the last step" in markdown
    assert "## Kamailio proxy: steps" in markdown
    assert calls.call_ratios({"switch_calls": {"highest_clean_rate": 0}}) == {}

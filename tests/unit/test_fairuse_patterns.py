"""Call-pattern thresholds: levels reached at or above a threshold, sequential dialling
runs, the short-call share judged only on enough calls, time-of-day windows in the
policy's zone (across midnight), and counters that cannot be trusted refused."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from fairuse.patterns import (
    PatternCounters,
    PatternEvaluator,
    parse_clock,
    sequential_run,
)
from fairuse.policy import PatternLimits

PARIS = ZoneInfo("Europe/Paris")


def signals(limits: PatternLimits, counters: PatternCounters, at: datetime | None = None,
            zone: ZoneInfo = PARIS) -> dict[str, tuple[str, bool]]:
    found = PatternEvaluator(limits, zone).evaluate(counters, at)
    return {s.pattern: (s.level, s.refuse) for s in found}


# ---- thresholds ----------------------------------------------------------------------


def test_levels_are_reached_at_the_threshold() -> None:
    limits = PatternLimits.model_validate({"calls_per_second": {"warning": 5, "critical": 10}})
    assert signals(limits, PatternCounters(calls_last_second=4)) == {}
    assert signals(limits, PatternCounters(calls_last_second=5)) == {
        "calls_per_second": ("warning", False)}
    assert signals(limits, PatternCounters(calls_last_second=9)) == {
        "calls_per_second": ("warning", False)}
    assert signals(limits, PatternCounters(calls_last_second=10)) == {
        "calls_per_second": ("critical", True)}


def test_every_counted_pattern_is_compared() -> None:
    counters = PatternCounters(
        calls_last_second=1,
        calls_last_minute=100,
        calls_today=2000,
        distinct_last_hour=300,
        distinct_this_month=10_000,
    )
    assert signals(PatternLimits(), counters) == {
        "calls_per_minute": ("critical", True),
        "calls_per_day": ("warning", False),
        "distinct_per_hour": ("critical", False),
        "distinct_per_month": ("warning", False),
    }


def test_signals_come_in_the_documented_order_with_values() -> None:
    counters = PatternCounters(calls_last_second=12, calls_last_minute=150)
    found = PatternEvaluator(PatternLimits()).evaluate(counters)
    assert [(s.pattern, s.label, s.value, s.threshold) for s in found] == [
        ("calls_per_second", "pattern_cps", 12, 10),
        ("calls_per_minute", "pattern_cpm", 150, 100),
    ]


def test_untracked_counters_are_skipped() -> None:
    assert signals(PatternLimits(), PatternCounters()) == {}


def test_a_pattern_without_thresholds_never_fires() -> None:
    limits = PatternLimits.model_validate(
        {"calls_per_day": {"warning": None, "critical": None}})
    assert signals(limits, PatternCounters(calls_today=10**9)) == {}


# ---- sequential dialling -------------------------------------------------------------


@pytest.mark.parametrize(
    ("numbers", "max_step", "run"),
    [
        ((), 1, 0),
        (("+33140000001",), 1, 1),
        (("+33140000001", "+33140000002", "+33140000003"), 1, 3),
        (("+33140000009", "+33140000008", "+33140000007", "+33140000006"), 1, 4),
        (("+33612000000", "+33140000001", "+33140000002"), 1, 2),  # run is at the end
        (("+33140000001", "+33140000002", "+33612000000"), 1, 1),  # broken by the last
        (("+33140000001", "+33140000001", "+33140000001"), 1, 1),  # redial is no run
        (("+33140000001", "+33140000003", "+33140000005"), 1, 1),
        (("+33140000001", "+33140000003", "+33140000005"), 2, 3),
        (("+33140000001", "+33140000002", "+33140000004"), 2, 2),  # the step must hold
        (("+3314000009", "+33140000010"), 1, 1),  # lengths differ
        (("+33140000001", "sip-user", "+33140000002"), 1, 1),
    ],
)
def test_sequential_runs(numbers: tuple[str, ...], max_step: int, run: int) -> None:
    assert sequential_run(numbers, max_step) == run


def test_war_dialling_is_refused_at_critical() -> None:
    numbers = tuple(f"+3314000{n:04d}" for n in range(100, 110))
    assert signals(PatternLimits(), PatternCounters(recent_numbers=numbers[:5])) == {
        "sequential": ("warning", False)}
    assert signals(PatternLimits(), PatternCounters(recent_numbers=numbers)) == {
        "sequential": ("critical", True)}


# ---- short calls ---------------------------------------------------------------------


def test_short_call_share_needs_enough_answered_calls() -> None:
    limits = PatternLimits.model_validate(
        {"short_calls": {"warning": 0.5, "critical": 0.8, "min_calls": 20}})
    assert signals(limits, PatternCounters(answered_calls=19, short_calls=19)) == {}
    assert signals(limits, PatternCounters(answered_calls=20, short_calls=10)) == {
        "short_calls": ("warning", False)}
    assert signals(limits, PatternCounters(answered_calls=20, short_calls=16)) == {
        "short_calls": ("critical", False)}
    assert signals(limits, PatternCounters(answered_calls=20, short_calls=9)) == {}


# ---- time-of-day windows -------------------------------------------------------------

NIGHT = PatternLimits.model_validate({
    "calls_per_minute": {"warning": 40, "critical": 100},
    "windows": [{
        "name": "night", "start": "22:00", "end": "06:00",
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "calls_per_minute": {"critical": 10},
    }],
})


def paris(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=PARIS)  # 2026-11-06 is a Friday


@pytest.mark.parametrize(
    ("at", "window"),
    [
        (paris(6, 23), "night"),  # Friday night
        (paris(7, 2), "night"),  # Saturday 02:00 belongs to Friday's night
        (paris(7, 23), None),  # Saturday night is not listed
        (paris(9, 2), None),  # Monday 02:00 belongs to Sunday's night
        (paris(9, 22), "night"),
        (paris(6, 21, 59), None),
        (paris(6, 6), None),  # the end is excluded
        (datetime(2026, 11, 6, 21, 30, tzinfo=UTC), "night"),  # 22:30 in Paris (UTC+1)
    ],
)
def test_windows_follow_local_time(at: datetime, window: str | None) -> None:
    _, name = PatternEvaluator(NIGHT, PARIS).thresholds_at(at)
    assert name == window


def test_a_window_replaces_only_the_keys_it_writes() -> None:
    evaluator = PatternEvaluator(NIGHT, PARIS)
    thresholds, _ = evaluator.thresholds_at(paris(6, 23))
    assert thresholds.calls_per_minute.critical == 10
    assert thresholds.calls_per_minute.warning == 40
    assert thresholds.calls_per_minute.refuse is True
    assert thresholds.calls_per_second == NIGHT.calls_per_second
    counters = PatternCounters(calls_last_minute=12)
    night = evaluator.evaluate(counters, paris(6, 23))
    assert [(s.pattern, s.level, s.window) for s in night] == [
        ("calls_per_minute", "critical", "night")]
    assert evaluator.evaluate(counters, paris(6, 12)) == []


def test_window_times_need_a_zone() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        PatternEvaluator(NIGHT).evaluate(PatternCounters(), datetime(2026, 11, 6, 23))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("22:00", time(22, 0)), ("6:05", time(6, 5)), ("24:00", time.max)],
)
def test_clock_times(text: str, expected: time) -> None:
    assert parse_clock(text) == expected


@pytest.mark.parametrize("text", ["22", "22:0", "24:01", "-1:00", 2200, "ab:cd"])
def test_bad_clock_times(text: object) -> None:
    with pytest.raises(ValueError):
        parse_clock(text)


# ---- untrusted counters --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calls_last_minute": -1}, "negative"),
        ({"calls_last_second": 4294967295 - 2**32}, "negative"),
        ({"calls_today": 1.5}, "integer"),
        ({"calls_today": True}, "integer"),
        ({"answered_calls": 3, "short_calls": 4}, "exceeds answered_calls"),
        ({"recent_numbers": "+331"}, "sequence of number strings"),
        ({"recent_numbers": ("+331", 2)}, "sequence of number strings"),
    ],
)
def test_untrustworthy_counters_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatternCounters(**kwargs)  # type: ignore[arg-type]


def test_recent_numbers_become_a_tuple() -> None:
    assert PatternCounters(recent_numbers=["+331", "+332"]).recent_numbers == (  # type: ignore[arg-type]
        "+331", "+332")


def test_counters_from_the_store_keep_their_meaning() -> None:
    from fairuse.store import PatternCounters as StoreCounters

    stored = StoreCounters(
        calls_last_second=1, calls_last_minute=2, calls_today=3,
        distinct_destinations_hour=4, distinct_destinations_month=5,
        recent_numbers=["+331", "+332"], ended_calls_today=60, short_calls_today=40,
    )
    counters = PatternCounters.from_store(stored)
    assert counters == PatternCounters(
        calls_last_second=1, calls_last_minute=2, calls_today=3, distinct_last_hour=4,
        distinct_this_month=5, recent_numbers=("+331", "+332"), answered_calls=60,
        short_calls=40,
    )
    assert signals(PatternLimits(), counters) == {"short_calls": ("warning", False)}

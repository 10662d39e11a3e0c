"""Call-pattern signals of fair use: warning and critical thresholds on an account's
recent call attempts, in the manner of OpenSIPS ``fraud_detection`` profiles.

Nothing is counted here. The counter store (``fairuse.store``) counts attempts per
account and hands its values over as :class:`PatternCounters`; this module compares them
with the thresholds of the account's plan and returns :class:`PatternSignal` values:

``calls_per_second`` / ``calls_per_minute`` / ``calls_per_day``
    call attempts in the last second, minute, calendar day;
``sequential``
    length of the run of consecutively numbered destinations at the end of the recent
    dialled numbers (``+33140000001``, ``…02``, ``…03``: a war-dialler or predictive
    dialler); redialling the same number is not a run;
``distinct_per_hour`` / ``distinct_per_month``
    distinct destinations in the last hour, this month;
``short_calls``
    share of answered calls shorter than ``max_seconds`` (judged only once at least
    ``min_calls`` answered calls are in the window, so one short call is not 100 %).

Semantics, chosen to avoid the counter bugs reported against ``fraud_detection``:

- every count **includes the attempt being decided** (the store counts an attempt and
  returns the new value in one atomic step), and a level is reached when the value is
  **greater than or equal to** the threshold;
- counts are per account (the store's key), never state shared between accounts, and a
  negative count (an underflowed counter) is refused with a ValueError, not wrapped;
- ``None`` means the store does not track that figure: the pattern is skipped.

Time-of-day windows (``windows`` in the plan) replace some thresholds during given hours
and days, in the policy's time zone; a window whose end is before its start runs past
midnight and belongs to the day it starts on. The first matching window applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from fairuse.policy import PatternLimits, PatternThresholds, PatternWindow

__all__ = [
    "DAYS",
    "PATTERN_LABELS",
    "PATTERNS",
    "Level",
    "PatternCounters",
    "PatternEvaluator",
    "PatternSignal",
    "parse_clock",
    "sequential_run",
    "window_matches",
]

Level = Literal["warning", "critical"]

PATTERNS: tuple[str, ...] = (
    "calls_per_second",
    "calls_per_minute",
    "sequential",
    "distinct_per_hour",
    "calls_per_day",
    "distinct_per_month",
    "short_calls",
)
"""Evaluation order; a refusal names the first refusing pattern in this order."""

PATTERN_LABELS: dict[str, str] = {
    "calls_per_second": "pattern_cps",
    "calls_per_minute": "pattern_cpm",
    "sequential": "pattern_sequential",
    "distinct_per_hour": "pattern_distinct_hour",
    "calls_per_day": "pattern_calls_per_day",
    "distinct_per_month": "pattern_distinct_month",
    "short_calls": "pattern_short_calls",
}
"""The metric and log label of each pattern."""

DAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_COUNT_FIELDS = (
    "calls_last_second",
    "calls_last_minute",
    "calls_today",
    "distinct_last_hour",
    "distinct_this_month",
    "answered_calls",
    "short_calls",
)


def parse_clock(text: Any) -> time:
    """A ``"HH:MM"`` wall-clock time (``"24:00"`` is the end of the day); ValueError."""
    if not isinstance(text, str):
        raise ValueError(f'{text!r} must be a quoted "HH:MM" time')
    hours, sep, minutes = text.strip().partition(":")
    if not sep or not (hours.isdigit() and minutes.isdigit()) or len(minutes) != 2:
        raise ValueError(f'{text!r} must be a "HH:MM" time, e.g. "22:00"')
    h, m = int(hours), int(minutes)
    if (h, m) == (24, 0):
        return time.max
    if not (0 <= h <= 23 and 0 <= m <= 59):
        raise ValueError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return time(h, m)


@dataclass(frozen=True, slots=True)
class PatternCounters:
    """Counter values for one account at one call attempt, as the store returns them.

    Counts include the attempt being decided; ``recent_numbers`` are the account's last
    dialled numbers (E.164 or digits), oldest first, the one being decided last.
    ``None`` leaves a pattern unevaluated."""

    calls_last_second: int | None = None
    calls_last_minute: int | None = None
    calls_today: int | None = None
    distinct_last_hour: int | None = None
    distinct_this_month: int | None = None
    recent_numbers: tuple[str, ...] = ()
    answered_calls: int | None = None  # answered calls in the short-call window
    short_calls: int | None = None  # of which shorter than the plan's max_seconds

    @classmethod
    def from_store(cls, counters: Any) -> PatternCounters:
        """These values from the counter store's ``fairuse.store.PatternCounters`` (its
        field names: ``distinct_destinations_hour``, ``ended_calls_today``, ...)."""
        return cls(
            calls_last_second=counters.calls_last_second,
            calls_last_minute=counters.calls_last_minute,
            calls_today=counters.calls_today,
            distinct_last_hour=counters.distinct_destinations_hour,
            distinct_this_month=counters.distinct_destinations_month,
            recent_numbers=tuple(counters.recent_numbers),
            answered_calls=counters.ended_calls_today,
            short_calls=counters.short_calls_today,
        )

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"counter {name} must be an integer, not {value!r}")
            if value < 0:
                raise ValueError(f"counter {name} is negative ({value}): a counter underflowed")
        if (
            self.short_calls is not None
            and self.answered_calls is not None
            and self.short_calls > self.answered_calls
        ):
            raise ValueError(
                f"counter short_calls ({self.short_calls}) exceeds answered_calls"
                f" ({self.answered_calls})"
            )
        if isinstance(self.recent_numbers, str) or not all(
            isinstance(n, str) for n in self.recent_numbers
        ):
            raise ValueError("recent_numbers must be a sequence of number strings")
        object.__setattr__(self, "recent_numbers", tuple(self.recent_numbers))


@dataclass(frozen=True, slots=True)
class PatternSignal:
    """One threshold reached: which pattern, how far, and whether it refuses the call."""

    pattern: str
    level: Level
    value: float
    threshold: float
    refuse: bool  # a critical level of a pattern configured to refuse
    window: str | None = None  # the time-of-day window whose thresholds applied

    @property
    def label(self) -> str:
        return PATTERN_LABELS[self.pattern]


def sequential_run(numbers: Sequence[str], max_step: int = 1) -> int:
    """How many of the last ``numbers`` form one run of consecutively numbered
    destinations: same length, each differing from the previous one by the same step,
    with 0 < |step| <= ``max_step``. 0 for no numbers, 1 for no run."""
    digits = [n[1:] if n.startswith("+") else n for n in numbers]
    if not digits:
        return 0
    run = 1
    step: int | None = None
    for index in range(len(digits) - 1, 0, -1):
        later, earlier = digits[index], digits[index - 1]
        if (
            len(later) != len(earlier)
            or not (later.isdigit() and earlier.isdigit())
            or not (later.isascii() and earlier.isascii())
        ):
            break
        difference = int(later) - int(earlier)
        if step is None:
            if difference == 0 or abs(difference) > max_step:
                break
            step = difference
        elif difference != step:
            break
        run += 1
    return run


def window_matches(window: PatternWindow, local: datetime) -> bool:
    """True when ``local`` (a wall-clock time in the policy's zone) falls in ``window``."""
    start, end = parse_clock(window.start), parse_clock(window.end)
    days = set(window.days) if window.days else set(DAYS)
    now = local.time().replace(tzinfo=None)
    today = DAYS[local.weekday()]
    if start <= end:
        return today in days and start <= now < end
    yesterday = DAYS[(local - timedelta(days=1)).weekday()]
    return (now >= start and today in days) or (now < end and yesterday in days)


def _merge(base: PatternThresholds, window: PatternWindow) -> PatternThresholds:
    """``base`` with the thresholds ``window`` sets (field by field)."""
    updates: dict[str, Any] = {}
    for name in PATTERNS:
        if name in window.model_fields_set:
            override = getattr(window, name)
            updates[name] = getattr(base, name).model_copy(
                update=override.model_dump(exclude_unset=True)
            )
    return base.model_copy(update=updates)


class PatternEvaluator:
    """Evaluates counters against one plan's pattern thresholds (windows merged once)."""

    __slots__ = ("limits", "zone", "_windows")

    def __init__(self, limits: PatternLimits, zone: ZoneInfo | None = None) -> None:
        self.limits = limits
        self.zone = zone or ZoneInfo("UTC")
        self._windows = [(window, _merge(limits, window)) for window in limits.windows]

    def thresholds_at(self, at: datetime | None) -> tuple[PatternThresholds, str | None]:
        """The thresholds in force at ``at`` (an aware datetime) and the window's name."""
        if at is None or not self._windows:
            return self.limits, None
        if at.tzinfo is None:
            raise ValueError("the time of a call attempt must be timezone-aware")
        local = at.astimezone(self.zone)
        for window, merged in self._windows:
            if window_matches(window, local):
                return merged, window.name
        return self.limits, None

    def evaluate(self, counters: PatternCounters, at: datetime | None = None) -> list[PatternSignal]:
        """Every pattern at warning or critical level, in :data:`PATTERNS` order."""
        thresholds, window = self.thresholds_at(at)
        values: dict[str, float | None] = {
            "calls_per_second": counters.calls_last_second,
            "calls_per_minute": counters.calls_last_minute,
            "calls_per_day": counters.calls_today,
            "distinct_per_hour": counters.distinct_last_hour,
            "distinct_per_month": counters.distinct_this_month,
            "sequential": None,
            "short_calls": None,
        }
        if counters.recent_numbers:
            values["sequential"] = sequential_run(
                counters.recent_numbers, thresholds.sequential.max_step
            )
        short = thresholds.short_calls
        if (
            counters.answered_calls is not None
            and counters.short_calls is not None
            and counters.answered_calls >= short.min_calls
            and counters.answered_calls > 0
        ):
            values["short_calls"] = counters.short_calls / counters.answered_calls
        signals: list[PatternSignal] = []
        for name in PATTERNS:
            value = values[name]
            if value is None:
                continue
            rule = getattr(thresholds, name)
            if rule.critical is not None and value >= rule.critical:
                signals.append(PatternSignal(name, "critical", value, rule.critical,
                                             rule.refuse, window))
            elif rule.warning is not None and value >= rule.warning:
                signals.append(PatternSignal(name, "warning", value, rule.warning, False, window))
        return signals

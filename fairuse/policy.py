"""Fair-use policy settings: the ``fair_use:`` section of the switch's YAML, and the
effective policy of one call's account, device and trunk.

A *plan* holds every limit an account is held to (concurrent calls, call duration for
voice and fax, monthly minutes counted in billable time, destination rules, call-pattern
thresholds); accounts pick a plan and may override parts of it, devices override a few
line-level values, trunks carry their own ``max_calls``. Internal calls between
extensions have their own, looser, limits (``internal:``). Defaults are the operators'
figures: 50 simultaneous calls per account, voice cut at 6 h and fax at 3 h, 5,000 minutes
per line and 2,500 minutes × users pooled (at most 50,000) per account per month, billed
in 6-second increments with an 18-second minimum; premium-rate numbers refused and,
with shared-cost, toll-free and short numbers, outside the minute quotas; international
calls off until a plan or account turns them on; autodialling (sequential dialling, high
call rates) refused.

Overrides are merged key by key: ``plan ← account ← device``, where only the keys written
in the YAML replace the plan's (``minutes: {per_line: 8000}`` keeps the plan's other
minute settings). Problems are reported with the key that holds them, in the switch's
``file:line: key: problem`` form (see ``switch.settings``): cross-field problems
(warning above critical, unknown plan) are raised as the same ``config_problems`` error
type ``switch.settings`` expands into one line per problem.

The blacklisted countries and prefixes come from ``config/fraud-destinations.yaml``
unless the YAML gives its own (``blacklist.countries`` / ``blacklist.prefixes``, or
another ``blacklist.file``); ``extra_countries`` / ``extra_prefixes`` add to either.

:meth:`FairUse.resolve` gives the :class:`EffectivePolicy` of ``(account, device,
trunk)``; results are cached, the model being immutable once loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from fairuse.destinations import (
    DEFAULT_REFUSED_CLASSES,
    DEFAULT_UNCOUNTED_CLASSES,
    DestinationClass,
    DestinationRules,
    DestinationTables,
    PrefixTrie,
    parse_prefix,
)
from fairuse.patterns import DAYS, PATTERNS, PatternEvaluator, parse_clock

__all__ = [
    "DEFAULT_FRAUD_LIST",
    "Action",
    "Actions",
    "AccountFairUse",
    "Blacklist",
    "BlacklistExceptions",
    "ConcurrencyLimits",
    "Concurrency",
    "DestinationSettings",
    "DeviceFairUse",
    "Duration",
    "EffectivePolicy",
    "FairUse",
    "InternalPolicy",
    "Minutes",
    "PatternLimits",
    "PatternThresholds",
    "PatternWindow",
    "Plan",
    "ShortCalls",
    "Threshold",
    "TrunkFairUse",
    "billable_seconds",
    "load_fraud_list",
]

DEFAULT_FRAUD_LIST = Path(__file__).resolve().parents[1] / "config" / "fraud-destinations.yaml"
"""The default fraud-prone destination list (a starting point for operators to edit)."""

Path_ = tuple[str | int, ...]
Action = Literal["log", "metric", "webhook"]

_PROBLEMS = "config_problems"  # the error type switch.settings expands into lines
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SECTIONS = ("concurrency", "duration", "minutes", "destinations", "patterns")


class _Problems:
    """Collects ``(relative key path, message)`` pairs and raises them as one error."""

    def __init__(self) -> None:
        self.items: list[tuple[Path_, str]] = []

    def add(self, path: Path_, message: str) -> None:
        self.items.append((path, message))

    def extend(self, items: Iterable[tuple[Path_, str]]) -> None:
        self.items.extend(items)

    def raise_if_any(self) -> None:
        if self.items:
            raise PydanticCustomError(
                _PROBLEMS,
                "{summary}",
                {"summary": "; ".join(m for _, m in self.items), "problems": tuple(self.items)},
            )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


def _overlay(base: BaseModel, override: BaseModel) -> Any:
    """``base`` with the keys set in ``override`` (recursively for nested models of the
    same type); lists and scalars are replaced whole."""
    updates: dict[str, Any] = {}
    for name in override.model_fields_set:
        new, old = getattr(override, name), getattr(base, name, None)
        if isinstance(new, BaseModel) and isinstance(old, BaseModel) and type(new) is type(old):
            updates[name] = _overlay(old, new)
        else:
            updates[name] = new
    return base.model_copy(update=updates)


def billable_seconds(duration: float | None, increment: int = 6, minimum: int = 18) -> int:
    """Billable seconds of a call of ``duration`` seconds (answer to end): rounded up to
    whole increments, at least ``minimum``; nothing for an unanswered or 0-second call.
    Same rule as the CDR ledger (``switch.cdr.billable_seconds``)."""
    if increment < 1 or minimum < 0:
        raise ValueError("increment must be at least 1 second and minimum not negative")
    if duration is None or not math.isfinite(duration):
        return 0
    milliseconds = round(duration * 1000)
    if milliseconds <= 0:
        return 0
    units = -(-milliseconds // (increment * 1000))
    return max(minimum, units * increment)


def _country_code(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f'country {value!r} must be a quoted ISO 3166 alpha-2 code, e.g. "CU"')
    code = value.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown country {value!r} (ISO 3166 alpha-2 expected)")
    return code


def _country_list(value: Any) -> Any:
    if not isinstance(value, list):
        return value  # pydantic says "must be a list"
    problems = _Problems()
    codes: list[str] = []
    for index, item in enumerate(value):
        try:
            code = _country_code(item)
        except ValueError as exc:
            problems.add((index,), str(exc))
            continue
        if code in codes:
            problems.add((index,), f"duplicate country {code!r}")
        codes.append(code)
    problems.raise_if_any()
    return codes


def _prefix_list(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    problems = _Problems()
    prefixes: list[str] = []
    for index, item in enumerate(value):
        try:
            prefix = "+" + parse_prefix(item)
        except ValueError as exc:
            problems.add((index,), str(exc))
            continue
        if prefix in prefixes:
            problems.add((index,), f"duplicate prefix {prefix!r}")
        prefixes.append(prefix)
    problems.raise_if_any()
    return prefixes


def _webhook_list(value: list[str]) -> list[str]:
    problems = _Problems()
    for index, url in enumerate(value):
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(url)):
            problems.add((index,), "must be an http:// or https:// URL")
    problems.raise_if_any()
    return value


def _identifier_keys(value: dict[str, Any], what: str) -> dict[str, Any]:
    problems = _Problems()
    for key in value:
        if not isinstance(key, str) or not _IDENTIFIER.match(key):
            problems.add((key,), f"{what} {key!r} must be letters, digits, '_', '.', '-'")
    problems.raise_if_any()
    return value


# --------------------------------------------------------------------------------------
# Plan sections
# --------------------------------------------------------------------------------------


class Concurrency(_Model):
    """Simultaneous calls (granted as leases by the counter store)."""

    account: int | None = Field(default=50, ge=1, le=1_000_000)  # None: no limit
    device: int | None = Field(default=None, ge=1, le=10_000)


class Duration(_Model):
    """Longest call, in seconds, before the switch ends it with BYE."""

    voice: int = Field(default=6 * 3600, ge=1, le=7 * 86400)
    fax: int = Field(default=3 * 3600, ge=1, le=7 * 86400)
    warning_before: int | None = Field(default=60, ge=1, le=3600)  # None: no warning


class Actions(_Model):
    """What happens when a threshold is reached."""

    warning: list[Action] = Field(default_factory=lambda: ["log", "metric"])
    critical: list[Action] = Field(default_factory=lambda: ["log", "metric", "webhook"])


class Minutes(_Model):
    """Monthly minute quotas, counted in billable time."""

    per_line: int | None = Field(default=5000, ge=1, le=10_000_000)  # per device
    pooled_per_user: int | None = Field(default=2500, ge=1, le=10_000_000)  # × users
    per_account: int | None = Field(default=50_000, ge=1, le=1_000_000_000)
    warning: float = Field(default=0.8, gt=0, le=10)  # fraction of a quota
    critical: float = Field(default=1.0, gt=0, le=10)
    refuse_at_critical: bool = True
    actions: Actions = Field(default_factory=Actions)
    increment: int = Field(default=6, ge=1, le=3600)  # billing increment, seconds
    minimum: int = Field(default=18, ge=0, le=3600)  # billed minimum, seconds


class DestinationSettings(_Model):
    international: bool = False  # calls to other countries than the site's
    allowed_countries: list[str] = Field(default_factory=list, max_length=300)
    refused_classes: list[DestinationClass] = Field(
        default_factory=lambda: list(DEFAULT_REFUSED_CLASSES)
    )
    uncounted_classes: list[DestinationClass] = Field(
        default_factory=lambda: list(DEFAULT_UNCOUNTED_CLASSES)
    )

    @field_validator("allowed_countries", mode="before")
    @classmethod
    def _check_countries(cls, value: Any) -> Any:
        return _country_list(value)


class Threshold(_Model):
    """A counted pattern: levels are reached when the count is ≥ the threshold."""

    warning: int | None = Field(default=None, ge=1)
    critical: int | None = Field(default=None, ge=1)
    refuse: bool = False  # refuse new calls while the critical level is reached


class CallsPerSecond(Threshold):
    warning: int | None = Field(default=5, ge=1)
    critical: int | None = Field(default=10, ge=1)
    refuse: bool = True


class CallsPerMinute(Threshold):
    warning: int | None = Field(default=40, ge=1)
    critical: int | None = Field(default=100, ge=1)
    refuse: bool = True


class Sequential(Threshold):
    warning: int | None = Field(default=5, ge=2)
    critical: int | None = Field(default=10, ge=2)
    refuse: bool = True
    max_step: int = Field(default=1, ge=1, le=1000)  # largest gap between "consecutive" numbers


class DistinctPerHour(Threshold):
    warning: int | None = Field(default=100, ge=1)
    critical: int | None = Field(default=300, ge=1)


class CallsPerDay(Threshold):
    warning: int | None = Field(default=2000, ge=1)
    critical: int | None = Field(default=5000, ge=1)


class DistinctPerMonth(Threshold):
    warning: int | None = Field(default=10_000, ge=1)
    critical: int | None = Field(default=30_000, ge=1)


class ShortCalls(_Model):
    """Share of answered calls shorter than ``max_seconds`` (0 to 1)."""

    warning: float | None = Field(default=0.5, gt=0, le=1)
    critical: float | None = Field(default=0.8, gt=0, le=1)
    refuse: bool = False
    max_seconds: int = Field(default=6, ge=1, le=600)
    min_calls: int = Field(default=50, ge=1, le=1_000_000)


class PatternThresholds(_Model):
    calls_per_second: CallsPerSecond = Field(default_factory=CallsPerSecond)
    calls_per_minute: CallsPerMinute = Field(default_factory=CallsPerMinute)
    sequential: Sequential = Field(default_factory=Sequential)
    distinct_per_hour: DistinctPerHour = Field(default_factory=DistinctPerHour)
    calls_per_day: CallsPerDay = Field(default_factory=CallsPerDay)
    distinct_per_month: DistinctPerMonth = Field(default_factory=DistinctPerMonth)
    short_calls: ShortCalls = Field(default_factory=ShortCalls)


class PatternWindow(PatternThresholds):
    """Thresholds that replace the plan's during some hours of some days (local time of
    ``fair_use.timezone``); only the keys written here replace the plan's."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    start: str
    end: str
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: list(DAYS), min_length=1
    )

    @field_validator("start", "end", mode="before")
    @classmethod
    def _check_clock(cls, value: Any) -> Any:
        parse_clock(value)
        return value

    @model_validator(mode="after")
    def _check_span(self) -> PatternWindow:
        problems = _Problems()
        if parse_clock(self.start) == parse_clock(self.end):
            problems.add(("end",), "must differ from start (a window of no time)")
        problems.raise_if_any()
        return self


class PatternLimits(PatternThresholds):
    windows: list[PatternWindow] = Field(default_factory=list, max_length=50)
    actions: Actions = Field(default_factory=Actions)

    @field_validator("windows")
    @classmethod
    def _unique_names(cls, value: list[PatternWindow]) -> list[PatternWindow]:
        problems = _Problems()
        names: list[str] = []
        for index, window in enumerate(value):
            if window.name in names:
                problems.add((index, "name"), f"duplicate window {window.name!r}")
            names.append(window.name)
        problems.raise_if_any()
        return value


class Plan(_Model):
    """Every limit an account is held to."""

    concurrency: Concurrency = Field(default_factory=Concurrency)
    duration: Duration = Field(default_factory=Duration)
    minutes: Minutes = Field(default_factory=Minutes)
    destinations: DestinationSettings = Field(default_factory=DestinationSettings)
    patterns: PatternLimits = Field(default_factory=PatternLimits)


def _internal_defaults() -> dict[str, BaseModel]:
    quiet = {"warning": None, "critical": None, "refuse": False}
    return {
        "concurrency": Concurrency(account=None, device=None),
        "duration": Duration(voice=12 * 3600, fax=6 * 3600, warning_before=60),
        "patterns": PatternLimits(
            calls_per_second=CallsPerSecond(warning=10, critical=20, refuse=True),
            calls_per_minute=CallsPerMinute(warning=200, critical=600, refuse=True),
            sequential=Sequential(**quiet),
            distinct_per_hour=DistinctPerHour(**quiet),
            calls_per_day=CallsPerDay(**quiet),
            distinct_per_month=DistinctPerMonth(**quiet),
            short_calls=ShortCalls(warning=None, critical=None),
        ),
    }


class InternalPolicy(_Model):
    """Limits on calls between extensions: no destination rules or minute quotas, no
    concurrency limit, 12 h voice and 6 h fax, only call-rate patterns. Keys written in
    the YAML replace these defaults one by one."""

    concurrency: Concurrency = Field(default_factory=lambda: _internal_defaults()["concurrency"])
    duration: Duration = Field(default_factory=lambda: _internal_defaults()["duration"])
    patterns: PatternLimits = Field(default_factory=lambda: _internal_defaults()["patterns"])

    @model_validator(mode="after")
    def _onto_defaults(self) -> InternalPolicy:
        defaults = _internal_defaults()
        for name in self.model_fields_set & set(defaults):
            setattr(self, name, _overlay(defaults[name], getattr(self, name)))
        return self


# --------------------------------------------------------------------------------------
# Blacklist, accounts, devices, trunks
# --------------------------------------------------------------------------------------


class Blacklist(_Model):
    """Fraud-prone destinations refused for every account without an exception."""

    file: Path | None = None  # default: config/fraud-destinations.yaml
    countries: list[str] | None = None  # replaces the file's countries
    prefixes: list[str] | None = None  # replaces the file's prefixes
    extra_countries: list[str] = Field(default_factory=list)
    extra_prefixes: list[str] = Field(default_factory=list)

    @field_validator("countries", "extra_countries", mode="before")
    @classmethod
    def _check_countries(cls, value: Any) -> Any:
        return _country_list(value)

    @field_validator("prefixes", "extra_prefixes", mode="before")
    @classmethod
    def _check_prefixes(cls, value: Any) -> Any:
        return _prefix_list(value)


class BlacklistExceptions(_Model):
    countries: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)

    @field_validator("countries", mode="before")
    @classmethod
    def _check_countries(cls, value: Any) -> Any:
        return _country_list(value)

    @field_validator("prefixes", mode="before")
    @classmethod
    def _check_prefixes(cls, value: Any) -> Any:
        return _prefix_list(value)


class AccountFairUse(_Model):
    """One account's plan and the parts of it this account overrides."""

    plan: str | None = None  # default: fair_use.default_plan
    users: int | None = Field(default=None, ge=1, le=1_000_000)  # for the pooled quota
    concurrency: Concurrency | None = None
    duration: Duration | None = None
    minutes: Minutes | None = None
    destinations: DestinationSettings | None = None
    patterns: PatternLimits | None = None
    blacklist_exceptions: BlacklistExceptions = Field(default_factory=BlacklistExceptions)


class DeviceFairUse(_Model):
    """Line-level overrides of one device (by SIP username)."""

    max_calls: int | None = Field(default=None, ge=1, le=10_000)
    minutes_per_line: int | None = Field(default=None, ge=1, le=10_000_000)
    duration: Duration | None = None
    destinations: DestinationSettings | None = None


class TrunkFairUse(_Model):
    max_calls: int | None = Field(default=None, ge=1, le=1_000_000)


# --------------------------------------------------------------------------------------
# Cross-field checks
# --------------------------------------------------------------------------------------


def _threshold_problems(
    rules: Any, names: Iterable[str], here: Path_, window: Any = None
) -> list[tuple[Path_, str]]:
    problems: list[tuple[Path_, str]] = []
    for name in names:
        rule = getattr(rules, name)
        if rule.warning is None or rule.critical is None or rule.warning <= rule.critical:
            continue
        written = getattr(window, name).model_fields_set if window is not None else {"warning"}
        if "warning" in written:
            message = f"must not exceed critical ({rule.critical})"
        else:
            message = (f"the plan's warning ({rule.warning}) exceeds this window's critical"
                       f" ({rule.critical}): give the window a warning too")
        problems.append(((*here, name, "warning"), message))
    return problems


def _plan_problems(plan: Plan) -> list[tuple[Path_, str]]:
    problems = _threshold_problems(plan.patterns, PATTERNS, ("patterns",))
    evaluator = PatternEvaluator(plan.patterns)
    for index, (window, merged) in enumerate(evaluator._windows):
        names = [name for name in PATTERNS if name in window.model_fields_set]
        problems += _threshold_problems(merged, names, ("patterns", "windows", index), window)
    if plan.minutes.warning > plan.minutes.critical:
        problems.append(
            (("minutes", "warning"), f"must not exceed critical ({plan.minutes.critical})")
        )
    before = plan.duration.warning_before
    if before is not None and before >= min(plan.duration.voice, plan.duration.fax):
        problems.append(
            (("duration", "warning_before"), "must be shorter than the voice and fax durations")
        )
    return problems


# --------------------------------------------------------------------------------------
# The fraud list file
# --------------------------------------------------------------------------------------


def load_fraud_list(path: Path) -> tuple[list[str], list[str]]:
    """The ``countries`` and ``prefixes`` of a fraud list file; ValueError naming the
    file and entry of the first problems."""
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read fraud list {path}: {exc.strerror or exc}") from None
    except YAMLError as exc:
        raise ValueError(f"fraud list {path} is not valid YAML: {exc}") from None
    data = data or {}
    if not isinstance(data, dict) or set(data) - {"countries", "prefixes"}:
        raise ValueError(f"fraud list {path} must be a mapping with countries and prefixes")
    found: list[list[str]] = []
    errors: list[str] = []
    for key, check in (("countries", _country_code), ("prefixes", parse_prefix)):
        items = data.get(key) or []
        if not isinstance(items, list):
            raise ValueError(f"fraud list {path}: {key} must be a list")
        good: list[str] = []
        for index, item in enumerate(items):
            try:
                value = check(item)
            except ValueError as exc:
                errors.append(f"{key}[{index}]: {exc}")
                continue
            good.append(value if key == "countries" else f"+{value}")
        found.append(good)
    if errors:
        raise ValueError(f"fraud list {path}: " + "; ".join(errors))
    return found[0], found[1]


# --------------------------------------------------------------------------------------
# The section and its effective policies
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConcurrencyLimits:
    """Simultaneous-call limits for one call's leases; None is no limit."""

    account: int | None
    device: int | None
    trunk: int | None


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """Every limit that applies to calls of one account, device and trunk."""

    account_id: str
    device: str | None
    trunk_id: str | None
    plan_name: str
    plan: Plan  # merged: plan ← account ← device
    internal: InternalPolicy
    users: int
    concurrency: ConcurrencyLimits
    internal_concurrency: ConcurrencyLimits
    destinations: DestinationRules
    patterns: PatternEvaluator
    internal_patterns: PatternEvaluator
    zone: ZoneInfo
    webhooks: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def line_quota_seconds(self) -> int | None:
        """Billable seconds per month for the line (device)."""
        per_line = self.plan.minutes.per_line
        return None if per_line is None else per_line * 60

    @property
    def pool_quota_seconds(self) -> int | None:
        """Billable seconds per month pooled for the account (per user × users)."""
        pooled = self.plan.minutes.pooled_per_user
        return None if pooled is None else pooled * self.users * 60

    @property
    def account_quota_seconds(self) -> int | None:
        """The account's monthly ceiling in billable seconds."""
        cap = self.plan.minutes.per_account
        return None if cap is None else cap * 60

    def billable(self, duration: float | None) -> int:
        """Billable seconds of an answered call of ``duration`` seconds under this plan."""
        return billable_seconds(duration, self.plan.minutes.increment, self.plan.minutes.minimum)

    def max_duration(self, *, fax: bool = False, internal: bool = False) -> int:
        """Seconds after answer at which the call is ended."""
        duration = self.internal.duration if internal else self.plan.duration
        return duration.fax if fax else duration.voice

    def duration_warning(self, *, internal: bool = False) -> int | None:
        """Seconds before the cut at which the caller is warned, or None."""
        return (self.internal.duration if internal else self.plan.duration).warning_before

    def is_short_call(self, duration: float | None) -> bool:
        """An answered call short enough for the short-call share pattern."""
        return duration is not None and duration < self.plan.patterns.short_calls.max_seconds


class FairUse(_Model):
    """The ``fair_use:`` section."""

    enabled: bool = True
    # concurrency leases lapse this long after their node stops refreshing them (crash)
    lease_seconds: float = Field(default=60.0, ge=1.0, le=3600.0)
    timezone: str = "UTC"  # local time of the pattern windows
    home_country: str | None = None  # default: dialplan.country (set by the switch)
    default_plan: str | None = None  # default: the first plan
    plans: dict[str, Plan] = Field(
        default_factory=lambda: {"standard": Plan()}, min_length=1, max_length=1000
    )
    internal: InternalPolicy = Field(default_factory=InternalPolicy)
    blacklist: Blacklist = Field(default_factory=Blacklist)
    prefix_classes: dict[str, DestinationClass] = Field(default_factory=dict)
    webhooks: list[str] = Field(default_factory=list, max_length=20)
    accounts: dict[str, AccountFairUse] = Field(default_factory=dict)
    devices: dict[str, DeviceFairUse] = Field(default_factory=dict)
    trunks: dict[str, TrunkFairUse] = Field(default_factory=dict)

    _tables: DestinationTables = PrivateAttr(default_factory=DestinationTables)
    _cache: dict[tuple[Any, ...], EffectivePolicy] = PrivateAttr(default_factory=dict)
    _zone: ZoneInfo = PrivateAttr(default_factory=lambda: ZoneInfo("UTC"))

    _CACHE_LIMIT: ClassVar[int] = 100_000

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. Europe/Paris, UTC)") from None
        return value

    @field_validator("home_country")
    @classmethod
    def _check_home(cls, value: Any) -> str | None:
        return None if value is None else _country_code(value)

    @field_validator("plans", "accounts", "trunks")
    @classmethod
    def _check_ids(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        what = {"plans": "plan name", "accounts": "account id", "trunks": "trunk id"}
        return _identifier_keys(value, what[info.field_name or "plans"])

    @field_validator("prefix_classes", mode="before")
    @classmethod
    def _check_prefix_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        problems = _Problems()
        normalised: dict[str, Any] = {}
        for key, klass in value.items():
            try:
                prefix = "+" + parse_prefix(key)
            except ValueError as exc:
                problems.add((str(key),), str(exc))
                continue
            if prefix in normalised:
                problems.add((str(key),), f"duplicate prefix {prefix!r}")
            normalised[prefix] = klass
        problems.raise_if_any()
        return normalised

    @field_validator("webhooks")
    @classmethod
    def _check_webhooks(cls, value: list[str]) -> list[str]:
        return _webhook_list(value)

    @model_validator(mode="after")
    def _check_and_build(self, info: ValidationInfo) -> FairUse:
        problems = _Problems()
        if self.default_plan is None:
            self.default_plan = next(iter(self.plans))
        elif self.default_plan not in self.plans:
            problems.add(("default_plan",), self._unknown_plan(self.default_plan))
        own: dict[str, set[tuple[Path_, str]]] = {}
        for name, plan in self.plans.items():
            found = _plan_problems(plan)
            own[name] = set(found)
            problems.extend((("plans", name, *path), message) for path, message in found)
        problems.extend(
            (("internal", *path), message)
            for path, message in _plan_problems(Plan(
                concurrency=self.internal.concurrency,
                duration=self.internal.duration,
                patterns=self.internal.patterns,
            ))
        )
        for account_id, account in self.accounts.items():
            plan_name = account.plan or self.default_plan
            if plan_name not in self.plans:
                problems.add(("accounts", account_id, "plan"), self._unknown_plan(plan_name))
                continue
            merged = self._account_plan(self.plans[plan_name], account)
            problems.extend(
                (("accounts", account_id, *path), message)
                for path, message in _plan_problems(merged)
                if (path, message) not in own[plan_name]
            )
        default = self.plans.get(self.default_plan or "")
        if default is not None:
            for username, device in self.devices.items():
                merged = self._device_plan(default, device)
                problems.extend(
                    (("devices", username, *path), message)
                    for path, message in _plan_problems(merged)
                    if (path, message) not in own[self.default_plan or ""]
                )
        # the blacklist tables
        context = info.context if isinstance(info.context, dict) else {}
        base_dir = Path(context.get("base_dir", "."))  # the configuration file's directory
        countries, prefixes = self.blacklist.countries, self.blacklist.prefixes
        if countries is None or prefixes is None:
            path = self.blacklist.file or DEFAULT_FRAUD_LIST
            if not path.is_absolute():
                path = base_dir / path
            try:
                file_countries, file_prefixes = load_fraud_list(path)
            except ValueError as exc:
                problems.add(("blacklist", "file"), str(exc))
                file_countries, file_prefixes = [], []
            countries = file_countries if countries is None else countries
            prefixes = file_prefixes if prefixes is None else prefixes
        problems.raise_if_any()
        self._tables = DestinationTables.build(
            [*countries, *self.blacklist.extra_countries],
            [*prefixes, *self.blacklist.extra_prefixes],
            self.prefix_classes,
        )
        self._zone = ZoneInfo(self.timezone)
        self._cache = {}
        return self

    def _unknown_plan(self, name: str) -> str:
        return f"unknown plan {name!r} (plans: {', '.join(self.plans)})"

    @staticmethod
    def _account_plan(plan: Plan, account: AccountFairUse) -> Plan:
        merged = plan
        for section in _SECTIONS:
            override = getattr(account, section)
            if override is not None:
                merged = merged.model_copy(
                    update={section: _overlay(getattr(merged, section), override)}
                )
        return merged

    @staticmethod
    def _device_plan(plan: Plan, device: DeviceFairUse) -> Plan:
        updates: dict[str, Any] = {}
        if device.max_calls is not None:
            updates["concurrency"] = plan.concurrency.model_copy(
                update={"device": device.max_calls})
        if device.minutes_per_line is not None:
            updates["minutes"] = plan.minutes.model_copy(
                update={"per_line": device.minutes_per_line})
        if device.duration is not None:
            updates["duration"] = _overlay(plan.duration, device.duration)
        if device.destinations is not None:
            updates["destinations"] = _overlay(plan.destinations, device.destinations)
        return plan.model_copy(update=updates) if updates else plan

    @property
    def tables(self) -> DestinationTables:
        """The switch-wide blacklist and prefix-class tables."""
        return self._tables

    def resolve(
        self,
        account_id: str,
        device_username: str | None = None,
        trunk_id: str | None = None,
        *,
        users: int | None = None,
        home_country: str | None = None,
    ) -> EffectivePolicy:
        """The policy of calls by ``device_username`` of ``account_id`` through
        ``trunk_id``: the account's plan (or the default plan for an account not listed)
        with the account's, then the device's overrides. ``users`` (the account's device
        count) sizes the pooled quota unless the account sets ``users``; ``home_country``
        (the dial plan's country) is used unless ``fair_use.home_country`` is set."""
        country = self.home_country or home_country
        if country is None:
            raise ValueError("the home country is unknown: set fair_use.home_country or pass"
                             " home_country (the dial plan's country)")
        key = (account_id, device_username, trunk_id, users, country)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        account = self.accounts.get(account_id)
        plan_name = (account.plan if account else None) or self.default_plan or ""
        plan = self.plans.get(plan_name) or next(iter(self.plans.values()))
        if account is not None:
            plan = self._account_plan(plan, account)
        device = self.devices.get(device_username) if device_username else None
        if device is not None:
            plan = self._device_plan(plan, device)
        trunk = self.trunks.get(trunk_id) if trunk_id else None
        trunk_max = trunk.max_calls if trunk else None
        exceptions = account.blacklist_exceptions if account else BlacklistExceptions()
        rules = plan.destinations
        destinations = DestinationRules(
            home_country=_country_code(country),
            international=rules.international,
            allowed_countries=frozenset(rules.allowed_countries),
            refused_classes=frozenset(rules.refused_classes),
            uncounted_classes=frozenset(rules.uncounted_classes),
            tables=self._tables,
            exception_countries=frozenset(exceptions.countries),
            exception_prefixes=PrefixTrie((parse_prefix(p), True) for p in exceptions.prefixes),
        )
        enabled = self.enabled
        policy = EffectivePolicy(
            account_id=account_id,
            device=device_username,
            trunk_id=trunk_id,
            plan_name=plan_name,
            plan=plan,
            internal=self.internal,
            users=max(1, (account.users if account and account.users else None) or users or 1),
            concurrency=ConcurrencyLimits(
                plan.concurrency.account if enabled else None,
                plan.concurrency.device if enabled else None,
                trunk_max if enabled else None,
            ),
            internal_concurrency=ConcurrencyLimits(
                self.internal.concurrency.account if enabled else None,
                self.internal.concurrency.device if enabled else None,
                None,
            ),
            destinations=destinations,
            patterns=PatternEvaluator(plan.patterns, self._zone),
            internal_patterns=PatternEvaluator(self.internal.patterns, self._zone),
            zone=self._zone,
            webhooks=tuple(self.webhooks),
            enabled=enabled,
        )
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = policy
        return policy

    def reference_problems(
        self,
        account_ids: Iterable[str],
        device_usernames: Iterable[str],
        trunk_ids: Iterable[str],
    ) -> list[tuple[Path_, str]]:
        """Accounts, devices and trunks named here but not configured in the file, as
        ``(("fair_use", ...), problem)`` pairs for the settings loader."""
        problems: list[tuple[Path_, str]] = []
        for section, known, what in (
            ("accounts", set(account_ids), "account"),
            ("devices", set(device_usernames), "device username"),
            ("trunks", set(trunk_ids), "trunk"),
        ):
            for key in getattr(self, section):
                if key not in known:
                    problems.append((("fair_use", section, key), f"unknown {what} {key!r}"))
        return problems

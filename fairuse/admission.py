"""The fair-use admission decision for one outgoing call, made before the B2BUA creates
the callee's leg.

:func:`decide` gives an :class:`Admission`: allowed, or refused with the SIP status and
the text of a ``Warning: 399 <host> "..."`` header naming the limit, plus a
low-cardinality ``limit`` label for the log event and the metric, and the alerts
(:class:`Alert`) that thresholds raised on the way. The checks run in this fixed order;
the first refusal wins and later checks are not made:

1. **Emergency, test and helpline destinations** (``destination.is_emergency``) are
   allowed, whatever else holds (EM-10, EM-11): no lease, quota, pattern, barring or
   blacklist applies, and ``counted`` is False (zero-rated, against no quota).
2. ``fair_use.enabled: false`` allows everything else.
3. An INVALID destination (the dial plan should have answered it already) is refused
   with ``404`` (``destination_invalid``).
4. **Destination** (external calls): blacklist, international calling, refused classes
   (``fairuse.destinations``) → ``403``.
5. **Concurrency**: the store grants leases atomically, so its answer comes in as
   ``counters.lease_refused``: ``device`` → ``486 Busy Here``, ``account`` or ``trunk``
   → ``503 Service Unavailable`` (:func:`lease_refusal` gives the same answer when the
   lease is taken after an allowed decision).
6. **Minute quotas** (external calls whose class counts): line, then pooled account,
   then account ceiling; warning and critical levels are fractions of each quota, and a
   critical level refuses with ``403`` when ``refuse_at_critical`` is set.
7. **Patterns** (``fairuse.patterns``; internal calls use the internal thresholds):
   a critical level of a refusing pattern refuses, with ``503`` and ``Retry-After`` for
   call rates (``pattern_cps``, ``pattern_cpm``), ``403`` for the others.

Internal calls go through 1-3, 5 and 7 with the looser ``internal`` limits and are never
counted against minute quotas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fairuse.destinations import DestinationClass, limit_label
from fairuse.patterns import PATTERN_LABELS, Level, PatternCounters, PatternSignal
from fairuse.policy import Action, Actions, EffectivePolicy

__all__ = [
    "LIMITS",
    "Admission",
    "AdmissionCounters",
    "Alert",
    "LeaseScope",
    "decide",
    "lease_refusal",
]

LeaseScope = Literal["account", "device", "trunk"]

LIMITS: frozenset[str] = frozenset(
    {
        "none",
        "emergency",
        "destination_invalid",
        "destination_blacklist_prefix",
        "destination_blacklist_country",
        "destination_international",
        "concurrency_account",
        "concurrency_device",
        "concurrency_trunk",
        "quota_line",
        "quota_pool",
        "quota_account",
        *(limit_label(klass) for klass in DestinationClass),
        *PATTERN_LABELS.values(),
    }
)
"""Every value :attr:`Admission.limit` and :attr:`Alert.limit` can take (metric labels)."""

_RATE_RETRY_AFTER = {"calls_per_second": 1, "calls_per_minute": 60}

_PATTERN_TEXT = {
    "calls_per_second": "call rate too high ({value:g} calls in one second)",
    "calls_per_minute": "call rate too high ({value:g} calls in one minute)",
    "sequential": "sequential dialling detected ({value:g} consecutive numbers;"
    " autodialling is not allowed)",
    "distinct_per_hour": "too many different numbers called ({value:g} in one hour)",
    "calls_per_day": "too many calls today ({value:g})",
    "distinct_per_month": "too many different numbers called this month ({value:g})",
    "short_calls": "too many very short calls ({value:.0%} of answered calls)",
}

_QUOTA_TEXT = {
    "quota_line": "monthly minutes of this line",
    "quota_pool": "pooled monthly minutes of the account",
    "quota_account": "monthly minutes of the account",
}


@dataclass(frozen=True, slots=True)
class Alert:
    """A threshold reached: what to do about it (``actions``: log, metric, webhook).
    ``key`` is stable per limit and level, for de-duplicating repeated alerts."""

    limit: str
    level: Level
    value: float
    threshold: float
    actions: tuple[Action, ...]
    message: str

    @property
    def key(self) -> str:
        return f"{self.limit}:{self.level}"


@dataclass(frozen=True, slots=True)
class AdmissionCounters:
    """What the counter store says about the call being decided.

    ``lease_refused``: the scope whose concurrency lease was refused, None if granted
    (or not yet asked). ``line_seconds`` / ``account_seconds``: billable seconds used
    this month by the line and by the account (None: not tracked). ``at``: the time of
    the attempt (aware), for time-of-day windows."""

    lease_refused: LeaseScope | None = None
    line_seconds: int | None = None
    account_seconds: int | None = None
    patterns: PatternCounters = field(default_factory=PatternCounters)
    at: datetime | None = None

    def __post_init__(self) -> None:
        if self.lease_refused not in (None, "account", "device", "trunk"):
            raise ValueError(
                f"lease_refused must be account, device, trunk or None, not {self.lease_refused!r}"
            )
        for name in ("line_seconds", "account_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"counter {name} must be an integer, not {value!r}")
            if value is not None and value < 0:
                raise ValueError(f"counter {name} is negative ({value}): a counter underflowed")
        if not isinstance(self.patterns, PatternCounters):
            raise ValueError("patterns must be a PatternCounters")


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision on one call attempt."""

    allowed: bool
    status: int | None = None  # SIP status of the refusal
    warning: str | None = None  # Warning text naming the limit (refusals only)
    limit: str = "none"  # label of the deciding limit (see LIMITS)
    actions: tuple[Alert, ...] = ()  # alerts to raise (log, metric, webhook)
    counted: bool = True  # the call's billable time counts against the minute quotas
    retry_after: int | None = None  # seconds, for a 503 on call rate
    destination_class: str | None = None
    country: str | None = None
    internal: bool = False
    emergency: bool = False

    def warning_header(self, host: str) -> str | None:
        """The value of a ``Warning`` header (RFC 3261 §20.43, code 399) or None."""
        if self.warning is None:
            return None
        text = self.warning.replace("\\", "\\\\").replace('"', '\\"')
        text = "".join(c if c.isprintable() else " " for c in text)
        return f'399 {host} "{text}"'


def _refuse(status: int, limit: str, text: str, **extra: Any) -> Admission:
    return Admission(False, status, f"Fair use: {text}", limit, **extra)


def lease_refusal(
    policy: EffectivePolicy, scope: LeaseScope, *, internal: bool = False
) -> Admission:
    """The refusal for a concurrency lease the store did not grant in ``scope``:
    ``486`` for the device (it is busy), ``503`` for the account or the trunk."""
    if scope not in ("account", "device", "trunk"):
        raise ValueError(f"unknown lease scope {scope!r}")
    limits = policy.internal_concurrency if internal else policy.concurrency
    maximum = getattr(limits, scope)
    whose = {"account": "the account's", "device": "this device's", "trunk": "the trunk's"}[scope]
    if maximum is not None:
        text = f"{whose} limit of {maximum} simultaneous calls is reached"
    else:
        text = f"{whose} simultaneous-call limit is reached"
    status = 486 if scope == "device" else 503
    return _refuse(status, f"concurrency_{scope}", text, internal=internal, counted=False)


def _alert(limit: str, level: Level, value: float, threshold: float, actions: Actions,
           message: str) -> Alert:
    chosen = actions.critical if level == "critical" else actions.warning
    return Alert(limit, level, value, threshold, tuple(chosen), message)


def _quota_checks(
    policy: EffectivePolicy, counters: AdmissionCounters
) -> tuple[list[Alert], Alert | None]:
    minutes = policy.plan.minutes
    alerts: list[Alert] = []
    refusing: Alert | None = None
    for limit, used, quota in (
        ("quota_line", counters.line_seconds, policy.line_quota_seconds),
        ("quota_pool", counters.account_seconds, policy.pool_quota_seconds),
        ("quota_account", counters.account_seconds, policy.account_quota_seconds),
    ):
        if used is None or quota is None:
            continue
        share = used / quota
        level: Level
        if share >= minutes.critical:
            level, bound = "critical", minutes.critical
        elif share >= minutes.warning:
            level, bound = "warning", minutes.warning
        else:
            continue
        message = (f"{_QUOTA_TEXT[limit]}: {used // 60} of {quota // 60} min used"
                   f" ({share:.0%}, {level} at {bound:.0%})")
        alert = _alert(limit, level, share, bound, minutes.actions, message)
        alerts.append(alert)
        if level == "critical" and minutes.refuse_at_critical and refusing is None:
            refusing = alert
    return alerts, refusing


def _pattern_alert(signal: PatternSignal, actions: Actions) -> Alert:
    message = _PATTERN_TEXT[signal.pattern].format(value=signal.value)
    if signal.window:
        message += f" [window {signal.window}]"
    return _alert(signal.label, signal.level, signal.value, signal.threshold, actions, message)


def decide(
    policy: EffectivePolicy,
    destination: Any,
    counters: AdmissionCounters | None = None,
) -> Admission:
    """The admission of a call to ``destination`` (a ``switch.dialplan.Destination``)
    under ``policy``, given the store's ``counters``; see the module text for the order."""
    counters = counters or AdmissionCounters()
    if destination.is_emergency:
        return Admission(True, limit="emergency", counted=False, emergency=True)
    kind = getattr(destination.kind, "value", destination.kind)
    internal = kind == "internal"
    if not policy.enabled:
        counted = kind == "external" and policy.destinations.check(destination).counted
        return Admission(True, counted=counted, internal=internal)
    if kind not in ("internal", "external"):
        reason = getattr(destination, "reason", None) or "not a number that can be called"
        return _refuse(404, "destination_invalid", reason, counted=False)

    alerts: list[Alert] = []
    klass: str | None = None
    country: str | None = None
    counted = False
    if not internal:
        verdict = policy.destinations.check(destination)
        klass, country, counted = verdict.destination_class.value, verdict.country, verdict.counted
        if not verdict.allowed:
            return _refuse(403, verdict.limit or "destination_invalid", verdict.reason or "",
                           counted=False, destination_class=klass, country=country)

    context = {"destination_class": klass, "country": country, "internal": internal}
    if counters.lease_refused is not None:
        refusal = lease_refusal(policy, counters.lease_refused, internal=internal)
        return Admission(False, refusal.status, refusal.warning, refusal.limit,
                         counted=False, **context)

    if not internal and counted:
        quota_alerts, refusing = _quota_checks(policy, counters)
        alerts += quota_alerts
        if refusing is not None:
            return _refuse(403, refusing.limit, f"{_QUOTA_TEXT[refusing.limit]} used up",
                           actions=tuple(alerts), counted=False, **context)

    evaluator = policy.internal_patterns if internal else policy.patterns
    actions = evaluator.limits.actions
    refusal_signal: PatternSignal | None = None
    for signal in evaluator.evaluate(counters.patterns, counters.at):
        alerts.append(_pattern_alert(signal, actions))
        if signal.refuse and refusal_signal is None:
            refusal_signal = signal
    if refusal_signal is not None:
        retry = _RATE_RETRY_AFTER.get(refusal_signal.pattern)
        text = _PATTERN_TEXT[refusal_signal.pattern].format(value=refusal_signal.value)
        return _refuse(503 if retry else 403, refusal_signal.label, text,
                       actions=tuple(alerts), counted=False, retry_after=retry, **context)
    return Admission(True, actions=tuple(alerts), counted=counted, **context)

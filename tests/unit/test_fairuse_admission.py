"""Admission decisions: emergency and protected numbers always allowed and never
counted, then destination (403), concurrency lease (486/503), minute quotas (403) and
patterns (503 for call rates, 403 otherwise), in that order, each refusal naming its
limit in the Warning text and a label of the documented set."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from ruamel.yaml import YAML

from fairuse.admission import LIMITS, Admission, AdmissionCounters, decide, lease_refusal
from fairuse.patterns import PatternCounters
from fairuse.policy import EffectivePolicy, FairUse
from switch.dialplan import DialPlan

FR = DialPlan("FR", extensions=["1000", "1001"])
MINUTE = 60
EXHAUSTED = AdmissionCounters(
    lease_refused="account",
    line_seconds=10**9,
    account_seconds=10**9,
    patterns=PatternCounters(
        calls_last_second=10**6,
        calls_last_minute=10**6,
        calls_today=10**6,
        distinct_last_hour=10**6,
        distinct_this_month=10**6,
        recent_numbers=tuple(f"+3314000{n:04d}" for n in range(20)),
        answered_calls=10**6,
        short_calls=10**6,
    ),
)


def policy(text: str = "", users: int = 1, device: str | None = "alice") -> EffectivePolicy:
    data = YAML(typ="safe").load(text) or {}
    return FairUse.model_validate(data).resolve(
        "acme", device, "orange", users=users, home_country="FR")


def check(admission: Admission) -> Admission:
    """Every decision uses a documented label, and a refusal always names its limit."""
    assert admission.limit in LIMITS
    for alert in admission.actions:
        assert alert.limit in LIMITS
    if not admission.allowed:
        assert admission.status is not None and admission.warning
        assert admission.warning.startswith("Fair use: ")
        assert not admission.counted
    return admission


# ---- emergency -----------------------------------------------------------------------


@pytest.mark.parametrize("dialled", ["112", "15", "+112", "119", "116000", "urn:service:sos",
                                     "urn:service:test.sos"])
def test_emergency_and_protected_numbers_are_never_refused_nor_counted(dialled: str) -> None:
    strict = policy("""
        enabled: true
        plans: {standard: {destinations: {refused_classes: [fixed, mobile, special]}}}
    """)
    destination = FR.classify(dialled)
    assert destination.is_emergency
    admission = check(decide(strict, destination, EXHAUSTED))
    assert admission.allowed and admission.emergency
    assert not admission.counted
    assert admission.limit == "emergency"
    assert admission.status is None and admission.actions == ()


def test_emergency_calls_pass_even_when_fair_use_is_disabled() -> None:
    admission = decide(policy("enabled: false"), FR.classify("112"), EXHAUSTED)
    assert admission.allowed and not admission.counted


# ---- destinations --------------------------------------------------------------------


def test_premium_rate_is_refused_with_403_naming_the_limit() -> None:
    admission = check(decide(policy(), FR.classify("0899123456")))
    assert (admission.allowed, admission.status, admission.limit) == (
        False, 403, "destination_premium")
    assert admission.warning == "Fair use: calls to premium-rate numbers are not allowed"
    assert admission.warning_header("sip.example.com") == (
        '399 sip.example.com "Fair use: calls to premium-rate numbers are not allowed"')
    assert admission.destination_class == "premium_rate"


def test_international_is_refused_until_enabled_for_the_account() -> None:
    germany = FR.classify("+4930123456")
    refused = check(decide(policy(), germany))
    assert (refused.status, refused.limit, refused.country) == (
        403, "destination_international", "DE")
    opened = policy("accounts: {acme: {destinations: {international: true}}}")
    admission = check(decide(opened, germany))
    assert admission.allowed and admission.counted and admission.country == "DE"


def test_blacklisted_countries_refuse_and_exceptions_lift_them() -> None:
    jamaica = FR.classify("+18765551234")
    text = "accounts: {acme: {destinations: {international: true}}}"
    refused = check(decide(policy(text), jamaica))
    assert refused.limit == "destination_blacklist_country"
    excepted = policy("""
        accounts:
          acme:
            destinations: {international: true}
            blacklist_exceptions: {countries: [JM]}
    """)
    assert check(decide(excepted, jamaica)).allowed


def test_invalid_destinations_get_404_with_the_dial_plan_reason() -> None:
    admission = check(decide(policy(), FR.classify("*21*")))
    assert (admission.status, admission.limit) == (404, "destination_invalid")
    assert admission.warning == "Fair use: feature codes not supported"


# ---- concurrency ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "status", "text"),
    [
        ("device", 486, "Fair use: this device's limit of 2 simultaneous calls is reached"),
        ("account", 503, "Fair use: the account's limit of 50 simultaneous calls is reached"),
        ("trunk", 503, "Fair use: the trunk's limit of 30 simultaneous calls is reached"),
    ],
)
def test_lease_refusals_map_to_busy_or_unavailable(scope: str, status: int, text: str) -> None:
    limits = policy("devices: {alice: {max_calls: 2}}\ntrunks: {orange: {max_calls: 30}}")
    counters = AdmissionCounters(lease_refused=scope)  # type: ignore[arg-type]
    admission = check(decide(limits, FR.classify("0612345678"), counters))
    assert (admission.status, admission.limit, admission.warning) == (
        status, f"concurrency_{scope}", text)
    after = lease_refusal(limits, scope)  # type: ignore[arg-type]
    assert (after.status, after.limit, after.warning) == (status, admission.limit, text)


def test_a_lease_refusal_without_a_known_limit_still_names_it() -> None:
    admission = lease_refusal(policy(), "device")
    assert admission.warning == "Fair use: this device's simultaneous-call limit is reached"
    with pytest.raises(ValueError, match="unknown lease scope"):
        lease_refusal(policy(), "site")  # type: ignore[arg-type]


def test_bad_lease_scope_in_counters_is_refused() -> None:
    with pytest.raises(ValueError, match="lease_refused"):
        AdmissionCounters(lease_refused="tenant")  # type: ignore[arg-type]


# ---- minute quotas -------------------------------------------------------------------


def test_line_quota_warns_then_refuses_new_public_calls() -> None:
    mobile = FR.classify("0612345678")
    quiet = check(decide(policy(), mobile, AdmissionCounters(line_seconds=3999 * MINUTE)))
    assert quiet.allowed and quiet.actions == () and quiet.counted
    warned = check(decide(policy(), mobile, AdmissionCounters(line_seconds=4000 * MINUTE)))
    assert warned.allowed
    assert [(a.limit, a.level, a.actions) for a in warned.actions] == [
        ("quota_line", "warning", ("log", "metric"))]
    refused = check(decide(policy(), mobile, AdmissionCounters(line_seconds=5000 * MINUTE)))
    assert (refused.status, refused.limit) == (403, "quota_line")
    assert refused.warning == "Fair use: monthly minutes of this line used up"
    assert [(a.level, a.actions) for a in refused.actions] == [
        ("critical", ("log", "metric", "webhook"))]


def test_pooled_and_account_quotas() -> None:
    mobile = FR.classify("0612345678")
    two_users = policy(users=2)  # 5,000 pooled minutes
    pooled = check(decide(two_users, mobile, AdmissionCounters(account_seconds=5000 * MINUTE)))
    assert pooled.limit == "quota_pool"
    big = policy(users=100)  # 250,000 pooled minutes, but 50,000 at most
    below = check(decide(big, mobile, AdmissionCounters(account_seconds=49_999 * MINUTE)))
    assert below.allowed
    assert [a.limit for a in below.actions] == ["quota_account"]  # a warning
    capped = check(decide(big, mobile, AdmissionCounters(account_seconds=50_000 * MINUTE)))
    assert capped.limit == "quota_account"


def test_uncounted_destinations_pass_an_exhausted_quota() -> None:
    used_up = AdmissionCounters(line_seconds=10**9, account_seconds=10**9)
    toll_free = check(decide(policy(), FR.classify("0800123456"), used_up))
    assert toll_free.allowed and not toll_free.counted


def test_quota_without_refusal_only_alerts() -> None:
    alerting = policy("plans: {standard: {minutes: {refuse_at_critical: false}}}")
    admission = check(decide(alerting, FR.classify("0612345678"),
                             AdmissionCounters(line_seconds=6000 * MINUTE)))
    assert admission.allowed
    assert [(a.limit, a.level) for a in admission.actions] == [("quota_line", "critical")]
    assert "webhook" in admission.actions[0].actions
    assert admission.actions[0].key == "quota_line:critical"


# ---- patterns ------------------------------------------------------------------------


def test_call_rate_is_refused_with_503_and_retry_after() -> None:
    counters = AdmissionCounters(patterns=PatternCounters(calls_last_second=10))
    admission = check(decide(policy(), FR.classify("0612345678"), counters))
    assert (admission.status, admission.limit, admission.retry_after) == (503, "pattern_cps", 1)
    assert admission.warning == "Fair use: call rate too high (10 calls in one second)"
    per_minute = AdmissionCounters(patterns=PatternCounters(calls_last_minute=100))
    assert check(decide(policy(), FR.classify("0612345678"), per_minute)).retry_after == 60


def test_sequential_dialling_is_refused_with_403() -> None:
    numbers = tuple(f"+3314000{n:04d}" for n in range(10))
    counters = AdmissionCounters(patterns=PatternCounters(recent_numbers=numbers))
    admission = check(decide(policy(), FR.classify(numbers[-1]), counters))
    assert (admission.status, admission.limit) == (403, "pattern_sequential")
    assert "autodialling is not allowed" in (admission.warning or "")


def test_alert_only_patterns_allow_the_call() -> None:
    counters = AdmissionCounters(patterns=PatternCounters(distinct_this_month=30_000))
    admission = check(decide(policy(), FR.classify("0612345678"), counters))
    assert admission.allowed
    assert [(a.limit, a.level) for a in admission.actions] == [
        ("pattern_distinct_month", "critical")]


def test_night_window_thresholds_apply_at_night() -> None:
    night = policy("""
        timezone: Europe/Paris
        plans:
          standard:
            patterns:
              windows:
                - {name: night, start: "22:00", end: "06:00", calls_per_minute: {warning: 3, critical: 5}}
    """)
    paris = ZoneInfo("Europe/Paris")
    busy = PatternCounters(calls_last_minute=6)
    by_night = AdmissionCounters(patterns=busy, at=datetime(2026, 11, 6, 23, tzinfo=paris))
    by_day = AdmissionCounters(patterns=busy, at=datetime(2026, 11, 6, 11, tzinfo=paris))
    refused = check(decide(night, FR.classify("0612345678"), by_night))
    assert refused.limit == "pattern_cpm"
    assert refused.actions[-1].message.endswith("[window night]")
    assert check(decide(night, FR.classify("0612345678"), by_day)).allowed


# ---- order ---------------------------------------------------------------------------


def test_checks_run_in_the_documented_order() -> None:
    limits = policy()
    everything = EXHAUSTED
    assert decide(limits, FR.classify("0899123456"), everything).limit == "destination_premium"
    mobile = FR.classify("0612345678")
    assert decide(limits, mobile, everything).limit == "concurrency_account"
    no_lease = AdmissionCounters(line_seconds=10**9, patterns=everything.patterns)
    assert decide(limits, mobile, no_lease).limit == "quota_line"
    patterns_only = AdmissionCounters(patterns=everything.patterns)
    assert decide(limits, mobile, patterns_only).limit == "pattern_cps"


# ---- internal calls ------------------------------------------------------------------


def test_internal_calls_ignore_quotas_and_use_looser_rates() -> None:
    extension = FR.classify("1001")
    counters = AdmissionCounters(
        line_seconds=10**9, account_seconds=10**9,
        patterns=PatternCounters(calls_last_second=15,
                                 recent_numbers=tuple(str(1000 + n) for n in range(20))),
    )
    admission = check(decide(policy(), extension, counters))
    assert admission.allowed and admission.internal and not admission.counted
    assert [(a.limit, a.level) for a in admission.actions] == [("pattern_cps", "warning")]
    flood = AdmissionCounters(patterns=PatternCounters(calls_last_second=20))
    refused = check(decide(policy(), extension, flood))
    assert (refused.status, refused.limit, refused.internal) == (503, "pattern_cps", True)


def test_internal_device_lease_uses_the_internal_limit() -> None:
    limits = policy("internal: {concurrency: {device: 3}}")
    admission = check(decide(limits, FR.classify("1001"), AdmissionCounters(
        lease_refused="device")))
    assert admission.status == 486
    assert admission.warning == "Fair use: this device's limit of 3 simultaneous calls is reached"


def test_disabled_fair_use_allows_everything() -> None:
    limits = policy("enabled: false")
    for dialled in ("0899123456", "+4930123456", "1001"):
        assert check(decide(limits, FR.classify(dialled), EXHAUSTED)).allowed
    # minutes are still counted (for reports), except for the uncounted classes
    assert decide(limits, FR.classify("0612345678"), EXHAUSTED).counted
    assert not decide(limits, FR.classify("0800123456"), EXHAUSTED).counted


def test_warning_header_escapes_quotes() -> None:
    admission = Admission(False, 403, 'Fair use: "x" \\ y', "destination_premium")
    assert admission.warning_header("h") == '399 h "Fair use: \\"x\\" \\\\ y"'
    assert Admission(True).warning_header("h") is None


"""Fair-use policy settings: the operators' default figures, plan ← account ← device
merging key by key, YAML problems reported at the key that holds them, and the
blacklist loaded from config/fraud-destinations.yaml unless the YAML gives its own."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML

from fairuse.destinations import DestinationClass
from fairuse.policy import DEFAULT_FRAUD_LIST, FairUse, billable_seconds, load_fraud_list
from switch.cdr import billable_seconds as ledger_billable_seconds
from switch.settings import _format_errors, _to_plain


class Root(BaseModel):
    """Stands in for switch.settings.Settings, which nests the section the same way."""

    model_config = ConfigDict(extra="forbid")
    fair_use: FairUse


def load(text: str, **context: Any) -> FairUse:
    data = YAML(typ="safe").load(textwrap.dedent(text)) or {}
    return Root.model_validate({"fair_use": data}, context=context or None).fair_use


def errors_of(text: str, **context: Any) -> list[str]:
    """The ``file:line: key: problem`` lines switch.settings prints for this section."""
    source = "fair_use:\n" + textwrap.indent(textwrap.dedent(text).lstrip("\n"), "  ")
    lines: dict[Any, int] = {}
    data = _to_plain(YAML(typ="rt").load(source), (), lines)
    with pytest.raises(ValidationError) as caught:
        Root.model_validate(data, context=context or None)
    return _format_errors(caught.value.errors(), [], "cfg.yaml", lines)


# ---- defaults ------------------------------------------------------------------------


def test_defaults_are_the_operators_figures() -> None:
    policy = FairUse().resolve("acme", "alice", home_country="FR", users=3)
    assert policy.plan_name == "standard"
    assert policy.concurrency.account == 50
    assert policy.max_duration() == 6 * 3600
    assert policy.max_duration(fax=True) == 3 * 3600
    assert policy.line_quota_seconds == 5000 * 60
    assert policy.pool_quota_seconds == 2500 * 3 * 60
    assert policy.account_quota_seconds == 50_000 * 60
    assert (policy.plan.minutes.increment, policy.plan.minutes.minimum) == (6, 18)
    assert DestinationClass.PREMIUM_RATE in policy.destinations.refused_classes
    assert policy.destinations.international is False
    # autodialling is refused: sequential dialling and call rates refuse at critical
    patterns = policy.plan.patterns
    assert patterns.sequential.refuse and patterns.calls_per_second.refuse


def test_internal_calls_have_looser_defaults() -> None:
    policy = FairUse().resolve("acme", home_country="FR")
    assert policy.internal_concurrency.account is None
    assert policy.max_duration(internal=True) > policy.max_duration()
    internal = policy.internal.patterns
    assert internal.calls_per_second.critical > policy.plan.patterns.calls_per_second.critical
    assert internal.sequential.critical is None


@pytest.mark.parametrize("duration", [None, 0, 0.0004, 1, 17.9, 18.0004, 18.001, 19, 24, 25, 3601.5])
def test_billable_time_matches_the_cdr_ledger(duration: float | None) -> None:
    assert billable_seconds(duration, 6, 18) == ledger_billable_seconds(duration, 6, 18)
    assert billable_seconds(duration, 60, 60) == ledger_billable_seconds(duration, 60, 60)


def test_policy_bills_with_the_plan_increment_and_minimum() -> None:
    fair_use = load("""
        plans:
          per_minute: {minutes: {increment: 60, minimum: 60}}
    """)
    policy = fair_use.resolve("acme", home_country="FR")
    assert policy.billable(61) == 120
    assert policy.billable(5) == 60
    assert policy.billable(None) == 0


# ---- merging -------------------------------------------------------------------------


def test_account_override_replaces_only_the_keys_it_writes() -> None:
    fair_use = load("""
        plans:
          business:
            minutes: {per_line: 3000, warning: 0.5}
            concurrency: {account: 20}
        accounts:
          acme:
            minutes: {per_line: 8000}
            destinations: {international: true}
    """)
    policy = fair_use.resolve("acme", home_country="FR")
    assert policy.plan_name == "business"  # the only plan is the default
    assert policy.line_quota_seconds == 8000 * 60
    assert policy.plan.minutes.warning == 0.5  # kept from the plan
    assert policy.concurrency.account == 20
    assert policy.destinations.international is True
    other = fair_use.resolve("other", home_country="FR")
    assert other.line_quota_seconds == 3000 * 60
    assert other.destinations.international is False


def test_device_overrides_apply_over_the_account() -> None:
    fair_use = load("""
        accounts:
          acme:
            concurrency: {device: 4}
            minutes: {per_line: 8000}
            duration: {voice: 7200}
        devices:
          fax1: {max_calls: 1, minutes_per_line: 9000, duration: {fax: 1800}}
        trunks:
          orange: {max_calls: 30}
    """)
    policy = fair_use.resolve("acme", "fax1", "orange", home_country="FR")
    assert policy.concurrency.device == 1
    assert policy.concurrency.trunk == 30
    assert policy.line_quota_seconds == 9000 * 60
    assert policy.max_duration() == 7200  # from the account
    assert policy.max_duration(fax=True) == 1800  # from the device
    alice = fair_use.resolve("acme", "alice", "orange", home_country="FR")
    assert alice.concurrency.device == 4
    assert alice.line_quota_seconds == 8000 * 60


def test_a_partial_threshold_keeps_the_patterns_other_defaults() -> None:
    fair_use = load("""
        plans:
          standard:
            patterns: {calls_per_second: {critical: 20}}
        accounts:
          acme:
            patterns: {calls_per_second: {warning: 15}}
    """)
    plan = fair_use.resolve("other", home_country="FR").plan.patterns.calls_per_second
    assert (plan.warning, plan.critical, plan.refuse) == (5, 20, True)
    acme = fair_use.resolve("acme", home_country="FR").plan.patterns.calls_per_second
    assert (acme.warning, acme.critical, acme.refuse) == (15, 20, True)


def test_internal_overrides_keep_the_internal_defaults() -> None:
    fair_use = load("""
        internal:
          concurrency: {device: 4}
          patterns: {calls_per_second: {critical: 50}}
    """)
    internal = fair_use.resolve("acme", home_country="FR").internal
    assert internal.concurrency.device == 4
    assert internal.concurrency.account is None  # not the external 50
    assert internal.patterns.calls_per_second.critical == 50
    assert internal.patterns.calls_per_second.warning == 10
    assert internal.patterns.sequential.critical is None


def test_users_come_from_the_account_or_the_caller() -> None:
    fair_use = load("accounts: {acme: {users: 10}}")
    assert fair_use.resolve("acme", users=3, home_country="FR").pool_quota_seconds == (
        2500 * 10 * 60
    )
    assert fair_use.resolve("other", users=3, home_country="FR").pool_quota_seconds == (
        2500 * 3 * 60
    )


def test_resolve_is_cached_and_needs_a_home_country() -> None:
    fair_use = FairUse()
    first = fair_use.resolve("acme", "alice", home_country="FR")
    assert fair_use.resolve("acme", "alice", home_country="FR") is first
    with pytest.raises(ValueError, match="home country"):
        fair_use.resolve("acme")
    assert load("home_country: US").resolve("acme").destinations.home_country == "US"


def test_disabled_fair_use_has_no_concurrency_limits() -> None:
    policy = load("{enabled: false, trunks: {t: {max_calls: 3}}}").resolve(
        "acme", None, "t", home_country="FR"
    )
    assert policy.enabled is False
    assert (policy.concurrency.account, policy.concurrency.trunk) == (None, None)


def test_reference_problems_name_unknown_accounts_devices_and_trunks() -> None:
    fair_use = load("""
        accounts: {acme: {}, ghost: {}}
        devices: {alice: {max_calls: 2}, nobody: {max_calls: 2}}
        trunks: {orange: {max_calls: 3}}
    """)
    problems = fair_use.reference_problems(["acme"], ["alice"], [])
    assert problems == [
        (("fair_use", "accounts", "ghost"), "unknown account 'ghost'"),
        (("fair_use", "devices", "nobody"), "unknown device username 'nobody'"),
        (("fair_use", "trunks", "orange"), "unknown trunk 'orange'"),
    ]


# ---- problems at their keys ----------------------------------------------------------


def test_field_problems_name_the_nested_key_and_line() -> None:
    errors = errors_of("""
        plans:
          standard:
            minutes:
              per_line: 0
            concurrency: {acount: 3}
    """)
    assert errors == [
        "cfg.yaml:5: fair_use.plans.standard.minutes.per_line: must be at least 1",
        "cfg.yaml:6: fair_use.plans.standard.concurrency.acount: unknown key",
    ]


def test_warning_above_critical_is_reported_where_it_is_written() -> None:
    errors = errors_of("""
        plans:
          standard:
            patterns:
              calls_per_minute: {warning: 200, critical: 100}
        accounts:
          acme:
            patterns:
              calls_per_second: {critical: 2}
    """)
    assert errors == [
        "cfg.yaml:5: fair_use.plans.standard.patterns.calls_per_minute.warning:"
        " must not exceed critical (100)",
        "cfg.yaml:9: fair_use.accounts.acme.patterns.calls_per_second.warning:"
        " must not exceed critical (2)",
    ]


def test_unknown_plans_are_named() -> None:
    errors = errors_of("""
        default_plan: gold
        plans: {basic: {}}
        accounts:
          acme: {plan: silver}
    """)
    assert errors == [
        "cfg.yaml:2: fair_use.default_plan: unknown plan 'gold' (plans: basic)",
        "cfg.yaml:5: fair_use.accounts.acme.plan: unknown plan 'silver' (plans: basic)",
    ]


def test_prefixes_and_countries_are_checked_one_by_one() -> None:
    errors = errors_of("""
        blacklist:
          extra_prefixes: ["+881", 882, "+881", "+0123"]
          extra_countries: [XX, cu]
        accounts:
          acme:
            blacklist_exceptions: {countries: [JM, JM]}
    """)
    assert "cfg.yaml:3: fair_use.blacklist.extra_prefixes[1]: prefix 882 must be a quoted" \
        ' string like "+881"' in errors
    assert "cfg.yaml:3: fair_use.blacklist.extra_prefixes[2]: duplicate prefix '+881'" in errors
    assert any(e.startswith("cfg.yaml:3: fair_use.blacklist.extra_prefixes[3]: prefix '+0123'")
               for e in errors)
    assert "cfg.yaml:4: fair_use.blacklist.extra_countries[0]: unknown country 'XX'" \
        " (ISO 3166 alpha-2 expected)" in errors
    assert "cfg.yaml:7: fair_use.accounts.acme.blacklist_exceptions.countries[1]:" \
        " duplicate country 'JM'" in errors
    assert len(errors) == 5


def test_windows_need_distinct_times_and_known_days() -> None:
    errors = errors_of("""
        plans:
          standard:
            patterns:
              windows:
                - {name: night, start: "22:00", end: "22:00"}
                - {name: lunch, start: "12:00", end: "25:00", days: [monday]}
    """)
    assert any(".windows[0].end: must differ from start" in e for e in errors)
    assert any(".windows[1].end: '25:00' is not a time of day" in e for e in errors)
    assert any(".windows[1].days[0]: must be one of" in e for e in errors)


def test_a_window_lowering_critical_below_the_plans_warning_is_explained() -> None:
    errors = errors_of("""
        plans:
          standard:
            patterns:
              windows:
                - name: night
                  start: "22:00"
                  end: "06:00"
                  calls_per_minute: {critical: 5}
    """)
    assert errors == [
        "cfg.yaml:9: fair_use.plans.standard.patterns.windows[0].calls_per_minute.warning:"
        " the plan's warning (40) exceeds this window's critical (5): give the window a"
        " warning too"
    ]


def test_duration_warning_must_come_before_the_cut() -> None:
    errors = errors_of("""
        devices:
          fax1: {duration: {fax: 120, warning_before: 300}}
    """)
    assert errors == [
        "cfg.yaml:3: fair_use.devices.fax1.duration.warning_before:"
        " must be shorter than the voice and fax durations"
    ]


def test_unknown_time_zone_is_refused() -> None:
    assert errors_of("timezone: Mars/Olympus") == [
        "cfg.yaml:2: fair_use.timezone: unknown time zone 'Mars/Olympus' (e.g. Europe/Paris, UTC)"
    ]


# ---- the fraud list ------------------------------------------------------------------


def test_default_fraud_list_is_loaded_from_config() -> None:
    countries, prefixes = load_fraud_list(DEFAULT_FRAUD_LIST)
    assert countries and prefixes
    tables = FairUse().tables
    assert tables.blacklist_countries == frozenset(countries)
    assert len(tables.blacklist_prefixes) == len(prefixes)
    assert "+881" in prefixes


def test_yaml_lists_replace_the_file_and_extras_add() -> None:
    tables = load("""
        blacklist:
          countries: [CU]
          extra_countries: [SO]
          extra_prefixes: ["+37125"]
    """).tables
    assert tables.blacklist_countries == {"CU", "SO"}
    _, default_prefixes = load_fraud_list(DEFAULT_FRAUD_LIST)
    assert len(tables.blacklist_prefixes) == len(default_prefixes) + 1  # prefixes from file
    assert tables.blacklist_prefixes.longest("37125123456") == ("37125", True)


def test_a_relative_fraud_file_is_read_beside_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "fraud.yaml").write_text('countries: [SO]\nprefixes: ["+979"]\n')
    tables = load("blacklist: {file: fraud.yaml}", base_dir=tmp_path).tables
    assert tables.blacklist_countries == {"SO"}
    assert tables.blacklist_prefixes.longest("979123") == ("979", True)


def test_a_bad_fraud_file_is_reported_at_its_key(tmp_path: Path) -> None:
    (tmp_path / "fraud.yaml").write_text("countries: [ZZ]\nprefixes: [881]\n")
    errors = errors_of("blacklist: {file: fraud.yaml}", base_dir=tmp_path)
    assert len(errors) == 1
    assert errors[0].startswith("cfg.yaml:2: fair_use.blacklist.file: fraud list ")
    assert "countries[0]: unknown country 'ZZ'" in errors[0]
    assert "prefixes[0]: prefix 881 must be a quoted string" in errors[0]
    missing = errors_of("blacklist: {file: absent.yaml}", base_dir=tmp_path)
    assert "cannot read fraud list" in missing[0]

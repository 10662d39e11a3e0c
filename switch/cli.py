"""Command line: ``python -m switch run --config FILE``, ``check-config FILE``,
``cdr export --config FILE --from DATE --to DATE [--output FILE.csv]``, and for the
emergency audit journal (EMERGENCY.md EM-70) ``emergency export --config FILE [--from WHEN]
[--until WHEN] [--call-id ID] [-o FILE.jsonl]`` and ``emergency verify --config FILE``, and
for fair use ``usage ACCOUNT [--config FILE] [--month YYYY-MM] [--json]`` (an account's
concurrent calls, minutes this month per line and pooled, and call-pattern alerts).

Everyday operations on the running switch, through its admin API (the address is the
config's ``admin.listen``, or ``--url``; the bearer token ``--token`` or
``$SOFTSWITCH_ADMIN_TOKEN``): ``registrations``, ``calls [--hangup CALL_ID]``,
``location set USERNAME SITE [LOCATION]``, ``location history USERNAME``, ``reload``.
Offline, on the switch's files: ``availability [--month YYYY-MM]`` (uptime and monthly
availability) and ``privacy export|erase PERSON`` (a person's data; erasure pseudonymises
CDRs and location history, keeps the emergency audit journal, and needs ``--yes``).

Exit codes: 0 success, 1 failed (the switch refused, is unreachable, or a file problem),
2 unusable configuration (or bad command line), 130 interrupted.
A configuration problem is printed as ``file:line: key: problem`` lines, never as a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switch.settings import ConfigError, load_settings

if TYPE_CHECKING:
    from fairuse.policy import EffectivePolicy
    from fairuse.store import PatternCounters, RedisFairUseStore
    from switch.cdr import CallRecord
    from switch.settings import Account, Settings

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

DEFAULT_CONFIG = "config/switch.yaml"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("softswitch")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softswitch",
        description="A SIP softswitch for businesses (registrar, B2BUA, media relay, E911).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the switch until interrupted")
    run.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"YAML configuration file (default: {DEFAULT_CONFIG})",
    )

    check = commands.add_parser(
        "check-config", help="validate a configuration file and report every problem"
    )
    check.add_argument("file", metavar="FILE", help="YAML configuration file")

    cdr = commands.add_parser("cdr", help="call detail records")
    cdr_commands = cdr.add_subparsers(dest="cdr_command", metavar="COMMAND", required=True)
    export = cdr_commands.add_parser(
        "export",
        help="write the records of calls started in a UTC time range as CSV",
        description="Dates (YYYY-MM-DD) or date-times (ISO 8601, UTC unless an offset is "
        "given). --to is inclusive for a date (the whole day), exclusive for a date-time.",
    )
    export.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    export.add_argument("--from", dest="start_from", required=True, type=_cdr_from, metavar="WHEN")
    export.add_argument("--to", dest="until", required=True, type=_cdr_to, metavar="WHEN")
    export.add_argument("--output", "-o", metavar="FILE", help="CSV file (default: stdout)")

    emergency = commands.add_parser("emergency", help="the emergency call audit journal")
    emergency_commands = emergency.add_subparsers(
        dest="emergency_command", metavar="COMMAND", required=True
    )
    journal_export = emergency_commands.add_parser(
        "export",
        help="write journal entries as JSON lines, as stored (hashes included)",
        description="Dates (YYYY-MM-DD) or date-times (ISO 8601, UTC unless an offset is "
        "given). --until is inclusive for a date (the whole day), exclusive for a date-time.",
    )
    journal_export.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    journal_export.add_argument("--from", dest="start_from", type=_cdr_from, metavar="WHEN")
    journal_export.add_argument("--until", dest="until", type=_cdr_to, metavar="WHEN")
    journal_export.add_argument("--call-id", dest="call_id", metavar="ID")
    journal_export.add_argument(
        "--output", "-o", metavar="FILE", help="JSON lines file (default: stdout)"
    )
    journal_verify = emergency_commands.add_parser(
        "verify",
        help="check the journal's hash chain; print each problem, exit 1 if there is one",
    )
    journal_verify.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    ready = emergency_commands.add_parser(
        "readiness",
        help="list what keeps emergency calling from being ready (sites, devices, trunks);"
        " exit 1 if anything does",
    )
    ready.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")

    usage = commands.add_parser(
        "usage",
        help="an account's fair use: concurrent calls, minutes this month, call patterns",
        description="Concurrent calls come from the shared store (store.backend: redis); "
        "minutes from Redis, or rebuilt from the CDR ledger when the store is in memory "
        "or Redis has none for the month; call patterns from Redis or the CDR ledger.",
    )
    usage.add_argument("account", metavar="ACCOUNT", help="account id")
    usage.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    usage.add_argument(
        "--month", type=_usage_month, metavar="YYYY-MM",
        help="month of the minute figures (default: the current month, UTC)",
    )
    usage.add_argument("--json", dest="as_json", action="store_true",
                       help="print one JSON document instead of text")
    _add_operations_commands(commands)
    return parser


def _cdr_bound(text: str, *, inclusive_day: bool) -> float:
    from datetime import UTC, date, datetime, timedelta

    try:
        if len(text) == 10:
            day = date.fromisoformat(text) + timedelta(days=1 if inclusive_day else 0)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date or ISO 8601 date-time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _cdr_from(text: str) -> float:
    return _cdr_bound(text, inclusive_day=False)


def _cdr_to(text: str) -> float:
    return _cdr_bound(text, inclusive_day=True)


def _cdr_export(config: str, start_from: float, until: float, output: str | None) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    if until <= start_from:
        print("cdr export: --to must be after --from", file=sys.stderr)
        return EXIT_CONFIG
    from switch.cdr import CdrLedger

    directory = settings.cdr.directory
    if not directory.is_dir():
        print(f"cdr export: no CDR directory {directory}", file=sys.stderr)
        return 1
    ledger = CdrLedger(directory)
    try:
        if output is None:
            rows = ledger.export_csv(start_from, until, sys.stdout)
        else:
            with open(output, "w", newline="", encoding="utf-8") as out:
                rows = ledger.export_csv(start_from, until, out)
    except OSError as exc:
        print(f"cdr export: {exc}", file=sys.stderr)
        return 1
    skipped = ledger.stats.unreadable_lines
    note = f" ({skipped} unreadable lines skipped)" if skipped else ""
    print(f"cdr export: {rows} records from {directory}{note}", file=sys.stderr)
    return EXIT_OK


def _journal_directory(config: str) -> Path | int:
    """The emergency journal directory of a configuration, or an exit code."""
    try:
        settings = load_settings(config)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    directory = getattr(getattr(settings, "emergency", None), "journal_dir", None)
    if directory is None:  # settings without the emergency section: beside the CDR directory
        directory = settings.cdr.directory.parent / "emergency"
    return Path(directory)


def _emergency_export(
    config: str,
    start_from: float | None,
    until: float | None,
    call_id: str | None,
    output: str | None,
) -> int:
    directory = _journal_directory(config)
    if isinstance(directory, int):
        return directory
    if start_from is not None and until is not None and until <= start_from:
        print("emergency export: --until must be after --from", file=sys.stderr)
        return EXIT_CONFIG
    if not directory.is_dir():
        print(f"emergency export: no emergency journal directory {directory}", file=sys.stderr)
        return 1
    import json

    from e911.audit import read_journal

    unreadable: list[str] = []
    entries = read_journal(
        directory, call_id=call_id, start=start_from, until=until, on_unreadable=unreadable.append
    )
    count = 0
    try:
        with contextlib.ExitStack() as stack:
            out = (
                sys.stdout
                if output is None
                else stack.enter_context(open(output, "w", encoding="utf-8"))
            )
            for entry in entries:
                out.write(json.dumps(entry, separators=(",", ":"), ensure_ascii=True) + "\n")
                count += 1
    except OSError as exc:
        print(f"emergency export: {exc}", file=sys.stderr)
        return 1
    for problem in unreadable:
        print(f"emergency export: skipped {problem}", file=sys.stderr)
    print(f"emergency export: {count} entries from {directory}", file=sys.stderr)
    return EXIT_OK


def _emergency_verify(config: str) -> int:
    directory = _journal_directory(config)
    if isinstance(directory, int):
        return directory
    from e911.audit import journal_files, verify

    try:
        problems = verify(directory)
    except OSError as exc:
        problems = [f"{directory}: {exc}"]
    for problem in problems:
        print(problem)
    if problems:
        print(f"emergency verify: {len(problems)} problems in {directory}", file=sys.stderr)
        return 1
    files = len(journal_files(directory))
    print(f"emergency verify: {directory}: chain intact ({files} files)", file=sys.stderr)
    return EXIT_OK


def _print_errors(error: ConfigError) -> None:
    for line in error.errors:
        print(line, file=sys.stderr)


def _check_config(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    from e911.service import readiness_of

    for problem in readiness_of(settings):
        print(f"{path}: warning: emergency: {problem}", file=sys.stderr)
    print(f"{path}: ok")
    return EXIT_OK


def _emergency_readiness(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    from e911.service import activation_problems_of, readiness_of

    problems = readiness_of(settings) + activation_problems_of(settings)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print("emergency calling: ready")
    return EXIT_OK


def _run(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG

    from switch.logs import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)

    from switch import app  # imported late: only `run` needs the whole application

    try:
        result = app.run(settings, path)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


# --------------------------------------------------------------------------------------
# usage: an account's fair-use figures (issue 5)
# --------------------------------------------------------------------------------------

_USAGE_MONTH = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")

# (pattern, label in the text output), in fairuse.patterns.PATTERNS order
_PATTERN_ROWS = (
    ("calls_per_second", "calls this second"),
    ("calls_per_minute", "calls last minute"),
    ("sequential", "sequential numbers"),
    ("distinct_per_hour", "distinct numbers, hour"),
    ("calls_per_day", "calls today"),
    ("distinct_per_month", "distinct numbers, month"),
    ("short_calls", "short-call share today"),
)


def _usage_month(text: str) -> str:
    if not _USAGE_MONTH.match(text):
        raise argparse.ArgumentTypeError(f"not a month (YYYY-MM): {text!r}")
    return text


def _masked_url(url: str) -> str:
    """A Redis URL with its password (if any) replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _level(value: float | None, warning: float | None, critical: float | None) -> str:
    if value is None:
        return "—"
    if critical is not None and value >= critical:
        return "critical"
    if warning is not None and value >= warning:
        return "warning"
    return "ok"


def _usage(config: str, account_id: str, month: str | None, as_json: bool) -> int:
    try:
        settings = load_settings(config)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    account = next((a for a in settings.accounts if a.id == account_id), None)
    if account is None:
        known = ", ".join(a.id for a in settings.accounts) or "none configured"
        print(f"usage: unknown account {account_id!r} in {config} (accounts: {known})",
              file=sys.stderr)
        return EXIT_CONFIG
    from fairuse.store import month_of
    from switch.logs import configure_logging

    configure_logging("warning", settings.logging.format)  # stderr: stdout is the report
    now = time.time()
    try:
        report = asyncio.run(_usage_report(settings, account, month or month_of(now), now))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if as_json:
        import json

        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(_usage_text(report), end="")
    return EXIT_OK


class _UsageContext:
    """What the three parts of the usage report share: the account, its policies, the
    shared store (when reachable) and its outgoing calls in the CDR ledger."""

    def __init__(self, settings: Settings, account: Account, now: float) -> None:
        self.settings = settings
        self.account = account
        self.now = now
        self.users = max(1, len(account.devices))
        self.redis: RedisFairUseStore | None = None
        self._records: dict[str, list[CallRecord] | str] = {}
        self._classes: dict[tuple[str, str], bool] = {}
        self._dialplan: Any = None

    def policy(self, device: str | None = None) -> EffectivePolicy:
        return self.settings.fair_use.resolve(
            self.account.id, device, None, users=self.users,
            home_country=self.settings.dialplan.country,
        )

    async def records(self, month: str) -> list[CallRecord] | str:
        """The account's outgoing calls started in ``month`` (oldest first), or the reason
        there are none to read."""
        if month not in self._records:
            self._records[month] = await asyncio.to_thread(self._read_records, month)
        return self._records[month]

    def _read_records(self, month: str) -> list[CallRecord] | str:
        from fairuse.rebuild import month_range
        from switch.cdr import CdrLedger

        directory = self.settings.cdr.directory
        if not directory.is_dir():
            return f"no CDR ledger at {directory}"
        start, end = month_range(month)
        # A record's device is the caller's extension for outgoing calls, the callee's for
        # calls coming in from a trunk; only outgoing calls are counted by fair use.
        own = {d.extension: {d.extension, d.did} for d in self.account.devices}
        found = []
        try:
            for record in CdrLedger(directory).read(start, end):
                if (record.account == self.account.id
                        and record.caller in own.get(record.device, {record.device})):
                    found.append(record)
        except OSError as exc:
            return f"CDR ledger {directory}: {exc}"
        found.sort(key=lambda r: r.start)
        return found

    def counted(self, record: CallRecord, username: str | None) -> bool:
        """Whether the live switch counts this call's minutes: an external call to a
        destination class the plan counts (not toll free, shared cost, special ...)."""
        if record.classification != "external":
            return False
        number = record.callee_e164 or record.callee_dialled
        key = (username or "", number)
        if key not in self._classes:
            self._classes[key] = self._classify(number, username)
        return self._classes[key]

    def _classify(self, number: str, username: str | None) -> bool:
        from switch.dialplan import DestinationKind, DialPlan, DialPlanError

        if self._dialplan is None:
            try:
                self._dialplan = DialPlan.from_settings(
                    self.settings.dialplan, [d.extension for d in self.account.devices])
            except DialPlanError:
                self._dialplan = False
        if self._dialplan is False:
            return True
        destination = self._dialplan.classify(number)
        if destination.kind is not DestinationKind.EXTERNAL:
            return True  # the ledger says external: trust it
        return self.policy(username).destinations.check(destination).counted


async def _usage_report(settings: Settings, account: Account, month: str, now: float
                        ) -> dict[str, Any]:
    from datetime import UTC, datetime

    from fairuse.store import RedisFairUseStore

    context = _UsageContext(settings, account, now)
    base = context.policy()
    store: dict[str, Any] = {"backend": settings.store.backend}
    if settings.store.backend == "redis":
        store["url"] = _masked_url(settings.store.redis_url)
        try:
            context.redis = RedisFairUseStore(
                settings.store.redis_url, settings.store.key_prefix, settings.switch.node_id)
            await context.redis.ping()
            store["reachable"] = True
        except Exception as exc:  # noqa: BLE001 - any failure: report it, use the ledger
            store.update(reachable=False, error=f"{type(exc).__name__}: {exc}")
            if context.redis is not None:
                with contextlib.suppress(Exception):
                    await context.redis.close()
            context.redis = None
    try:
        report: dict[str, Any] = {
            "account": account.id,
            "name": account.name,
            "plan": base.plan_name,
            "fair_use_enabled": settings.fair_use.enabled,
            "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "month": month,
            "store": store,
            "concurrency": await _usage_concurrency(context),
            "minutes": await _usage_minutes(context, month),
            "patterns": await _usage_patterns(context),
        }
    finally:
        if context.redis is not None:
            with contextlib.suppress(Exception):
                await context.redis.close()
    report["alerts"] = [
        {"limit": f"quota_{name}", "level": entry["level"],
         "value": entry["percent"], "threshold": entry["threshold_percent"],
         "message": f"{entry['label']}: {entry['percent']:.1f} % of the monthly quota used"
                    + (" — new outgoing calls are refused" if entry["level"] == "critical"
                       and report["minutes"]["refuse_at_critical"] else "")}
        for name, entry in _quota_entries(report["minutes"])
        if entry["level"] in ("warning", "critical")
    ] + [
        {"limit": row["limit"], "level": row["level"], "value": row["value"],
         "threshold": row[row["level"]],
         "message": f"{row['label']}: {row['value']:g} (the {row['level']} threshold is"
                    f" {row[row['level']]:g})" + (" — new calls are refused" if row["refuses"]
                                                    else "")}
        for row in report["patterns"]["rows"] if row["level"] in ("warning", "critical")
    ]
    return report


def _quota_entries(minutes: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    entries = [(f"line:{line['device']}", line) for line in minutes["lines"]]
    entries += [("pool", minutes["pooled"]), ("account", minutes["account"])]
    return [(name.partition(":")[0], entry) for name, entry in entries]


async def _usage_concurrency(context: _UsageContext) -> dict[str, Any]:
    limits = context.policy().concurrency
    devices = [(d, context.policy(d.username).concurrency.device)
               for d in context.account.devices]
    result: dict[str, Any] = {
        "source": None,
        "account": {"active": None, "limit": limits.account},
        "devices": [{"device": d.username, "extension": d.extension, "active": None,
                     "limit": limit} for d, limit in devices],
    }
    if context.settings.store.backend == "memory":
        result["note"] = ("store.backend is memory: live concurrency is known only to the"
                          " running switch process")
        return result
    if context.redis is None:
        result["note"] = "Redis is unreachable: live concurrency is unknown"
        return result
    result["source"] = "redis"
    notes = []
    try:
        if limits.account is not None:
            result["account"]["active"] = await context.redis.active(
                "account", context.account.id, context.now)
        else:
            notes.append("the plan sets no account limit, so calls take no account lease")
        for entry, (device, limit) in zip(result["devices"], devices, strict=True):
            if limit is not None:
                entry["active"] = await context.redis.active(
                    "device", f"{context.account.id}/{device.username}", context.now)
        if any(limit is None for _, limit in devices):
            notes.append("devices without a per-device limit take no device lease")
    except Exception as exc:  # noqa: BLE001
        result["source"] = None
        notes.append(f"Redis failed: {type(exc).__name__}: {exc}")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _quota(used: int, quota_seconds: int | None, policy: EffectivePolicy, label: str,
           **extra: Any) -> dict[str, Any]:
    minutes = policy.plan.minutes
    percent = None if not quota_seconds else round(100.0 * used / quota_seconds, 2)
    share = None if percent is None else percent / 100.0
    level = _level(share, minutes.warning, minutes.critical)
    threshold = minutes.critical if level == "critical" else minutes.warning
    return {
        "label": label, "seconds": used, "minutes": round(used / 60.0, 1),
        "quota_minutes": None if quota_seconds is None else quota_seconds // 60,
        "percent": percent, "level": level if percent is not None else "—",
        "threshold_percent": round(threshold * 100, 1), **extra,
    }


async def _usage_minutes(context: _UsageContext, month: str) -> dict[str, Any]:
    from fairuse.rebuild import tally_minutes
    from switch.cdr import BillingPolicy

    account, devices = context.account, context.account.devices
    base = context.policy()
    plan_minutes = base.plan.minutes
    source, note = None, None
    account_seconds = 0
    line_seconds: dict[str, int] = {}  # by extension
    if context.redis is not None:
        try:
            for device in devices:
                line, account_seconds = await context.redis.minutes(
                    account.id, device.username, month)
                line_seconds[device.extension] = line
            if account_seconds > 0:
                source = "redis"
            else:
                note = "Redis holds no minutes for this month"
        except Exception as exc:  # noqa: BLE001
            note = f"Redis failed: {type(exc).__name__}: {exc}"
    if source is None:
        line_seconds, account_seconds = {}, 0
        records = await context.records(month)
        if isinstance(records, str):
            note = "; ".join(filter(None, (note, records)))
        else:
            by_extension = {d.extension: d.username for d in devices}
            counted = [r for r in records if context.counted(r, by_extension.get(r.device))]
            tally = tally_minutes(counted, month,
                                  BillingPolicy(plan_minutes.increment, plan_minutes.minimum))
            account_seconds = tally.accounts.get(account.id, 0)
            line_seconds = dict(tally.lines.get(account.id, {}))
        source = "cdr"
    lines = [
        _quota(line_seconds.pop(d.extension, 0), context.policy(d.username).line_quota_seconds,
               base, f"line {d.username}", device=d.username, extension=d.extension)
        for d in devices
    ]
    lines += [  # lines in the ledger that are no longer configured
        _quota(seconds, base.line_quota_seconds, base, f"line {extension} (not configured)",
               device=extension, extension=extension)
        for extension, seconds in sorted(line_seconds.items()) if extension
    ]
    result: dict[str, Any] = {
        "source": source,
        "increment": plan_minutes.increment,
        "minimum": plan_minutes.minimum,
        "refuse_at_critical": plan_minutes.refuse_at_critical,
        "lines": lines,
        "pooled": _quota(account_seconds, base.pool_quota_seconds, base, "pooled",
                         users=base.users, per_user_minutes=plan_minutes.pooled_per_user),
        "account": _quota(account_seconds, base.account_quota_seconds, base,
                          "account ceiling"),
    }
    if source == "cdr":
        result["ledger"] = str(context.settings.cdr.directory)
    if note:
        result["note"] = note
    return result


async def _usage_patterns(context: _UsageContext) -> dict[str, Any]:
    from datetime import UTC, datetime

    from fairuse.patterns import PATTERN_LABELS, sequential_run
    from fairuse.patterns import PatternCounters as Signals
    from fairuse.store import MemoryFairUseStore, month_of

    base = context.policy()
    counters: PatternCounters | None = None
    source, note = None, None
    if context.redis is not None:
        try:
            counters = await context.redis.pattern_counters(context.account.id, context.now)
            source = "redis"
        except Exception as exc:  # noqa: BLE001
            note = f"Redis failed: {type(exc).__name__}: {exc}"
    if counters is None:
        # Replay this month's outgoing external calls: attempts at their start, answered
        # calls' ends at their end (calls still up are not in the ledger yet).
        replay = MemoryFairUseStore()
        records = await context.records(month_of(context.now))
        if isinstance(records, str):
            note = "; ".join(filter(None, (note, records)))
            records = []
        short_seconds = base.plan.patterns.short_calls.max_seconds
        events = []
        for record in records:
            if record.classification != "external":
                continue
            events.append((record.start, 0, record))
            if record.answer is not None and record.duration > 0:
                events.append((record.end, 1, record))
        events.sort(key=lambda event: (event[0], event[1]))
        for when, kind, record in events:
            if kind == 0:
                await replay.record_attempt(
                    context.account.id, record.callee_e164 or record.callee_dialled, when)
            else:
                await replay.record_call_end(context.account.id, record.duration, when,
                                             short_call_seconds=short_seconds)
        counters = await replay.pattern_counters(context.account.id, context.now)
        source = "cdr"
    at = datetime.fromtimestamp(context.now, UTC)
    thresholds, window = base.patterns.thresholds_at(at)
    signals = {s.pattern: s for s in base.patterns.evaluate(Signals.from_store(counters), at)}
    short_rule = thresholds.short_calls
    values: dict[str, float | None] = {
        "calls_per_second": counters.calls_last_second,
        "calls_per_minute": counters.calls_last_minute,
        "sequential": sequential_run(counters.recent_numbers, thresholds.sequential.max_step),
        "distinct_per_hour": counters.distinct_destinations_hour,
        "calls_per_day": counters.calls_today,
        "distinct_per_month": counters.distinct_destinations_month,
        "short_calls": (round(counters.short_calls_share_today, 4)
                        if counters.ended_calls_today >= short_rule.min_calls else None),
    }
    rows = []
    for pattern, label in _PATTERN_ROWS:
        rule = getattr(thresholds, pattern)
        signal = signals.get(pattern)
        level = signal.level if signal is not None else (
            "ok" if values[pattern] is not None else "—")
        rows.append({
            "pattern": pattern, "limit": PATTERN_LABELS[pattern], "label": label,
            "value": values[pattern], "warning": rule.warning, "critical": rule.critical,
            "level": level, "refuses": bool(signal is not None and signal.refuse),
        })
    result: dict[str, Any] = {
        "source": source, "window": window, "rows": rows,
        "short_calls": {"answered_today": counters.ended_calls_today,
                        "short_today": counters.short_calls_today,
                        "max_seconds": short_rule.max_seconds,
                        "judged_from": short_rule.min_calls},
    }
    if note:
        result["note"] = note
    return result


def _figure(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "—"
    if percent:
        return f"{value * 100:.0f} %"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _usage_text(report: dict[str, Any]) -> str:
    out: list[str] = []
    name = f" ({report['name']})" if report.get("name") else ""
    out.append(f"Account {report['account']}{name}: plan {report['plan']},"
               f" {report['at']} UTC")
    if not report["fair_use_enabled"]:
        out.append("fair use is disabled (fair_use.enabled: false): nothing is enforced")
    store = report["store"]
    if store["backend"] == "redis":
        state = "reachable" if store.get("reachable") else f"UNREACHABLE ({store.get('error')})"
        out.append(f"Store: redis {store['url']}, {state}")
    else:
        out.append("Store: memory (counters live in the switch process)")

    concurrency = report["concurrency"]
    out += ["", "Concurrent calls" + (" (from redis)" if concurrency["source"] else "")]

    def calls(entry: dict[str, Any]) -> str:
        active = "?" if entry["active"] is None else str(entry["active"])
        limit = "no limit" if entry["limit"] is None else f"limit {entry['limit']}"
        return f"{active:>6}  ({limit})"

    out.append(f"  {'account':<26}{calls(concurrency['account'])}")
    for device in concurrency["devices"]:
        out.append(f"  {'device ' + device['device']:<26}{calls(device)}")
    if concurrency.get("note"):
        out.append(f"  note: {concurrency['note']}")

    minutes = report["minutes"]
    source = ("from redis" if minutes["source"] == "redis"
              else f"rebuilt from the CDR ledger {minutes.get('ledger', '')}".rstrip())
    out += ["", f"Minutes {report['month']} (billable: {minutes['increment']} s increments,"
                f" {minutes['minimum']} s minimum; {source})"]

    def quota(entry: dict[str, Any], extra: str = "") -> str:
        quota_text = ("no quota" if entry["quota_minutes"] is None
                      else f"of {entry['quota_minutes']:,}{extra}")
        percent = "" if entry["percent"] is None else f"  {entry['percent']:5.1f} %"
        level = "" if entry["level"] in ("ok", "—") else f"  {entry['level'].upper()}"
        return (f"  {entry['label']:<26}{entry['minutes']:>10,.1f} min {quota_text}"
                f"{percent}{level}")

    for line in minutes["lines"]:
        out.append(quota(line))
    pooled = minutes["pooled"]
    out.append(quota(pooled, f" ({pooled['per_user_minutes']:,} × {pooled['users']} users)"
                     if pooled["per_user_minutes"] else ""))
    out.append(quota(minutes["account"]))
    if minutes.get("note"):
        out.append(f"  note: {minutes['note']}")

    patterns = report["patterns"]
    window = f", window {patterns['window']}" if patterns["window"] else ""
    origin = "from redis" if patterns["source"] == "redis" else "from the CDR ledger"
    out += ["", f"Call patterns (now, {origin}{window})",
            f"  {'':<26}{'value':>8}{'warning':>10}{'critical':>10}  level"]
    for row in patterns["rows"]:
        percent = row["pattern"] == "short_calls"
        out.append(f"  {row['label']:<26}{_figure(row['value'], percent):>8}"
                   f"{_figure(row['warning'], percent):>10}"
                   f"{_figure(row['critical'], percent):>10}  {row['level']}")
    short = patterns["short_calls"]
    out.append(f"  (short calls: {short['short_today']} of {short['answered_today']} answered"
               f" today under {short['max_seconds']} s; judged from {short['judged_from']})")
    if patterns.get("note"):
        out.append(f"  note: {patterns['note']}")

    out += ["", "Alerts"]
    out += [f"  {a['level'].upper():<9}{a['message']}" for a in report["alerts"]] or ["  none"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Everyday operations on the running switch (its admin API), availability, personal data
# --------------------------------------------------------------------------------------

TOKEN_ENV = "SOFTSWITCH_ADMIN_TOKEN"
ADMIN_TIMEOUT_S = 10.0
EXIT_FAILED = 1


def _add_operations_commands(commands: Any) -> None:
    """``registrations``, ``calls``, ``location``, ``reload`` (the running switch's admin
    API), ``availability`` and ``privacy`` (offline, on the switch's files)."""
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
                     help="the switch's YAML: the admin API address is admin.listen")
    api.add_argument("--url", metavar="URL",
                     help="the admin API base URL instead (e.g. http://127.0.0.1:8080)")
    api.add_argument("--token", metavar="TOKEN",
                     help=f"bearer token (default: ${TOKEN_ENV}, which keeps it out of ps)")
    api.add_argument("--json", dest="as_json", action="store_true",
                     help="print the API's JSON answer instead of text")

    commands.add_parser("registrations", parents=[api],
                        help="registered contacts (bindings) of the running switch")
    calls = commands.add_parser("calls", parents=[api],
                                help="calls in progress; --hangup ends one")
    calls.add_argument("--hangup", metavar="CALL_ID", help="hang up this call (BYE/CANCEL)")
    location = commands.add_parser("location", help="a device's emergency location")
    location_commands = location.add_subparsers(dest="location_command", metavar="COMMAND",
                                                required=True)
    location_set = location_commands.add_parser(
        "set", parents=[api], help="set (confirm) a device's emergency location")
    location_set.add_argument("username", metavar="USERNAME")
    location_set.add_argument("site", metavar="SITE")
    location_set.add_argument("location", metavar="LOCATION", nargs="?")
    history = location_commands.add_parser(
        "history", parents=[api], help="a device's journaled location changes")
    history.add_argument("username", metavar="USERNAME")
    commands.add_parser("reload", parents=[api],
                        help="re-read and apply the YAML (refused whole when invalid)")

    availability = commands.add_parser(
        "availability", help="uptime and a month's availability, from the state file")
    availability.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    availability.add_argument("--month", type=_usage_month, metavar="YYYY-MM",
                              help="the month (default: this month, UTC)")
    availability.add_argument("--json", dest="as_json", action="store_true")

    privacy = commands.add_parser("privacy", help="a person's data (GDPR export, erasure)")
    privacy_commands = privacy.add_subparsers(dest="privacy_command", metavar="COMMAND",
                                              required=True)
    export = privacy_commands.add_parser(
        "export", help="everything held about a person (device username or E.164 number)"
                       " as JSON")
    export.add_argument("person", metavar="PERSON")
    export.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    export.add_argument("--output", "-o", metavar="FILE", help="JSON file (default: stdout)")
    erase = privacy_commands.add_parser(
        "erase", help="pseudonymise a person in the CDRs and location history (switch"
                      " stopped; the emergency audit journal is kept)",
        description="Without --yes nothing is changed: the report says what would be. A"
                    " running switch holds the CDR ledger: erase through its admin API"
                    " (POST /api/v1/privacy/PERSON/erase) instead.")
    erase.add_argument("person", metavar="PERSON")
    erase.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="FILE")
    erase.add_argument("--yes", action="store_true", help="really erase")
    erase.add_argument("--json", dest="as_json", action="store_true")


class _ApiFailure(Exception):
    """An admin API call that did not succeed; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _admin_base(args: argparse.Namespace) -> str:
    if args.url:
        if not re.match(r"^https?://[^/\s]+", args.url):
            raise _ApiFailure(f"--url must be an http(s) URL, not {args.url!r}", EXIT_CONFIG)
        return args.url.rstrip("/")
    try:
        admin = load_settings(args.config).admin
    except ConfigError as error:
        # A file being edited may not validate: the running switch still has its admin
        # listener (and a reload is what reports the file's problems, from the switch).
        admin = _admin_section_as_written(args.config)
        if admin is None:
            _print_errors(error)
            raise _ApiFailure(f"{args.config}: unusable configuration", EXIT_CONFIG) from None
    if not admin.enabled:
        raise _ApiFailure(f"{args.config}: admin.enabled is false: the switch has no admin"
                          " API (enable it, or give --url)", EXIT_CONFIG)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(admin.listen.host,
                                                                    admin.listen.host)
    if admin.listen.port == 0:
        raise _ApiFailure(f"{args.config}: admin.listen.port is 0 (a free port picked at"
                          " start): give --url", EXIT_CONFIG)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{admin.listen.port}"


def _admin_section_as_written(path: str) -> Any:
    """The ``admin:`` section of a YAML file that does not validate as a whole (None when
    the section itself cannot be read)."""
    from ruamel.yaml import YAML

    from switch.admin import AdminSettings

    try:
        data = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
        section = data.get("admin") if isinstance(data, dict) else None
        if not isinstance(section, dict):
            return None
        return AdminSettings.model_validate(section)
    except Exception:  # noqa: BLE001 - unreadable, not YAML, or an invalid section
        return None


def _admin_call(args: argparse.Namespace, method: str, path: str,
                body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, decoded JSON or None) of one admin API request; _ApiFailure for a
    transport problem or an error status."""
    import json
    import os
    import urllib.error
    import urllib.request

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise _ApiFailure(f"no admin token: pass --token or set ${TOKEN_ENV}", EXIT_CONFIG)
    url = _admin_base(args) + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json",
        **({"Content-Type": "application/json"} if data is not None else {})})
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _ApiFailure(f"cannot reach the admin API at {url}: {reason} (is the switch"
                          " running with admin.enabled?)") from None
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = raw.decode("utf-8", "replace")
    if status >= 400 and not (path.endswith("/reload") and isinstance(answer, dict)
                              and "errors" in answer):
        message = answer.get("error") if isinstance(answer, dict) else answer
        raise _ApiFailure(f"{method} {path}: {status}: {message or 'no details'}")
    return status, answer


def _print_json(document: Any) -> None:
    import json

    print(json.dumps(document, indent=2, ensure_ascii=False))


def _quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _api_command(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _ApiFailure as failure:
            print(f"{args.command}: {failure}", file=sys.stderr)
            return failure.code
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


def _registrations(args: argparse.Namespace) -> int:
    items: list[dict[str, Any]] = []
    for page in range(100):  # 100 pages of 1000 bindings at most
        _, answer = _admin_call(args, "GET", f"/api/v1/registrations?limit=1000&offset="
                                              f"{page * 1000}")
        items += answer["items"]
        if len(items) >= answer["total"] or not answer["items"]:
            break
    if args.as_json:
        _print_json({"total": len(items), "items": items})
        return EXIT_OK
    print(f"{'AOR':<32} {'EXPIRES':>7}  {'SOURCE':<28} {'USER AGENT':<24} CONTACT")
    for b in items:
        print(f"{b['aor']:<32} {b['expires']:>6}s  {b['source']:<28} "
              f"{(b.get('user_agent') or '-')[:24]:<24} {b['contact']}")
    print(f"{len(items)} bindings", file=sys.stderr)
    return EXIT_OK


def _calls(args: argparse.Namespace) -> int:
    if args.hangup:
        _admin_call(args, "DELETE", f"/api/v1/calls/{_quoted(args.hangup)}")
        print(f"call {args.hangup}: hanging up")
        return EXIT_OK
    items: list[dict[str, Any]] = []
    for page in range(100):
        _, answer = _admin_call(args, "GET", f"/api/v1/calls?limit=1000&offset={page * 1000}")
        items += answer["items"]
        if len(items) >= answer["total"] or not answer["items"]:
            break
    if args.as_json:
        _print_json({"total": len(items), "items": items})
        return EXIT_OK
    print(f"{'CALL-ID':<40} {'STATE':<10} {'CALLER':<16} {'CALLEE':<16} {'STARTED':<25} "
          "ANSWERED")
    for c in items:
        flag = " EMERGENCY" if c.get("emergency") else ""
        print(f"{c['call_id'][:40]:<40} {c['state']:<10} {c['caller'][:16]:<16} "
              f"{c['callee'][:16]:<16} {c['started']:<25} {c.get('answered') or '-'}{flag}")
    print(f"{len(items)} calls", file=sys.stderr)
    return EXIT_OK


def _location(args: argparse.Namespace) -> int:
    path = f"/api/v1/devices/{_quoted(args.username)}/location"
    if args.location_command == "set":
        body = {"site": args.site, **({"location": args.location} if args.location else {})}
        _, answer = _admin_call(args, "PUT", path, body)
        if args.as_json:
            _print_json(answer)
        else:
            where = "/".join(p for p in (answer.get("site"), answer.get("location")) if p)
            print(f"{args.username}: {where} ({answer.get('status')}): {answer.get('summary')}")
        return EXIT_OK
    _, answer = _admin_call(args, "GET", path + "/history")
    if args.as_json:
        _print_json(answer)
        return EXIT_OK
    for entry in answer["entries"]:
        place = "/".join(str(p) for p in (entry.get("site_id"), entry.get("location_id")) if p)
        print(f"{entry.get('when', '?')}  {entry.get('who', '?'):<20} "
              f"{entry.get('reason', '?'):<9} {place or '-':<16} {entry.get('status', '?'):<12}"
              f" {entry.get('new', '')}")
    print(f"{len(answer['entries'])} changes", file=sys.stderr)
    return EXIT_OK


def _reload(args: argparse.Namespace) -> int:
    status, answer = _admin_call(args, "POST", "/api/v1/reload")
    if args.as_json:
        _print_json(answer)
    elif answer.get("applied"):
        print("reload: applied")
        for note in answer.get("notes", []):
            print(f"  note: {note}")
    else:
        for error in answer.get("errors", []):
            print(error, file=sys.stderr)
        print(f"reload: refused ({status}): the running configuration stays", file=sys.stderr)
    return EXIT_OK if answer.get("applied") else EXIT_FAILED


def _availability(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    from switch.lifecycle import AvailabilityError, availability_path, report_from_file

    path = availability_path(settings.cdr.directory)
    try:
        report = report_from_file(path, time.time(), args.month)
    except AvailabilityError as exc:
        print(f"availability: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.as_json:
        _print_json(report)
        return EXIT_OK
    running = (f"running since {report['running_since']}" if report["running_since"]
               else "not running")
    print(f"{path}: {running}; accounting since {report['monitored_since'] or 'never'}")
    print(f"{report['month']}: availability {report['availability_percent']:.4f} %"
          f" ({report['unavailable_minutes']:.2f} of {report['minutes_in_month']:.0f} minutes"
          " unavailable)")
    for outage in report["outages"]:
        print(f"  down {outage['from']} -> {outage['to']}  ({outage['minutes']:.2f} min)")
    return EXIT_OK


def _privacy(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    import json

    from switch.privacy import PrivacyBusyError, PrivacyError, erase, export

    try:
        if args.privacy_command == "export":
            document = export(settings, args.person)
            text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
            if args.output:
                with open(args.output, "w", encoding="utf-8") as out:
                    out.write(text)
            else:
                sys.stdout.write(text)
            print(f"privacy export: {len(document['cdrs'])} CDRs,"
                  f" {len(document['location_history'])} location changes,"
                  f" {len(document['emergency_calls'])} emergency journal entries",
                  file=sys.stderr)
            return EXIT_OK
        report = erase(settings, args.person, dry_run=not args.yes)
    except PrivacyBusyError as exc:
        print(f"privacy {args.privacy_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PrivacyError as exc:
        print(f"privacy {args.privacy_command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"privacy {args.privacy_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.as_json:
        _print_json(report)
        return EXIT_OK
    verb = "would pseudonymise" if report["dry_run"] else "pseudonymised"
    cdr = report["cdr"]
    print(f"{report['person']}: {verb} {cdr['records']} CDRs ({cdr['fields']} fields in"
          f" {len(cdr['files'])} files) and {report['location_history'].get('entries', 0)}"
          " location history entries")
    print(f"  emergency audit journal: {report['emergency_journal']['entries_kept']} entries"
          " kept (legal record, not erased)")
    for note in report["notes"]:
        print(f"  note: {note}")
    if report["dry_run"]:
        print("dry run: nothing was changed; add --yes to erase", file=sys.stderr)
    return EXIT_OK


_OPERATIONS = {
    "registrations": _api_command(_registrations),
    "calls": _api_command(_calls),
    "location": _api_command(_location),
    "reload": _api_command(_reload),
    "availability": _availability,
    "privacy": _privacy,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m switch`` and the ``softswitch`` script."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "run":
        return _run(args.config)
    if args.command == "cdr" and args.cdr_command == "export":
        return _cdr_export(args.config, args.start_from, args.until, args.output)
    if args.command == "emergency" and args.emergency_command == "export":
        return _emergency_export(
            args.config, args.start_from, args.until, args.call_id, args.output
        )
    if args.command == "emergency" and args.emergency_command == "verify":
        return _emergency_verify(args.config)
    if args.command == "emergency" and args.emergency_command == "readiness":
        return _emergency_readiness(args.config)
    if args.command == "usage":
        return _usage(args.config, args.account, args.month, args.as_json)
    if args.command in _OPERATIONS:
        return _OPERATIONS[args.command](args)
    return EXIT_CONFIG  # unreachable: argparse requires a known command

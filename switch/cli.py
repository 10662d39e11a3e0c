"""Command line: ``python -m switch run --config FILE``, ``check-config FILE``,
``cdr export --config FILE --from DATE --to DATE [--output FILE.csv]``, and for the
emergency audit journal (EMERGENCY.md EM-70) ``emergency export --config FILE [--from WHEN]
[--until WHEN] [--call-id ID] [-o FILE.jsonl]`` and ``emergency verify --config FILE``.

Exit codes: 0 success, 2 unusable configuration (or bad command line), 130 interrupted.
A configuration problem is printed as ``file:line: key: problem`` lines, never as a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from switch.settings import ConfigError, load_settings

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
    from e911.service import readiness_of

    problems = readiness_of(settings)
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
        result = app.run(settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK


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
    return EXIT_CONFIG  # unreachable: argparse requires a known command

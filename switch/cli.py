"""Command line: ``python -m switch run --config FILE`` and ``check-config FILE``.

Exit codes: 0 success, 2 unusable configuration (or bad command line), 130 interrupted.
A configuration problem is printed as ``file:line: key: problem`` lines, never as a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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
    return parser


def _print_errors(error: ConfigError) -> None:
    for line in error.errors:
        print(line, file=sys.stderr)


def _check_config(path: str) -> int:
    try:
        load_settings(path)
    except ConfigError as error:
        _print_errors(error)
        return EXIT_CONFIG
    print(f"{path}: ok")
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
    return EXIT_CONFIG  # unreachable: argparse requires a known command

"""Structured logging: one event per line (JSON by default) on stderr, secrets redacted.

``configure_logging`` sets up structlog and routes the standard library's ``logging``
(asyncio, redis-py, ...) through the same processors, so every line has the same shape:

    {"event": "register.accepted", "aor": "sip:1000@127.0.0.1", "level": "info",
     "timestamp": "2024-05-01T10:00:00.123456Z"}

A redaction processor replaces the value of any secret-looking key (password, ha1,
secret, authorization, nonce, response, token, ...) anywhere in the event, nested
mappings and lists included, and scrubs digest credentials out of text that quotes
raw SIP headers.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretBytes, SecretStr

__all__ = ["REDACTED", "configure_logging", "get_logger", "redact_secrets"]

REDACTED = "[redacted]"

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose value is always hidden (compared lower-case, '-' read as '_').
_SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "ha1",
        "ha1_md5",
        "ha1_sha256",
        "secret",
        "authorization",
        "proxy_authorization",
        "response",
        "nonce",
        "cnonce",
        "token",
        "api_key",
        "private_key",
    }
)
# Any key containing one of these words is hidden too (auth_secret, api_token, ...).
_SECRET_WORDS = ("password", "secret", "token", "authorization", "credential")

# Digest credentials inside text, e.g. a raw SIP message quoted in an event.
_AUTH_HEADER = re.compile(r"(?im)^((?:proxy-)?authorization[ \t]*:)[^\r\n]*")
_DIGEST_PARAM = re.compile(r'(?i)\b(response|cnonce|nonce)\s*=\s*("[^"]*"|[^\s,]+)')


def _is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or any(word in name for word in _SECRET_WORDS)


def _scrub_text(text: str) -> str:
    if ":" not in text and "=" not in text:
        return text
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _DIGEST_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def _redact_value(value: Any, depth: int = 0) -> Any:
    if depth > 20:
        return value
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, bytes | bytearray):
        return _scrub_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if _is_secret_key(k) else _redact_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: hides secret values anywhere in the event dict."""
    for key in list(event_dict.keys()):
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def _timestamp_level_event_first(
    _logger: Any, _method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Puts ``timestamp``, ``level`` and ``event`` first so JSON lines read left to right."""
    ordered: dict[str, Any] = {}
    for key in ("timestamp", "level", "event"):
        if key in event_dict:
            ordered[key] = event_dict[key]
    for key, value in event_dict.items():
        if key not in ordered:
            ordered[key] = value
    return ordered


def _renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(default=str, sort_keys=False)


class _SharedPrinter:
    """structlog logger factory handing out the same PrintLogger every time."""

    def __init__(self, printer: structlog.PrintLogger) -> None:
        self.printer = printer

    def __call__(self, *_args: Any) -> structlog.PrintLogger:
        return self.printer


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configures structlog (and the standard ``logging`` module) to write one event per
    line to ``stream`` (stderr by default) at ``level`` (debug|info|warning|error) in
    ``fmt`` (json|console)."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}")
    threshold = LEVELS[level]
    output = stream if stream is not None else sys.stderr

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        timestamper,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_secrets,
            _timestamp_level_event_first,
            _renderer(fmt),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # one printer for every logger (a factory that built one per event cost ~25 µs)
        logger_factory=_SharedPrinter(structlog.PrintLogger(file=output)),
        context_class=dict,
        # a module's logger is assembled once (assembling it on every event cost ~15 µs,
        # even for filtered-out debug events); a new configuration drops those caches
        cache_logger_on_first_use=True,
    )
    _forget_assembled_loggers()

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            _timestamp_level_event_first,
            _renderer(fmt),
        ],
    )
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_softswitch", False):
            root.removeHandler(old)
    handler._softswitch = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(threshold)


# packages whose module-level ``log = structlog.get_logger(...)`` proxies cache their logger
_PACKAGES = ("switch", "sip", "media", "e911", "fairuse")


def _forget_assembled_loggers() -> None:
    """Make every module-level lazy logger of the switch's packages assemble itself again
    from the current configuration (with caching on, the first event stores the assembled
    logger in the proxy's ``bind`` attribute)."""
    proxy_type = structlog._config.BoundLoggerLazyProxy
    for name, module in list(sys.modules.items()):
        if module is None or name.partition(".")[0] not in _PACKAGES:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, proxy_type) and "bind" in vars(value):
                del value.bind


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` fields (e.g. ``call_id``, ``account``) on every
    event it writes."""
    return structlog.get_logger().bind(**bound)

"""Structured logs: JSON lines with timestamp, level and event; secrets never written."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from pydantic import SecretStr

from switch.logs import REDACTED, configure_logging, get_logger

PASSWORD = "hunter2-very-secret"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield io.StringIO()
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_timestamp_level_event_and_bound_fields(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    get_logger(call_id="abc@host", account="acme").info("call.started", to="1001")
    [event] = lines(stream)
    assert list(event)[:3] == ["timestamp", "level", "event"]
    assert event["level"] == "info" and event["event"] == "call.started"
    assert event["call_id"] == "abc@host" and event["account"] == "acme" and event["to"] == "1001"
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]


def test_level_filters_lower_events(stream: io.StringIO) -> None:
    configure_logging("warning", "json", stream=stream)
    log = get_logger()
    log.info("quiet")
    log.warning("loud")
    assert [e["event"] for e in lines(stream)] == ["loud"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_never_reach_the_output(stream: io.StringIO, fmt: str) -> None:
    configure_logging("debug", fmt, stream=stream)
    raw_request = (
        "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
        f'Authorization: Digest username="1000", nonce="n0nce-{PASSWORD}", '
        f'response="{PASSWORD}"\r\n\r\n'
    )
    log = get_logger(secret=PASSWORD)
    log.debug(
        "auth.checked",
        password=PASSWORD,
        ha1_md5=PASSWORD,
        Proxy_Authorization=PASSWORD,
        nested={"device": {"api_token": PASSWORD, "extension": "1000"}},
        items=[{"cnonce": PASSWORD}],
        setting=SecretStr(PASSWORD),
        raw=raw_request,
        params=f'nonce="{PASSWORD}", response={PASSWORD}',
    )
    logging.getLogger("asyncio").warning("stdlib %s", "too", extra={"password": PASSWORD})
    output = stream.getvalue()
    assert PASSWORD not in output
    assert output.count(REDACTED) >= 9
    assert "1000" in output  # ordinary fields survive


def test_stdlib_logging_uses_the_same_format(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    logging.getLogger("asyncio").error("loop %s", "stopped")
    [event] = lines(stream)
    assert event["event"] == "loop stopped" and event["level"] == "error"


def test_unknown_level_is_refused(stream: io.StringIO) -> None:
    with pytest.raises(ValueError):
        configure_logging("verbose", "json")

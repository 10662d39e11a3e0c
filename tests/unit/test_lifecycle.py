"""Availability accounting and graceful shutdown of a switch process (switch/lifecycle.py):
monthly availability as (minutes of the month - minutes unavailable) / minutes of the
month, crashes counted from the last heartbeat, the state file's lock and corruption, the
metrics, and the drain that answers new INVITEs 503 + Retry-After while calls finish."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from sip.parser import parse_message
from switch.lifecycle import (
    AvailabilityError,
    AvailabilityTracker,
    ShutdownGate,
    availability_path,
    compute_month,
    drain,
    month_bounds,
    month_of,
    read_availability,
    report_from_file,
)
from switch.metrics import SwitchMetrics

MARCH = "2026-03"
MARCH_START = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
MARCH_SECONDS = 31 * 86400.0
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def crash(tracker: AvailabilityTracker) -> None:
    """What kill -9 leaves: the state file as last written, the lock released."""
    assert tracker._lock_fd is not None
    os.close(tracker._lock_fd)
    tracker._lock_fd = None


# ---- months and the formula ------------------------------------------------------------


def test_month_bounds_and_bad_months() -> None:
    assert month_bounds(MARCH) == (MARCH_START, MARCH_START + MARCH_SECONDS)
    start, end = month_bounds("2026-12")
    assert end == datetime(2027, 1, 1, tzinfo=UTC).timestamp() and end - start == 31 * 86400
    assert month_bounds("2028-02")[1] - month_bounds("2028-02")[0] == 29 * 86400
    assert month_of(T0) == MARCH
    for bad in ("2026-13", "2026-3", "march", "", "2026-03-01"):
        with pytest.raises(AvailabilityError, match="YYYY-MM"):
            month_bounds(bad)


def test_availability_is_month_minutes_minus_unavailable_over_month_minutes() -> None:
    now = MARCH_START + 20 * 86400
    # up from the 1st, down 2 h on the 5th, down 30 min on the 12th, up to now
    periods = [(MARCH_START, MARCH_START + 4 * 86400),
               (MARCH_START + 4 * 86400 + 7200, MARCH_START + 11 * 86400),
               (MARCH_START + 11 * 86400 + 1800, now)]
    figures = compute_month(MARCH, MARCH_START, periods, now)
    assert figures.unavailable_seconds == 7200 + 1800
    assert figures.ratio == pytest.approx((44640 - 150) / 44640)
    assert [(a - MARCH_START, b - MARCH_START) for a, b in figures.outages] == [
        (4 * 86400, 4 * 86400 + 7200), (11 * 86400, 11 * 86400 + 1800)]
    document = figures.as_dict()
    assert document["minutes_in_month"] == 44640
    assert document["unavailable_minutes"] == 150
    assert document["availability_percent"] == pytest.approx(99.6640, abs=1e-4)
    assert document["availability_so_far"] == pytest.approx(1 - 9000 / (20 * 86400), abs=1e-6)
    # the switch first started on the 10th: the days before are not unavailable
    late = compute_month(MARCH, T0, [(T0, now)], now)
    assert late.unavailable_seconds == 0 and late.ratio == 1.0
    # a month before accounting began, and one entirely down after it
    assert compute_month("2026-02", T0, [(T0, now)], now).monitored_seconds == 0
    april = compute_month("2026-04", T0, [(T0, now)], month_bounds("2026-05")[0])
    assert april.ratio == 0.0 and april.unavailable_seconds == 30 * 86400


# ---- the tracker -----------------------------------------------------------------------


def test_a_clean_stop_and_restart_count_the_gap_as_unavailable(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = availability_path(tmp_path / "var" / "cdr")
    assert path == tmp_path / "var" / "availability.json"
    tracker = AvailabilityTracker(path, clock=clock)
    assert tracker.open() is None
    state = read_availability(path)
    assert state["current"]["start"] == T0 and state["first_start"] == T0
    clock.now = T0 + 3600
    tracker.beat()
    assert read_availability(path)["current"]["heartbeat"] == T0 + 3600
    clock.now = T0 + 7200
    tracker.close()
    state = read_availability(path)
    assert state["current"] is None and state["periods"] == [[T0, T0 + 7200]]
    clock.now = T0 + 7200 + 600  # ten minutes stopped for an upgrade
    again = AvailabilityTracker(path, clock=clock)
    assert again.open() is None
    clock.now = T0 + 86400
    report = again.report()
    assert report["unavailable_minutes"] == 10
    assert report["uptime_seconds"] == 86400 - 7800
    assert report["availability"] == pytest.approx((44640 - 10) / 44640, abs=1e-6)
    assert [o["minutes"] for o in report["outages"]] == [10]
    again.close()


def test_a_crash_counts_from_the_last_heartbeat_to_the_next_start(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = tmp_path / "availability.json"
    first = AvailabilityTracker(path, clock=clock)
    first.open()
    clock.now = T0 + 90
    first.beat()
    clock.now = T0 + 110
    crash(first)  # killed 20 s after its last heartbeat
    clock.now = T0 + 400
    second = AvailabilityTracker(path, clock=clock)
    assert second.open() == (T0 + 90, T0 + 400)
    assert second.month().unavailable_seconds == 310
    # the crashed run's period is closed at its heartbeat in the file
    assert read_availability(path)["periods"] == [[T0, T0 + 90]]
    # read from outside: the running switch holds the file, so it is up until now
    clock.now = T0 + 1000
    outside = report_from_file(path, clock.now)
    assert outside["running_since"] is not None and outside["uptime_seconds"] == 600
    assert outside["unavailable_minutes"] == pytest.approx(310 / 60, abs=1e-3)
    # a second crash, seen from outside before any restart: down since the heartbeat
    second.beat()
    crash(second)
    dead = report_from_file(path, T0 + 1600)
    assert dead["running_since"] is None and dead["uptime_seconds"] is None
    assert dead["unavailable_minutes"] == pytest.approx((310 + 600) / 60, abs=1e-3)


def test_the_metrics_show_uptime_and_this_months_ratio(tmp_path: Path) -> None:
    clock = Clock(MARCH_START)
    metrics = SwitchMetrics()
    tracker = AvailabilityTracker(tmp_path / "a.json", clock=clock, metrics=metrics)
    tracker.open()
    clock.now = MARCH_START + 3600
    tracker.close()
    clock.now = MARCH_START + 3600 + 446.4  # 7.44 min down: 0.0167 % of March
    tracker2 = AvailabilityTracker(tmp_path / "a.json", clock=clock, metrics=metrics)
    tracker2.open()
    clock.now += 60
    assert metrics.value("softswitch_uptime_seconds") == pytest.approx(60)
    assert metrics.value("softswitch_availability_ratio") == pytest.approx(
        (MARCH_SECONDS - 446.4) / MARCH_SECONDS)
    tracker2.close()
    assert metrics.value("softswitch_uptime_seconds") == 0


def test_an_unreadable_state_is_moved_aside_and_accounting_restarts(tmp_path: Path) -> None:
    path = tmp_path / "availability.json"
    path.write_text('{"v": 1, "periods": [[5, 1]]}')  # a period ending before it starts
    with pytest.raises(AvailabilityError, match="periods"):
        read_availability(path)
    tracker = AvailabilityTracker(path, clock=Clock(T0))
    tracker.open()
    aside = list(tmp_path.glob("availability.json.corrupt-*"))
    assert len(aside) == 1 and "[5, 1]" in aside[0].read_text()
    assert read_availability(path)["first_start"] == T0
    tracker.close()
    path.write_text("not json")
    with pytest.raises(AvailabilityError, match="availability.json"):
        report_from_file(path, T0)


def test_a_second_process_on_the_same_file_keeps_its_figures_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "availability.json"
    clock = Clock(T0)
    owner = AvailabilityTracker(path, clock=clock)
    owner.open()
    before = path.read_bytes()
    other = AvailabilityTracker(path, clock=clock)
    other.open()
    clock.now += 30
    other.beat()
    other.close()
    assert other.persistent is False and other.report()["persistent"] is False
    assert path.read_bytes() == before  # the owner's state is untouched
    owner.close()


def test_old_periods_are_dropped_and_the_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "availability.json"
    old = T0 - 500 * 86400
    path.write_text(json.dumps({"v": 1, "first_start": old, "current": None,
                                "periods": [[old, old + 60], [T0 - 86400, T0 - 3600]]}))
    tracker = AvailabilityTracker(path, clock=Clock(T0))
    tracker.open()
    assert read_availability(path)["periods"] == [[T0 - 86400, T0 - 3600]]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    tracker.close()


# ---- graceful shutdown ------------------------------------------------------------------


def _invite(call_id: str, uri: str = "sip:1001@127.0.0.1") -> object:
    data = (f"INVITE {uri} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-1\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:1000@127.0.0.1>;tag=a\r\n"
            "To: <sip:1001@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    return parse_message(data)


class FakeSwitch:
    """What drain() and ShutdownGate touch: the core's INVITE handler and responses, the
    calls in progress, metrics and the emergency test of a dialled number."""

    def __init__(self, emergency_uris: tuple[str, ...] = ()) -> None:
        self.routed: list[str] = []
        self.responses: list[object] = []
        self.core = SimpleNamespace(invite_handler=self._route, respond=self._respond)
        self.calls = SimpleNamespace(
            calls={}, _dials_emergency=lambda r: str(r.request_uri) in emergency_uris)
        self.metrics = SwitchMetrics()
        self.server_header = "softswitch/test"
        self.availability = None

    def _route(self, request, transaction) -> None:
        self.routed.append(request.call_id)

    def _respond(self, transaction, response) -> None:
        self.responses.append(response)


TRANSACTION = SimpleNamespace(flow=SimpleNamespace(remote=("127.0.0.1", 5099)))


def test_the_gate_answers_503_with_retry_after_but_routes_emergency_calls() -> None:
    switch = FakeSwitch(emergency_uris=("sip:112@127.0.0.1",))
    gate = ShutdownGate(switch, retry_after=30)  # type: ignore[arg-type]
    gate.install()
    gate.install()  # twice: still one gate around the original handler
    switch.core.invite_handler(_invite("new-call"), TRANSACTION)
    switch.core.invite_handler(_invite("sos", "sip:112@127.0.0.1"), TRANSACTION)
    (response,) = switch.responses
    assert response.status == 503 and response.header("Retry-After") == "30"
    assert response.to.tag  # a final response to an INVITE carries a To tag
    assert switch.routed == ["sos"] and gate.refused == 1
    assert switch.metrics.value("softswitch_sip_requests_rejected_total",
                                {"method": "INVITE", "status": "503"}) == 1


async def test_drain_waits_for_calls_to_end_then_returns() -> None:
    switch = FakeSwitch()
    switch.calls.calls["up"] = object()
    asyncio.get_running_loop().call_later(0.2, switch.calls.calls.clear)
    outcome = await drain(switch, 5.0)  # type: ignore[arg-type]
    assert outcome["calls_at_start"] == 1 and outcome["calls_left"] == 0
    assert 0.15 <= outcome["waited_seconds"] < 2.0


async def test_drain_stops_at_the_deadline_or_a_second_signal(tmp_path: Path) -> None:
    switch = FakeSwitch()
    clock = Clock(T0)
    switch.availability = AvailabilityTracker(tmp_path / "a.json", clock=clock)
    switch.availability.open()
    switch.calls.calls["stuck"] = object()
    clock.now = T0 + 100
    outcome = await drain(switch, 0.3)  # type: ignore[arg-type]
    assert outcome["calls_left"] == 1 and 0.25 <= outcome["waited_seconds"] < 2.0
    # draining is not available time: the period closed when the drain began
    assert read_availability(tmp_path / "a.json")["periods"] == [[T0, T0 + 100]]
    interrupted = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, interrupted.set)
    outcome = await drain(switch, 30.0, interrupted=interrupted)  # type: ignore[arg-type]
    assert outcome["calls_left"] == 1 and outcome["waited_seconds"] < 2.0


def test_cli_availability_reads_the_state_beside_the_cdr_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from switch.cli import main

    config = tmp_path / "switch.yaml"
    config.write_text("listen:\n  - {transport: udp, host: 127.0.0.1, port: 5060}\n"
                      f"cdr:\n  directory: {tmp_path / 'var' / 'cdr'}\n")
    clock = Clock(MARCH_START)
    tracker = AvailabilityTracker(tmp_path / "var" / "availability.json", clock=clock)
    tracker.open()
    clock.now = MARCH_START + 86400
    tracker.close()  # stopped for the rest of March
    assert main(["availability", "-c", str(config), "--month", MARCH, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["running_since"] is None and report["month"] == MARCH
    assert report["unavailable_minutes"] == 30 * 1440
    assert report["availability"] == pytest.approx(1 / 31, abs=1e-6)
    assert main(["availability", "-c", str(config), "--month", MARCH]) == 0
    text = capsys.readouterr().out
    assert "not running" in text and "availability 3.2258 %" in text
    with pytest.raises(SystemExit) as bad_month:  # argparse: a usage error
        main(["availability", "-c", str(config), "--month", "2026-13"])
    assert bad_month.value.code == 2 and "YYYY-MM" in capsys.readouterr().err

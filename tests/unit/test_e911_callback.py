"""PSAP callback windows (EM-41): callbacks to the callback number reach the device that
made the emergency call for at least 30 minutes."""

from __future__ import annotations

import pytest

from e911.callback import (
    MIN_WINDOW_SECONDS,
    CallbackWindows,
    normalise_callback_number,
)


class Clock:
    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now


def test_callback_within_window_reaches_the_caller() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    opened = windows.open("+13125550100", "dev2", "call-1")
    assert opened.expires == clock.now + 1800
    clock.now += 5 * 60
    entry = windows.lookup("+13125550100")
    assert entry is not None
    assert (entry.username, entry.call_id, entry.number) == ("dev2", "call-1", "+13125550100")
    assert entry.expires == opened.expires


def test_window_expires_after_the_configured_time() -> None:
    clock = Clock()
    windows = CallbackWindows(window_seconds=3600, clock=clock)
    windows.open("+13125550100", "dev2", "call-1")
    clock.now += 3599.9
    assert windows.lookup("+13125550100") is not None
    clock.now += 0.1
    assert windows.lookup("+13125550100") is None
    assert len(windows) == 0


def test_default_window_is_thirty_minutes() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    windows.open("+13125550100", "dev2", "call-1")
    clock.now += 31 * 60
    assert windows.lookup("+13125550100") is None


@pytest.mark.parametrize("window", [1799.9, 0, -5, float("nan"), float("inf"), "soon"])
def test_window_below_thirty_minutes_or_not_a_number_is_refused(window: object) -> None:
    with pytest.raises(ValueError, match="callback window"):
        CallbackWindows(window_seconds=window)  # type: ignore[arg-type]


def test_minimum_window_is_accepted() -> None:
    assert CallbackWindows(window_seconds=MIN_WINDOW_SECONDS).window_seconds == 1800


@pytest.mark.parametrize("dialled", ["13125550100", "+1 (312) 555-0100", "tel:+1-312-555-0100",
                                     "sip:+13125550100@trunk.example;user=phone"])
def test_numbers_match_with_or_without_plus_and_in_uri_forms(dialled: str) -> None:
    windows = CallbackWindows(clock=Clock())
    windows.open("+13125550100", "dev2", "call-1")
    entry = windows.lookup(dialled)
    assert entry is not None and entry.username == "dev2"


def test_number_opened_without_plus_is_found_with_plus() -> None:
    windows = CallbackWindows(clock=Clock())
    windows.open("33142685300", "dev4", "call-7")
    entry = windows.lookup("+33142685300")
    assert entry is not None and entry.username == "dev4"


def test_shared_site_number_goes_to_the_last_emergency_caller() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    windows.open("+13125550100", "dev2", "call-1")
    clock.now += 60
    windows.open("+13125550100", "dev3", "call-2")
    entry = windows.lookup("+13125550100")
    assert entry is not None and (entry.username, entry.call_id) == ("dev3", "call-2")
    clock.now += 1800 - 30  # first caller's window would have ended; the second's not
    entry = windows.lookup("+13125550100")
    assert entry is not None and entry.username == "dev3"


def test_reopening_at_call_end_extends_window_and_keeps_count() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    first = windows.open("+13125550100", "dev2", "call-1")
    windows.record_callback("+13125550100")
    clock.now += 600  # the call lasted 10 minutes
    reopened = windows.open("+13125550100", "dev2", "call-1")
    assert reopened.opened == first.opened
    assert reopened.expires == clock.now + 1800
    assert reopened.callbacks == 1


def test_callbacks_are_counted_and_a_new_caller_starts_at_zero() -> None:
    windows = CallbackWindows(clock=Clock())
    windows.open("+13125550100", "dev2", "call-1")
    assert windows.record_callback("13125550100").callbacks == 1  # type: ignore[union-attr]
    assert windows.record_callback("+13125550100").callbacks == 2  # type: ignore[union-attr]
    assert windows.lookup("+13125550100").callbacks == 2  # type: ignore[union-attr]
    windows.open("+13125550100", "dev3", "call-2")
    assert windows.lookup("+13125550100").callbacks == 0  # type: ignore[union-attr]


def test_record_callback_without_window_returns_none() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    assert windows.record_callback("+13125550100") is None
    windows.open("+13125550100", "dev2", "call-1")
    clock.now += 1800
    assert windows.record_callback("+13125550100") is None


def test_other_numbers_and_garbage_do_not_match() -> None:
    windows = CallbackWindows(clock=Clock())
    windows.open("+13125550100", "dev2", "call-1")
    assert windows.lookup("+13125550101") is None
    assert windows.lookup("alice") is None
    assert windows.lookup("") is None


def test_open_rejects_bad_input() -> None:
    windows = CallbackWindows(clock=Clock())
    with pytest.raises(ValueError, match="E.164"):
        windows.open("101", "dev2", "call-1")
    with pytest.raises(ValueError, match="E.164"):
        windows.open("+0123456", "dev2", "call-1")
    with pytest.raises(ValueError, match="username"):
        windows.open("+13125550100", "", "call-1")
    with pytest.raises(ValueError, match="Call-ID"):
        windows.open("+13125550100", "dev2", "")


def test_prune_and_active_list() -> None:
    clock = Clock()
    windows = CallbackWindows(clock=clock)
    windows.open("+13125550100", "dev2", "call-1")
    clock.now += 100
    windows.open("+13125550200", "dev6", "call-2")
    assert [entry.username for entry in windows.active()] == ["dev2", "dev6"]
    clock.now += 1750
    assert windows.prune() == 1
    assert [entry.username for entry in windows.active()] == ["dev6"]


def test_normalise_callback_number() -> None:
    assert normalise_callback_number(" +33 1 42 68 53 00 ") == "+33142685300"
    with pytest.raises(ValueError):
        normalise_callback_number("+1234567890123456")  # 16 digits: longer than E.164

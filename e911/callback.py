"""PSAP callback windows (EM-41): after an emergency call, an inbound call to the callback
number that was sent in the PAI/From goes straight to the device that made the call.

:meth:`CallbackWindows.open` is called when the emergency call is set up (and again when
it ends, which restarts the window, so it lasts at least ``window_seconds`` after the
call). The inbound-call path asks :meth:`CallbackWindows.lookup` with the dialled number
(Request-URI user part or To): a hit means "ring this device, bypassing DND, forwarding,
hunt groups, IVR, time-of-day routing and voicemail". On a shared site callback number
the last emergency caller wins. :meth:`record_callback` counts the callbacks for the
audit record.

Numbers are compared as E.164 digits: "+13125550100", "13125550100",
"tel:+1-312-555-0100" and "sip:+13125550100@trunk;user=phone" are the same number.
Time comes from an injected monotonic clock; the windows live in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MIN_WINDOW_SECONDS", "CallbackEntry", "CallbackWindows", "normalise_callback_number"]

#: RFC 6881 SP-35/ED-68 and EM-41: at least 30 minutes.
MIN_WINDOW_SECONDS = 1800.0

_SEPARATORS = re.compile(r"[\s\-.()/]")
_DIGITS = re.compile(r"[1-9]\d{6,14}")  # E.164: up to 15 digits; 7 is the shortest in use


def normalise_callback_number(number: str) -> str:
    """The number as "+<E.164 digits>". Raises ValueError if it is not one."""
    if not isinstance(number, str):
        raise ValueError(f"callback number {number!r} is not text")
    text = number.strip()
    lowered = text.lower()
    for scheme in ("tel:", "sip:", "sips:"):
        if lowered.startswith(scheme):
            text = text[len(scheme):]
            break
    text = text.split("@", 1)[0].split(";", 1)[0]
    text = _SEPARATORS.sub("", text)
    digits = text[1:] if text.startswith("+") else text
    if not _DIGITS.fullmatch(digits):
        raise ValueError(f"callback number {number!r} is not an E.164 number (e.g. +13125550100)")
    return "+" + digits


@dataclass(frozen=True, slots=True)
class CallbackEntry:
    """An open callback window: calls to ``number`` ring ``username`` until ``expires``
    (monotonic clock). ``call_id`` is the emergency call's; ``callbacks`` counts the PSAP
    callbacks received so far."""

    number: str
    username: str
    call_id: str
    opened: float
    expires: float
    callbacks: int = 0


class CallbackWindows:
    """The open PSAP callback windows, by callback number."""

    def __init__(self, window_seconds: float = MIN_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            window = float(window_seconds)
        except (TypeError, ValueError):
            raise ValueError(f"callback window {window_seconds!r} is not a number") from None
        if not math.isfinite(window) or window < MIN_WINDOW_SECONDS:
            raise ValueError(f"callback window {window_seconds!r} s is below the minimum of"
                             f" {MIN_WINDOW_SECONDS:.0f} s (30 minutes, EM-41)")
        self.window_seconds = window
        self._clock = clock
        self._entries: dict[str, CallbackEntry] = {}

    def open(self, callback_number: str, username: str, call_id: str) -> CallbackEntry:
        """Open (or restart) the window for ``callback_number`` to ``username``. Re-opening
        for the same call keeps its callback count; another caller replaces the entry."""
        number = normalise_callback_number(callback_number)
        if not isinstance(username, str) or not username:
            raise ValueError("callback window: device username missing")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError("callback window: Call-ID missing")
        now = self._clock()
        self.prune(now)
        previous = self._entries.get(number)
        same_call = (previous is not None and previous.username == username
                     and previous.call_id == call_id)
        entry = CallbackEntry(number=number, username=username, call_id=call_id,
                              opened=previous.opened if same_call and previous else now,
                              expires=now + self.window_seconds,
                              callbacks=previous.callbacks if same_call and previous else 0)
        self._entries[number] = entry
        return entry

    def lookup(self, number: str) -> CallbackEntry | None:
        """The open window for ``number``, or None (none, expired, or not a number)."""
        try:
            key = normalise_callback_number(number)
        except ValueError:
            return None
        now = self._clock()
        self.prune(now)
        return self._entries.get(key)

    def record_callback(self, number: str) -> CallbackEntry | None:
        """Count one PSAP callback on ``number``'s open window; None if there is none."""
        entry = self.lookup(number)
        if entry is None:
            return None
        entry = dataclasses.replace(entry, callbacks=entry.callbacks + 1)
        self._entries[entry.number] = entry
        return entry

    def prune(self, now: float | None = None) -> int:
        """Drop expired windows; returns how many."""
        if now is None:
            now = self._clock()
        expired = [number for number, entry in self._entries.items() if entry.expires <= now]
        for number in expired:
            del self._entries[number]
        return len(expired)

    def active(self) -> list[CallbackEntry]:
        """The open windows, soonest expiry first."""
        self.prune()
        return sorted(self._entries.values(), key=lambda entry: entry.expires)

    def __len__(self) -> int:
        self.prune()
        return len(self._entries)

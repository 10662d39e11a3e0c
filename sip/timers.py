"""SIP transaction timers as data (RFC 3261 §17 and Table 4, RFC 6026 Timers L and M).

`TimerSettings` holds T1, T2, T4 and derives every transaction timer from them.
`TimerQueue` is a single min-heap of deadlines shared by all transactions: nothing
here sleeps or knows about asyncio; the owner of the queue asks `next_deadline()`,
waits however it likes, and calls `pop_due(now)` / `pop_next_due(now)`.

Cancellation is lazy: a cancelled entry stays in the heap, marked, and is skipped
when it reaches the top. When cancelled entries outnumber live ones the heap is
rebuilt, so memory stays proportional to the live timers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

# Rebuild the heap when at least this many entries are cancelled and they are the majority.
_COMPACT_MIN_CANCELLED = 64


@dataclass(frozen=True, slots=True)
class TimerSettings:
    """RFC 3261 timer base values (seconds) and the timers derived from them.

    t1: RTT estimate (default 500 ms); t2: maximum retransmit interval for non-INVITE
    requests and INVITE responses (4 s); t4: maximum time a message stays in the
    network (5 s). `timer_d_unreliable` is Timer D on unreliable transports (">32 s").
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_d_unreliable: float = 32.0

    def __post_init__(self) -> None:
        if not self.t1 > 0:
            raise ValueError("T1 must be positive")
        if self.t2 < self.t1:
            raise ValueError("T2 must be at least T1")
        if self.t4 < 0 or self.timer_d_unreliable < 0:
            raise ValueError("T4 and Timer D must not be negative")

    # Timers that do not depend on the transport.
    @property
    def timer_a(self) -> float:
        """Initial INVITE request retransmit interval (unreliable transports)."""
        return self.t1

    @property
    def timer_b(self) -> float:
        """INVITE client transaction timeout."""
        return 64 * self.t1

    @property
    def timer_e(self) -> float:
        """Initial non-INVITE request retransmit interval (unreliable transports)."""
        return self.t1

    @property
    def timer_f(self) -> float:
        """Non-INVITE client transaction timeout."""
        return 64 * self.t1

    @property
    def timer_g(self) -> float:
        """Initial INVITE final-response retransmit interval (unreliable transports)."""
        return self.t1

    @property
    def timer_h(self) -> float:
        """Wait time for the ACK of a non-2xx final response."""
        return 64 * self.t1

    @property
    def timer_l(self) -> float:
        """RFC 6026: how long an INVITE server transaction stays in Accepted."""
        return 64 * self.t1

    @property
    def timer_m(self) -> float:
        """RFC 6026: how long an INVITE client transaction stays in Accepted."""
        return 64 * self.t1

    # Timers that are zero on reliable transports.
    def timer_d(self, reliable: bool) -> float:
        """Wait time for response retransmissions (INVITE client, Completed)."""
        return 0.0 if reliable else self.timer_d_unreliable

    def timer_i(self, reliable: bool) -> float:
        """Wait time for ACK retransmissions (INVITE server, Confirmed)."""
        return 0.0 if reliable else self.t4

    def timer_j(self, reliable: bool) -> float:
        """Wait time for request retransmissions (non-INVITE server, Completed)."""
        return 0.0 if reliable else 64 * self.t1

    def timer_k(self, reliable: bool) -> float:
        """Wait time for response retransmissions (non-INVITE client, Completed)."""
        return 0.0 if reliable else self.t4


class TimerHandle:
    """One scheduled timer; pass it to `TimerQueue.cancel`."""

    __slots__ = ("deadline", "seq", "owner", "name", "cancelled")

    def __init__(self, deadline: float, seq: int, owner: object, name: str) -> None:
        self.deadline = deadline
        self.seq = seq
        self.owner = owner
        self.name = name
        self.cancelled = False

    @property
    def active(self) -> bool:
        return not self.cancelled

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "active"
        return f"<TimerHandle {self.name} at {self.deadline} {state}>"


class TimerQueue:
    """All timers of a transaction layer in one heap of (deadline, seq, handle).

    `seq` breaks ties so timers with the same deadline fire in the order they were
    scheduled. schedule, cancel and pop are O(log n) (cancel is O(1) plus an
    amortised rebuild).
    """

    __slots__ = ("_heap", "_seq", "_cancelled")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = 0
        self._cancelled = 0

    def __len__(self) -> int:
        """The number of live (not cancelled, not fired) timers."""
        return len(self._heap) - self._cancelled

    def schedule(self, deadline: float, owner: object, name: str) -> TimerHandle:
        self._seq += 1
        handle = TimerHandle(deadline, self._seq, owner, name)
        heapq.heappush(self._heap, (deadline, self._seq, handle))
        return handle

    def cancel(self, handle: TimerHandle | None) -> None:
        """Cancel a timer; cancelling twice, or after it fired, does nothing."""
        if handle is None or handle.cancelled:
            return
        handle.cancelled = True
        self._cancelled += 1
        if self._cancelled >= _COMPACT_MIN_CANCELLED and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def _drop_cancelled_top(self) -> None:
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
            self._cancelled -= 1

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when no timer is pending."""
        self._drop_cancelled_top()
        return self._heap[0][0] if self._heap else None

    def pop_next_due(self, now: float) -> TimerHandle | None:
        """Remove and return the earliest live timer whose deadline is <= now, or None.

        Use this when handling one timer may cancel or reschedule others that are also due.
        """
        self._drop_cancelled_top()
        if not self._heap or self._heap[0][0] > now:
            return None
        handle = heapq.heappop(self._heap)[2]
        handle.cancelled = True  # fired: a later cancel() is a no-op and not counted
        return handle

    def pop_due(self, now: float) -> list[tuple[object, str]]:
        """Remove every live timer due at `now`; return their (owner, name) in deadline order."""
        due: list[tuple[object, str]] = []
        while (handle := self.pop_next_due(now)) is not None:
            due.append((handle.owner, handle.name))
        return due


__all__ = ["TimerHandle", "TimerQueue", "TimerSettings"]

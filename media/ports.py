"""Relay port allocation: even RTP ports with RTP+1 for RTCP, over a configured range.

Allocation and release are O(1): free pairs wait in a FIFO (a released pair goes to the
back, so a port just freed is not reused at once while late packets may still arrive).
"""

from __future__ import annotations

from collections import deque

from media.backend import MediaError, PortsExhausted


class PortAllocator:
    """Pairs ``(rtp, rtp + 1)`` with ``rtp`` even, inside ``[low, high]`` inclusive."""

    def __init__(self, low: int, high: int) -> None:
        if not (1 <= low <= high <= 65535):
            raise ValueError(f"bad port range {low}-{high}")
        first = low + (low & 1)  # first even port
        self.low = low
        self.high = high
        self._free: deque[int] = deque(range(first, high, 2))  # rtp+1 must be <= high
        self._in_use: set[int] = set()
        if not self._free:
            raise ValueError(f"port range {low}-{high} holds no RTP/RTCP pair")
        self.capacity = len(self._free)

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    def allocate(self) -> int:
        """An even RTP port (RTCP is that + 1). Raises :class:`PortsExhausted` when empty."""
        if not self._free:
            raise PortsExhausted(f"all {self.capacity} port pairs of {self.low}-{self.high} in use")
        port = self._free.popleft()
        self._in_use.add(port)
        return port

    def release(self, rtp_port: int) -> None:
        """Give a pair back. Releasing a pair that is not allocated is an error value."""
        if rtp_port not in self._in_use:
            raise MediaError(f"port {rtp_port} is not allocated", status=500, reason="Port Error")
        self._in_use.remove(rtp_port)
        self._free.append(rtp_port)

    def set_aside(self, rtp_port: int) -> None:
        """Release a pair that could not be bound (used by another process): back of queue."""
        self.release(rtp_port)

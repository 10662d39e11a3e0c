"""The media backend interface the B2BUA drives: offer/answer per call.

The model follows SDP offer/answer (RFC 3264) one call at a time, in the spirit of
rtpengine's ng protocol but in our own shape:

* ``offer(call_id, from_tag, sdp)`` takes the SDP an offering leg sent and returns the SDP
  to forward to the *other* leg, rewritten so that it points at the relay's ports facing
  that other leg.
* ``answer(call_id, from_tag, to_tag, sdp)`` takes the answer the other leg (``to_tag``)
  sent and returns the SDP to send back to the offerer (``from_tag``), pointing at the
  relay's ports facing the offerer.
* ``delete`` releases everything held for the call and returns final statistics;
  ``query`` returns the statistics so far.

Legs are named by their dialog tags. The tag of the first offer for a call is leg **A**
(normally the caller); the other tag is leg **B**. A later ``offer`` for the same call
from either tag (re-INVITE or UPDATE: hold/resume, codec change) keeps the relay ports
and re-targets; the offering tag decides the direction of that exchange.

Errors are :class:`MediaError` values carrying the SIP status the B2BUA should answer
with: :class:`PortsExhausted` (503) and :class:`SdpError` (488).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field


class MediaError(Exception):
    """A media operation failed; ``status`` and ``reason`` are what to answer the caller."""

    status: int = 500
    reason: str = "Media Error"

    def __init__(self, detail: str = "", status: int | None = None, reason: str | None = None):
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        self.detail = detail
        super().__init__(f"{self.status} {self.reason}" + (f": {detail}" if detail else ""))


class PortsExhausted(MediaError):
    """No relay ports left in the configured range: answer 503."""

    status = 503
    reason = "No media ports available"


class SdpError(MediaError):
    """The SDP could not be parsed or is not acceptable: answer 488."""

    status = 488
    reason = "Not Acceptable Here"


class UnknownCall(MediaError):
    """``answer`` for a call or tag the backend holds no offer for."""

    status = 500
    reason = "No media session for this call"


@dataclass(slots=True)
class DirectionStats:
    """Counters for media flowing one way through the relay (e.g. from leg A to leg B).

    ``lost`` counts RTP packets missing from the sequence numbers the relay saw (gaps
    before the relay) and is raised to the cumulative loss reported in RTCP receiver
    reports by the receiving leg when that is larger. ``jitter_ms`` and
    ``fraction_lost`` (0.0-1.0) come from the receiving leg's RTCP reports where present.
    ``dropped`` counts packets from sources that were not the latched peer (refused).
    """

    packets: int = 0
    bytes: int = 0
    lost: int = 0
    jitter_ms: float | None = None
    fraction_lost: float | None = None
    rtcp_packets: int = 0
    dropped: int = 0
    last_packet_at: float | None = None


@dataclass(slots=True)
class MediaStats:
    """Statistics of one call's media; times are on the backend's clock."""

    started_at: float
    a_to_b: DirectionStats = field(default_factory=DirectionStats)
    b_to_a: DirectionStats = field(default_factory=DirectionStats)

    @property
    def last_packet_at(self) -> float | None:
        times = [t for t in (self.a_to_b.last_packet_at, self.b_to_a.last_packet_at) if t]
        return max(times) if times else None

    def as_dict(self) -> dict[str, object]:
        """A plain dict for CDRs and logs."""

        def direction(d: DirectionStats) -> dict[str, object]:
            return {
                "packets": d.packets,
                "bytes": d.bytes,
                "lost": d.lost,
                "jitter_ms": d.jitter_ms,
                "fraction_lost": d.fraction_lost,
                "rtcp_packets": d.rtcp_packets,
                "dropped": d.dropped,
                "last_packet_at": d.last_packet_at,
            }

        return {
            "started_at": self.started_at,
            "a_to_b": direction(self.a_to_b),
            "b_to_a": direction(self.b_to_a),
        }


class MediaBackend(ABC):
    """What the B2BUA calls to anchor a call's media. See the module docstring."""

    #: Called with the call-id when no RTP flowed in either direction for the
    #: backend's media timeout. Set by the owner (the B2BUA) after construction.
    on_timeout: Callable[[str], None] | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (timeout checker, control socket). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and release every call's resources."""

    @abstractmethod
    async def offer(self, call_id: str, from_tag: str, sdp: bytes) -> bytes:
        """SDP from the offering leg ``from_tag`` → SDP to send to the other leg.

        Raises :class:`SdpError` or :class:`PortsExhausted` (both :class:`MediaError`).
        """

    @abstractmethod
    async def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: bytes) -> bytes:
        """Answer SDP from leg ``to_tag`` → SDP to send back to the offerer ``from_tag``."""

    @abstractmethod
    async def delete(self, call_id: str) -> MediaStats | None:
        """Release the call's ports; final stats, or None for an unknown call."""

    @abstractmethod
    async def query(self, call_id: str) -> MediaStats | None:
        """Stats so far, or None for an unknown call."""

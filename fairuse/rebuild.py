"""Rebuild the monthly minute counters of the fair-use store from the CDR ledger.

The CDR ledger (``switch.cdr``) is the durable truth about billed calls: one record per
call attempt, with its account, calling line (device), classification and billable
seconds. Minute quotas count those seconds per account and per line for a calendar month
(UTC). After Redis lost its data (a restart without persistence, a failover to an empty
replica), or at start-up of a node with in-memory counters, this module reads the month's
records and sets the counters again.

Rules: a call belongs to the month its ``start`` falls in (the range ``CdrLedger.read``
selects); emergency calls are never counted; records with no billable seconds (unanswered
attempts) change nothing. Live counting (``add_minutes`` at the end of each call) must use
the same rules, ``fairuse.store.month_of(record.start)``, for the two to agree.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from fairuse.store import FairUseStore, _check_month

if TYPE_CHECKING:
    from switch.cdr import BillingPolicy, CallRecord

__all__ = ["MonthTally", "month_range", "rebuild_minutes", "tally_minutes"]

log = structlog.get_logger("fairuse.rebuild")

#: Classifications that never count towards minute quotas.
NOT_COUNTED = frozenset({"emergency"})


def month_range(month: str) -> tuple[float, float]:
    """``[start, end)`` of a calendar month ("YYYY-MM") as UTC epoch seconds."""
    _check_month(month)
    year, number = int(month[:4]), int(month[5:])
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp(), end.timestamp()


@dataclass(slots=True)
class MonthTally:
    """Billable seconds of one month, per account and per (account, line)."""

    month: str
    records: int = 0
    counted: int = 0
    emergency: int = 0
    accounts: dict[str, int] = field(default_factory=dict)
    lines: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, account: str, line: str, seconds: int) -> None:
        self.accounts[account] = self.accounts.get(account, 0) + seconds
        per_line = self.lines.setdefault(account, {})
        per_line[line] = per_line.get(line, 0) + seconds


def tally_minutes(
    records: Iterable[CallRecord],
    month: str,
    billing: BillingPolicy | None = None,
    *,
    counted_classifications: Collection[str] | None = None,
) -> MonthTally:
    """Sum the billable seconds of the ``records`` (``CallRecord``) that started in
    ``month``; records of other months are skipped.

    With ``billing``, answered calls are billed again from their duration under that
    policy; otherwise the stored ``billable`` is used. ``counted_classifications`` (None:
    every classification but emergency) restricts what counts, e.g. ``{"external"}``.
    A record without a device counts for its account total only; one without an account
    is skipped. Records that say their direction count only when outbound (what the
    switch counts live: a device calling out); older records without it are all counted.
    """
    start, end = month_range(month)
    tally = MonthTally(month)
    for record in records:
        if not start <= record.start < end:
            continue  # belongs to another month
        tally.records += 1
        if record.classification in NOT_COUNTED:
            tally.emergency += 1
            continue
        if (
            counted_classifications is not None
            and record.classification not in counted_classifications
        ):
            continue
        if getattr(record, "direction", "") in ("inbound", "internal"):
            continue
        if billing is not None:
            seconds = billing.billable(record.duration if record.answer is not None else None)
        else:
            seconds = int(record.billable)
        if seconds <= 0 or not record.account:
            continue
        tally.counted += 1
        tally.add(record.account, record.device or "", seconds)
    return tally


def _read_month(ledger_directory: str | os.PathLike[str], month: str) -> Iterator[CallRecord]:
    # The ledger belongs to the switch package; imported here, not at module level, so the
    # policy modules of ``fairuse`` keep depending on the standard library and redis only.
    from switch.cdr import CdrLedger

    start, end = month_range(month)
    return CdrLedger(ledger_directory).read(start, end)


async def rebuild_minutes(
    store: FairUseStore,
    ledger_directory: str | os.PathLike[str],
    month: str,
    billing: BillingPolicy | None = None,
    *,
    counted_classifications: Collection[str] | None = None,
    read: Callable[[str | os.PathLike[str], str], Iterable[CallRecord]] = _read_month,
) -> dict[str, Any]:
    """Set the month's minute counters of every account found in the ledger.

    Reads and sums the ledger in a worker thread (blocking file I/O, streamed: memory
    grows with accounts, not records), then replaces each account's
    counters with :meth:`FairUseStore.set_minutes`. Accounts absent from the ledger are
    left untouched. Returns a summary: ``month``, ``records`` read, ``counted``,
    ``emergency`` (skipped), ``accounts`` (how many were set) and ``account_seconds``.
    """
    _check_month(month)
    if not os.path.isdir(ledger_directory):
        raise FileNotFoundError(f"CDR ledger directory not found: {ledger_directory}")
    tally = await asyncio.to_thread(
        lambda: tally_minutes(
            read(ledger_directory, month),
            month,
            billing,
            counted_classifications=counted_classifications,
        )
    )
    for account, total in tally.accounts.items():
        lines = {line: s for line, s in tally.lines.get(account, {}).items() if line}
        await store.set_minutes(account, month, total, lines)
    log.info(
        "fairuse.minutes_rebuilt",
        month=month,
        records=tally.records,
        counted=tally.counted,
        accounts=len(tally.accounts),
    )
    return {
        "month": month,
        "records": tally.records,
        "counted": tally.counted,
        "emergency": tally.emergency,
        "accounts": len(tally.accounts),
        "account_seconds": dict(tally.accounts),
    }

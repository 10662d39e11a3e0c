"""The CDR ledger: one durable call detail record per call attempt.

Every call attempt, answered or not, ends with :meth:`CdrLedger.append`, which returns
only once the record's line is on disk (written and fsync'd). Records are JSON objects,
one per line (JSON Lines), appended to files in one directory:

    cdr-20261101-0001.jsonl     (UTC date the file was opened, sequence within that day)

Durability and throughput
    Appends are *group committed*: every record appended while the previous write is in
    flight, or within the same event-loop iteration, goes to disk with one ``write`` and
    one ``fsync``. The write and fsync run in a worker thread (``asyncio.to_thread``) so
    the event loop keeps serving signalling meanwhile. A single flusher task writes the
    batches in order, so lines appear in the order of the ``append`` calls.

Rotation
    A new file is started when the current one would grow beyond ``rotate_bytes`` or,
    with ``rotate_daily``, when the UTC day (from the injected wall clock) changes.

Crash recovery
    A ``kill -9`` (or power loss) in the middle of a write can leave a *torn* last line.
    :meth:`CdrLedger.open` checks the tail of every file: bytes after the last complete,
    well-formed line are copied to a side file (``<name>.torn-<ms>``, kept for forensics)
    and cut off, so every file is well formed again. Such a line was never acknowledged.
    An exclusive lock on ``.lock`` in the directory keeps a second writer out.

Reading
    :meth:`CdrLedger.read` yields the records whose ``start`` is in a half-open UTC range
    ``[start_from, until)`` across files, in file order (the order calls ended), and
    :meth:`CdrLedger.export_csv` writes them as CSV. Readers never modify files, so they
    are safe while a switch is writing; a trailing incomplete line (a write in progress)
    is skipped, and an unreadable complete line is skipped and counted.

Times are floats (seconds since the epoch, wall clock) in memory and ISO-8601 UTC with
milliseconds (``2026-11-01T09:30:00.250Z``) in files and CSV.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import structlog

if TYPE_CHECKING:
    from switch.settings import Cdr as CdrSettings

__all__ = [
    "CLASSIFICATIONS",
    "CSV_COLUMNS",
    "END_CAUSES",
    "HANGUP_PARTIES",
    "MEDIA_DIRECTIONS",
    "MEDIA_METRICS",
    "BillingPolicy",
    "CallRecord",
    "CdrFormatError",
    "CdrLedger",
    "CdrWriteError",
    "LedgerClosedError",
    "LedgerLockedError",
    "LedgerStats",
    "RecoveryReport",
    "billable_seconds",
    "format_utc",
    "ledger_from_settings",
    "parse_utc",
]

log = structlog.get_logger("switch.cdr")

RECORD_VERSION = 1

DIRECTIONS = frozenset({"", "outbound", "inbound", "internal"})
CLASSIFICATIONS = frozenset({"internal", "external", "emergency", "invalid"})
HANGUP_PARTIES = frozenset({"caller", "callee", "switch"})
# The end causes the switch writes; other lower-case words are accepted when reading.
END_CAUSES = frozenset(
    {
        "normal",
        "busy",
        "no_answer",
        "cancelled",
        "rejected",
        "unavailable",
        "not_found",
        "failed",
        "media_timeout",
        "session_timeout",
        "duration_limit",
        "refused",
    }
)
# Keys of ``CallRecord.media``: one mapping of metrics per direction of the relayed stream.
MEDIA_DIRECTIONS = ("caller_to_callee", "callee_to_caller")
MEDIA_METRICS = ("packets", "bytes", "lost", "jitter_ms")

_END_CAUSE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FILE_NAME = re.compile(r"^cdr-(?P<date>[0-9]{8})-(?P<seq>[0-9]{4,9})\.jsonl$")
_LOCK_NAME = ".lock"
_TAIL_WINDOW = 1 << 16
# A record is written when its call ends, at most this long after the call started;
# readers use it to skip files that cannot hold records of the requested range.
LONGEST_CALL_SECONDS = 7 * 86400.0


class CdrFormatError(ValueError):
    """A stored line or mapping is not a valid call record."""


class CdrWriteError(OSError):
    """A batch of records could not be written or fsync'd; none of them is acknowledged."""


class LedgerLockedError(RuntimeError):
    """Another process (or ledger object) is already writing to this directory."""


class LedgerClosedError(RuntimeError):
    """``append`` was called on a closed ledger."""


# --------------------------------------------------------------------------------------
# Billing
# --------------------------------------------------------------------------------------


def billable_seconds(duration: float | None, increment: int = 6, minimum: int = 18) -> int:
    """Billable seconds of a call that lasted ``duration`` seconds (answer to end).

    ``None`` (unanswered) or a duration of zero bills nothing. Otherwise the duration is
    rounded up to a whole number of ``increment`` seconds, and at least ``minimum`` is
    billed. Durations are taken to the millisecond, so 18.0004 s bills as 18 s.
    """
    if increment < 1:
        raise ValueError("increment must be at least 1 second")
    if minimum < 0:
        raise ValueError("minimum must not be negative")
    if duration is None or not math.isfinite(duration):
        return 0
    milliseconds = round(duration * 1000)
    if milliseconds <= 0:
        return 0
    step = increment * 1000
    units = -(-milliseconds // step)  # ceiling division on integers: no float error
    return max(minimum, units * increment)


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    increment: int = 6
    minimum: int = 18

    def __post_init__(self) -> None:
        billable_seconds(1.0, self.increment, self.minimum)  # validates the parameters

    def billable(self, duration: float | None) -> int:
        return billable_seconds(duration, self.increment, self.minimum)


# --------------------------------------------------------------------------------------
# Time formatting
# --------------------------------------------------------------------------------------


def format_utc(timestamp: float) -> str:
    """``2026-11-01T09:30:00.250Z`` for a float epoch timestamp."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(text: str) -> float:
    """The epoch timestamp of an ISO-8601 date-time; a naive one is read as UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _to_timestamp(value: float | datetime | date | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    return float(value)


def _utc_day(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp, UTC).date()


# --------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallRecord:
    """One call attempt. ``duration`` runs from answer to end (0 when unanswered) and
    ``billable`` is that duration after the billing policy; use :meth:`for_call` to have
    both computed. ``media`` maps each of :data:`MEDIA_DIRECTIONS` to a mapping of
    :data:`MEDIA_METRICS`."""

    call_id: str
    account: str
    device: str
    caller: str
    callee_dialled: str
    callee_e164: str | None
    classification: str
    trunk: str | None
    start: float
    answer: float | None
    end: float
    duration: float
    billable: int
    end_cause: str
    hangup_by: str
    sip_status: int
    media: dict[str, dict[str, float]] = field(default_factory=dict)
    node: str = ""
    # "outbound" (a device called out), "inbound" (from a trunk), "internal", or "" in
    # records written before the field existed
    direction: str = ""

    @classmethod
    def for_call(
        cls,
        *,
        call_id: str,
        account: str,
        device: str,
        caller: str,
        callee_dialled: str,
        callee_e164: str | None,
        classification: str,
        trunk: str | None,
        start: float,
        answer: float | None,
        end: float,
        end_cause: str,
        hangup_by: str,
        sip_status: int,
        media: dict[str, dict[str, float]] | None = None,
        node: str = "",
        billing: BillingPolicy | None = None,
        direction: str = "",
    ) -> CallRecord:
        """A record with ``duration`` and ``billable`` computed from the times (taken to
        the millisecond, as stored)."""
        start, end = round(start, 3), round(end, 3)
        answer = None if answer is None else round(answer, 3)
        duration = 0.0 if answer is None else max(0.0, round(end - answer, 3))
        policy = billing or BillingPolicy()
        record = cls(
            call_id=call_id,
            account=account,
            device=device,
            caller=caller,
            callee_dialled=callee_dialled,
            callee_e164=callee_e164,
            classification=classification,
            trunk=trunk,
            start=start,
            answer=answer,
            end=end,
            duration=duration,
            billable=policy.billable(None if answer is None else duration),
            end_cause=end_cause,
            hangup_by=hangup_by,
            sip_status=sip_status,
            media=dict(media or {}),
            node=node,
            direction=direction,
        )
        record.validate()
        return record

    @property
    def answered(self) -> bool:
        return self.answer is not None

    def validate(self) -> None:
        """Raises :class:`CdrFormatError` naming the first field that is not acceptable."""
        if not isinstance(self.call_id, str) or not self.call_id:
            raise CdrFormatError("call_id must be a non-empty string")
        for name in ("account", "device", "caller", "callee_dialled", "node"):
            if not isinstance(getattr(self, name), str):
                raise CdrFormatError(f"{name} must be a string")
        if self.direction not in DIRECTIONS:
            raise CdrFormatError(f"direction must be one of {sorted(DIRECTIONS)}")
        for name in ("callee_e164", "trunk"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise CdrFormatError(f"{name} must be a string or null")
        if self.classification not in CLASSIFICATIONS:
            raise CdrFormatError(f"classification must be one of {sorted(CLASSIFICATIONS)}")
        if self.hangup_by not in HANGUP_PARTIES:
            raise CdrFormatError(f"hangup_by must be one of {sorted(HANGUP_PARTIES)}")
        if not isinstance(self.end_cause, str) or not _END_CAUSE_SHAPE.match(self.end_cause):
            raise CdrFormatError("end_cause must be a lower-case word")
        if isinstance(self.sip_status, bool) or not isinstance(self.sip_status, int):
            raise CdrFormatError("sip_status must be an integer")
        if not 0 <= self.sip_status <= 699:
            raise CdrFormatError("sip_status must be 0 (none) or a SIP status code")
        for name in ("start", "end", "duration"):
            value = getattr(self, name)
            if not isinstance(value, float | int) or not math.isfinite(value):
                raise CdrFormatError(f"{name} must be a number")
        if self.answer is not None and (
            not isinstance(self.answer, float | int) or not math.isfinite(self.answer)
        ):
            raise CdrFormatError("answer must be a number or null")
        if self.end < self.start:
            raise CdrFormatError("end must not be before start")
        if self.duration < 0:
            raise CdrFormatError("duration must not be negative")
        if isinstance(self.billable, bool) or not isinstance(self.billable, int):
            raise CdrFormatError("billable must be an integer")
        if self.billable < 0:
            raise CdrFormatError("billable must not be negative")
        if not isinstance(self.media, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in self.media.items()
        ):
            raise CdrFormatError("media must map directions to mappings of metrics")

    def to_dict(self) -> dict[str, Any]:
        """The stored form: times as ISO-8601 UTC strings, plus a format version ``v``."""
        return {
            "v": RECORD_VERSION,
            "call_id": self.call_id,
            "account": self.account,
            "device": self.device,
            "caller": self.caller,
            "callee_dialled": self.callee_dialled,
            "callee_e164": self.callee_e164,
            "classification": self.classification,
            "trunk": self.trunk,
            "start": format_utc(self.start),
            "answer": None if self.answer is None else format_utc(self.answer),
            "end": format_utc(self.end),
            "duration": round(float(self.duration), 3),
            "billable": self.billable,
            "end_cause": self.end_cause,
            "hangup_by": self.hangup_by,
            "sip_status": self.sip_status,
            "media": self.media,
            "node": self.node,
            "direction": self.direction,
        }

    def to_json_line(self) -> str:
        """One line of JSON without the newline; non-ASCII text is escaped."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_dict(cls, data: Any) -> CallRecord:
        """Parses the stored form; raises :class:`CdrFormatError` on any problem."""
        if not isinstance(data, dict):
            raise CdrFormatError("a record must be a JSON object")
        version = data.get("v", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise CdrFormatError(f"unsupported record version {version!r}")
        try:
            answer_text = data["answer"]
            record = cls(
                call_id=data["call_id"],
                account=data["account"],
                device=data["device"],
                caller=data["caller"],
                callee_dialled=data["callee_dialled"],
                callee_e164=data["callee_e164"],
                classification=data["classification"],
                trunk=data["trunk"],
                start=_stored_time(data["start"], "start"),
                answer=None if answer_text is None else _stored_time(answer_text, "answer"),
                end=_stored_time(data["end"], "end"),
                duration=data["duration"],
                billable=data["billable"],
                end_cause=data["end_cause"],
                hangup_by=data["hangup_by"],
                sip_status=data["sip_status"],
                media=data.get("media", {}),
                node=data.get("node", ""),
                direction=data.get("direction", ""),
            )
        except KeyError as missing:
            raise CdrFormatError(f"missing field {missing.args[0]}") from None
        record.validate()
        record.duration = float(record.duration)
        return record

    @classmethod
    def from_json_line(cls, line: str | bytes) -> CallRecord:
        try:
            data = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CdrFormatError(f"not JSON: {exc}") from None
        return cls.from_dict(data)

    def csv_row(self) -> list[str]:
        """The values of :data:`CSV_COLUMNS`, as text."""
        row = [
            self.call_id,
            self.account,
            self.device,
            self.caller,
            self.callee_dialled,
            self.callee_e164 or "",
            self.classification,
            self.trunk or "",
            format_utc(self.start),
            "" if self.answer is None else format_utc(self.answer),
            format_utc(self.end),
            f"{self.duration:.3f}",
            str(self.billable),
            self.end_cause,
            self.hangup_by,
            str(self.sip_status),
            self.node,
            self.direction,
        ]
        for direction in MEDIA_DIRECTIONS:
            metrics = self.media.get(direction) or {}
            for metric in MEDIA_METRICS:
                value = metrics.get(metric)
                row.append("" if value is None else _number_text(value))
        return row


CSV_COLUMNS: tuple[str, ...] = (
    "call_id",
    "account",
    "device",
    "caller",
    "callee_dialled",
    "callee_e164",
    "classification",
    "trunk",
    "start",
    "answer",
    "end",
    "duration",
    "billable",
    "end_cause",
    "hangup_by",
    "sip_status",
    "node",
    "direction",
    *(f"{direction}_{metric}" for direction in MEDIA_DIRECTIONS for metric in MEDIA_METRICS),
)


def _stored_time(value: Any, name: str) -> float:
    if not isinstance(value, str):
        raise CdrFormatError(f"{name} must be an ISO-8601 UTC time string")
    try:
        return parse_utc(value)
    except ValueError:
        raise CdrFormatError(f"{name} is not an ISO-8601 time: {value[:40]!r}") from None


def _number_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else ""
    return str(value)


# --------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class RecoveryReport:
    """What :meth:`CdrLedger.open` cut off the end of one file."""

    file: Path
    torn_lines: int
    torn_bytes: int
    moved_to: Path


@dataclass(slots=True)
class LedgerStats:
    records_appended: int = 0
    batches_written: int = 0
    fsyncs: int = 0
    bytes_written: int = 0
    files_opened: int = 0
    write_errors: int = 0
    torn_lines_recovered: int = 0
    torn_bytes_recovered: int = 0
    unreadable_lines: int = 0


@dataclass(frozen=True, slots=True)
class _LedgerFile:
    path: Path
    day: date
    sequence: int

    @property
    def sort_key(self) -> tuple[date, int]:
        return (self.day, self.sequence)


_Pending = tuple[bytes, "asyncio.Future[None]"]


class CdrLedger:
    """Append-only, fsync'd call records in ``directory`` (see the module docstring).

    ``clock`` is the wall clock (epoch seconds) that decides file dates and daily
    rotation. ``group_window`` (seconds) optionally holds a batch open a little longer
    to gather more records per fsync; 0 groups what arrives while the previous write is
    in flight or in the same loop iteration. With ``fsync=False`` lines are written to
    the operating system before ``append`` returns (they survive ``kill -9`` of the
    switch, not a power cut).

    Writers call :meth:`open` (done by the first :meth:`append` otherwise) and
    :meth:`close`; readers (:meth:`read`, :meth:`export_csv`) need neither.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rotate_bytes: int = 64 * 1024 * 1024,
        rotate_daily: bool = True,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        group_window: float = 0.0,
    ) -> None:
        if rotate_bytes < 1:
            raise ValueError("rotate_bytes must be positive")
        if group_window < 0:
            raise ValueError("group_window must not be negative")
        self.directory = Path(directory)
        self.rotate_bytes = int(rotate_bytes)
        self.rotate_daily = rotate_daily
        self.fsync = fsync
        self.clock = clock
        self.group_window = float(group_window)
        self.stats = LedgerStats()
        self._opened = False
        self._closed = False
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._current: _LedgerFile | None = None
        self._current_size = 0
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def open(self) -> list[RecoveryReport]:
        """Creates the directory, takes the writer lock and repairs torn file tails.
        Returns what was cut off (empty when every file was well formed)."""
        if self._closed:
            raise LedgerClosedError("the ledger is closed")
        if self._opened:
            return []
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise LedgerLockedError(
                f"{self.directory}: another process is writing this CDR ledger"
            ) from None
        self._lock_fd = lock_fd
        reports: list[RecoveryReport] = []
        try:
            for ledger_file in self._files():
                report = self._repair_tail(ledger_file.path)
                if report is not None:
                    reports.append(report)
        except BaseException:
            self._release_lock()
            raise
        self._opened = True
        return reports

    async def close(self) -> None:
        """Writes what is pending, then closes the file and releases the lock."""
        if self._closed:
            return
        self._closed = True
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release_lock()

    async def __aenter__(self) -> CdrLedger:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ---- appending ----------------------------------------------------------------------

    async def append(self, record: CallRecord) -> None:
        """Appends ``record``; returns once its line is written and fsync'd. Raises
        :class:`CdrWriteError` when the disk refused it (the record is then not stored)."""
        if self._closed:
            raise LedgerClosedError("the ledger is closed")
        if not self._opened:
            self.open()
        record.validate()
        line = record.to_json_line().encode("ascii") + b"\n"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending(), name="cdr-flusher")
        await done

    async def _flush_pending(self) -> None:
        while self._pending:
            if self.group_window > 0:
                await asyncio.sleep(self.group_window)
            batch, self._pending = self._pending, []
            lines = [line for line, _ in batch]
            now = self.clock()
            try:
                await asyncio.to_thread(self._write_batch, lines, now)
            except Exception as exc:  # noqa: BLE001 - reported to each waiting appender
                self.stats.write_errors += 1
                log.error("cdr.write_failed", records=len(batch), error=str(exc))
                error = CdrWriteError(f"CDR write failed: {exc}")
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            self.stats.records_appended += len(batch)
            for _, done in batch:
                if not done.done():  # the appender may have been cancelled meanwhile
                    done.set_result(None)

    # ---- file handling (runs in the worker thread, one batch at a time) -----------------

    def _write_batch(self, lines: list[bytes], now: float) -> None:
        chunk: list[bytes] = []
        chunk_size = 0
        for line in lines:
            if self._fd is None:
                self._open_for_append(now)
            if self._must_rotate(now, chunk_size, len(line)):
                self._commit(chunk)
                chunk, chunk_size = [], 0
                self._rotate(now)
            chunk.append(line)
            chunk_size += len(line)
        self._commit(chunk)

    def _must_rotate(self, now: float, chunk_bytes: int, line_bytes: int) -> bool:
        """Whether ``line_bytes`` more, after ``chunk_bytes`` not yet written, need a new
        file. A file always takes at least one line, however long."""
        assert self._current is not None
        held = self._current_size + chunk_bytes
        if held > 0 and held + line_bytes > self.rotate_bytes:
            return True
        return self.rotate_daily and _utc_day(now) > self._current.day

    def _commit(self, chunk: list[bytes]) -> None:
        if not chunk:
            return
        assert self._fd is not None
        data = b"".join(chunk)
        offset = self._current_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fdatasync(self._fd)
                self.stats.fsyncs += 1
        except OSError:
            # Leave no partial line behind a failed write: later lines must stay readable.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            raise
        self._current_size += len(data)
        self.stats.bytes_written += len(data)
        self.stats.batches_written += 1

    def _open_for_append(self, now: float) -> None:
        files = self._files()
        today = _utc_day(now)
        if files:
            last = files[-1]
            size = last.path.stat().st_size
            fresh_enough = not self.rotate_daily or last.day >= today
            if size < self.rotate_bytes and fresh_enough:
                self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
                self._current, self._current_size = last, size
                self.stats.files_opened += 1
                return
        self._open_new(now, files)

    def _rotate(self, now: float) -> None:
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self._open_new(now, self._files())

    def _open_new(self, now: float, files: list[_LedgerFile]) -> None:
        day = _utc_day(now)
        if files and files[-1].day > day:
            day = files[-1].day  # the clock went back: keep file names in order
        sequence = max((f.sequence for f in files if f.day == day), default=0) + 1
        path = self.directory / f"cdr-{day:%Y%m%d}-{sequence:04d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        self._current, self._current_size = _LedgerFile(path, day, sequence), 0
        self.stats.files_opened += 1
        if self.fsync:
            _fsync_directory(self.directory)
        log.info("cdr.file_opened", file=path.name)

    def _files(self) -> list[_LedgerFile]:
        found: list[_LedgerFile] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = _FILE_NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            try:
                day = datetime.strptime(match["date"], "%Y%m%d").date()
            except ValueError:
                continue
            found.append(_LedgerFile(Path(entry.path), day, int(match["seq"])))
        found.sort(key=lambda f: f.sort_key)
        return found

    def files(self) -> list[Path]:
        """The ledger's files, oldest first."""
        return [f.path for f in self._files()]

    # ---- recovery -----------------------------------------------------------------------

    def _repair_tail(self, path: Path) -> RecoveryReport | None:
        with open(path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            good = _well_formed_length(handle, size)
            if good == size:
                return None
            handle.seek(good)
            torn = handle.read(size - good)
            moved_to = _free_name(path.with_name(f"{path.name}.torn-{int(time.time() * 1000)}"))
            with open(moved_to, "xb") as aside:
                aside.write(torn)
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(good)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(path.parent)
        lines = torn.count(b"\n") + (0 if torn.endswith(b"\n") else 1)
        self.stats.torn_lines_recovered += lines
        self.stats.torn_bytes_recovered += len(torn)
        log.warning(
            "cdr.torn_tail_recovered",
            file=path.name,
            torn_lines=lines,
            torn_bytes=len(torn),
            moved_to=moved_to.name,
        )
        return RecoveryReport(path, lines, len(torn), moved_to)

    # ---- reading ------------------------------------------------------------------------

    def read(
        self,
        start_from: float | datetime | date | None = None,
        until: float | datetime | date | None = None,
    ) -> Iterator[CallRecord]:
        """Records with ``start_from <= start < until`` (either bound optional), in file
        order. Blocking file I/O: from asyncio, run it in a thread. Files that cannot hold
        such records are skipped, assuming no call lasts over ``LONGEST_CALL_SECONDS``."""
        low, high = _to_timestamp(start_from), _to_timestamp(until)
        files = self._files()
        for index, ledger_file in enumerate(files):
            opened_at = datetime(*ledger_file.day.timetuple()[:3], tzinfo=UTC).timestamp()
            if high is not None and opened_at - LONGEST_CALL_SECONDS - 86400 >= high:
                break  # this file and later ones were started long after `until`
            if low is not None and _last_write_bound(files, index) <= low:
                continue  # every call in this file ended (and started) before `low`
            for record in self._read_file(ledger_file.path):
                if low is not None and record.start < low:
                    continue
                if high is not None and record.start >= high:
                    continue
                yield record

    def _read_file(self, path: Path) -> Iterator[CallRecord]:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return
        with handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith(b"\n"):
                    return  # a write in progress (or a tail not yet recovered)
                try:
                    yield CallRecord.from_json_line(line)
                except CdrFormatError as exc:
                    self.stats.unreadable_lines += 1
                    log.warning("cdr.unreadable_line", file=path.name, line=number, error=str(exc))

    def export_csv(
        self,
        start_from: float | datetime | date | None,
        until: float | datetime | date | None,
        out: TextIO,
    ) -> int:
        """Writes a header and one CSV row (RFC 4180, ``CSV_COLUMNS``) per record of the
        range to ``out`` (open it with ``newline=""``); returns the number of rows."""
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        rows = 0
        for record in self.read(start_from, until):
            writer.writerow(record.csv_row())
            rows += 1
        return rows


def _last_write_bound(files: list[_LedgerFile], index: int) -> float:
    """A time no record of ``files[index]`` was written after: the end of the day after
    its successor was opened (a day of slack for clock adjustments); none for the last."""
    if index + 1 >= len(files):
        return math.inf
    successor = files[index + 1].day + timedelta(days=2)
    return datetime(*successor.timetuple()[:3], tzinfo=UTC).timestamp()


def _well_formed_length(handle: Any, size: int) -> int:
    """Length of the longest prefix of the file that ends with a complete, parseable
    record line (0 when there is none). Reads backwards from the end in growing windows."""
    window = _TAIL_WINDOW
    while True:
        start = max(0, size - window)
        handle.seek(start)
        data = handle.read(size - start)
        end = data.rfind(b"\n")
        while end >= 0:
            begin = data.rfind(b"\n", 0, end) + 1
            if begin == 0 and start > 0:
                break  # the line may begin before this window: read a larger one
            if _is_record_line(data[begin:end]):
                return start + end + 1
            end = begin - 1
        else:
            if start == 0:
                return 0
        window *= 4


def _is_record_line(line: bytes) -> bool:
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("call_id"), str)


def _free_name(path: Path) -> Path:
    candidate, suffix = path, 0
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}.{suffix}")
    return candidate


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_from_settings(
    settings: CdrSettings, *, clock: Callable[[], float] = time.time
) -> tuple[CdrLedger, BillingPolicy]:
    """The ledger and billing policy described by the ``cdr`` settings section. A
    relative ``directory`` is relative to the current working directory."""
    ledger = CdrLedger(
        settings.directory,
        rotate_bytes=settings.rotate_bytes,
        rotate_daily=settings.rotate_daily,
        fsync=settings.fsync,
        clock=clock,
    )
    return ledger, BillingPolicy(settings.billing.increment, settings.billing.minimum)

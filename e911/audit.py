"""The emergency audit journal: a write-ahead, hash-chained record of every emergency call.

EMERGENCY.md EM-70 asks for a record of each emergency or test call that is created at
classification time and is never lost, without ever delaying the INVITE towards the PSAP.
This module is that record's first, local copy: every event of an emergency call (911, 112,
933 test calls, PSAP callbacks, ...) is one JSON line in an fsync'd journal, written ahead of
any database.

Entries
    One JSON object per line (JSON Lines), in files ``emergency-000001.jsonl``, ... of one
    directory, rotated by size. Each entry holds::

        v        format version (1)
        seq      sequence number, 1, 2, 3, ... across files, never reused
        time     when the event was recorded, ISO-8601 UTC with milliseconds
        call_id  the SIP Call-ID of the emergency call ("-" for journal events)
        event    what happened (see below)
        fields   the event's details, a JSON object
        prev     ``hash`` of the entry before (64 zeros before the first entry)
        hash     SHA-256 (hex) of the canonical JSON of the entry without ``hash``:
                 ``json.dumps(entry, sort_keys=True, separators=(",", ":"),
                 ensure_ascii=True)`` encoded as ASCII

    The chain makes the journal tamper-evident (EM-70): :func:`verify` finds an edited
    entry (its hash no longer matches), a deleted entry (a gap in ``seq`` and a ``prev``
    that does not match) and inserted or reordered entries. Every file's first entry carries
    the previous file's last hash in ``prev``, so after retention removed the oldest files
    the remaining ones still verify; :meth:`EmergencyJournal.prune` records a
    ``journal_pruned`` entry naming the seq and hash it cut at, so an unexplained missing
    start is reported too. A chain cannot reveal the loss of its newest entries (a
    truncated tail): compare :meth:`EmergencyJournal.head` with a copy kept elsewhere.

Events (free-form names; these are the ones the switch writes)
    ``classified``    a dialled string was classified emergency/test/helpline (EM-70): device,
                      extension, user, site, dialled, number class, location and its status
    ``location``      the PIDF-LO bodies sent and the device's own (exact bytes, EM-70 (3))
    ``invite_sent``   the INVITE to an emergency route: trunk, exact Request-URI and
                      identity headers (P-Asserted-Identity, From, Geolocation, ...)
    ``response``      a response of an emergency route: ``route``, ``status`` (EM-13)
    ``route_failed``  every route failed (EM-13): the attempts and their codes
    ``answered``      the PSAP leg was answered (2xx)
    ``ended``         BYE or failure: cause, outcome
    ``notification``  an on-site notification delivery (EM-60): ``recipient``, ``outcome``
    ``callback``      an inbound call within the PSAP callback window (EM-41)
    ``test_result``   a 933 / ``urn:service:test.sos`` result (EM-07, EM-80), e.g. the PSAP's
                      ``text/plain`` body
    ``journal_failure``  written by the journal itself once the disk works again after a
                      failed write: the error, since when, how many attempts
    ``journal_pruned``   written by :meth:`EmergencyJournal.prune`: the files removed and the
                      ``through_seq`` / ``last_hash`` the remaining chain starts after

Field values
    Anything JSON can hold. Tuples and sets become lists, mapping keys strings, non-finite
    floats and other objects their ``str()``, datetimes ISO-8601 text. **Bytes** (SIP
    bodies, PIDF-LO documents) are stored losslessly: bytes that are valid UTF-8 become that
    text (so ``value.encode("utf-8")`` gives back the exact bytes), other bytes become
    ``{"$base64": "..."}``; :func:`field_bytes` turns either form back into the bytes.

Writing never blocks routing
    :meth:`EmergencyJournal.record` only copies the fields, takes the time and appends the
    entry to an in-memory queue; it never raises and never touches the disk. One writer
    *thread* (not an asyncio task: the journal then works from sync code and from any event
    loop, and a slow disk never stalls the loop) takes everything queued, chains it, writes
    it with one ``write`` and one ``fdatasync`` per batch (group commit) and acknowledges it.
    When a write fails, ``on_failure(exc)`` is called (raise an alarm there), the entries
    stay queued, and the writer retries with a growing pause (up to 30 s): nothing is lost
    while the process lives. ``await flush()`` waits until everything recorded so far is on
    disk.

Crash recovery
    A ``kill -9`` during a write can leave a partial last line. :meth:`EmergencyJournal.open`
    moves the bytes after the last complete entry to ``<file>.torn-<ms>`` (kept for
    forensics) and cuts them off, checks the last entry's hash, and continues the chain
    from it. An exclusive lock on ``.lock`` in the directory keeps a second writer out.
    Readers (:meth:`~EmergencyJournal.read`, :func:`verify`) never modify files and skip a
    trailing partial line (a write in progress).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import structlog

__all__ = [
    "ENTRY_VERSION",
    "EVENTS",
    "GENESIS_HASH",
    "EmergencyJournal",
    "JournalClosedError",
    "JournalLockedError",
    "JournalStats",
    "JournalWriteError",
    "RecoveryReport",
    "TornTail",
    "entry_hash",
    "field_bytes",
    "format_utc",
    "journal_files",
    "parse_time",
    "read_journal",
    "verify",
]

log = structlog.get_logger("e911.audit")

ENTRY_VERSION = 1
GENESIS_HASH = "0" * 64
JOURNAL_CALL_ID = "-"  # call_id of the journal's own entries

EVENTS = frozenset(
    {
        "classified",
        "location",
        "invite_sent",
        "response",
        "route_failed",
        "answered",
        "ended",
        "notification",
        "callback",
        "test_result",
        "journal_failure",
        "journal_pruned",
    }
)

DEFAULT_ROTATE_BYTES = 16 * 1024 * 1024
FIRST_RETRY_SECONDS = 0.25
LONGEST_RETRY_SECONDS = 30.0

_FILE_NAME = re.compile(r"^emergency-(?P<number>[0-9]{6,12})\.jsonl$")
_LOCK_NAME = ".lock"
_HASH_SHAPE = re.compile(r"^[0-9a-f]{64}$")
_TAIL_WINDOW = 1 << 16
_MAX_DEPTH = 32
_ENTRY_KEYS = ("v", "seq", "time", "call_id", "event", "fields", "prev", "hash")


class JournalLockedError(RuntimeError):
    """Another process (or journal object) is already writing to this directory."""


class JournalClosedError(RuntimeError):
    """The journal is closed (or not open yet) for this operation."""


class JournalWriteError(OSError):
    """The journal could not get entries onto the disk in time."""


# --------------------------------------------------------------------------------------
# Time and values
# --------------------------------------------------------------------------------------


def format_utc(timestamp: float) -> str:
    """``2026-11-01T09:30:00.250Z`` for a float epoch timestamp (as the CDR ledger writes)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """The epoch timestamp of a stored ``time`` (any ISO-8601 date-time; naive is UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _bound(value: float | datetime | date | str | None) -> str | None:
    """A time bound as stored text, so bounds compare with entry times as strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return format_utc(parse_time(value))
    if isinstance(value, datetime):
        return format_utc((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
    if isinstance(value, date):
        return format_utc(datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    return format_utc(float(value))


def field_bytes(value: Any) -> bytes:
    """The bytes a field value was recorded from: UTF-8 text or ``{"$base64": ...}``.
    Raises ValueError for anything else."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    if isinstance(value, dict) and set(value) == {"$base64"} and isinstance(value["$base64"], str):
        try:
            return base64.b64decode(value["$base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the $base64 field is not valid base64") from None
    raise ValueError(f"not a recorded byte string: {type(value).__name__}")


def _json_value(value: Any, depth: int = 0) -> Any:
    """A JSON-safe deep copy of ``value`` (see "Field values" in the module docstring)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(data).decode("ascii")}
    if depth >= _MAX_DEPTH:
        return _text(value)
    if isinstance(value, Mapping):
        return {_text(key): _json_value(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(item, depth + 1) for item in value]
    if isinstance(value, set | frozenset):
        items = [_json_value(item, depth + 1) for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True, default=str))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the entry
        return f"<unprintable {type(value).__name__}>"


def _canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _entry_line(entry: dict[str, Any]) -> bytes:
    text = json.dumps(entry, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii") + b"\n"


def _parse_entry(line: bytes) -> dict[str, Any] | None:
    """The entry on a complete line, or None when the line is not one."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    seq = data.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    if not isinstance(data.get("hash"), str) or not isinstance(data.get("prev"), str):
        return None
    return data


def _entry_problems(entry: Mapping[str, Any]) -> list[str]:
    """What is wrong with the shape of an entry (its hash is checked apart)."""
    problems = []
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    extra = sorted(set(entry) - set(_ENTRY_KEYS))
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if "v" in entry and entry["v"] != ENTRY_VERSION:
        problems.append(f"unsupported version {entry['v']!r}")
    for key in ("time", "call_id", "event"):
        if key in entry and not isinstance(entry[key], str):
            problems.append(f"{key} is not a string")
    if "fields" in entry and not isinstance(entry["fields"], dict):
        problems.append("fields is not an object")
    for key in ("prev", "hash"):
        if key in entry and not (isinstance(entry[key], str) and _HASH_SHAPE.match(entry[key])):
            problems.append(f"{key} is not a SHA-256 hex digest")
    return problems


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def journal_files(directory: Path) -> list[Path]:
    """The journal's files in ``directory``, oldest first."""
    found: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        match = _FILE_NAME.match(entry.name)
        if match is not None and entry.is_file():
            found.append((int(match["number"]), Path(entry.path)))
    found.sort()
    return [path for _, path in found]


def _file_number(path: Path) -> int:
    match = _FILE_NAME.match(path.name)
    return int(match["number"]) if match else 0


def _well_formed_length(handle: Any, size: int) -> int:
    """Length of the longest prefix of the file that ends with a complete entry line (0
    when there is none). Reads backwards from the end in growing windows."""
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
            if _parse_entry(data[begin:end]) is not None:
                return start + end + 1
            end = begin - 1
        else:
            if start == 0:
                return 0
        window *= 4


def _last_lines(path: Path, count: int) -> list[bytes]:
    """Up to ``count`` last complete lines of a file that ends with a complete line."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        window = _TAIL_WINDOW
        while True:
            start = max(0, size - window)
            handle.seek(start)
            data = handle.read(size - start)
            lines = data.split(b"\n")[:-1]  # the part after the last newline is not a line
            if start > 0:
                lines = lines[1:]  # the first may have begun before the window
            if len(lines) >= count or start == 0:
                return lines[-count:] if count else []
            window *= 4


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_name(path: Path) -> Path:
    candidate, suffix = path, 0
    while candidate.exists():
        suffix += 1
        candidate = path.with_name(f"{path.name}.{suffix}")
    return candidate


# Indirections the writer thread calls (tests replace them to simulate a failing disk).
def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _sync_file(fd: int) -> None:
    os.fdatasync(fd)


# --------------------------------------------------------------------------------------
# Reading and verification (no lock needed; files are never modified)
# --------------------------------------------------------------------------------------


def _file_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) for each line of a file."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        for number, line in enumerate(handle, start=1):
            if line.endswith(b"\n"):
                yield number, line[:-1], True
            else:
                yield number, line, False


def read_journal(
    directory: Path,
    *,
    call_id: str | None = None,
    start: float | datetime | date | str | None = None,
    until: float | datetime | date | str | None = None,
    on_unreadable: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Entries with ``start <= time < until`` (either optional) and the given Call-ID, in
    journal order, across files. A trailing partial line is skipped; a complete line that
    is not an entry is skipped and described to ``on_unreadable``."""
    low, high = _bound(start), _bound(until)
    for path in journal_files(Path(directory)):
        for number, line, complete in _file_lines(path):
            if not complete:
                break  # a write in progress, or a tail not recovered yet
            entry = _parse_entry(line)
            if entry is None or not isinstance(entry.get("time"), str):
                message = f"{path.name}:{number}: not a journal entry"
                log.warning("emergency_journal.unreadable_line", file=path.name, line=number)
                if on_unreadable is not None:
                    on_unreadable(message)
                continue
            if call_id is not None and entry.get("call_id") != call_id:
                continue
            moment = entry["time"]
            if low is not None and moment < low:
                continue
            if high is not None and moment >= high:
                continue
            yield entry


def verify(directory: Path) -> list[str]:
    """Problems of the journal in ``directory`` as ``file:line: problem`` texts: lines that
    are not entries, entries whose hash does not match (edited), broken ``prev`` links
    and gaps in ``seq`` (deleted or inserted entries), a partial line anywhere but at the
    very end, and a missing start no ``journal_pruned`` entry accounts for. Empty when
    the chain is intact."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: no such journal directory"]
    problems: list[str] = []
    files = journal_files(directory)
    previous: dict[str, Any] | None = None
    first: dict[str, Any] | None = None
    first_where = ""
    prunes: list[dict[str, Any]] = []
    for index, path in enumerate(files):
        is_last_file = index == len(files) - 1
        for number, line, complete in _file_lines(path):
            where = f"{path.name}:{number}"
            if not complete:
                if not is_last_file:
                    problems.append(f"{where}: partial line (no newline) inside the journal")
                continue  # at the very end: a write in progress
            entry = _parse_entry(line)
            if entry is None:
                problems.append(f"{where}: not a journal entry")
                continue
            shape = _entry_problems(entry)
            if shape:
                problems.append(f"{where}: seq {entry['seq']}: {'; '.join(shape)}")
            elif entry_hash(entry) != entry["hash"]:
                problems.append(f"{where}: seq {entry['seq']}: hash mismatch (entry altered)")
            if previous is None:
                first, first_where = entry, where
            else:
                expected = previous["seq"] + 1
                if entry["seq"] != expected:
                    problems.append(
                        f"{where}: seq {entry['seq']} follows seq {previous['seq']}"
                        f" (expected {expected}: entries missing or inserted)"
                    )
                if entry["prev"] != previous["hash"]:
                    problems.append(
                        f"{where}: seq {entry['seq']}: prev does not match the hash of"
                        f" seq {previous['seq']} (chain broken)"
                    )
            if entry.get("event") == "journal_pruned" and isinstance(entry.get("fields"), dict):
                prunes.append(entry["fields"])
            previous = entry
    if first is not None and (first["seq"] != 1 or first["prev"] != GENESIS_HASH):
        explained = any(
            prune.get("through_seq") == first["seq"] - 1 and prune.get("last_hash") == first["prev"]
            for prune in prunes
        )
        if not explained:
            problems.append(
                f"{first_where}: the journal starts at seq {first['seq']}: earlier entries are"
                " missing and no journal_pruned entry accounts for them"
            )
    return problems


# --------------------------------------------------------------------------------------
# The journal
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TornTail:
    """Bytes cut off the end of a journal file at open (never acknowledged)."""

    path: Path
    lines: int
    size: int
    moved_to: Path


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`EmergencyJournal.open` found: the torn tail it cut (if any), where the
    chain continues, and problems seen at the tail of the chain."""

    directory: Path
    files: int
    last_seq: int
    last_hash: str
    torn: TornTail | None = None
    problems: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return self.torn is None and not self.problems


@dataclass(slots=True)
class JournalStats:
    entries_recorded: int = 0
    entries_written: int = 0
    batches_written: int = 0
    fsyncs: int = 0
    bytes_written: int = 0
    files_opened: int = 0
    write_failures: int = 0
    entries_dropped: int = 0  # recorded after close: nothing left to write them


@dataclass(slots=True)
class _Queued:
    number: int  # 1, 2, ... in record() order within this process
    time: str
    call_id: str
    event: str
    fields: dict[str, Any]


@dataclass(slots=True)
class _Waiter:
    target: int
    wake: Callable[[], None]
    done: bool = field(default=False)


class EmergencyJournal:
    """The write-ahead audit journal of emergency calls in ``directory`` (EM-70).

    ``record`` from any thread or event loop; ``open`` before (entries recorded earlier
    wait in memory), ``close`` at the end. ``on_failure(exc)`` is called from the writer
    thread each time a write fails (and on other internal errors): raise an alarm there,
    quickly; it must not block."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        wall_clock: Callable[[], float] = time.time,
        on_failure: Callable[[Exception], None] | None = None,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        first_retry: float = FIRST_RETRY_SECONDS,
        longest_retry: float = LONGEST_RETRY_SECONDS,
    ) -> None:
        if rotate_bytes < 1024:
            raise ValueError("rotate_bytes must be at least 1024")
        if not 0 < first_retry <= longest_retry:
            raise ValueError("retry pauses must be positive, first_retry <= longest_retry")
        self.directory = Path(directory)
        self.fsync = fsync
        self.wall_clock = wall_clock
        self.on_failure = on_failure
        self.rotate_bytes = int(rotate_bytes)
        self.first_retry = float(first_retry)
        self.longest_retry = float(longest_retry)
        self.stats = JournalStats()
        self._lock = threading.Condition()  # guards the queue, counters, waiters, flags
        self._queue: deque[_Queued] = deque()
        self._recorded = 0  # entries accepted by record()
        self._durable = 0  # of those, how many are on disk (always a prefix)
        self._waiters: list[_Waiter] = []
        self._retry_now = False
        self._stopping = False
        self._opened = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._io_lock = threading.Lock()  # the writer's batch vs. prune
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._current: Path | None = None
        self._current_size = 0
        self._tail_seq = 0
        self._tail_hash = GENESIS_HASH
        self._resync = False
        self._failing_since: float | None = None
        self._failed_attempts = 0
        self._last_error = ""

    # ---- lifecycle ----------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """Creates the directory, takes the writer lock, recovers a torn tail, checks the
        chain's last entry and starts the writer thread. Raises :class:`JournalLockedError`
        when another writer holds the directory, OSError when it cannot be used."""
        if self._closed:
            raise JournalClosedError("the emergency journal is closed")
        if self._opened:
            return RecoveryReport(
                self.directory, len(self.files()), self._tail_seq, self._tail_hash
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalLockedError(
                f"{self.directory}: another process is writing this emergency journal"
            ) from None
        self._lock_fd = lock_fd
        try:
            files = self.files()
            torn = self._repair_tail(files[-1]) if files else None
            problems = self._load_tail(files)
        except BaseException:
            self._release_lock()
            raise
        for problem in problems:
            log.error("emergency_journal.tail_problem", problem=problem)
        self._opened = True
        self._thread = threading.Thread(
            target=self._writer, name="emergency-journal-writer", daemon=True
        )
        self._thread.start()
        log.info(
            "emergency_journal.opened",
            directory=str(self.directory),
            last_seq=self._tail_seq,
            torn_bytes=torn.size if torn else 0,
        )
        return RecoveryReport(
            self.directory, len(files), self._tail_seq, self._tail_hash, torn, tuple(problems)
        )

    def close(self, timeout: float | None = 10.0) -> bool:
        """Writes what is queued (waiting at most ``timeout`` seconds when the disk fails),
        stops the writer and releases the lock. Returns whether everything recorded was
        written; entries still queued after the timeout are reported and lost."""
        with self._lock:
            if self._closed:
                return self._durable == self._recorded
            self._closed = True
            self._stopping = True
            self._retry_now = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            complete = self._durable == self._recorded
            lost = self._recorded - self._durable
        if self._thread is not None and self._thread.is_alive():
            log.error("emergency_journal.close_timeout", unwritten=lost)
        else:
            self._close_file()
            self._release_lock()
        if not complete:
            log.error("emergency_journal.entries_lost", count=lost)
        return complete

    async def aclose(self, timeout: float | None = 10.0) -> bool:
        """:meth:`close` from an event loop, without blocking it."""
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> EmergencyJournal:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> EmergencyJournal:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def pending(self) -> int:
        """Entries recorded but not yet on disk."""
        with self._lock:
            return self._recorded - self._durable

    @property
    def healthy(self) -> bool:
        """False while writes are failing (entries are then held in memory)."""
        return self._failing_since is None

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry on disk: an anchor to keep elsewhere, to detect
        a truncated tail later."""
        with self._lock:
            return self._tail_seq, self._tail_hash

    def files(self) -> list[Path]:
        """The journal's files, oldest first."""
        return journal_files(self.directory)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # ---- recording (any thread, never blocks on the disk, never raises) ----------------

    def record(self, call_id: str, event: str, **fields: Any) -> None:
        """Queues one entry for the writer thread and returns at once."""
        self._enqueue(call_id, event, fields, internal=False)

    def _enqueue(self, call_id: Any, event: Any, fields: dict[str, Any], *, internal: bool) -> None:
        try:
            entry = _Queued(
                0, format_utc(self._now()), _text(call_id), _text(event), _json_value(fields)
            )
            with self._lock:
                # the journal's own entries may still go in while close() drains the queue
                accepted = not self._closed or (internal and self._thread_alive())
                if accepted:
                    self._recorded += 1
                    entry.number = self._recorded
                    self.stats.entries_recorded += 1
                    self._queue.append(entry)
                    self._lock.notify_all()
                else:
                    self.stats.entries_dropped += 1
            if not accepted:
                log.error("emergency_journal.record_after_close", call_id=entry.call_id,
                          journal_event=entry.event)  # fmt: skip
                self._report(JournalClosedError("entry recorded after the journal was closed"))
        except Exception as exc:  # noqa: BLE001 - an emergency call never fails on its audit
            with contextlib.suppress(Exception):
                log.error("emergency_journal.record_failed", error=repr(exc))
                self._report(exc)

    def _now(self) -> float:
        try:
            now = float(self.wall_clock())
        except Exception:  # noqa: BLE001 - a broken injected clock must not lose entries
            return time.time()
        return now if math.isfinite(now) else time.time()

    def _report(self, exc: Exception) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(exc)
        except Exception as callback_error:  # noqa: BLE001 - the alarm must not stop us
            log.error("emergency_journal.on_failure_raised", error=repr(callback_error))

    # ---- waiting --------------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> None:
        """Returns once everything recorded before the call is on disk (written and
        fsync'd). While the disk fails this waits (retries are started at once); give a
        ``timeout`` to get TimeoutError instead. Raises :class:`JournalClosedError` if the
        journal was never opened (nothing would write)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be gone meanwhile
                loop.call_soon_threadsafe(resolve)

        waiter = self._add_waiter(wake)
        if waiter is None:
            return
        try:
            await asyncio.wait_for(done, timeout)
        finally:
            self._remove_waiter(waiter)

    def flush_sync(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for sync code: blocks; returns False on timeout."""
        event = threading.Event()
        waiter = self._add_waiter(event.set)
        if waiter is None:
            return True
        try:
            return event.wait(timeout)
        finally:
            self._remove_waiter(waiter)

    def _add_waiter(self, wake: Callable[[], None]) -> _Waiter | None:
        with self._lock:
            if self._durable >= self._recorded:
                return None
            if not self._opened or (self._closed and not self._thread_alive()):
                raise JournalClosedError("the emergency journal is not open: nothing writes")
            waiter = _Waiter(self._recorded, wake)
            self._waiters.append(waiter)
            self._retry_now = True
            self._lock.notify_all()
            return waiter

    def _remove_waiter(self, waiter: _Waiter) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the writer thread -------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            try:
                self._write_until_stopped()
                return
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the journal
                with contextlib.suppress(Exception):
                    log.error("emergency_journal.writer_error", error=repr(exc))
                    self._report(exc)
                time.sleep(self.first_retry)

    def _write_until_stopped(self) -> None:
        pause = self.first_retry
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if not self._queue:
                    return  # stopping, and everything is written
                batch = list(self._queue)
                self._retry_now = False
            try:
                with self._io_lock:
                    self._write_batch(batch)
            except Exception as exc:  # noqa: BLE001 - kept queued, retried, alarmed
                self._failed(exc)
                deadline = time.monotonic() + pause
                with self._lock:  # new records do not cut the pause short; flush/close do
                    while not self._retry_now and (left := deadline - time.monotonic()) > 0:
                        self._lock.wait(left)
                pause = min(pause * 2, self.longest_retry)
                continue
            pause = self.first_retry
            if self._failing_since is not None:
                self._recovered()

    def _failed(self, exc: Exception) -> None:
        self.stats.write_failures += 1
        self._failed_attempts += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = self._now()
        self._resync = True
        self._close_file()
        with self._lock:
            queued = len(self._queue)
        log.error(
            "emergency_journal.write_failed",
            error=self._last_error,
            queued=queued,
            attempt=self._failed_attempts,
        )
        self._report(exc)

    def _recovered(self) -> None:
        since, attempts, error = self._failing_since, self._failed_attempts, self._last_error
        self._failing_since, self._failed_attempts = None, 0
        log.warning("emergency_journal.recovered", failed_attempts=attempts)
        fields = {
            "error": error,
            "since": format_utc(since) if since is not None else None,
            "failed_attempts": attempts,
        }
        self._enqueue(JOURNAL_CALL_ID, "journal_failure", fields, internal=True)

    def _write_batch(self, batch: list[_Queued]) -> None:
        """Chains, writes and fsyncs ``batch`` (a prefix of the queue), file by file; each
        file's part is acknowledged (popped, chain advanced) once it is on disk."""
        if self._resync:
            self._resynchronise(batch)
            with self._lock:
                batch = list(self._queue)[: len(batch)]
            self._resync = False
        if self._fd is None:
            self._open_for_append()
        seq, prev = self._tail_seq, self._tail_hash
        chunk: list[bytes] = []
        chunk_size = 0
        chunk_tail = (seq, prev)
        for queued in batch:
            seq += 1
            entry: dict[str, Any] = {
                "v": ENTRY_VERSION,
                "seq": seq,
                "time": queued.time,
                "call_id": queued.call_id,
                "event": queued.event,
                "fields": queued.fields,
                "prev": prev,
            }
            try:
                entry["hash"] = prev = entry_hash(entry)
                line = _entry_line(entry)
            except (TypeError, ValueError) as exc:  # never let one entry block the rest
                log.error("emergency_journal.unserialisable", seq=seq, error=str(exc))
                queued.fields = {"unserialisable_fields": _text(queued.fields)}
                entry["fields"] = queued.fields
                entry.pop("hash", None)
                entry["hash"] = prev = entry_hash(entry)
                line = _entry_line(entry)
            held = self._current_size + chunk_size
            if held > 0 and held + len(line) > self.rotate_bytes:
                self._commit(chunk, chunk_tail)
                chunk, chunk_size = [], 0
                self._rotate()
            chunk.append(line)
            chunk_size += len(line)
            chunk_tail = (seq, prev)
        self._commit(chunk, chunk_tail)

    def _commit(self, chunk: list[bytes], tail: tuple[int, str]) -> None:
        if not chunk:
            return
        assert self._fd is not None
        data = b"".join(chunk)
        offset = self._current_size
        try:
            _write_all(self._fd, data)
            if self.fsync:
                _sync_file(self._fd)
                self.stats.fsyncs += 1
        except BaseException:
            # Leave no partial line behind: the entries are written again on retry.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            raise
        self._current_size += len(data)
        self.stats.bytes_written += len(data)
        self.stats.batches_written += 1
        self.stats.entries_written += len(chunk)
        self._acknowledge(len(chunk), tail)

    def _acknowledge(self, count: int, tail: tuple[int, str]) -> None:
        with self._lock:
            for _ in range(count):
                self._queue.popleft()
            self._durable += count
            self._tail_seq, self._tail_hash = tail
            ready = [w for w in self._waiters if w.target <= self._durable and not w.done]
            for waiter in ready:
                waiter.done = True
        for waiter in ready:
            waiter.wake()

    def _resynchronise(self, batch: list[_Queued]) -> None:
        """After a failed write whose truncation may have failed too: cut a partial tail,
        and count entries of the batch that did reach the file as written."""
        files = self.files()
        if not files:
            return
        self._repair_tail(files[-1])
        seq, digest = self._tail_seq, self._tail_hash
        for path in reversed(files):
            lines = _last_lines(path, 1)
            if lines:
                entry = _parse_entry(lines[0])
                if entry is not None:
                    seq, digest = entry["seq"], entry["hash"]
                break
        landed = seq - self._tail_seq
        if 0 < landed <= len(batch):
            log.warning("emergency_journal.resynchronised", entries_on_disk=landed)
            self._acknowledge(landed, (seq, digest))

    def _open_for_append(self) -> None:
        files = self.files()
        if files:
            last = files[-1]
            size = last.stat().st_size
            if size < self.rotate_bytes:
                self._fd = os.open(last, os.O_WRONLY | os.O_APPEND)
                self._current, self._current_size = last, size
                self.stats.files_opened += 1
                return
        self._open_new(files)

    def _rotate(self) -> None:
        self._close_file()
        self._open_new(self.files())

    def _open_new(self, files: list[Path]) -> None:
        number = (_file_number(files[-1]) if files else 0) + 1
        path = self.directory / f"emergency-{number:06d}.jsonl"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        self._current, self._current_size = path, 0
        self.stats.files_opened += 1
        if self.fsync:
            _fsync_directory(self.directory)
        log.info("emergency_journal.file_opened", file=path.name)

    # ---- recovery -----------------------------------------------------------------------

    def _repair_tail(self, path: Path) -> TornTail | None:
        with open(path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            good = _well_formed_length(handle, size)
            if good == size:
                return None
            handle.seek(good)
            torn = handle.read(size - good)
            stamp = int(time.time() * 1000)
            moved_to = _free_name(path.with_name(f"{path.name}.torn-{stamp}"))
            with open(moved_to, "xb") as aside:
                aside.write(torn)
                aside.flush()
                os.fsync(aside.fileno())
            handle.truncate(good)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(path.parent)
        lines = torn.count(b"\n") + (0 if torn.endswith(b"\n") else 1)
        log.warning(
            "emergency_journal.torn_tail_recovered",
            file=path.name,
            torn_lines=lines,
            torn_bytes=len(torn),
            moved_to=moved_to.name,
        )
        return TornTail(path, lines, len(torn), moved_to)

    def _load_tail(self, files: list[Path]) -> list[str]:
        """Finds the chain's last entry (and the one before), checks them, and sets the
        point the chain continues from. Returns the problems seen."""
        tail: list[tuple[Path, dict[str, Any] | None]] = []
        for path in reversed(files):
            for line in reversed(_last_lines(path, 2 - len(tail))):
                tail.append((path, _parse_entry(line)))
            if len(tail) >= 2:
                break
        if not tail:
            self._tail_seq, self._tail_hash = 0, GENESIS_HASH
            return []
        problems: list[str] = []
        last_path, last = tail[0]
        if last is None:  # an empty last file after a damaged one: continue from an entry
            problems.append(f"{last_path.name}: the last line is not a journal entry")
            found = next(filter(None, (_last_entry(path) for path in reversed(files))), None)
            if found is None:
                self._tail_seq, self._tail_hash = 0, GENESIS_HASH
                return problems
            last, tail = found, tail[:1]
        if _entry_problems(last) or entry_hash(last) != last["hash"]:
            problems.append(f"{last_path.name}: last entry (seq {last['seq']}) fails its hash")
        if len(tail) > 1:
            before_path, before = tail[1]
            if before is None:
                problems.append(f"{before_path.name}: the line before the last is not an entry")
            elif before["hash"] != last["prev"] or before["seq"] + 1 != last["seq"]:
                problems.append(
                    f"{last_path.name}: last entry (seq {last['seq']}) does not follow"
                    f" seq {before['seq']}"
                )
        self._tail_seq, self._tail_hash = last["seq"], last["hash"]
        return problems

    # ---- reading ------------------------------------------------------------------------

    def read(
        self,
        *,
        call_id: str | None = None,
        start: float | datetime | date | str | None = None,
        until: float | datetime | date | str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Entries on disk with ``start <= time < until`` and the Call-ID, in order (see
        :func:`read_journal`). Blocking file I/O: from asyncio, run it in a thread."""
        return read_journal(self.directory, call_id=call_id, start=start, until=until)

    def call(self, call_id: str) -> list[dict[str, Any]]:
        """Every entry on disk of one call, in order."""
        return list(self.read(call_id=call_id))

    def verify(self) -> list[str]:
        """Problems of the chain on disk (see :func:`verify`)."""
        return verify(self.directory)

    # ---- retention ----------------------------------------------------------------------

    def prune(self, older_than_days: float, *, timeout: float = 10.0) -> list[Path]:
        """Deletes whole files whose newest entry is older than ``older_than_days`` (by the
        wall clock), oldest first, never the file being written. Records a
        ``journal_pruned`` entry first (and waits until it is on disk) so the chain
        remaining verifies. Returns the deleted files."""
        if not math.isfinite(older_than_days) or older_than_days < 0:
            raise ValueError("older_than_days must be a non-negative number of days")
        if not self._opened or self._closed:
            raise JournalClosedError("open the emergency journal before pruning it")
        cutoff = format_utc(self.wall_clock() - older_than_days * 86400.0)
        with self._io_lock:
            files = self.files()
            doomed: list[Path] = []
            last_entry: dict[str, Any] | None = None
            for path in files[:-1]:
                entry = _last_entry(path)
                if entry is None:
                    stamp = format_utc(path.stat().st_mtime)
                else:
                    stamp = entry.get("time") if isinstance(entry.get("time"), str) else ""
                if stamp >= cutoff:
                    break
                doomed.append(path)
                last_entry = entry or last_entry
        if not doomed:
            return []
        if last_entry is None:
            raise JournalWriteError(f"{doomed[-1].name}: no entry to anchor the chain at")
        self.record(
            JOURNAL_CALL_ID,
            "journal_pruned",
            files=[path.name for path in doomed],
            through_seq=last_entry["seq"],
            last_hash=last_entry["hash"],
            older_than_days=older_than_days,
        )
        if not self.flush_sync(timeout):
            raise JournalWriteError("the journal_pruned entry could not be written: kept all")
        for path in doomed:
            path.unlink(missing_ok=True)
        _fsync_directory(self.directory)
        log.info("emergency_journal.pruned", files=[p.name for p in doomed])
        return doomed


def _last_entry(path: Path) -> dict[str, Any] | None:
    for line in reversed(_last_lines(path, 8)):
        entry = _parse_entry(line)
        if entry is not None:
            return entry
    return None

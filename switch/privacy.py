"""Personal data of a telephone user: export, and erasure by pseudonymisation.

A *person* is named by a SIP device username (the digest user of their phone) or an
E.164 number (a device's DID, or an outside party who called or was called). What the
switch keeps about them:

* the configured device(s) (YAML: extension, DID, display name, site and location);
* live registrations (bindings: contact URI, source address, User-Agent; running switch
  only — with ``store.backend: memory`` they exist only in the switch process);
* the emergency location history (``<emergency.journal_dir>/locations.jsonl``): who set or
  confirmed which location, from which network address;
* call detail records (the CDR ledger): the device, calling number, dialled number;
* the emergency audit journal (EMERGENCY.md EM-70) of their emergency calls.

:func:`export` gathers all of it as one JSON document. :func:`erase` (offline, switch
stopped) and :func:`erase_running` (the admin API, switch running) pseudonymise:

* in CDRs, each of the person's identifiers (extension, username, DID, number, dialled
  forms of it) becomes ``anon-<keyed hash>`` — HMAC-SHA-256 under a secret key kept in
  ``privacy.key`` beside the CDR directory (created 0600 on first use), so the
  same identifier gets the same pseudonym in every record (billing totals, call counts
  and fair-use tallies stay consistent) but cannot be recomputed from a phone number
  without the key. Call-IDs, times, durations, accounts and media figures are kept;
* in the location history, the username (and ``who`` when it was the user) becomes a
  pseudonym and the source IP address is removed.

Files are rewritten atomically (temporary file, fsync, rename, fsync of the directory);
a file without a match is left untouched. A line that is not JSON is kept as it is and
counted in the report.

Not erased, by design: **the emergency audit journal**. It is the legal record of
emergency calls (EM-70: created at classification, never lost, tamper-evident by its hash
chain); rewriting an entry would break the chain that proves the journal was not edited,
and keeping it is a legal obligation that overrides erasure. It is included in the export
and left to its retention period (``emergency.retention_days``). The configured devices
are not removed either: the YAML is the operator's; the report says to remove them there.
The in-memory location state of a running switch is not touched (it comes from the
configuration and the device's next registration).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import phonenumbers
import structlog

from .cdr import CdrLedger, format_utc

if TYPE_CHECKING:
    from .app import Softswitch
    from .settings import Settings

__all__ = [
    "KEY_NAME",
    "Person",
    "PrivacyBusyError",
    "PrivacyError",
    "erase",
    "erase_running",
    "export",
    "export_running",
    "identify",
]

log = structlog.get_logger("switch.privacy")

KEY_NAME = "privacy.key"
KEY_BYTES = 32
PSEUDONYM_PREFIX = "anon-"
LOCATIONS_FILE = "locations.jsonl"
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_SIP_USER = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=-]{1,64}$")
_DIALLED = re.compile(r"^[+0-9*#]{3,32}$")
CDR_FIELDS = ("device", "caller", "callee_dialled", "callee_e164")

T = TypeVar("T")


class PrivacyError(ValueError):
    """A person that cannot be looked up (the message says why)."""


class PrivacyBusyError(PrivacyError):
    """An erasure that cannot be done now: the ledger is in use or the switch stops."""


# --------------------------------------------------------------------------------------
# Who the person is
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Person:
    """A person's identifiers as the switch's records hold them."""

    query: str
    kind: str  # "device" (a configured username), "number" (E.164), "username" (unknown)
    devices: tuple[dict[str, Any], ...] = ()
    usernames: frozenset[str] = frozenset()
    lines: frozenset[tuple[str, str]] = frozenset()  # (account, extension)
    numbers: frozenset[str] = frozenset()  # E.164
    country: str = "FR"
    outside_line_prefix: str | None = None
    _dialled: dict[str, bool] = field(default_factory=dict, compare=False, hash=False)

    def dialled_matches(self, account: str, dialled: str) -> bool:
        """Whether a dialled string reached this person: their extension in the same
        account, or one of their numbers in any written form."""
        if (account, dialled) in self.lines or dialled in self.numbers:
            return True
        if not self.numbers or not _DIALLED.match(dialled):
            return False
        cached = self._dialled.get(dialled)
        if cached is None:
            cached = any(number in self.numbers for number in self._e164_forms(dialled))
            self._dialled[dialled] = cached
        return cached

    def _e164_forms(self, dialled: str) -> Iterator[str]:
        candidates = [dialled]
        prefix = self.outside_line_prefix
        if prefix and dialled.startswith(prefix) and len(dialled) > len(prefix):
            candidates.append(dialled[len(prefix):])
        for text in candidates:
            try:
                parsed = phonenumbers.parse(text, None if text.startswith("+") else self.country)
            except phonenumbers.NumberParseException:
                continue
            yield phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

    def identity(self, account: str, value: str) -> str:
        """What a matched CDR value stands for, so that every written form of it gets
        the same pseudonym: ``account/extension`` for a line, else the E.164 number."""
        if (account, value) in self.lines:
            return f"{account}/{value}"
        if value in self.numbers:
            return value
        return next((n for n in self._e164_forms(value) if n in self.numbers), value)

    def cdr_fields(self, record: dict[str, Any]) -> list[str]:
        """The fields of a stored CDR that identify this person."""
        account = record.get("account")
        account = account if isinstance(account, str) else ""
        found = []
        device = record.get("device")
        if isinstance(device, str) and (account, device) in self.lines:
            found.append("device")
        caller = record.get("caller")
        if isinstance(caller, str) and (caller in self.numbers or (account, caller) in self.lines):
            found.append("caller")
        dialled = record.get("callee_dialled")
        if isinstance(dialled, str) and self.dialled_matches(account, dialled):
            found.append("callee_dialled")
        e164 = record.get("callee_e164")
        if isinstance(e164, str) and e164 in self.numbers:
            found.append("callee_e164")
        return found


def identify(settings: Settings, person: str) -> Person:
    """The person named ``person`` (a device username or an E.164 number). PrivacyError
    when it is neither."""
    text = person.strip() if isinstance(person, str) else ""
    devices: list[dict[str, Any]] = []
    lines: set[tuple[str, str]] = set()
    numbers: set[str] = set()
    usernames: set[str] = set()
    if _E164.match(text):
        kind = "number"
        numbers.add(text)
        matches = [(a, d) for a, d in settings.iter_devices() if d.did == text]
        for trunk in settings.trunks:
            target = trunk.dids.get(text)
            if target:
                account_id, _, extension = target.partition("/")
                matches += [(a, d) for a, d in settings.iter_devices()
                            if a.id == account_id and d.extension == extension]
    elif _SIP_USER.match(text):
        matches = [(a, d) for a, d in settings.iter_devices()
                   if (d.username or d.extension) == text]
        kind = "device" if matches else "username"
        usernames.add(text)
    else:
        raise PrivacyError(f"not a device username or an E.164 number: {person!r}")
    seen = set()
    for account, device in matches:
        username = device.username or device.extension
        if username in seen:
            continue
        seen.add(username)
        usernames.add(username)
        lines.add((account.id, device.extension))
        if device.did:
            numbers.add(device.did)
        for trunk in settings.trunks:
            numbers.update(number for number, target in trunk.dids.items()
                           if target == f"{account.id}/{device.extension}")
        devices.append({
            "username": username, "account": account.id, "extension": device.extension,
            "did": device.did, "display_name": device.display_name,
            "kind": str(device.kind), "site": device.site, "location": device.location,
            "mobility": device.mobility,
        })
    return Person(text, kind, tuple(devices), frozenset(usernames), frozenset(lines),
                  frozenset(numbers), settings.dialplan.country,
                  settings.dialplan.outside_line_prefix)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _state_directory(settings: Settings) -> Path:
    return Path(settings.cdr.directory).parent


def _locations_path(settings: Settings) -> Path:
    return Path(settings.emergency.journal_dir) / LOCATIONS_FILE


def _json_lines(path: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each complete line of a file with its JSON object (None: not an object). A last
    line without its newline (a write in progress) is left out."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    for line in raw.split(b"\n")[:-1]:
        try:
            data = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            data = None
        yield line, data if isinstance(data, dict) else None


def _cdr_files(settings: Settings) -> list[Path]:
    return CdrLedger(Path(settings.cdr.directory)).files()


def _location_entry_matches(entry: dict[str, Any], person: Person) -> bool:
    return entry.get("username") in person.usernames or entry.get("who") in person.usernames


def _emergency_entries(settings: Settings, person: Person) -> list[dict[str, Any]]:
    """The audit journal entries of the person's emergency calls (and callbacks)."""
    from e911.audit import read_journal

    directory = Path(settings.emergency.journal_dir)
    if not directory.is_dir() or not (person.usernames or person.numbers):
        return []
    calls: set[str] = set()
    entries = list(read_journal(directory))
    for entry in entries:
        fields = entry.get("fields") if isinstance(entry.get("fields"), dict) else {}
        if entry.get("event") == "classified":
            line = (fields.get("account"), fields.get("extension"))
            if fields.get("device") in person.usernames or line in person.lines:
                calls.add(str(entry.get("call_id")))
        elif entry.get("event") == "callback" and (
                fields.get("device") in person.usernames or fields.get("number") in person.numbers):
            calls.add(str(entry.get("call_id")))
    return [entry for entry in entries if entry.get("call_id") in calls]


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export(settings: Settings, person: str, *,
           registrations: list[dict[str, Any]] | None = None,
           now: float | None = None) -> dict[str, Any]:
    """Everything the switch holds about ``person`` as one JSON-ready document.
    ``registrations``: the live bindings (from a running switch); None offline."""
    who = identify(settings, person)
    notes: list[str] = []
    if who.kind == "username":
        notes.append(f"{who.query!r} is not a configured device: its CDRs (which name"
                     " extensions) cannot be told apart; location and emergency records"
                     " are matched by username")
    if registrations is None:
        notes.append("registrations are known only to the running switch (GET"
                     " /api/v1/privacy/{person} on the admin API)")
    cdrs = []
    unreadable = 0
    for path in _cdr_files(settings):
        for _, record in _json_lines(path):
            if record is None:
                unreadable += 1
            elif who.cdr_fields(record):
                cdrs.append(record)
    if unreadable:
        notes.append(f"{unreadable} CDR lines are not JSON and were not examined")
    history = [entry for _, entry in _json_lines(_locations_path(settings))
               if entry is not None and _location_entry_matches(entry, who)]
    emergency = _emergency_entries(settings, who)
    return {
        "person": who.query,
        "kind": who.kind,
        "generated": format_utc(time.time() if now is None else now),
        "identifiers": {"usernames": sorted(who.usernames), "numbers": sorted(who.numbers),
                        "lines": [f"{a}/{e}" for a, e in sorted(who.lines)]},
        "devices": list(who.devices),
        "registrations": registrations,
        "location_history": history,
        "cdrs": cdrs,
        "emergency_calls": emergency,
        "notes": notes,
    }


async def export_running(switch: Softswitch, person: str) -> dict[str, Any]:
    """:func:`export` with the live registrations of a running switch."""
    who = identify(switch.settings, person)  # PrivacyError before any work
    now = time.time()
    registrations: list[dict[str, Any]] = []
    for username in sorted(who.usernames):
        if switch.directory.device(username) is None:
            continue
        for binding in await switch.store.lookup(switch.directory.aor(username), now):
            flow = binding.flow
            registrations.append({
                "username": username, "aor": binding.aor, "contact": binding.contact,
                "source": f"{flow.transport}:{flow.remote_host}:{flow.remote_port}",
                "user_agent": binding.user_agent,
                "expires_at": format_utc(binding.expires_at),
            })
    return await asyncio.to_thread(export, switch.settings, person,
                                   registrations=registrations, now=now)


# --------------------------------------------------------------------------------------
# Erasure
# --------------------------------------------------------------------------------------


def load_key(directory: Path, *, create: bool = True) -> bytes:
    """The pseudonymisation key of ``directory`` (``privacy.key``), made on first use."""
    path = Path(directory) / KEY_NAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise PrivacyError(f"{path}: no pseudonymisation key") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made meanwhile by another erasure
            return load_key(directory, create=False)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(path.parent)
        return key
    if len(key) < 16:
        raise PrivacyError(f"{path}: the key is too short ({len(key)} bytes)")
    return key


class Pseudonyms:
    """``anon-<20 hex>``: HMAC-SHA-256 of an identifier under the key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def of(self, value: str) -> str:
        if value.startswith(PSEUDONYM_PREFIX):
            return value  # already erased
        digest = hmac.new(self.key, value.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:20]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes, expected: os.stat_result | None = None) -> bool:
    """Write ``data`` to ``path`` atomically, keeping its mode. With ``expected``, give up
    (False) when the file changed since that stat was taken."""
    mode = 0o640
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.erase")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if expected is not None:
            now = path.stat()
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (
                    expected.st_ino, expected.st_size, expected.st_mtime_ns):
                os.unlink(temporary)
                return False
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)
    return True


def _cdr_line(record: dict[str, Any]) -> bytes:
    """A rewritten CDR line, in the ledger's own form (compact, ASCII, field order kept)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class _FileOutcome:
    records: int = 0
    fields: int = 0
    unreadable: int = 0
    rewritten: bool = False


def _rewrite_cdr_file(path: Path, who: Person, names: Pseudonyms, dry_run: bool
                      ) -> _FileOutcome:
    outcome = _FileOutcome()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return outcome
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" after the last newline, or a line being written
    out: list[bytes] = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            outcome.unreadable += 1
            out.append(line)
            continue
        found = who.cdr_fields(record)
        if not found:
            out.append(line)
            continue
        account = str(record.get("account", ""))
        for name in found:
            record[name] = names.of(who.identity(account, str(record[name])))
        outcome.records += 1
        outcome.fields += len(found)
        out.append(_cdr_line(record))
    if outcome.records and not dry_run:
        _replace_file(path, b"\n".join([*out, tail]))
        outcome.rewritten = True
    return outcome


def _erase_cdrs(files: list[Path], who: Person, names: Pseudonyms, dry_run: bool,
                totals: dict[str, Any]) -> None:
    for path in files:
        outcome = _rewrite_cdr_file(path, who, names, dry_run)
        totals["records"] += outcome.records
        totals["fields"] += outcome.fields
        totals["unreadable_lines"] += outcome.unreadable
        if outcome.records:
            totals["files"].append(path.name)


def _erase_locations(path: Path, who: Person, names: Pseudonyms, dry_run: bool
                     ) -> dict[str, Any]:
    result: dict[str, Any] = {"file": str(path), "entries": 0}
    for _ in range(5):  # the switch may append meanwhile: then read again
        try:
            before = path.stat()
            raw = path.read_bytes()
        except FileNotFoundError:
            return result
        lines = raw.split(b"\n")
        tail = lines.pop()
        out, changed = [], 0
        for line in lines:
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                entry = None
            if not isinstance(entry, dict) or not _location_entry_matches(entry, who):
                out.append(line)
                continue
            for name in ("username", "who"):
                if entry.get(name) in who.usernames:
                    entry[name] = names.of(f"user:{entry[name]}")
            if entry.get("source_ip") is not None:
                entry["source_ip"] = None
            changed += 1
            out.append(json.dumps(entry, ensure_ascii=False, sort_keys=True).encode())
        result["entries"] = changed
        if not changed or dry_run:
            return result
        if _replace_file(path, b"\n".join([*out, tail]), expected=before):
            return result
    raise PrivacyBusyError(f"{path}: the location journal kept changing; try again")


def _new_report(settings: Settings, who: Person, dry_run: bool) -> dict[str, Any]:
    notes = []
    if who.devices:
        notes.append("the configured device entries stay in the YAML configuration: remove"
                      " them there (and reload) when the person has left")
    if who.kind == "username":
        notes.append(f"{who.query!r} is not a configured device: CDRs (which name"
                     " extensions) were not matched")
    return {
        "person": who.query,
        "kind": who.kind,
        "dry_run": dry_run,
        "devices": list(who.devices),
        "cdr": {"directory": str(settings.cdr.directory), "files": [], "records": 0,
                "fields": 0, "unreadable_lines": 0},
        "location_history": {},
        "emergency_journal": {
            "erased": False, "entries_kept": 0,
            "reason": "the emergency audit journal is the legal, hash-chained record of"
                      " emergency calls (EM-70): it is kept unchanged until its retention"
                      " period ends",
        },
        "notes": notes,
    }


def _finish(report: dict[str, Any], settings: Settings, who: Person) -> dict[str, Any]:
    report["emergency_journal"]["entries_kept"] = len(_emergency_entries(settings, who))
    if not report["dry_run"]:
        log.warning("privacy.erased", person_kind=who.kind, cdr_records=report["cdr"]["records"],
                    location_entries=report["location_history"].get("entries", 0))
    return report


def erase(settings: Settings, person: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Pseudonymise ``person`` in the CDR ledger and the location history of a switch
    that is not running (its CDR ledger lock must be free: PrivacyError otherwise).
    Returns what was changed (or would be, with ``dry_run``)."""
    who = identify(settings, person)
    directory = Path(settings.cdr.directory)
    report = _new_report(settings, who, dry_run)
    lock_fd = None
    if directory.is_dir():
        lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise PrivacyBusyError(
                f"{directory}: a running switch writes this CDR ledger: erase through its"
                " admin API (POST /api/v1/privacy/{person}/erase) or stop it first") from None
    try:
        names = Pseudonyms(b"" if dry_run else load_key(_state_directory(settings)))
        _erase_cdrs(_cdr_files(settings), who, names, dry_run, report["cdr"])
        report["location_history"] = _erase_locations(_locations_path(settings), who, names,
                                                       dry_run)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return _finish(report, settings, who)


async def _with_ledger_paused(ledger: CdrLedger, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread while the running ledger appends nothing: records that
    calls append meanwhile wait (the ledger's group commit) and are written afterwards,
    to a freshly opened file (the rewritten one, or a newer one)."""
    if getattr(ledger, "_closed", False):
        raise PrivacyBusyError("the CDR ledger is closing (the switch is stopping)")
    while ledger._flusher is not None and not ledger._flusher.done():
        await asyncio.shield(ledger._flusher)
    # No await from here to the task's creation: no append can start a flusher meanwhile.
    if ledger._fd is not None:
        os.close(ledger._fd)
        ledger._fd = None

    async def paused() -> T:
        try:
            return await asyncio.to_thread(work)
        finally:
            await ledger._flush_pending()

    task = asyncio.get_running_loop().create_task(paused(), name="cdr-privacy-erase")
    ledger._flusher = task  # type: ignore[assignment]
    return await asyncio.shield(task)


async def erase_running(switch: Softswitch, person: str) -> dict[str, Any]:
    """:func:`erase` for a running switch (the admin API): the ledger's files that are no
    longer appended to are rewritten first, then the one it appends to while appends
    wait."""
    settings = switch.settings
    who = identify(settings, person)
    report = _new_report(settings, who, False)
    names = Pseudonyms(await asyncio.to_thread(load_key, _state_directory(settings)))
    ledger = switch.ledger
    files = await asyncio.to_thread(ledger.files)
    older, done = files[:-1], set(files[:-1])
    await asyncio.to_thread(_erase_cdrs, older, who, names, False, report["cdr"])

    def newest() -> None:
        rest = [path for path in ledger.files() if path not in done]
        _erase_cdrs(rest, who, names, False, report["cdr"])

    await _with_ledger_paused(ledger, newest)
    report["location_history"] = await asyncio.to_thread(
        _erase_locations, _locations_path(settings), who, names, False)
    return await asyncio.to_thread(_finish, report, settings, who)

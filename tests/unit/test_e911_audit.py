"""The emergency audit journal (EMERGENCY.md EM-70): entries are written ahead by a writer
thread without ever blocking the caller, survive a failing disk while the process lives,
are recovered after a torn write, and form a hash chain that reveals edits and deletions."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from e911 import audit
from e911.audit import (
    GENESIS_HASH,
    EmergencyJournal,
    JournalClosedError,
    JournalLockedError,
    entry_hash,
    field_bytes,
    read_journal,
    verify,
)
from switch.cli import main

PIDF = (
    b'<?xml version="1.0" encoding="UTF-8"?>\r\n<presence xmlns="urn:ietf:params:xml:ns:pidf"'
    b' entity="pres:+13125550100@example.com"><!-- caf\xc3\xa9 --></presence>\r\n'
)
NOT_UTF8 = b"\xff\xfe\x00binary\x80"


class Clock:
    """An injected wall clock."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FailingDisk:
    """Replaces the journal's write helper: fails with ENOSPC while ``failing`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = True
        self.attempts = 0
        self._real = audit._write_all
        monkeypatch.setattr(audit, "_write_all", self)

    def __call__(self, fd: int, data: bytes) -> None:
        self.attempts += 1
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._real(fd, data)


def journal_lines(directory: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in audit.journal_files(directory):
        lines.extend(path.read_bytes().splitlines())
    return lines


def wait_until(condition: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# ---- writing and reading -------------------------------------------------------------


async def test_entries_are_written_and_read_back(tmp_path: Path) -> None:
    clock = Clock()
    journal = EmergencyJournal(tmp_path / "journal", wall_clock=clock)
    report = journal.open()
    assert report.clean and report.last_seq == 0 and report.last_hash == GENESIS_HASH
    journal.record("call-1", "classified", dialled="911", number_class="emergency")
    clock.now += 0.5
    journal.record(
        "call-1",
        "invite_sent",
        request_uri="urn:service:sos",
        headers=[("P-Asserted-Identity", "<sip:+13125550100@example.com;user=phone>")],
        pidf=PIDF,
    )
    journal.record("call-2", "classified", dialled="933", number_class="test")
    clock.now += 1.0
    journal.record("call-1", "response", route="etrunk-1", status=503)
    await journal.flush()
    assert journal.pending == 0
    journal.close()

    entries = list(read_journal(tmp_path / "journal"))
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert [e["event"] for e in entries] == ["classified", "invite_sent", "classified", "response"]
    first, invite = entries[0], entries[1]
    assert first["time"] == "2026-09-21T14:13:20.000Z"
    assert first["fields"] == {"dialled": "911", "number_class": "emergency"}
    assert first["prev"] == GENESIS_HASH and first["hash"] == entry_hash(first)
    assert invite["prev"] == first["hash"]
    assert invite["fields"]["headers"] == [
        ["P-Asserted-Identity", "<sip:+13125550100@example.com;user=phone>"]
    ]
    assert field_bytes(invite["fields"]["pidf"]) == PIDF  # byte-identical (EM-70 (3))

    reader = EmergencyJournal(tmp_path / "journal")  # not opened: readers take no lock
    assert [e["event"] for e in reader.call("call-1")] == ["classified", "invite_sent", "response"]
    assert [e["seq"] for e in reader.read(start="2026-09-21T14:13:20.400Z")] == [2, 3, 4]
    assert [e["seq"] for e in reader.read(until=clock.now)] == [1, 2, 3]
    assert [e["seq"] for e in reader.read(call_id="call-2", start=clock.now - 1.0)] == [3]
    assert reader.verify() == []


def test_bytes_that_are_not_utf8_are_stored_as_base64(tmp_path: Path) -> None:
    with EmergencyJournal(tmp_path) as journal:
        journal.record("c", "test_result", body=NOT_UTF8, text=b"PSAP test OK\r\n")
        assert journal.flush_sync(2.0)
    (entry,) = read_journal(tmp_path)
    assert entry["fields"]["body"] == {"$base64": "//4AYmluYXJ5gA=="}
    assert field_bytes(entry["fields"]["body"]) == NOT_UTF8
    assert entry["fields"]["text"] == "PSAP test OK\r\n"
    with pytest.raises(ValueError, match="not a recorded byte string"):
        field_bytes(12)
    with pytest.raises(ValueError, match="not valid base64"):
        field_bytes({"$base64": "***"})


def test_record_never_raises_and_makes_odd_values_json(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    failures: list[Exception] = []
    journal = EmergencyJournal(tmp_path, on_failure=failures.append)
    journal.open()
    journal.record(
        "c",
        "location",
        nan=float("nan"),
        things={3, 1, 2},
        pair=(1, "a"),
        nested={1: {"deep": [b"\xc3\xa9"]}},
        odd=Unprintable(),
        path=Path("/x"),
    )
    assert journal.flush_sync(2.0)
    assert journal.close()
    journal.record("c", "ended")  # after close: reported, never raised
    assert len(failures) == 1 and isinstance(failures[0], JournalClosedError)
    assert journal.stats.entries_dropped == 1
    (entry,) = read_journal(tmp_path)
    assert entry["fields"] == {
        "nan": "nan",
        "things": [1, 2, 3],
        "pair": [1, "a"],
        "nested": {"1": {"deep": ["é"]}},
        "odd": "<unprintable Unprintable>",
        "path": "/x",
    }
    assert verify(tmp_path) == []


def test_an_entry_that_cannot_be_serialised_does_not_block_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_clock() -> float:
        raise RuntimeError("clock")

    monkeypatch.setattr(audit, "_json_value", lambda value, depth=0: value)  # no cleaning
    with EmergencyJournal(tmp_path, wall_clock=broken_clock) as journal:
        journal.record("c", "location", thing=object())
        journal.record("c", "ended", cause="normal")
        assert journal.flush_sync(2.0)
    first, second = read_journal(tmp_path)
    assert first["fields"]["unserialisable_fields"].startswith("{'thing': <object object")
    assert second["fields"] == {"cause": "normal"}
    assert abs(audit.parse_time(second["time"]) - time.time()) < 60  # the real clock stood in
    assert verify(tmp_path) == []


def test_rotation_by_size_keeps_one_chain_across_files(tmp_path: Path) -> None:
    with EmergencyJournal(tmp_path, rotate_bytes=2048) as journal:
        for number in range(60):
            journal.record(f"call-{number % 4}", "notification", recipient="desk", n=number)
        assert journal.flush_sync(5.0)
    files = audit.journal_files(tmp_path)
    assert len(files) >= 3
    assert all(path.stat().st_size <= 2048 for path in files)
    entries = list(read_journal(tmp_path))
    assert [e["fields"]["n"] for e in entries] == list(range(60))
    for earlier, later in zip(files, files[1:], strict=False):
        last = json.loads(earlier.read_bytes().splitlines()[-1])
        first = json.loads(later.read_bytes().splitlines()[0])
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    assert verify(tmp_path) == []


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    for round_number in range(3):
        with EmergencyJournal(tmp_path) as journal:
            journal.record("c", "callback", number="+13125550100", round=round_number)
            assert journal.flush_sync(2.0)
            seq, digest = journal.head()
        assert seq == round_number + 1
    assert [e["seq"] for e in read_journal(tmp_path)] == [1, 2, 3]
    assert list(read_journal(tmp_path))[-1]["hash"] == digest
    assert verify(tmp_path) == []


def test_a_second_writer_is_locked_out(tmp_path: Path) -> None:
    with EmergencyJournal(tmp_path):
        with pytest.raises(JournalLockedError, match="another process"):
            EmergencyJournal(tmp_path).open()
    EmergencyJournal(tmp_path).open()  # released by close


# ---- tamper evidence -----------------------------------------------------------------


def write_calls(directory: Path, count: int = 5) -> Path:
    with EmergencyJournal(directory) as journal:
        for number in range(count):
            journal.record(f"call-{number}", "classified", dialled="911")
        assert journal.flush_sync(2.0)
    (path,) = audit.journal_files(directory)
    return path


def test_verify_detects_an_edited_line(tmp_path: Path) -> None:
    path = write_calls(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"dialled":"911"', b'"dialled":"912"')
    path.write_bytes(b"".join(lines))
    problems = verify(tmp_path)
    assert problems == [f"{path.name}:3: seq 3: hash mismatch (entry altered)"]


def test_verify_detects_an_edit_with_a_recomputed_hash(tmp_path: Path) -> None:
    path = write_calls(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["fields"]["dialled"] = "0"
    entry["hash"] = entry_hash(entry)
    lines[1] = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert verify(tmp_path) == [
        f"{path.name}:3: seq 3: prev does not match the hash of seq 2 (chain broken)"
    ]


def test_verify_detects_a_deleted_line(tmp_path: Path) -> None:
    path = write_calls(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[2]
    path.write_bytes(b"".join(lines))
    problems = verify(tmp_path)
    assert len(problems) == 2
    assert "seq 4 follows seq 2" in problems[0]
    assert "prev does not match the hash of seq 2" in problems[1]


def test_verify_detects_a_deleted_first_line_and_garbage(tmp_path: Path) -> None:
    path = write_calls(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[1:3]) + b"not json\n" + b"".join(lines[3:]))
    problems = verify(tmp_path)
    assert f"{path.name}:3: not a journal entry" in problems
    assert any("starts at seq 2" in problem for problem in problems)
    assert verify(tmp_path / "absent") == [f"{tmp_path / 'absent'}: no such journal directory"]


def test_open_reports_a_tampered_last_entry(tmp_path: Path) -> None:
    path = write_calls(tmp_path)
    data = path.read_bytes().replace(b'"call_id":"call-4"', b'"call_id":"call-9"')
    path.write_bytes(data)
    journal = EmergencyJournal(tmp_path)
    report = journal.open()
    journal.close()
    assert report.problems == (f"{path.name}: last entry (seq 5) fails its hash",)
    assert report.last_seq == 5 and report.torn is None


# ---- crash recovery ------------------------------------------------------------------


def test_a_torn_tail_is_moved_aside_and_cut(tmp_path: Path) -> None:
    path = write_calls(tmp_path, 3)
    intact = path.read_bytes()
    torn = b'{"v":1,"seq":4,"time":"2026-'
    path.write_bytes(intact + torn)
    assert len(list(read_journal(tmp_path))) == 3  # readers skip the partial line
    assert verify(tmp_path) == []

    journal = EmergencyJournal(tmp_path)
    report = journal.open()
    assert report.torn is not None
    assert (report.torn.lines, report.torn.size) == (1, len(torn))
    assert report.torn.moved_to.read_bytes() == torn
    assert path.read_bytes() == intact
    assert report.last_seq == 3 and not report.problems
    journal.record("call-3", "classified", dialled="112")
    assert journal.flush_sync(2.0)
    journal.close()
    assert [e["seq"] for e in read_journal(tmp_path)] == [1, 2, 3, 4]
    assert verify(tmp_path) == []


def test_an_empty_file_after_rotation_continues_from_the_previous_file(tmp_path: Path) -> None:
    path = write_calls(tmp_path, 2)
    (tmp_path / "emergency-000002.jsonl").write_bytes(b'{"v":1,"se')  # killed mid-first-line
    with EmergencyJournal(tmp_path) as journal:
        assert journal.head()[0] == 2
        journal.record("c", "ended")
        assert journal.flush_sync(2.0)
    assert (tmp_path / "emergency-000002.jsonl").read_bytes().count(b"\n") == 1
    assert path.read_bytes().count(b"\n") == 2
    assert verify(tmp_path) == []


# ---- never blocking, never losing --------------------------------------------------


async def test_record_returns_while_fsync_is_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    synced_on: list[threading.Thread] = []
    real_sync = audit._sync_file

    def blocking_sync(fd: int) -> None:
        synced_on.append(threading.current_thread())
        assert release.wait(5.0)
        real_sync(fd)

    monkeypatch.setattr(audit, "_sync_file", blocking_sync)
    journal = EmergencyJournal(tmp_path)
    journal.open()
    journal.record("call-1", "classified", dialled="911")
    wait_until(lambda: synced_on)  # the writer is now stuck in fsync
    started = time.perf_counter()
    for number in range(100):
        journal.record("call-1", "invite_sent", attempt=number)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert synced_on[0] is not threading.current_thread()
    assert journal.pending == 101
    release.set()
    await journal.flush(timeout=5.0)
    journal.close()
    assert len(list(read_journal(tmp_path))) == 101
    # group commit: the 100 entries queued behind the blocked fsync went in one batch
    assert journal.stats.fsyncs == 2


async def test_a_failing_disk_raises_the_alarm_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[Exception] = []
    journal = EmergencyJournal(
        tmp_path, on_failure=failures.append, first_retry=0.01, longest_retry=0.02
    )
    journal.open()
    disk = FailingDisk(monkeypatch)
    journal.record("call-1", "classified", dialled="911")
    journal.record("call-1", "invite_sent", trunk="etrunk-1")
    wait_until(lambda: len(failures) >= 2)  # retried, alarmed each time
    assert all(isinstance(exc, OSError) and exc.errno == errno.ENOSPC for exc in failures)
    assert not journal.healthy and journal.pending == 2
    assert list(read_journal(tmp_path)) == []
    with pytest.raises(TimeoutError):
        await journal.flush(timeout=0.05)

    disk.failing = False
    await journal.flush(timeout=5.0)
    journal.close()
    entries = list(read_journal(tmp_path))
    assert [e["event"] for e in entries] == ["classified", "invite_sent", "journal_failure"]
    outage = entries[2]["fields"]
    assert outage["failed_attempts"] >= 2 and "No space left" in outage["error"]
    assert journal.healthy
    assert verify(tmp_path) == []


def test_a_half_written_batch_is_not_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way, and a truncation that fails too: the retry cuts the
    partial line off and writes the batch once."""
    failures: list[Exception] = []
    journal = EmergencyJournal(tmp_path, on_failure=failures.append, first_retry=0.01)
    journal.open()
    journal.record("call-0", "classified")
    assert journal.flush_sync(2.0)
    calls = {"n": 0}
    real_write = audit._write_all

    def half_write(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            os.write(fd, data[: len(data) // 2 + 10])
            raise OSError(errno.EIO, "I/O error")
        real_write(fd, data)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(audit, "_write_all", half_write)
    monkeypatch.setattr(audit.os, "ftruncate", no_truncate)
    for number in range(1, 4):
        journal.record(f"call-{number}", "classified")
    assert journal.flush_sync(5.0)
    monkeypatch.undo()
    journal.close()
    assert len(failures) == 1
    expected = [f"call-{n}" for n in range(4)] + ["-"]  # then the journal_failure entry
    assert [e["call_id"] for e in read_journal(tmp_path)] == expected
    assert len(list(tmp_path.glob("*.torn-*"))) == 1
    assert verify(tmp_path) == []


def test_entries_that_reached_the_file_before_fsync_failed_are_kept_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = EmergencyJournal(tmp_path, on_failure=lambda exc: None, first_retry=0.01)
    journal.open()
    calls = {"n": 0}
    real_sync = audit._sync_file

    def failing_sync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "I/O error")
        real_sync(fd)

    monkeypatch.setattr(audit, "_sync_file", failing_sync)
    monkeypatch.setattr(audit.os, "ftruncate", lambda fd, length: (_ for _ in ()).throw(OSError()))
    journal.record("call-1", "classified")
    journal.record("call-1", "invite_sent")
    assert journal.flush_sync(5.0)
    monkeypatch.undo()
    journal.close()
    events = [e["event"] for e in read_journal(tmp_path)]
    assert events == ["classified", "invite_sent", "journal_failure"]
    assert verify(tmp_path) == []


def test_sync_code_without_an_event_loop(tmp_path: Path) -> None:
    journal = EmergencyJournal(tmp_path, fsync=False)
    journal.record("call-1", "classified")  # before open: held until the writer starts
    journal.open()
    journal.record("call-1", "answered")
    assert journal.flush_sync(2.0)
    assert journal.close()
    assert [e["event"] for e in journal.call("call-1")] == ["classified", "answered"]
    with pytest.raises(JournalClosedError):
        journal.open()


async def test_flush_on_a_journal_never_opened_is_an_error(tmp_path: Path) -> None:
    journal = EmergencyJournal(tmp_path)
    await journal.flush()  # nothing recorded: nothing to wait for
    journal.record("c", "classified")
    with pytest.raises(JournalClosedError, match="not open"):
        await journal.flush()


# ---- retention -----------------------------------------------------------------------


def test_prune_deletes_old_files_and_the_rest_still_verifies(tmp_path: Path) -> None:
    clock = Clock()
    journal = EmergencyJournal(tmp_path, wall_clock=clock, rotate_bytes=1024)
    journal.open()
    for number in range(40):
        journal.record(f"call-{number}", "classified", dialled="911", pad="x" * 40)
        assert journal.flush_sync(2.0)
        clock.now += 86400.0  # one call a day
    files = journal.files()
    assert len(files) >= 5
    with pytest.raises(ValueError, match="non-negative"):
        journal.prune(-1)

    cutoff = audit.format_utc(clock.now - 20 * 86400.0)
    newest = [json.loads(path.read_bytes().splitlines()[-1])["time"] for path in files]
    old = 0
    while old < len(files) - 1 and newest[old] < cutoff:
        old += 1
    assert 0 < old < len(files) - 1

    deleted = journal.prune(20)
    assert deleted == files[:old]
    assert not any(path.exists() for path in deleted)
    kept = list(read_journal(tmp_path))
    recent = [e for e in kept if e["event"] == "classified" and e["time"] >= cutoff]
    assert len(recent) == 20  # the calls of the last 20 days are all kept
    pruned = kept[-1]
    assert pruned["event"] == "journal_pruned" and pruned["call_id"] == "-"
    assert pruned["fields"]["through_seq"] == kept[0]["seq"] - 1
    assert pruned["fields"]["last_hash"] == kept[0]["prev"]
    assert verify(tmp_path) == []
    assert journal.prune(20) == []
    journal.close()
    with pytest.raises(JournalClosedError):
        journal.prune(20)

    # deleting the oldest remaining file by hand is not explained by any journal_pruned entry
    audit.journal_files(tmp_path)[0].unlink()
    assert any("no journal_pruned entry" in problem for problem in verify(tmp_path))


# ---- command line --------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "switch.yaml"
    config.write_text("switch:\n  domains: [127.0.0.1]\nemergency:\n  journal_dir: journal\n")
    return config


def test_cli_export_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    clock = Clock()
    with EmergencyJournal(tmp_path / "journal", wall_clock=clock) as journal:
        journal.record("call-1", "classified", pidf=PIDF)
        clock.now += 3600.0
        journal.record("call-2", "classified")
        journal.record("call-1", "ended", cause="normal")
        assert journal.flush_sync(2.0)
    stored = journal_lines(tmp_path / "journal")

    out = tmp_path / "export.jsonl"
    assert main(["emergency", "export", "--config", str(config), "--call-id", "call-1",
                 "-o", str(out)]) == 0  # fmt: skip
    assert out.read_bytes().splitlines() == [stored[0], stored[2]]  # exactly as stored
    capsys.readouterr()
    until = "2026-09-21T14:30:00Z"
    assert main(["emergency", "export", "--config", str(config), "--until", until]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [stored[0].decode()]
    assert "1 entries" in printed.err

    assert main(["emergency", "verify", "--config", str(config)]) == 0
    assert "chain intact" in capsys.readouterr().err

    (path,) = audit.journal_files(tmp_path / "journal")
    path.write_bytes(path.read_bytes().replace(b'"cause":"normal"', b'"cause":"busy"'))
    assert main(["emergency", "verify", "--config", str(config)]) == 1
    printed = capsys.readouterr()
    assert printed.out == f"{path.name}:3: seq 3: hash mismatch (entry altered)\n"


def test_cli_without_a_journal_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["emergency", "verify", "--config", str(config)]) == 1
    assert "no such journal directory" in capsys.readouterr().out
    assert main(["emergency", "export", "--config", str(config)]) == 1
    assert "no emergency journal directory" in capsys.readouterr().err
    assert main(["emergency", "verify", "--config", str(tmp_path / "missing.yaml")]) == 2

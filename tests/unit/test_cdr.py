"""The CDR ledger: billing rounding, durable appends with group commit, rotation by size
and by UTC day, torn-tail recovery, reading by time range, CSV export and the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from switch.cdr import (
    CSV_COLUMNS,
    BillingPolicy,
    CallRecord,
    CdrFormatError,
    CdrLedger,
    CdrWriteError,
    LedgerClosedError,
    LedgerLockedError,
    billable_seconds,
    format_utc,
    ledger_from_settings,
)
from switch.settings import load_settings_text

REPO = Path(__file__).resolve().parents[2]


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class FakeClock:
    """Wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_record(
    call_id: str = "c1@test",
    *,
    start: float | None = None,
    talk: float | None = 42.0,
    ring: float = 3.0,
    **overrides: object,
) -> CallRecord:
    start = utc("2026-11-05T10:00:00") if start is None else start
    answer = None if talk is None else start + ring
    end = start + ring + (talk or 0.0)
    fields: dict[str, object] = {
        "call_id": call_id,
        "account": "acme",
        "device": "1000",
        "caller": "+33123456790",
        "callee_dialled": "0612345678",
        "callee_e164": "+33612345678",
        "classification": "external",
        "trunk": "provider-a",
        "start": start,
        "answer": answer,
        "end": end,
        "end_cause": "normal" if talk is not None else "no_answer",
        "hangup_by": "caller",
        "sip_status": 200 if talk is not None else 480,
        "media": {
            "caller_to_callee": {"packets": 2100, "bytes": 361200, "lost": 3, "jitter_ms": 1.5},
            "callee_to_caller": {"packets": 2098, "bytes": 360856, "lost": 0, "jitter_ms": 0.75},
        }
        if talk is not None
        else {},
        "node": "node-1",
    }
    fields.update(overrides)
    return CallRecord.for_call(**fields)  # type: ignore[arg-type]


def ledger_lines(directory: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted(directory.glob("cdr-*.jsonl")):
        lines.extend(path.read_text().splitlines())
    return lines


# ---- billing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "expected"),
    [(0, 0), (1, 18), (17, 18), (18, 18), (19, 24), (24, 24), (25, 30), (61, 66)],
)
def test_billable_seconds_default_six_second_increments_eighteen_minimum(
    duration: float, expected: int
) -> None:
    assert billable_seconds(duration) == expected


def test_unanswered_call_bills_nothing() -> None:
    assert billable_seconds(None) == 0


def test_billing_is_exact_at_millisecond_boundaries() -> None:
    assert billable_seconds(18.0004) == 18  # float noise below the millisecond
    assert billable_seconds(18.001) == 24
    assert billable_seconds(0.2) == 18


@pytest.mark.parametrize(
    ("duration", "increment", "minimum", "expected"),
    [(1, 1, 0, 1), (59, 60, 60, 60), (61, 60, 60, 120), (61, 60, 0, 120), (5, 1, 30, 30)],
)
def test_billing_increment_and_minimum_are_configurable(
    duration: float, increment: int, minimum: int, expected: int
) -> None:
    assert billable_seconds(duration, increment, minimum) == expected
    assert BillingPolicy(increment, minimum).billable(duration) == expected


def test_billing_refuses_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        billable_seconds(10, increment=0)
    with pytest.raises(ValueError):
        BillingPolicy(increment=6, minimum=-1)


def test_record_for_call_computes_duration_from_answer_and_billable() -> None:
    record = make_record(talk=19.0, ring=4.0)
    assert record.duration == pytest.approx(19.0)
    assert record.billable == 24
    assert record.end - record.start == pytest.approx(23.0)
    unanswered = make_record(talk=None)
    assert unanswered.answer is None and unanswered.duration == 0.0 and unanswered.billable == 0
    per_minute = make_record(talk=61.0, billing=BillingPolicy(60, 60))
    assert per_minute.billable == 120


# ---- the record's stored form -----------------------------------------------------------


def test_record_line_round_trips_with_iso_utc_times() -> None:
    record = make_record(start=utc("2026-11-05T10:00:00.250"))
    line = record.to_json_line()
    data = json.loads(line)
    assert data["start"] == "2026-11-05T10:00:00.250Z"
    assert data["answer"] == "2026-11-05T10:00:03.250Z"
    assert data["end"] == "2026-11-05T10:00:45.250Z"
    assert "\n" not in line
    assert CallRecord.from_json_line(line) == record


@pytest.mark.parametrize(
    "mutation",
    [
        {"classification": "outside"},
        {"hangup_by": "nobody"},
        {"sip_status": "200"},
        {"start": "yesterday"},
        {"end_cause": "Not A Word"},
        {"call_id": ""},
    ],
)
def test_record_parser_refuses_bad_fields(mutation: dict[str, object]) -> None:
    data = make_record().to_dict()
    data.update(mutation)
    with pytest.raises(CdrFormatError):
        CallRecord.from_dict(data)


def test_record_parser_refuses_missing_field_and_non_json() -> None:
    data = make_record().to_dict()
    del data["billable"]
    with pytest.raises(CdrFormatError, match="billable"):
        CallRecord.from_dict(data)
    with pytest.raises(CdrFormatError):
        CallRecord.from_json_line(b'{"call_id": "x", "acc')
    with pytest.raises(CdrFormatError):
        CallRecord.from_json_line("[1, 2]")


# ---- appending and reading --------------------------------------------------------------


async def test_append_then_read_returns_every_record_in_order(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    records = [make_record(f"call-{i}", start=utc("2026-11-05T10:00:00") + i) for i in range(5)]
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        for record in records:
            await ledger.append(record)
        assert ledger.stats.records_appended == 5
        # readable while the writer is open
        assert list(CdrLedger(tmp_path).read()) == records
    files = list(tmp_path.glob("cdr-*.jsonl"))
    assert [f.name for f in files] == ["cdr-20261105-0001.jsonl"]
    assert len(files[0].read_bytes().splitlines()) == 5


async def test_read_selects_records_by_start_time_half_open(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-30T23:00:00"))
    starts = ["2026-10-31T23:59:59", "2026-11-01T00:00:00", "2026-11-30T23:59:59", "2026-12-01"]
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        for index, start in enumerate(starts):
            record = make_record(f"c{index}", start=utc(start), talk=1.0)
            clock.now = record.end  # written when the call ends
            await ledger.append(record)
    reader = CdrLedger(tmp_path)
    november = [r.call_id for r in reader.read(utc("2026-11-01"), utc("2026-12-01"))]
    assert november == ["c1", "c2"]
    assert [r.call_id for r in reader.read(until=utc("2026-11-01"))] == ["c0"]
    assert [r.call_id for r in reader.read(datetime(2026, 12, 1, tzinfo=UTC))] == ["c3"]


async def test_appended_record_is_on_disk_when_append_returns(tmp_path: Path) -> None:
    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:00:00")))
    await ledger.append(make_record("durable-1"))
    lines = ledger_lines(tmp_path)  # read through the file system, not the ledger
    assert [json.loads(line)["call_id"] for line in lines] == ["durable-1"]
    assert ledger.stats.fsyncs == 1
    await ledger.close()


async def test_concurrent_appends_share_fsyncs_and_all_are_stored(tmp_path: Path) -> None:
    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:00:00")))
    count = 300
    await asyncio.gather(*(ledger.append(make_record(f"g-{i}")) for i in range(count)))
    assert ledger.stats.records_appended == count
    assert 1 <= ledger.stats.fsyncs < count / 10
    stored = [json.loads(line)["call_id"] for line in ledger_lines(tmp_path)]
    assert sorted(stored) == sorted(f"g-{i}" for i in range(count))
    assert stored == [f"g-{i}" for i in range(count)]  # in the order of the append calls
    await ledger.close()


async def test_appends_arriving_during_a_write_form_the_next_batch(tmp_path: Path) -> None:
    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:00:00")))

    async def caller(index: int) -> None:
        for turn in range(10):
            await ledger.append(make_record(f"w{index}-{turn}"))

    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(20))), timeout=20)
    assert ledger.stats.records_appended == 200
    assert ledger.stats.fsyncs < 200
    assert len(set(ledger_lines(tmp_path))) == 200
    await ledger.close()


async def test_event_loop_keeps_running_during_fsync(tmp_path: Path) -> None:
    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:00:00")))
    ledger.open()
    entered, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    original = ledger._commit

    def slow_commit(chunk: list[bytes]) -> None:
        loop.call_soon_threadsafe(entered.set)
        assert release.wait(timeout=5)
        original(chunk)

    ledger._commit = slow_commit  # type: ignore[method-assign]
    append = asyncio.create_task(ledger.append(make_record("slow")))
    await asyncio.wait_for(entered.wait(), timeout=5)
    ticks = 0
    for _ in range(5):  # the loop runs other work while the commit is blocked
        await asyncio.sleep(0)
        ticks += 1
    assert ticks == 5 and not append.done()
    release.set()
    await asyncio.wait_for(append, timeout=5)
    await ledger.close()


async def test_ledger_refuses_a_second_writer_and_appends_after_close(tmp_path: Path) -> None:
    first = CdrLedger(tmp_path)
    first.open()
    with pytest.raises(LedgerLockedError):
        CdrLedger(tmp_path).open()
    await first.close()
    second = CdrLedger(tmp_path)
    second.open()  # the lock was released by close()
    await second.close()
    with pytest.raises(LedgerClosedError):
        await second.append(make_record())


async def test_restart_appends_to_todays_file(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        await ledger.append(make_record("before"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        await ledger.append(make_record("after"))
    assert [p.name for p in tmp_path.glob("cdr-*.jsonl")] == ["cdr-20261105-0001.jsonl"]
    assert [r.call_id for r in CdrLedger(tmp_path).read()] == ["before", "after"]


async def test_failed_fsync_is_reported_and_leaves_no_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import switch.cdr as cdr_module

    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:00:00")))
    await ledger.append(make_record("before"))
    real_fdatasync = cdr_module.os.fdatasync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cdr_module.os, "fdatasync", disk_full)
    with pytest.raises(CdrWriteError, match="No space left"):
        await ledger.append(make_record("refused"))
    assert ledger.stats.write_errors == 1
    monkeypatch.setattr(cdr_module.os, "fdatasync", real_fdatasync)
    await ledger.append(make_record("after"))
    await ledger.close()
    assert [json.loads(line)["call_id"] for line in ledger_lines(tmp_path)] == ["before", "after"]


async def test_ledger_from_settings_uses_the_cdr_section(tmp_path: Path) -> None:
    text = (
        f"cdr:\n  directory: {tmp_path / 'x'}\n  rotate_bytes: 8192\n  fsync: false\n"
        "  billing: {increment: 60, minimum: 60}\n"
    )
    settings = load_settings_text(text, "x.yaml")
    ledger, billing = ledger_from_settings(settings.cdr, clock=FakeClock(0.0))
    assert ledger.directory == tmp_path / "x"
    assert (ledger.rotate_bytes, ledger.rotate_daily, ledger.fsync) == (8192, True, False)
    assert billing == BillingPolicy(60, 60)
    await ledger.append(make_record("no-fsync"))
    assert ledger.stats.fsyncs == 0 and ledger.stats.records_appended == 1
    await ledger.close()


# ---- rotation ---------------------------------------------------------------------------


async def test_rotation_by_size_keeps_each_file_under_the_limit(tmp_path: Path) -> None:
    line_size = len(make_record("size-000").to_json_line()) + 1
    limit = line_size * 3 + 10  # three lines fit, a fourth does not
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    async with CdrLedger(tmp_path, rotate_bytes=limit, clock=clock) as ledger:
        for index in range(10):
            await ledger.append(make_record(f"size-{index:03d}"))
        await asyncio.gather(*(ledger.append(make_record(f"size-{i:03d}")) for i in range(10, 20)))
    files = sorted(tmp_path.glob("cdr-*.jsonl"))
    assert [f.name for f in files[:3]] == [
        "cdr-20261105-0001.jsonl",
        "cdr-20261105-0002.jsonl",
        "cdr-20261105-0003.jsonl",
    ]
    assert len(files) == 7
    assert all(f.stat().st_size <= limit for f in files)
    assert [len(f.read_bytes().splitlines()) for f in files] == [3, 3, 3, 3, 3, 3, 2]
    ids = [r.call_id for r in CdrLedger(tmp_path).read()]
    assert ids == [f"size-{i:03d}" for i in range(20)]


async def test_restart_does_not_reuse_a_full_file(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    async with CdrLedger(tmp_path, rotate_bytes=4096, clock=clock) as ledger:
        while ledger.stats.bytes_written < 4096 - 600:
            await ledger.append(make_record(f"fill-{ledger.stats.records_appended}"))
    async with CdrLedger(tmp_path, rotate_bytes=4096, clock=clock) as ledger:
        await ledger.append(make_record("next", caller="x" * 700))
    names = sorted(p.name for p in tmp_path.glob("cdr-*.jsonl"))
    assert names == ["cdr-20261105-0001.jsonl", "cdr-20261105-0002.jsonl"]
    last = (tmp_path / names[-1]).read_text().splitlines()
    assert [json.loads(line)["call_id"] for line in last] == ["next"]


async def test_rotation_at_utc_midnight(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T23:59:59.500"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        await ledger.append(make_record("late", start=utc("2026-11-05T23:58:00"), talk=30))
        clock.now = utc("2026-11-06T00:00:00.100")
        await ledger.append(make_record("early", start=utc("2026-11-05T23:59:00"), talk=40))
        await ledger.append(make_record("early-2", start=utc("2026-11-06T00:00:00"), talk=1))
    by_file = {
        p.name: [json.loads(line)["call_id"] for line in p.read_text().splitlines()]
        for p in tmp_path.glob("cdr-*.jsonl")
    }
    assert by_file == {
        "cdr-20261105-0001.jsonl": ["late"],
        "cdr-20261106-0001.jsonl": ["early", "early-2"],
    }
    # a call started on the 5th and written on the 6th is found by a read of the 5th
    fifth = CdrLedger(tmp_path).read(utc("2026-11-05"), utc("2026-11-06"))
    assert [r.call_id for r in fifth] == ["late", "early"]


async def test_no_daily_rotation_when_disabled(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T23:59:59"))
    async with CdrLedger(tmp_path, rotate_daily=False, clock=clock) as ledger:
        await ledger.append(make_record("a"))
        clock.now += 86400 * 3
        await ledger.append(make_record("b"))
    assert [p.name for p in tmp_path.glob("cdr-*.jsonl")] == ["cdr-20261105-0001.jsonl"]


async def test_read_skips_files_far_outside_the_range_but_finds_long_calls(
    tmp_path: Path,
) -> None:
    clock = FakeClock(utc("2026-01-10T12:00:00"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        await ledger.append(make_record("january", start=utc("2026-01-10T11:00:00")))
        clock.now = utc("2026-01-11T12:00:00")
        await ledger.append(make_record("january-2", start=utc("2026-01-11T11:00:00")))
        clock.now = utc("2026-11-02T01:00:00")
        # started on Oct 31st, ended (and written) on Nov 2nd: a 26-hour call
        await ledger.append(make_record("long", start=utc("2026-10-31T23:00:00"), talk=26 * 3600.0))
        clock.now = utc("2026-11-10T01:00:00")
        await ledger.append(make_record("november", start=utc("2026-11-10T00:30:00")))
    reader = CdrLedger(tmp_path)
    opened: list[str] = []
    original = reader._read_file

    def tracking(path: Path):  # type: ignore[no-untyped-def]
        opened.append(path.name)
        return original(path)

    reader._read_file = tracking  # type: ignore[method-assign]
    october = [r.call_id for r in reader.read(utc("2026-10-01"), utc("2026-11-01"))]
    assert october == ["long"]
    assert "cdr-20260110-0001.jsonl" not in opened  # its successor began on Jan 11th
    assert "cdr-20261102-0001.jsonl" in opened  # may hold calls started before it opened
    assert "cdr-20261110-0001.jsonl" not in opened  # opened over a week after `until`
    january = [r.call_id for r in reader.read(utc("2026-01-01"), utc("2026-02-01"))]
    assert january == ["january", "january-2"]


# ---- recovery ---------------------------------------------------------------------------


async def write_three(directory: Path) -> Path:
    async with CdrLedger(directory, clock=FakeClock(utc("2026-11-05T12:00:00"))) as ledger:
        for index in range(3):
            await ledger.append(make_record(f"ok-{index}"))
    (path,) = directory.glob("cdr-*.jsonl")
    return path


async def test_torn_last_line_is_moved_aside_and_cut_off(tmp_path: Path) -> None:
    path = await write_three(tmp_path)
    good = path.read_bytes()
    torn = make_record("torn").to_json_line().encode()[:57]
    path.write_bytes(good + torn)
    # a reader skips the incomplete line without counting it as damage
    reader = CdrLedger(tmp_path)
    assert [r.call_id for r in reader.read()] == ["ok-0", "ok-1", "ok-2"]
    assert reader.stats.unreadable_lines == 0

    ledger = CdrLedger(tmp_path, clock=FakeClock(utc("2026-11-05T12:30:00")))
    reports = ledger.open()
    assert len(reports) == 1
    assert reports[0].torn_lines == 1 and reports[0].torn_bytes == 57
    assert ledger.stats.torn_lines_recovered == 1
    assert path.read_bytes() == good
    assert reports[0].moved_to.read_bytes() == torn
    assert reports[0].moved_to.parent == tmp_path
    await ledger.append(make_record("after-recovery"))
    await ledger.close()
    ids = [json.loads(line)["call_id"] for line in ledger_lines(tmp_path)]
    assert ids == ["ok-0", "ok-1", "ok-2", "after-recovery"]


async def test_garbage_complete_lines_at_the_tail_are_cut_too(tmp_path: Path) -> None:
    path = await write_three(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good + b"\x00" * 100 + b"\n" + b'{"call_id":"half\n' + b"\x00\x00")
    ledger = CdrLedger(tmp_path)
    (report,) = ledger.open()
    assert report.torn_lines == 3
    assert path.read_bytes() == good
    await ledger.close()


async def test_well_formed_files_are_left_untouched(tmp_path: Path) -> None:
    path = await write_three(tmp_path)
    before = path.read_bytes()
    ledger = CdrLedger(tmp_path)
    assert ledger.open() == []
    assert ledger.stats.torn_lines_recovered == 0
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.torn-*"))
    await ledger.close()


async def test_file_holding_only_a_torn_line_becomes_empty(tmp_path: Path) -> None:
    path = tmp_path / "cdr-20261105-0001.jsonl"
    path.write_bytes(b'{"v":1,"call_id":"x","acc')
    ledger = CdrLedger(tmp_path)
    (report,) = ledger.open()
    assert report.torn_lines == 1
    assert path.read_bytes() == b""
    await ledger.close()


async def test_torn_tail_after_a_line_longer_than_the_scan_window(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        await ledger.append(make_record("long-line", caller="c" * 200_000))
    (path,) = tmp_path.glob("cdr-*.jsonl")
    good = path.read_bytes()
    path.write_bytes(good + b'{"v":1')
    ledger = CdrLedger(tmp_path)
    (report,) = ledger.open()
    assert report.torn_bytes == 6
    assert path.read_bytes() == good
    await ledger.close()


def test_reader_skips_and_counts_a_damaged_line_in_the_middle(tmp_path: Path) -> None:
    lines = [make_record(f"m{i}").to_json_line() for i in range(3)]
    lines[1] = lines[1][:30] + "#" + lines[1][31:]
    (tmp_path / "cdr-20261105-0001.jsonl").write_text("\n".join(lines) + "\n")
    reader = CdrLedger(tmp_path)
    assert [r.call_id for r in reader.read()] == ["m0", "m2"]
    assert reader.stats.unreadable_lines == 1


# ---- CSV export -------------------------------------------------------------------------


async def test_csv_export_has_a_header_and_one_row_per_record(tmp_path: Path) -> None:
    clock = FakeClock(utc("2026-11-05T12:00:00"))
    answered = make_record("csv-1", start=utc("2026-11-05T10:00:00"), talk=19.0, ring=2.5)
    missed = make_record(
        "csv-2", start=utc("2026-11-05T11:00:00"), talk=None, caller='Eve "the, caller"'
    )
    outside = make_record("csv-3", start=utc("2026-10-05T11:00:00"))
    async with CdrLedger(tmp_path, clock=clock) as ledger:
        for record in (answered, missed, outside):
            await ledger.append(record)
    out = io.StringIO(newline="")
    rows = CdrLedger(tmp_path).export_csv(utc("2026-11-01"), utc("2026-12-01"), out)
    assert rows == 2
    assert out.getvalue().endswith("\r\n")
    table = list(csv.DictReader(io.StringIO(out.getvalue(), newline="")))
    assert list(table[0].keys()) == list(CSV_COLUMNS)
    assert [row["call_id"] for row in table] == ["csv-1", "csv-2"]
    first, second = table
    assert first["start"] == "2026-11-05T10:00:00.000Z"
    assert first["answer"] == "2026-11-05T10:00:02.500Z"
    assert first["end"] == "2026-11-05T10:00:21.500Z"
    assert first["duration"] == "19.000" and first["billable"] == "24"
    assert first["callee_e164"] == "+33612345678" and first["trunk"] == "provider-a"
    assert first["caller_to_callee_packets"] == "2100"
    assert first["callee_to_caller_jitter_ms"] == "0.75"
    assert first["sip_status"] == "200" and first["hangup_by"] == "caller"
    assert second["answer"] == "" and second["billable"] == "0"
    assert second["end_cause"] == "no_answer" and second["caller_to_callee_bytes"] == ""
    assert second["caller"] == 'Eve "the, caller"'


def test_cli_cdr_export_writes_the_month_to_csv(tmp_path: Path) -> None:
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    records = [
        make_record("in-1", start=utc("2026-11-01T00:00:00")),
        make_record("in-2", start=utc("2026-11-30T23:59:00")),
        make_record("out-1", start=utc("2026-12-01T00:00:00")),
    ]
    (ledger_dir / "cdr-20261101-0001.jsonl").write_text(
        "".join(r.to_json_line() + "\n" for r in records)
    )
    config = tmp_path / "switch.yaml"
    config.write_text(f"cdr:\n  directory: {ledger_dir}\n")
    output = tmp_path / "november.csv"
    command = [sys.executable, "-m", "switch", "cdr", "export", "--config", str(config)]
    result = subprocess.run(
        [*command, "--from", "2026-11-01", "--to", "2026-11-30", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 records" in result.stderr
    with output.open(newline="") as handle:
        ids = [row["call_id"] for row in csv.DictReader(handle)]
    assert ids == ["in-1", "in-2"]

    to_stdout = subprocess.run(
        [*command, "--from", "2026-11-30T23:00:00Z", "--to", "2026-12-01T00:00:00.001"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert to_stdout.returncode == 0, to_stdout.stderr
    rows = list(csv.DictReader(io.StringIO(to_stdout.stdout)))
    assert [row["call_id"] for row in rows] == ["in-2", "out-1"]


def test_cli_cdr_export_refuses_bad_dates_and_missing_directory(tmp_path: Path) -> None:
    config = tmp_path / "switch.yaml"
    config.write_text(f"cdr:\n  directory: {tmp_path / 'nowhere'}\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "switch", "cdr", "export", "--config", str(config), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    bad_date = run("--from", "2026-13-01", "--to", "2026-11-30")
    assert bad_date.returncode == 2 and "not a date" in bad_date.stderr
    backwards = run("--from", "2026-11-30", "--to", "2026-11-01")
    assert backwards.returncode == 2 and "--to must be after --from" in backwards.stderr
    missing = run("--from", "2026-11-01", "--to", "2026-11-30")
    assert missing.returncode == 1 and "no CDR directory" in missing.stderr
    for result in (bad_date, backwards, missing):
        assert "Traceback" not in result.stderr


# ---- settings ---------------------------------------------------------------------------


def test_cdr_settings_defaults_and_overrides() -> None:
    defaults = load_settings_text("", "/etc/softswitch/empty.yaml").cdr
    assert str(defaults.directory) == "/etc/softswitch/var/cdr"  # beside the config file
    assert defaults.rotate_bytes == 67108864
    assert defaults.rotate_daily is True and defaults.fsync is True
    assert (defaults.billing.increment, defaults.billing.minimum) == (6, 18)
    text = (
        "cdr:\n  directory: /srv/cdr\n  rotate_bytes: 1048576\n  rotate_daily: false\n"
        "  fsync: false\n  billing: {increment: 60, minimum: 60}\n"
    )
    custom = load_settings_text(text, "custom.yaml").cdr
    assert str(custom.directory) == "/srv/cdr" and custom.rotate_bytes == 1048576
    assert custom.rotate_daily is False and custom.fsync is False
    assert (custom.billing.increment, custom.billing.minimum) == (60, 60)


def test_cdr_settings_report_bad_values_with_their_lines() -> None:
    from switch.settings import ConfigError

    text = "cdr:\n  rotate_bytes: 10\n  billing:\n    increment: 0\n    minmum: 5\n"
    with pytest.raises(ConfigError) as caught:
        load_settings_text(text, "bad.yaml")
    assert caught.value.errors == [
        "bad.yaml:2: cdr.rotate_bytes: must be at least 4096",
        "bad.yaml:4: cdr.billing.increment: must be at least 1",
        "bad.yaml:5: cdr.billing.minmum: unknown key",
    ]


def test_format_utc_is_iso_8601_with_milliseconds_and_z() -> None:
    assert format_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_utc(utc("2026-11-05T10:00:00.123")) == "2026-11-05T10:00:00.123Z"


def test_direction_is_stored_and_read_back_and_older_records_have_none() -> None:
    record = CallRecord.for_call(
        call_id="dir-1", account="acme", device="101", caller="101",
        callee_dialled="0478000000", callee_e164="+33478000000", classification="external",
        trunk="orange", start=1_800_000_000.0, answer=1_800_000_001.0, end=1_800_000_031.0,
        end_cause="normal", hangup_by="caller", sip_status=200, direction="outbound",
    )
    again = CallRecord.from_json_line(record.to_json_line())
    assert again.direction == "outbound"
    assert record.csv_row()[CSV_COLUMNS.index("direction")] == "outbound"
    legacy = record.to_dict()
    del legacy["direction"]
    assert CallRecord.from_dict(legacy).direction == ""
    legacy["direction"] = "sideways"
    with pytest.raises(CdrFormatError):
        CallRecord.from_dict(legacy)

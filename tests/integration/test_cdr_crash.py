"""A writer process is killed with SIGKILL while appending call records; every record
whose append had returned (and was acknowledged on stdout) is on disk afterwards, and a
fresh ledger on the same directory leaves every file well formed."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from switch.cdr import CallRecord, CdrLedger

REPO = Path(__file__).resolve().parents[2]

ACKS_BEFORE_KILL = 300
ROUNDS = 2
ROUND_DEADLINE_S = 4.0

# The writer: 8 concurrent "calls" ending over and over; after each append returns it
# prints "ack <call id>". A small rotate_bytes makes the kill land near rotations too.
WRITER = r"""
import asyncio, sys, time
import structlog
from switch.cdr import CallRecord, CdrLedger

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

directory, prefix = sys.argv[1], sys.argv[2]
MAX_RECORDS = 200_000

async def main():
    ledger = CdrLedger(directory, rotate_bytes=16384)
    ledger.open()
    print("ready", flush=True)
    counter = iter(range(MAX_RECORDS))

    async def calls():
        for index in counter:
            now = time.time()
            record = CallRecord.for_call(
                call_id=f"{prefix}-{index}",
                account="acme",
                device="1000",
                caller="+33123456790",
                callee_dialled=f"06{index:08d}",
                callee_e164=f"+336{index:08d}",
                classification="external",
                trunk="provider-a",
                start=now - 30.0,
                answer=None if index % 5 == 0 else now - 25.0,
                end=now,
                end_cause="no_answer" if index % 5 == 0 else "normal",
                hangup_by="callee",
                sip_status=480 if index % 5 == 0 else 200,
                media={"caller_to_callee": {"packets": index, "bytes": 172 * index}},
                node="node-crash",
            )
            await ledger.append(record)
            sys.stdout.write("ack " + record.call_id + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(calls() for _ in range(8)))

asyncio.run(main())
"""


def _pump(stream, lines: queue.Queue[str | None]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_and_kill(directory: Path, prefix: str) -> list[str]:
    """Starts a writer, kills it with SIGKILL after ACKS_BEFORE_KILL acknowledgements and
    returns every call id it acknowledged."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), prefix],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
    reader.start()
    acknowledged: list[str] = []
    deadline = time.monotonic() + ROUND_DEADLINE_S
    try:
        ready = lines.get(timeout=ROUND_DEADLINE_S)
        assert ready == "ready", "the writer did not start"
        while len(acknowledged) < ACKS_BEFORE_KILL:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(acknowledged)} acknowledgements in time"
            line = lines.get(timeout=remaining)
            assert line is not None, f"the writer exited early ({process.poll()})"
            if line.startswith("ack "):
                acknowledged.append(line[4:])
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    assert process.returncode == -signal.SIGKILL
    # acknowledgements already in the pipe when the writer died count too
    reader.join(timeout=5)
    while True:
        line = lines.get(timeout=1)
        if line is None:
            break
        if line.startswith("ack "):
            acknowledged.append(line[4:])
    if process.stdout is not None:
        process.stdout.close()
    return acknowledged


def stored_lines(directory: Path) -> list[bytes]:
    lines: list[bytes] = []
    for path in CdrLedger(directory).files():
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path.name} ends with a partial line"
        lines.extend(data.splitlines())
    return lines


async def test_every_acknowledged_record_survives_kill_9(tmp_path: Path) -> None:
    started = time.monotonic()
    directory = tmp_path / "cdr"
    acknowledged: list[str] = []
    for round_number in range(ROUNDS):
        acknowledged += run_and_kill(directory, f"r{round_number}")

        ledger = CdrLedger(directory)
        reports = ledger.open()  # the crashed writer's lock is gone; tails are repaired
        assert all(report.file.parent == directory for report in reports)
        await ledger.close()

        records = [CallRecord.from_json_line(line) for line in stored_lines(directory)]
        by_id = {record.call_id: record for record in records}
        assert len(by_id) == len(records), "a record was stored twice"
        missing = [call_id for call_id in acknowledged if call_id not in by_id]
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:3]}"
        for call_id in acknowledged:
            record = by_id[call_id]
            index = int(call_id.split("-")[1])
            assert record.callee_dialled == f"06{index:08d}"
            assert record.node == "node-crash"
            assert record.end - record.start == pytest.approx(30.0, abs=0.002)
            assert record.billable == (0 if index % 5 == 0 else 30)
            assert record.media["caller_to_callee"]["bytes"] == 172 * index

    assert len(acknowledged) >= ROUNDS * ACKS_BEFORE_KILL
    assert len(CdrLedger(directory).files()) > 2  # rotation happened while writing
    assert time.monotonic() - started < 10.0

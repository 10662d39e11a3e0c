"""``kill -9`` of a process writing the emergency audit journal (EMERGENCY.md EM-70 test 2).

A process records ``classified`` and ``invite_sent`` for an emergency call, flushes, says
READY and is killed with SIGKILL: reopening the journal finds both entries (the PIDF
byte-identical) and an intact hash chain. A second process is killed while recording in a
loop: the journal opens cleanly (a torn last line, if the kill cut one, is moved aside) and
verifies, and new entries continue the chain.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e911.audit import EmergencyJournal, field_bytes, read_journal, verify

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 15.0
ROUNDS = 8
PIDF = b'<?xml version="1.0"?>\n<presence entity="pres:+13125550100@example.com"/>\n'

ONE_CALL = r"""
import asyncio, sys, time
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from e911.audit import EmergencyJournal

async def main() -> None:
    journal = EmergencyJournal(Path(sys.argv[1]))
    journal.open()
    journal.record("emergency-call-1", "classified", dialled="911", number_class="emergency")
    journal.record("emergency-call-1", "invite_sent", request_uri="urn:service:sos",
                   pidf=sys.argv[2].encode("latin-1"))
    await journal.flush()
    print("READY", flush=True)
    time.sleep(30)  # killed long before this ends

asyncio.run(main())
"""

LOOP = r"""
import sys, time
from pathlib import Path
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from e911 import audit
from e911.audit import EmergencyJournal

real_write = audit._write_all

def slow_disk(fd, data):
    # a disk that takes big writes in 4 KiB pieces: a kill can land between two pieces
    for offset in range(0, len(data), 4096):
        real_write(fd, data[offset:offset + 4096])
        time.sleep(0.0002)

audit._write_all = slow_disk
journal = EmergencyJournal(Path(sys.argv[1]), rotate_bytes=256 * 1024)
journal.open()
body = "x" * 20000
for number in range(100000):
    journal.record(f"call-{number % 7}", "notification", recipient="desk", round=sys.argv[2],
                   n=number, body=body)
    if number % 20 == 19:
        assert journal.flush_sync(10)
    if number == 39:
        print("READY", flush=True)
"""


def start(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, "the writer never said READY"
        readable, _, _ = select.select([process.stdout], [], [], 0.1)
        if readable:
            line = process.stdout.readline()  # the writer prints whole lines only
            assert line, f"the writer exited with {process.wait(timeout=10)}"
            if line.strip() == "READY":
                return


def kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


def test_flushed_entries_survive_kill_9(tmp_path: Path) -> None:
    directory = tmp_path / "emergency"
    process = start(ONE_CALL, str(directory), PIDF.decode("latin-1"))
    try:
        wait_ready(process)
    finally:
        kill(process)

    journal = EmergencyJournal(directory)
    report = journal.open()  # the lock died with the killed process
    try:
        assert report.clean and report.last_seq == 2
        entries = journal.call("emergency-call-1")
        assert [e["event"] for e in entries] == ["classified", "invite_sent"]
        assert entries[0]["fields"]["dialled"] == "911"
        assert field_bytes(entries[1]["fields"]["pidf"]) == PIDF
        assert verify(directory) == []
    finally:
        journal.close()


def test_kill_9_while_writing_leaves_a_journal_that_opens_and_verifies(tmp_path: Path) -> None:
    """Up to ROUNDS kills on one directory, each followed by an open that recovers the
    tail; the chain runs on across all of them, and at least one kill tore a line."""
    directory = tmp_path / "emergency"
    torn_tails = 0
    rounds = 0
    while rounds < ROUNDS and not (torn_tails and rounds >= 2):
        rounds += 1
        process = start(LOOP, str(directory), str(rounds))
        try:
            wait_ready(process)
            time.sleep(0.1)  # well inside the writing loop
        finally:
            kill(process)
        before = list(read_journal(directory))  # readers skip a torn last line
        this_round = [e["fields"]["n"] for e in before if e["fields"].get("round") == str(rounds)]
        assert len(this_round) >= 40
        assert this_round == list(range(len(this_round)))

        journal = EmergencyJournal(directory, rotate_bytes=256 * 1024)
        report = journal.open()
        try:
            assert not report.problems
            assert report.last_seq == len(before)
            if report.torn is not None:  # the cut line is kept aside, out of the journal
                torn_tails += 1
                assert report.torn.moved_to.exists() and report.torn.size > 0
            for path in journal.files():
                data = path.read_bytes()
                assert data == b"" or data.endswith(b"\n"), f"{path.name} ends mid-line"
            assert verify(directory) == []
            journal.record("call-after", "classified", dialled="112", round=rounds)
            assert journal.flush_sync(5.0)
        finally:
            journal.close()
        after = list(read_journal(directory))
        assert after[-1]["call_id"] == "call-after" and after[-1]["seq"] == len(before) + 1
        assert verify(directory) == []
    assert torn_tails >= 1, f"no kill in {rounds} rounds landed inside a write"

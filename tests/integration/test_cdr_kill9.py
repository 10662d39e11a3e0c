"""``kill -9`` of the switch in the middle of a run of SIPp calls, then a restart on the
same configuration and CDR directory.

Every call the SIPp caller saw complete (the 200 to its BYE arrived; the scenario then
appends the Call-ID to completed.txt) before the kill has exactly one well-formed line in
the ledger: the switch answers a BYE only once the call's record is fsync'd. After the
restart every ledger file ends with a complete line and every line parses (the ledger's
start-up recovery cut any torn tail off), and the restarted switch records a new call.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sipp_calls import auth_injection, launch_sipp, sipp_group
from switch_process import SipDevice, SipUdpClient, SwitchProcess, prepare_switch

from switch.cdr import CallRecord, CdrLedger

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CALLER = SipDevice("1000", "pw1000")
CALLEE = SipDevice("1001", "pw1001")
CALLS = 400  # more than can complete before the kill: the run is cut by it
RATE_CPS = 25
HOLD_MS = 200
COMPLETED_BEFORE_KILL = 20
WAIT_S = 10.0
TEST_BUDGET_S = 30.0


def _register(switch: SwitchProcess, device: SipDevice, port: int) -> None:
    with SipUdpClient(switch.address("udp")) as client:
        _, reply = client.register(
            device.extension, device.password,
            contact=f"<sip:{device.extension}@127.0.0.1:{port}>",
        )  # fmt: skip
    assert reply is not None and reply.status == 200, reply


def _completed(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _ledger_lines(directory: Path) -> list[bytes]:
    """Every line of every ledger file; each file must end with a complete line."""
    lines: list[bytes] = []
    for path in CdrLedger(directory).files():
        data = path.read_bytes()
        assert data == b"" or data.endswith(b"\n"), f"{path.name} ends with a partial line"
        lines.extend(data.splitlines())
    return lines


def _records(directory: Path) -> dict[str, CallRecord]:
    records = [CallRecord.from_json_line(line) for line in _ledger_lines(directory)]
    by_id = {record.call_id: record for record in records}
    assert len(by_id) == len(records), "a call has more than one record"
    return by_id


def test_completed_calls_keep_their_cdr_across_kill_9_and_restart(tmp_path: Path) -> None:
    started_at = time.monotonic()
    sections = {
        "media": {"backend": "none"},
        "calls": {"no_answer_timeout": 30, "session_expires": 1800},
    }
    switch = prepare_switch(tmp_path / "switch", [CALLER, CALLEE], tcp=False, sections=sections)
    cdr_directory = switch.config_path.parent / "var" / "cdr"
    injection = auth_injection(
        tmp_path / "caller.csv", auth_user=CALLER.extension, password=CALLER.password,
        callee=CALLEE.extension,
    )  # fmt: skip
    restarted: SwitchProcess | None = None
    kill_time = float("inf")
    try:
        switch.start()
        with sipp_group() as started:
            callee = launch_sipp(
                tmp_path, "callee", "uas_answer_load.xml", calls=100_000, trace=False
            )
            started.append(callee)
            _register(switch, CALLEE, callee.port)
            caller = launch_sipp(
                tmp_path, "caller", "uac_call_load.xml", target=switch.address("udp"),
                calls=CALLS, rate=RATE_CPS, hold_ms=HOLD_MS, injection=injection, trace=False,
            )  # fmt: skip
            started.append(caller)
            completed_file = caller.workdir / "completed.txt"
            deadline = time.monotonic() + WAIT_S
            while len(_completed(completed_file)) < COMPLETED_BEFORE_KILL:
                assert time.monotonic() < deadline, (
                    f"only {len(_completed(completed_file))} calls completed\n"
                    + caller.describe()
                    + switch.log_text()[-3000:]
                )
                assert caller.process.poll() is None, caller.describe()
                time.sleep(0.005)

            os.kill(switch.pid, signal.SIGKILL)
            assert switch.stop() == -signal.SIGKILL
            assert caller.process.poll() is None, "the run ended before the kill"
            kill_time = time.monotonic()
            # the SIPp processes go; completions already logged stay in the file
            caller.stop()
            callee.stop()
        time.sleep(0.3)  # a completion's `echo` forked just before the kill lands
        completed = _completed(completed_file)
        assert len(completed) >= COMPLETED_BEFORE_KILL
        assert len(set(completed)) == len(completed)

        restarted = SwitchProcess(config_path=switch.config_path, listeners=switch.listeners)
        restarted.start()  # the ledger's lock died with the killed process

        # the ledger is well formed again, and every completed call has its one record
        records = _records(cdr_directory)
        missing = [call_id for call_id in completed if call_id not in records]
        assert not missing, f"{len(missing)} completed calls have no CDR, e.g. {missing[:3]}"
        for call_id in completed:
            record = records[call_id]
            assert record.sip_status == 200 and record.answer is not None, record
            assert record.end_cause == "normal" and record.hangup_by == "caller", record
            assert (record.device, record.callee_dialled) == (CALLER.extension, "1001"), record
            assert record.classification == "internal", record
        # calls cut by the kill before their BYE was answered are not counted as completed
        assert len(records) >= len(completed)

        # the restarted switch serves and records a new call
        with sipp_group() as started:
            callee = launch_sipp(tmp_path / "after", "callee", "uas_answer_load.xml")
            started.append(callee)
            _register(restarted, CALLEE, callee.port)
            caller = launch_sipp(
                tmp_path / "after", "caller", "uac_call_load.xml",
                target=restarted.address("udp"), hold_ms=HOLD_MS, injection=injection,
            )  # fmt: skip
            started.append(caller)
            assert caller.wait() == 0, caller.describe() + restarted.log_text()[-3000:]
            assert callee.wait() == 0, callee.describe()
        new_calls = _completed(caller.workdir / "completed.txt")
        assert len(new_calls) == 1 and new_calls[0] not in records, new_calls
        deadline = time.monotonic() + 5.0
        while new_calls[0] not in (after := _records(cdr_directory)):
            assert time.monotonic() < deadline, "no CDR for the call after the restart"
            time.sleep(0.05)
        assert after[new_calls[0]].sip_status == 200, after[new_calls[0]]
        assert set(records) <= set(after)
        # a torn tail, if the kill left one, was cut off and kept aside, and logged
        torn = list(cdr_directory.glob("*.torn-*"))
        assert bool(torn) == bool(restarted.events("cdr.recovered")), torn
    finally:
        if restarted is not None:
            restarted.stop()
        switch.stop()
    assert kill_time - started_at < TEST_BUDGET_S
    assert time.monotonic() - started_at < TEST_BUDGET_S

"""Calls through the switch (the B2BUA and its RTP relay) between SIPp 3.6 user agents.

A SIPp caller (digest on INVITE) calls a SIPp callee whose extension was registered with
a Contact on the SIPp UAS port (the switch sends to that port because the Contact names
the REGISTER's source host). SIPp does the signalling; the RTP is sent and counted by
the test's own UDP "phones", at the relay ports SIPp saw in the SDP (the scenarios write
them to files as soon as they arrive). Each call's CDR is read back from the ledger.

One switch serves the whole module; each test calls its own extension.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from switch_process import (
    LOOPBACK_V4,
    PEERS_DIR,
    SipDevice,
    SipUdpClient,
    SwitchProcess,
    free_port,
    running_switch,
)

SIPP_DIR = PEERS_DIR / "sipp"
SIPP_WALL_S = 15.0  # hard limit of one SIPp process; killed by PID after that
DEVICES = SipDevice.numbered(1000, 1019)
CALLER = DEVICES[0]
# below the ephemeral ports (32768+), and apart from other runs' ranges
RELAY_PORT_MIN = 20000 + 2 * (os.getpid() % 4000)
RELAY_PORT_MAX = RELAY_PORT_MIN + 199
RTP_PACKETS = 60
RTP_PAYLOAD = 160  # 20 ms of PCMU

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------
# SIPp processes
# --------------------------------------------------------------------------------------


def _sipp() -> str:
    binary = shutil.which("sipp")
    if binary is None:
        pytest.fail("sipp is not installed (Debian package sip-tester): run `make test`")
    return binary


@dataclass
class Sipp:
    """One SIPp process (``-m 1``: one call) in its own working directory."""

    name: str
    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    output: str = ""

    def file(self, name: str, timeout: float = 5.0) -> str:
        """The content of a file the scenario writes (``<exec>``), once complete."""
        path = self.workdir / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                text = path.read_text(errors="replace")
                if text.endswith("\n"):
                    return text.strip()
            if self.process.poll() is not None and not path.exists():
                break
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no {name} within {timeout} s\n{self.describe()}")

    def mline_port(self, name: str, timeout: float = 5.0) -> int:
        match = re.fullmatch(r"m=audio (\d+)", self.file(name, timeout))
        assert match is not None, (name, self.describe())
        return int(match.group(1))

    def wait(self, timeout: float = SIPP_WALL_S) -> int:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            out, _ = self.process.communicate(timeout=5)
            self.output = out.decode(errors="replace")
            pytest.fail(f"{self.name} hung for {timeout:.0f} s and was killed\n{self.describe()}")
        self.output = out.decode(errors="replace")
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.communicate(timeout=5)

    def describe(self) -> str:
        errors = ""
        for path in sorted(self.workdir.glob("*_errors.log")):
            errors += path.read_text(errors="replace")[-2000:]
        messages = ""
        for path in sorted(self.workdir.glob("*_messages.log")):
            messages += path.read_text(errors="replace")[-3000:]
        return (
            f"--- {self.name} output ---\n{self.output[-1500:]}\n--- errors ---\n{errors}"
            f"\n--- messages (tail) ---\n{messages}"
        )


def start_sipp(
    workdir: Path,
    name: str,
    scenario: str,
    *,
    target: tuple[str, int] | None = None,
    injection: Path | None = None,
    phone_port: int = 9,
    hold_ms: int = 0,
    port: int | None = None,
) -> Sipp:
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port("udp")
    command = [
        _sipp(), "-sf", str(SIPP_DIR / scenario), "-i", LOOPBACK_V4, "-p", str(port),
        "-mp", str(free_port("udp")), "-cp", str(free_port("udp")), "-m", "1",
        "-key", "phone_port", str(phone_port), "-nostdin", "-buff_size", "4194304",
        "-timeout", f"{SIPP_WALL_S - 3:.0f}s", "-timeout_error", "-max_retrans", "4",
        "-trace_msg", "-trace_err",
    ]  # fmt: skip
    if hold_ms:
        command += ["-d", str(hold_ms)]
    if injection is not None:
        command += ["-inf", str(injection)]
    if target is not None:
        command.insert(1, f"{target[0]}:{target[1]}")
    process = subprocess.Popen(
        command, cwd=directory, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return Sipp(name, directory, port, process)


@contextlib.contextmanager
def sipp_group() -> Iterator[list[Sipp]]:
    """Every SIPp started in the block is killed by PID at its end if still running."""
    started: list[Sipp] = []
    try:
        yield started
    finally:
        for sipp in started:
            sipp.stop()


def caller_injection(workdir: Path, callee: str, password: str | None = None) -> Path:
    password = password or CALLER.password
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"caller_to_{callee}.csv"
    path.write_text(
        "SEQUENTIAL\n"
        f"{CALLER.extension};{password};{LOOPBACK_V4};"
        f"[authentication username={CALLER.extension} password={password}];{callee}\n"
    )
    return path


# --------------------------------------------------------------------------------------
# The switch, registrations, CDRs
# --------------------------------------------------------------------------------------


@dataclass
class Bench:
    switch: SwitchProcess
    workdir: Path

    @property
    def target(self) -> tuple[str, int]:
        return self.switch.address("udp")

    def register(self, extension: str, *contact_ports: int) -> None:
        """Registers ``extension`` with one binding per SIPp UAS port."""
        password = f"pw{extension}"
        with SipUdpClient(self.target) as client:
            for port in contact_ports:
                _, reply = client.register(
                    extension, password, contact=f"<sip:{extension}@{LOOPBACK_V4}:{port}>"
                )
                assert reply is not None and reply.status == 200, reply
            contacts = client.bindings(extension, password)
        assert len(contacts) == len(contact_ports), contacts

    def cdr(self, call_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The CDR of ``call_id`` once the ledger wrote it."""
        directory = self.switch.config_path.parent / "var" / "cdr"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in sorted(directory.glob("cdr-*.jsonl")):
                for line in path.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if record.get("call_id") == call_id:
                            return record
            time.sleep(0.05)
        raise AssertionError(f"no CDR for {call_id}; switch log:\n{self.switch.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    workdir = tmp_path_factory.mktemp("calls_sipp")
    sections = {
        "media": {
            "backend": "relay", "bind_host": LOOPBACK_V4,
            "port_min": RELAY_PORT_MIN, "port_max": RELAY_PORT_MAX, "media_timeout": 0,
        },
        "calls": {"no_answer_timeout": 30, "session_expires": 1800},
    }  # fmt: skip
    with running_switch(workdir / "switch", DEVICES, tcp=False, sections=sections) as switch:
        yield Bench(switch, workdir)
        assert switch.process is not None and switch.process.poll() is None, "switch died"


def sipp_call_id(caller: Sipp) -> str:
    """The Call-ID of the (single) call of a SIPp caller, from its message trace."""
    for path in caller.workdir.glob("*_messages.log"):
        match = re.search(r"^Call-ID: *(\S+)", path.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    raise AssertionError(f"no Call-ID in the trace of {caller.name}\n{caller.describe()}")


# --------------------------------------------------------------------------------------
# RTP phones
# --------------------------------------------------------------------------------------


@dataclass
class RtpPhone:
    """A UDP socket that sends numbered PCMU packets and counts what it receives."""

    name: str
    marker: int
    sock: socket.socket = field(init=False)
    received: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK_V4, 0))
        self.sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((data, addr))

    def send(self, target: tuple[str, int], count: int, interval: float = 0.002) -> None:
        ssrc = 0x10000 + self.marker
        for seq in range(count):
            header = struct.pack("!BBHII", 0x80, 0, seq, seq * RTP_PAYLOAD, ssrc)
            self.sock.sendto(header + bytes([self.marker]) * RTP_PAYLOAD, target)
            time.sleep(interval)

    def wait_received(self, count: int, timeout: float = 3.0) -> int:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.received)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        self.sock.close()


@contextlib.contextmanager
def phones(*names: str) -> Iterator[list[RtpPhone]]:
    made = [RtpPhone(name, marker=index + 1) for index, name in enumerate(names)]
    try:
        yield made
    finally:
        for phone in made:
            phone.close()


def _in_relay_range(port: int) -> bool:
    return RELAY_PORT_MIN <= port <= RELAY_PORT_MAX


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_call_with_rtp_both_ways_through_the_relay_and_its_cdr(bench: Bench) -> None:
    callee = "1001"
    with sipp_group() as started, phones("caller", "callee") as (caller_phone, callee_phone):
        uas = start_sipp(
            bench.workdir / "basic", "uas", "uas_answer.xml", phone_port=callee_phone.port
        )
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            bench.workdir / "basic",
            "uac",
            "uac_call_media.xml",
            target=bench.target,
            phone_port=caller_phone.port,
            hold_ms=2500,
            injection=caller_injection(bench.workdir / "basic", callee),
        )
        started.append(uac)

        # the relay ports each side was given in its SDP
        relay_a = uac.mline_port("relay_port.txt")  # in the 200 the caller got
        relay_b = uas.mline_port("relay_port.txt")  # in the INVITE the callee got
        assert _in_relay_range(relay_a) and _in_relay_range(relay_b), (relay_a, relay_b)
        assert relay_a != relay_b
        assert caller_phone.port not in (relay_a, relay_b)

        senders = [
            threading.Thread(target=caller_phone.send, args=((LOOPBACK_V4, relay_a), RTP_PACKETS)),
            threading.Thread(target=callee_phone.send, args=((LOOPBACK_V4, relay_b), RTP_PACKETS)),
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=5)
        assert callee_phone.wait_received(RTP_PACKETS) == RTP_PACKETS
        assert caller_phone.wait_received(RTP_PACKETS) == RTP_PACKETS

        assert uac.wait() == 0, uac.describe()
        assert uas.wait() == 0, uas.describe()

    # each end got the other's packets, unchanged, from the relay port in its own SDP
    assert {addr for _, addr in callee_phone.received} == {(LOOPBACK_V4, relay_b)}
    assert {addr for _, addr in caller_phone.received} == {(LOOPBACK_V4, relay_a)}
    assert all(
        data[12:] == bytes([caller_phone.marker]) * RTP_PAYLOAD for data, _ in callee_phone.received
    )
    assert all(
        data[12:] == bytes([callee_phone.marker]) * RTP_PAYLOAD for data, _ in caller_phone.received
    )
    assert sorted(struct.unpack("!H", d[2:4])[0] for d, _ in callee_phone.received) == list(
        range(RTP_PACKETS)
    )

    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record
    assert record["sip_status"] == 200 and record["answer"] is not None, record
    assert (record["device"], record["callee_dialled"]) == (CALLER.extension, callee), record
    for direction in ("caller_to_callee", "callee_to_caller"):
        stats = record["media"][direction]
        assert stats["packets"] == RTP_PACKETS, record
        assert stats["bytes"] >= RTP_PACKETS * RTP_PAYLOAD, record
        assert stats["lost"] == 0, record


def test_caller_cancels_while_the_callee_rings(bench: Bench) -> None:
    callee = "1002"
    work = bench.workdir / "cancel"
    with sipp_group() as started:
        uas = start_sipp(work, "uas", "uas_ring_cancel.xml")
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_cancel.xml",
            target=bench.target,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        # the caller got 180, cancelled, and received 200 (CANCEL) and 487 (INVITE);
        # the callee got the switch's CANCEL and ended its INVITE with 487
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "cancelled" and record["hangup_by"] == "caller", record
    assert record["sip_status"] == 487 and record["answer"] is None, record
    assert record["billable"] == 0, record


def test_answer_crossing_the_cancel_is_acked_and_hung_up(bench: Bench) -> None:
    callee = "1008"
    work = bench.workdir / "cancel_crossing"
    with sipp_group() as started:
        uas = start_sipp(work, "uas", "uas_answer_crosses_cancel.xml")
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_cancel.xml",
            target=bench.target,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        # the caller still gets 487; the callee's late 200 gets an ACK, then a BYE
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "cancelled" and record["sip_status"] == 487, record
    assert record["answer"] is None, record


def test_callee_hangs_up_and_the_caller_gets_the_bye(bench: Bench) -> None:
    callee = "1003"
    work = bench.workdir / "callee_bye"
    with sipp_group() as started:
        uas = start_sipp(work, "uas", "uas_answer_then_bye.xml")
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_remote_bye.xml",
            target=bench.target,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "normal" and record["hangup_by"] == "callee", record
    assert record["sip_status"] == 200, record


def test_busy_callee_gives_486_to_the_caller(bench: Bench) -> None:
    callee = "1004"
    work = bench.workdir / "busy"
    with sipp_group() as started:
        uas = start_sipp(work, "uas", "uas_busy.xml")
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_failure.xml",
            target=bench.target,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()
        assert uac.file("final_status.txt") == "486"
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "busy" and record["sip_status"] == 486, record
    assert record["answer"] is None, record


def test_reliable_provisional_from_the_callee_is_pracked(bench: Bench) -> None:
    """A callee that sends its 183 with Require: 100rel gets a PRACK from the switch
    (RFC 3262) before it answers; the caller's call completes normally."""
    callee = "1009"
    work = bench.workdir / "prack"
    with sipp_group() as started:
        uas = start_sipp(work, "uas", "uas_answer_100rel.xml")
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_media.xml",
            target=bench.target,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()  # it saw the PRACK with RAck: 1 <cseq> INVITE
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "normal" and record["sip_status"] == 200, record


@pytest.mark.parametrize(
    ("case", "callee", "password", "status"),
    [
        ("not_registered", "1005", None, "480"),
        ("unknown_extension", "1999", None, "404"),
        ("wrong_password", "1005", "not-pw1000", "407"),
    ],
)
def test_refused_calls(
    bench: Bench, case: str, callee: str, password: str | None, status: str
) -> None:
    work = bench.workdir / case
    with sipp_group() as started:
        uac = start_sipp(
            work,
            "uac",
            "uac_call_failure.xml",
            target=bench.target,
            injection=caller_injection(work, callee, password),
        )
        started.append(uac)
        assert uac.wait() == 0, uac.describe()
        assert uac.file("final_status.txt") == status, uac.describe()
    if status == "407":
        # the second INVITE carried credentials, and was challenged again
        trace = next(uac.workdir.glob("*_messages.log")).read_text(errors="replace")
        assert trace.count("Proxy-Authorization:") == 1, trace[-3000:]
        assert trace.count("SIP/2.0 407") == 2, trace[-3000:]
    else:
        record = bench.cdr(sipp_call_id(uac))
        assert record["sip_status"] == int(status) and record["answer"] is None, record
        assert record["end_cause"] == ("unavailable" if status == "480" else "not_found"), record


def test_hold_and_resume_reinvites_reach_the_callee_rewritten(bench: Bench) -> None:
    callee = "1006"
    work = bench.workdir / "hold"
    with sipp_group() as started, phones("caller", "callee") as (caller_phone, callee_phone):
        uas = start_sipp(work, "uas", "uas_hold_resume.xml", phone_port=callee_phone.port)
        started.append(uas)
        bench.register(callee, uas.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_hold_resume.xml",
            target=bench.target,
            phone_port=caller_phone.port,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        # the scenarios check the directions (sendonly → recvonly, sendrecv → sendrecv)
        assert uac.wait() == 0, uac.describe() + uas.describe()
        assert uas.wait() == 0, uas.describe()
        offered = [uas.mline_port(f"{n}_mline.txt") for n in ("invite", "hold", "resume")]
        answered = [uac.mline_port(f"{n}_mline.txt") for n in ("answer", "hold", "resume")]
    # both re-offers and both answers were rewritten to the relay (never the phones'
    # own ports), and the relay kept each side's port across hold and resume
    assert all(_in_relay_range(p) for p in offered + answered), (offered, answered)
    assert len(set(offered)) == 1 and len(set(answered)) == 1, (offered, answered)
    assert offered[0] != answered[0]
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record


def test_parallel_forking_answered_by_one_contact_cancels_the_other(bench: Bench) -> None:
    callee = "1007"
    work = bench.workdir / "fork"
    with sipp_group() as started, phones("caller", "callee") as (caller_phone, callee_phone):
        answering = start_sipp(work, "answering", "uas_answer.xml", phone_port=callee_phone.port)
        ringing = start_sipp(work, "ringing", "uas_ring_cancel.xml")
        started += [answering, ringing]
        bench.register(callee, answering.port, ringing.port)
        uac = start_sipp(
            work,
            "uac",
            "uac_call_media.xml",
            target=bench.target,
            phone_port=caller_phone.port,
            hold_ms=300,
            injection=caller_injection(work, callee),
        )
        started.append(uac)
        assert uac.wait() == 0, uac.describe() + answering.describe() + ringing.describe()
        assert answering.wait() == 0, answering.describe()
        # the other contact rang, then received the switch's CANCEL and answered 487
        assert ringing.wait() == 0, ringing.describe()
    for sipp in (answering, ringing):
        trace = next(sipp.workdir.glob("*_messages.log")).read_text(errors="replace")
        assert re.search(r"^INVITE sip:", trace, re.MULTILINE), trace[-2000:]
    ringing_trace = next(ringing.workdir.glob("*_messages.log")).read_text(errors="replace")
    assert re.search(r"^CANCEL sip:", ringing_trace, re.MULTILINE), ringing_trace[-2000:]
    record = bench.cdr(sipp_call_id(uac))
    assert record["end_cause"] == "normal" and record["sip_status"] == 200, record

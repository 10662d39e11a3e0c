"""Call features through the switch, end to end with SIPp peers: blind transfer (REFER)
and its refusal, INFO relayed in the dialog, session refresh (RFC 4028) ending a call
whose callee died, media timeout, the rtpengine backend against the real daemon, and
relay port exhaustion.

Each feature that needs its own media settings gets its own switch, mostly a subprocess
(see switch_process.py). Two tests build the switch in this process instead: the blind
transfer, to check that call control forgets every dialog of a transferred call once it
ended, and the session refresh, to shorten the session interval below what the YAML
allows (90 s) and the SIP transaction timers (Timer F in 3.2 s instead of 32 s). Their
SIPp processes and blocking SIP/RTP helpers then run in a worker thread while the
switch runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sipp_calls import Sipp, launch_sipp, received_requests, sipp_group
from switch_process import (
    LOOPBACK_V4,
    Listener,
    SipDevice,
    SipUdpClient,
    build_config,
    free_sip_port,
    running_switch,
)
from test_calls_sipp import (
    RTP_PAYLOAD,
    Bench,
    RtpPhone,
    caller_injection,
    phones,
    sipp_call_id,
)
from test_rtpengine import Rtpengine, _free_udp_block, _run_rtpengine

from sip.timers import TimerSettings
from switch.app import Softswitch
from switch.settings import load_settings_text

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DEVICES = SipDevice.numbered(1000, 1019)
CALLER = DEVICES[0].extension
RTP_PACKETS = 40
CALL_TIMERS = {"no_answer_timeout": 30, "session_expires": 1800}
# RTP port ranges of this module's relays, apart from each other and from the ranges of
# test_calls_sipp (20000-27999), test_rtpengine (31000-31999) and the ephemeral ports
MAIN_RELAY_PORTS = (28200, 29199)
TIMEOUT_RELAY_PORTS = (29200, 29599)
TINY_RELAY_PORTS = (29600, 29999)
IN_PROCESS_RELAY_PORTS = (30000, 30599)
RTPENGINE_PORTS = (31000, 31899)
# Session refresh in the in-process switch: every second, and a dead leg detected by
# Timer F = 64 x T1 = 3.2 s
SESSION_EXPIRES_S = 2
FAST_TIMERS = TimerSettings(t1=0.05, t2=0.4, t4=0.5)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def start(
    workdir: Path,
    name: str,
    scenario: str,
    *,
    target: tuple[str, int] | None = None,
    callee: str | None = None,
    phone_port: int = 9,
    hold_ms: int = 0,
    keys: dict[str, str] | None = None,
) -> Sipp:
    """One SIPp: a UAS when ``callee`` is None, else a caller (1000) calling ``callee``."""
    injection = caller_injection(workdir, callee) if callee is not None else None
    return launch_sipp(
        workdir, name, scenario, target=target, hold_ms=hold_ms, injection=injection,
        keys={"phone_port": str(phone_port), **(keys or {})},
    )  # fmt: skip


def register(target: tuple[str, int], extension: str, *contact_ports: int) -> None:
    """Registers ``extension`` (password ``pw<extension>``) at one UDP port per binding."""
    with SipUdpClient(target) as client:
        for port in contact_ports:
            _, reply = client.register(
                extension, f"pw{extension}", contact=f"<sip:{extension}@{LOOPBACK_V4}:{port}>"
            )
            assert reply is not None and reply.status == 200, reply


def read_cdr(directory: Path, call_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(directory.glob("cdr-*.jsonl")):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("call_id") == call_id:
                        return record
        time.sleep(0.05)
    raise AssertionError(f"no CDR for {call_id} in {directory}")


def trace(sipp: Sipp) -> str:
    return "".join(
        path.read_text(errors="replace") for path in sorted(sipp.workdir.glob("*_messages.log"))
    )


def exchange_rtp(
    first: RtpPhone, first_target: tuple[str, int], second: RtpPhone,
    second_target: tuple[str, int],
) -> None:  # fmt: skip
    """Both phones send RTP_PACKETS at once, each to its relay address; waits for both."""
    senders = [
        threading.Thread(target=first.send, args=(first_target, RTP_PACKETS)),
        threading.Thread(target=second.send, args=(second_target, RTP_PACKETS)),
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=5)


def relay_media(port_range: tuple[int, int], size: int, media_timeout: int = 0) -> dict:
    """The media section of a relay owning ``size`` ports free now inside ``port_range``."""
    low = _free_udp_block(port_range[0], port_range[1], size)
    return {
        "backend": "relay", "bind_host": LOOPBACK_V4, "port_min": low,
        "port_max": low + size - 1, "media_timeout": media_timeout,
    }  # fmt: skip


def media_ports(media: dict) -> range:
    return range(media.get("port_min", 0), media.get("port_max", -1) + 1)


@dataclass
class RelayBench(Bench):
    """A switch subprocess and the RTP ports its relay was given."""

    ports: range = range(0)

    def log(self) -> str:
        return "--- switch log (tail) ---\n" + self.switch.log_text()[-4000:]


@contextlib.contextmanager
def relay_switch(
    workdir: Path, port_range: tuple[int, int], size: int, media_timeout: int = 0
) -> Iterator[RelayBench]:
    """A switch subprocess whose relay owns ``size`` free ports inside ``port_range``."""
    media = relay_media(port_range, size, media_timeout)
    sections = {"media": media, "calls": CALL_TIMERS}
    with running_switch(workdir / "switch", DEVICES, tcp=False, sections=sections) as switch:
        yield RelayBench(switch, workdir, media_ports(media))
        assert switch.process is not None and switch.process.poll() is None, "switch died"


@dataclass
class InProcessBench:
    """A switch running on this process's event loop, with what the tests need of it
    (the same names as :class:`RelayBench`)."""

    switch: Softswitch
    workdir: Path
    cdr_dir: Path
    ports: range

    @property
    def target(self) -> tuple[str, int]:
        _, host, port = self.switch.listening[0]
        return (host, port)

    def cdr(self, call_id: str) -> dict[str, Any]:
        return read_cdr(self.cdr_dir, call_id)

    def log(self) -> str:
        return "(the in-process switch logs to the test's captured output)"


@contextlib.asynccontextmanager
async def in_process_switch(
    workdir: Path, media: dict, *, timers: TimerSettings | None = None
) -> AsyncIterator[InProcessBench]:
    """A Softswitch built from a test configuration (UDP on a free loopback port, CDRs
    in ``workdir/cdr``), started here and stopped at the end of the block."""
    cdr_dir = workdir / "cdr"
    text = build_config(
        [Listener("udp", LOOPBACK_V4, free_sip_port(kinds=["udp"]))], DEVICES,
        sections={"media": media, "calls": CALL_TIMERS, "cdr": {"directory": str(cdr_dir)}},
    )  # fmt: skip
    switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")), timers=timers)
    await switch.start()
    try:
        yield InProcessBench(switch, workdir, cdr_dir, media_ports(media))
    finally:
        await switch.stop()


# --------------------------------------------------------------------------------------
# Switches
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayBench]:
    """The built-in relay with 100 ports and no media timeout."""
    with relay_switch(tmp_path_factory.mktemp("features"), MAIN_RELAY_PORTS, 100) as bench:
        yield bench


@pytest.fixture(scope="module")
def rtpengine_daemon() -> Iterator[Rtpengine]:
    with tempfile.TemporaryDirectory(prefix="softswitch-features-rtpengine-") as tmp:
        base = _free_udp_block(RTPENGINE_PORTS[0], RTPENGINE_PORTS[1], 20)
        yield from _run_rtpengine(Path(tmp), base, base + 19)


# --------------------------------------------------------------------------------------
# Blind transfer
# --------------------------------------------------------------------------------------


async def test_blind_transfer_connects_the_caller_to_the_target(tmp_path: Path) -> None:
    media = relay_media(IN_PROCESS_RELAY_PORTS, 100)
    async with in_process_switch(tmp_path, media) as bench:
        await asyncio.to_thread(blind_transfer, bench)
        calls = bench.switch.calls
        # the call ended: call control holds nothing of it, not even the dialog of the
        # leg the transfer created
        assert calls.calls == {} and calls.dialogs == {}, (calls.calls, calls.dialogs)


def blind_transfer(bench: InProcessBench) -> None:
    """A (1000) calls B (1001); B transfers A to C (1002); A and C talk, A hangs up."""
    work = bench.workdir / "transfer"
    with sipp_group() as started, phones("caller", "target") as (caller_phone, target_phone):
        target = start(work, "target", "uas_answer.xml", phone_port=target_phone.port)
        transferor = start(
            work, "transferor", "uas_answer_refer.xml",
            keys={"refer_to": f"sip:1002@{LOOPBACK_V4}"},
        )  # fmt: skip
        started += [target, transferor]
        register(bench.target, "1002", target.port)
        register(bench.target, "1001", transferor.port)
        caller = start(
            work, "caller", "uac_call_media.xml", target=bench.target, callee="1001",
            phone_port=caller_phone.port, hold_ms=3500,
        )  # fmt: skip
        started.append(caller)

        relay_a = caller.mline_port("relay_port.txt")
        relay_b = transferor.mline_port("relay_port.txt")
        try:
            relay_c = target.mline_port("relay_port.txt")  # the switch's INVITE to the target
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{transferor.describe()}\n{bench.log()}") from None
        ports = bench.ports
        assert relay_a in ports and relay_b in ports, (relay_a, relay_b)
        # the target is offered the relay port that faced the transferor: the caller's
        # side of the relay is kept
        assert relay_c == relay_b
        # 202, NOTIFY "100 Trying", NOTIFY "200 OK" (checked by the scenario), BYE
        assert transferor.wait() == 0, transferor.describe() + target.describe()

        # the caller (still in its call) and the target now talk through the relay
        exchange_rtp(caller_phone, (LOOPBACK_V4, relay_a), target_phone, (LOOPBACK_V4, relay_c))
        assert target_phone.wait_received(RTP_PACKETS) == RTP_PACKETS
        assert caller_phone.wait_received(RTP_PACKETS) == RTP_PACKETS

        # the caller hangs up: its BYE ends the target's leg
        assert caller.wait() == 0, caller.describe()
        assert target.wait() == 0, target.describe()

    notifies = received_requests(transferor, "NOTIFY")
    fragments = [re.split(r"\r?\n\r?\n", n.text, maxsplit=1)[-1].strip() for n in notifies]
    assert [f.split(" ")[1] for f in fragments[:2]] == ["100", "200"], fragments
    assert all((n.header("Content-Type") or "").startswith("message/sipfrag") for n in notifies)
    assert len(received_requests(transferor, "BYE")) >= 1
    invite = received_requests(target, "INVITE")[0]
    assert f"sip:{CALLER}@" in (invite.header("From") or ""), invite.text
    assert len(received_requests(target, "BYE")) >= 1
    assert {addr for _, addr in target_phone.received} == {(LOOPBACK_V4, relay_c)}
    payload = bytes([caller_phone.marker]) * RTP_PAYLOAD
    assert all(data[12:] == payload for data, _ in target_phone.received)

    record = bench.cdr(sipp_call_id(caller))
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record
    assert (record["device"], record["callee_dialled"]) == (CALLER, "1001"), record
    assert record["sip_status"] == 200 and record["answer"] is not None, record
    metrics = bench.switch.metrics
    for direction in ("caller_to_callee", "callee_to_caller"):
        assert record["media"][direction]["packets"] == RTP_PACKETS, record
        # the same figures reach the media metrics
        labels = {"direction": direction}
        assert metrics.value("softswitch_media_packets_total", labels) == RTP_PACKETS
        assert metrics.value("softswitch_media_bytes_total", labels) == (
            record["media"][direction]["bytes"]
        )


def test_transfer_to_an_unregistered_extension_is_refused_and_the_call_goes_on(
    relay_bench: RelayBench,
) -> None:
    bench = relay_bench
    work = bench.workdir / "transfer_refused"
    with sipp_group() as started:
        transferor = start(
            work, "transferor", "uas_answer_refer_refused.xml",
            keys={"refer_to": f"sip:1005@{LOOPBACK_V4}"},
        )  # fmt: skip
        started.append(transferor)
        register(bench.target, "1003", transferor.port)
        caller = start(
            work, "caller", "uac_call_media.xml", target=bench.target, callee="1003",
            hold_ms=1500,
        )  # fmt: skip
        started.append(caller)
        # the REFER got 480 (the scenario checks it); the caller's BYE, after it, still
        # reached the transferor through the switch, and got its 200
        assert caller.wait() == 0, caller.describe() + transferor.describe()
        assert transferor.wait() == 0, transferor.describe()
    assert "SIP/2.0 480 Transfer target is not registered" in trace(transferor)
    assert received_requests(transferor, "NOTIFY") == []
    record = bench.cdr(sipp_call_id(caller))
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record
    assert record["duration"] >= 1.0, record


# --------------------------------------------------------------------------------------
# INFO
# --------------------------------------------------------------------------------------


def test_info_is_relayed_in_the_dialog_and_answered_by_the_callee(
    relay_bench: RelayBench,
) -> None:
    bench = relay_bench
    work = bench.workdir / "info"
    with sipp_group() as started:
        callee = start(work, "callee", "uas_answer_info.xml")
        started.append(callee)
        register(bench.target, "1004", callee.port)
        caller = start(
            work, "caller", "uac_call_info.xml", target=bench.target, callee="1004", hold_ms=200
        )
        started.append(caller)
        assert caller.wait() == 0, caller.describe() + callee.describe()
        assert callee.wait() == 0, callee.describe()
    infos = received_requests(callee, "INFO")
    assert infos, callee.describe()
    assert infos[0].header("Content-Type") == "application/dtmf-relay"
    assert "Signal=5" in infos[0].text and "Duration=160" in infos[0].text
    # in the callee's dialog (the switch's Call-ID for that leg), not the caller's
    assert infos[0].header("Call-ID") != sipp_call_id(caller)
    assert "SIP/2.0 200 DTMF relayed" in trace(caller)
    record = bench.cdr(sipp_call_id(caller))
    assert record["end_cause"] == "normal", record


# --------------------------------------------------------------------------------------
# Session refresh (RFC 4028)
# --------------------------------------------------------------------------------------


async def test_session_refresh_ends_a_call_whose_callee_stopped_answering(
    tmp_path: Path,
) -> None:
    async with in_process_switch(tmp_path, {"backend": "none"}, timers=FAST_TIMERS) as bench:
        # below the 90 s the YAML allows, so the test takes seconds
        bench.switch.calls.session_expires = SESSION_EXPIRES_S
        with sipp_group() as started:
            callee = start(tmp_path, "callee", "uas_answer_ignore_refresh.xml")
            started.append(callee)
            await asyncio.to_thread(register, bench.target, "1001", callee.port)
            began = time.monotonic()
            caller = start(
                tmp_path, "caller", "uac_call_refreshed.xml", target=bench.target, callee="1001"
            )
            started.append(caller)
            caller_rc = await asyncio.to_thread(caller.wait)
            elapsed = time.monotonic() - began
            callee_rc = await asyncio.to_thread(callee.wait)
            # the caller answered its refresh and got a BYE whose Reason names the
            # failed refresh (the scenario checks it); the callee, which never answered
            # its refresh, got a BYE too
            assert caller_rc == 0, caller.describe() + callee.describe()
            assert callee_rc == 0, callee.describe()
        record = await asyncio.to_thread(bench.cdr, sipp_call_id(caller))
        assert bench.switch.calls.calls == {} and bench.switch.calls.dialogs == {}
    # one interval (1 s) + Timer F (3.2 s) after the answer, not the 32 s of default timers
    assert 3.5 < elapsed < 10, elapsed
    assert received_requests(caller, "OPTIONS"), caller.describe()
    refreshes = received_requests(callee, "OPTIONS")
    assert len(refreshes) >= 2, "the unanswered refresh was retransmitted"
    for sipp in (caller, callee):
        bye = received_requests(sipp, "BYE")[0]
        assert "Session refresh failed" in (bye.header("Reason") or ""), bye.text
    assert record["end_cause"] == "session_timeout" and record["hangup_by"] == "switch", record
    assert record["answer"] is not None, record


# --------------------------------------------------------------------------------------
# Media timeout
# --------------------------------------------------------------------------------------


def test_media_timeout_hangs_up_both_legs_with_a_reason(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("media_timeout")
    with relay_switch(workdir, TIMEOUT_RELAY_PORTS, 20, media_timeout=1) as bench:
        with sipp_group() as started:
            callee = start(workdir, "callee", "uas_answer.xml")
            started.append(callee)
            register(bench.target, "1001", callee.port)
            caller = start(
                workdir, "caller", "uac_call_remote_bye.xml", target=bench.target, callee="1001"
            )
            started.append(caller)
            # no RTP at all: after 1 s both legs get the switch's BYE
            assert caller.wait() == 0, caller.describe() + callee.describe()
            assert callee.wait() == 0, callee.describe()
        record = bench.cdr(sipp_call_id(caller))
    for sipp in (caller, callee):
        bye = received_requests(sipp, "BYE")[0]
        assert "media" in (bye.header("Reason") or "").lower(), bye.text
    assert record["end_cause"] == "media_timeout" and record["hangup_by"] == "switch", record
    assert 0.9 <= record["duration"] < 5, record


# --------------------------------------------------------------------------------------
# rtpengine
# --------------------------------------------------------------------------------------


def test_call_through_the_rtpengine_backend(
    tmp_path_factory: pytest.TempPathFactory, rtpengine_daemon: Rtpengine
) -> None:
    workdir = tmp_path_factory.mktemp("rtpengine_call")
    ng_host, ng_port = rtpengine_daemon.ng_address
    sections = {
        "media": {"backend": "rtpengine", "rtpengine": f"{ng_host}:{ng_port}"},
        "calls": CALL_TIMERS,
    }
    engine_ports = range(rtpengine_daemon.port_min, rtpengine_daemon.port_max + 1)
    with running_switch(workdir / "switch", DEVICES, tcp=False, sections=sections) as switch:
        bench = Bench(switch, workdir)
        with sipp_group() as started, phones("caller", "callee") as (caller_phone, callee_phone):
            callee = start(workdir, "callee", "uas_answer.xml", phone_port=callee_phone.port)
            started.append(callee)
            register(bench.target, "1001", callee.port)
            caller = start(
                workdir, "caller", "uac_call_media.xml", target=bench.target, callee="1001",
                phone_port=caller_phone.port, hold_ms=1500,
            )  # fmt: skip
            started.append(caller)
            port_a = caller.mline_port("relay_port.txt")
            port_b = callee.mline_port("relay_port.txt")
            # both SDPs rewritten to rtpengine's own ports
            assert port_a in engine_ports and port_b in engine_ports, (port_a, port_b)
            assert port_a != port_b
            exchange_rtp(caller_phone, (LOOPBACK_V4, port_a), callee_phone, (LOOPBACK_V4, port_b))
            assert callee_phone.wait_received(RTP_PACKETS) == RTP_PACKETS
            assert caller_phone.wait_received(RTP_PACKETS) == RTP_PACKETS
            assert caller.wait() == 0, caller.describe() + callee.describe()
            assert callee.wait() == 0, callee.describe()
        record = bench.cdr(sipp_call_id(caller))
        assert switch.process is not None and switch.process.poll() is None, "switch died"
    assert {addr for _, addr in callee_phone.received} == {(LOOPBACK_V4, port_b)}
    assert {addr for _, addr in caller_phone.received} == {(LOOPBACK_V4, port_a)}
    assert all(
        d[12:] == bytes([caller_phone.marker]) * RTP_PAYLOAD for d, _ in callee_phone.received
    )
    assert record["end_cause"] == "normal" and record["sip_status"] == 200, record
    for direction in ("caller_to_callee", "callee_to_caller"):
        stats = record["media"][direction]
        assert stats["packets"] == RTP_PACKETS, record
        assert stats["bytes"] >= RTP_PACKETS * RTP_PAYLOAD, record


# --------------------------------------------------------------------------------------
# Port exhaustion
# --------------------------------------------------------------------------------------


def test_relay_port_exhaustion_answers_503_and_ports_come_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    workdir = tmp_path_factory.mktemp("ports")
    # 4 ports: two RTP/RTCP pairs, one call's worth
    with relay_switch(workdir, TINY_RELAY_PORTS, 4) as bench, sipp_group() as started:
        first_callee = start(workdir, "first_callee", "uas_answer.xml")
        started.append(first_callee)
        register(bench.target, "1001", first_callee.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent_phone:
            silent_phone.bind((LOOPBACK_V4, 0))
            register(bench.target, "1002", silent_phone.getsockname()[1])
            first = start(
                workdir, "first", "uac_call_media.xml", target=bench.target, callee="1001",
                hold_ms=1500,
            )  # fmt: skip
            started.append(first)
            assert first.mline_port("relay_port.txt") in bench.ports  # answered

            refused = start(
                workdir, "refused", "uac_call_no_media_ports.xml", target=bench.target,
                callee="1002",
            )  # fmt: skip
            started.append(refused)
            assert refused.wait() == 0, refused.describe()
            assert refused.file("final_status.txt") == "503"
            # the refused call never reached its callee
            silent_phone.settimeout(0.1)
            with pytest.raises(TimeoutError):
                silent_phone.recvfrom(4096)
        assert first.wait() == 0, first.describe()
        assert first_callee.wait() == 0, first_callee.describe()

        # the first call's ports were released when it ended: a new call gets them
        next_callee = start(workdir, "next_callee", "uas_answer.xml")
        started.append(next_callee)
        register(bench.target, "1003", next_callee.port)
        after = start(workdir, "after", "uac_call_media.xml", target=bench.target, callee="1003")
        started.append(after)
        assert after.wait() == 0, after.describe() + next_callee.describe()
        assert next_callee.wait() == 0, next_callee.describe()

        refused_record = bench.cdr(sipp_call_id(refused))
        assert refused_record["sip_status"] == 503, refused_record
        assert refused_record["answer"] is None and refused_record["end_cause"] == "failed"
        assert bench.cdr(sipp_call_id(first))["end_cause"] == "normal"
        assert bench.cdr(sipp_call_id(after))["end_cause"] == "normal"

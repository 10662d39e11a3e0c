"""The registrar against SIPp 3.6: digest registrations of 100 users over UDP and TCP,
unregistration, wrong passwords and the source ban that follows."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from switch_process import (
    LOOPBACK_V4,
    PEERS_DIR,
    SipDevice,
    SipUdpClient,
    SwitchProcess,
    free_port,
    free_sip_port,
    running_switch,
)

SIPP_DIR = PEERS_DIR / "sipp"
USERS_CSV = SIPP_DIR / "users_1000_1099.csv"
SIPP_WALL_S = 30.0  # hard limit of one SIPp run; it is killed by PID after that
USERS = SipDevice.numbered(1000, 1099)


def sipp_binary() -> str:
    binary = shutil.which("sipp")
    if binary is None:
        pytest.fail(
            "sipp is not installed (not found on PATH): run `make test`, which installs "
            "the Debian package sip-tester before running the suite"
        )
    return binary


@dataclass(slots=True)
class SippRun:
    returncode: int
    successful: int
    failed: int
    output: str
    errors: str
    local_port: int

    def describe(self) -> str:
        return (
            f"sipp exit {self.returncode}, successful={self.successful}, failed={self.failed}\n"
            f"--- output ---\n{self.output[-3000:]}\n--- errors ---\n{self.errors[-3000:]}"
        )


def _stat_totals(stat_file: Path) -> tuple[int, int]:
    """SuccessfulCall(C) and FailedCall(C) of the last line of SIPp's -trace_stat file."""
    with stat_file.open(newline="", encoding="latin-1") as handle:
        rows = [row for row in csv.reader(handle, delimiter=";") if row]
    header, last = rows[0], rows[-1]
    return int(last[header.index("SuccessfulCall(C)")]), int(last[header.index("FailedCall(C)")])


def run_sipp(
    workdir: Path,
    target: tuple[str, int],
    scenario: Path,
    injection: Path,
    *,
    calls: int,
    transport: str = "u1",
    rate: int = 200,
    expires: int = 3600,
    local_port: int | None = None,
    extra: list[str] | None = None,
) -> SippRun:
    """Runs one bounded SIPp client and returns its exit status and call totals."""
    binary = sipp_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = ["tcp"] if transport.startswith("t") else ["udp"]
    if local_port is None:
        local_port = free_sip_port([LOOPBACK_V4], kinds)
    stat_file = workdir / "stat.csv"
    error_file = workdir / "errors.log"
    command = [
        binary, f"{target[0]}:{target[1]}",
        "-sf", str(scenario), "-inf", str(injection),
        "-i", LOOPBACK_V4, "-p", str(local_port), "-cp", str(free_port("udp")),
        "-t", transport, "-m", str(calls), "-r", str(rate), "-rp", "1000",
        "-key", "expires", str(expires), "-buff_size", "4194304", "-nostdin",
        "-timeout", "20s", "-timeout_error", "-recv_timeout", "5000", "-max_retrans", "5",
        "-trace_stat", "-stf", str(stat_file), "-fd", "1",
        "-trace_err", "-error_file", str(error_file),
        *(extra or []),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=workdir, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=SIPP_WALL_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=5)
        pytest.fail(f"sipp hung for {SIPP_WALL_S:.0f} s and was killed:\n{output.decode()[-3000:]}")
    successful, failed = _stat_totals(stat_file) if stat_file.exists() else (-1, -1)
    errors = error_file.read_text(errors="replace") if error_file.exists() else ""
    return SippRun(
        process.returncode, successful, failed,
        output.decode(errors="replace"), errors, local_port,
    )  # fmt: skip


def _bindings_of_all(switch: SwitchProcess) -> dict[str, list[str]]:
    with SipUdpClient(switch.address("udp")) as client:
        return {u.extension: client.bindings(u.extension, u.password) for u in USERS}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("transport", "sipp_transport"), [("udp", "u1"), ("tcp", "t1")])
def test_hundred_users_register_then_unregister(
    tmp_path: Path, transport: str, sipp_transport: str
) -> None:
    with running_switch(tmp_path / "switch", USERS) as switch:
        target = switch.address(transport)
        run = run_sipp(
            tmp_path / "register",
            target,
            SIPP_DIR / "register_digest.xml",
            USERS_CSV,
            calls=len(USERS),
            transport=sipp_transport,
        )
        assert run.returncode == 0, run.describe()
        assert (run.successful, run.failed) == (len(USERS), 0), run.describe()

        bindings = _bindings_of_all(switch)
        for user in USERS:
            contacts = bindings[user.extension]
            assert len(contacts) == 1, (user.extension, contacts)
            expected = f"<sip:{user.extension}@127.0.0.1:{run.local_port};transport="
            assert contacts[0].lower().startswith(expected.lower()), contacts
            assert f";transport={transport}>" in contacts[0].lower(), contacts
            expires = int(contacts[0].rsplit("expires=", 1)[1].split(";")[0])
            assert 3500 < expires <= 3600, contacts

        run = run_sipp(
            tmp_path / "unregister",
            target,
            SIPP_DIR / "register_digest.xml",
            USERS_CSV,
            calls=len(USERS),
            transport=sipp_transport,
            expires=0,
            local_port=run.local_port,
        )
        assert run.returncode == 0, run.describe()
        assert (run.successful, run.failed) == (len(USERS), 0), run.describe()
        assert _bindings_of_all(switch) == {u.extension: [] for u in USERS}
        assert switch.process is not None and switch.process.poll() is None


@pytest.mark.timeout(60)
def test_wrong_password_gets_401_and_then_the_source_is_banned(tmp_path: Path) -> None:
    failures_before_ban = 5
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(
        "SEQUENTIAL\n"
        + "".join(
            f"{u.extension};bad;127.0.0.1;"
            f"[authentication username={u.extension} password=not-{u.password}]\n"
            for u in USERS[:failures_before_ban]
        )
    )
    with running_switch(
        tmp_path / "switch",
        USERS,
        ban={"max_failures_per_source": failures_before_ban, "max_failures_per_user": 1000},
    ) as switch:
        target = switch.address("udp")
        # the right password works from this address before any failure
        with SipUdpClient(target) as client:
            _, ok = client.register("1099", "pw1099", contact=f"<sip:1099@{client.host_port}>")
            assert ok is not None and ok.status == 200, ok

        run = run_sipp(
            tmp_path / "wrong",
            target,
            SIPP_DIR / "register_wrong_password.xml",
            wrong,
            calls=failures_before_ban,
        )
        assert run.returncode == 0, run.describe()
        assert (run.successful, run.failed) == (failures_before_ban, 0), run.describe()

        banned = switch.wait_for_event("register.source_banned", timeout=3)
        assert [e.get("source") for e in banned] == ["127.0.0.1"], switch.log_text()[-3000:]

        run = run_sipp(
            tmp_path / "banned",
            target,
            SIPP_DIR / "register_banned.xml",
            USERS_CSV,
            calls=3,
        )
        assert run.returncode == 0, run.describe()
        assert (run.successful, run.failed) == (3, 0), run.describe()

        # the ban is on the address: the right password is refused too, without challenge
        with SipUdpClient(target) as client:
            first, last = client.register(
                "1099", "pw1099", contact=f"<sip:1099@{client.host_port}>"
            )
            assert first is not None and first.status == 403, first
            assert first.all("WWW-Authenticate") == []
            assert last is first

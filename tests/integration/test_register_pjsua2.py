"""The registrar against a real PJSIP user agent (pjsua2, pjsip 2.14): digest
registration kept alive by refreshes, then unregistration; a wrong password never
registers.

The switch and the pjsua2 client run together inside `unshare -n` (a network namespace
with only `lo`), driven by tests/peers/pjsua2/netns_runner.py, which reports what it saw
as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from switch_process import PEERS_DIR, SipDevice, prepare_switch

RUNNER = PEERS_DIR / "pjsua2" / "netns_runner.py"
RUNNER_WALL_S = 60.0
# pjsip refreshes `delayBeforeRefreshSec` before expiry, but never sooner than 5 s
# after a registration: with 7 s asked and 2 s of margin it refreshes every 5 s.
EXPIRES = 7
REFRESH_BEFORE = 2
WANT_OK = 2  # the first registration and one refresh
DEVICES = SipDevice.numbered(1000, 1002)

pytestmark = pytest.mark.timeout(90)


def _require_tools() -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed: run `make test`")
    try:
        import pjsua2  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"module pjsua2 missing ({exc}): run `make test` (pjsua2-pybind11 wheel)")


def run_in_netns(
    workdir: Path, user: str, password: str, client_args: list[str]
) -> tuple[int, dict[str, Any], str]:
    """Starts the switch and the pjsua2 client inside `unshare -n`; returns the exit
    status, the runner's report and its own output."""
    _require_tools()
    switch = prepare_switch(
        workdir, DEVICES, tcp=False, log_level="debug",
        registrar={"min_expires": 5, "max_expires": 3600, "default_expires": 60},
    )  # fmt: skip
    host, port = switch.address("udp")
    report_path = workdir / "report.json"
    command = [
        "unshare", "-n", sys.executable, str(RUNNER),
        "--config", str(switch.config_path), "--switch-udp", f"{host}:{port}",
        "--user", user, "--password", password, "--report", str(report_path),
        "--",
        "--registrar", f"sip:{host}:{port}", "--domain", host,
        "--user", user, "--password", password, "--expires", str(EXPIRES), *client_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=RUNNER_WALL_S)
    except subprocess.TimeoutExpired:
        # the runner leads its own session: stop it and the switch/client it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=5)
        pytest.fail(f"netns runner hung and was killed:\n{output.decode()[-3000:]}")
    text = output.decode(errors="replace")
    if not report_path.exists():
        pytest.fail(f"runner wrote no report (exit {process.returncode}):\n{text[-3000:]}")
    return process.returncode, json.loads(report_path.read_text()), text


def _events(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in report["client_events"] if e.get("event") == name]


def _switch_events(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Switch log events about the pjsua2 client's requests (the runner's own binding
    queries carry Call-IDs ending in @itest)."""
    found = []
    for line in report["switch_log"]:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if (
                isinstance(event, dict)
                and event.get("event") == name
                and not str(event.get("call_id", "")).endswith("@itest")
            ):
                found.append(event)
    return found


def _describe(status: int, report: dict[str, Any], output: str) -> str:
    return (
        f"exit {status}, runner_error={report.get('runner_error')}, "
        f"switch exited early with {report.get('switch_exited_early')}\n"
        f"client: {json.dumps(report['client_events'])[-3000:]}\n"
        f"queries: {report['queries']}\nswitch log tail:\n"
        + "\n".join(report["switch_log"][-20:])
        + f"\nrunner output:\n{output[-1500:]}"
    )


def test_pjsua2_registers_keeps_the_binding_alive_and_unregisters(tmp_path: Path) -> None:
    status, report, output = run_in_netns(
        tmp_path, "1000", "pw1000",
        [
            "--refresh-before", str(REFRESH_BEFORE), "--want-ok", str(WANT_OK),
        ],
    )  # fmt: skip
    detail = _describe(status, report, output)
    assert status == 0 and report["runner_error"] is None, detail
    assert report["switch_exited_early"] is None, detail

    states = _events(report, "reg_state")
    successes = [s for s in states if s["code"] == 200 and s["expiration"] > 0]
    assert len(successes) >= WANT_OK, detail
    assert all(0 < s["expiration"] <= EXPIRES for s in successes), detail

    # the switch processed each of those REGISTERs (digest checked, binding stored)
    registered = [e for e in _switch_events(report, "register.ok") if "1000@" in e.get("aor", "")]
    assert len(registered) >= WANT_OK + 1, detail  # + the unregistration

    # asked right after the refresh: the binding is live with a renewed expiry (the
    # first registration, 5 s older, would have about 2 s left)
    live = report["queries"]["registered"]
    assert isinstance(live, list) and len(live) == 1, detail
    assert live[0].startswith("<sip:1000@127.0.0.1:"), detail
    assert EXPIRES - 1 <= int(live[0].rsplit("expires=", 1)[1]) <= EXPIRES, detail
    assert _events(report, "unregistered") == [{"event": "unregistered", "done": True}], detail
    assert report["queries"]["after"] == [], detail


def test_pjsua2_with_a_wrong_password_never_registers(tmp_path: Path) -> None:
    status, report, output = run_in_netns(
        tmp_path, "1001", "pw1001",
        ["--password", "not-pw1001", "--expect-failure", "--timeout", "10"],
    )  # fmt: skip
    detail = _describe(status, report, output)
    assert status == 0 and report["runner_error"] is None, detail
    assert report["switch_exited_early"] is None, detail
    codes = [s["code"] for s in _events(report, "reg_state")]
    assert codes and all(code in (401, 403) for code in codes), detail
    assert 200 not in codes, detail
    assert _switch_events(report, "register.auth_failed"), detail
    assert _switch_events(report, "register.ok") == [], detail
    assert report["queries"]["after"] == [], detail

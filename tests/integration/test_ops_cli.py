"""Everyday operations from the command line against a running switch process, and its
graceful shutdown.

The switch runs as ``python -m switch run`` with its admin listener on a free loopback
port and a write token; the CLI finds the API from the same YAML (``admin.listen``) and
takes the token from ``$SOFTSWITCH_ADMIN_TOKEN``. `SipUA` phones register and call.
Checked: ``registrations`` lists the registered phone, ``calls`` lists a call and
``calls --hangup`` ends it (both phones get a BYE), ``location set`` then ``location
history``, ``reload``, ``availability``; the API's export of the person behind a device
(live registration, CDRs) and their erasure while the switch runs (the CDR ledger keeps
writing to the rewritten file). Then SIGTERM with a call up: a new INVITE gets 503 with
Retry-After, the call in progress still answers a re-INVITE and ends with BYE, the process
exits 0 once it has no call, its CDR is on disk and the availability state shows a clean
stop."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from switch_process import REPO_ROOT, SipDevice, SwitchProcess, free_port, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from sipua import SipUA  # noqa: E402

from switch.cli import main  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TOKEN = secrets.token_hex(20)
ALICE = SipDevice("1000", "pw1000-secret", {"site": "hq", "location": "f1"})
BOB = SipDevice("1001", "pw1001-secret", {"site": "hq", "location": "f1"})
SITE = {
    "id": "hq", "country": "FR",
    "address": {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
                "HNO": "10", "PC": "69002"},
    "callback_number": "+33478000100", "routes": [],
    "locations": [{"id": "f1", "FLR": "1"}, {"id": "f2", "FLR": "2"}],
}  # fmt: skip
GRACE_S = 20


def _sections(workdir: Path) -> dict:
    return {
        "media": {"backend": "none"},
        "cdr": {"directory": str(workdir / "var" / "cdr")},
        "dialplan": {"country": "FR"},
        "calls": {"shutdown_grace": GRACE_S},
        "emergency": {"journal_dir": str(workdir / "var" / "emergency"), "sites": [SITE]},
        "admin": {"enabled": True, "listen": {"host": "127.0.0.1", "port": free_port("tcp")},
                  "tokens": [{"name": "ops", "token": TOKEN, "role": "write"}]},
    }


@pytest.fixture
async def switch(tmp_path: Path) -> AsyncIterator[SwitchProcess]:
    process = prepare_switch(tmp_path, [ALICE, BOB], tcp=False, sections=_sections(tmp_path))
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``python -m switch ARGV`` in a thread (the phones' event loop keeps running)."""
    capsys.readouterr()
    os.environ["SOFTSWITCH_ADMIN_TOKEN"] = TOKEN
    try:
        code = await asyncio.wait_for(asyncio.to_thread(main, list(argv)), 20)
    finally:
        del os.environ["SOFTSWITCH_ADMIN_TOKEN"]
    out, err = capsys.readouterr()
    return code, out, err


async def test_cli_registrations_calls_hangup_location_and_reload(
    switch: SwitchProcess, capsys: pytest.CaptureFixture[str],
) -> None:
    config = str(switch.config_path)
    async with SipUA(ALICE.extension, ALICE.password, switch.address()) as alice, \
            SipUA(BOB.extension, BOB.password, switch.address()) as bob:
        assert (await alice.register(expires=300)).status == 200
        assert (await bob.register(expires=300)).status == 200

        # the real entry point, as an operator types it: python -m switch registrations
        env = {**os.environ, "SOFTSWITCH_ADMIN_TOKEN": TOKEN,
               "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH"))))}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "switch", "registrations", "--config", config,
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 20)
        assert process.returncode == 0, err.decode()
        rows = out.decode().splitlines()
        assert rows[0].startswith("AOR") and len(rows) == 3, out
        alice_row = next(row for row in rows if row.startswith("1000@"))
        assert f"udp:127.0.0.1:{alice.address[1]}" in alice_row, alice_row
        assert "softswitch-test-peer/1" in alice_row and "sip:1000@127.0.0.1:" in alice_row
        code, out, _ = await cli(capsys, "registrations", "-c", config, "--json")
        assert code == 0 and json.loads(out)["total"] == 2, out

        # a call, listed, then hung up from the CLI: both phones get a BYE
        call = await alice.invite(BOB.extension, timeout=8)
        assert call.answered, call.final
        code, out, _ = await cli(capsys, "calls", "-c", config)
        assert code == 0 and call.call_id in out and "confirmed" in out, out
        code, out, _ = await cli(capsys, "calls", "-c", config, "--hangup", call.call_id)
        assert code == 0 and "hanging up" in out, out
        assert await call.wait_request("BYE", timeout=5) is not None
        assert await bob.incoming_calls[-1].wait_request("BYE", timeout=5) is not None
        code, out, _ = await cli(capsys, "calls", "-c", config, "--json")
        assert json.loads(out)["items"] == [], out
        code, _, err = await cli(capsys, "calls", "-c", config, "--hangup", call.call_id)
        assert code == 1 and "404" in err, err

        # the person behind 1000 through the API: export, then erasure while running
        base = _admin_url(switch)
        exported = await asyncio.to_thread(_api, base, "GET", "/api/v1/privacy/1000")
        assert [r["source"] for r in exported["registrations"]] == [
            f"udp:127.0.0.1:{alice.address[1]}"], exported["registrations"]
        assert [r["call_id"] for r in exported["cdrs"]] == [call.call_id], exported["cdrs"]
        erased = await asyncio.to_thread(_api, base, "POST", "/api/v1/privacy/1000/erase")
        assert erased["cdr"]["records"] == 1 and erased["emergency_journal"]["erased"] is False
        after = await asyncio.to_thread(_api, base, "GET", "/api/v1/privacy/1000")
        assert after["cdrs"] == [], after["cdrs"]
        # the ledger goes on writing after its file was rewritten under it
        second = await bob.invite(ALICE.extension, timeout=8)
        assert second.answered, second.final
        assert (await second.bye()).status == 200
        assert switch.wait_for_event("call.ended", count=2, timeout=5)
        for _ in range(50):
            again = await asyncio.to_thread(_api, base, "GET", "/api/v1/privacy/1000")
            if again["cdrs"]:
                break
            await asyncio.sleep(0.05)
        assert [r["call_id"] for r in again["cdrs"]] == [second.call_id], again["cdrs"]

    code, out, _ = await cli(capsys, "availability", "-c", config, "--json")
    availability = json.loads(out)
    assert code == 0 and availability["running_since"] is not None, out
    assert availability["unavailable_minutes"] == 0 and availability["availability"] == 1.0

    # location set, then its history (journaled as the token's name)
    code, out, err = await cli(capsys, "location", "set", "1000", "hq", "f2", "-c", config)
    assert code == 0 and "hq/f2" in out and "verified" in out, (out, err)
    code, out, _ = await cli(capsys, "location", "history", "1000", "-c", config, "--json")
    last = json.loads(out)["entries"][-1]
    assert last["who"] == "admin:ops" and last["location_id"] == "f2", last
    code, _, err = await cli(capsys, "location", "set", "1000", "nowhere", "-c", config)
    assert code == 1 and "nowhere" in err, err

    # reload: applied; a broken file is refused with its file:line errors
    code, out, err = await cli(capsys, "reload", "-c", config)
    assert code == 0 and "applied" in out, (out, err)
    assert switch.wait_for_event("switch.reloaded", timeout=5)
    good = switch.config_path.read_text()
    switch.config_path.write_text(good.replace('"1001"', '"10x1"', 1))
    try:
        code, _, err = await cli(capsys, "reload", "-c", config)
    finally:
        switch.config_path.write_text(good)
    assert code == 1 and "switch.yaml:" in err and "refused" in err, err

    # no token: a clear message, not a traceback
    capsys.readouterr()
    assert main(["registrations", "-c", config]) == 2
    assert "SOFTSWITCH_ADMIN_TOKEN" in capsys.readouterr().err


async def test_sigterm_drains_calls_refuses_new_ones_and_exits_cleanly(
    switch: SwitchProcess,
) -> None:
    process = switch.process
    assert process is not None
    cdr_directory = Path(_cdr_dir(switch))
    async with SipUA(ALICE.extension, ALICE.password, switch.address()) as alice, \
            SipUA(BOB.extension, BOB.password, switch.address()) as bob:
        assert (await alice.register(expires=300)).status == 200
        assert (await bob.register(expires=300)).status == 200
        call = await alice.invite(BOB.extension, timeout=8)
        assert call.answered, call.final

        os.kill(process.pid, signal.SIGTERM)
        assert await asyncio.to_thread(switch.wait_for_event, "switch.draining", 1, 5)
        refused = await bob.invite(ALICE.extension, timeout=5)
        assert refused.status == 503, refused.final
        assert refused.final.header("Retry-After") == "30", refused.final

        await asyncio.sleep(0.5)
        assert process.poll() is None  # still up: a call is in progress
        answer = await call.reinvite()
        assert answer is not None and answer.status == 200, answer
        assert (await call.bye()).status == 200

        code = await asyncio.to_thread(process.wait, 10)
    assert code == 0, switch.log_text()[-3000:]
    drained = switch.events("switch.drained")
    assert drained and drained[0]["calls_left"] == 0 and drained[0]["invites_refused"] == 1
    assert drained[0]["waited_seconds"] < GRACE_S

    records = [json.loads(line) for path in sorted(cdr_directory.glob("cdr-*.jsonl"))
               for line in path.read_text().splitlines()]
    mine = [r for r in records if r["call_id"] == call.call_id]
    assert len(mine) == 1 and mine[0]["end_cause"] == "normal", records
    assert mine[0]["answer"] is not None and mine[0]["hangup_by"] == "caller"
    state = json.loads((cdr_directory.parent / "availability.json").read_text())
    assert state["current"] is None and len(state["periods"]) == 1, state  # a clean stop


def _admin_url(switch: SwitchProcess) -> str:
    for line in switch.config_path.read_text().splitlines():
        if line.startswith("admin:"):
            listen = json.loads(line.partition(":")[2])["listen"]
            return f"http://{listen['host']}:{listen['port']}"
    raise AssertionError("no admin section")


def _api(base: str, method: str, path: str) -> dict:
    request = urllib.request.Request(base + path, method=method,
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _cdr_dir(switch: SwitchProcess) -> str:
    for line in switch.config_path.read_text().splitlines():
        if line.startswith("cdr:"):
            return json.loads(line.partition(":")[2])["directory"]
    raise AssertionError("no cdr section")

"""Client registration to a provider played by SIPp 3.6 (UAS) on loopback.

The provider answers the first REGISTER with a 401 digest challenge, checks the
credentials of the next one with SIPp's own ``verifyauth`` (403 when they are wrong), and
grants 2 seconds, so our `TrunkRegistration`, driven by a real `SignallingCore`, must
refresh within the test. The refresh re-uses the nonce with the next nonce-count (SIPp
verifies it too); the provider then challenges the refresh anyway with a new nonce, which
must be answered. Finally stop() unregisters (Expires: 0) with valid credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from switch.metrics import SwitchMetrics
from switch.signalling import SignallingCore
from switch.trunks import RegistrationState, Trunk, TrunkRegistration, TrunkResolver

LOOPBACK = "127.0.0.1"
USERNAME = "trunkuser"
PASSWORD = "trunk-secret"
REALM = "provider.test"
GRANTED = 2  # seconds the provider grants: the refresh comes after 1 s
SIPP_START_S = 5.0
SIPP_WALL_S = 20.0

pytestmark = pytest.mark.integration

# Every authenticated REGISTER is checked by verifyauth; a bad one gets 403 and the
# SIPp call then fails (it waits for a request that never comes), so SIPp exits non-zero.
_HEADERS = """\
      [last_Via:]
      [last_From:]
      [last_To:];tag=provider[pid]
      [last_Call-ID:]
      [last_CSeq:]"""


def _challenge(nonce: str) -> str:
    return f"""
  <send>
    <![CDATA[

      SIP/2.0 401 Unauthorized
{_HEADERS}
      WWW-Authenticate: Digest realm="{REALM}", nonce="{nonce}", qop="auth", algorithm=MD5
      Content-Length: 0

    ]]>
  </send>
"""


def _authenticated_register(ok_label: str, password: str) -> str:
    return f"""
  <recv request="REGISTER" next="{ok_label}" test="authvalid">
    <action>
      <ereg regexp="Digest .*username=.{USERNAME}." search_in="hdr" header="Authorization:"
            check_it="true" assign_to="digest"/>
      <verifyauth assign_to="authvalid" username="{USERNAME}" password="{password}"/>
    </action>
  </recv>
  <nop next="refused"/>
"""


def _ok(label: str, expires: str) -> str:
    # the unregistering Contact already carries ;expires=0
    contact = "[last_Contact:]" if expires == "0" else f"[last_Contact:];expires={expires}"
    return f"""
  <label id="{label}"/>
  <send>
    <![CDATA[

      SIP/2.0 200 OK
{_HEADERS}
      {contact}
      Expires: {expires}
      Content-Length: 0

    ]]>
  </send>
"""


def scenario(password: str) -> str:
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="provider registrar with digest">
  <recv request="REGISTER"/>
  {_challenge("first-nonce-[pid]")}
  {_authenticated_register("registered", password)}
  {_ok("registered", str(GRANTED))}
  {_authenticated_register("refresh_preemptive_ok", password)}
  <label id="refresh_preemptive_ok"/>
  {_challenge("second-nonce-[pid]")}
  {_authenticated_register("refreshed", password)}
  {_ok("refreshed", str(GRANTED))}
  {_authenticated_register("unregistered", password)}
  {_ok("unregistered", "0")}
  <nop next="end"/>

  <label id="refused"/>
  <send>
    <![CDATA[

      SIP/2.0 403 Forbidden
{_HEADERS}
      Content-Length: 0

    ]]>
  </send>
  <recv request="NEVER" timeout="300"/>
  <label id="end"/>
</scenario>
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def udp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


class SippProvider:
    """SIPp as the provider's registrar: one "call" (all REGISTERs share a Call-ID)."""

    def __init__(self, workdir: Path, password: str) -> None:
        binary = shutil.which("sipp")
        if binary is None:
            pytest.fail(
                "sipp is not installed (Debian package sip-tester; `make test` installs it)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_udp_port()
        self.messages = workdir / "messages.log"
        self.errors = workdir / "errors.log"
        (workdir / "provider.xml").write_text(scenario(password))
        command = [
            binary, "-sf", str(workdir / "provider.xml"), "-i", LOOPBACK, "-p", str(self.port),
            "-cp", str(free_udp_port()), "-t", "u1", "-m", "1", "-nostdin",
            "-timeout", f"{SIPP_WALL_S - 5:.0f}s", "-timeout_error",
            "-trace_msg", "-message_file", str(self.messages),
            "-trace_err", "-error_file", str(self.errors),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + SIPP_START_S
        while not udp_port_taken(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"sipp did not start listening:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.messages.read_text(errors="replace") if self.messages.exists() else ""

    async def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.communicate(timeout=5)


async def registration_against(provider: SippProvider, password: str):
    core = SignallingCore(SwitchMetrics())
    await core.listen("udp", LOOPBACK, 0)
    trunk = Trunk(
        id="provider",
        kind="provider",
        host=LOOPBACK,
        port=provider.port,
        transport="udp",
        username=USERNAME,
        password=password,
        realm=REALM,
        register=True,
    )
    registration = TrunkRegistration(
        trunk,
        core,
        TrunkResolver(),
        min_refresh=1.0,
        retry_initial=30.0,
        request_timeout=5.0,
        stop_timeout=5.0,
    )
    return core, registration


async def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.timeout(60)
async def test_registers_with_digest_refreshes_and_unregisters(tmp_path: Path) -> None:
    provider = SippProvider(tmp_path / "sipp", PASSWORD)
    core, registration = await registration_against(provider, PASSWORD)
    try:
        registration.start()
        assert await wait_for(lambda: registration.registrations >= 1, 10), provider.output()
        assert registration.state is RegistrationState.REGISTERED
        assert registration.granted_expires == GRANTED
        assert await wait_for(lambda: registration.registrations >= 2, 10), provider.output()
        started = time.monotonic()
        await registration.stop()
        assert time.monotonic() - started < 3.0  # the 200 was understood, no timeout
        assert registration.state is RegistrationState.UNREGISTERED
        assert registration.last_status == 200
        exit_code = await provider.wait(10)
    finally:
        await registration.stop()
        await core.close()
        provider.stop()
    log = provider.output()
    assert exit_code == 0, f"sipp exit {exit_code}\n{log[-4000:]}"
    authorizations = re.findall(r"^Authorization: (.*)$", log, flags=re.MULTILINE)
    # answer to the first challenge, pre-emptive refresh, answer to the second, unregister
    assert len(authorizations) == 4, log[-4000:]
    assert all(f'username="{USERNAME}"' in a and f'realm="{REALM}"' in a for a in authorizations)
    nonces_and_counts = [
        (
            re.search(r'nonce="([^"]+)"', a).group(1).split("-")[0],
            re.search(r"nc=(\w+)", a).group(1),
        )
        for a in authorizations
    ]
    assert nonces_and_counts == [
        ("first", "00000001"),
        ("first", "00000002"),
        ("second", "00000001"),
        ("second", "00000002"),
    ]
    assert PASSWORD not in log
    assert re.search(r"^Expires: 0\s*$", log, flags=re.MULTILINE), log[-2000:]


@pytest.mark.timeout(60)
async def test_wrong_password_is_refused_and_reported_failed(tmp_path: Path) -> None:
    provider = SippProvider(tmp_path / "sipp", PASSWORD)
    core, registration = await registration_against(provider, "not-the-password")
    try:
        registration.start()
        assert await wait_for(lambda: registration.state is RegistrationState.FAILED, 10), (
            provider.output()
        )
        assert registration.last_status == 403
        assert registration.registrations == 0
        exit_code = await provider.wait(10)
    finally:
        await registration.stop()
        await core.close()
        provider.stop()
    assert exit_code not in (0, None), provider.output()[-3000:]

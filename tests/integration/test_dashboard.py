"""The built-in dashboard (switch/dashboard.py) in a real headless Chromium.

An in-process switch (UDP on loopback, the built-in RTP relay, emergency site ``hq``,
devices 1000-1002 located there and a nomadic device 1003 with no location) runs its admin
listener on a free loopback port with the dashboard's routes added. Debian's ``chromium``
is started headless with a throw-away profile and driven through the DevTools protocol
over a websocket (aiohttp): the page is opened, a read token entered, the tiles checked
(no call, two registrations, device 1003 listed without a location); then 1000 calls 1001
through the switch and RTP is sent into the relay, and the page must show, within a few
seconds, one active call listed with its Call-ID (its hang-up button disabled for a read
token), the ASR at 100 % and media packets per second above zero. With a write token the
hang-up button (clicked twice: arm, confirm) ends the call: both phones get a BYE and the
tile goes back to 0. A screenshot of the page with the call in progress is saved in the
test's directory (docs/dashboard.png is one such screenshot; tests never write into the
repository).

A second test holds the event stream to its contract over plain HTTP: tokens (none, bad,
``?token=``, bearer header), ``count``, the first snapshot's history, revocation by a
reload of the tokens, and the page's security headers and self-containment.

Chromium missing is a failure, not a skip: ``make test`` installs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from switch_process import LOOPBACK_V4, Listener, SipDevice, build_config, free_port

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from sipua import SipUA  # noqa: E402

from media.sdp import parse_sdp  # noqa: E402
from switch.admin import AdminServer, AdminSettings  # noqa: E402
from switch.app import Softswitch  # noqa: E402
from switch.dashboard import EVENTS_PATH, PAGE_PATH, register_dashboard  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
READ_TOKEN = "dash-read-" + os.urandom(12).hex()
WRITE_TOKEN = "dash-write-" + os.urandom(12).hex()
READ_NAME, WRITE_NAME = "noc-read", "ops-write"
ALICE = SipDevice("1000", "pw1000", {"site": "hq", "location": "f1"})
BOB = SipDevice("1001", "pw1001", {"site": "hq", "location": "f1"})
DESK = SipDevice("1002", "pw1002", {"site": "hq", "location": "f2"})
ROAMER = SipDevice("1003", "pw1003", {"mobility": "nomadic"})  # no network mapped: no location
HQ_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
              "HNO": "10", "PC": "69002"}  # fmt: skip
RELAY_PORTS = (32000, 32199)  # below the ephemeral ports; the relay skips busy ones
WAIT_S = 6.0
CHROMIUM_START_S = 20.0
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--mute-audio",
    "--hide-scrollbars", "--window-size=1360,900", "--remote-allow-origins=*",
]


# --------------------------------------------------------------------------------------
# The switch with its admin listener and the dashboard
# --------------------------------------------------------------------------------------


def switch_config(workdir: Path) -> str:
    sections: dict[str, Any] = {
        "media": {"backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORTS[0],
                  "port_max": RELAY_PORTS[1], "media_timeout": 0},
        "cdr": {"directory": str(workdir / "cdr")},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "emergency": {
            "journal_dir": str(workdir / "emergency"),
            "sites": [{"id": "hq", "country": "FR", "address": HQ_ADDRESS,
                       "callback_number": "+33478000100", "routes": [],
                       "locations": [{"id": "f1", "FLR": "1"}, {"id": "f2", "FLR": "2"}]}],
        },
    }
    listener = Listener("udp", LOOPBACK_V4, free_port("udp", LOOPBACK_V4))
    return build_config([listener], [ALICE, BOB, DESK, ROAMER], sections=sections)


def admin_settings() -> AdminSettings:
    return AdminSettings.model_validate({
        "enabled": True,
        "listen": {"host": LOOPBACK_V4, "port": 0},
        "tokens": [{"name": READ_NAME, "token": READ_TOKEN, "role": "read"},
                   {"name": WRITE_NAME, "token": WRITE_TOKEN, "role": "write"}],
    })


@dataclass
class DashboardBench:
    switch: Softswitch
    admin: AdminServer

    @property
    def base(self) -> str:
        assert self.admin.address is not None
        host, port = self.admin.address
        return f"http://{host}:{port}"

    @property
    def sip(self) -> tuple[str, int]:
        _, host, port = self.switch.listening[0]
        return (host, port)


@contextlib.asynccontextmanager
async def dashboard_switch(workdir: Path) -> AsyncIterator[DashboardBench]:
    switch = Softswitch(load_settings_text(switch_config(workdir),
                                           str(workdir / "switch.yaml")))
    await switch.start()
    admin = AdminServer(switch, admin_settings())
    admin.add_routes(register_dashboard)
    try:
        await admin.start()
        yield DashboardBench(switch, admin)
    finally:
        await admin.stop()
        await switch.stop()


@contextlib.asynccontextmanager
async def registered(bench: DashboardBench, device: SipDevice) -> AsyncIterator[SipUA]:
    async with SipUA(device.extension, device.password, bench.sip) as ua:
        response = await ua.register(expires=300)
        assert response is not None and response.status == 200, response
        yield ua


class RtpSender(asyncio.DatagramProtocol):
    """Sends PCMU-sized RTP packets to a relay port, every 10th sequence number skipped
    (the relay counts those as lost)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def run(self, target: tuple[str, int], packets: int, every_s: float) -> None:
        assert self.transport is not None
        seq = 1
        for _ in range(packets):  # bounded: stops by itself
            header = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, self.sent * 160, 0x5EED)
            self.transport.sendto(header + b"\xff" * 160, target)
            self.sent += 1
            seq += 2 if self.sent % 10 == 0 else 1
            await asyncio.sleep(every_s)


# --------------------------------------------------------------------------------------
# Chromium through the DevTools protocol
# --------------------------------------------------------------------------------------


class DevTools:
    """A DevTools-protocol session with one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.exceptions: list[str] = []
        self.console_errors: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.exceptions.append(json.dumps(details)[:500])
            elif data.get("method") == "Runtime.consoleAPICalled":
                params = data["params"]
                if params.get("type") == "error":
                    self.console_errors.append(json.dumps(params.get("args"))[:500])
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the DevTools websocket closed"))

    async def send(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self.ws.send_str(json.dumps({"id": self._next_id, "method": method,
                                           "params": params}))
        answer = await asyncio.wait_for(future, timeout)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, check: Callable[[Any], bool],
                       what: str, timeout: float = WAIT_S) -> Any:
        """Evaluate ``expression`` until ``check`` accepts its value (bounded)."""
        deadline = asyncio.get_running_loop().time() + timeout
        value = None
        while asyncio.get_running_loop().time() < deadline:
            try:
                value = await self.evaluate(expression)
            except AssertionError as exc:  # e.g. the page between two documents
                value = exc
            else:
                if check(value):
                    return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: still {value!r} after {timeout} s"
                             f" (page exceptions: {self.exceptions})")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState + ' ' + location.href",
                            lambda v: v == f"complete {url}", f"loading {url}")

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def _stop_process_group(pid: int) -> None:
    """Chromium's renderer and utility processes share its process group (its id is the
    browser's PID: started in a new session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def chromium(workdir: Path, flags: Sequence[str] = tuple(CHROMIUM_FLAGS)
                   ) -> AsyncIterator[DevTools]:
    """Headless Debian chromium with ``flags`` (the softphone and audio tests add media
    ones), driven over its DevTools websocket; stopped by PID and process group."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's `chromium` is not installed: `make test` installs it"
                    " (or: apt-get install chromium)")
    profile = workdir / "chromium-profile"
    profile.mkdir()
    log_path = workdir / "chromium.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            executable, *flags, f"--user-data-dir={profile}",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True)
    session: aiohttp.ClientSession | None = None
    devtools: DevTools | None = None
    try:
        # the browser writes the port it bound (port 0: no race for a free port)
        active_port = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHROMIUM_START_S
        port = None
        while loop.time() < deadline:
            if process.returncode is not None:
                break
            text = active_port.read_text() if active_port.exists() else ""
            if text.strip():
                port = int(text.split()[0])
                break
            await asyncio.sleep(0.05)
        if port is None:
            raise AssertionError(f"chromium gave no DevTools port (exit {process.returncode}):"
                                 f" {log_path.read_text(errors='replace')[-2000:]}")
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        target = None
        while target is None and loop.time() < deadline:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            target = next((t for t in targets if t.get("type") == "page"), None)
            if target is None:
                await asyncio.sleep(0.05)
        assert target is not None, "chromium has no page target"
        ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        devtools = DevTools(ws)
        await devtools.send("Runtime.enable")
        await devtools.send("Page.enable")
        yield devtools
    finally:
        if devtools is not None:
            await devtools.close()
        if session is not None:
            await session.close()
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                process.kill()
                await process.wait()
        _stop_process_group(process.pid)


# --------------------------------------------------------------------------------------
# The page in Chromium
# --------------------------------------------------------------------------------------


def _js(value: str) -> str:
    return json.dumps(value)


def text_of(element_id: str) -> str:
    return f"document.getElementById({_js(element_id)}).textContent"


async def log_in(page: DevTools, token: str) -> None:
    await page.wait_for("!document.getElementById('login').hidden", bool, "the token form")
    await page.evaluate(f"document.getElementById('token').value = {_js(token)};"
                        " document.getElementById('login-form').requestSubmit(); true")


def _number(text: Any) -> float:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return float("nan")


async def test_dashboard_in_chromium_shows_a_call_live_and_hangs_it_up(tmp_path: Path) -> None:
    async with dashboard_switch(tmp_path) as bench, registered(bench, ALICE) as alice, \
            registered(bench, BOB) as bob, chromium(tmp_path) as page:
        await page.navigate(bench.base + PAGE_PATH)

        # a token the switch does not know is refused on the form, nothing is kept
        await log_in(page, "not-a-token-of-this-switch")
        await page.wait_for(text_of("login-error"), lambda t: "does not know" in t,
                            "the refusal of an unknown token")
        assert await page.evaluate("sessionStorage.length") == 0

        # a read token: the stream goes live with the switch's numbers
        await log_in(page, READ_TOKEN)
        await page.wait_for(text_of("status"), lambda t: t == "live", "the live status")
        assert await page.evaluate("document.getElementById('login').hidden") is True
        assert await page.evaluate(text_of("calls-active")) == "0"
        await page.wait_for(text_of("registrations"), lambda t: t == "2", "registrations")
        assert await page.evaluate(text_of("viewer")) == f"token {READ_NAME} (read)"
        assert await page.evaluate(text_of("asr")) == "—"  # no call attempted yet
        unlocated = await page.evaluate(
            "[...document.querySelectorAll('#unlocated-body tr')].map(r => r.dataset.device)")
        assert unlocated == [ROAMER.extension], unlocated
        assert await page.evaluate(text_of("health")) in ("ready", "not ready")

        # a call: the tile, the list, the ASR and the media rate follow it
        call = await alice.invite(BOB.extension, timeout=WAIT_S)
        assert call.answered, call
        relay_port = parse_sdp(call.remote_sdp).media[0].port
        loop = asyncio.get_running_loop()
        _, sender = await loop.create_datagram_endpoint(RtpSender,
                                                        local_addr=(LOOPBACK_V4, 0))
        rtp = loop.create_task(sender.run((LOOPBACK_V4, relay_port), 400, 0.02))
        try:
            await page.wait_for(text_of("calls-active"), lambda t: t == "1",
                                "the active-calls tile")
            rows = await page.evaluate(
                "[...document.querySelectorAll('#calls-body tr')].map(r => [r.dataset.callId,"
                " r.cells[0].textContent, r.cells[1].textContent,"
                " r.querySelector('button.hangup').disabled])")
            assert rows == [[call.call_id, ALICE.extension, BOB.extension, True]], rows
            await page.wait_for(text_of("asr"), lambda t: t == "100 %", "the ASR tile")
            await page.wait_for(text_of("pps"), lambda t: _number(t) > 0,
                                "the media packets/s tile")
            await page.wait_for(text_of("media-sub"), lambda t: not t.startswith("loss — "),
                                "the media loss")

            # the token is kept for the tab: a reload reconnects without asking
            await page.send("Page.reload")
            await page.wait_for(text_of("status") + " + ' ' + " + text_of("calls-active"),
                                lambda t: t == "live 1", "the reloaded page")
            assert await page.evaluate("document.getElementById('login').hidden") is True

            # a write token enables hang-up
            await page.evaluate("document.getElementById('logout').click(); true")
            await log_in(page, WRITE_TOKEN)
            await page.wait_for(text_of("viewer"), lambda t: t == f"token {WRITE_NAME} (write)",
                                "the write token in use")
            button = f"document.querySelector('tr[data-call-id={_js(call.call_id)}] button')"
            await page.wait_for(f"{button}.disabled", lambda v: v is False,
                                "an enabled hang-up button")
            await page.wait_for("document.querySelector('#chart-calls polyline')"
                                ".getAttribute('points')", lambda p: bool(p) and " " in p,
                                "the active-calls chart")
            shot = await page.send("Page.captureScreenshot", format="png",
                                   captureBeyondViewport=True)
            png = base64.b64decode(shot["data"])
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, len(png)
            (tmp_path / "dashboard.png").write_bytes(png)

            # hang up: the first click arms the button, the second sends the DELETE
            await page.evaluate(f"{button}.click(); true")
            assert await page.evaluate(f"{button}.textContent") == "Confirm"
            assert bench.switch.calls.calls, "one click must not hang up"
            await page.evaluate(f"{button}.click(); true")
            assert await call.wait_request("BYE", timeout=WAIT_S) is not None, "no BYE to 1000"
            (callee_call,) = bob.incoming_calls
            assert await callee_call.wait_request("BYE", timeout=WAIT_S) is not None, \
                "no BYE to 1001"
            await page.wait_for(text_of("calls-active") + " + ' ' + "
                                "document.querySelectorAll('#calls-body tr').length",
                                lambda t: t == "0 0", "the call gone from the page")
            assert "hung up" in await page.evaluate(text_of("notice"))
        finally:
            rtp.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rtp
            assert sender.transport is not None
            sender.transport.close()
        assert page.exceptions == [], page.exceptions
        assert page.console_errors == [], page.console_errors


# --------------------------------------------------------------------------------------
# The event stream and the page over plain HTTP
# --------------------------------------------------------------------------------------


async def read_events(response: aiohttp.ClientResponse, wanted: int,
                      timeout: float = WAIT_S) -> list[tuple[str, Any]]:
    """(event name, JSON data) of the next ``wanted`` events of a stream (bounded)."""
    events: list[tuple[str, Any]] = []
    name, data = "message", ""

    async def collect() -> None:
        nonlocal name, data
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                events.append((name, json.loads(data)))
                name, data = "message", ""
                if len(events) == wanted:
                    return

    await asyncio.wait_for(collect(), timeout)
    return events


async def test_event_stream_tokens_snapshots_and_revocation(tmp_path: Path) -> None:
    async with dashboard_switch(tmp_path) as bench, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        url = bench.base + EVENTS_PATH
        for params, headers, reason in (
                ({}, {}, "required"),
                ({"token": "not-a-token-of-this-switch"}, {}, "not valid"),
                ({}, {"Authorization": "Bearer not-a-token-of-this-switch"}, "not valid")):
            async with http.get(url, params=params, headers=headers) as response:
                body = await response.json()
                assert response.status == 401 and reason in body["error"], (params, body)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for count in ("0", "x", "100000"):
            async with http.get(url, params={"token": READ_TOKEN, "count": count}) as response:
                assert response.status == 400, (count, await response.text())

        # ?token= with count: exactly that many snapshots, then the stream ends
        async with http.get(url, params={"token": READ_TOKEN, "count": "2"}) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            assert response.headers["Cache-Control"] == "no-store"
            events = await read_events(response, 2)
            assert await response.content.read() == b""  # ended after two
        (_, first), (_, second) = events
        assert "history" in first and "history" not in second, (first.keys(), second.keys())
        assert first["viewer"] == {"token": READ_NAME, "role": "read"}
        assert first["calls"]["active"] == 0 and first["calls"]["asr"] is None
        assert first["devices_without_location"] == {
            "total": 1, "items": [{"username": ROAMER.extension, "extension": ROAMER.extension,
                                   "site": None, "mobility": "nomadic"}]}
        assert set(first["health"]) >= {"ready", "sip_listening", "emergency_problems",
                                         "fair_use_store_degraded"}
        assert first["health"]["sip_listening"] is True
        assert first["emergency"]["outcomes"] == {"answered": 0, "failed": 0, "cancelled": 0}
        assert second["time"] >= first["time"]

        # the bearer header works too; a reload that drops the token ends the stream
        headers = {"Authorization": f"Bearer {READ_TOKEN}"}
        async with http.get(url, headers=headers) as response:
            assert response.status == 200
            ((name, snapshot),) = await read_events(response, 1)
            assert name == "message" and snapshot["viewer"]["role"] == "read"
            bench.admin.apply(AdminSettings.model_validate({
                "enabled": True, "listen": {"host": LOOPBACK_V4, "port": 0},
                "tokens": [{"name": WRITE_NAME, "token": WRITE_TOKEN, "role": "write"}]}))
            ((name, _),) = await read_events(response, 1, timeout=3.0)
            assert name == "revoked"
            assert await asyncio.wait_for(response.content.read(), 3.0) == b""

        # the page: no token needed, locked-down headers, nothing fetched from elsewhere
        async with http.get(bench.base + PAGE_PATH) as response:
            assert response.status == 200 and response.content_type == "text/html"
            html = await response.text()
            policy = response.headers["Content-Security-Policy"]
            assert response.headers["Referrer-Policy"] == "no-referrer"
        nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]+)'", policy)
        assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in html, policy
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html) is None
        assert "@import" not in html and "__NONCE__" not in html
        assert "EventSource" in html and EVENTS_PATH in html

        # stopping the admin listener ends an open stream at once
        async with http.get(url, params={"token": WRITE_TOKEN}) as response:
            ((_, snapshot),) = await read_events(response, 1)
            assert snapshot["viewer"] == {"token": WRITE_NAME, "role": "write"}
            started = asyncio.get_running_loop().time()
            await bench.admin.stop()
            assert await asyncio.wait_for(response.content.read(), 3.0) == b""
            assert asyncio.get_running_loop().time() - started < 1.5


"""The browser softphone page (switch/softphone.py) in a real headless Chromium.

An in-process switch listens on UDP and on SIP over WebSocket (RFC 7118, ``ws``) on
loopback, with its admin listener on a free port and the softphone's routes added. The
media backend is ``none`` so SDP crosses the switch untouched: this test is about the
page's signalling (the WebRTC-to-RTP bridge has its own tests), and the UDP desk phone
(tests/peers/sipua.py) answers the browser with a WebRTC-shaped SDP answer that Chromium
accepts.

Over plain HTTP: the page and its security headers, the JsSIP bundle served from the npm
install (503 with a hint when not built), and the location endpoint (bad body 400, wrong
password 401, right one: the device's registered emergency location; 429 after
MAX_FAILURES wrong passwords). In Debian's ``chromium`` (headless, fake media
device and permission prompt, driven over the DevTools protocol): the page registers as
1000 over the WebSocket; the desk phone 1001 calls it and the page sees the incoming
session (JsSIP ``newRTCSession``, originator remote) and declines it from the Hang up
button; the page dials 1001, the desk phone gets the INVITE through the switch and answers,
a dial-pad key sends DTMF as SIP INFO that reaches the desk phone, and Hang up sends BYE.
The Emergency button dials 112 (France), the call reaches the site's emergency trunk (a
peer on 127.0.0.2 answering like a browser would accept), the page shows the device's
registered location (site hq, floor 1, Lyon) while the call is up and hides it after
Hang up, which sends BYE to the trunk.

Chromium or the JsSIP bundle missing is a failure, not a skip: ``make test`` installs both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from switch_process import LOOPBACK_V4, Listener, SipDevice, build_config, free_port

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402
from test_dashboard import DevTools  # noqa: E402
from test_dashboard import chromium as launch_chromium  # noqa: E402

from switch.admin import AdminServer, AdminSettings  # noqa: E402
from switch.app import Softswitch  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402
from switch.softphone import (  # noqa: E402
    JSSIP_BUNDLE,
    LIBRARY_PATH,
    LOCATION_PATH,
    MAX_FAILURES,
    PAGE_PATH,
    Softphone,
    register_softphone,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

READ_TOKEN = "phone-read-" + os.urandom(12).hex()
BROWSER = SipDevice("1000", "pw1000-" + os.urandom(4).hex(), {"site": "hq", "location": "f1"})
DESK = SipDevice("1001", "pw1001", {"site": "hq", "location": "f2"})
HQ_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
              "HNO": "10", "PC": "69002"}  # fmt: skip
WAIT_S = 8.0
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--no-pings", "--mute-audio", "--remote-allow-origins=*",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]


def require_bundle() -> None:
    if not JSSIP_BUNDLE.is_file():
        pytest.fail(f"the JsSIP browser bundle {JSSIP_BUNDLE} is missing: `make test` builds"
                    " it (or: make node_modules/.stamp)")


# --------------------------------------------------------------------------------------
# The switch (UDP + WS) with its admin listener and the softphone's routes
# --------------------------------------------------------------------------------------


@dataclass
class PhoneBench:
    switch: Softswitch
    admin: AdminServer

    @property
    def base(self) -> str:
        assert self.admin.address is not None
        host, port = self.admin.address
        return f"http://{host}:{port}"

    def bound(self, transport: str) -> tuple[str, int]:
        for kind, host, port in self.switch.listening:
            if kind == transport:
                return host, port
        raise AssertionError(f"no {transport} listener: {self.switch.listening}")


@contextlib.asynccontextmanager
async def phone_switch(workdir: Path, trunk_port: int | None = None
                       ) -> AsyncIterator[PhoneBench]:
    """The switch; with ``trunk_port``, site hq's emergency calls go to a peer trunk on
    TRUNK_HOST:trunk_port (EU national profile: the dialled 112)."""
    sections: dict[str, Any] = {
        "media": {"backend": "none"},
        "cdr": {"directory": str(workdir / "cdr")},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "emergency": {
            "journal_dir": str(workdir / "emergency"),
            "sites": [{"id": "hq", "country": "FR", "address": HQ_ADDRESS,
                       "callback_number": "+33478000100",
                       "routes": [] if trunk_port is None else ["psap"],
                       "locations": [{"id": "f1", "FLR": "1"}, {"id": "f2", "FLR": "2"}]}],
        },
    }
    if trunk_port is not None:
        sections["trunks"] = [{"id": "psap", "kind": "peer", "host": TRUNK_HOST,
                               "port": trunk_port, "transport": "udp",
                               "addresses": [f"{TRUNK_HOST}/32"],
                               "emergency": {"profile": "nat"}}]
        sections["emergency"]["route_timeout"] = 3
    listeners = [Listener("udp", LOOPBACK_V4, free_port("udp", LOOPBACK_V4)),
                 Listener("ws", LOOPBACK_V4, free_port("tcp", LOOPBACK_V4))]
    # JsSIP understands only MD5 and fails on a second challenge: over a WebSocket the
    # switch challenges with MD5 alone (SHA-256 stays first for everyone else)
    text = build_config(listeners, [BROWSER, DESK], sections=sections,
                        algorithms=("SHA-256", "MD5"))
    switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")))
    await switch.start()
    admin = AdminServer(switch, AdminSettings.model_validate({
        "enabled": True, "listen": {"host": LOOPBACK_V4, "port": 0},
        "tokens": [{"name": "reader", "token": READ_TOKEN, "role": "read"}]}))
    admin.add_routes(register_softphone)
    try:
        await admin.start()
        yield PhoneBench(switch, admin)
    finally:
        await admin.stop()
        await switch.stop()


def webrtc_answer(offer: bytes, host: str, port: int) -> bytes:
    """A WebRTC-shaped SDP answer (ICE, a DTLS fingerprint, rtcp-mux, the offer's mid) that
    a browser accepts; nothing listens behind it (media is not this test's subject)."""
    found = re.search(rb"a=mid:(\S+)", offer)
    mid = found.group(1).decode() if found else "0"
    fingerprint = ":".join(f"{b:02X}" for b in os.urandom(32))
    lines = [
        "v=0", f"o=- {os.getpid()} 1 IN IP4 {host}", "s=-", "t=0 0",
        f"m=audio {port} UDP/TLS/RTP/SAVPF 0", f"c=IN IP4 {host}",
        f"a=mid:{mid}", "a=sendrecv", "a=rtcp-mux", "a=ice-ufrag:peer",
        "a=ice-pwd:" + "p" * 24, f"a=fingerprint:sha-256 {fingerprint}",
        "a=setup:active", "a=rtpmap:0 PCMU/8000",
        f"a=candidate:1 1 udp 2130706431 {host} {port} typ host",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


class WebRtcDesk(SipUA):
    """A desk phone that answers a browser's offer with `webrtc_answer`."""

    def sdp_answer_to(self, offer: bytes) -> bytes:
        return webrtc_answer(offer, self.host, self.rtp_port)


class WebRtcEmergencyTrunk(EmergencyTrunkUAS):
    """The emergency trunk (a PSAP gateway) answering the browser with `webrtc_answer`."""

    def sdp_answer_to(self, offer: bytes) -> bytes:
        return webrtc_answer(offer, self.host, self.rtp_port)


# --------------------------------------------------------------------------------------
# Chromium through the DevTools protocol
# --------------------------------------------------------------------------------------


def chromium(workdir: Path) -> contextlib.AbstractAsyncContextManager[DevTools]:
    """Chromium with a fake microphone and camera, allowed without asking."""
    return launch_chromium(workdir, CHROMIUM_FLAGS)


async def click(page: DevTools, element_id: str) -> None:
    disabled = await page.evaluate(
        f"(() => {{ const b = document.getElementById({json.dumps(element_id)});"
        " const was = b.disabled; if (!was) b.click(); return was; })()")
    assert disabled is False, f"the {element_id!r} button is disabled"


async def fill(page: DevTools, element_id: str, value: str) -> None:
    await page.evaluate(f"document.getElementById({json.dumps(element_id)}).value ="
                        f" {json.dumps(value)}")


async def wait_on_page(page: DevTools, expression: str, check: Callable[[Any], bool],
                       what: str) -> Any:
    """``page.wait_for`` with the page's status history in the failure message."""
    try:
        return await page.wait_for(expression, check, what, timeout=WAIT_S)
    except AssertionError as exc:
        history = await page.evaluate("JSON.stringify(window.softphone.events)")
        raise AssertionError(f"{exc}; the page said: {history};"
                             f" console errors: {page.console_errors}") from None


async def open_and_register(page: DevTools, bench: PhoneBench) -> None:
    await page.navigate(bench.base + PAGE_PATH)
    ws_url = await page.evaluate("document.getElementById('ws').value")
    assert ws_url == "ws://{}:{}/".format(*bench.bound("ws")), ws_url
    assert await page.evaluate("typeof JsSIP") == "object", page.exceptions
    await fill(page, "ext", BROWSER.extension)
    await fill(page, "password", BROWSER.password)
    await click(page, "register")
    await wait_on_page(page, "window.softphone.registered", lambda v: v is True,
                       "the page registering over the WebSocket")
    assert "Registered as 1000" in await page.evaluate(
        "document.getElementById('status').textContent")


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


async def test_page_library_and_location_endpoint(tmp_path: Path) -> None:
    require_bundle()
    async with phone_switch(tmp_path) as bench, aiohttp.ClientSession() as http:
        _, ws_port = bench.bound("ws")
        async with http.get(bench.base + PAGE_PATH) as response:
            assert response.status == 200
            page = await response.text()
            csp = response.headers["Content-Security-Policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce is not None, csp
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp
        # every script is either the JsSIP bundle from this listener or carries the nonce
        for tag in re.findall(r"<script[^>]*>", page):
            assert (f'src="{LIBRARY_PATH}"' in tag or f'nonce="{nonce.group(1)}"' in tag
                    or 'type="application/json"' in tag), tag
        assert "http://" not in page and "https://" not in page  # nothing from elsewhere
        config = json.loads(re.search(r'<script id="config" type="application/json">(.*?)'
                                      r"</script>", page, re.S).group(1))  # type: ignore[union-attr]
        assert config["websocket"] == {"scheme": "ws", "port": ws_port, "path": "/"}
        assert config["emergency_number"] == "112"  # France

        async with http.get(bench.base + LIBRARY_PATH) as response:
            assert response.status == 200
            assert response.content_type == "text/javascript"
            library = await response.read()
        assert library == JSSIP_BUNDLE.read_bytes() and b"JsSIP" in library

        # not built: a clear 503, not a crash
        def without_bundle(app: web.Application, server: AdminServer) -> None:
            app.router.add_get(LIBRARY_PATH, Softphone(server, bundle=tmp_path / "none.js").library)

        bare = AdminServer(bench.switch, AdminSettings.model_validate({
            "enabled": True, "listen": {"host": LOOPBACK_V4, "port": 0}}))
        bare.add_routes(without_bundle)
        await bare.start()
        try:
            assert bare.address is not None
            async with http.get("http://{}:{}{}".format(*bare.address, LIBRARY_PATH)) as r:
                assert r.status == 503
                assert "make node_modules/.stamp" in (await r.json())["error"]
        finally:
            await bare.stop()

        url = bench.base + LOCATION_PATH
        async with http.post(url, data=b"not json") as response:
            assert response.status == 400, await response.text()
        async with http.post(url, json={"username": "1000"}) as response:
            assert response.status == 400, await response.text()
        async with http.post(url, json={"username": "1000", "password": "wrong"}) as response:
            assert response.status == 401
            assert "wrong username or password" in (await response.json())["error"]
        async with http.post(url, json={"username": "9999", "password": "x"}) as response:
            assert response.status == 401  # no hint whether the device exists
        async with http.post(url, json={"username": BROWSER.extension,
                                        "password": BROWSER.password}) as response:
            assert response.status == 200, await response.text()
            location = await response.json()
        assert location["username"] == "1000" and location["site"] == "hq"
        assert location["location"] == "f1" and location["has_location"] is True
        assert "Lyon" in location["summary"], location
        # password guessing is bounded: after MAX_FAILURES wrong passwords in a minute
        # (two above) the source is locked out for the rest of the minute, right password
        # included
        statuses = []
        for _ in range(MAX_FAILURES):
            async with http.post(url, json={"username": "1000", "password": "guess"}) as r:
                statuses.append(r.status)
        assert statuses == [401] * (MAX_FAILURES - 2) + [429] * 2, statuses
        async with http.post(url, json={"username": BROWSER.extension,
                                        "password": BROWSER.password}) as response:
            assert response.status == 429, await response.text()
        # the same answer the admin API gives with a read token
        async with http.get(f"{bench.base}/api/v1/devices/1000/location",
                            headers={"Authorization": f"Bearer {READ_TOKEN}"}) as response:
            assert response.status == 200
            assert (await response.json())["summary"] == location["summary"]


async def test_browser_registers_calls_sends_dtmf_and_hangs_up(tmp_path: Path) -> None:
    require_bundle()
    async with phone_switch(tmp_path) as bench, chromium(tmp_path) as page:
        udp = bench.bound("udp")
        async with WebRtcDesk(DESK.extension, DESK.password, udp) as desk:
            response = await desk.register(expires=300)
            assert response is not None and response.status == 200, response

            await open_and_register(page, bench)

            # the desk phone calls the browser: the page sees the incoming session
            incoming = await desk.place_call(
                f"sip:1000@{udp[0]}", udp, from_value=f"<sip:1001@{udp[0]}>",
                to_value=f"<sip:1000@{udp[0]}>", wait="provisional", timeout=WAIT_S)
            sessions = await page.wait_for(
                "window.softphone.sessions", lambda v: isinstance(v, list) and len(v) == 1,
                "the incoming call reaching the page (newRTCSession)")
            assert sessions[0]["originator"] == "remote", sessions
            assert await page.evaluate("document.getElementById('incoming').hidden") is False
            assert "1001" in await page.evaluate(
                "document.getElementById('incoming').textContent")
            await click(page, "hangup")  # declines the ringing call
            final = await incoming.wait_final(WAIT_S)
            assert final is not None and final.status >= 400, final

            # the browser calls the desk phone through the switch
            await page.wait_for("window.softphone.state", lambda v: v == "ended",
                                "the declined call ending on the page")
            await fill(page, "number", DESK.extension)
            await click(page, "call")
            invite = await desk.wait_for("INVITE", WAIT_S)
            assert invite is not None, "the browser's INVITE did not reach the desk phone"
            assert b"UDP/TLS/RTP/SAVPF" in invite.body, invite.body[:300]
            await page.wait_for("window.softphone.state", lambda v: v == "confirmed",
                                "the call being answered on the page")
            assert await desk.wait_for("ACK", WAIT_S) is not None

            await page.evaluate("document.querySelector('#pad [data-tone=\"5\"]').click()")
            info = await desk.wait_for("INFO", WAIT_S)
            assert info is not None, "the DTMF INFO did not reach the desk phone"
            assert b"Signal=5" in info.body, info.body

            await click(page, "hangup")
            bye = await desk.wait_for("BYE", WAIT_S)
            assert bye is not None, "hanging up on the page sent no BYE to the desk phone"
            await page.wait_for("window.softphone.state", lambda v: v == "ended",
                                "the call ending on the page")
            assert page.exceptions == [], page.exceptions

            await click(page, "unregister")
            await page.wait_for("window.softphone.registered", lambda v: v is False,
                                "the page unregistering")


async def test_emergency_button_calls_112_and_shows_the_location(tmp_path: Path) -> None:
    require_bundle()
    async with WebRtcEmergencyTrunk((200,)) as trunk:
        trunk_port = trunk.address[1]
        async with phone_switch(tmp_path, trunk_port) as bench, chromium(tmp_path) as page:
            await open_and_register(page, bench)
            assert await page.evaluate(
                "document.getElementById('emergency').textContent") == "Emergency (112)"
            assert await page.evaluate("document.getElementById('location').hidden") is True
            await click(page, "emergency")
            record = await trunk.wait_invite(WAIT_S)
            assert record is not None, "the emergency call did not reach the emergency trunk"
            assert str(record.request.uri).startswith("sip:112@"), str(record.request.uri)
            await wait_on_page(page, "window.softphone.state", lambda v: v == "confirmed",
                               "the emergency call being answered on the page")
            shown = await wait_on_page(
                page, "document.getElementById('location').textContent",
                lambda v: isinstance(v, str) and "Lyon" in v,
                "the registered location shown during the emergency call")
            assert "Rue de la République" in shown, shown
            assert await page.evaluate("document.getElementById('location').hidden") is False
            assert (await page.evaluate("window.softphone.location"))["location"] == "f1"
            await click(page, "hangup")
            assert await trunk.wait_request("BYE", WAIT_S) is not None, "no BYE to the trunk"
            await wait_on_page(page, "window.softphone.state", lambda v: v == "ended",
                               "the emergency call ending on the page")
            assert await page.evaluate("document.getElementById('location').hidden") is True
            assert page.exceptions == [], page.exceptions

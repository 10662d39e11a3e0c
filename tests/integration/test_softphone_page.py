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

Location confirmation by the user (EM-52, EM-24), over HTTP: a nomadic device (1002, on
loopback, a network no site maps) is offered the sites of its account (hq, annex), never
another account's (paris); it confirms annex / a1 with ``POST /phone/location/confirm``,
the journal records the change as made by "1002", the location turns verified, and its
next 112 call (a UDP phone with its credentials, a P-PIDF trunk) carries that address in
the PIDF-LO with method Manual; a fixed device gets 403, an unknown or foreign location
400, a wrong password 401 counted by the same limiter as ``/phone/location``. In Chromium:
the nomadic device's page shows the "not confirmed" notice and the picker; the Emergency
button dials at once all the same (the trunk gets the default address, method Default, and
the page shows that address as the one sent); after the call the user picks annex / a1 and
confirms, the page shows the confirmed address, and the next emergency call carries it,
the page showing the same address. The softphone's operations are also held to the
OpenAPI document by schemathesis.

Chromium or the JsSIP bundle missing is a failure, not a skip: ``make test`` installs both.
"""

from __future__ import annotations

import asyncio
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
import schemathesis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lxml import etree
from schemathesis import GenerationMode
from switch_process import LOOPBACK_V4, Listener, SipDevice, build_config, free_port

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402
from test_dashboard import DevTools  # noqa: E402
from test_dashboard import chromium as launch_chromium  # noqa: E402

import switch.softphone as softphone_module  # noqa: E402
from switch.admin import AdminServer, AdminSettings  # noqa: E402
from switch.app import Softswitch  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402
from switch.softphone import (  # noqa: E402
    CONFIRM_PATH,
    JSSIP_BUNDLE,
    LIBRARY_PATH,
    LOCATION_PATH,
    MAX_FAILURES,
    PAGE_PATH,
    SOFTPHONE_OPENAPI_PATHS,
    Softphone,
    register_softphone,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

READ_TOKEN = "phone-read-" + os.urandom(12).hex()
BROWSER = SipDevice("1000", "pw1000-" + os.urandom(4).hex(), {"site": "hq", "location": "f1"})
DESK = SipDevice("1001", "pw1001", {"site": "hq", "location": "f2"})
# a laptop softphone that moves between the account's sites: its home site is hq, with no
# location, so anywhere unmapped it gets hq's default address until the user confirms
NOMAD = SipDevice("1002", "pw1002-" + os.urandom(4).hex(), {"site": "hq", "mobility": "nomadic"})
LOBBY = SipDevice("1003", "pw1003", {"site": "annex", "location": "a2"})  # never registers
HQ_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
              "HNO": "10", "PC": "69002"}  # fmt: skip
ANNEX_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Quai Perrache",
                 "HNO": "30", "PC": "69002"}  # fmt: skip
# another account's site on the same switch: never offered to this account's users
PARIS_ADDRESS = {"country": "FR", "A1": "75", "A3": "Paris", "RD": "Rue de Rivoli",
                 "HNO": "5", "PC": "75001"}  # fmt: skip
OTHER_ACCOUNT = {"id": "acme", "devices": [
    {"extension": "2000", "password": "pw2000", "site": "paris", "location": "p1"}]}
NS = {"ca": "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr",
      "gp": "urn:ietf:params:xml:ns:pidf:geopriv10"}
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
async def phone_switch(workdir: Path, trunk_port: int | None = None, *,
                       trunk_profile: str = "nat") -> AsyncIterator[PhoneBench]:
    """The switch; with ``trunk_port``, the sites' emergency calls go to a peer trunk on
    TRUNK_HOST:trunk_port (``nat``, the EU national profile: the dialled 112; ``pidf``:
    112 with the PIDF-LO by value). Account itest's devices are at sites hq and annex;
    account acme's only device is at site paris. Only 10.20.0.0/16 is mapped (to annex),
    so loopback is an unknown network."""
    routes = [] if trunk_port is None else ["psap"]
    sections: dict[str, Any] = {
        "media": {"backend": "none"},
        "cdr": {"directory": str(workdir / "cdr")},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "emergency": {
            "journal_dir": str(workdir / "emergency"),
            "sites": [{"id": "hq", "country": "FR", "address": HQ_ADDRESS,
                       "callback_number": "+33478000100", "routes": routes,
                       "locations": [{"id": "f1", "FLR": "1"}, {"id": "f2", "FLR": "2"}]},
                      {"id": "annex", "country": "FR", "address": ANNEX_ADDRESS,
                       "callback_number": "+33478000200", "routes": routes,
                       "locations": [{"id": "a1", "FLR": "2", "ROOM": "A-204"},
                                     {"id": "a2", "FLR": "3", "ROOM": "B-310"}],
                       "networks": [{"subnet": "10.20.0.0/16", "location": "a1"}]},
                      {"id": "paris", "country": "FR", "address": PARIS_ADDRESS,
                       "callback_number": "+33140000100",
                       "locations": [{"id": "p1", "FLR": "4"}]}],
        },
    }
    if trunk_port is not None:
        sections["trunks"] = [{"id": "psap", "kind": "peer", "host": TRUNK_HOST,
                               "port": trunk_port, "transport": "udp",
                               "addresses": [f"{TRUNK_HOST}/32"],
                               "emergency": {"profile": trunk_profile,
                                             "emergency_number": "112"}}]
        sections["emergency"]["route_timeout"] = 3
    listeners = [Listener("udp", LOOPBACK_V4, free_port("udp", LOOPBACK_V4)),
                 Listener("ws", LOOPBACK_V4, free_port("tcp", LOOPBACK_V4))]
    # JsSIP understands only MD5 and fails on a second challenge: over a WebSocket the
    # switch challenges with MD5 alone (SHA-256 stays first for everyone else)
    text = build_config(listeners, [BROWSER, DESK, NOMAD, LOBBY], sections=sections,
                        algorithms=("SHA-256", "MD5"))
    document = yaml.safe_load(text)
    document["accounts"].append(OTHER_ACCOUNT)
    text = yaml.safe_dump(document, allow_unicode=True, sort_keys=False)
    switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")))
    await switch.start()
    admin = AdminServer(switch, AdminSettings.model_validate({
        "enabled": True, "listen": {"host": LOOPBACK_V4, "port": 0},
        "tokens": [{"name": "reader", "token": READ_TOKEN, "role": "read"}]}))
    admin.add_routes(register_softphone, openapi_paths=SOFTPHONE_OPENAPI_PATHS)
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


async def open_and_register(page: DevTools, bench: PhoneBench,
                            device: SipDevice = BROWSER) -> None:
    await page.navigate(bench.base + PAGE_PATH)
    ws_url = await page.evaluate("document.getElementById('ws').value")
    assert ws_url == "ws://{}:{}/".format(*bench.bound("ws")), ws_url
    assert await page.evaluate("typeof JsSIP") == "object", page.exceptions
    await fill(page, "ext", device.extension)
    await fill(page, "password", device.password)
    await click(page, "register")
    await wait_on_page(page, "window.softphone.registered", lambda v: v is True,
                       "the page registering over the WebSocket")
    assert f"Registered as {device.extension}" in await page.evaluate(
        "document.getElementById('status').textContent")


async def choose(page: DevTools, element_id: str, value: str) -> None:
    """Pick ``value`` in a <select> as a user would (the change event fires)."""
    found = await page.evaluate(
        f"(() => {{ const s = document.getElementById({json.dumps(element_id)});"
        f" if (![...s.options].some((o) => o.value === {json.dumps(value)})) return false;"
        f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change'));"
        " return true; })()")
    assert found is True, f"no option {value!r} in #{element_id}"


async def text_of(page: DevTools, element_id: str) -> str:
    return await page.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")


def sent_location(request: Any) -> tuple[dict[str, str], str]:
    """The civic address (RFC 5139 element -> value) and method of the one PIDF-LO the
    switch put in an emergency INVITE."""
    documents = re.findall(rb"<\?xml.*?</presence>", request.body, re.S)
    assert len(documents) == 1, request.body[:600]
    root = etree.fromstring(documents[0])
    civics = root.findall(".//ca:civicAddress", NS)
    assert len(civics) == 1, documents[0][:600]
    civic = {etree.QName(el).localname: el.text or "" for el in civics[0]
             if isinstance(el.tag, str)}
    return civic, root.findtext(".//gp:method", namespaces=NS) or ""


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


# --------------------------------------------------------------------------------------
# Location confirmation by the user (nomadic devices, EM-52)
# --------------------------------------------------------------------------------------


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]
                    ) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


def credentials(device: SipDevice, **extra: Any) -> dict[str, Any]:
    return {"username": device.extension, "password": device.password, **extra}


async def test_nomadic_device_confirms_its_location_over_http(tmp_path: Path) -> None:
    async with EmergencyTrunkUAS((200,)) as trunk:
        async with (phone_switch(tmp_path, trunk.address[1], trunk_profile="pidf") as bench,
                    aiohttp.ClientSession() as http,
                    SipUA(NOMAD.extension, NOMAD.password, bench.bound("udp")) as laptop):
            locations = bench.switch.emergency.locations
            # registered from loopback, which no site maps: hq's default address
            response = await laptop.register(expires=300)
            assert response is not None and response.status == 200, response
            status, view = await post_json(http, bench.base + LOCATION_PATH,
                                           credentials(NOMAD))
            assert status == 200, view
            assert view["mobility"] == "nomadic" and view["can_confirm"] is True, view
            assert view["status"] == "default" and view["verified"] is False, view
            assert view["site"] == "hq" and view["method"] == "Default", view
            # the account's sites (hq: 1000-1002, annex: 1003), not account acme's paris
            choices = {choice["id"]: choice for choice in view["choices"]}
            assert sorted(choices) == ["annex", "hq"], view["choices"]
            assert [entry["id"] for entry in choices["annex"]["locations"]] == ["a1", "a2"]
            a1 = choices["annex"]["locations"][0]["summary"]
            assert "Quai Perrache" in a1 and "A-204" in a1, a1
            assert "Rue de la République" in choices["hq"]["summary"], choices["hq"]
            assert set(choices["hq"]) == {"id", "country", "summary", "locations"}
            assert "Rivoli" not in json.dumps(view, ensure_ascii=False), view
            # a fixed device may not confirm anything: nothing to choose from
            status, fixed = await post_json(http, bench.base + LOCATION_PATH,
                                            credentials(BROWSER))
            assert status == 200 and fixed["can_confirm"] is False and fixed["choices"] == []

            confirm = bench.base + CONFIRM_PATH
            journaled = len(locations.history(NOMAD.extension))
            refusals = [
                (credentials(NOMAD, site="annex", location="a9"), 400, "'a9'"),
                (credentials(NOMAD, site="paris", location="p1"), 400, "not one you may"),
                (credentials(NOMAD, site="nowhere", location="f1"), 400, "not one you may"),
                (credentials(NOMAD, site="annex", location=None), 400, "a1, a2"),
                (credentials(NOMAD, site="annex", location=7), 400, "location must be"),
                (credentials(BROWSER, site="hq", location="f2"), 403, "administrator"),
            ]
            for body, expected, message in refusals:
                status, answer = await post_json(http, confirm, body)
                assert status == expected and message in answer["error"], (body, answer)
            assert len(locations.history(NOMAD.extension)) == journaled  # nothing changed
            assert locations.resolve(BROWSER.extension).location_id == "f1"
            assert str(locations.resolve(NOMAD.extension).status) == "default"

            status, view = await post_json(http, confirm,
                                           credentials(NOMAD, site="annex", location="a1"))
            assert status == 200, view
            assert (view["status"], view["site"], view["location"]) == ("verified", "annex",
                                                                        "a1"), view
            assert view["verified"] is True and view["method"] == "Manual", view
            assert view["has_location"] is True and "Quai Perrache" in view["summary"], view
            resolved = locations.resolve(NOMAD.extension)
            assert str(resolved.status) == "verified" and resolved.location_id == "a1"
            history = locations.history(NOMAD.extension)
            assert len(history) == journaled + 1, history
            assert {key: history[-1][key] for key in ("who", "reason", "status", "site_id",
                                                      "location_id")} == {
                "who": NOMAD.extension, "reason": "confirm", "status": "verified",
                "site_id": "annex", "location_id": "a1"}, history[-1]

            # the next emergency call carries the confirmed address (P-PIDF, method Manual)
            call = await laptop.invite("112", timeout=WAIT_S)
            record = await trunk.wait_invite(WAIT_S)
            assert record is not None, "the emergency call did not reach the trunk"
            civic, method = sent_location(record.request)
            assert civic == resolved.address.as_mapping(), civic
            assert (civic["RD"], civic["FLR"], civic["ROOM"]) == ("Quai Perrache", "2", "A-204")
            assert method == "Manual"
            assert call.answered, call
            bye = await call.bye(timeout=3)
            assert bye is not None and bye.status == 200, bye

            # a wrong password is refused and counted by /phone/location's limiter
            status, answer = await post_json(
                http, confirm, {"username": NOMAD.extension, "password": "guess",
                                "site": "annex", "location": "a2"})
            assert status == 401 and "wrong username or password" in answer["error"], answer
            statuses = []
            for _ in range(MAX_FAILURES - 1):
                statuses.append((await post_json(http, bench.base + LOCATION_PATH, {
                    "username": NOMAD.extension, "password": "guess"}))[0])
            assert statuses == [401] * (MAX_FAILURES - 1), statuses
            status, answer = await post_json(http, confirm,
                                             credentials(NOMAD, site="annex", location="a2"))
            assert status == 429, answer  # locked out, right password included
            assert locations.resolve(NOMAD.extension).location_id == "a1"


async def test_nomadic_browser_confirms_its_location_from_the_notice(tmp_path: Path) -> None:
    require_bundle()
    async with WebRtcEmergencyTrunk((200,)) as trunk:
        async with (phone_switch(tmp_path, trunk.address[1], trunk_profile="pidf") as bench,
                    chromium(tmp_path) as page):
            locations = bench.switch.emergency.locations
            await open_and_register(page, bench, NOMAD)
            notice = await wait_on_page(
                page, "document.getElementById('where').hidden ? null"
                      " : document.getElementById('where-text').textContent",
                lambda v: isinstance(v, str) and "not confirmed" in v,
                "the notice: the location of this (unmapped) network is not confirmed")
            assert "(default)" in notice and "Rue de la République" in notice, notice
            assert await page.evaluate("document.getElementById('where-picker').hidden") is False
            assert await page.evaluate("[...document.getElementById('where-site').options]"
                                       ".map((o) => o.value)") == ["annex", "hq"]

            # the emergency button dials at once, unconfirmed: the default address is sent
            # and is the one the page shows
            await click(page, "emergency")
            record = await trunk.wait_invite(WAIT_S)
            assert record is not None, "the emergency call did not reach the trunk"
            default = locations.resolve(NOMAD.extension)
            civic, method = sent_location(record.request)
            assert civic == default.address.as_mapping() and method == "Default", civic
            shown = await wait_on_page(page, "document.getElementById('location').textContent",
                                       lambda v: isinstance(v, str) and default.summary in v,
                                       "the address sent, shown during the emergency call")
            assert "not verified: default" in shown, shown
            assert await page.evaluate("document.getElementById('where-confirm').disabled")
            await wait_on_page(page, "window.softphone.state", lambda v: v == "confirmed",
                               "the emergency call being answered")
            await click(page, "hangup")
            assert await trunk.wait_request("BYE", WAIT_S) is not None, "no BYE to the trunk"
            await wait_on_page(page, "window.softphone.state", lambda v: v == "ended",
                               "the emergency call ending on the page")

            # the user picks where they are and confirms
            await choose(page, "where-site", "annex")
            assert await page.evaluate("[...document.getElementById('where-location').options]"
                                       ".map((o) => o.value)") == ["a1", "a2"]
            await choose(page, "where-location", "a1")
            await click(page, "where-confirm")
            confirmed = await wait_on_page(
                page, "document.getElementById('where-text').textContent",
                lambda v: isinstance(v, str) and v.startswith("Emergency location confirmed:"),
                "the confirmed address on the page")
            resolved = locations.resolve(NOMAD.extension)
            assert (str(resolved.status), resolved.site_id, resolved.location_id) == (
                "verified", "annex", "a1")
            assert resolved.summary in confirmed and "A-204" in confirmed, confirmed
            assert await page.evaluate("document.getElementById('where-picker').hidden") is True
            assert locations.history(NOMAD.extension)[-1]["who"] == NOMAD.extension

            # the next emergency call carries it, and the page shows that same address
            await click(page, "emergency")
            record = await trunk.wait_invite(WAIT_S)
            assert record is not None, "the second emergency call did not reach the trunk"
            civic, method = sent_location(record.request)
            assert civic == resolved.address.as_mapping() and method == "Manual", civic
            shown = await wait_on_page(page, "document.getElementById('location').textContent",
                                       lambda v: isinstance(v, str) and resolved.summary in v,
                                       "the confirmed address shown during the call")
            assert "not verified" not in shown, shown
            await wait_on_page(page, "window.softphone.state", lambda v: v == "confirmed",
                               "the second emergency call being answered")
            await click(page, "hangup")
            assert await trunk.wait_request("BYE", WAIT_S) is not None, "no second BYE"
            assert page.exceptions == [], page.exceptions


def _softphone_operations_conform(base: str) -> set[str]:
    """Schemathesis (synchronous HTTP) on the softphone's operations of the listener's
    OpenAPI document: generated valid and invalid requests, plus real credentials."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    confirm = schema.raw_schema["paths"][CONFIRM_PATH]["post"]
    assert confirm["operationId"] == "postSoftphoneLocationConfirm", confirm
    real_bodies: dict[str, list[dict[str, Any]]] = {
        LOCATION_PATH: [credentials(NOMAD), credentials(BROWSER)],
        CONFIRM_PATH: [credentials(NOMAD, site="annex", location="a1"),
                       credentials(BROWSER, site="hq", location="f2")],
    }
    failures: dict[str, str] = {}
    ran = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(PAGE_PATH):
            continue
        key = f"{operation.method.upper()} {operation.path}"
        strategies = [operation.as_strategy(generation_mode=mode)
                      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        strategies += [operation.as_strategy(body=body)
                       for body in real_bodies.get(operation.path, [])]

        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies))
        def exercise(case: Any) -> None:
            case.call_and_validate()

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported below
            failures[key] = f"{type(exc).__name__}: {exc}"[:3000]
        ran.add(key)
    assert not failures, "\n\n".join(f"{key}\n{text}" for key, text in failures.items())
    return ran


async def test_softphone_operations_conform_to_the_openapi_document(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # generated requests carry wrong passwords: without a lockout, the real credentials
    # keep getting answered (and checked); the lockout has its own tests above
    monkeypatch.setattr(softphone_module, "MAX_FAILURES", 1_000_000)
    async with phone_switch(tmp_path) as bench:
        ran = await asyncio.to_thread(_softphone_operations_conform, bench.base)
        resolved = bench.switch.emergency.locations.resolve(NOMAD.extension)
    assert ran == {f"GET {PAGE_PATH}", f"GET {LIBRARY_PATH}", f"POST {LOCATION_PATH}",
                   f"POST {CONFIRM_PATH}"}, ran
    assert (str(resolved.status), resolved.location_id) == ("verified", "a1")  # 200s seen

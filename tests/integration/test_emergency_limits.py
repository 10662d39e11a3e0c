"""Emergency calls are never blocked, the emergency call is protected, PSAP callbacks
reach the caller, and devices are located (EMERGENCY.md EM-06, EM-09..EM-13, EM-24,
EM-40, EM-41, EM-50, EM-52, EM-55, EM-70, EM-81), against the real switch process.

One switch for the module (country FR, outside-line prefix "0", media ``none``) with
three accounts and two peer trunks, each a scripted `EmergencyTrunkUAS`:

- ``small`` on 127.0.0.3: one channel, ordinary calls of account ``busy`` only,
  emergency profile ``nat``; the emergency route of site ``depot``;
- ``carrier`` on 127.0.0.2: ordinary calls of accounts ``itest`` and ``frozen``
  (suspended), emergency profile ``pidf``; the emergency route of the other sites.

Sites: ``paris`` (network 127.0.0.1/32 is its location ``lab``, a callback number, an
HTTP notification sink run by the test), ``annex`` and ``depot`` (no networks),
``remote`` (network 10.0.0.0/8 only). Devices send from 127.0.0.1 unless a test
binds them elsewhere (127.0.0.5 for the banned source, 127.0.0.7 for an unknown
network). The EM-70 test starts its own switch and kills it with SIGKILL while its
emergency INVITE rings; the command-line checks (EM-06, EM-81) run ``python -m switch``
on written configuration files and start no switch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from switch_process import (
    LOOPBACK_V4,
    REPO_ROOT,
    SipDevice,
    SwitchProcess,
    free_port,
    prepare_switch,
)

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS, RequestRecord  # noqa: E402
from sipua import Call, SipUA  # noqa: E402

from e911.audit import field_bytes, read_journal, verify  # noqa: E402
from sip.message import SipRequest  # noqa: E402
from sip.multipart import parse_multipart  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SMALL_HOST = "127.0.0.3"  # the one-channel trunk, apart from the carrier's 127.0.0.2
BANNED_HOST = "127.0.0.5"  # the source address the failure ban hits
UNKNOWN_NETWORK_HOST = "127.0.0.7"  # a source address no site's networks map
PSTN = "+33478000000"  # an ordinary public number (the control call of every row)
PSTN_CALLER = "+33612345678"  # who the trunk says calls in
PARIS_CALLBACK = "+33140000100"
ANNEX_CALLBACK = "+33140000200"
DEPOT_CALLBACK = "+33140000300"
REMOTE_CALLBACK = "+33140000400"
WAIT_S = 5.0  # bound of every wait for something that should happen
QUIET_S = 0.4  # how long we watch for something that must not happen

CA = "{urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr}"
GP = "{urn:ietf:params:xml:ns:pidf:geopriv10}"

FR_ADDRESS = {"country": "FR", "A1": "75", "A3": "Paris", "RD": "Rue de Rivoli",
              "HNO": "20", "PC": "75001"}  # fmt: skip


def _site(site_id: str, callback: str, routes: list[str], **extra: Any) -> dict[str, Any]:
    address = dict(FR_ADDRESS, HNO=str(20 + len(site_id)))
    return {"id": site_id, "country": "FR", "address": address, "callback_number": callback,
            "routes": routes, **extra}  # fmt: skip


# -- devices of the module's switch (account itest unless said) -----------------------------
PARIS_B312 = {"site": "paris", "location": "b312"}
ANNEX_DESK = {"site": "annex", "location": "desk"}


def _device(extension: str, **settings: Any) -> SipDevice:
    """A device with password ``pw<extension>`` and a display name (see NAMELESS)."""
    return SipDevice(extension, f"pw{extension}", {"display_name": f"Phone {extension}",
                                                   **settings})


BARRED = _device("1010", class_of_service="internal_only", **ANNEX_DESK)
UNLOCATED = _device("1011")  # no site: ordinary calls refused, default location
BANNED = _device("1012", **ANNEX_DESK)
RP_CALLER = _device("1013", **ANNEX_DESK)  # sends Resource-Priority
EM40_CALLER = _device("1014", did="+33140000114", **PARIS_B312)
EM40_OTHER = _device("1015", **PARIS_B312)
DND_CALLER = _device("1020", did="+33140000120", do_not_disturb=True, forward_all="1021",
                     **PARIS_B312)
FORWARD_TARGET = _device("1021", **PARIS_B312)
DND_CONTROL = _device("1022", did="+33140000122", do_not_disturb=True, **PARIS_B312)
SITE_CALLER = _device("1023", site="paris", location="lab")  # no did: the site's number
FIXED_B312 = _device("1040", **PARIS_B312)
NO_LOCATION = _device("1041")
NOMADIC_MAPPED = _device("1042", mobility="nomadic")
NOMADIC_UNMAPPED = _device("1043", mobility="nomadic", **PARIS_B312)
FIXED_REMOTE = _device("1044", site="remote", location="hall")
FIXED_PARIS_AT_HOME = _device("1045", site="paris", location="lab")
# display_name is optional (default null): a device configured with the bare minimum
NAMELESS = SipDevice("1050", "pw1050", dict(PARIS_B312))
ITEST_DEVICES = [BARRED, UNLOCATED, BANNED, RP_CALLER, EM40_CALLER, EM40_OTHER, DND_CALLER,
                 FORWARD_TARGET, DND_CONTROL, SITE_CALLER, FIXED_B312, NO_LOCATION,
                 NOMADIC_MAPPED, NOMADIC_UNMAPPED, FIXED_REMOTE, FIXED_PARIS_AT_HOME, NAMELESS]
SUSPENDED = _device("3001", **ANNEX_DESK)  # account frozen (suspended)
CHANNEL_CALLER = _device("4001", site="depot", location="dock")  # account busy
CHANNEL_HOLDER = _device("4002", site="depot", location="dock")


def _account(account_id: str, devices: list[SipDevice], **keys: Any) -> dict[str, Any]:
    return {"id": account_id, **keys, "devices": [
        {"extension": d.extension, "password": d.password, **d.settings} for d in devices]}


# --------------------------------------------------------------------------------------
# Fixtures: the notification sink, the switch, the trunks
# --------------------------------------------------------------------------------------


class NotificationSink:
    """An HTTP server on loopback that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = {"unparseable": data.decode("utf-8", "replace")}
                with sink._lock:
                    sink.posts.append((self.path, payload))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer((LOOPBACK_V4, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK_V4}:{self.port}{path}"

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [payload for _, payload in self.posts]

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool],
                       timeout: float = WAIT_S) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            found = next((p for p in self.payloads() if predicate(p)), None)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def sink() -> Iterator[NotificationSink]:
    server = NotificationSink()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(timeout=5)


@dataclass(frozen=True)
class TrunkPorts:
    carrier: int
    small: int


@pytest.fixture(scope="module")
def trunk_ports() -> TrunkPorts:
    return TrunkPorts(free_port("udp", TRUNK_HOST), free_port("udp", SMALL_HOST))


def _sites(sink: NotificationSink | None) -> list[dict[str, Any]]:
    paris_notify = {"webhooks": [sink.url("/paris")]} if sink is not None else {}
    return [
        _site("paris", PARIS_CALLBACK, ["carrier"], notify=paris_notify,
              locations=[{"id": "b312", "FLR": "3", "ROOM": "B312"},
                         {"id": "lab", "FLR": "1", "ROOM": "L1"}],
              networks=[{"subnet": "127.0.0.1/32", "location": "lab"}]),
        _site("annex", ANNEX_CALLBACK, ["carrier"],
              locations=[{"id": "desk", "FLR": "2", "ROOM": "204"}]),
        _site("depot", DEPOT_CALLBACK, ["small"],
              locations=[{"id": "dock", "FLR": "0", "ROOM": "Dock"}]),
        _site("remote", REMOTE_CALLBACK, ["carrier"],
              locations=[{"id": "hall", "FLR": "5", "ROOM": "Hall"}],
              networks=[{"subnet": "10.0.0.0/8", "location": "hall"}]),
    ]


def _add_accounts(process: SwitchProcess, accounts: list[dict[str, Any]]) -> None:
    """Adds accounts to the written configuration (the helper writes only ``itest``)."""
    config = YAML(typ="safe").load(process.config_path.read_text(encoding="utf-8"))
    config["accounts"].extend(accounts)
    process.config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory, trunk_ports: TrunkPorts,
           sink: NotificationSink) -> Iterator[SwitchProcess]:
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [
            {"id": "small", "kind": "peer", "host": SMALL_HOST, "port": trunk_ports.small,
             "transport": "udp", "addresses": [f"{SMALL_HOST}/32"], "channels": 1,
             "accounts": ["busy"], "emergency": {"profile": "nat"}},
            {"id": "carrier", "kind": "peer", "host": TRUNK_HOST, "port": trunk_ports.carrier,
             "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
             "accounts": ["itest", "frozen"], "emergency": {"profile": "pidf"}},
        ],
        "emergency": {"route_timeout": 3, "retry_interval": 1, "unlocated_devices": "refuse",
                      "sites": _sites(sink)},
    }  # fmt: skip
    process = prepare_switch(
        tmp_path_factory.mktemp("emergency_limits"), ITEST_DEVICES, tcp=False,
        sections=sections, ban={"max_failures_per_source": 2},
    )
    _add_accounts(process, [
        _account("frozen", [SUSPENDED], suspended=True),
        _account("busy", [CHANNEL_CALLER, CHANNEL_HOLDER]),
    ])
    process.start()
    try:
        yield process
        assert process.process is not None and process.process.poll() is None, "switch died"
    finally:
        process.stop()


@pytest.fixture
async def carrier(trunk_ports: TrunkPorts) -> AsyncIterator[EmergencyTrunkUAS]:
    async with EmergencyTrunkUAS([200], port=trunk_ports.carrier) as uas:
        yield uas


@pytest.fixture
async def small(trunk_ports: TrunkPorts) -> AsyncIterator[EmergencyTrunkUAS]:
    async with EmergencyTrunkUAS([200], host=SMALL_HOST, port=trunk_ports.small) as uas:
        yield uas


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _ua(switch: SwitchProcess, device: SipDevice, *, host: str = LOOPBACK_V4,
        password: str | None = None) -> SipUA:
    return SipUA(device.extension, password or device.password, switch.address(), host=host)


async def _register(*uas: SipUA) -> None:
    for ua in uas:
        response = await ua.register(expires=120)
        assert response is not None and response.status == 200, (ua.username, response)


def _received(endpoint: Any, method: str) -> list[SipRequest]:
    return [r for r in endpoint.received if r.method == method]


async def _eventually(condition: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """``condition()`` once it is truthy (polled), or its last falsy value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(0.03)


async def _events(switch: SwitchProcess, name: str,
                  predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
                  timeout: float = WAIT_S) -> list[dict[str, Any]]:
    return await _eventually(lambda: [e for e in switch.events(name) if predicate(e)], timeout)


def _journal_dir(switch: SwitchProcess) -> Path:
    return switch.config_path.parent / "var" / "emergency"


async def _journal(switch: SwitchProcess, call_id: str, event: str) -> dict[str, Any] | None:
    """The call's first journal entry of ``event`` (waited for: the writer is a thread)."""
    return await _eventually(lambda: next(
        (e for e in read_journal(_journal_dir(switch), call_id=call_id) if e["event"] == event),
        None))


def _pidf(record: RequestRecord) -> ET.Element:
    """The switch's PIDF-LO of an emergency INVITE (multipart/mixed) as XML."""
    request = record.request
    content_type = request.header("Content-Type") or ""
    assert content_type.startswith("multipart/mixed"), content_type
    parts = [p for p in parse_multipart(content_type, request.body)
             if (p.content_type or "").startswith("application/pidf+xml")]
    assert len(parts) == 1, [p.content_type for p in parts]
    return ET.fromstring(parts[0].body)


def _civic(pidf: ET.Element) -> dict[str, str]:
    address = pidf.find(f".//{CA}civicAddress")
    assert address is not None, ET.tostring(pidf)
    return {child.tag.removeprefix(CA): (child.text or "") for child in address}


def _method(pidf: ET.Element) -> str | None:
    method = pidf.find(f".//{GP}method")
    return method.text if method is not None else None


def _pai(record: RequestRecord) -> list[str]:
    return record.request.header_values("P-Asserted-Identity")


async def _emergency_call(ua: SipUA, trunk: EmergencyTrunkUAS, dialled: str = "112",
                          ) -> tuple[Call, RequestRecord]:
    """``ua`` dials ``dialled``; the trunk answers. Returns the answered call and the one
    INVITE the trunk got for it."""
    before = len(trunk.invites)
    call = await ua.invite(dialled, timeout=WAIT_S + 3)
    assert call.status == 200, (dialled, call.final)
    invites = trunk.invites[before:]
    assert len(invites) == 1, [r.request.uri for r in invites]
    return call, invites[0]


async def _hang_up(call: Call) -> None:
    response = await call.bye()
    assert response is not None and response.status == 200, response


# --------------------------------------------------------------------------------------
# EM-10/11/12/13: the never-blocked matrix
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limiter:
    name: str
    device: SipDevice
    host: str
    control_status: int
    control_reason: str  # the start of the refusal's reason phrase
    route: str  # the trunk the emergency call goes to ("carrier" or "small")
    callback: str  # the callback number the emergency INVITE asserts


LIMITERS = [
    Limiter("account_suspended", SUSPENDED, LOOPBACK_V4, 403,
            "Account suspended: only emergency calls are possible", "carrier", ANNEX_CALLBACK),
    Limiter("internal_only", BARRED, LOOPBACK_V4, 403,
            "Outside calls are barred for this device", "carrier", ANNEX_CALLBACK),
    Limiter("no_location", UNLOCATED, LOOPBACK_V4, 403,
            "No emergency location is registered for this device", "carrier", PARIS_CALLBACK),
    Limiter("trunk_channels_full", CHANNEL_CALLER, LOOPBACK_V4, 503,
            "All channels of trunk small are busy", "small", DEPOT_CALLBACK),
    Limiter("source_banned", BANNED, BANNED_HOST, 403,
            "Too many failed authentications from this address", "carrier", ANNEX_CALLBACK),
]


async def _provoke_ban(switch: SwitchProcess, device: SipDevice) -> None:
    """Wrong passwords from the device's address until the switch bans the address."""
    async with _ua(switch, device, host=BANNED_HOST, password="not-the-password") as intruder:
        for _ in range(4):
            call = await intruder.invite(PSTN, timeout=WAIT_S)
            assert call.status in (403, 407), call.final
            if switch.events("calls.source_banned"):
                break
    banned = await _events(switch, "calls.source_banned", lambda e: e.get("source") == BANNED_HOST)
    assert banned, "two wrong passwords did not ban the source address"


async def _occupy_small_trunk(switch: SwitchProcess, holder: SipUA,
                              small: EmergencyTrunkUAS) -> Call:
    call = await holder.invite(PSTN, timeout=WAIT_S)
    assert call.status == 200, call.final
    assert len(small.invites) == 1 and len(small.answered) == 1
    return call


@pytest.mark.parametrize("limiter", LIMITERS, ids=[limiter.name for limiter in LIMITERS])
async def test_emergency_call_is_never_blocked(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS, small: EmergencyTrunkUAS,
    limiter: Limiter,
) -> None:  # fmt: skip
    trunks = {"carrier": carrier, "small": small}
    route = trunks[limiter.route]
    async with _ua(switch, limiter.device, host=limiter.host) as ua, \
            _ua(switch, CHANNEL_HOLDER) as holder:  # fmt: skip
        held: Call | None = None
        if limiter.name == "account_suspended":  # EM-12: still registers
            response = await ua.register(expires=120)
            assert response is not None and response.status == 200, response
        elif limiter.name == "trunk_channels_full":
            held = await _occupy_small_trunk(switch, holder, small)
        elif limiter.name == "source_banned":
            await _provoke_ban(switch, limiter.device)
        invites_before = {name: len(trunk.invites) for name, trunk in trunks.items()}

        control = await ua.invite(PSTN, timeout=WAIT_S)
        assert control.status == limiter.control_status, control.final
        assert control.final is not None
        assert control.final.reason.startswith(limiter.control_reason), control.final.reason
        await asyncio.sleep(QUIET_S)
        assert {n: len(t.invites) for n, t in trunks.items()} == invites_before, (
            "the refused call reached a trunk")

        call, invite = await _emergency_call(ua, route)
        assert [r.status for r in call.challenges] == [407]  # the banned source too
        assert _pai(invite) == [f"<sip:{limiter.callback}@{route.host};user=phone>"]
        assert all(len(t.invites) == invites_before[n] for n, t in trunks.items()
                   if n != limiter.route), "the emergency call also went elsewhere"
        if held is not None:  # EM-13: the ordinary call was released for it
            bye = await held.wait_request("BYE", WAIT_S)
            assert bye is not None, "the ordinary call's caller got no BYE"
            assert "cause=503" in (bye.header("Reason") or ""), bye.header("Reason")
            trunk_side = small.answered[0]
            trunk_bye = await trunk_side.wait_request("BYE", WAIT_S)
            assert trunk_bye is not None, "the ordinary call's trunk side got no BYE"
            assert "cause=503" in (trunk_bye.header("Reason") or ""), trunk_bye.header("Reason")
            assert invite.at > small.invites[0].at
            preempted = await _events(switch, "emergency.call_preempted",
                                      lambda e: e.get("trunk") == "small")
            assert preempted
        await _hang_up(call)


# --------------------------------------------------------------------------------------
# EM-09: no emergency treatment claimed from outside
# --------------------------------------------------------------------------------------


async def test_trunk_cannot_claim_emergency_treatment(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS, small: EmergencyTrunkUAS,
) -> None:  # fmt: skip
    host_port = f"{switch.address()[0]}:{switch.address()[1]}"
    sos = await carrier.place_call(
        "urn:service:sos", switch.address(), from_value=f"<sip:{PSTN_CALLER}@{TRUNK_HOST}>",
        to_value="<urn:service:sos>", headers=[("Resource-Priority", "esnet.1"),
                                               ("Priority", "emergency")],
        timeout=WAIT_S,
    )  # fmt: skip
    short = await carrier.call(
        switch.address(), "112", PSTN_CALLER, timeout=WAIT_S,
        headers=[("Resource-Priority", "esnet.1"), ("Priority", "emergency")],
    )
    # refused, never relayed: 416 while the switch takes no non-SIP Request-URI at all
    # (see test_device_dialling_the_sos_urn_reaches_the_trunk), 404 once it does
    assert sos.status in (404, 416), sos.final
    assert short.status == 404, short.final
    assert short.invite is not None and str(short.invite.uri) == f"sip:112@{host_port}"
    await asyncio.sleep(QUIET_S)
    assert carrier.invites == [] and small.invites == [], "an emergency trunk got an INVITE"
    claimed = {sos.call_id, short.call_id}
    assert [e for e in switch.events("emergency.call") if e.get("call_id") in claimed] == []


async def test_device_resource_priority_is_stripped_from_ordinary_calls(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, RP_CALLER) as ua:
        call = await ua.invite(PSTN, headers=[("Resource-Priority", "esnet.4")], timeout=WAIT_S)
        assert call.status == 200, call.final
        assert len(carrier.invites) == 1
        invite = carrier.invites[0].request
        assert str(invite.uri).startswith(f"sip:{PSTN}@{TRUNK_HOST}"), invite.uri
        assert invite.header_values("Resource-Priority") == []
        assert b"resource-priority" not in carrier.invites[0].raw.lower()
        await _hang_up(call)


# --------------------------------------------------------------------------------------
# EM-40: the emergency call is protected; the PSAP may transfer it
# --------------------------------------------------------------------------------------


async def test_emergency_call_cannot_be_held_transferred_or_interrupted(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, EM40_CALLER) as caller, _ua(switch, EM40_OTHER) as other, \
            EmergencyTrunkUAS([200]) as psap2:  # fmt: skip
        await _register(caller, other)
        call, invite = await _emergency_call(caller, carrier)
        psap_leg = next(c for c in carrier.answered if c.call_id == invite.request.call_id)

        waiting = await other.invite(EM40_CALLER.extension, timeout=WAIT_S)
        assert waiting.status == 486, waiting.final
        assert waiting.final is not None and "emergency" in waiting.final.reason.lower()
        await asyncio.sleep(QUIET_S)
        assert _received(caller, "INVITE") == [], "call waiting reached the emergency caller"

        hold = await call.reinvite(caller.default_offer(version=2, direction="sendonly"))
        assert hold is not None and hold.status == 403, hold
        await asyncio.sleep(QUIET_S)
        assert carrier.reinvites == [], "the hold re-INVITE reached the trunk"

        transfer = await call.refer(f"sip:{EM40_OTHER.extension}@{LOOPBACK_V4}")
        assert transfer is not None and transfer.status == 403, transfer
        assert _received(other, "INVITE") == []

        psap2_uri = f"sip:psap2@{TRUNK_HOST}:{psap2.port}"
        accepted = await psap_leg.refer(psap2_uri)
        assert accepted is not None and accepted.status == 202, accepted
        transferred = await psap2.wait_invite(WAIT_S)
        assert transferred is not None, (
            "the PSAP's REFER was not carried out: no INVITE at the Refer-To target; INVITEs"
            f" at the first PSAP: {[str(r.request.uri) for r in carrier.invites]}")
        assert str(transferred.request.uri) == psap2_uri
        bye = await psap_leg.wait_request("BYE", WAIT_S)
        assert bye is not None, "the transferring PSAP was not released"
        methods = [r.method for r in psap_leg.received if r.method in ("NOTIFY", "BYE")]
        assert methods.index("BYE") > methods.index("NOTIFY"), methods
        sipfrags = [r.body for r in psap_leg.received if r.method == "NOTIFY"]
        assert any(b"SIP/2.0 200" in body for body in sipfrags), sipfrags
        await _hang_up(call)  # now with psap2
        assert await _eventually(lambda: _received(psap2, "BYE")), "psap2 got no BYE"


# --------------------------------------------------------------------------------------
# EM-41: PSAP callbacks
# --------------------------------------------------------------------------------------


async def test_callback_to_did_bypasses_do_not_disturb_and_forwarding(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, DND_CALLER) as caller, _ua(switch, FORWARD_TARGET) as target, \
            _ua(switch, DND_CONTROL) as control_device:  # fmt: skip
        await _register(caller, target, control_device)
        call, _ = await _emergency_call(caller, carrier)
        await _hang_up(call)

        callback = await carrier.call(switch.address(), DND_CALLER.settings["did"], PSTN_CALLER,
                                      timeout=WAIT_S)
        assert callback.status == 200, callback.final
        assert len(_received(caller, "INVITE")) == 1, "the callback did not ring the device"
        assert len(caller.incoming_calls) == 1
        assert _received(target, "INVITE") == [], "the callback was forwarded"
        assert await _events(switch, "emergency.callback",
                             lambda e: e.get("device") == DND_CALLER.extension)
        await _hang_up(callback)

        refused = await carrier.call(switch.address(), DND_CONTROL.settings["did"], PSTN_CALLER,
                                     timeout=WAIT_S)
        assert refused.status == 486, refused.final
        assert _received(control_device, "INVITE") == []


async def test_callback_to_site_number_reaches_last_emergency_caller(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, SITE_CALLER) as caller:
        await _register(caller)
        call, invite = await _emergency_call(caller, carrier)
        assert _pai(invite) == [f"<sip:{PARIS_CALLBACK}@{TRUNK_HOST};user=phone>"]
        await _hang_up(call)

        callback = await carrier.call(switch.address(), PARIS_CALLBACK, PSTN_CALLER,
                                      timeout=WAIT_S)
        assert callback.status == 200, callback.final
        assert len(_received(caller, "INVITE")) == 1, "the site callback did not ring the caller"
        await _hang_up(callback)


# --------------------------------------------------------------------------------------
# EM-24, EM-50, EM-52, EM-55: locations
# --------------------------------------------------------------------------------------


async def test_fixed_device_sends_its_dispatchable_location(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, FIXED_B312) as ua:
        call, invite = await _emergency_call(ua, carrier)
        pidf = _pidf(invite)
        civic = _civic(pidf)
        assert civic["FLR"] == "3" and civic["ROOM"] == "B312", civic
        assert civic["A3"] == "Paris" and civic["country"] == "FR", civic
        assert _method(pidf) == "Manual"
        await _hang_up(call)


async def test_device_without_display_name_gets_emergency_treatment(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    """A device configured without ``display_name`` (the default) calls 112: the trunk
    gets the emergency INVITE (pidf profile: the callback number asserted, the PIDF-LO)."""
    async with _ua(switch, NAMELESS) as ua:
        call, invite = await _emergency_call(ua, carrier)
        await _hang_up(call)
        failed = [e for e in switch.events("emergency.begin_failed")
                  if e.get("call_id") == call.call_id]
        assert failed == [], failed[0].get("exception", "")[-300:]
        assert _pai(invite) == [f"<sip:{PARIS_CALLBACK}@{TRUNK_HOST};user=phone>"]
        assert _civic(_pidf(invite))["ROOM"] == "B312"


async def test_device_dialling_the_sos_urn_reaches_the_trunk(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    """The contrast to EM-09's trunk case: from a device, ``urn:service:sos`` (RFC 5031)
    is an emergency call like 112 and must not be refused."""
    async with _ua(switch, FIXED_B312) as ua:
        call, invite = await _emergency_call(ua, carrier, "urn:service:sos")
        assert _pai(invite) == [f"<sip:{PARIS_CALLBACK}@{TRUNK_HOST};user=phone>"]
        await _hang_up(call)


async def test_device_without_location_sends_site_default(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS, sink: NotificationSink
) -> None:
    async with _ua(switch, NO_LOCATION) as ua:
        started = time.monotonic()
        call, invite = await _emergency_call(ua, carrier)
        assert invite.at - started < 2.0, "the unlocated device's call was delayed"
        pidf = _pidf(invite)
        civic = _civic(pidf)
        assert {k: civic.get(k) for k in ("country", "A3", "RD", "PC")} == {
            "country": "FR", "A3": "Paris", "RD": "Rue de Rivoli", "PC": "75001"}, civic
        assert "FLR" not in civic and "ROOM" not in civic, civic
        assert _method(pidf) == "Default"
        payload = await sink.wait_for(lambda p: p.get("call_id") == call.call_id)
        assert payload is not None, "no notification reached the site's webhook"
        assert payload["location_status"] == "default", payload
        assert payload["extension"] == NO_LOCATION.extension and payload["site"] == "paris"
        alerts = await _events(switch, "emergency.alert",
                               lambda e: e.get("call_id") == call.call_id)
        assert alerts and alerts[0]["kind"] == "location_unverified", alerts
        await _hang_up(call)


async def test_nomadic_device_on_mapped_network_gets_that_location(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, NOMADIC_MAPPED) as ua:
        await _register(ua)
        call, invite = await _emergency_call(ua, carrier)
        civic = _civic(_pidf(invite))
        assert civic["FLR"] == "1" and civic["ROOM"] == "L1", civic
        await _hang_up(call)
        assert _received(ua, "MESSAGE") == [], "a mapped network was called unconfirmed"


async def test_nomadic_device_on_unknown_network_is_told_and_still_calls(
    switch: SwitchProcess, carrier: EmergencyTrunkUAS
) -> None:
    async with _ua(switch, NOMADIC_UNMAPPED, host=UNKNOWN_NETWORK_HOST) as ua:
        await _register(ua)
        prompt = await ua.wait_for("MESSAGE", WAIT_S)
        assert prompt is not None, "no location prompt (SIP MESSAGE) after REGISTER"
        assert b"unconfirmed" in prompt.body.lower(), prompt.body
        call, invite = await _emergency_call(ua, carrier)
        civic = _civic(_pidf(invite))  # the last confirmed (provisioned) address
        assert civic["ROOM"] == "B312", civic
        classified = await _journal(switch, call.call_id, "classified")
        assert classified is not None, "no classified entry in the journal"
        assert classified["fields"]["location_status"] == "unconfirmed", classified["fields"]
        await _hang_up(call)


async def test_fixed_device_registering_outside_its_site_raises_alert(
    switch: SwitchProcess,
) -> None:
    async with _ua(switch, FIXED_REMOTE) as moved, _ua(switch, FIXED_PARIS_AT_HOME) as home:
        await _register(moved, home)
        alerts = await _events(switch, "emergency.alert",
                               lambda e: e.get("device") == FIXED_REMOTE.extension)
        assert [a["kind"] for a in alerts] == ["device_moved"], alerts
        await asyncio.sleep(QUIET_S)
        assert [e for e in switch.events("emergency.alert")
                if e.get("device") == FIXED_PARIS_AT_HOME.extension] == []


# --------------------------------------------------------------------------------------
# EM-70: kill -9 during an emergency call
# --------------------------------------------------------------------------------------


async def test_journal_survives_kill_9_while_emergency_invite_rings(
    tmp_path: Path,
) -> None:
    trunk_port = free_port("udp", TRUNK_HOST)
    device = _device("101", **PARIS_B312)
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": "carrier", "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "pidf"}}],
        "emergency": {"route_timeout": 30, "sites": _sites(None)[:1]},
    }  # fmt: skip
    process = prepare_switch(tmp_path / "killed", [device], tcp=False, sections=sections)
    process.start()
    try:
        async with EmergencyTrunkUAS([180], port=trunk_port) as trunk, \
                _ua(process, device) as ua:  # fmt: skip
            call = await ua.invite("112", wait="sent")
            received = await trunk.wait_invite(WAIT_S)
            assert received is not None, "the emergency INVITE never reached the trunk"
            await asyncio.sleep(0.1)
            assert process.process is not None and process.process.poll() is None
            os.kill(process.pid, signal.SIGKILL)
            assert process.process.wait(timeout=10) == -signal.SIGKILL
    finally:
        process.stop()
    directory = _journal_dir(process)
    entries = list(read_journal(directory, call_id=call.call_id))
    events = [e["event"] for e in entries]
    assert "classified" in events and "invite_sent" in events, events
    classified = entries[events.index("classified")]["fields"]
    assert classified["device"] == device.extension and classified["number_class"] == "emergency"
    sent = entries[events.index("invite_sent")]["fields"]
    assert sent["request_uri"] == str(received.request.uri)
    assert field_bytes(sent["body"]) == received.request.body  # EM-70 (3): exact bytes
    assert verify(directory) == []


# --------------------------------------------------------------------------------------
# EM-81 readiness and EM-06 configuration checks (command line)
# --------------------------------------------------------------------------------------


def _run_switch_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "switch", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def _readiness_config(workdir: Path, *, recipients: bool) -> Path:
    sites = [
        _site("paris", PARIS_CALLBACK, ["carrier"],
              notify={"webhooks": ["https://security.example/hooks/112"]},
              locations=[{"id": "b312", "FLR": "3", "ROOM": "B312"}]),
        _site("annex", ANNEX_CALLBACK, ["carrier"],
              notify={"webhooks": ["https://security.example/hooks/annex"]} if recipients
              else {}, locations=[{"id": "desk", "FLR": "2", "ROOM": "204"}]),
    ]  # fmt: skip
    sections = {
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": "carrier", "kind": "peer", "host": TRUNK_HOST, "port": 5060,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "pidf"}}],
        "emergency": {"sites": sites},
    }  # fmt: skip
    devices = [_device("101", **PARIS_B312), _device("102", **ANNEX_DESK)]
    return prepare_switch(workdir, devices, tcp=False, sections=sections).config_path


@pytest.mark.parametrize("recipients", [False, True], ids=["annex_without_recipient", "ready"])
def test_emergency_readiness_command(tmp_path: Path, recipients: bool) -> None:
    config = _readiness_config(tmp_path, recipients=recipients)
    result = _run_switch_cli("emergency", "readiness", "--config", str(config))
    lines = result.stdout.splitlines()
    if recipients:
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert "emergency calling: ready" in lines, result.stdout
    else:
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "annex: no MLTS notification recipient" in lines, result.stdout
        assert not any(line.startswith("paris:") for line in lines), result.stdout


def _targets_config(workdir: Path, key: str, value: Any) -> Path:
    """A configuration valid but for device 101's ``key`` (a forward or speed dials)."""
    devices = [_device("101", **PARIS_B312, **{key: value}), _device("102", **PARIS_B312)]
    return prepare_switch(workdir, devices, tcp=False, sections={
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": "carrier", "kind": "peer", "host": TRUNK_HOST, "port": 5060,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "pidf"}}],
        "emergency": {"sites": _sites(None)[:1]},
    }).config_path  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "harmless", "target"),
    [("forward_all", "112", "102", "112"),
     ("speed_dials", {"*1": "0112"}, {"*1": "102"}, "0112")],
    ids=["forward_all_112", "speed_dial_0112"],
)
def test_check_config_refuses_emergency_numbers_as_targets(
    tmp_path: Path, key: str, value: Any, harmless: Any, target: str
) -> None:
    accepted = _run_switch_cli("check-config",
                               str(_targets_config(tmp_path / "ok", key, harmless)))
    assert accepted.returncode == 0, (accepted.stdout, accepted.stderr)

    config = _targets_config(tmp_path / "bad", key, value)
    text = config.read_text(encoding="utf-8").splitlines()
    line = next(n for n, content in enumerate(text, start=1) if f'"{target}"' in content)
    result = _run_switch_cli("check-config", str(config))
    assert result.returncode != 0, (result.stdout, result.stderr)
    problems = result.stderr.splitlines()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{config}:{line}: accounts[0].devices[0].{key}"), problems
    assert f"'{target}' is an emergency number" in problems[0], problems

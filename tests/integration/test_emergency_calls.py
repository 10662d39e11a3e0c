"""Emergency calls through the real switch process (EMERGENCY.md EM-01..EM-04, EM-07,
EM-08, EM-13, EM-14, EM-20..EM-25, EM-29, EM-31, EM-60, EM-70).

Three switch processes, one per module, each with its devices (DEV-x, `SipUA` on
127.0.0.1) and fake emergency trunks (ETRUNK-x, `EmergencyTrunkUAS` on 127.0.0.2):

- ``fr``: country FR, outside-line prefix 0. Site lyon routes to a P-NAT trunk, site
  paris to a P-PIDF trunk, site marseille to the P-NAT trunk and tells a security-desk
  phone by SIP MESSAGE; paris is the default site of devices with no location. Site
  webhooks go to NOTIFY-SINK, a local HTTP server.
- ``us``: country US, prefix 9. Site chicago routes to a P-DLR trunk, site dallas to a
  P-I3 trunk (ESRP Route, trusted esnet with ``Resource-Priority: esnet.1``,
  ``Priority: emergency``, ProviderInfo Call-Info). Test calls notify the admin webhook.
- ``failover``: country FR, one site with two P-PIDF routes (primary, secondary), a
  route timeout of 1 s and a retry interval of 1 s, the media relay and its SIT-tone
  announcement for callers whose routes all failed.

Each test checks what ETRUNK receives (Request-URI, headers one by one, the multipart
body and every PIDF-LO, validated with ``e911.pidf.validate_pidf(strict=True)``), what
the caller gets, what NOTIFY-SINK receives and what the audit journal holds. Every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from switch_process import LOOPBACK_V4, REPO_ROOT, SipDevice, SwitchProcess, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS, RequestRecord  # noqa: E402
from sipua import Call, SipUA, offer_sdp  # noqa: E402

from e911.audit import field_bytes, read_journal  # noqa: E402
from e911.pidf import validate_pidf  # noqa: E402
from media.announcement import decode_alaw, decode_ulaw  # noqa: E402
from sip.message import SipRequest  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]

# --------------------------------------------------------------------------------------
# Namespaces and reference data
# --------------------------------------------------------------------------------------

NS = {
    "pidf": "urn:ietf:params:xml:ns:pidf",
    "dm": "urn:ietf:params:xml:ns:pidf:data-model",
    "gp": "urn:ietf:params:xml:ns:pidf:geopriv10",
    "ca": "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr",
}
# RFC 5139 xs:sequence of civicAddress (EMERGENCY.md §3.4.1)
CIVIC_ORDER = (
    "country A1 A2 A3 A4 A5 A6 PRM PRD RD STS POD POM RDSEC RDBR RDSUBBR HNO HNS LMK LOC"
    " FLR NAM PC BLD UNIT ROOM SEAT PLC PCN POBOX ADDCODE"
).split()
PIDF_TYPE = "application/pidf+xml"
SDP_TYPE = "application/sdp"
ACCEPT_WITH_LOCATION = "application/sdp, application/pidf+xml"
NOTIFICATION_FIELDS = {
    "call_id", "dialled", "number_class", "time", "extension", "user", "device", "account",
    "site", "callback_number", "location", "location_summary", "location_status", "floor",
    "room", "trunk", "outcome", "test",
}  # fmt: skip
ACCOUNT_ID = "itest"  # the account switch_process.build_config writes
ESRP_ROUTE = "sip:esrp.example.net;lr"
PROVIDER_INFO = "https://provider.example.net/ecd/provider-info"

LYON_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
                "HNO": "10", "PC": "69002"}  # fmt: skip
PARIS_ADDRESS = {"country": "FR", "A1": "75", "A3": "Paris", "RD": "Rue de Rivoli",
                 "HNO": "50", "PC": "75001"}  # fmt: skip
MARSEILLE_ADDRESS = {"country": "FR", "A1": "13", "A3": "Marseille", "RD": "La Canebière",
                     "HNO": "1", "PC": "13001"}  # fmt: skip
CHICAGO_ADDRESS = {"country": "US", "A1": "IL", "A3": "Chicago", "RD": "Wacker Dr",
                   "HNO": "233", "PC": "60606"}  # fmt: skip
DALLAS_ADDRESS = {"country": "US", "A1": "TX", "A3": "Dallas", "RD": "Main St",
                  "HNO": "1500", "PC": "75201"}  # fmt: skip


@dataclass(frozen=True)
class Dev:
    """A device of a test switch and what its emergency calls must carry."""

    extension: str
    name: str
    settings: dict[str, Any]
    callback: str  # the E.164 number its emergency calls assert
    civic: dict[str, str] = field(default_factory=dict)  # the location sent to the PSAP

    @property
    def password(self) -> str:
        return f"pw{self.extension}"

    def sip_device(self) -> SipDevice:
        return SipDevice(self.extension, self.password,
                         {"display_name": self.name, **self.settings})


# FR switch
ALICE = Dev("101", "Alice", {"site": "lyon", "location": "b312", "did": "+33478000101"},
            "+33478000101", {**LYON_ADDRESS, "FLR": "3", "ROOM": "B312"})
BOB = Dev("102", "Bob", {"site": "paris", "location": "p5", "did": "+33142000102"},
          "+33142000102", {**PARIS_ADDRESS, "FLR": "5", "ROOM": "512"})
CAROL = Dev("103", "Carol", {"site": "marseille", "location": "m1", "did": "+33491000103"},
            "+33491000103", {**MARSEILLE_ADDRESS, "FLR": "1", "ROOM": "101"})
DESK = Dev("190", "Security Desk", {"site": "marseille", "location": "m1"}, "+33491000100")
DAVE = Dev("109", "Dave", {}, "+33142000100", dict(PARIS_ADDRESS))  # no site, no location
# US switch
ERIN = Dev("201", "Erin", {"site": "chicago", "location": "c12", "did": "+13125550101"},
           "+13125550101", {**CHICAGO_ADDRESS, "FLR": "12", "ROOM": "1204"})
FRANK = Dev("202", "Frank", {"site": "chicago", "location": "c12"}, "+13125550100",
            {**CHICAGO_ADDRESS, "FLR": "12", "ROOM": "1204"})  # no did: the site's number
GRACE = Dev("203", "Grace", {"site": "chicago", "location": "c12", "did": "+13125550103",
                             "class_of_service": "internal_only"},
            "+13125550103", {**CHICAGO_ADDRESS, "FLR": "12", "ROOM": "1204"})
HEIDI = Dev("301", "Heidi", {"site": "dallas", "location": "d2", "did": "+12145550101"},
            "+12145550101", {**DALLAS_ADDRESS, "FLR": "2", "ROOM": "210"})
# failover switch
IVAN = Dev("401", "Ivan", {"site": "lyon", "location": "b312", "did": "+33478000401"},
           "+33478000401", {**LYON_ADDRESS, "FLR": "3", "ROOM": "B312"})


# --------------------------------------------------------------------------------------
# Ports, NOTIFY-SINK, switches
# --------------------------------------------------------------------------------------


def _free_udp(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _free_tcp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_V4, 0))
        return int(sock.getsockname()[1])


@dataclass
class Ports:
    """Loopback ports fixed for the module: trunks, devices and NOTIFY-SINK (a device
    re-registers from the same port in every test, so its binding is simply refreshed)."""

    sink: int
    trunks: dict[str, int]
    devices: dict[str, int]
    relay_base: int


@pytest.fixture(scope="module")
def ports() -> Ports:
    trunk_ids = ["fr-nat", "fr-pidf", "us-dlr", "us-i3", "primary", "secondary"]
    devices = [ALICE, BOB, CAROL, DESK, DAVE, ERIN, FRANK, GRACE, HEIDI, IVAN]
    return Ports(
        sink=_free_tcp(),
        trunks={name: _free_udp(TRUNK_HOST) for name in trunk_ids},
        devices={dev.extension: _free_udp(LOOPBACK_V4) for dev in devices},
        relay_base=random.randrange(50000, 59000, 2),
    )


def _sink_url(ports: Ports, path: str) -> str:
    return f"http://{LOOPBACK_V4}:{ports.sink}/{path}"


def _trunk(trunk_id: str, port: int, profile: dict[str, Any]) -> dict[str, Any]:
    return {"id": trunk_id, "kind": "peer", "host": TRUNK_HOST, "port": port,
            "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"], "emergency": profile}


def _media(low: int) -> dict[str, Any]:
    return {"backend": "relay", "bind_host": LOOPBACK_V4, "port_min": low,
            "port_max": low + 199, "media_timeout": 0}


def _start(workdir: Path, devices: list[Dev], sections: dict[str, Any]) -> SwitchProcess:
    process = prepare_switch(workdir, [d.sip_device() for d in devices], tcp=False,
                             sections=sections)
    process.start()
    if process.process is None or process.process.poll() is not None:
        process.stop()
        raise AssertionError(f"the switch did not start:\n{process.log_text()[-3000:]}")
    return process


@contextlib.contextmanager
def _running(process: SwitchProcess) -> Iterator[SwitchProcess]:
    try:
        yield process
        assert process.process is not None and process.process.poll() is None, "switch died"
    finally:
        process.stop()
        Path(process.config_path.parent / "switch.log").write_text(process.log_text())


@pytest.fixture(scope="module")
def fr_switch(tmp_path_factory: pytest.TempPathFactory, ports: Ports) -> Iterator[SwitchProcess]:
    t = ports.trunks
    sections = {
        "media": _media(ports.relay_base),
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [
            _trunk("fr-nat", t["fr-nat"], {"profile": "nat"}),
            _trunk("fr-pidf", t["fr-pidf"], {"profile": "pidf", "emergency_number": "112"}),
        ],
        "emergency": {
            "route_timeout": 3, "retry_interval": 1, "default_site": "paris",
            "admin_webhooks": [_sink_url(ports, "fr-admin")],
            "sites": [
                {"id": "lyon", "country": "FR", "address": LYON_ADDRESS,
                 "callback_number": "+33478000100", "routes": ["fr-nat"],
                 "notify": {"webhooks": [_sink_url(ports, "lyon")]},
                 "locations": [{"id": "b312", "FLR": "3", "ROOM": "B312"}]},
                {"id": "paris", "country": "FR", "address": PARIS_ADDRESS,
                 "callback_number": "+33142000100", "routes": ["fr-pidf"],
                 "notify": {"webhooks": [_sink_url(ports, "paris")]},
                 "locations": [{"id": "p5", "FLR": "5", "ROOM": "512"}]},
                {"id": "marseille", "country": "FR", "address": MARSEILLE_ADDRESS,
                 "callback_number": "+33491000100", "routes": ["fr-nat"],
                 "notify": {"devices": [DESK.extension]},
                 "locations": [{"id": "m1", "FLR": "1", "ROOM": "101"}]},
            ],
        },
    }  # fmt: skip
    process = _start(tmp_path_factory.mktemp("em_fr"), [ALICE, BOB, CAROL, DESK, DAVE],
                     sections)
    with _running(process):
        yield process


@pytest.fixture(scope="module")
def us_switch(tmp_path_factory: pytest.TempPathFactory, ports: Ports) -> Iterator[SwitchProcess]:
    t = ports.trunks
    sections = {
        "media": _media(ports.relay_base + 200),
        "dialplan": {"country": "US", "outside_line_prefix": "9"},
        "trunks": [
            _trunk("us-dlr", t["us-dlr"], {"profile": "dlr"}),
            _trunk("us-i3", t["us-i3"], {
                "profile": "i3", "esrp_route": ESRP_ROUTE, "trusted_esnet": True,
                "resource_priority": "esnet.1", "priority": True,
                "provider_info_url": PROVIDER_INFO,
            }),
        ],
        "emergency": {
            "route_timeout": 3, "retry_interval": 1,
            "admin_webhooks": [_sink_url(ports, "us-admin")],
            "sites": [
                {"id": "chicago", "country": "US", "address": CHICAGO_ADDRESS,
                 "callback_number": "+13125550100", "routes": ["us-dlr"],
                 "locations": [{"id": "c12", "FLR": "12", "ROOM": "1204"}]},
                {"id": "dallas", "country": "US", "address": DALLAS_ADDRESS,
                 "callback_number": "+12145550100", "routes": ["us-i3"],
                 "locations": [{"id": "d2", "FLR": "2", "ROOM": "210"}]},
            ],
        },
    }  # fmt: skip
    process = _start(tmp_path_factory.mktemp("em_us"), [ERIN, FRANK, GRACE, HEIDI], sections)
    with _running(process):
        yield process


@pytest.fixture(scope="module")
def failover_switch(
    tmp_path_factory: pytest.TempPathFactory, ports: Ports
) -> Iterator[SwitchProcess]:
    t = ports.trunks
    sections = {
        "media": _media(ports.relay_base + 400),
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [
            _trunk("primary", t["primary"], {"profile": "pidf", "emergency_number": "112"}),
            _trunk("secondary", t["secondary"], {"profile": "pidf", "emergency_number": "112"}),
        ],
        "emergency": {
            "route_timeout": 1, "retry_interval": 1,
            "sites": [
                {"id": "lyon", "country": "FR", "address": LYON_ADDRESS,
                 "callback_number": "+33478000100", "routes": ["primary", "secondary"],
                 "notify": {"webhooks": [_sink_url(ports, "failover")]},
                 "locations": [{"id": "b312", "FLR": "3", "ROOM": "B312"}]},
            ],
        },
    }  # fmt: skip
    process = _start(tmp_path_factory.mktemp("em_failover"), [IVAN], sections)
    with _running(process):
        yield process


class NotifySink:
    """NOTIFY-SINK: an HTTP/1.1 server on loopback recording every webhook POST.
    ``mode`` "ok" answers 200 at once; "hang" reads the request and never answers."""

    def __init__(self, port: int, mode: str = "ok") -> None:
        self.port = port
        self.mode = mode
        self.received: list[tuple[float, str, dict[str, Any]]] = []  # (monotonic, path, JSON)
        self.errors: list[str] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._arrival = asyncio.Event()

    async def start(self) -> NotifySink:
        self._server = await asyncio.start_server(self._handle, LOOPBACK_V4, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            method, path, _ = request_line.split(" ", 2)
            if method != "POST":
                self.errors.append(f"unexpected {request_line!r}")
            self.received.append((time.monotonic(), path.lstrip("/"), json.loads(body)))
            self._arrival.set()
            self._arrival = asyncio.Event()
            if self.mode == "hang":
                await asyncio.sleep(60)  # accepted, never answered (cancelled by close())
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError) as exc:
            self.errors.append(f"bad webhook request: {exc!r}")
        finally:
            writer.close()
            self._handlers.discard(task)

    def payloads(self, call_id: str, outcome: str | None = None) -> list[dict[str, Any]]:
        return [p for _, _, p in self.received
                if p.get("call_id") == call_id and (outcome is None or p.get("outcome") == outcome)]

    async def wait_payload(
        self, call_id: str, outcome: str, timeout: float = 5.0
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            found = self.payloads(call_id, outcome)
            if found:
                return found[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), remaining)


@pytest.fixture
async def sink(ports: Ports) -> AsyncIterator[NotifySink]:
    server = await NotifySink(ports.sink).start()
    try:
        yield server
    finally:
        await server.close()


# --------------------------------------------------------------------------------------
# Helpers: devices, trunks, calls
# --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def registered(switch: SwitchProcess, ports: Ports, dev: Dev) -> AsyncIterator[SipUA]:
    async with SipUA(dev.extension, dev.password, switch.address(),
                     port=ports.devices[dev.extension]) as ua:
        response = await ua.register(expires=300)
        assert response is not None and response.status == 200, response
        yield ua


@contextlib.asynccontextmanager
async def trunks(
    ports: Ports, **scripts: list[Any]
) -> AsyncIterator[dict[str, EmergencyTrunkUAS]]:
    """One ETRUNK per keyword (trunk id with ``-`` written ``_``), each with its script."""
    async with contextlib.AsyncExitStack() as stack:
        running = {}
        for key, script in scripts.items():
            name = key.replace("_", "-")
            running[name] = await stack.enter_async_context(
                EmergencyTrunkUAS(script, port=ports.trunks[name]))
        yield running


async def place(ua: SipUA, target: str, **options: Any) -> Call:
    call = await ua.invite(target, timeout=options.pop("timeout", 8), **options)
    return call


async def hang_up(call: Call) -> None:
    if call.answered:
        response = await call.bye(timeout=3)
        assert response is not None and response.status == 200, response


def strip_tag(value: str) -> str:
    return re.sub(r";tag=[^;>]*", "", value)


def significant_headers(request: SipRequest) -> list[tuple[str, str]]:
    """The headers a golden comparison looks at: not Via, Call-ID, Content-Length; tags
    removed (EM-20)."""
    ignored = {"via", "call-id", "content-length"}
    return [(n, strip_tag(v) if n in ("From", "To") else v)
            for n, v in request.headers if n.lower() not in ignored]


def assert_headers(request: SipRequest, expected: dict[str, str | re.Pattern[str]]) -> None:
    """Exactly the ``expected`` header names (each once), each value equal or matching."""
    found = significant_headers(request)
    names = sorted(n.lower() for n, _ in found)
    assert names == sorted(n.lower() for n in expected), (names, sorted(expected))
    for name, want in expected.items():
        value = next(v for n, v in found if n.lower() == name.lower())
        if isinstance(want, re.Pattern):
            assert want.fullmatch(value), (name, value, want.pattern)
        else:
            assert value == want, (name, value, want)


def multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """A strict RFC 2046 split, written here independently of the switch's parser: the
    body must be exactly delimiter, parts, close-delimiter (no preamble or epilogue)."""
    match = re.fullmatch(r'multipart/mixed\s*;\s*boundary="?([^";\s]+)"?', content_type.strip())
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    assert body.startswith(delimiter + b"\r\n"), body[:80]
    assert body.endswith(delimiter + b"--\r\n") or body.endswith(delimiter + b"--"), body[-80:]
    inner = body[len(delimiter) + 2:body.rindex(b"\r\n" + delimiter + b"--")]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, content = raw.partition(b"\r\n\r\n")
        assert sep, raw[:80]
        headers = {}
        for line in head.decode().split("\r\n"):
            name, colon, value = line.partition(":")
            assert colon, line
            assert name.strip().lower() not in headers, f"duplicate part header {name}"
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def geolocation_cids(request: SipRequest) -> list[str]:
    values = []
    for line in request.header_lines("Geolocation"):
        values += [v.strip() for v in line.split(",") if v.strip()]
    cids = []
    for value in values:
        match = re.fullmatch(r"<cid:([^>]+)>", value)
        assert match, value
        cids.append(match.group(1))
    return cids


def civic_of(document: bytes) -> list[tuple[str, str]]:
    """The civicAddress children (local name, text), in document order."""
    root = etree.fromstring(document)
    civics = root.findall(".//ca:civicAddress", NS)
    assert len(civics) == 1, f"{len(civics)} civicAddress elements"
    return [(etree.QName(el).localname, el.text or "") for el in civics[0]
            if isinstance(el.tag, str)]


def pidf_method(document: bytes) -> str:
    methods = etree.fromstring(document).findall(".//gp:method", NS)
    assert len(methods) == 1
    return methods[0].text or ""


def check_switch_pidf(document: bytes, dev: Dev, method: str = "Manual") -> None:
    """EM-22: valid (strict profile), the provisioned location's fields exactly, in
    RFC 5139 order, no empty element, the method, the device identified."""
    assert validate_pidf(document, strict=True) == []
    civic = civic_of(document)
    assert dict(civic) == dev.civic, (civic, dev.civic)
    assert all(text.strip() for _, text in civic), civic  # no <FLR/>-like element
    names = [name for name, _ in civic]
    assert names == sorted(names, key=CIVIC_ORDER.index), names
    assert pidf_method(document) == method
    root = etree.fromstring(document)
    devices = root.findall("dm:device", NS)
    assert len(devices) == 1 and len(devices[0].findall("gp:geopriv", NS)) == 1
    assert devices[0].findtext("dm:deviceID", namespaces=NS) == dev.extension
    assert devices[0].findtext("dm:timestamp", namespaces=NS)
    assert root.get("entity", "").startswith(f"sip:{dev.callback}@")


def check_pidf_body(request: SipRequest) -> list[tuple[dict[str, str], bytes]]:
    """EM-21: multipart/mixed with exactly one SDP part and PIDF parts whose Content-IDs
    are exactly the Geolocation cids, in order; one Geolocation-Routing: yes; Accept;
    Content-Length equal to the body's length. Returns the PIDF parts."""
    content_type = request.header("Content-Type") or ""
    parts = multipart_parts(content_type, request.body)
    types = [h.get("content-type", "") for h, _ in parts]
    assert types.count(SDP_TYPE) == 1, types
    assert types[0] == SDP_TYPE, types
    assert all(t in (SDP_TYPE, PIDF_TYPE) for t in types), types
    assert parts[0][1].startswith(b"v=0\r\n") and b"m=audio " in parts[0][1]
    pidfs = [(h, b) for h, b in parts if h.get("content-type") == PIDF_TYPE]
    content_ids = [h.get("content-id", "") for h, _ in pidfs]
    assert [f"<{cid}>" for cid in geolocation_cids(request)] == content_ids
    assert request.header_lines("Geolocation-Routing") == ["yes"]
    assert request.header_lines("Accept") == [ACCEPT_WITH_LOCATION]
    assert request.header_lines("Content-Length") == [str(len(request.body))]
    return pidfs


def check_no_location(request: SipRequest) -> None:
    """No body beyond the SDP offer and no location header (EM-08, P-DLR, P-NAT)."""
    assert request.header("Content-Type") == SDP_TYPE
    assert request.body.startswith(b"v=0\r\n") and PIDF_TYPE.encode() not in request.body
    for name in ("Geolocation", "Geolocation-Routing", "Accept"):
        assert request.header(name) is None, name


def check_identity(request: SipRequest, number: str) -> None:
    """EM-14/EM-25: exactly one PAI, an E.164 SIP URI with user=phone, and a From with
    the same number; nothing anonymous or private."""
    pai = request.header_lines("P-Asserted-Identity")
    assert pai == [f"<sip:{number}@{TRUNK_HOST};user=phone>"], pai
    assert re.fullmatch(rf'(?:"[^"]*" )?<sip:{re.escape(number)}@{TRUNK_HOST}>',
                        strip_tag(request.header("From") or "")), request.header("From")
    assert request.header("Privacy") is None
    assert "anonymous" not in (request.header("From") or "").lower()


def journal_dir(switch: SwitchProcess) -> Path:
    return switch.config_path.parent / "var" / "emergency"


async def journal_entries(
    switch: SwitchProcess, call_id: str, until_event: str, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The call's journal entries once ``until_event`` is among them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = list(read_journal(journal_dir(switch), call_id=call_id))
        if any(e["event"] == until_event for e in entries) or time.monotonic() > deadline:
            return entries
        await asyncio.sleep(0.05)


async def wait_events(
    switch: SwitchProcess, name: str, predicate: Any, timeout: float = 5.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in switch.events(name) if predicate(e)]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


async def emergency_call(
    ua: SipUA, target: str, trunk: EmergencyTrunkUAS, **options: Any
) -> tuple[Call, RequestRecord]:
    """Dial ``target``; the call must be answered by ``trunk``, which must have got exactly
    one INVITE. Hangs up and returns (call, the INVITE record)."""
    call = await place(ua, target, **options)
    assert call.status == 200, (target, call.final, [r.status for r in call.provisionals])
    try:
        assert len(trunk.invites) == 1, [r.request.uri for r in trunk.invites]
        return call, trunk.invites[0]
    finally:
        await hang_up(call)


# --------------------------------------------------------------------------------------
# EM-01..EM-04: recognition
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialled", "sent"),
    [("112", "112"), ("0112", "112"), ("15", "15"), ("017", "17"), ("18", "18"),
     ("196", "196"), ("116000", "116000")],
)  # fmt: skip
async def test_fr_numbers_reach_the_national_trunk_as_dialled(
    fr_switch: SwitchProcess, ports: Ports, dialled: str, sent: str
) -> None:
    """EM-02/EM-04: every FR emergency (and helpline) number, with or without the
    outside-line prefix, gives one P-NAT INVITE whose Request-URI user is the number."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, ALICE) as ua:
        _, record = await emergency_call(ua, dialled, t["fr-nat"])
        assert record.request.uri == f"sip:{sent}@{TRUNK_HOST}"
        assert strip_tag(record.request.header("To") or "") == f"<sip:{sent}@{TRUNK_HOST}>"
        check_no_location(record.request)
        check_identity(record.request, ALICE.callback)
        assert t["fr-pidf"].invites == []


@pytest.mark.parametrize(
    "dialled",
    ["911", "9911", "sip:911@127.0.0.1;user=phone", "tel:911", "urn:service:sos",
     "urn:service:SOS"],
)
async def test_us_forms_reach_the_dlr_trunk_as_911(
    us_switch: SwitchProcess, ports: Ports, dialled: str
) -> None:
    """EM-01/EM-02/EM-03: each form gives exactly one P-DLR INVITE to sip:911@."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        _, record = await emergency_call(ua, dialled, t["us-dlr"])
        assert record.request.uri == f"sip:911@{TRUNK_HOST}"
        check_identity(record.request, ERIN.callback)
        assert t["us-i3"].invites == []


@pytest.mark.parametrize(
    ("dialled", "urn"),
    [("911", "urn:service:sos"), ("tel:911", "urn:service:sos"),
     ("urn:service:sos", "urn:service:sos"), ("urn:service:SOS.Fire", "urn:service:sos.fire"),
     ("urn:service:sos.police", "urn:service:sos.police"),
     ("urn:service:test.sos", "urn:service:test.sos")],
)  # fmt: skip
async def test_us_forms_reach_the_i3_trunk_as_service_urns(
    us_switch: SwitchProcess, ports: Ports, dialled: str, urn: str
) -> None:
    """EM-03: under P-I3 the Request-URI and To are the (lower-cased) service URN."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        _, record = await emergency_call(ua, dialled, t["us-i3"])
        assert record.request.uri == urn
        assert strip_tag(record.request.header("To") or "") == f"<{urn}>"
        assert t["us-dlr"].invites == []


async def test_internal_only_station_dials_911_but_not_the_pstn(
    us_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-01: a barred (internal-only) station reaches the PSAP; its PSTN call gets 403."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, GRACE) as ua:
        _, record = await emergency_call(ua, "911", t["us-dlr"])
        assert record.request.uri == f"sip:911@{TRUNK_HOST}"
        check_identity(record.request, GRACE.callback)
        control = await place(ua, "913125550199")
        assert control.status == 403, control.final
        assert len(t["us-dlr"].invites) == 1 and t["us-i3"].invites == []


async def test_ordinary_call_to_a_trunk_number_takes_the_ordinary_route(
    fr_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """Control call: a national number goes out as an ordinary call (E.164, SDP only, no
    emergency header, no notification)."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, ALICE) as ua:
        call, record = await emergency_call(ua, "0478000000", t["fr-nat"])
        request = record.request
        assert request.uri.startswith("sip:+33478000000@"), request.uri
        check_no_location(request)
        for name in ("Priority", "Resource-Priority", "Route", "Call-Info"):
            assert request.header(name) is None, name
        assert "sos" not in request.uri and t["fr-pidf"].invites == []
        await asyncio.sleep(0.3)
        assert sink.payloads(call.call_id) == []
        assert list(read_journal(journal_dir(fr_switch), call_id=call.call_id)) == []


# --------------------------------------------------------------------------------------
# EM-20..EM-25, EM-29: the INVITE of each profile, header by header
# --------------------------------------------------------------------------------------


def _common_headers(dev: Dev, to: str) -> dict[str, str | re.Pattern[str]]:
    return {
        "Max-Forwards": "70",
        "From": f'"{dev.name}" <sip:{dev.callback}@{TRUNK_HOST}>',
        "To": f"<{to}>",
        "CSeq": "1 INVITE",
        "Contact": re.compile(rf"<sip:{re.escape(dev.callback)}@127\.0\.0\.1:\d+>"),
        "Allow": re.compile(r"INVITE, .*BYE.*"),
        "User-Agent": re.compile(r"\S.*"),
        "P-Asserted-Identity": f"<sip:{dev.callback}@{TRUNK_HOST};user=phone>",
    }


async def test_dlr_profile_invite(us_switch: SwitchProcess, ports: Ports) -> None:
    """EM-20/EM-25 P-DLR: sip:911@, one PAI and a From with the DID, no location body."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        _, record = await emergency_call(ua, "911", t["us-dlr"])
    request = record.request
    assert request.uri == f"sip:911@{TRUNK_HOST}"
    assert_headers(request, {**_common_headers(ERIN, f"sip:911@{TRUNK_HOST}"),
                             "Content-Type": SDP_TYPE})
    check_no_location(request)
    check_identity(request, ERIN.callback)


async def test_pidf_profile_invite(fr_switch: SwitchProcess, ports: Ports) -> None:
    """EM-20/EM-21/EM-22 P-PIDF: the digits plus one PIDF-LO by value, well formed."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, BOB) as ua:
        _, record = await emergency_call(ua, "112", t["fr-pidf"])
    request = record.request
    assert request.uri == f"sip:112@{TRUNK_HOST}"
    assert_headers(request, {
        **_common_headers(BOB, f"sip:112@{TRUNK_HOST}"),
        "Geolocation": re.compile(r"<cid:[^>]+>"),
        "Geolocation-Routing": "yes",
        "Accept": ACCEPT_WITH_LOCATION,
        "Content-Type": re.compile(r"multipart/mixed\s*;\s*boundary=\S+"),
    })
    pidfs = check_pidf_body(request)
    assert len(pidfs) == 1
    check_switch_pidf(pidfs[0][1], BOB)
    check_identity(request, BOB.callback)
    assert t["fr-nat"].invites == []


async def test_i3_profile_invite(us_switch: SwitchProcess, ports: Ports) -> None:
    """EM-20/EM-21/EM-22/EM-29 P-I3: urn:service:sos in Request-URI and To, Route to the
    ESRP, PIDF-LO, Priority, Resource-Priority (trusted esnet), ProviderInfo."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        _, record = await emergency_call(ua, "911", t["us-i3"])
    request = record.request
    assert request.uri == "urn:service:sos"
    assert_headers(request, {
        **_common_headers(HEIDI, "urn:service:sos"),
        "Route": f"<{ESRP_ROUTE}>",
        "Priority": "emergency",
        "Resource-Priority": "esnet.1",
        "Call-Info": f"<{PROVIDER_INFO}>;purpose=EmergencyCallData.ProviderInfo",
        "Geolocation": re.compile(r"<cid:[^>]+>"),
        "Geolocation-Routing": "yes",
        "Accept": ACCEPT_WITH_LOCATION,
        "Content-Type": re.compile(r"multipart/mixed\s*;\s*boundary=\S+"),
    })
    pidfs = check_pidf_body(request)
    assert len(pidfs) == 1
    check_switch_pidf(pidfs[0][1], HEIDI)
    check_identity(request, HEIDI.callback)


async def test_nat_profile_invite(fr_switch: SwitchProcess, ports: Ports) -> None:
    """EM-20/EM-29 P-NAT: the dialled short number, the DID as identity, no body, neither
    Priority nor Resource-Priority."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, ALICE) as ua:
        _, record = await emergency_call(ua, "18", t["fr-nat"])
    request = record.request
    assert request.uri == f"sip:18@{TRUNK_HOST}"
    assert_headers(request, {**_common_headers(ALICE, f"sip:18@{TRUNK_HOST}"),
                             "Content-Type": SDP_TYPE})
    check_no_location(request)
    assert request.header("Resource-Priority") is None and request.header("Priority") is None


async def test_resource_priority_only_towards_a_trusted_esnet(
    us_switch: SwitchProcess, fr_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-29: esnet.1 goes to the trusted i3 network, never with a helpline call on it,
    never to the P-NAT trunk."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        _, emergency = await emergency_call(ua, "911", t["us-i3"])
        assert emergency.request.header_lines("Resource-Priority") == ["esnet.1"]
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        _, helpline = await emergency_call(ua, "988", t["us-i3"])
        assert helpline.request.uri == f"sip:988@{TRUNK_HOST}"
        assert helpline.request.header("Resource-Priority") is None
        assert helpline.request.header("Priority") is None
        check_no_location(helpline.request)
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, ALICE) as ua:
        _, national = await emergency_call(ua, "112", t["fr-nat"])
        assert national.request.header("Resource-Priority") is None
        assert national.request.header("Priority") is None


async def test_default_location_for_a_device_without_one(
    fr_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-24: a device with no location gets through at once with the default site's
    address, method Default, no empty FLR/ROOM; the notification says "default" and an
    admin alert is raised."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, DAVE) as ua:
        call, record = await emergency_call(ua, "112", t["fr-pidf"])
    assert call.sent_at is not None and record.at - call.sent_at < 0.5
    pidfs = check_pidf_body(record.request)
    assert len(pidfs) == 1
    check_switch_pidf(pidfs[0][1], DAVE, method="Default")
    assert b"FLR" not in pidfs[0][1] and b"ROOM" not in pidfs[0][1]
    check_identity(record.request, DAVE.callback)  # the default site's callback number
    payload = await sink.wait_payload(call.call_id, "ROUTING")
    assert payload is not None and payload["location_status"] == "default"
    assert payload["floor"] is None and payload["room"] is None
    alerts = await wait_events(fr_switch, "emergency.alert",
                               lambda e: e.get("call_id") == call.call_id)
    assert alerts and alerts[0]["kind"] == "location_unverified", alerts


# --------------------------------------------------------------------------------------
# EM-07, EM-08: test calls and helplines
# --------------------------------------------------------------------------------------


async def test_933_test_call_carries_the_same_identity_as_911(
    us_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-07/EM-02: 933 and 9933 reach the P-DLR trunk as 933 with the PAI of a 911 call;
    the admin webhook is told, marked TEST."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        _, real = await emergency_call(ua, "911", t["us-dlr"])
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        test_call, test = await emergency_call(ua, "933", t["us-dlr"])
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        _, prefixed = await emergency_call(ua, "9933", t["us-dlr"])
    for record in (test, prefixed):
        assert record.request.uri == f"sip:933@{TRUNK_HOST}"
        assert (record.request.header_lines("P-Asserted-Identity")
                == real.request.header_lines("P-Asserted-Identity"))
        assert strip_tag(record.request.header("From") or "") == strip_tag(
            real.request.header("From") or "")
    payload = await sink.wait_payload(test_call.call_id, "ROUTING")
    assert payload is not None, sink.received
    assert payload["test"] is True and payload["number_class"] == "test"
    assert payload["dialled"] == "933"
    assert any(path == "us-admin" for _, path, p in sink.received
               if p.get("call_id") == test_call.call_id)


async def test_933_under_i3_is_the_test_service_urn(
    us_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-07: a 933 test call towards P-I3 is urn:service:test.sos, with the location."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        _, record = await emergency_call(ua, "933", t["us-i3"])
    assert record.request.uri == "urn:service:test.sos"
    check_identity(record.request, HEIDI.callback)
    pidfs = check_pidf_body(record.request)
    check_switch_pidf(pidfs[0][1], HEIDI)


async def test_psap_text_answer_to_a_test_call_is_kept_in_the_audit_record(
    us_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-07: the PSAP answers the test call (urn:service:test.sos under P-I3) with 200,
    its SDP answer and a text/plain readback; the caller is connected and the journal
    record of the call holds the text."""
    readback = "TEST OK callback +12145550101 location 1500 Main St FLR 2 ROOM 210 Dallas"
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, HEIDI) as ua:
        psap = t["us-i3"]

        def answer_with_text(request: SipRequest) -> list[Any]:
            sdp = psap.sdp_answer_to(request.body)
            body = (b"--psap\r\nContent-Type: application/sdp\r\n\r\n" + sdp
                    + b"\r\n--psap\r\nContent-Type: text/plain\r\n\r\n" + readback.encode()
                    + b"\r\n--psap--\r\n")
            return [psap.reply(request, 200, body=body,
                               headers=[("Content-Type", "multipart/mixed;boundary=psap")])]

        psap.script = [answer_with_text]
        call, record = await emergency_call(ua, "933", psap)
        assert record.request.uri == "urn:service:test.sos"
        assert call.remote_sdp.startswith(b"v=0") or b"v=0" in call.remote_sdp
    entries = await journal_entries(us_switch, call.call_id, "ended")
    assert [e for e in entries if e["event"] == "classified"][0]["fields"]["number_class"] == "test"
    assert readback in json.dumps(entries), [e["event"] for e in entries]


async def test_helpline_119_is_not_a_psap_call_even_under_pidf(
    fr_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-08: 119 goes to the P-PIDF route as sip:119@, with no sos URN, no PIDF-LO, no
    priority; by default the site is not notified."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, BOB) as ua:
        call, record = await emergency_call(ua, "119", t["fr-pidf"])
    request = record.request
    assert request.uri == f"sip:119@{TRUNK_HOST}"
    assert "sos" not in request.uri and "sos" not in (request.header("To") or "")
    check_no_location(request)
    assert request.header("Priority") is None and request.header("Resource-Priority") is None
    check_identity(request, BOB.callback)
    await asyncio.sleep(0.5)
    assert sink.payloads(call.call_id) == []


# --------------------------------------------------------------------------------------
# EM-14, EM-25: identity
# --------------------------------------------------------------------------------------


async def test_caller_id_restriction_is_overridden(us_switch: SwitchProcess, ports: Ports) -> None:
    """EM-14: an anonymous From with Privacy: id still gives PAI and From with the DID,
    and no Privacy header reaches the trunk."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, ERIN) as ua:
        _, record = await emergency_call(
            ua, "911", t["us-dlr"], from_display="Anonymous",
            from_uri="sip:anonymous@anonymous.invalid", headers=[("Privacy", "id")])
    check_identity(record.request, ERIN.callback)
    assert "anonymous.invalid" not in record.raw.decode(errors="replace").lower()


async def test_device_without_did_uses_the_site_callback_number(
    us_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-25: no DID: PAI and From carry the site's callback number."""
    async with trunks(ports, us_dlr=[200], us_i3=[200]) as t, \
            registered(us_switch, ports, FRANK) as ua:
        _, record = await emergency_call(ua, "911", t["us-dlr"])
    check_identity(record.request, "+13125550100")


# --------------------------------------------------------------------------------------
# EM-23: a location supplied by the device
# --------------------------------------------------------------------------------------

DEVICE_PIDF = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<presence xmlns="urn:ietf:params:xml:ns:pidf"'
    b' xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"'
    b' xmlns:gp="urn:ietf:params:xml:ns:pidf:geopriv10"'
    b' xmlns:ca="urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"'
    b' entity="sip:102@device.example">\n'
    b'  <dm:device id="dev1">\n'
    b"    <gp:geopriv>\n"
    b"      <gp:location-info>\n"
    b"        <ca:civicAddress>\n"
    b"          <ca:country>FR</ca:country><ca:A1>75</ca:A1><ca:A3>Paris</ca:A3>\n"
    b"          <ca:RD>Rue de Rivoli</ca:RD><ca:HNO>50</ca:HNO><ca:FLR>5</ca:FLR>\n"
    b"          <ca:PC>75001</ca:PC><ca:ROOM>Lab-3</ca:ROOM>\n"
    b"        </ca:civicAddress>\n"
    b"      </gp:location-info>\n"
    b"      <gp:usage-rules/>\n"
    b"      <gp:method>Manual</gp:method>\n"
    b"    </gp:geopriv>\n"
    b"    <dm:deviceID>mac:0004f2a1b2c3</dm:deviceID>\n"
    b"  </dm:device>\n"
    b"</presence>\n"
)


async def test_device_pidf_is_forwarded_first_and_byte_identical(
    fr_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-23: the device's PIDF-LO (ROOM Lab-3) is the first pidf part, unchanged, and
    Geolocation lists its cid then the switch's."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, BOB) as ua:
        boundary = "dev-boundary-7f3a"
        sdp = ua.default_offer()
        body = (
            f"--{boundary}\r\nContent-Type: application/sdp\r\n\r\n".encode() + sdp
            + f"\r\n--{boundary}\r\nContent-Type: application/pidf+xml\r\n"
              "Content-ID: <dev1@x>\r\n\r\n".encode()
            + DEVICE_PIDF + f"\r\n--{boundary}--\r\n".encode()
        )
        call, record = await emergency_call(
            ua, "112", t["fr-pidf"], body=body,
            content_type=f"multipart/mixed;boundary={boundary}",
            headers=[("Geolocation", "<cid:dev1@x>"), ("Geolocation-Routing", "yes")])
    request = record.request
    pidfs = check_pidf_body(request)
    assert len(pidfs) == 2, [h for h, _ in pidfs]
    assert pidfs[0][0]["content-id"] == "<dev1@x>"
    assert pidfs[0][1] == DEVICE_PIDF
    cids = geolocation_cids(request)
    assert cids[0] == "dev1@x" and len(cids) == 2 and cids[1] != "dev1@x"
    check_switch_pidf(pidfs[1][1], BOB)
    # EM-70: the audit record keeps the device's own PIDF-LO, byte for byte
    entries = await journal_entries(fr_switch, call.call_id, "invite_sent")
    classified = [e for e in entries if e["event"] == "classified"]
    assert classified, [e["event"] for e in entries]
    kept = [field_bytes(v) for v in classified[0]["fields"]["device_locations"]]
    assert kept == [DEVICE_PIDF]


# --------------------------------------------------------------------------------------
# EM-13, EM-31: failover, 424, announcement and retries
# --------------------------------------------------------------------------------------


async def test_503_fails_over_to_the_second_route_at_once(
    failover_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-13: the primary's 503 sends the call to the secondary within 1 s; the caller
    sees none of it."""
    async with trunks(ports, primary=[503], secondary=[200]) as t, \
            registered(failover_switch, ports, IVAN) as ua:
        call, second = await emergency_call(ua, "112", t["secondary"])
        first = t["primary"].invites
        assert len(first) == 1
        assert 0 <= second.at - first[0].at < 1.0, second.at - first[0].at
        assert all(r.status < 300 for r in call.provisionals)
        check_identity(second.request, IVAN.callback)
        check_switch_pidf(check_pidf_body(second.request)[0][1], IVAN)


async def test_424_is_retried_with_the_default_location_only(
    failover_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-31: after a 424 the same trunk gets a second INVITE with only the site's
    default location (method Default); the caller never sees the 424."""
    async with trunks(ports, primary=[424, 200], secondary=[200]) as t, \
            registered(failover_switch, ports, IVAN) as ua:
        call = await place(ua, "112")
        try:
            assert call.status == 200, call.final
            assert all(r.status < 300 for r in call.provisionals)
            assert [r.status for r in call.challenges] == [407]
            invites = t["primary"].invites
            assert len(invites) == 2 and t["secondary"].invites == []
        finally:
            await hang_up(call)
    first, retry = invites[0].request, invites[1].request
    assert pidf_method(check_pidf_body(first)[0][1]) == "Manual"
    retried = check_pidf_body(retry)
    assert len(retried) == 1
    assert pidf_method(retried[0][1]) == "Default"
    assert validate_pidf(retried[0][1], strict=True) == []
    assert dict(civic_of(retried[0][1])) == LYON_ADDRESS
    assert retry.uri == first.uri and retry.header("P-Asserted-Identity") == first.header(
        "P-Asserted-Identity")


def _rtp_payloads(packets: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for packet in packets:
        if len(packet) < 12 or packet[0] >> 6 != 2:
            continue
        offset = 12 + 4 * (packet[0] & 0x0F)
        if packet[0] & 0x10:  # header extension
            offset += 4 + 4 * int.from_bytes(packet[offset + 2:offset + 4], "big")
        out.append((packet[1] & 0x7F, packet[offset:]))
    return out


def _tone_share(samples: list[int], frequency: float, rate: int = 8000) -> float:
    """Goertzel power at ``frequency`` as a share of the frame's energy (about 0.5 for
    a pure tone on the bin, about 0 for silence or another tone)."""
    coefficient = 2 * math.cos(2 * math.pi * frequency / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coefficient * s1 - s2, s1
    power = s1 * s1 + s2 * s2 - coefficient * s1 * s2
    energy = sum(x * x for x in samples)
    return power / (len(samples) * energy) if energy else 0.0


async def _end_call(call: Call) -> None:
    """Hang up (BYE) or give up (CANCEL) a call, so no retry round outlives the test."""
    if call.final is None:
        await call.cancel(timeout=3)
    if call.answered and not call.ended.is_set():
        await call.bye(timeout=3)


class _RtpSink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.packets.append(data)


async def test_all_routes_failing_announce_notify_retry_then_answer(
    failover_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-13/EM-60: every route 503: the caller gets 183 with SDP and the SIT tone (950
    Hz) on its RTP port, NOTIFY-SINK gets FAILED, the journal has every attempt; once the
    primary answers, the caller gets 200 and then a re-INVITE."""
    loop = asyncio.get_running_loop()
    rtp_transport, rtp = await loop.create_datagram_endpoint(
        _RtpSink, local_addr=(LOOPBACK_V4, 0))
    rtp_port = rtp_transport.get_extra_info("sockname")[1]
    try:
        async with trunks(ports, primary=[503], secondary=[503]) as t, \
                registered(failover_switch, ports, IVAN) as ua, \
                contextlib.AsyncExitStack() as stack:
            call = await place(ua, "112", sdp=offer_sdp(LOOPBACK_V4, rtp_port),
                               wait="provisional", timeout=6)
            stack.push_async_callback(_end_call, call)
            announced = [r for r in call.provisionals if r.status == 183]
            assert call.final is None and announced, (call.final, call.provisionals)
            assert announced[0].body.startswith(b"v=0") and b"m=audio " in announced[0].body
            assert len(t["primary"].invites) >= 1 and len(t["secondary"].invites) >= 1

            deadline = time.monotonic() + 4
            best = 0.0
            while time.monotonic() < deadline and best < 0.3:
                await asyncio.sleep(0.2)
                for payload_type, payload in _rtp_payloads(list(rtp.packets)):
                    if payload_type not in (0, 8) or len(payload) < 160:
                        continue
                    decode = decode_ulaw if payload_type == 0 else decode_alaw
                    samples = list(decode(payload[:160]))
                    if _tone_share(samples, 1400) < 0.05:
                        best = max(best, _tone_share(samples, 950))
            assert rtp.packets, "no RTP at the caller's port"
            assert best >= 0.3, f"no 950 Hz SIT segment (best share {best:.3f})"

            failed = await sink.wait_payload(call.call_id, "FAILED")
            assert failed is not None, sink.received
            assert failed["site"] == "lyon" and failed["callback_number"] == IVAN.callback
            entries = await journal_entries(failover_switch, call.call_id, "route_failed")
            statuses = [(e["fields"]["trunk"], e["fields"]["status"])
                        for e in entries if e["event"] == "response"]
            assert ("primary", 503) in statuses and ("secondary", 503) in statuses, statuses
            route_failed = [e for e in entries if e["event"] == "route_failed"]
            assert route_failed, [e["event"] for e in entries]
            attempts = route_failed[0]["fields"]["attempts"]
            assert [a["trunk"] for a in attempts][:2] == ["primary", "secondary"], attempts
            assert all(a.get("result") == "503" for a in attempts), attempts

            t["primary"].script = [200]
            final = await call.wait_final(5)
            assert final is not None and final.status == 200, final
            assert final.body == announced[0].body  # the 200 repeats the 183's answer
            reinvite = await call.wait_request("INVITE", timeout=4)
            assert reinvite is not None, call.received
            assert reinvite.body.startswith(b"v=0")
            answered = await sink.wait_payload(call.call_id, "ANSWERED")
            assert answered is not None and answered["trunk"] == "primary"
    finally:
        rtp_transport.close()


async def test_silent_route_is_abandoned_after_the_route_timeout(
    failover_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-13: a primary that never answers is left after route_timeout (1 s). Last of the
    failover tests: the switch retransmits the unanswered INVITE for 32 s, and a later
    trunk on the same port would take the retransmissions for new calls."""
    async with trunks(ports, primary=["silent"], secondary=[200]) as t, \
            registered(failover_switch, ports, IVAN) as ua:
        _, second = await emergency_call(ua, "112", t["secondary"])
        first = t["primary"].invites
        assert len(first) == 1
        delay = second.at - first[0].at
        assert 0.9 <= delay < 2.0, delay


# --------------------------------------------------------------------------------------
# EM-60: on-site notification
# --------------------------------------------------------------------------------------


async def test_webhook_gets_routing_then_answered_with_every_field(
    fr_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-60: ROUTING then ANSWERED, every field, floor/room as in the PIDF-LO sent."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, BOB) as ua:
        call, record = await emergency_call(ua, "112", t["fr-pidf"])
    civic = dict(civic_of(check_pidf_body(record.request)[0][1]))
    routing = await sink.wait_payload(call.call_id, "ROUTING")
    answered = await sink.wait_payload(call.call_id, "ANSWERED")
    assert routing is not None and answered is not None, sink.received
    order = [p["outcome"] for p in sink.payloads(call.call_id)]
    assert order.index("ROUTING") < order.index("ANSWERED"), order
    for payload in (routing, answered):
        assert set(payload) == NOTIFICATION_FIELDS, set(payload) ^ NOTIFICATION_FIELDS
        assert payload["floor"] == civic["FLR"] == "5"
        assert payload["room"] == civic["ROOM"] == "512"
        assert payload["location"] == civic
        assert payload["dialled"] == "112" and payload["number_class"] == "emergency"
        assert payload["extension"] == BOB.extension and payload["user"] == BOB.name
        assert payload["device"] == BOB.extension and payload["account"] == ACCOUNT_ID
        assert payload["site"] == "paris" and payload["callback_number"] == BOB.callback
        assert payload["location_status"] == "verified" and payload["test"] is False
        assert "512" in payload["location_summary"] and "Paris" in payload["location_summary"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", payload["time"])
    assert answered["trunk"] == "fr-pidf"
    assert all(path == "paris" for _, path, p in sink.received
               if p.get("call_id") == call.call_id)


async def test_hanging_sink_never_delays_the_invite(
    fr_switch: SwitchProcess, ports: Ports, sink: NotifySink
) -> None:
    """EM-60: with NOTIFY-SINK accepting but never answering, the device-INVITE to
    trunk-INVITE latency stays within the working-sink baseline + 50 ms (medians of 3),
    and the payloads still arrive."""

    async def latencies(count: int) -> tuple[list[float], list[str]]:
        values, call_ids = [], []
        for _ in range(count):
            async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t:
                call, record = await emergency_call(ua, "112", t["fr-nat"])
            assert call.sent_at is not None
            values.append(record.at - call.sent_at)
            call_ids.append(call.call_id)
        return values, call_ids

    async with registered(fr_switch, ports, ALICE) as ua:
        await latencies(1)  # warm-up
        baseline, _ = await latencies(3)
        sink.mode = "hang"
        hanging, call_ids = await latencies(3)
    assert statistics.median(hanging) <= statistics.median(baseline) + 0.05, (baseline, hanging)
    for call_id in call_ids:
        payload = await sink.wait_payload(call_id, "ROUTING", timeout=3)
        assert payload is not None and payload["floor"] == "3" and payload["room"] == "B312"


async def test_sink_down_raises_an_alarm_and_retries(
    fr_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-60: with NOTIFY-SINK down the first delivery fails with an alarm; the retry
    delivers once the sink is back."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, ALICE) as ua:
        call, _ = await emergency_call(ua, "112", t["fr-nat"])
    label = f"call {call.call_id}"
    alarms = await wait_events(fr_switch, "emergency.notify_alarm",
                               lambda e: label in e.get("reason", "") and "/lyon" in
                               e.get("recipient", ""))
    assert alarms and "retrying" in alarms[0]["reason"], alarms
    retrying = [e for e in fr_switch.events("emergency.notify_delivery")
                if label in e.get("detail", "") and e.get("outcome") == "retrying"]
    assert retrying, fr_switch.events("emergency.notify_delivery")[-5:]
    server = await NotifySink(ports.sink).start()
    try:
        payload = await server.wait_payload(call.call_id, "ROUTING", timeout=4)
        assert payload is not None, server.received
        assert payload["site"] == "lyon" and payload["callback_number"] == ALICE.callback
    finally:
        await server.close()


async def test_security_desk_gets_a_sip_message(fr_switch: SwitchProcess, ports: Ports) -> None:
    """EM-60: the site's security-desk phone gets a MESSAGE with the call's facts."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, DESK) as desk, \
            registered(fr_switch, ports, CAROL) as ua:
        await emergency_call(ua, "18", t["fr-nat"])
        texts = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and not any("ext 103" in x for x in texts):
            message = await desk.wait_for("MESSAGE", timeout=max(0.0, deadline - time.monotonic()))
            if message is None:
                break
            texts.append(message.body.decode())
    text = next((x for x in texts if "ext 103" in x), None)
    assert text is not None, texts
    assert text.startswith("EMERGENCY 18 dialled by ext 103 (Carol)"), text
    assert CAROL.callback in text and "FLR 1" in text and "ROOM 101" in text, text


# --------------------------------------------------------------------------------------
# EM-70: the audit journal
# --------------------------------------------------------------------------------------


async def test_journal_records_the_call_and_the_exact_body_sent(
    fr_switch: SwitchProcess, ports: Ports
) -> None:
    """EM-70: classified, invite_sent, answered, ended in order; the recorded body is the
    trunk's, byte for byte; the chain verifies with the CLI."""
    async with trunks(ports, fr_nat=[200], fr_pidf=[200]) as t, \
            registered(fr_switch, ports, BOB) as ua:
        call, record = await emergency_call(ua, "112", t["fr-pidf"])
        assert await t["fr-pidf"].wait_request("BYE", timeout=3) is not None
    entries = await journal_entries(fr_switch, call.call_id, "ended")
    events = [e["event"] for e in entries]
    milestones = [e for e in events if e in ("classified", "invite_sent", "answered", "ended")]
    assert milestones == ["classified", "invite_sent", "answered", "ended"], [
        (e["seq"], e["time"], e["event"]) for e in entries]
    classified = entries[events.index("classified")]["fields"]
    assert classified["number_class"] == "emergency" and classified["device"] == BOB.extension
    assert classified["site"] == "paris" and classified["callback_number"] == BOB.callback
    sent = entries[events.index("invite_sent")]["fields"]
    assert sent["trunk"] == "fr-pidf"
    assert sent["request_uri"] == record.request.uri
    assert field_bytes(sent["body"]) == record.request.body
    recorded_headers = {name: value for name, value in sent["headers"]}
    assert recorded_headers["P-Asserted-Identity"] == record.request.header("P-Asserted-Identity")
    assert recorded_headers["Geolocation"] == record.request.header("Geolocation")
    assert entries[events.index("ended")]["fields"]["outcome"] == "answered"
    result = subprocess.run(
        [sys.executable, "-m", "switch", "emergency", "verify", "--config",
         str(fr_switch.config_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

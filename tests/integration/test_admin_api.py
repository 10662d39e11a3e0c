"""The admin HTTP API (switch/admin.py) against a live in-process switch.

Each test builds a `Softswitch` on its own event loop from a test configuration (UDP on a
free loopback port, country FR, one emergency site ``hq`` routed to a peer trunk whose far
end is an `EmergencyTrunkUAS` on 127.0.0.2, devices 1000-1002 of account ``itest``), and
starts an `AdminServer` on a free loopback port with a read and a write bearer token.
Devices are `SipUA` peers that REGISTER and call through the switch. The tests check
tokens and roles (401/403/200), every route once with real data — bindings, a call hung
up through DELETE (both phones get a BYE), a location set with PUT and found in the
history, a test call whose result is in the audit export, fair-use usage and a runtime
blacklist exception that changes an admission — readiness 200/503, /metrics and the
OpenAPI document covering every route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from switch_process import LOOPBACK_V4, Listener, SipDevice, build_config, free_port

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402

from switch.admin import AdminServer, AdminSettings  # noqa: E402
from switch.app import Softswitch  # noqa: E402
from switch.settings import ConfigError, load_settings_text  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

READ_TOKEN = secrets.token_hex(20)
WRITE_TOKEN = secrets.token_hex(20)
READ_NAME, WRITE_NAME = "noc-read", "ops-write"
ACCOUNT = "itest"
TRUNK_ID = "etrunk"
ALICE = SipDevice("1000", "pw1000", {"site": "hq", "location": "f1"})
BOB = SipDevice("1001", "pw1001", {"site": "hq", "location": "f1"})
DESK = SipDevice("1002", "pw1002", {"site": "hq", "location": "f2"})
DEVICES = [ALICE, BOB, DESK]
HQ_ADDRESS = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
              "HNO": "10", "PC": "69002"}  # fmt: skip
CUBA_FIXED = "+5372345678"  # CU: in the default fraud-prone list (config/)
WAIT_S = 5.0


def admin_settings(**changes: Any) -> AdminSettings:
    return AdminSettings.model_validate({
        "enabled": True,
        "listen": {"host": LOOPBACK_V4, "port": 0},
        "tokens": [{"name": READ_NAME, "token": READ_TOKEN, "role": "read"},
                   {"name": WRITE_NAME, "token": WRITE_TOKEN, "role": "write"}],
        **changes,
    })


def switch_config(workdir: Path, trunk_port: int, *, emergency: bool = True) -> str:
    """A switch YAML: FR dial plan, site hq routed to the trunk, international calls
    allowed for the account (so only the blacklist refuses Cuba)."""
    sections: dict[str, Any] = {
        "media": {"backend": "none"},
        "cdr": {"directory": str(workdir / "cdr")},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": TRUNK_ID, "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "pidf", "emergency_number": "112"}}],
        "fair_use": {"accounts": {ACCOUNT: {"destinations": {"international": True}}}},
    }
    if emergency:
        sections["emergency"] = {
            "journal_dir": str(workdir / "emergency"), "route_timeout": 2,
            "sites": [{"id": "hq", "country": "FR", "address": HQ_ADDRESS,
                       "callback_number": "+33478000100", "routes": [TRUNK_ID],
                       "notify": {"devices": [DESK.extension]},
                       "locations": [{"id": "f1", "FLR": "1"}, {"id": "f2", "FLR": "2"}]}],
        }
    else:
        sections["emergency"] = {"journal_dir": str(workdir / "emergency")}
    listener = Listener("udp", LOOPBACK_V4, free_port("udp", LOOPBACK_V4))
    devices = DEVICES if emergency else [SipDevice(d.extension, d.password) for d in DEVICES]
    return build_config([listener], devices, sections=sections)


@dataclass
class AdminBench:
    """A started switch, its admin server, and an HTTP client for it."""

    switch: Softswitch
    admin: AdminServer
    http: aiohttp.ClientSession
    trunk_port: int

    @property
    def base(self) -> str:
        assert self.admin.address is not None
        host, port = self.admin.address
        return f"http://{host}:{port}"

    @property
    def sip(self) -> tuple[str, int]:
        _, host, port = self.switch.listening[0]
        return (host, port)

    async def call(self, method: str, path: str, token: str | None = READ_TOKEN,
                   **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.base + path, headers=headers,
                                     **kwargs) as response:
            text = await response.text()
            body: Any = text
            if response.content_type == "application/json":
                body = json.loads(text)
            return response.status, body, response

    async def get(self, path: str, token: str | None = READ_TOKEN, **kwargs: Any) -> Any:
        status, body, _ = await self.call("GET", path, token, **kwargs)
        assert status == 200, (path, status, body)
        return body


@contextlib.asynccontextmanager
async def admin_bench(workdir: Path, *, emergency: bool = True,
                      settings: AdminSettings | None = None) -> AsyncIterator[AdminBench]:
    trunk_port = free_port("udp", TRUNK_HOST)
    text = switch_config(workdir, trunk_port, emergency=emergency)
    switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")))
    await switch.start()
    admin = AdminServer(switch, settings or admin_settings())
    try:
        await admin.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield AdminBench(switch, admin, http, trunk_port)
    finally:
        await admin.stop()
        await switch.stop()


@contextlib.asynccontextmanager
async def registered(bench: AdminBench, device: SipDevice) -> AsyncIterator[SipUA]:
    async with SipUA(device.extension, device.password, bench.sip) as ua:
        response = await ua.register(expires=300)
        assert response is not None and response.status == 200, response
        yield ua


# --------------------------------------------------------------------------------------
# Tokens and roles
# --------------------------------------------------------------------------------------


async def test_tokens_and_roles_decide_every_request(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        # no token, an unknown token, another scheme: 401 with a Bearer challenge
        for token, headers in ((None, {}), ("not-a-configured-token-at-all", {}),
                               (None, {"Authorization": f"Basic {READ_TOKEN}"})):
            status, body, response = await bench.call("GET", "/api/v1/calls", token,
                                                      headers=headers)
            assert status == 401, (token, headers, status, body)
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), response.headers
            assert "error" in body
        # a read token reads, a write token reads too
        for token in (READ_TOKEN, WRITE_TOKEN):
            assert (await bench.get("/api/v1/calls", token))["items"] == []
        # a read token never writes: 403 before anything happens
        writes = [
            ("DELETE", "/api/v1/calls/unknown-call"),
            ("PUT", "/api/v1/devices/1000/location", {"site": "hq", "location": "f2"}),
            ("POST", "/api/v1/emergency/test-calls", {"device": "1000"}),
            ("PUT", f"/api/v1/fair-use/accounts/{ACCOUNT}/blacklist-exceptions",
             {"countries": ["CU"]}),
            ("DELETE", f"/api/v1/fair-use/accounts/{ACCOUNT}/blacklist-exceptions"),
            ("POST", "/api/v1/reload"),
        ]
        for method, path, *body in writes:
            kwargs = {"json": body[0]} if body else {}
            status, answer, response = await bench.call(method, path, READ_TOKEN, **kwargs)
            assert status == 403, (method, path, status, answer)
            assert "insufficient_scope" in response.headers["WWW-Authenticate"]
            status, _, _ = await bench.call(method, path, None, **kwargs)
            assert status == 401, (method, path, status)
        # nothing changed: the location is still the configured one, no exception added
        location = await bench.get("/api/v1/devices/1000/location")
        assert location["location"] == "f1", location
        assert bench.admin.runtime_exceptions == {}
        # health needs no token; /metrics does unless metrics_public
        status, live, _ = await bench.call("GET", "/healthz/live", None)
        assert status == 200 and live["status"] == "ok", live
        status, _, _ = await bench.call("GET", "/metrics", None)
        assert status == 401
        status, _, _ = await bench.call("GET", "/metrics", "x" * 40)
        assert status == 401


async def test_metrics_are_prometheus_text_with_the_switch_metrics(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        async with registered(bench, ALICE):
            status, text, response = await bench.call("GET", "/metrics")
        assert status == 200, text
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
        for name in ("softswitch_registrar_registrations_total",
                     "softswitch_calls_active", "softswitch_emergency_readiness_problems",
                     "softswitch_fairuse_leases"):
            assert f"\n{name}" in text, name
        assert 'softswitch_registrar_registrations_total{result="ok"} 1.0' in text, text
        # a public /metrics for a Prometheus scraper that holds no token
        public = AdminServer(bench.switch, admin_settings(metrics_public=True))
        await public.start()
        try:
            assert public.address is not None
            host, port = public.address
            async with bench.http.get(f"http://{host}:{port}/metrics") as response:
                assert response.status == 200
                assert "softswitch_calls_active" in await response.text()
            async with bench.http.get(f"http://{host}:{port}/api/v1/calls") as response:
                assert response.status == 401  # only /metrics became public
        finally:
            await public.stop()


# --------------------------------------------------------------------------------------
# Registrations, devices, locations, sites, readiness
# --------------------------------------------------------------------------------------


async def test_registrations_list_the_registered_device(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench, registered(bench, ALICE) as alice:
        page = await bench.get("/api/v1/registrations")
        assert page["total"] == 1 and page["offset"] == 0, page
        (binding,) = page["items"]
        assert binding["aor"] == f"1000@{LOOPBACK_V4}", binding
        assert binding["contact"].startswith("sip:1000@127.0.0.1:"), binding
        assert binding["source"] == f"udp:{alice.address[0]}:{alice.address[1]}", binding
        assert binding["user_agent"] == "softswitch-test-peer/1", binding
        assert 290 <= binding["expires"] <= 300, binding
        assert binding["device"] == "1000" and binding["account"] == ACCOUNT, binding
        # pagination
        empty = await bench.get("/api/v1/registrations?limit=1&offset=1")
        assert empty["total"] == 1 and empty["items"] == [], empty
        for query in ("limit=0", "limit=1001", "offset=-1", "limit=ten"):
            status, body, _ = await bench.call("GET", f"/api/v1/registrations?{query}")
            assert status == 400 and "error" in body, (query, status, body)
        one = await bench.get("/api/v1/registrations/1000")
        assert [b["contact"] for b in one["bindings"]] == [binding["contact"]], one
        assert (await bench.get("/api/v1/registrations/1001"))["bindings"] == []
        status, body, _ = await bench.call("GET", "/api/v1/registrations/9999")
        assert status == 404 and "9999" in body["error"], body


async def test_location_put_is_journaled_as_the_token_and_shown_in_history(
    tmp_path: Path,
) -> None:
    async with admin_bench(tmp_path) as bench:
        devices = await bench.get("/api/v1/devices")
        assert [d["username"] for d in devices["items"]] == ["1000", "1001", "1002"], devices
        alice = devices["items"][0]
        assert alice["extension"] == "1000" and alice["account"] == ACCOUNT, alice
        assert alice["site"] == "hq" and alice["location"] == "f1", alice
        assert alice["has_location"] is True, alice
        assert alice["location_status"]["status"] == "verified", alice
        assert alice["location_status"]["address"]["FLR"] == "1", alice

        status, moved, _ = await bench.call(
            "PUT", "/api/v1/devices/1000/location", WRITE_TOKEN,
            json={"site": "hq", "location": "f2"})
        assert status == 200, moved
        assert moved["location"] == "f2" and moved["address"]["FLR"] == "2", moved
        now = await bench.get("/api/v1/devices/1000/location")
        assert now["location"] == "f2" and now["site"] == "hq", now
        # the emergency service itself uses the new location
        assert bench.switch.emergency.locations.resolve("1000").location_id == "f2"

        history = await bench.get("/api/v1/devices/1000/location/history")
        assert history["username"] == "1000"
        last = history["entries"][-1]
        assert last["who"] == f"admin:{WRITE_NAME}", last
        assert last["location_id"] == "f2" and last["site_id"] == "hq", last
        assert (await bench.get("/api/v1/devices/1001/location/history"))["entries"] == []

        # bad requests change nothing
        bad = [({"site": "nowhere"}, 400, "nowhere"), ({"site": "hq", "location": "f9"}, 400,
               "f9"), ({"site": "hq", "floor": "2"}, 400, "floor"), ({}, 400, "site")]
        for body, expected, word in bad:
            status, answer, _ = await bench.call(
                "PUT", "/api/v1/devices/1000/location", WRITE_TOKEN, json=body)
            assert status == expected and word in answer["error"], (body, status, answer)
        status, answer, _ = await bench.call(
            "PUT", "/api/v1/devices/1000/location", WRITE_TOKEN, data=b"{not json",
            headers={"Content-Type": "application/json"})
        assert status == 400 and "JSON" in answer["error"], answer
        status, answer, _ = await bench.call(
            "PUT", "/api/v1/devices/1000/location", WRITE_TOKEN,
            json={"site": "hq", "location": "f1", "pad": "x" * 70_000})
        assert status == 413 and "larger" in answer["error"], answer
        status, answer, _ = await bench.call(
            "PUT", "/api/v1/devices/9999/location", WRITE_TOKEN, json={"site": "hq"})
        assert status == 404, answer
        status, answer, _ = await bench.call("GET", "/api/v1/devices/9999/location/history")
        assert status == 404, answer
        assert len((await bench.get("/api/v1/devices/1000/location/history"))["entries"]) == \
            len(history["entries"])


async def test_sites_and_readiness_of_a_ready_switch(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        sites = await bench.get("/api/v1/sites")
        (hq,) = sites["sites"]
        assert hq["id"] == "hq" and hq["country"] == "FR" and hq["routes"] == [TRUNK_ID], hq
        assert hq["address"]["A3"] == "Lyon" and hq["callback_number"] == "+33478000100"
        assert [loc["id"] for loc in hq["locations"]] == ["f1", "f2"], hq
        assert hq["notification_recipients"] == 1, hq
        readiness = await bench.get("/api/v1/emergency/readiness")
        assert readiness == {"ready": True, "problems": [], "devices_without_location": []}
        status, ready, _ = await bench.call("GET", "/healthz/ready", None)
        assert status == 200, ready
        assert ready == {"ready": True, "sip_listening": True, "emergency_problems": 0,
                         "fair_use_store_degraded": False}
        # the shared fair-use store unreachable: not ready
        store = bench.switch.fairuse.store
        store.degraded = True  # what FallbackFairUseStore says while Redis is down
        try:
            status, ready, _ = await bench.call("GET", "/healthz/ready", None)
        finally:
            store.degraded = False
        assert status == 503 and ready["fair_use_store_degraded"] is True, ready


async def test_readiness_is_503_when_emergency_calling_is_not_ready(tmp_path: Path) -> None:
    async with admin_bench(tmp_path, emergency=False) as bench:
        status, ready, _ = await bench.call("GET", "/healthz/ready", None)
        assert status == 503, ready
        assert ready["ready"] is False and ready["emergency_problems"] >= 1, ready
        assert set(ready) == {"ready", "sip_listening", "emergency_problems",
                              "fair_use_store_degraded"}  # counts, never the problems
        readiness = await bench.get("/api/v1/emergency/readiness")
        assert readiness["ready"] is False, readiness
        assert "no emergency site is configured" in readiness["problems"], readiness
        assert readiness["devices_without_location"] == ["1000", "1001", "1002"], readiness
        status, body, _ = await bench.call("POST", "/api/v1/emergency/test-calls",
                                           WRITE_TOKEN, json={"device": "1000"})
        assert status == 409 and "not configured" in body["error"], body
        status, body, _ = await bench.call("PUT", "/api/v1/devices/1000/location",
                                           WRITE_TOKEN, json={"site": "hq"})
        assert status == 400 and "hq" in body["error"], body


# --------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------


async def test_delete_hangs_up_an_active_call_on_both_legs(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench, registered(bench, ALICE) as alice, \
            registered(bench, BOB) as bob:
        call = await alice.invite("1001", timeout=WAIT_S)
        assert call.answered, call
        page = await bench.get("/api/v1/calls")
        (active,) = page["items"]
        assert active["call_id"] == call.call_id, active
        assert active["caller"] == "1000" and active["callee"] == "1001", active
        assert active["state"] in ("answered", "confirmed"), active
        assert active["classification"] == "internal" and active["emergency"] is False, active
        assert active["answered"] is not None and active["trunk"] is None, active

        status, body, _ = await bench.call("DELETE", f"/api/v1/calls/{call.call_id}",
                                           WRITE_TOKEN)
        assert status == 204, body
        assert await call.wait_request("BYE", timeout=WAIT_S) is not None, "no BYE to caller"
        (callee_call,) = bob.incoming_calls
        assert await callee_call.wait_request("BYE", timeout=WAIT_S) is not None
        for _ in range(50):  # the call control finishes the call once both BYEs are answered
            if not bench.switch.calls.calls:
                break
            await asyncio.sleep(0.05)
        assert (await bench.get("/api/v1/calls"))["items"] == []
        status, body, _ = await bench.call("DELETE", f"/api/v1/calls/{call.call_id}",
                                           WRITE_TOKEN)
        assert status == 404 and call.call_id in body["error"], body


# --------------------------------------------------------------------------------------
# Emergency test calls and the audit export
# --------------------------------------------------------------------------------------


async def test_test_call_result_and_its_audit_trail(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        # the trunk refuses the test call at once (a final status below 500 ends it)
        async with EmergencyTrunkUAS([486], port=bench.trunk_port) as trunk:
            status, result, _ = await bench.call(
                "POST", "/api/v1/emergency/test-calls", WRITE_TOKEN,
                json={"device": "1000", "service_urn": True})
        assert status == 202, result
        assert result["device"] == "1000" and result["dialled"] == "urn:service:test.sos"
        assert result["status"] == 486 and result["trunk"] == TRUNK_ID, result
        assert trunk.behaviours_used == [486], trunk.behaviours_used

        await bench.switch.emergency.journal.flush(timeout=5)
        audit = await bench.get(f"/api/v1/emergency/audit?call_id={result['call_id']}")
        events = [entry["event"] for entry in audit["entries"]]
        assert events[0] == "classified" and "test_result" in events, events
        assert {entry["call_id"] for entry in audit["entries"]} == {result["call_id"]}
        assert audit["count"] == len(events) and audit["truncated"] is False, audit
        everything = await bench.get("/api/v1/emergency/audit")
        assert everything["count"] >= audit["count"], everything
        limited = await bench.get("/api/v1/emergency/audit?limit=1")
        assert limited["count"] == 1 and limited["truncated"] is True, limited
        later = await bench.get("/api/v1/emergency/audit?from=2999-01-01")
        assert later["entries"] == [], later
        status, lines, response = await bench.call(
            "GET", f"/api/v1/emergency/audit?format=jsonl&call_id={result['call_id']}")
        assert status == 200 and response.content_type == "application/x-ndjson", lines
        assert [json.loads(line)["event"] for line in lines.splitlines()] == events
        for query in ("from=yesterday", "until=2026-13-45", "format=xml", "limit=0", "bogus=1"):
            status, body, _ = await bench.call("GET", f"/api/v1/emergency/audit?{query}")
            assert status == 400 and "error" in body, (query, body)

        for body, expected in (({"device": "9999"}, 404), ({"device": ""}, 400),
                               ({"service_urn": True}, 400)):
            status, answer, _ = await bench.call(
                "POST", "/api/v1/emergency/test-calls", WRITE_TOKEN, json=body)
            assert status == expected, (body, status, answer)


# --------------------------------------------------------------------------------------
# Fair use
# --------------------------------------------------------------------------------------


async def _admission_to_cuba(switch: Softswitch, call_id: str) -> tuple[bool, str]:
    destination = switch.dialplan_for(ACCOUNT).classify(CUBA_FIXED)
    admission = await switch.fairuse.admit(call_id, ACCOUNT, "1000", None, destination)
    if admission.allowed:
        await switch.fairuse.call_ended(call_id, duration=None, start=0.0)
    return admission.allowed, admission.limit


async def test_usage_and_runtime_blacklist_exceptions_change_admission(
    tmp_path: Path,
) -> None:
    async with admin_bench(tmp_path) as bench:
        usage = await bench.get(f"/api/v1/fair-use/accounts/{ACCOUNT}/usage")
        assert usage["account"] == ACCOUNT and usage["enabled"] is True, usage
        assert [line["device"] for line in usage["minutes"]["lines"]] == ["1000", "1001",
                                                                           "1002"]
        assert usage["leases"]["account"]["active"] == 0, usage
        assert usage["patterns"]["calls_today"] == 0, usage
        status, body, _ = await bench.call("GET", "/api/v1/fair-use/accounts/nobody/usage")
        assert status == 404, body

        path = f"/api/v1/fair-use/accounts/{ACCOUNT}/blacklist-exceptions"
        before = await bench.get(path)
        assert before["configured"] == before["runtime"] == before["effective"] == {
            "countries": [], "prefixes": []}, before
        assert await _admission_to_cuba(bench.switch, "cuba-1") == (
            False, "destination_blacklist_country")

        status, doc, _ = await bench.call("PUT", path, WRITE_TOKEN,
                                          json={"countries": ["CU"], "prefixes": ["+882"]})
        assert status == 200, doc
        assert doc["runtime"] == {"countries": ["CU"], "prefixes": ["+882"]}, doc
        assert doc["effective"] == doc["runtime"] and doc["configured"]["countries"] == []
        allowed, _ = await _admission_to_cuba(bench.switch, "cuba-2")
        assert allowed, "the runtime exception should admit the blacklisted country"
        # the counted attempt shows in the usage
        usage = await bench.get(f"/api/v1/fair-use/accounts/{ACCOUNT}/usage")
        assert usage["patterns"]["calls_today"] == 2, usage["patterns"]
        # the configured section is untouched: a reload starts from it
        assert bench.switch.settings.fair_use.accounts[ACCOUNT].blacklist_exceptions \
            .countries == []

        for body in ({"countries": ["ZZ"]}, {"countries": ["cu"]}, {"prefixes": ["882"]},
                     {"countries": ["CU", "CU"]}, {"countries": "CU"}, {"regions": []}):
            status, answer, _ = await bench.call("PUT", path, WRITE_TOKEN, json=body)
            assert status == 400 and "error" in answer, (body, status, answer)
        assert (await bench.get(path))["runtime"]["countries"] == ["CU"]

        status, body, _ = await bench.call("DELETE", path, WRITE_TOKEN)
        assert status == 204, body
        assert (await bench.get(path))["effective"] == {"countries": [], "prefixes": []}
        assert await _admission_to_cuba(bench.switch, "cuba-3") == (
            False, "destination_blacklist_country")
        status, body, _ = await bench.call(
            "PUT", "/api/v1/fair-use/accounts/nobody/blacklist-exceptions", WRITE_TOKEN,
            json={"countries": ["CU"]})
        assert status == 404, body


# --------------------------------------------------------------------------------------
# Reload
# --------------------------------------------------------------------------------------


async def test_reload_applies_a_valid_file_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    """The switch's own reload, through the API: a broken file is refused with its
    file:line errors and changes nothing; a valid one (a device added) is applied, and the
    blacklist exceptions added through the API survive it."""
    config = tmp_path / "switch.yaml"
    text = switch_config(tmp_path, free_port("udp", TRUNK_HOST))
    # the switch's own admin listener, its tokens in the file (a reload keeps them)
    text += "admin: " + json.dumps(admin_settings().model_dump(mode="json") | {
        "tokens": [{"name": READ_NAME, "token": READ_TOKEN, "role": "read"},
                   {"name": WRITE_NAME, "token": WRITE_TOKEN, "role": "write"}]}) + "\n"
    config.write_text(text)
    switch = Softswitch(load_settings_text(text, str(config)), config_path=str(config))
    await switch.start()
    admin = switch.admin
    try:
        assert admin.started
        async with aiohttp.ClientSession() as http:
            bench = AdminBench(switch, admin, http, 0)
            exceptions = f"/api/v1/fair-use/accounts/{ACCOUNT}/blacklist-exceptions"
            status, _, _ = await bench.call("PUT", exceptions, WRITE_TOKEN,
                                            json={"countries": ["CU"]})
            assert status == 200
            config.write_text(text.replace("  node_id: itest", "  node_id: itest\n  bogus: 1"))
            status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
            assert status == 400 and body["applied"] is False, body
            assert any(line.startswith(f"{config}:") and "bogus" in line
                       for line in body["errors"]), body
            assert switch.directory.device("1003") is None

            config.write_text(text.replace(
                '      - {extension: "1002"',
                '      - {extension: "1003", password: "pw1003"}\n'
                '      - {extension: "1002"'))
            status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
            assert status == 200 and body["applied"] is True and body["errors"] == [], body
            devices = await bench.get("/api/v1/devices")
            assert "1003" in [d["username"] for d in devices["items"]], devices
            assert (await bench.get(exceptions))["effective"]["countries"] == ["CU"]
            assert await _admission_to_cuba(switch, "cuba-after-reload") == (True, "none")
    finally:
        await switch.stop()


async def test_reload_outcomes_of_other_switch_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with admin_bench(tmp_path) as bench:
        monkeypatch.setattr(Softswitch, "reload", None, raising=False)
        status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
        assert status == 501 and body["applied"] is False and body["errors"], body

        outcomes: list[Any] = [
            ConfigError(["switch.yaml:3: listen[0].port: must be at most 65535"]),
            RuntimeError("the dial plan exploded"),
            ["switch.yaml:12: calls.no_answer_timeout: must be at most 600"],
            (True, ["listen: changed, applied at the next restart"]),
        ]

        async def reload() -> Any:
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        bench.switch.reload = reload  # type: ignore[attr-defined]
        status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
        assert status == 400, body
        assert body["errors"] == ["switch.yaml:3: listen[0].port: must be at most 65535"]
        status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
        assert status == 500 and "the dial plan exploded" in body["errors"][0], body
        status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
        assert status == 400, body
        assert body == {"applied": False, "notes": [], "errors": [
            "switch.yaml:12: calls.no_answer_timeout: must be at most 600"]}
        status, body, _ = await bench.call("POST", "/api/v1/reload", WRITE_TOKEN)
        assert status == 200, body
        assert body == {"applied": True, "errors": [],
                        "notes": ["listen: changed, applied at the next restart"]}


# --------------------------------------------------------------------------------------
# The OpenAPI document, extensions, settings
# --------------------------------------------------------------------------------------


async def test_openapi_document_describes_every_route(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        document = await bench.get("/openapi.json", None)
        assert document["openapi"] == "3.1.0", document["openapi"]
        assert bench.admin.app is not None
        served = set()
        for route in bench.admin.app.router.routes():
            if route.method == "HEAD":
                continue
            path = route.resource.canonical if route.resource is not None else ""
            served.add((path, route.method.lower()))
        documented = {(path, method) for path, item in document["paths"].items()
                      for method in item}
        assert served == documented, (served ^ documented)
        open_paths = {path for path, item in document["paths"].items()
                      if item.get("get", {}).get("security") == []}
        assert open_paths == {"/openapi.json", "/healthz/live", "/healthz/ready"}, open_paths


async def test_extensions_add_guarded_routes_and_openapi_paths(tmp_path: Path) -> None:
    async def dashboard(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="<html>dashboard</html>", content_type="text/html")

    def register(app: aiohttp.web.Application, server: AdminServer) -> None:
        app.router.add_get("/dashboard", server.guard("read", dashboard))

    spec = {"/dashboard": {"get": {"summary": "the live dashboard",
                                   "responses": {"200": {"description": "the page"}}}}}
    trunk_port = free_port("udp", TRUNK_HOST)
    text = switch_config(tmp_path, trunk_port)
    switch = Softswitch(load_settings_text(text, str(tmp_path / "switch.yaml")))
    admin = AdminServer(switch, admin_settings())
    admin.add_routes(register, openapi_paths=spec)
    await switch.start()
    try:
        await admin.start()
        with pytest.raises(RuntimeError):
            admin.add_routes(register)
        assert admin.address is not None
        base = f"http://{admin.address[0]}:{admin.address[1]}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/dashboard") as response:
                assert response.status == 401
            async with http.get(f"{base}/dashboard",
                                headers={"Authorization": f"Bearer {READ_TOKEN}"}) as response:
                assert response.status == 200 and "dashboard" in await response.text()
            async with http.get(f"{base}/openapi.json") as response:
                assert "/dashboard" in (await response.json())["paths"]
    finally:
        await admin.stop()
        await switch.stop()
    assert admin.address is None


async def test_a_disabled_admin_listener_binds_nothing(tmp_path: Path) -> None:
    async with admin_bench(tmp_path) as bench:
        disabled = AdminServer(bench.switch, admin_settings(enabled=False))
        await disabled.start()
        assert disabled.address is None and not disabled.started
        await disabled.stop()
    assert AdminSettings().enabled is False
    assert AdminSettings().listen.host == "127.0.0.1"


@pytest.mark.parametrize(("tokens", "problem"), [
    ([{"name": "a", "token": "short", "role": "read"}], "at least 16"),
    ([{"name": "a", "token": "x" * 20 + " y", "role": "read"}], "visible ASCII"),
    ([{"name": "a", "token": "x" * 20, "role": "admin"}], "read"),
    ([{"name": "a", "token": "x" * 20}, {"name": "a", "token": "y" * 20}], "used twice"),
    ([{"name": "a", "token": "x" * 20}, {"name": "b", "token": "x" * 20}], "another's"),
    ([{"name": "bad name", "token": "x" * 20}], "letter or digit"),
])
def test_admin_settings_refuse_weak_or_ambiguous_tokens(tokens: list[dict], problem: str
                                                        ) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as raised:
        AdminSettings.model_validate({"enabled": True, "tokens": tokens})
    messages = " ".join(str(error["msg"]) for error in raised.value.errors())
    assert problem in messages, messages
    assert "x" * 20 not in messages  # the message (what the YAML loader shows) hides tokens

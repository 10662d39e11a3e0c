"""Emergency calls when things go wrong around them: a trunk reachable only over UDP
while configured for TLS (the call falls back at once, RFC 6881 SP-30, EMERGENCY.md
EM-30, and the journal records the failed transports; an ordinary call just fails), and
a device sending location updates faster than a PSAP should get them (EM-42)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from switch_process import SipDevice, free_port, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402

from e911.audit import read_journal  # noqa: E402
from e911.civic import CivicAddress  # noqa: E402
from e911.pidf import build_pidf  # noqa: E402
from sip.multipart import BodyPart, build_multipart  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ALICE = SipDevice("101", "pw101-secret", {"site": "lyon", "location": "b312",
                                          "display_name": "Alice", "did": "+33478000101"})


async def test_tls_failure_falls_back_to_udp_for_an_emergency_call(tmp_path: Path) -> None:
    port = free_port("udp", TRUNK_HOST)
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": "tls-only", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "tls", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {"route_timeout": 2, "retry_interval": 1, "sites": [{
            "id": "lyon", "country": "FR",
            "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                        "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
            "routes": ["tls-only"], "locations": [{"id": "b312", "FLR": "3"}]}]},
    }  # fmt: skip
    process = prepare_switch(tmp_path, [ALICE], tcp=False, sections=sections)
    process.start()
    try:
        async with EmergencyTrunkUAS([200], port=port) as trunk, \
                SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
            assert (await alice.register(expires=60)).status == 200
            started = time.monotonic()
            call = await alice.invite("112", timeout=10)
            assert call.status == 200, call.final
            record = await trunk.wait_invite(timeout=1)
            assert record is not None
            assert record[0] - started < 2.0  # the fallback is immediate (design target 2 s)
            assert str(record[2].uri).startswith("sip:112@")
            assert record[2].top_via.transport.upper() == "UDP"
            await call.bye()
            control = await alice.invite("0478000000", timeout=10)
            assert control.status >= 500, control.final  # ordinary calls do not fall back
    finally:
        process.stop()
    entries = list(read_journal(tmp_path / "var" / "emergency"))
    failures = [e for e in entries if e["event"] == "response"
                and "tls" in str(e["fields"].get("reason", ""))]
    assert failures, [e["event"] for e in entries]
    assert any(e["event"] == "answered" for e in entries)


def _location_update(sdp: bytes, room: str) -> tuple[str, bytes]:
    """A re-INVITE body with the device's SDP and its own PIDF-LO naming ``room``."""
    civic = CivicAddress.from_elements({"country": "FR", "A1": "69", "A3": "Lyon",
                                        "RD": "Rue de la République", "HNO": "10",
                                        "PC": "69002", "ROOM": room})
    pidf = build_pidf(civic, entity="sip:101@127.0.0.1", device_id="101",
                      timestamp=time.time(), method="Manual")
    return build_multipart([
        BodyPart([("Content-Type", "application/sdp")], sdp),
        BodyPart([("Content-Type", "application/pidf+xml"),
                  ("Content-ID", f"<dev-{room}@127.0.0.1>")], pidf),
    ])


async def test_location_updates_reach_the_psap_at_most_every_ten_seconds(
    tmp_path: Path,
) -> None:
    """EM-42: three updates in a few seconds: the first at once, the latest ~10 s later."""
    port = free_port("udp", TRUNK_HOST)
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": "pidf", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "pidf"}}],
        "emergency": {"sites": [{
            "id": "lyon", "country": "FR",
            "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                        "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
            "routes": ["pidf"], "locations": [{"id": "b312", "FLR": "3"}]}]},
    }  # fmt: skip
    process = prepare_switch(tmp_path, [ALICE], tcp=False, sections=sections)
    process.start()
    try:
        async with EmergencyTrunkUAS([200], port=port) as trunk, \
                SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
            assert (await alice.register(expires=60)).status == 200
            call = await alice.invite("112", timeout=10)
            assert call.status == 200, call.final
            sdp = call.local_sdp
            for room in ("Lab-1", "Lab-2", "Lab-3"):
                content_type, body = _location_update(sdp, room)
                response = await call.reinvite(body, content_type=content_type)
                assert response is not None and response.status == 200, response
                await asyncio.sleep(1.5)
            deadline = time.monotonic() + 14
            with_location: list = []
            while time.monotonic() < deadline and len(with_location) < 2:
                with_location = [r for r in trunk.reinvites if b"pidf+xml" in r[1]]
                await asyncio.sleep(0.2)
            assert len(with_location) == 2, [r[1][:200] for r in trunk.reinvites]
            first, latest = with_location
            assert b"Lab-1" in first[1] and b"Lab-3" in latest[1]
            assert 9.0 <= latest[0] - first[0] <= 12.0, latest[0] - first[0]
            # the updates in between reached the PSAP as SDP only
            assert len(trunk.reinvites) == 4
            await call.bye()
    finally:
        process.stop()


async def test_a_device_registered_abroad_is_warned_announced_and_still_routed(
    tmp_path: Path,
) -> None:
    """EM-53 policy b: registering from a German network gets a warning MESSAGE; its 112
    first plays the announcement (183), then reaches the home trunk, flagged DE."""
    port = free_port("udp", TRUNK_HOST)
    nomad = SipDevice("104", "pw104-secret", {"site": "lyon", "mobility": "nomadic",
                                              "display_name": "Nomad", "did": "+33478000104"})
    sections = {
        "media": {"backend": "relay", "bind_host": "127.0.0.1",
                  "port_min": 43000 + 10 * (os.getpid() % 100),
                  "port_max": 43009 + 10 * (os.getpid() % 100), "media_timeout": 0},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": "nat", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {"foreign_policy": "announce_and_route", "sites": [{
            "id": "lyon", "country": "FR",
            "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                        "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
            "routes": ["nat"], "locations": [{"id": "b312", "FLR": "3"}],
            "networks": [{"subnet": "127.0.0.9/32", "country": "DE"}]}]},
    }  # fmt: skip
    process = prepare_switch(tmp_path, [nomad], tcp=False, sections=sections)
    process.start()
    try:
        async with EmergencyTrunkUAS([200], port=port, answer_delay=0.5) as trunk, \
                SipUA(nomad.extension, nomad.password, process.address(),
                      host="127.0.0.9") as ua:
            assert (await ua.register(expires=60)).status == 200
            warning = await ua.wait_for("MESSAGE", timeout=5)
            assert warning is not None and b"DE" in warning.body, warning
            call = await ua.invite("112", timeout=10)
            assert call.status == 200, call.final
            assert 183 in [p.status for p in call.provisionals], call.provisionals
            assert len(trunk.invites) == 1
            assert str(trunk.invites[0][2].uri).startswith("sip:112@")
            await call.bye()
    finally:
        process.stop()
    classified = [e for e in read_journal(tmp_path / "var" / "emergency")
                  if e["event"] == "classified"]
    assert classified and classified[0]["fields"]["foreign_country"] == "DE"


@pytest.mark.parametrize("ecrf_up", [True, False])
async def test_i3_route_comes_from_the_ecrf_or_falls_back_to_the_esrp(
    tmp_path: Path, ecrf_up: bool,
) -> None:
    """EM-32: the ECRF's PSAP becomes the Route; with the ECRF down, the configured ESRP."""
    sys.path.append(str(Path(__file__).resolve().parents[1] / "unit"))
    from test_e911_lost import MockEcrf

    ecrf = await MockEcrf().start()
    if not ecrf_up:
        await ecrf.stop()
    port = free_port("udp", TRUNK_HOST)
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": "i3", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "i3", "esrp_route": "sip:esrp.example.net;lr",
                                  "lost_server": ecrf.url, "lost_timeout": 0.5}}],
        "emergency": {"sites": [{
            "id": "lyon", "country": "FR",
            "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                        "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
            "routes": ["i3"], "locations": [{"id": "b312", "FLR": "3"}]}]},
    }  # fmt: skip
    process = prepare_switch(tmp_path, [ALICE], tcp=False, sections=sections)
    process.start()
    try:
        async with EmergencyTrunkUAS([200], port=port) as trunk, \
                SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
            assert (await alice.register(expires=60)).status == 200
            started = time.monotonic()
            call = await alice.invite("112", timeout=10)
            assert call.status == 200, call.final
            record = trunk.invites[0]
            route = record[2].header("Route")
            if ecrf_up:
                assert route == "<sip:psap-a@127.0.0.1;lr>", route
                assert len(ecrf.requests) == 1
                assert b"urn:service:sos" in ecrf.requests[0].body
            else:
                assert route == "<sip:esrp.example.net;lr>", route
                assert record[0] - started < 1.5  # the 0.5 s budget, then the default
            await call.bye()
    finally:
        process.stop()
        if ecrf_up:
            await ecrf.stop()


async def test_a_did_pending_at_the_provider_is_reported_and_its_calls_still_go_out(
    tmp_path: Path,
) -> None:
    """EM-51 and EM-24: the provider keeps the DID pending: the readiness check says so,
    and the device's 112 goes out all the same."""
    sys.path.append(str(Path(__file__).resolve().parent))
    from test_e911_activation_provider import TOKEN, MockProvider

    provider = MockProvider()
    url = await provider.start()
    provider.pending_polls[ALICE.settings["did"]] = 1000
    port = free_port("udp", TRUNK_HOST)
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": "nat", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {
            "provider": {"url": url, "token": TOKEN, "poll_initial": 0.05,
                         "poll_attempts": 2, "sync_interval": 600},
            "sites": [{
                "id": "lyon", "country": "FR",
                "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                            "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
                "routes": ["nat"], "locations": [{"id": "b312", "FLR": "3"}],
                "notify": {"webhooks": ["http://127.0.0.1:9/hook"]}}]},
    }  # fmt: skip
    process = prepare_switch(tmp_path, [ALICE], tcp=False, sections=sections)
    process.start()
    try:
        journal = tmp_path / "var" / "emergency" / "activation.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"provisioned" not in (
                journal.read_bytes() if journal.exists() else b""):
            await asyncio.sleep(0.1)
        assert journal.exists() and b"provisioned" in journal.read_bytes()
        async with EmergencyTrunkUAS([200], port=port) as trunk, \
                SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
            assert (await alice.register(expires=60)).status == 200
            call = await alice.invite("112", timeout=10)
            assert call.status == 200, call.final
            assert len(trunk.invites) == 1
            await call.bye()
    finally:
        process.stop()
        await provider.stop()
    readiness = subprocess.run(
        [sys.executable, "-m", "switch", "emergency", "readiness", "--config",
         str(process.config_path)], capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).resolve().parents[2])
    assert readiness.returncode == 1, readiness
    assert f"{ALICE.settings['did']}: emergency service pending at the provider" in (
        readiness.stdout), readiness.stdout


async def test_under_overload_ordinary_calls_are_shed_and_emergency_calls_are_not(
    tmp_path: Path,
) -> None:
    """Overload control: while the event loop lags, new ordinary INVITEs get 503 with
    Retry-After at once; an emergency call is still routed."""
    from switch_process import Listener, build_config

    from switch.app import Softswitch
    from switch.settings import load_settings_text

    port = free_port("udp", TRUNK_HOST)
    sip_port = free_port("udp", "127.0.0.1")
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [{"id": "nat", "kind": "peer", "host": TRUNK_HOST, "port": port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {"sites": [{
            "id": "lyon", "country": "FR",
            "address": {"country": "FR", "A1": "69", "A3": "Lyon",
                        "RD": "Rue de la République", "HNO": "10", "PC": "69002"},
            "routes": ["nat"], "locations": [{"id": "b312", "FLR": "3"}]}]},
    }  # fmt: skip
    config = tmp_path / "switch.yaml"
    config.write_text(build_config([Listener("udp", "127.0.0.1", sip_port)], [ALICE],
                                   sections=sections))
    switch = Softswitch(load_settings_text(config.read_text(), str(config)))
    await switch.start()
    try:
        async with EmergencyTrunkUAS([200], port=port) as trunk, \
                SipUA(ALICE.extension, ALICE.password, ("127.0.0.1", sip_port)) as alice:
            assert (await alice.register(expires=60)).status == 200
            switch.calls.overloaded = True
            shed = await alice.invite("0478000000", timeout=5)
            assert shed.status == 503 and shed.final.header("Retry-After") == "5", shed.final
            assert shed.challenges == []  # refused before any digest work
            call = await alice.invite("112", timeout=10)
            assert call.status == 200, call.final
            assert len(trunk.invites) == 1
            assert str(trunk.invites[0][2].uri).startswith("sip:112@")
            await call.bye()
            switch.calls.overloaded = False
            ordinary = await alice.invite("0478000000", timeout=5)
            assert ordinary.status == 200, ordinary.final
            await ordinary.bye()
    finally:
        await switch.stop()

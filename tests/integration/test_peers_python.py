"""The Python SIP test peers (tests/peers/sipua.py, tests/peers/etrunk.py) against the
real switch process.

One switch for the module, with two devices and a peer trunk (``kind: peer``) pointing
at an `EmergencyTrunkUAS` on 127.0.0.2 (the trunk's ``addresses``; the devices send from
127.0.0.1, so the switch never mistakes one for the other). The tests prove the peers do
what the emergency-calling tests will rely on: REGISTER with the 401 digest round, a
device-to-device call with the 407 round, answer and BYE, CANCEL of a ringing call, a
call out through the trunk recorded and answered by the trunk's script (and a busy
answer that the caller ACKs), and an inbound call from the trunk to a device's DID.
The last tests use the peers between themselves: retransmission over UDP until the other
side answers, the trunk's scripts (424, silent, callables), requests outside a dialog.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from switch_process import LOOPBACK_V4, SipDevice, SwitchProcess, free_port, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

TRUNK_ID = "etrunk-test"
ALICE = SipDevice("1000", "pw1000")
BOB = SipDevice("1001", "pw1001")
BOB_DID = "+33478000001"
PSTN_CALLER = "+33612345678"
DIALLED = "0478000000"  # a national number of the site's country (FR), no line prefix
DIALLED_E164 = "+33478000000"
# relay ports apart from the other integration modules' ranges; unbindable ones are skipped
RELAY_PORT_MIN = 40000 + 20 * (os.getpid() % 500)


@pytest.fixture(scope="module")
def trunk_port() -> int:
    return free_port("udp", TRUNK_HOST)


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory, trunk_port: int) -> Iterator[SwitchProcess]:
    sections = {
        "media": {
            "backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORT_MIN,
            "port_max": RELAY_PORT_MIN + 19, "media_timeout": 0,
        },
        "dialplan": {"country": "FR"},
        "trunks": [
            {
                "id": TRUNK_ID, "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
            }
        ],
    }  # fmt: skip
    process = prepare_switch(
        tmp_path_factory.mktemp("peers_python"), [ALICE, BOB], tcp=False, sections=sections
    )
    text = process.config_path.read_text()
    line = f'extension: "{BOB.extension}", password: "{BOB.password}"'
    assert line in text
    process.config_path.write_text(text.replace(line, f"{line}, did: {json.dumps(BOB_DID)}"))
    process.start()
    try:
        yield process
        assert process.process is not None and process.process.poll() is None, "switch died"
    finally:
        process.stop()


@pytest.fixture
async def trunk(trunk_port: int) -> AsyncIterator[EmergencyTrunkUAS]:
    async with EmergencyTrunkUAS([200], port=trunk_port) as uas:
        yield uas


@pytest.fixture
async def alice(switch: SwitchProcess) -> AsyncIterator[SipUA]:
    async with SipUA(ALICE.extension, ALICE.password, switch.address()) as ua:
        yield ua


@pytest.fixture
async def bob(switch: SwitchProcess) -> AsyncIterator[SipUA]:
    async with SipUA(BOB.extension, BOB.password, switch.address()) as ua:
        yield ua


async def _register(*uas: SipUA) -> None:
    for ua in uas:
        response = await ua.register(expires=60)
        assert response is not None and response.status == 200, response


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
async def test_register_answers_the_401_challenge(switch: SwitchProcess, algorithm: str) -> None:
    async with SipUA(ALICE.extension, ALICE.password, switch.address(), algorithm=algorithm) as ua:
        response = await ua.register(expires=60)
        assert response is not None and response.status == 200, response
        assert response.cseq.seq == 2  # the 401 round: CSeq 1 challenged, CSeq 2 accepted
        contacts = response.header_values("Contact")
        assert any(f"{ua.username}@{ua.via_sent_by}" in c for c in contacts), contacts
        removed = await ua.register(expires=0)
        assert removed is not None and removed.status == 200 and removed.cseq.seq == 4
        assert ua.requests == []  # the switch only answered


async def test_register_with_a_wrong_password_is_refused(switch: SwitchProcess) -> None:
    async with SipUA(ALICE.extension, "not-the-password", switch.address()) as ua:
        response = await ua.register(expires=60)
        assert response is not None and response.status in (401, 403), response


async def test_device_calls_device_which_answers_then_hangs_up(alice: SipUA, bob: SipUA) -> None:
    await _register(alice, bob)
    call = await alice.invite(bob.username, timeout=5)
    assert call.status == 200, (call.final, call.challenges)
    assert [r.status for r in call.challenges] == [407]
    assert call.invite is not None and call.invite.cseq.seq == 2
    assert call.invite.header("Proxy-Authorization") is not None
    assert call.sent_at is not None and call.remote_sdp.startswith(b"v=0")
    assert any(r.status == 180 for r in call.provisionals), call.provisionals

    invite = await bob.wait_for("INVITE", timeout=2)
    assert invite is not None and invite.uri.startswith(f"sip:{bob.username}@")
    assert await bob.wait_for("ACK", timeout=2) is not None  # the switch ACKed bob's 200
    assert len(bob.incoming_calls) == 1

    # hold: a sendonly re-INVITE reaches bob, who answers recvonly
    hold = await call.reinvite(alice.default_offer(version=2, direction="sendonly"))
    assert hold is not None and hold.status == 200, hold
    reinvite = await bob.wait_for("INVITE", timeout=2)
    assert reinvite is not None and reinvite.to.tag and b"a=sendonly" in reinvite.body
    assert b"a=recvonly" in hold.body

    bye_response = await call.bye()
    assert bye_response is not None and bye_response.status == 200
    bye = await bob.wait_for("BYE", timeout=2)
    assert bye is not None and bye.call_id == invite.call_id
    assert bob.incoming_calls[0].ended.is_set()


async def test_cancel_of_a_ringing_call_gets_487(alice: SipUA, bob: SipUA) -> None:
    await _register(alice, bob)
    bob.incoming_invite = "ring"
    call = await alice.invite(bob.username, wait="provisional", timeout=5)
    assert call.final is None and any(r.status == 180 for r in call.provisionals)
    final = await call.cancel()
    assert call.cancel_response is not None and call.cancel_response.status == 200
    assert final is not None and final.status == 487
    assert await bob.wait_for("CANCEL", timeout=2) is not None
    assert not bob.incoming_calls


async def test_call_out_reaches_the_trunk_which_records_and_answers(
    alice: SipUA, trunk: EmergencyTrunkUAS
) -> None:
    await _register(alice)
    call = await alice.invite(DIALLED, timeout=5)
    assert call.status == 200, call.final
    record = await trunk.wait_invite(timeout=1)
    assert record is not None
    at, raw, invite = record
    assert invite.uri.startswith(f"sip:{DIALLED_E164}@{TRUNK_HOST}:{trunk.port}"), invite.uri
    assert raw.startswith(b"INVITE ") and invite.body.startswith(b"v=0")
    assert call.sent_at is not None and at > call.sent_at  # the benchmark's two ends
    assert len(trunk.invites) == 1 and len(trunk.answered) == 1
    assert await trunk.wait_request("ACK", timeout=2) is not None

    assert (await call.bye()) is not None
    bye = await trunk.wait_request("BYE", timeout=2)
    assert bye is not None and bye.request.call_id == invite.call_id


async def test_trunk_script_busy_is_acked_by_the_switch(
    alice: SipUA, trunk: EmergencyTrunkUAS
) -> None:
    await _register(alice)
    trunk.script = [486]
    call = await alice.invite(DIALLED, timeout=5)
    assert call.status == 486, call.final
    assert trunk.behaviours_used == [486]
    ack = await trunk.wait_request("ACK", timeout=2)
    assert ack is not None and ack.request.cseq.seq == trunk.invites[0].request.cseq.seq


async def test_inbound_call_from_the_trunk_rings_the_did_device(
    switch: SwitchProcess, bob: SipUA, trunk: EmergencyTrunkUAS
) -> None:
    await _register(bob)
    call = await trunk.call(switch.address(), BOB_DID, PSTN_CALLER, timeout=5)
    assert call.status == 200, call.final
    assert not call.challenges  # a peer trunk is trusted by address: no digest
    invite = await bob.wait_for("INVITE", timeout=1)
    assert invite is not None and PSTN_CALLER in (invite.header("From") or "")
    response = await call.bye()
    assert response is not None and response.status == 200
    assert await bob.wait_for("BYE", timeout=2) is not None


# --------------------------------------------------------------------------------------
# The peers between themselves (no switch): retransmission, scripts, bad scripts
# --------------------------------------------------------------------------------------


async def test_requests_are_retransmitted_until_the_peer_answers() -> None:
    async with EmergencyTrunkUAS([200]) as caller, EmergencyTrunkUAS([200]) as callee:
        callee.stop_responding()
        placing = asyncio.ensure_future(caller.call(callee.address, "112", "+33100000000"))
        await asyncio.sleep(0.8)  # the first INVITE and its T1 retransmission are lost
        assert len(callee.invites) == 1 and len(callee.retransmissions) >= 1
        callee.resume()
        call = await placing
        assert call.status == 200, call.final
        assert len(callee.invites) == 1  # retransmissions are never recorded as new INVITEs
        assert (await callee.wait_request("ACK", timeout=1)) is not None
        response = await callee.answered[0].bye()
        assert response is not None and response.status == 200
        assert await call.wait_request("BYE", timeout=1) is not None and call.ended.is_set()


async def test_trunk_scripts_424_silent_and_callables() -> None:
    async with (
        EmergencyTrunkUAS([424, "silent", lambda r: [183, 0.05, 603]]) as trunk,
        EmergencyTrunkUAS() as caller,
    ):
        refused = await caller.call(trunk.address, "112", "+33100000000", timeout=2)
        assert refused.status == 424 and refused.final is not None
        assert refused.final.header("Geolocation-Error") == "100"
        assert await trunk.wait_request("ACK", timeout=1) is not None

        unanswered = await caller.call(trunk.address, "112", "+33100000000", timeout=0.8)
        assert unanswered.final is None and unanswered.provisionals == []
        assert len(trunk.retransmissions) >= 1  # the caller retransmitted after T1

        scripted = await caller.call(trunk.address, "112", "+33100000000", timeout=2)
        assert scripted.status == 603 and [r.status for r in scripted.provisionals] == [100, 183]
        assert len(trunk.invites) == 3 and trunk.behaviours_used[:2] == [424, "silent"]


async def test_requests_outside_a_dialog_are_recorded_and_answered() -> None:
    async with (
        SipUA("1000", "pw1000", (TRUNK_HOST, 9)) as device,
        EmergencyTrunkUAS() as sender,
    ):
        target = f"sip:1000@{device.via_sent_by}"
        options = await sender.send("OPTIONS", target, device.address)
        message = await sender.send(
            "MESSAGE", target, device.address, body=b"Emergency call", content_type="text/plain"
        )
        stray_bye = await sender.send("BYE", target, device.address)
        assert options is not None and options.status == 200
        assert message is not None and message.status == 200
        assert stray_bye is not None and stray_bye.status == 481  # no such dialog
        received = await device.wait_for("MESSAGE", timeout=1)
        assert received is not None and received.body == b"Emergency call"
        assert [r.method for r in device.received] == ["OPTIONS", "MESSAGE", "BYE"]


@pytest.mark.parametrize("script", [[], [99], ["loud"], [True], [object()]])
def test_bad_scripts_are_refused_with_a_message(script: list) -> None:
    with pytest.raises(ValueError, match="script"):
        EmergencyTrunkUAS(script)

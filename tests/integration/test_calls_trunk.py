"""Calls through a SIP trunk, the provider played by SIPp 3.6 on 127.0.0.2.

Outbound: a registered device (SIPp, 407 digest to the switch) dials ``0 01 23 45 67 89``;
the switch sends ``sip:+33123456789@127.0.0.2:PORT;user=phone`` to the provider, which
challenges with 401 and checks the switch's answer with SIPp's ``verifyauth`` (403 when it
is wrong). What the provider received is read from its message trace: the asserted
identity (PAI) is the device's DID whatever number the device wrote (no spoofing), and
``Privacy: id`` makes the From anonymous while the PAI stays.

Inbound: a SIPp UAC bound to 127.0.0.2 (the trunk's ``addresses``) calls a DID and the
device whose ``did`` it is rings and answers, without any digest challenge; an unassigned
DID gets 404, and the same INVITE from an address of no trunk gets the 407 of a device.

Each call's CDR is read back from the switch's ledger.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sipp_calls import (
    Sipp,
    auth_injection,
    launch_sipp,
    provider_scenario,
    received_requests,
    sipp_group,
)
from switch_process import LOOPBACK_V4, SipDevice, free_port, prepare_switch
from test_calls_sipp import Bench, sipp_call_id

from switch.cdr import CallRecord

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TRUNK_HOST = "127.0.0.2"  # loopback too: the provider's own address, listed in `addresses`
TRUNK_ID = "provider-test"
TRUNK_USER = "trunkuser"
TRUNK_PASSWORD = "trunk-secret"
PROVIDER_REALM = "provider.test"  # the realm of uas_provider_auth.xml's challenge
MAIN_NUMBER = "+33123456700"
CALLER = SipDevice("1000", "pw1000")
CALLER_DID = "+33123456781"
CALLEE = SipDevice("1001", "pw1001")
CALLEE_DID = "+33123456790"
CALLER_WITHOUT_DID = SipDevice("1002", "pw1002")
DIALLED = "00123456789"  # outside-line prefix 0, then 01 23 45 67 89
CALLED_E164 = "+33123456789"
SPOOFED = "+33999999999"
# below the ephemeral ports (32768+), apart from test_calls_sipp's 20000-28199
RELAY_PORT_MIN = 28200 + 4 * (os.getpid() % 1000)
HOLD_MS = 300


@pytest.fixture(scope="module")
def trunk_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Bench, int]]:
    """One switch for the module, with a provider trunk at 127.0.0.2:PORT; yields the
    bench and the provider's port (each test starts its own provider SIPp there)."""
    workdir = tmp_path_factory.mktemp("calls_trunk")
    provider_port = free_port("udp", TRUNK_HOST)
    sections: dict[str, Any] = {
        "media": {
            "backend": "relay", "bind_host": LOOPBACK_V4,
            "port_min": RELAY_PORT_MIN, "port_max": RELAY_PORT_MIN + 49, "media_timeout": 0,
        },
        "calls": {"no_answer_timeout": 30, "session_expires": 1800},
        "dialplan": {"country": "FR", "outside_line_prefix": "0"},
        "trunks": [
            {
                "id": TRUNK_ID, "kind": "provider", "host": TRUNK_HOST, "port": provider_port,
                "transport": "udp", "username": TRUNK_USER, "password": TRUNK_PASSWORD,
                "realm": PROVIDER_REALM, "addresses": [TRUNK_HOST],
            }
        ],
    }  # fmt: skip
    switch = prepare_switch(
        workdir / "switch", [CALLER, CALLEE, CALLER_WITHOUT_DID], tcp=False, sections=sections
    )
    # the account's main number and the devices' DIDs (build_config writes neither)
    text = switch.config_path.read_text()
    text = text.replace(
        "  - id: itest\n", f"  - id: itest\n    main_number: {json.dumps(MAIN_NUMBER)}\n"
    )
    for device, did in ((CALLER, CALLER_DID), (CALLEE, CALLEE_DID)):
        line = f'extension: "{device.extension}", password: "{device.password}"'
        assert line in text
        text = text.replace(line, f"{line}, did: {json.dumps(did)}")
    switch.config_path.write_text(text)
    switch.start()
    try:
        yield Bench(switch, workdir), provider_port
        assert switch.process is not None and switch.process.poll() is None, "switch died"
    finally:
        switch.stop()


def _start_provider(work: Path, port: int, password: str = TRUNK_PASSWORD) -> Sipp:
    scenario = provider_scenario(work / "scenario", username=TRUNK_USER, password=password)
    return launch_sipp(work, "provider", scenario, host=TRUNK_HOST, port=port)


def _call_out(
    bench: Bench,
    work: Path,
    caller: SipDevice,
    *,
    from_user: str | None = None,
    identity_header: str = "X-Identity-Test: none",
) -> Sipp:
    injection = auth_injection(
        work / "caller.csv", auth_user=caller.extension, password=caller.password,
        callee=DIALLED, from_user=from_user,
    )  # fmt: skip
    return launch_sipp(
        work, "caller", "uac_call_out.xml", target=bench.target, injection=injection,
        hold_ms=HOLD_MS, keys={"identity_header": identity_header},
    )  # fmt: skip


def _run_outbound(
    bench: Bench, provider_port: int, work: Path, caller: SipDevice, **options: Any
) -> tuple[Sipp, Sipp]:
    """One call out through the provider; both SIPp ended; returns (caller, provider)."""
    with sipp_group() as started:
        provider = _start_provider(work, provider_port, options.pop("password", TRUNK_PASSWORD))
        started.append(provider)
        caller_sipp = _call_out(bench, work, caller, **options)
        started.append(caller_sipp)
        assert caller_sipp.wait() == 0, caller_sipp.describe() + provider.describe()
        assert provider.wait() == 0, provider.describe() + bench.switch.log_text()[-3000:]
    return caller_sipp, provider


def _cdr(bench: Bench, call_id: str) -> dict[str, Any]:
    record = bench.cdr(call_id)
    CallRecord.from_json_line(json.dumps(record))  # every field well formed
    return record


def _pai_numbers(invite: Any) -> list[str]:
    return re.findall(r"(?:sip:|tel:)(\+?\d+)", " ".join(invite.all("P-Asserted-Identity")))


def _from_user(invite: Any) -> str:
    match = re.search(r"<sips?:([^@>]+)@([^;>]+)", invite.header("From") or "")
    assert match is not None, invite.text
    return match.group(1)


# --------------------------------------------------------------------------------------
# Outbound
# --------------------------------------------------------------------------------------


def test_outbound_call_answers_the_providers_challenge_and_asserts_the_did(
    trunk_bench: tuple[Bench, int],
) -> None:
    bench, provider_port = trunk_bench
    work = bench.workdir / "outbound"
    caller, provider = _run_outbound(bench, provider_port, work, CALLER)
    assert caller.file("final_status.txt") == "200", caller.describe()

    invites = received_requests(provider, "INVITE")
    assert len(invites) == 2, [i.start_line for i in invites]
    first, answered = invites
    expected_uri = f"sip:{CALLED_E164}@{TRUNK_HOST}:{provider_port};user=phone"
    assert first.start_line == f"INVITE {expected_uri} SIP/2.0", first.start_line
    assert answered.start_line == first.start_line
    assert first.header("Authorization") is None
    authorization = answered.header("Authorization") or ""
    assert f'username="{TRUNK_USER}"' in authorization, answered.text
    assert f'realm="{PROVIDER_REALM}"' in authorization, answered.text
    assert TRUNK_PASSWORD not in answered.text
    assert answered.header("Call-ID") == first.header("Call-ID")
    # the identity the switch asserts: the device's DID, in PAI and in the From
    assert _pai_numbers(answered) == [CALLER_DID, CALLER_DID], answered.text
    assert f"<tel:{CALLER_DID}>" in answered.all("P-Asserted-Identity")
    assert _from_user(answered) == CALLER_DID, answered.text
    assert answered.header("Privacy") is None
    # the provider got the BYE when the device hung up
    assert len(received_requests(provider, "BYE")) >= 1, provider.describe()

    record = _cdr(bench, sipp_call_id(caller))
    assert record["classification"] == "external", record
    assert record["trunk"] == TRUNK_ID, record
    assert record["callee_dialled"] == DIALLED and record["callee_e164"] == CALLED_E164, record
    assert record["caller"] == CALLER_DID and record["device"] == CALLER.extension, record
    assert record["sip_status"] == 200 and record["answer"] is not None, record
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record


@pytest.mark.parametrize(
    ("case", "caller", "from_user", "identity_header", "asserted"),
    [
        # a number the device does not own, in From and P-Preferred-Identity: ignored
        ("spoofed", CALLER, SPOOFED,
         f"P-Preferred-Identity: <sip:{SPOOFED}@{LOOPBACK_V4}>", CALLER_DID),
        # a number it owns (its account's main number): honoured
        ("main_number_chosen", CALLER, None,
         f"P-Preferred-Identity: <sip:{MAIN_NUMBER}@{LOOPBACK_V4}>", MAIN_NUMBER),
        # a device without a DID presents its account's main number
        ("no_did", CALLER_WITHOUT_DID, None, "X-Identity-Test: none", MAIN_NUMBER),
    ],
)  # fmt: skip
def test_outbound_identity_is_asserted_from_the_account(
    trunk_bench: tuple[Bench, int],
    case: str,
    caller: SipDevice,
    from_user: str | None,
    identity_header: str,
    asserted: str,
) -> None:
    bench, provider_port = trunk_bench
    work = bench.workdir / f"identity_{case}"
    caller_sipp, provider = _run_outbound(
        bench, provider_port, work, caller, from_user=from_user, identity_header=identity_header
    )
    assert caller_sipp.file("final_status.txt") == "200", caller_sipp.describe()
    invite = received_requests(provider, "INVITE")[-1]
    assert _pai_numbers(invite) == [asserted, asserted], invite.text
    assert _from_user(invite) == asserted, invite.text
    assert SPOOFED not in invite.text
    assert invite.header("P-Preferred-Identity") is None  # consumed by the switch
    record = _cdr(bench, sipp_call_id(caller_sipp))
    assert record["device"] == caller.extension and record["trunk"] == TRUNK_ID, record


def test_outbound_privacy_id_gives_an_anonymous_from_and_keeps_the_pai(
    trunk_bench: tuple[Bench, int],
) -> None:
    bench, provider_port = trunk_bench
    work = bench.workdir / "privacy"
    caller, provider = _run_outbound(
        bench, provider_port, work, CALLER, identity_header="Privacy: id"
    )
    assert caller.file("final_status.txt") == "200", caller.describe()
    invite = received_requests(provider, "INVITE")[-1]
    from_value = invite.header("From") or ""
    assert "sip:anonymous@anonymous.invalid" in from_value, invite.text
    assert CALLER_DID not in from_value and CALLER.extension not in from_value
    assert invite.header("Privacy") == "id", invite.text
    assert _pai_numbers(invite) == [CALLER_DID, CALLER_DID], invite.text


def test_wrong_trunk_password_fails_the_call_with_403(trunk_bench: tuple[Bench, int]) -> None:
    bench, provider_port = trunk_bench
    work = bench.workdir / "wrong_password"
    caller, provider = _run_outbound(
        bench, provider_port, work, CALLER, password="not-the-trunk-secret"
    )
    assert caller.file("final_status.txt") == "403", caller.describe()
    # one answer to the challenge, and no retry after the provider's 403
    invites = received_requests(provider, "INVITE")
    assert len({i.header("CSeq") for i in invites}) == 2, [i.header("CSeq") for i in invites]
    record = _cdr(bench, sipp_call_id(caller))
    assert record["sip_status"] == 403 and record["answer"] is None, record
    assert record["end_cause"] == "failed" and record["billable"] == 0, record
    assert record["trunk"] == TRUNK_ID and record["classification"] == "external", record


# --------------------------------------------------------------------------------------
# Inbound
# --------------------------------------------------------------------------------------


def _call_in(work: Path, target: tuple[str, int], host: str, number: str) -> Sipp:
    return launch_sipp(
        work, "trunk_caller", "uac_call_in.xml", host=host, target=target, service=number,
        hold_ms=HOLD_MS, keys={"caller_number": "+33612345678"},
    )  # fmt: skip


def test_inbound_call_to_a_did_rings_its_device_without_a_challenge(
    trunk_bench: tuple[Bench, int],
) -> None:
    bench, _ = trunk_bench
    work = bench.workdir / "inbound"
    with sipp_group() as started:
        device = launch_sipp(work, "device", "uas_answer.xml", keys={"phone_port": "9"})
        started.append(device)
        bench.register(CALLEE.extension, device.port)
        trunk_caller = _call_in(work, bench.target, TRUNK_HOST, CALLEE_DID)
        started.append(trunk_caller)
        log = bench.switch.log_text
        assert trunk_caller.wait() == 0, trunk_caller.describe() + device.describe() + log()
        assert device.wait() == 0, device.describe()
    assert trunk_caller.file("final_status.txt") == "200", trunk_caller.describe()
    trace = next(trunk_caller.workdir.glob("*_messages.log")).read_text(errors="replace")
    assert "SIP/2.0 407" not in trace and "SIP/2.0 401" not in trace, trace[-3000:]
    invite = received_requests(device, "INVITE")[0]
    assert invite.start_line.startswith(f"INVITE sip:{CALLEE.extension}@"), invite.start_line
    assert "+33612345678" in (invite.header("From") or ""), invite.text

    record = _cdr(bench, sipp_call_id(trunk_caller))
    assert record["classification"] == "external" and record["trunk"] == TRUNK_ID, record
    assert record["caller"] == "+33612345678", record
    assert record["device"] == CALLEE.extension, record
    assert record["callee_dialled"] == CALLEE_DID, record
    assert record["sip_status"] == 200 and record["hangup_by"] == "caller", record


@pytest.mark.parametrize(
    ("case", "host", "number", "status"),
    [
        ("unassigned_did", TRUNK_HOST, "+33123456799", "404"),
        ("not_from_a_trunk", LOOPBACK_V4, CALLEE_DID, "407"),
    ],
)
def test_inbound_refusals(
    trunk_bench: tuple[Bench, int], case: str, host: str, number: str, status: str
) -> None:
    bench, _ = trunk_bench
    work = bench.workdir / f"inbound_{case}"
    with sipp_group() as started:
        trunk_caller = _call_in(work, bench.target, host, number)
        started.append(trunk_caller)
        assert trunk_caller.wait() == 0, trunk_caller.describe()
    assert trunk_caller.file("final_status.txt") == status, trunk_caller.describe()

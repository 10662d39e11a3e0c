"""Fair use (issue 5) enforced on real calls through the real switch process.

Devices are `SipUA` peers (127.0.0.1) calling out through a peer trunk whose far end is an
`EmergencyTrunkUAS` on 127.0.0.2 that answers every INVITE with 200 and holds the call;
the autodialler is a SIPp UAC. Each test starts its own switch (country FR, media
``none``) with the ``fair_use:`` section it needs, and checks what the caller gets (SIP
status, ``Warning: 399 <realm> "Fair use: ..."``, BYE with a ``Reason``), what reaches
the trunk, and the switch's ``fairuse.*`` log events:

1. two switch processes sharing one redis-server (``store.backend: redis``, one key
   prefix, two node ids): an account limited to 2 simultaneous calls gets 2 across both
   nodes, the 3rd is refused 503 on either node, a hang-up frees a slot;
2. ``kill -9`` of one node with its call up: its lease lapses (``lease_seconds: 2``) and
   the other node admits a new call within the lease lifetime, not before;
3. duration caps: a voice call and a fax call (T.38 re-INVITE at once after the answer)
   are ended on both legs with BYE and a Reason naming the cap, after a MESSAGE warning
   to the calling device;
4. destinations: premium rate, international (off by default, on per account), a
   blacklisted country and a per-account blacklist exception; refused calls never reach
   the trunk;
5. a tiny line quota: the next external call is refused 403, internal and emergency calls
   still go through, and an emergency call counts against no quota;
6. an autodialler (SIPp, consecutive numbers at 10 calls/s): the sequential-dialling
   pattern raises its warning, then its critical level, which refuses the calls.

The shortest duration cap the settings accept is used (at least 2 s): with the current
``fair_use`` model (voice and fax caps of at least 60 s) the duration test lasts about a
minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from annotated_types import Ge
from ruamel.yaml import YAML
from sipp_calls import launch_sipp
from switch_process import LOOPBACK_V4, SipDevice, SwitchProcess, free_port, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import Call, RequestRecord, SipEndpoint, SipUA  # noqa: E402

from fairuse.policy import Duration  # noqa: E402
from sip.message import SipResponse  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]

TRUNK_ID = "carrier"
REALM = LOOPBACK_V4  # the switch's first domain
NATIONAL = "+33478000001"  # an ordinary fixed number of the site's country (FR)
PREMIUM = "+33899123456"  # FR 0899: libphonenumber PREMIUM_RATE
UK_FIXED = "+442079460018"  # another country, not blacklisted
CUBA_FIXED = "+5372345678"  # CU: in the default fraud-prone list (config/)
WAIT_S = 5.0  # bound of every wait for something that should happen
LEASE_S = 2.0  # fair_use.lease_seconds of the two-node tests
LAPSE_MARGIN_S = 1.5  # scheduling slack on top of the lease lifetime


def _smallest_cap() -> int:
    """The shortest voice/fax cap ``fair_use`` accepts (at least 2 s, for a warning 1 s
    before it)."""
    floor = 2
    for name in ("voice", "fax"):
        for bound in Duration.model_fields[name].metadata:
            if isinstance(bound, Ge):
                floor = max(floor, int(bound.ge))
    return floor


CAP_S = _smallest_cap()


# --------------------------------------------------------------------------------------
# Switch configuration
# --------------------------------------------------------------------------------------


def _device(extension: str) -> SipDevice:
    return SipDevice(extension, f"pw{extension}")


def _account(account_id: str, extensions: Iterable[str]) -> dict[str, Any]:
    return {"id": account_id, "devices": [
        {"extension": e, "password": f"pw{e}"} for e in extensions]}


def _switch(
    workdir: Path,
    trunk_port: int,
    fair_use: dict[str, Any],
    devices: Iterable[str] = ("1000", "1001", "1002", "1003"),
    *,
    accounts: Iterable[dict[str, Any]] = (),
    store: dict[str, Any] | None = None,
    node_id: str | None = None,
) -> SwitchProcess:
    """A not yet started switch: account ``itest`` with ``devices``, more ``accounts``,
    the trunk towards our UAS, the ``fair_use`` section and optionally a shared store."""
    sections = {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": TRUNK_ID, "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"]}],
        "fair_use": fair_use,
    }  # fmt: skip
    process = prepare_switch(workdir, [_device(e) for e in devices], tcp=False,
                             sections=sections)
    config = YAML(typ="safe").load(process.config_path.read_text(encoding="utf-8"))
    config["accounts"].extend(accounts)
    if store is not None:
        config["store"] = store
    if node_id is not None:
        config["switch"]["node_id"] = node_id
    process.config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return process


@pytest.fixture
def trunk_port() -> int:
    return free_port("udp", TRUNK_HOST)


@pytest.fixture
async def trunk(trunk_port: int) -> AsyncIterator[EmergencyTrunkUAS]:
    async with EmergencyTrunkUAS([200], port=trunk_port) as uas:
        yield uas


class Switches:
    """The switch processes a test started; all stopped by PID at the end."""

    def __init__(self, tmp_path: Path, trunk_port: int) -> None:
        self.tmp_path = tmp_path
        self.trunk_port = trunk_port
        self.started: list[SwitchProcess] = []

    def start(self, name: str, fair_use: dict[str, Any], **options: Any) -> SwitchProcess:
        process = _switch(self.tmp_path / name, self.trunk_port, fair_use, **options)
        self.started.append(process)
        process.start()
        return process

    def stop(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def switches(tmp_path: Path, trunk_port: int) -> Iterator[Switches]:
    group = Switches(tmp_path, trunk_port)
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
async def phones() -> AsyncIterator[list[SipUA]]:
    """Devices a test creates (append started ones); closed at the end."""
    started: list[SipUA] = []
    try:
        yield started
    finally:
        for ua in started:
            await ua.close()


async def _phone(phones: list[SipUA], switch: SwitchProcess, extension: str,
                 register: bool = True) -> SipUA:
    ua = SipUA(extension, f"pw{extension}", switch.address())
    await ua.start()
    phones.append(ua)
    if register:
        response = await ua.register(expires=300)
        assert response is not None and response.status == 200, response
    return ua


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _warning(response: SipResponse | None) -> str:
    """The text of the response's ``Warning: 399 <realm> "..."`` header."""
    assert response is not None, "no final response"
    value = response.header("Warning")
    assert value is not None, f"no Warning header in {response.status} {response.reason}"
    match = re.fullmatch(r'399 (\S+) "(.*)"', value.strip())
    assert match is not None, f"not a 399 Warning: {value!r}"
    assert match.group(1) == REALM, value
    return match.group(2)


async def _refused(ua: SipUA, number: str, status: int) -> str:
    """Call ``number``; assert the switch refuses it with ``status``; its Warning text."""
    call = await ua.invite(number, timeout=WAIT_S)
    assert call.status == status, (number, call.final)
    text = _warning(call.final)
    assert text.startswith("Fair use: "), text
    assert call.final is not None and call.final.reason == text  # reason phrase = Warning
    return text


async def _answered(ua: SipUA, number: str) -> Call:
    call = await ua.invite(number, timeout=WAIT_S)
    assert call.status == 200, (ua.username, number, call.final)
    return call


async def _hang_up(*calls: Call) -> None:
    for call in calls:
        response = await call.bye(timeout=WAIT_S)
        assert response is not None and response.status == 200, response


async def _event(switch: SwitchProcess, name: str, predicate: Callable[[dict], bool] = bool,
                 timeout: float = WAIT_S) -> dict[str, Any] | None:
    """The first log event ``name`` matching ``predicate`` (bounded, without blocking the
    loop the peers run on)."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((e for e in switch.events(name) if predicate(e)), None)
        if found is not None or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.05)


def _invite_numbers(trunk: EmergencyTrunkUAS) -> list[str]:
    return [str(record.request.uri) for record in trunk.invites]


async def _record(endpoint: SipEndpoint, method: str, call_id: str,
                  timeout: float) -> RequestRecord | None:
    """The first ``method`` request of ``call_id`` the endpoint received (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        for record in endpoint.requests:
            if record.request.method == method and record.request.call_id == call_id:
                return record
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.02)


def _trunk_call_id(trunk: EmergencyTrunkUAS, number: str) -> list[str]:
    return [r.request.call_id for r in trunk.invites if number in str(r.request.uri)]


# --------------------------------------------------------------------------------------
# 1, 2: concurrency leases across two nodes sharing redis
# --------------------------------------------------------------------------------------


def _two_nodes(switches: Switches, redis_url: str) -> tuple[SwitchProcess, SwitchProcess]:
    prefix = f"fu-calls-{uuid.uuid4().hex[:8]}:"
    fair_use = {"lease_seconds": LEASE_S, "plans": {"two": {"concurrency": {"account": 2}}}}
    nodes = []
    for node_id in ("node-a", "node-b"):
        store = {"backend": "redis", "redis_url": redis_url, "key_prefix": prefix}
        nodes.append(switches.start(node_id, fair_use, store=store, node_id=node_id))
    return nodes[0], nodes[1]


CONCURRENCY_WARNING = "Fair use: the account's limit of 2 simultaneous calls is reached"


async def test_account_concurrency_limit_holds_across_two_nodes(
    switches: Switches, redis_server: str, trunk: EmergencyTrunkUAS, phones: list[SipUA]
) -> None:
    node_a, node_b = _two_nodes(switches, redis_server)
    a1 = await _phone(phones, node_a, "1000")
    b1 = await _phone(phones, node_b, "1001")
    a2 = await _phone(phones, node_a, "1002")
    b2 = await _phone(phones, node_b, "1003")

    first = await _answered(a1, "+33478000001")
    second = await _answered(b1, "+33478000002")
    assert len(trunk.answered) == 2  # both held up at the trunk

    assert await _refused(a2, "+33478000003", 503) == CONCURRENCY_WARNING  # on node A
    assert await _refused(b2, "+33478000004", 503) == CONCURRENCY_WARNING  # on node B
    assert len(trunk.invites) == 2, _invite_numbers(trunk)  # refusals never left
    for node in (node_a, node_b):
        refusal = await _event(node, "fairuse.refused")
        assert refusal is not None and refusal["limit"] == "concurrency_account", refusal
        assert refusal["status"] == 503

    await _hang_up(first)  # a slot comes free on node A: a call on node B takes it
    third = await _answered(b2, "+33478000005")
    assert len(trunk.invites) == 3
    assert await _refused(a2, "+33478000006", 503) == CONCURRENCY_WARNING
    await _hang_up(second, third)
    fourth = await _answered(a2, "+33478000007")
    await _hang_up(fourth)


async def test_killed_node_frees_its_slot_when_its_lease_lapses(
    switches: Switches, redis_server: str, trunk: EmergencyTrunkUAS, phones: list[SipUA]
) -> None:
    node_a, node_b = _two_nodes(switches, redis_server)
    a1 = await _phone(phones, node_a, "1000")
    b1 = await _phone(phones, node_b, "1001")
    b2 = await _phone(phones, node_b, "1002")
    await _answered(a1, "+33478000011")
    held = await _answered(b1, "+33478000012")
    assert await _refused(b2, "+33478000013", 503) == CONCURRENCY_WARNING

    os.kill(node_a.pid, signal.SIGKILL)  # no BYE, no release, no more lease refreshes
    killed_at = time.monotonic()
    assert node_a.process is not None and node_a.process.wait(timeout=WAIT_S) == -9
    # right after the crash its lease is still held: the slot is not free yet
    assert await _refused(b2, "+33478000014", 503) == CONCURRENCY_WARNING
    assert time.monotonic() - killed_at < LEASE_S / 2

    admitted: Call | None = None
    attempts = 0
    while time.monotonic() - killed_at < LEASE_S + LAPSE_MARGIN_S + 2.0:
        attempts += 1
        call = await b2.invite(f"+3347800010{attempts % 10}", timeout=WAIT_S)
        if call.status == 200:
            admitted = call
            break
        assert call.status == 503 and _warning(call.final) == CONCURRENCY_WARNING, call.final
        await asyncio.sleep(0.2)
    freed_after = time.monotonic() - killed_at
    assert admitted is not None, f"no call admitted {freed_after:.1f} s after the kill"
    assert freed_after <= LEASE_S + LAPSE_MARGIN_S, f"slot freed after {freed_after:.2f} s"
    # the survivor's own call kept its lease: the account is full again
    assert await _refused(b2, "+33478000020", 503) == CONCURRENCY_WARNING
    await _hang_up(held, admitted)


# --------------------------------------------------------------------------------------
# 3: duration caps, voice and fax
# --------------------------------------------------------------------------------------


def _t38_offer(host: str, port: int) -> bytes:
    lines = [
        "v=0", "o=- 7 3 IN IP4 " + host, "s=-", "c=IN IP4 " + host, "t=0 0",
        f"m=image {port} udptl t38", "a=T38FaxVersion:0", "a=T38MaxBitRate:14400",
        "a=T38FaxRateManagement:transferredTCF", "a=T38FaxUdpEC:t38UDPRedundancy",
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n").encode()


async def _cut(ua: SipUA, call: Call, answered_at: float, kind: str) -> None:
    """The switch ends ``call`` ~CAP_S after its answer: BYE to the caller with the
    Reason naming the cap, after a MESSAGE warning to the caller."""
    reason = f'SIP;cause=200;text="Fair use: maximum {kind} call duration ({CAP_S} s) reached"'
    caller_bye = await _record(ua, "BYE", call.call_id, CAP_S + 3.0)
    assert caller_bye is not None, f"{kind}: no BYE to the caller"
    assert caller_bye.request.header("Reason") == reason
    elapsed = caller_bye.at - answered_at
    assert CAP_S - 0.5 <= elapsed <= CAP_S + 1.5, f"{kind}: BYE {elapsed:.2f} s after answer"
    messages = [r for r in ua.requests if r.request.method == "MESSAGE"]
    assert len(messages) == 1, [r.request.body for r in messages]
    warning = messages[0]
    assert warning.at < caller_bye.at
    assert b"will be ended in 1 s" in warning.request.body, warning.request.body
    assert CAP_S - 1.5 <= warning.at - answered_at <= CAP_S + 0.5


@pytest.mark.timeout(CAP_S + 30)
async def test_duration_caps_end_voice_and_fax_calls_on_both_legs(
    switches: Switches, trunk: EmergencyTrunkUAS, phones: list[SipUA]
) -> None:
    fair_use = {"devices": {
        "1000": {"duration": {"voice": CAP_S, "fax": CAP_S, "warning_before": 1}},
        "1001": {"duration": {"voice": 3600, "fax": CAP_S, "warning_before": 1}},
    }}  # fmt: skip
    switch = switches.start("duration", fair_use)
    voice_ua = await _phone(phones, switch, "1000")
    fax_ua = await _phone(phones, switch, "1001")

    voice = await _answered(voice_ua, "+33478000031")
    voice_at = time.monotonic()
    fax = await _answered(fax_ua, "+33478000032")
    fax_at = time.monotonic()
    response = await fax.reinvite(_t38_offer(fax_ua.host, fax_ua.rtp_port), timeout=WAIT_S)
    assert response is not None and response.status == 200, response
    reinvite = await trunk.wait_request("INVITE", timeout=WAIT_S)  # first: initial INVITEs
    while reinvite is not None and not reinvite.request.to.tag:
        reinvite = await trunk.wait_request("INVITE", timeout=WAIT_S)
    assert reinvite is not None and b"m=image" in reinvite.request.body  # relayed

    # BYE to the callers with the Reason, after the warning MESSAGE
    await asyncio.gather(_cut(voice_ua, voice, voice_at, "voice"),
                         _cut(fax_ua, fax, fax_at, "fax"))
    # BYE to the trunk leg of each call, with the same Reason
    for number, kind, answered_at in (("+33478000031", "voice", voice_at),
                                      ("+33478000032", "fax", fax_at)):
        (trunk_call_id,) = _trunk_call_id(trunk, number)
        bye = await _record(trunk, "BYE", trunk_call_id, WAIT_S)
        assert bye is not None, f"{kind}: no BYE to the trunk"
        assert bye.request.header("Reason") == (
            f'SIP;cause=200;text="Fair use: maximum {kind} call duration ({CAP_S} s) reached"')
        assert CAP_S - 0.5 <= bye.at - answered_at <= CAP_S + 1.5
    await _event(switch, "fairuse.duration_cut", lambda e: e.get("kind") == "fax")
    await _event(switch, "fairuse.duration_cut", lambda e: e.get("kind") == "voice")
    cuts = [(e["kind"], e["seconds"]) for e in switch.events("fairuse.duration_cut")]
    assert sorted(cuts) == [("fax", CAP_S), ("voice", CAP_S)], cuts


# --------------------------------------------------------------------------------------
# 4: destinations
# --------------------------------------------------------------------------------------


async def test_destination_rules_refuse_premium_international_and_blacklisted(
    switches: Switches, trunk: EmergencyTrunkUAS, phones: list[SipUA]
) -> None:
    fair_use = {"accounts": {
        "world": {"destinations": {"international": True}},
        "havana": {"destinations": {"international": True},
                   "blacklist_exceptions": {"countries": ["CU"]}},
    }}  # fmt: skip
    switch = switches.start("destinations", fair_use, devices=["1000"],
                            accounts=[_account("world", ["2000"]),
                                      _account("havana", ["3000"])])
    local = await _phone(phones, switch, "1000")  # account itest: the default plan
    world = await _phone(phones, switch, "2000")
    havana = await _phone(phones, switch, "3000")

    text = await _refused(local, PREMIUM, 403)
    assert "premium" in text, text
    text = await _refused(local, UK_FIXED, 403)
    assert "international" in text and "GB" in text, text
    text = await _refused(world, CUBA_FIXED, 403)
    assert "CU" in text and "barred" in text, text
    assert trunk.invites == []  # nothing refused reached the trunk

    calls = [await _answered(local, NATIONAL), await _answered(world, UK_FIXED),
             await _answered(havana, CUBA_FIXED)]
    numbers = _invite_numbers(trunk)
    assert len(numbers) == 3, numbers
    for number, uri in zip((NATIONAL, UK_FIXED, CUBA_FIXED), numbers, strict=True):
        assert number in uri, (number, uri)
    assert not any(PREMIUM in uri for uri in numbers)
    await _hang_up(*calls)
    await _event(switch, "fairuse.refused",
                 lambda e: e.get("limit") == "destination_blacklist_country")
    limits = [e["limit"] for e in switch.events("fairuse.refused")]
    assert limits == ["destination_premium", "destination_international",
                      "destination_blacklist_country"], limits


# --------------------------------------------------------------------------------------
# 5: minute quotas; internal and emergency calls
# --------------------------------------------------------------------------------------


async def test_line_quota_refuses_external_calls_but_not_internal_or_emergency(
    switches: Switches, trunk: EmergencyTrunkUAS, phones: list[SipUA]
) -> None:
    # one minute per line, and any answered call bills at least one minute
    fair_use = {"plans": {"tiny": {"minutes": {
        "per_line": 1, "pooled_per_user": None, "per_account": None,
        "minimum": 60, "increment": 6, "refuse_at_critical": True,
    }}}}  # fmt: skip
    switch = switches.start("quota", fair_use, devices=["1000", "1001", "1002"])
    heavy = await _phone(phones, switch, "1000")
    colleague = await _phone(phones, switch, "1001")
    other = await _phone(phones, switch, "1002")

    first = await _answered(heavy, "+33478000041")
    await asyncio.sleep(0.3)
    await _hang_up(first)
    ended = await _event(switch, "call.ended", lambda e: e.get("call_id") == first.call_id)
    assert ended is not None

    text = await _refused(heavy, "+33478000042", 403)
    assert text == "Fair use: monthly minutes of this line used up", text
    assert len(trunk.invites) == 1  # the refused call never left
    refusal = await _event(switch, "fairuse.refused")
    assert refusal is not None and refusal["limit"] == "quota_line", refusal
    alert = await _event(switch, "fairuse.alert", lambda e: e.get("limit") == "quota_line")
    assert alert is not None and "100%" in alert["message"], alert

    internal = await _answered(heavy, colleague.username)  # internal: no quota
    assert len(colleague.incoming_calls) == 1
    await _hang_up(internal)
    assert len(trunk.invites) == 1

    emergency = await _answered(heavy, "112")  # never refused, even over quota
    assert len(trunk.invites) == 2
    assert "112" in str(trunk.invites[-1].request.uri) or "sos" in str(
        trunk.invites[-1].request.uri)
    await _hang_up(emergency)

    # an emergency call counts against no quota: a line whose only call was one can
    # still call out, though a counted call would have used its whole minute
    rescue = await _answered(other, "112")
    await asyncio.sleep(0.3)
    await _hang_up(rescue)
    ended = await _event(switch, "call.ended", lambda e: e.get("call_id") == rescue.call_id)
    assert ended is not None
    after = await _answered(other, "+33478000043")
    await _hang_up(after)
    assert len(trunk.invites) == 4
    refused = [e["limit"] for e in switch.events("fairuse.refused")]
    assert refused == ["quota_line"], refused
    # the alert's own level (critical) is in the log event, not only in its message
    alerts = [(e["limit"], e["alert_level"]) for e in switch.events("fairuse.alert")]
    assert alerts == [("quota_line", "critical")], alerts


# --------------------------------------------------------------------------------------
# 6: an autodialler from SIPp
# --------------------------------------------------------------------------------------

DIALLER_CALLS = 12
SEQUENTIAL_WARNING = 3
SEQUENTIAL_CRITICAL = 6
FIRST_NUMBER = 33478000100  # +33 4 78 00 01 00, then +1 each call


def _sipp_responses(workdir: Path, status: int) -> dict[str, str]:
    """Call-ID → Warning of every ``status`` response SIPp's message trace received."""
    found: dict[str, str] = {}
    for path in sorted(workdir.glob("*_messages.log")):
        for entry in re.split(r"^-{5,} .*$", path.read_text(errors="replace"), flags=re.M):
            head, _, message = entry.strip().partition("\n")
            message = message.lstrip("\r\n")
            if "message received" not in head or not message.startswith(f"SIP/2.0 {status} "):
                continue
            call_id = re.search(r"^(?:Call-ID|i):\s*(\S+)", message, re.M | re.I)
            warning = re.search(r"^Warning:\s*(.*)$", message, re.M | re.I)
            if call_id is not None:
                found[call_id.group(1)] = warning.group(1).strip() if warning else ""
    return found


async def test_autodialler_raises_the_sequential_warning_then_critical(
    switches: Switches, trunk: EmergencyTrunkUAS, phones: list[SipUA], tmp_path: Path
) -> None:
    fair_use = {"plans": {"dialler": {"patterns": {
        "sequential": {"warning": SEQUENTIAL_WARNING, "critical": SEQUENTIAL_CRITICAL,
                       "refuse": True},
        "calls_per_second": {"warning": 100, "critical": 200},
        "calls_per_minute": {"warning": 500, "critical": 1000},
    }}}}  # fmt: skip
    switch = switches.start("dialler", fair_use, devices=["1000"])
    await _phone(phones, switch, "1000")  # registered, as a real dialler's line would be
    injection = tmp_path / "numbers.csv"
    injection.write_text("SEQUENTIAL\n" + "".join(
        f"1000;pw1000;{LOOPBACK_V4};[authentication username=1000 password=pw1000];"
        f"+{FIRST_NUMBER + i}\n" for i in range(DIALLER_CALLS)))
    sipp = launch_sipp(tmp_path, "dialler", "uac_call_out.xml", target=switch.address(),
                       calls=DIALLER_CALLS, rate=10, injection=injection,
                       keys={"identity_header": "X-Identity-Test: none"}, wall_s=20.0)
    try:
        code = await asyncio.to_thread(sipp.wait, 20.0)
    finally:
        sipp.stop()
    assert code == 0, sipp.describe()

    admitted = SEQUENTIAL_CRITICAL - 1  # attempt n has a run of n consecutive numbers
    numbers = _invite_numbers(trunk)
    assert len(numbers) == admitted, numbers
    for index, uri in enumerate(numbers):
        assert f"+{FIRST_NUMBER + index}@" in uri, (index, uri)
    refusals = _sipp_responses(sipp.workdir, 403)
    assert len(refusals) == DIALLER_CALLS - admitted, refusals
    for warning in refusals.values():
        assert "Fair use: sequential dialling detected" in warning, warning

    refused = switch.events("fairuse.refused")
    assert [e["limit"] for e in refused] == ["pattern_sequential"] * (DIALLER_CALLS - admitted)
    assert {e["status"] for e in refused} == {403}
    alerts = switch.events("fairuse.alert")
    assert [e["limit"] for e in alerts] == ["pattern_sequential"] * 2, alerts
    assert [e["threshold"] for e in alerts] == [SEQUENTIAL_WARNING, SEQUENTIAL_CRITICAL]
    # warning, then critical: the alert's level as the log event gives it
    assert [e["alert_level"] for e in alerts] == ["warning", "critical"], alerts


# --------------------------------------------------------------------------------------
# 7: Redis unreachable: local counters, never a crash, emergency calls untouched
# --------------------------------------------------------------------------------------


async def test_with_redis_down_calls_go_on_with_local_counters(
    switches: Switches, trunk: EmergencyTrunkUAS, phones: list[SipUA], tmp_path: Path,
) -> None:
    """The switch's fair-use store loses Redis mid-service: it says so in its log, keeps
    admitting calls on this node's own counters (the account limit still holds locally)
    and an emergency call still goes out."""
    import shutil

    from conftest import _start_redis, _stop

    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is missing: `make test` installs it"
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    process, port = _start_redis(binary, redis_dir)
    try:
        store = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
                 "key_prefix": f"fu-down-{uuid.uuid4().hex[:8]}:"}
        fair_use = {"plans": {"one": {"concurrency": {"account": 1}}}}
        # bindings live in Redis too: both phones register while it is up
        node = switches.start("redis-down", fair_use, store=store)
        caller = await _phone(phones, node, "1000")
        await _phone(phones, node, "1001")
        _stop(process)  # Redis is gone, by PID
        first = await caller.invite(NATIONAL, timeout=WAIT_S)
        assert first.status == 200, first.final
        node.wait_for_event("fairuse.redis_unreachable", timeout=WAIT_S)
        second = await _phone(phones, node, "1002", register=False)
        refused = await second.invite(NATIONAL, timeout=WAIT_S)
        assert refused.status == 503, refused.final  # the limit of 1 holds on local counters
        emergency = await second.invite("112", timeout=WAIT_S)
        assert emergency.status == 200, emergency.final
        assert node.process is not None and node.process.poll() is None
        await first.bye()
        await emergency.bye()
    finally:
        _stop(process)

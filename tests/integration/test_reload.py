"""Hot reload (SIGHUP): a valid configuration is applied without dropping registrations
or calls; an invalid one changes nothing and its errors are logged; emergency numbers
added to the operator's numbers file are routable after the reload, with no restart
(EMERGENCY.md EM-04)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from switch_process import SipDevice, SwitchProcess, free_port, prepare_switch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SITE = {
    "id": "lyon", "country": "FR",
    "address": {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
                "HNO": "10", "PC": "69002"},
    "callback_number": "+33478000100", "routes": ["nat"],
    "locations": [{"id": "b312", "FLR": "3", "ROOM": "B312"}],
}  # fmt: skip
ALICE = SipDevice("101", "pw101-secret", {"site": "lyon", "location": "b312",
                                          "display_name": "Alice"})
BOB = SipDevice("102", "pw102-secret", {"site": "lyon", "location": "b312",
                                        "display_name": "Bob"})


def _sections(trunk_port: int, numbers_file: Path) -> dict:
    return {
        "media": {"backend": "none"},
        "dialplan": {"country": "FR"},
        "trunks": [{"id": "nat", "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {"numbers_file": str(numbers_file), "route_timeout": 2,
                      "sites": [SITE]},
    }


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[SwitchProcess, EmergencyTrunkUAS, Path]]:
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("FR:\n  emergency: []\n")
    trunk_port = free_port("udp", TRUNK_HOST)
    process = prepare_switch(tmp_path / "switch", [ALICE], tcp=False,
                             sections=_sections(trunk_port, numbers))
    process.start()
    try:
        async with EmergencyTrunkUAS([200], port=trunk_port) as trunk:
            yield process, trunk, numbers
    finally:
        process.stop()


def _sighup(process: SwitchProcess, count: int) -> list[dict]:
    os.kill(process.pid, signal.SIGHUP)
    return process.wait_for_event("switch.reloaded", count=count, timeout=10)


async def test_a_number_added_to_the_numbers_file_is_an_emergency_number_after_sighup(
    setup: tuple[SwitchProcess, EmergencyTrunkUAS, Path],
) -> None:
    process, trunk, numbers = setup
    async with SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
        assert (await alice.register(expires=60)).status == 200
        before = await alice.invite("3999", timeout=8)
        # not an emergency number yet: an ordinary short number, no emergency treatment
        assert not process.events("emergency.call"), before.status
        if before.answered:
            await before.bye()
        numbers.write_text("FR:\n  emergency: ['3999']\n")
        _sighup(process, 1)
        after = await alice.invite("3999", timeout=8)
        assert after.status == 200, after.final
        calls = process.events("emergency.call")
        assert len(calls) == 1 and calls[0]["number_class"] == "emergency"
        invites = [record for record in trunk.invites if "3999" in str(record[2].uri)]
        assert invites and str(invites[-1][2].uri).startswith("sip:3999@")
        await after.bye()


async def test_a_valid_reload_adds_a_device_and_keeps_registrations(
    setup: tuple[SwitchProcess, EmergencyTrunkUAS, Path],
) -> None:
    process, _trunk, _numbers = setup
    async with SipUA(ALICE.extension, ALICE.password, process.address()) as alice, \
            SipUA(BOB.extension, BOB.password, process.address()) as bob:
        assert (await alice.register(expires=60)).status == 200
        refused = await bob.register(expires=60)
        assert refused is not None and refused.status in (401, 403)  # unknown yet
        text = process.config_path.read_text()
        line = next(li for li in text.splitlines() if '"101"' in li)
        bob_line = line.replace('"101"', '"102"').replace("pw101-secret", "pw102-secret")
        bob_line = bob_line.replace('"Alice"', '"Bob"')
        process.config_path.write_text(text.replace(line, f"{line}\n{bob_line}"))
        _sighup(process, 1)
        assert (await bob.register(expires=60)).status == 200
        # Alice's binding survived the reload: Bob can call her without her re-registering
        call = await bob.invite("101", timeout=8)
        assert call.status == 200, call.final
        await call.bye()


async def test_an_invalid_reload_changes_nothing_and_logs_its_errors(
    setup: tuple[SwitchProcess, EmergencyTrunkUAS, Path],
) -> None:
    process, _trunk, _numbers = setup
    good = process.config_path.read_text()
    process.config_path.write_text(good.replace('"101"', '"1x1"', 1))
    os.kill(process.pid, signal.SIGHUP)
    refused = process.wait_for_event("switch.reload_refused", timeout=10)
    assert any(":" in error and "extension" in error for error in refused[0]["errors"]), refused
    assert not process.events("switch.reloaded")
    async with SipUA(ALICE.extension, ALICE.password, process.address()) as alice:
        assert (await alice.register(expires=60)).status == 200  # the old config still runs
    assert process.process is not None and process.process.poll() is None
    # every error is `file:line: key: problem`
    assert all(error.split(":")[0].endswith("switch.yaml") and error.split(":")[1].isdigit()
               for error in refused[0]["errors"]), refused

"""An emergency trunk reachable only over UDP while configured for TLS: the call falls
back at once (RFC 6881 SP-30, EMERGENCY.md EM-30) and the audit journal records the
failed transports; the same trunk for an ordinary call just fails."""

from __future__ import annotations

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

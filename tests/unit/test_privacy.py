"""A person's data (switch/privacy.py): who a device username or an E.164 number is in
the switch's records, the export of their CDRs, location history and emergency calls, and
erasure by keyed pseudonymisation of the CDR ledger and the location journal — offline,
and against a ledger that keeps appending — while the hash-chained emergency audit
journal stays byte for byte as it was."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from e911.audit import EmergencyJournal, journal_files, verify
from switch.cdr import CallRecord, CdrLedger
from switch.cli import main
from switch.privacy import (
    KEY_NAME,
    PrivacyBusyError,
    PrivacyError,
    erase,
    erase_running,
    export,
    identify,
)
from switch.settings import Settings, load_settings_text

T0 = 1_773_144_000.0  # 2026-03-10T12:00:00Z
ALICE_DID = "+33478000101"
OUTSIDE = "+33612345678"  # a mobile number Alice called and that called her

CONFIG = """\
switch:
  node_id: t
listen:
  - {{transport: udp, host: 127.0.0.1, port: 5060}}
cdr:
  directory: {state}/cdr
emergency:
  journal_dir: {state}/emergency
dialplan:
  country: FR
  outside_line_prefix: "0"
trunks:
  - id: ops
    kind: peer
    host: 127.0.0.2
    addresses: [127.0.0.2/32]
    dids: {{"+33478000199": "acme/101"}}
accounts:
  - id: acme
    devices:
      - {{extension: "101", username: alice, password: secret-alice-1, did: "{did}",
         display_name: Alice Martin}}
      - {{extension: "102", username: bob, password: secret-bob-12}}
  - id: other
    devices:
      - {{extension: "101", username: carol, password: secret-carol-1}}
"""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    text = CONFIG.format(state=tmp_path / "var", did=ALICE_DID)
    return load_settings_text(text, str(tmp_path / "switch.yaml"))


def record(call_id: str, *, account: str = "acme", device: str = "101", caller: str = "101",
           dialled: str = "102", e164: str | None = None, classification: str = "internal",
           start: float = T0) -> CallRecord:
    return CallRecord.for_call(
        call_id=call_id, account=account, device=device, caller=caller,
        callee_dialled=dialled, callee_e164=e164, classification=classification,
        trunk=None if classification == "internal" else "ops", start=start,
        answer=start + 2, end=start + 62, end_cause="normal", hangup_by="caller",
        sip_status=200, node="t")


ALICE_CALLS = [
    record("out-national", dialled="0612345678", e164=OUTSIDE, classification="external"),
    record("alice-to-bob"),
    record("bob-to-alice", device="102", caller="102", dialled="101"),
    record("inbound", caller=OUTSIDE, dialled=ALICE_DID, classification="external"),
]
OTHERS = [
    record("bob-to-outside", device="102", caller="102", dialled="0699999999",
           e164="+33699999999", classification="external"),
    record("carol-internal", account="other", device="101", caller="101", dialled="103"),
]


async def write_ledger(settings: Settings, records: list[CallRecord]) -> CdrLedger:
    ledger = CdrLedger(settings.cdr.directory, fsync=False)
    ledger.open()
    for entry in records:
        await ledger.append(entry)
    await ledger.close()
    return ledger


def write_locations(settings: Settings) -> Path:
    path = Path(settings.emergency.journal_dir) / "locations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [
        {"when": "2026-03-10T12:00:00.000Z", "ts": T0, "username": "alice", "who": "registrar",
         "reason": "register", "old": "HQ", "old_status": "verified", "new": "HQ, floor 2",
         "status": "verified", "site_id": "hq", "location_id": "f2",
         "source_ip": "192.0.2.10", "config": ["hq", None]},
        {"when": "2026-03-10T12:05:00.000Z", "ts": T0 + 300, "username": "bob",
         "who": "admin:ops", "reason": "confirm", "old": "HQ", "old_status": "default",
         "new": "HQ", "status": "verified", "site_id": "hq", "location_id": None,
         "source_ip": None, "config": [None, None]},
        {"when": "2026-03-10T12:10:00.000Z", "ts": T0 + 600, "username": "alice",
         "who": "alice", "reason": "confirm", "old": "HQ, floor 2", "old_status": "verified",
         "new": "HQ", "status": "verified", "site_id": "hq", "location_id": None,
         "source_ip": "192.0.2.11", "config": ["hq", None]},
    ]
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    return path


def write_emergency(settings: Settings) -> Path:
    directory = Path(settings.emergency.journal_dir)
    journal = EmergencyJournal(directory, fsync=False)
    journal.open()
    journal.record("sos-alice", "classified", device="alice", extension="101",
                   account="acme", dialled="112", number_class="emergency")
    journal.record("sos-alice", "ended", cause="normal", outcome="answered")
    journal.record("sos-bob", "classified", device="bob", extension="102", account="acme",
                   dialled="112", number_class="emergency")
    journal.close()
    return directory


def ledger_lines(settings: Settings) -> list[dict]:
    lines = []
    for path in CdrLedger(settings.cdr.directory).files():
        lines += [json.loads(line) for line in path.read_bytes().splitlines()]
    return lines


# ---- who -------------------------------------------------------------------------------


def test_a_username_and_a_did_name_the_same_device(settings: Settings) -> None:
    alice = identify(settings, "alice")
    assert alice.kind == "device" and alice.lines == {("acme", "101")}
    assert alice.numbers == {ALICE_DID, "+33478000199"}  # her DID and the trunk's DID to her
    (device,) = alice.devices
    assert device["display_name"] == "Alice Martin" and "password" not in device
    by_number = identify(settings, ALICE_DID)
    assert by_number.kind == "number" and by_number.usernames == {"alice"}
    outsider = identify(settings, OUTSIDE)
    assert outsider.kind == "number" and not outsider.devices and not outsider.lines
    assert identify(settings, "dave").kind == "username"
    for bad in ("", "a b", "x" * 65, "sip:alice@example.com", "<alice>"):
        with pytest.raises(PrivacyError, match="not a device username or an E.164"):
            identify(settings, bad)


def test_dialled_forms_of_a_number_are_recognised(settings: Settings) -> None:
    outsider = identify(settings, OUTSIDE)
    for dialled in (OUTSIDE, "0612345678", "00612345678"):
        assert outsider.dialled_matches("acme", dialled), dialled
    for dialled in ("0612345679", "101", "112", "*21#"):
        assert not outsider.dialled_matches("acme", dialled), dialled


# ---- export ------------------------------------------------------------------------------


async def test_export_gathers_cdrs_locations_and_emergency_calls(settings: Settings) -> None:
    await write_ledger(settings, ALICE_CALLS + OTHERS)
    write_locations(settings)
    write_emergency(settings)
    document = export(settings, "alice", now=T0)
    assert document["person"] == "alice" and document["generated"].startswith("2026-03-10")
    assert sorted(r["call_id"] for r in document["cdrs"]) == sorted(
        r.call_id for r in ALICE_CALLS)  # not Carol's extension 101 in another account
    assert [e["ts"] for e in document["location_history"]] == [T0, T0 + 600]
    assert {e["call_id"] for e in document["emergency_calls"]} == {"sos-alice"}
    assert len(document["emergency_calls"]) == 2
    assert document["registrations"] is None and any(
        "running switch" in note for note in document["notes"])
    json.dumps(document)  # a JSON document
    outsider = export(settings, OUTSIDE)
    assert sorted(r["call_id"] for r in outsider["cdrs"]) == ["inbound", "out-national"]
    assert outsider["location_history"] == [] and outsider["emergency_calls"] == []


# ---- erasure -----------------------------------------------------------------------------


async def test_erase_pseudonymises_cdrs_and_locations_and_keeps_the_emergency_journal(
    settings: Settings,
) -> None:
    await write_ledger(settings, ALICE_CALLS + OTHERS)
    locations = write_locations(settings)
    emergency = write_emergency(settings)
    journal_bytes = [p.read_bytes() for p in journal_files(emergency)]
    before = ledger_lines(settings)
    files_before = {p: p.read_bytes() for p in CdrLedger(settings.cdr.directory).files()}

    dry = erase(settings, "alice", dry_run=True)
    assert dry["dry_run"] is True and dry["cdr"]["records"] == 4
    assert dry["location_history"]["entries"] == 2
    assert {p: p.read_bytes() for p in files_before} == files_before  # nothing written
    assert not (settings.cdr.directory.parent / KEY_NAME).exists()

    report = erase(settings, "alice")
    assert report["cdr"]["records"] == 4 and report["cdr"]["fields"] >= 6
    assert report["emergency_journal"] == {
        "erased": False, "entries_kept": 2, "reason": report["emergency_journal"]["reason"]}
    assert "legal" in report["emergency_journal"]["reason"]
    key = settings.cdr.directory.parent / KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    after = ledger_lines(settings)
    assert [r["call_id"] for r in after] == [r["call_id"] for r in before]
    hers = json.dumps([r for r in after if r["call_id"] in {c.call_id for c in ALICE_CALLS}])
    assert ALICE_DID not in hers and '"101"' not in hers
    by_id = {r["call_id"]: r for r in after}
    line = by_id["alice-to-bob"]["device"]
    assert line.startswith("anon-") and by_id["alice-to-bob"]["caller"] == line
    assert by_id["bob-to-alice"]["callee_dialled"] == line  # her extension, dialled by Bob
    assert by_id["bob-to-alice"]["device"] == "102"  # Bob's own data stays
    assert by_id["inbound"]["callee_dialled"].startswith("anon-")
    assert by_id["inbound"]["caller"] == OUTSIDE  # the other party is another person
    assert by_id["out-national"]["callee_e164"] == OUTSIDE
    # records that are not hers are unchanged, and every line is still a valid CDR
    assert by_id["bob-to-outside"] == {r["call_id"]: r for r in before}["bob-to-outside"]
    assert by_id["carol-internal"]["device"] == "101"
    assert len(list(CdrLedger(settings.cdr.directory).read())) == 6

    entries = [json.loads(x) for x in locations.read_text().splitlines()]
    assert [e["username"] == "bob" for e in entries] == [False, True, False]
    assert entries[0]["username"].startswith("anon-") and entries[2]["who"] == \
        entries[2]["username"]
    assert entries[0]["source_ip"] is None and entries[1]["who"] == "admin:ops"
    assert entries[0]["site_id"] == "hq"  # the site (a business address) stays

    assert [p.read_bytes() for p in journal_files(emergency)] == journal_bytes
    assert verify(emergency) == []

    # erasing again finds nothing left; erasing the outside number uses the same key
    again = erase(settings, "alice")
    assert again["cdr"]["records"] == 0 and again["location_history"]["entries"] == 0
    outsider = erase(settings, OUTSIDE)
    assert outsider["cdr"]["records"] == 2  # her two calls with it, whatever the form
    final = {r["call_id"]: r for r in ledger_lines(settings)}
    assert final["inbound"]["caller"].startswith("anon-")
    assert final["out-national"]["callee_e164"] == final["inbound"]["caller"]
    assert final["out-national"]["callee_dialled"] == final["inbound"]["caller"]


async def test_erase_offline_refuses_while_a_switch_holds_the_ledger(settings: Settings) -> None:
    ledger = CdrLedger(settings.cdr.directory, fsync=False)
    ledger.open()
    try:
        await ledger.append(ALICE_CALLS[0])
        with pytest.raises(PrivacyBusyError, match="admin API"):
            erase(settings, "alice")
    finally:
        await ledger.close()
    assert erase(settings, "alice")["cdr"]["records"] == 1


async def test_erase_running_rewrites_while_calls_keep_appending(settings: Settings) -> None:
    await write_ledger(settings, ALICE_CALLS[:2])  # an older file...
    ledger = CdrLedger(settings.cdr.directory, fsync=False, rotate_bytes=4096)
    ledger.open()
    switch = SimpleNamespace(settings=settings, ledger=ledger)
    try:
        for n in range(12):  # ...rotated a few times, the last file being appended to
            await ledger.append(record(f"fill-{n}", dialled=f"10{n % 3 + 1}"))
        assert len(ledger.files()) >= 2
        appends = [asyncio.create_task(ledger.append(record(f"during-{n}")))
                   for n in range(5)]
        report = await erase_running(switch, "alice")  # type: ignore[arg-type]
        await asyncio.gather(*appends)
        await ledger.append(record("after", device="102", caller="102", dialled="101"))
    finally:
        await ledger.close()
    lines = ledger_lines(settings)
    ids = [r["call_id"] for r in lines]
    assert len(ids) == 2 + 12 + 5 + 1 and len(set(ids)) == len(ids)
    assert "after" in ids and all(f"during-{n}" in ids for n in range(5))
    erased = [r for r in lines if r["call_id"] in {"out-national", "alice-to-bob"}
              or r["call_id"].startswith("fill-")]
    assert all(r["device"].startswith("anon-") for r in erased)
    assert report["cdr"]["records"] >= 14
    # what was appended after the erasure keeps its data (it needs its own erasure)
    assert {r["call_id"]: r for r in lines}["after"]["callee_dialled"] == "101"


# ---- the command line ----------------------------------------------------------------------


async def test_cli_privacy_export_and_erase_offline(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "switch.yaml"
    config.write_text(CONFIG.format(state=tmp_path / "var", did=ALICE_DID))
    await write_ledger(settings, ALICE_CALLS + OTHERS)
    write_emergency(settings)
    files = {p: p.read_bytes() for p in CdrLedger(settings.cdr.directory).files()}

    out = tmp_path / "alice.json"
    assert main(["privacy", "export", "alice", "-c", str(config), "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["cdrs"]) == 4
    assert "4 CDRs" in capsys.readouterr().err

    assert main(["privacy", "erase", "alice", "-c", str(config)]) == 0  # no --yes: dry run
    captured = capsys.readouterr()
    assert "would pseudonymise 4 CDRs" in captured.out and "--yes" in captured.err
    assert {p: p.read_bytes() for p in files} == files

    assert main(["privacy", "erase", "alice", "-c", str(config), "--yes"]) == 0
    captured = capsys.readouterr()
    assert "pseudonymised 4 CDRs" in captured.out and "2 entries kept" in captured.out
    assert {p: p.read_bytes() for p in files} != files

    assert main(["privacy", "erase", "not a person", "-c", str(config), "--yes"]) == 2
    assert "not a device username or an E.164" in capsys.readouterr().err

"""``python -m switch usage ACCOUNT``: an operator's view of one account's fair use, the
concurrent calls (SIP dialogs holding leases), the billable minutes of each line and of
the account this month, and the call-pattern alerts, from the CDR ledger (memory store)
or from a real redis-server shared with the switch nodes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from conftest import free_port

from fairuse.store import RedisFairUseStore
from switch.cdr import CallRecord, CdrLedger
from switch.cli import main

MONTH = "2026-03"
T0 = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC).timestamp()

CONFIG = """\
switch:
  node_id: node-t
listen:
  - {{transport: udp, host: 127.0.0.1, port: 5060}}
store:
{store}
cdr:
  directory: cdr
dialplan:
  country: FR
accounts:
  - id: acme
    name: Acme Ltd
    devices:
      - {{extension: "101", username: alice, password: pw-101-secret}}
      - {{extension: "102", password: pw-102-secret}}
  - id: globex
    devices:
      - {{extension: "200", password: pw-200-secret}}
fair_use:
  plans:
    small:
      concurrency: {{account: 10, device: 3}}
      minutes: {{per_line: 100, pooled_per_user: 50, per_account: 1000}}
  devices:
    alice: {{minutes_per_line: 1}}
"""


def write_config(tmp_path: Path, store: str = "  backend: memory") -> Path:
    path = tmp_path / "switch.yaml"
    path.write_text(CONFIG.format(store=store))
    return path


def record(call_id: str, device: str, start: float, talk: float | None, *,
           account: str = "acme", callee: str = "+33140000001",
           classification: str = "external", caller: str | None = None) -> CallRecord:
    answer = None if talk is None else start + 2.0
    end = start + 5.0 if answer is None else answer + (talk or 0.0)
    return CallRecord.for_call(
        call_id=call_id, account=account, device=device, caller=caller or device,
        callee_dialled=callee, callee_e164=callee if callee.startswith("+") else None,
        classification=classification, trunk="orange", start=start, answer=answer,
        end=end, end_cause="normal" if answer else "no_answer", hangup_by="caller",
        sip_status=200 if answer else 403,
    )  # fmt: skip


def write_ledger(directory: Path, records: list[CallRecord]) -> None:
    clock = [0.0]  # the switch writes a record when its call ends

    async def append() -> None:
        async with CdrLedger(directory, fsync=False, clock=lambda: clock[0]) as ledger:
            for item in sorted(records, key=lambda r: r.end):
                clock[0] = item.end
                await ledger.append(item)

    asyncio.run(append())


MARCH = [
    record("a", "101", T0, 60.0),  # alice: 60 s
    record("b", "101", T0 + 100, 7.0),  # alice: billed 18 s (minimum)
    record("c", "102", T0 + 200, 30.0),  # 102: 30 s
    record("d", "101", T0 + 300, None),  # refused: nothing billed
    record("e", "101", T0 + 400, 120.0, callee="102", classification="internal"),
    record("f", "101", T0 + 500, 600.0, callee="112", classification="emergency"),
    record("g", "102", T0 + 600, 100.0, callee="+33800123456"),  # toll free: not counted
    record("h", "102", T0 + 700, 300.0, caller="+33612345678"),  # came in from the trunk
    record("i", "200", T0 + 800, 60.0, account="globex"),
    record("j", "101", datetime(2026, 4, 2, tzinfo=UTC).timestamp(), 60.0),  # April
]


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # the command configures logging for the whole process


def run_usage(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what writing the ledger logged
    code = main(["usage", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_shows_minutes_per_line_and_pooled_rebuilt_from_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    write_ledger(tmp_path / "cdr", MARCH)
    code, out, err = run_usage(capsys, "acme", "--config", str(config), "--month", MONTH)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Account acme (Acme Ltd): plan small,")
    assert "Store: memory (counters live in the switch process)" in lines
    assert any("live concurrency is known only to the running switch process" in line
               for line in lines)
    assert any(line.startswith(f"Minutes {MONTH} (billable: 6 s increments, 18 s minimum;"
                               " rebuilt from the CDR ledger") for line in lines)
    by_label = {" ".join(line.split()[:2]): line for line in lines if line.startswith("  line ")}
    by_label["pooled"] = next(line for line in lines if line.startswith("  pooled "))
    # alice (extension 101): 60 + 18 s against a 1-minute line quota; 102: 30 s of 100 min
    assert by_label["line alice"].split() == [
        "line", "alice", "1.3", "min", "of", "1", "130.0", "%", "CRITICAL"]
    assert by_label["line 102"].split() == ["line", "102", "0.5", "min", "of", "100", "0.5", "%"]
    # pooled: 108 s of 50 min × 2 users
    assert by_label["pooled"].split()[:4] == ["pooled", "1.8", "min", "of"]
    assert "(50 × 2 users)" in by_label["pooled"]
    assert "1.8 %" in by_label["pooled"]
    alerts = lines[lines.index("Alerts") + 1:]
    assert alerts == ["  CRITICAL line alice: 130.0 % of the monthly quota used"
                      " — new outgoing calls are refused"]


def test_json_output_parses_with_exact_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    write_ledger(tmp_path / "cdr", MARCH)
    code, out, err = run_usage(capsys, "acme", "-c", str(config), "--month", MONTH, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["account"], report["plan"], report["month"]) == ("acme", "small", MONTH)
    minutes = report["minutes"]
    assert minutes["source"] == "cdr"
    assert [(line["device"], line["extension"], line["seconds"], line["quota_minutes"])
            for line in minutes["lines"]] == [("alice", "101", 78, 1), ("102", "102", 30, 100)]
    assert minutes["pooled"]["seconds"] == 108
    assert minutes["pooled"]["quota_minutes"] == 100
    assert minutes["pooled"]["percent"] == 1.8
    assert minutes["account"]["quota_minutes"] == 1000
    assert report["concurrency"]["source"] is None
    assert report["concurrency"]["account"] == {"active": None, "limit": 10}
    assert [a["limit"] for a in report["alerts"]] == ["quota_line"]

    # another month: April holds alice's one call
    code, out, _ = run_usage(capsys, "acme", "-c", str(config), "--month", "2026-04", "--json")
    assert code == 0
    april = json.loads(out)["minutes"]
    assert [line["seconds"] for line in april["lines"]] == [60, 0]


def test_patterns_are_replayed_from_the_ledger_for_the_current_month(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    now = time.time()
    start = max(now - 2, now // 86400 * 86400)  # today (UTC), this month
    dialled = [f"+3314000000{digit}" for digit in range(1, 7)]  # six consecutive numbers
    write_ledger(tmp_path / "cdr", [
        record(f"s{index}", "101", start + index * 0.01, None, callee=number)
        for index, number in enumerate(dialled)
    ])
    code, out, err = run_usage(capsys, "acme", "-c", str(config), "--json")
    assert code == 0, err
    report = json.loads(out)
    rows = {row["pattern"]: row for row in report["patterns"]["rows"]}
    assert report["patterns"]["source"] == "cdr"
    assert rows["calls_per_day"]["value"] == 6
    assert rows["distinct_per_month"]["value"] == 6
    assert rows["sequential"]["value"] == 6
    assert (rows["sequential"]["level"], rows["sequential"]["warning"]) == ("warning", 5)
    assert rows["short_calls"]["value"] is None  # fewer answered calls than min_calls
    assert {"limit": "pattern_sequential", "level": "warning"}.items() <= next(
        a for a in report["alerts"] if a["limit"] == "pattern_sequential").items()


def test_unknown_account_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    code, out, err = run_usage(capsys, "initech", "--config", str(config))
    assert code == 2
    assert out == ""
    assert err == f"usage: unknown account 'initech' in {config} (accounts: acme, globex)\n"


def test_bad_month_and_bad_config_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["usage", "acme", "--config", str(config), "--month", "2026-13"])
    assert exit_info.value.code == 2
    assert "not a month (YYYY-MM): '2026-13'" in capsys.readouterr().err
    code, _, err = run_usage(capsys, "acme", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert "cannot read" in err


def test_redis_concurrency_minutes_and_patterns(
    redis_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"usage-{uuid.uuid4().hex[:8]}:"
    config = write_config(
        tmp_path, f'  backend: redis\n  redis_url: "{redis_server}"\n  key_prefix: "{prefix}"')
    write_ledger(tmp_path / "cdr", MARCH)  # not read: Redis has this month's figures
    now = time.time()

    async def prepare() -> None:
        store = RedisFairUseStore(redis_server, prefix, "node-a")
        try:
            for call_id, device in (("c1", "alice"), ("c2", "alice"), ("c3", "102")):
                lease = await store.acquire(
                    call_id, [("account", "acme", 10), ("device", f"acme/{device}", 3)],
                    60.0, now)
                assert lease.granted
            await store.acquire("other", [("account", "globex", 10)], 60.0, now)
            await store.add_minutes("acme", "alice", MONTH, 600)
            await store.add_minutes("acme", "102", MONTH, 1200)
            for digit in range(1, 4):
                await store.record_attempt("acme", f"+3314000000{digit}", now)
        finally:
            await store.close()

    asyncio.run(prepare())
    code, out, err = run_usage(capsys, "acme", "-c", str(config), "--month", MONTH, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["store"] == {"backend": "redis", "url": redis_server, "reachable": True}
    concurrency = report["concurrency"]
    assert concurrency["source"] == "redis"
    assert concurrency["account"] == {"active": 3, "limit": 10}
    assert [(d["device"], d["active"], d["limit"]) for d in concurrency["devices"]] == [
        ("alice", 2, 3), ("102", 1, 3)]
    minutes = report["minutes"]
    assert minutes["source"] == "redis"
    assert [line["seconds"] for line in minutes["lines"]] == [600, 1200]
    assert minutes["pooled"]["seconds"] == 1800
    assert minutes["pooled"]["percent"] == 30.0
    rows = {row["pattern"]: row for row in report["patterns"]["rows"]}
    assert report["patterns"]["source"] == "redis"
    assert rows["calls_per_day"]["value"] == 3
    assert rows["sequential"]["value"] == 3

    code, out, err = run_usage(capsys, "acme", "-c", str(config), "--month", MONTH)
    assert code == 0, err
    lines = out.splitlines()
    assert f"Store: redis {redis_server}, reachable" in lines
    assert "Concurrent calls (from redis)" in lines
    assert any(line.split() == ["account", "3", "(limit", "10)"] for line in lines)
    assert any(line.split() == ["device", "alice", "2", "(limit", "3)"] for line in lines)

    # a month Redis holds nothing for: rebuilt from the ledger instead
    code, out, _ = run_usage(capsys, "acme", "-c", str(config), "--month", "2026-04", "--json")
    april = json.loads(out)["minutes"]
    assert (april["source"], april["note"]) == ("cdr", "Redis holds no minutes for this month")
    assert [line["seconds"] for line in april["lines"]] == [60, 0]


def test_unreachable_redis_falls_back_to_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port('tcp')}/0"  # nothing listens there
    config = write_config(tmp_path, f"  backend: redis\n  redis_url: \"{url}\"")
    write_ledger(tmp_path / "cdr", MARCH)
    code, out, err = run_usage(capsys, "acme", "-c", str(config), "--month", MONTH, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["store"]["reachable"] is False
    assert "s3cret" not in out  # the password is never printed
    assert report["store"]["url"].startswith("redis://:***@127.0.0.1:")
    assert report["concurrency"]["note"] == "Redis is unreachable: live concurrency is unknown"
    assert report["minutes"]["source"] == "cdr"
    assert report["minutes"]["pooled"]["seconds"] == 108

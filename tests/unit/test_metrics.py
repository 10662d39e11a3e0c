"""The switch's Prometheus metrics (switch/metrics.py): the call setup-time and duration
histograms, the emergency setup latency and outcomes by profile, the gauges refreshed by
the periodic sweep, observed through a real `Softswitch` running in-process on loopback
(devices are `SipUA` peers on 127.0.0.1, the emergency trunk an `EmergencyTrunkUAS` on
127.0.0.2); process health on the switch's registry; the reference in docs/metrics.md;
and the Grafana dashboard (docs/grafana/softswitch-dashboard.json), whose every query
must name metrics and labels the switch exposes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO / "tests" / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))  # last: its sipp/ and pjsua2/ folders shadow nothing

from etrunk import TRUNK_HOST, EmergencyTrunkUAS  # noqa: E402
from sipua import SipUA  # noqa: E402

from switch.app import Softswitch  # noqa: E402
from switch.metrics import CALL_KINDS, SwitchMetrics, call_kind_label  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402

DASHBOARD = REPO / "docs" / "grafana" / "softswitch-dashboard.json"
DOCS = REPO / "docs" / "metrics.md"
LOOPBACK = "127.0.0.1"
WAIT = 5.0  # the longest any step may take on loopback
ANSWER_DELAY = 0.5  # the callee rings this long before its 200
HOLD = 0.3  # the answered call lasts at least this long
# a relay range of its own, above the Linux ephemeral ports (32768-60999)
RELAY_LOW = 61000 + 20 * (os.getpid() % 200)
RELAY_PAIRS = 10
LYON = {"country": "FR", "A1": "69", "A3": "Lyon", "RD": "Rue de la République",
        "HNO": "10", "PC": "69002"}  # fmt: skip
# Grafana variables and PromQL words that are not metric names
PROMQL_LABELS_ALWAYS = {"instance", "job", "le"}


# ---- helpers ----------------------------------------------------------------------------


def families(metrics: SwitchMetrics) -> dict[str, tuple[str, set[str]]]:
    """Every family of the registry: name (as collected) -> (type, label names)."""
    labels_of = {
        getattr(collector, "_name", None): set(getattr(collector, "_labelnames", ()))
        for collector in vars(metrics).values()
    }
    result: dict[str, tuple[str, set[str]]] = {}
    for family in metrics.registry.collect():
        labels = labels_of.get(family.name)
        if labels is None:  # a collector of prometheus-client: its samples carry the labels
            labels = {name for sample in family.samples for name in sample.labels}
        result[family.name] = (family.type, labels)
    return result


def scraped_names(name: str, kind: str) -> set[str]:
    """The sample names Prometheus stores for a family."""
    if kind == "counter":
        return {f"{name}_total", f"{name}_created"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


def full_metrics() -> SwitchMetrics:
    metrics = SwitchMetrics()
    metrics.enable_process_metrics()
    return metrics


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


async def until(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


# ---- the in-process switch --------------------------------------------------------------


def settings_text(tmp: Path, sip_port: int, trunk_port: int) -> str:
    config = {
        "switch": {"domains": [LOOPBACK], "user_agent": "softswitch-test"},
        "listen": [{"transport": "udp", "host": LOOPBACK, "port": sip_port}],
        "registrar": {"keepalive_interval": 0},
        "auth": {"secret": "0123456789abcdef0123456789abcdef"},
        "store": {"backend": "memory"},
        "cdr": {"directory": str(tmp / "cdr"), "fsync": False},
        "media": {"backend": "relay", "bind_host": LOOPBACK, "port_min": RELAY_LOW,
                  "port_max": RELAY_LOW + 2 * RELAY_PAIRS - 1, "media_timeout": 0},
        "dialplan": {"country": "FR"},
        "accounts": [{"id": "acme", "devices": [
            {"extension": "101", "password": "pw101", "site": "lyon", "location": "b312"},
            {"extension": "102", "password": "pw102", "site": "lyon", "location": "b312"},
            {"extension": "103", "password": "pw103", "mobility": "nomadic"},
        ]}],
        "trunks": [{"id": "etrunk", "kind": "peer", "host": TRUNK_HOST, "port": trunk_port,
                    "transport": "udp", "addresses": [f"{TRUNK_HOST}/32"],
                    "emergency": {"profile": "nat"}}],
        "emergency": {
            "journal_dir": str(tmp / "emergency"), "route_timeout": 3, "retry_interval": 1,
            "sites": [{"id": "lyon", "country": "FR", "address": LYON,
                       "callback_number": "+33478000100", "routes": ["etrunk"],
                       "locations": [{"id": "b312", "FLR": "3", "ROOM": "B312"}]}],
        },
    }  # fmt: skip
    return json.dumps(config)  # YAML reads JSON


@pytest.fixture
async def switch(tmp_path: Path) -> AsyncIterator[tuple[Softswitch, int, int]]:
    sip_port = free_port("udp")
    trunk_port = free_port("udp", TRUNK_HOST)
    instance = Softswitch(load_settings_text(settings_text(tmp_path, sip_port, trunk_port),
                                             str(tmp_path / "switch.yaml")))
    await instance.start()
    try:
        yield instance, sip_port, trunk_port
    finally:
        await instance.stop()


def sample(switch: Softswitch, name: str, **labels: str) -> float:
    return switch.metrics.value(name, labels)


# ---- calls through the switch -----------------------------------------------------------


async def test_a_call_fills_the_setup_and_duration_histograms(switch) -> None:
    instance, sip_port, _ = switch
    registrar = (LOOPBACK, sip_port)
    async with (
        SipUA("101", "pw101", registrar) as alice,
        SipUA("102", "pw102", registrar, answer_delay=ANSWER_DELAY) as bob,
    ):
        assert (await alice.register()).status == 200
        assert (await bob.register()).status == 200
        capacity = instance.media.ports.capacity
        assert capacity == RELAY_PAIRS
        call = await alice.invite("102", timeout=WAIT)
        assert call.status == 200
        # the sweep's gauges, while the call's media is anchored
        instance.refresh_gauges()
        assert sample(instance, "softswitch_media_sessions_active") == 1
        assert sample(instance, "softswitch_media_ports_free") < capacity
        assert sample(instance, "softswitch_calls_active") == 1
        # setup time: observed at the 180 (sent before the callee's delayed 200), once
        setup_count = "softswitch_call_setup_seconds_count"
        assert sample(instance, setup_count, kind="internal") == 1
        setup = sample(instance, "softswitch_call_setup_seconds_sum", kind="internal")
        assert 0 <= setup < ANSWER_DELAY
        assert sample(instance, "softswitch_call_setup_seconds_bucket", kind="internal",
                      le="+Inf") == 1
        # no duration before the call ends
        assert sample(instance, "softswitch_call_duration_seconds_count",
                      kind="internal") == 0
        await asyncio.sleep(HOLD)
        assert (await call.bye(timeout=WAIT)).status == 200
        assert await until(lambda: sample(instance, "softswitch_calls_active") == 0)
    assert sample(instance, "softswitch_call_duration_seconds_count", kind="internal") == 1
    duration = sample(instance, "softswitch_call_duration_seconds_sum", kind="internal")
    assert HOLD * 0.9 <= duration < HOLD + WAIT
    assert sample(instance, "softswitch_call_duration_seconds_bucket", kind="internal",
                  le="5.0") == 1
    assert sample(instance, setup_count, kind="internal") == 1  # not again at the 200
    assert sample(instance, setup_count, kind="external") == 0
    instance.refresh_gauges()
    assert sample(instance, "softswitch_media_sessions_active") == 0
    assert sample(instance, "softswitch_media_ports_free") == capacity


async def test_an_emergency_call_fills_the_emergency_latency_and_outcome_by_profile(
        switch) -> None:
    instance, sip_port, trunk_port = switch
    registrar = (LOOPBACK, sip_port)
    async with (
        SipUA("101", "pw101", registrar) as alice,
        EmergencyTrunkUAS([200], port=trunk_port, ring=True) as trunk,
    ):
        assert (await alice.register()).status == 200
        call = await alice.invite("112", timeout=WAIT)
        assert call.status == 200
        assert len(trunk.invites) == 1
        latency_count = "softswitch_emergency_setup_seconds_count"
        assert sample(instance, latency_count, number_class="emergency") == 1
        latency = sample(instance, "softswitch_emergency_setup_seconds_sum",
                         number_class="emergency")
        assert 0 <= latency < WAIT
        assert sample(instance, "softswitch_call_setup_seconds_count", kind="emergency") == 1
        assert (await call.bye(timeout=WAIT)).status == 200
        assert await until(lambda: sample(instance, "softswitch_calls_active") == 0)
    outcomes = "softswitch_emergency_call_outcomes_total"
    assert sample(instance, outcomes, outcome="answered", profile="nat") == 1
    assert sample(instance, outcomes, outcome="answered", profile="none") == 0
    assert sample(instance, "softswitch_call_duration_seconds_count", kind="emergency") == 1
    assert sample(instance, latency_count, number_class="emergency") == 1  # first route only


async def test_an_emergency_call_that_never_left_counts_under_profile_none(switch) -> None:
    instance, _, _ = switch
    em = instance.emergency
    device = instance.directory.device("101")
    destination = instance.dialplan_for("acme").classify("112")

    class _Request:
        body = b""

        def header(self, name: str) -> None:
            return None

    class _Call:
        call_id = "never-left@test"
        a_request = _Request()
        answered_at = None
        final_status = 480

    ctx = em.begin(_Call(), device, destination)
    em.finished(ctx, _Call(), "cancelled")
    assert sample(instance, "softswitch_emergency_call_outcomes_total",
                  outcome="cancelled", profile="none") == 1
    # no INVITE went out: no setup latency either
    assert sample(instance, "softswitch_emergency_setup_seconds_count",
                  number_class="emergency") == 0


async def test_the_sweep_counts_devices_without_a_location(switch) -> None:
    instance, _, _ = switch
    locations = instance.emergency.locations
    assert locations.has_location("101") and locations.has_location("102")
    assert not locations.has_location("103")  # nomadic, never registered from a network
    instance.refresh_gauges()
    assert sample(instance, "softswitch_emergency_devices_without_location") == 1


# ---- process health ---------------------------------------------------------------------


async def test_process_health_is_on_the_switch_registry(switch) -> None:
    instance, _, _ = switch
    text = instance.metrics.exposition().decode()
    assert re.search(r"^process_cpu_seconds_total \S+$", text, re.M)
    assert re.search(r"^process_resident_memory_bytes \S+$", text, re.M)
    assert re.search(r"^process_open_fds [1-9]", text, re.M)
    assert 'python_info{implementation="' in text


def test_process_metrics_are_added_once_and_only_when_asked() -> None:
    metrics = SwitchMetrics()
    assert not any(name.startswith(("process_", "python_")) for name in families(metrics))
    metrics.enable_process_metrics()
    metrics.enable_process_metrics()  # a second call must not raise "Duplicated timeseries"
    names = set(families(metrics))
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= names


def test_call_kind_label_keeps_the_label_set_bounded() -> None:
    for kind in CALL_KINDS:
        assert call_kind_label(kind) == kind
    assert call_kind_label("invalid") is None
    assert call_kind_label("+33612345678") is None


def test_no_metric_carries_an_account_device_or_number_label() -> None:
    forbidden = {"account", "account_id", "device", "user", "username", "extension",
                 "number", "caller", "callee", "did", "call_id"}
    for name, (_, labels) in families(full_metrics()).items():
        assert not labels & forbidden, f"{name} has a per-account label: {labels & forbidden}"


# ---- the reference in docs/metrics.md ---------------------------------------------------


def _documented() -> dict[str, list[str]]:
    return {
        line.split("|")[1].strip().strip("`"): line.split("|")
        for line in DOCS.read_text().splitlines()
        if re.match(r"\| `[a-z]", line)
    }


def test_docs_list_every_family_with_its_type_and_labels_process_ones_included() -> None:
    rows = _documented()
    listed = set()
    for name, (kind, labels) in families(full_metrics()).items():
        exposed = name + ("_total" if kind == "counter" else "")
        assert exposed in rows, f"{exposed} is missing from docs/metrics.md"
        _, _, documented_kind, documented_labels, meaning, _ = rows[exposed]
        assert documented_kind.strip() == kind, exposed
        assert meaning.strip(), exposed
        for label in labels:
            assert f"`{label}`" in documented_labels, f"{exposed}: label {label} undocumented"
        listed.add(exposed)
    assert set(rows) == listed, f"documented but not exposed: {set(rows) - listed}"


# ---- the Grafana dashboard --------------------------------------------------------------


def test_dashboard_is_json_with_the_datasource_as_a_variable() -> None:
    board = dashboard()  # raises on malformed JSON
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    for word in ("Registrations", "Calls", "Media", "Emergency calls", "Fair use",
                 "SIP signalling", "Process health"):
        assert any(p["type"] == "row" and p["title"] == word for p in board["panels"]), word


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quoted = False
    for char in expr:
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs:
            if not stack or stack.pop() != pairs[char]:
                return False
    return not stack and not quoted


METRIC = re.compile(r"\b((?:softswitch|process|python)_[a-z0-9_]+)(\{[^}]*\})?")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"[^"]*"\s*')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def test_dashboard_queries_name_only_exposed_metrics_and_labels() -> None:
    exposed: dict[str, set[str]] = {}
    for name, (kind, labels) in families(full_metrics()).items():
        for scraped in scraped_names(name, kind):
            exposed[scraped] = labels | ({"le"} if scraped.endswith("_bucket") else set())
    seen = 0
    for expr in queries(dashboard()):
        assert _balanced(expr), f"unbalanced brackets or quotes: {expr}"
        used_labels: set[str] = set()
        references = METRIC.findall(expr)
        assert references, f"a query with no switch metric: {expr}"
        for name, selector in references:
            assert name in exposed, f"{name} (in {expr}) is not exposed by the switch"
            used_labels |= exposed[name]
            seen += 1
            for matcher in filter(None, selector.strip("{}").split(",")):
                found = MATCHER.fullmatch(matcher)
                assert found, f"bad label matcher {matcher!r} in {expr}"
                assert found.group(1) in exposed[name] | PROMQL_LABELS_ALWAYS, (
                    f"{name} has no label {found.group(1)} ({expr})")
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in used_labels | PROMQL_LABELS_ALWAYS, (
                    f"grouping by {label}, a label of none of its metrics: {expr}")
    assert seen >= 50


def test_dashboard_shows_every_switch_metric() -> None:
    referenced = {name for expr in queries(dashboard()) for name, _ in METRIC.findall(expr)}
    for name, (kind, _) in families(full_metrics()).items():
        if name.startswith("softswitch_"):
            assert scraped_names(name, kind) & referenced, f"no panel shows {name}"


def test_dashboard_check_catches_an_unknown_metric() -> None:
    # the check above is not vacuous: a misspelt name is not among the exposed ones
    exposed = set()
    for name, (kind, _) in families(full_metrics()).items():
        exposed |= scraped_names(name, kind)
    assert "softswitch_calls_attempted_total" in exposed
    assert "softswitch_calls_attempts_total" not in exposed
    assert not _balanced('sum(rate(x{a="b"}[5m])')

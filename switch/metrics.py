"""Prometheus metrics of the switch (prometheus-client).

One `SwitchMetrics` per switch process, with its own registry (no global state).
Labels are low-cardinality: methods outside the known set are folded into
"other", statuses are exact codes (a bounded set), reasons are fixed strings.
Every metric here is written by the code that owns it; docs/metrics.md lists them.
No metric carries an account, device or number label.
`enable_process_metrics` adds prometheus-client's process and platform collectors
(process_*, python_info) to the same registry, for the switch process itself.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from sip.validation import KNOWN_METHODS

PREFIX = "softswitch"

# The `kind` label of the call histograms: the dial plan's classes a call can reach.
CALL_KINDS = ("internal", "external", "emergency")
# INVITE received -> first 18x or 2xx sent to the caller (post-dial delay), seconds
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0)
# answered -> ended, seconds (ACD is sum / count)
DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
                    7200.0, 14400.0)
# emergency call classified -> INVITE sent to the first route (EM-82: no slow path), seconds
EMERGENCY_SETUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def call_kind_label(classification: str) -> str | None:
    """The `kind` label of a call (internal, external, emergency); None for any other
    classification (an invalid number never reaches setup)."""
    return classification if classification in CALL_KINDS else None


class SwitchMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._process_collectors: tuple[ProcessCollector, PlatformCollector] | None = None
        self._message_children: dict[tuple[str, str, int | None], Any] = {}
        r = self.registry
        self.sip_messages = Counter(
            f"{PREFIX}_sip_messages",
            "SIP messages received and sent, by direction, method and status (status is "
            "empty for requests)",
            ["direction", "method", "status"],
            registry=r,
        )
        self.sip_parse_errors = Counter(
            f"{PREFIX}_sip_parse_errors",
            "Received messages that could not be parsed, by transport and whether a 400 "
            "could be answered",
            ["transport", "answered"],
            registry=r,
        )
        self.transport_events = Counter(
            f"{PREFIX}_sip_transport_events",
            "Transport events: oversize datagrams, bad stream framing, connections closed, "
            "keepalives, caught errors",
            ["transport", "kind"],
            registry=r,
        )
        self.sip_requests_rejected = Counter(
            f"{PREFIX}_sip_requests_rejected",
            "Requests refused before reaching a service, by method and status",
            ["method", "status"],
            registry=r,
        )
        self.registrations = Counter(
            f"{PREFIX}_registrar_registrations",
            "REGISTER requests answered, by result (ok, unregister, challenged, "
            "auth_failed, stale, banned, rejected)",
            ["result"],
            registry=r,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_registrar_auth_failures",
            "Failed digest authentications, by source kind of failure",
            ["reason"],
            registry=r,
        )
        self.bans = Counter(
            f"{PREFIX}_registrar_bans",
            "Sources banned after repeated authentication failures, by trigger "
            "(source or user)",
            ["trigger"],
            registry=r,
        )
        self.banned_sources = Gauge(
            f"{PREFIX}_registrar_banned_sources",
            "Source addresses currently banned",
            registry=r,
        )
        self.bindings_active = Gauge(
            f"{PREFIX}_registrar_bindings_active",
            "Registered contacts (bindings) currently live",
            registry=r,
        )
        self.keepalive_evictions = Counter(
            f"{PREFIX}_registrar_keepalive_evictions",
            "Bindings removed because their contact stopped answering OPTIONS keepalives",
            registry=r,
        )
        self.calls_attempted = Counter(
            f"{PREFIX}_calls_attempted",
            "Calls the switch accepted for routing (authenticated INVITEs)",
            registry=r,
        )
        self.calls_answered = Counter(
            f"{PREFIX}_calls_answered",
            "Calls answered by the callee",
            registry=r,
        )
        self.calls_active = Gauge(
            f"{PREFIX}_calls_active",
            "Calls in progress (ringing or established)",
            registry=r,
        )
        self.calls_ended = Counter(
            f"{PREFIX}_calls_ended",
            "Calls ended, by cause (normal, busy, no_answer, cancelled, unavailable, "
            "declined, failed, media_timeout, no_ack, admin, shutdown)",
            ["cause"],
            registry=r,
        )
        self.call_setup_seconds = Histogram(
            f"{PREFIX}_call_setup_seconds",
            "INVITE received to first 18x or 2xx sent to the caller, seconds, by kind "
            "(internal, external, emergency)",
            ["kind"],
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.call_duration_seconds = Histogram(
            f"{PREFIX}_call_duration_seconds",
            "Answered calls: answer to end, seconds, by kind (internal, external, emergency)",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.media_sessions_active = Gauge(
            f"{PREFIX}_media_sessions_active",
            "Calls whose media is anchored by the media backend now",
            registry=r,
        )
        self.media_ports_free = Gauge(
            f"{PREFIX}_media_ports_free",
            "RTP/RTCP port pairs free in the relay's port range",
            registry=r,
        )
        self.media_packets = Counter(
            f"{PREFIX}_media_packets",
            "RTP packets relayed for ended calls, by direction (caller_to_callee, "
            "callee_to_caller)",
            ["direction"],
            registry=r,
        )
        self.media_bytes = Counter(
            f"{PREFIX}_media_bytes",
            "RTP bytes relayed for ended calls, by direction",
            ["direction"],
            registry=r,
        )
        self.media_lost_packets = Counter(
            f"{PREFIX}_media_lost_packets",
            "RTP packets lost before the relay (sequence gaps or RTCP reports), by direction",
            ["direction"],
            registry=r,
        )
        self.emergency_calls = Counter(
            f"{PREFIX}_emergency_calls",
            "Emergency, test and helpline calls classified, by class and location status",
            ["number_class", "location_status"],
            registry=r,
        )
        self.emergency_outcomes = Counter(
            f"{PREFIX}_emergency_call_outcomes",
            "Emergency calls ended, by outcome (answered, failed, cancelled) and the "
            "emergency profile of the last route tried (dlr, pidf, i3, nat; none)",
            ["outcome", "profile"],
            registry=r,
        )
        self.emergency_setup_seconds = Histogram(
            f"{PREFIX}_emergency_setup_seconds",
            "Emergency call classified to INVITE sent to its first route, seconds, by "
            "number class",
            ["number_class"],
            buckets=EMERGENCY_SETUP_BUCKETS,
            registry=r,
        )
        self.emergency_devices_without_location = Gauge(
            f"{PREFIX}_emergency_devices_without_location",
            "Configured devices with no dispatchable location now",
            registry=r,
        )
        self.emergency_route_attempts = Counter(
            f"{PREFIX}_emergency_route_attempts",
            "INVITEs sent to emergency routes and how they ended (status code, timeout, "
            "unreachable)",
            ["trunk", "result"],
            registry=r,
        )
        self.emergency_preemptions = Counter(
            f"{PREFIX}_emergency_preemptions",
            "Ordinary calls released to free a trunk channel for an emergency call",
            ["trunk"],
            registry=r,
        )
        self.emergency_notifications = Counter(
            f"{PREFIX}_emergency_notifications",
            "On-site notification deliveries, by channel and outcome",
            ["channel", "outcome"],
            registry=r,
        )
        self.emergency_alarms = Counter(
            f"{PREFIX}_emergency_alarms",
            "Emergency alarms and admin alerts raised, by kind",
            ["kind"],
            registry=r,
        )
        self.fairuse_refusals = Counter(
            f"{PREFIX}_fairuse_refusals",
            "Calls refused by fair use, by the limit that refused them",
            ["limit"],
            registry=r,
        )
        self.fairuse_alerts = Counter(
            f"{PREFIX}_fairuse_alerts",
            "Fair-use warning and critical thresholds reached, by limit and level",
            ["limit", "level"],
            registry=r,
        )
        self.fairuse_leases = Gauge(
            f"{PREFIX}_fairuse_leases",
            "Concurrency leases held by this node's calls",
            registry=r,
        )
        self.fairuse_store_degraded = Gauge(
            f"{PREFIX}_fairuse_store_degraded",
            "1 while the shared (Redis) fair-use store is unreachable and local counters "
            "are used",
            registry=r,
        )
        self.fairuse_duration_cuts = Counter(
            f"{PREFIX}_fairuse_duration_cuts",
            "Calls ended at their maximum duration, by kind (voice, fax)",
            ["kind"],
            registry=r,
        )
        self.emergency_readiness_problems = Gauge(
            f"{PREFIX}_emergency_readiness_problems",
            "Problems found by the emergency readiness check (0 when ready)",
            registry=r,
        )
        self.transactions_active = Gauge(
            f"{PREFIX}_sip_transactions_active",
            "SIP transactions in progress",
            registry=r,
        )
        # process lifecycle (switch/lifecycle.py): written by the availability tracker
        self.uptime_seconds = Gauge(
            f"{PREFIX}_uptime_seconds",
            "Seconds since this switch process became available (SIP listeners up); 0 "
            "while draining for a shutdown",
            registry=r,
        )
        self.availability_ratio = Gauge(
            f"{PREFIX}_availability_ratio",
            "This UTC month's availability: (minutes of the month - minutes unavailable) "
            "/ minutes of the month",
            registry=r,
        )

    def enable_process_metrics(self) -> None:
        """Process health on this registry: CPU, memory, open files, start time
        (process_*, from /proc; nothing on systems without it) and python_info.
        Idempotent: a second call adds nothing."""
        if self._process_collectors is not None:
            return
        self._process_collectors = (
            ProcessCollector(registry=self.registry),
            PlatformCollector(registry=self.registry),
        )

    def message_in(self, method: str, status: int | None) -> None:
        self._message_counter("in", method, status).inc()

    def message_out(self, method: str, status: int | None) -> None:
        self._message_counter("out", method, status).inc()

    def _message_counter(self, direction: str, method: str, status: int | None):
        """The labelled child of ``sip_messages``, looked up once per label set (the
        client library's ``labels()`` costs several µs per message)."""
        key = (direction, method, status)
        child = self._message_children.get(key)
        if child is None:
            child = self.sip_messages.labels(direction, method_label(method), str(status or ""))
            if len(self._message_children) < 4096:  # bounded: methods from outside vary
                self._message_children[key] = child
        return child

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (tests and the admin API read it)."""
        result = self.registry.get_sample_value(name, labels or {})
        return 0.0 if result is None else result

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

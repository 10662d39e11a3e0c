"""Prometheus metrics of the switch (prometheus-client).

One `SwitchMetrics` per switch process, with its own registry (no global state).
Labels are low-cardinality: methods outside the known set are folded into
"other", statuses are exact codes (a bounded set), reasons are fixed strings.
Every metric here is written by the code that owns it; docs/metrics.md lists them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from sip.validation import KNOWN_METHODS

PREFIX = "softswitch"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class SwitchMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
            "Emergency calls ended, by outcome (answered, failed, cancelled)",
            ["outcome"],
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

    def message_in(self, method: str, status: int | None) -> None:
        self.sip_messages.labels("in", method_label(method), str(status or "")).inc()

    def message_out(self, method: str, status: int | None) -> None:
        self.sip_messages.labels("out", method_label(method), str(status or "")).inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (tests and the admin API read it)."""
        result = self.registry.get_sample_value(name, labels or {})
        return 0.0 if result is None else result

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

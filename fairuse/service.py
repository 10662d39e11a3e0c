"""The fair-use service: what the call control asks before a call leaves, and tells when
it ends.

    admission = await service.admit(call_id, account, device, trunk_id, destination)
    ...                                   # refused: the SIP status and Warning it carries
    service.max_duration(call_id, fax=False)   # the cut the call control schedules
    await service.call_ended(call_id, ...)     # lease released once, minutes counted

Concurrency is a lease per call in the account's, the device's and the trunk's scopes,
granted atomically by the store (Redis across nodes) and refreshed by this node while
the call lives, so a crashed node's calls stop counting once their leases lapse.
Emergency, test and helpline calls are never refused and never counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from .admission import Admission, AdmissionCounters, decide, lease_refusal
from .patterns import PatternCounters
from .policy import EffectivePolicy, FairUse
from .store import FairUseStore, month_of

log = structlog.get_logger("fairuse")

ALLOW_UNCOUNTED = Admission(True, limit="none", counted=False)


@dataclass(slots=True)
class _Lease:
    account_id: str
    line: str  # the extension: minutes are counted per line
    internal: bool
    counted: bool
    policy: EffectivePolicy


class FairUseService:
    def __init__(
        self,
        settings: FairUse,
        store: FairUseStore,
        *,
        country: str,
        metrics: Any = None,
        lease_ttl: float = 60.0,
        users: Callable[[str], int] | None = None,
        wall_clock: Callable[[], float] = time.time,
        alert_sink: Callable[..., None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.country = country
        self.metrics = metrics
        self.lease_ttl = lease_ttl
        self.alert_sink = alert_sink  # posts alerts whose actions include "webhook"
        self.users = users or (lambda account_id: 1)
        self.wall_clock = wall_clock
        self.leases: dict[str, _Lease] = {}
        self._refresher: asyncio.Task | None = None
        self._alerted: dict[tuple[str, str], float] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def policy(self, account_id: str, device: str | None, trunk_id: str | None
               ) -> EffectivePolicy:
        return self.settings.resolve(account_id, device, trunk_id,
                                     users=self.users(account_id), home_country=self.country)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        starter = getattr(self.store, "start", None)
        if starter is not None:
            result = starter()
            if asyncio.iscoroutine(result):
                await result
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_leases())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        for call_id in list(self.leases):
            with contextlib.suppress(Exception):
                await self.store.release(call_id)
        self.leases.clear()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def _refresh_leases(self) -> None:
        """Every third of the lease lifetime, extend the leases of this node's calls."""
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            now = self.wall_clock()
            for call_id in list(self.leases):
                try:
                    await self.store.refresh(call_id, self.lease_ttl, now)
                except Exception as exc:
                    log.warning("fairuse.lease_refresh_failed", call_id=call_id, error=str(exc))
            if self.metrics is not None:
                self.metrics.fairuse_leases.set(len(self.leases))

    # -- admission ------------------------------------------------------------------------
    async def admit(self, call_id: str, account_id: str, device: str, trunk_id: str | None,
                    destination: Any, *, line: str | None = None) -> Admission:
        """One decision before the callee's leg exists. Never raises: a store failure
        admits the call (and is logged); emergency calls are always admitted."""
        if getattr(destination, "is_emergency", False) or not self.enabled:
            return ALLOW_UNCOUNTED
        internal = str(getattr(destination, "kind", "")) == "internal"
        try:
            admission = await self._admit(call_id, account_id, device, trunk_id, destination,
                                          internal, line or device)
        except Exception as exc:
            log.error("fairuse.admission_failed", call_id=call_id, error=repr(exc))
            return Admission(True, limit="none")
        self._account(admission, account_id, device)
        return admission

    async def _admit(self, call_id: str, account_id: str, device: str, trunk_id: str | None,
                     destination: Any, internal: bool, line: str) -> Admission:
        """``device``: the SIP username (policy overrides); ``line``: the extension, which
        the CDR ledger records too, so minutes rebuilt from it land on the same line."""
        now = self.wall_clock()
        policy = self.policy(account_id, device, trunk_id)
        counters = AdmissionCounters(at=datetime.fromtimestamp(now, UTC))
        if not internal:
            month = month_of(now)
            line_seconds, account_seconds = await self.store.minutes(account_id, line, month)
            dialled = getattr(destination, "e164", None) or getattr(destination, "dialled", "")
            store_patterns = await self.store.record_attempt(account_id, dialled, now)
            counters = AdmissionCounters(
                line_seconds=line_seconds, account_seconds=account_seconds,
                patterns=PatternCounters.from_store(store_patterns), at=counters.at,
            )
        admission = decide(policy, destination, counters)
        if not admission.allowed:
            return admission
        limits = policy.internal_concurrency if internal else policy.concurrency
        scopes = [(kind, scope_id, limit) for kind, scope_id, limit in (
            ("account", account_id, limits.account),
            ("device", f"{account_id}/{device}", limits.device),
            ("trunk", trunk_id, limits.trunk),
        ) if scope_id is not None and limit is not None]
        if scopes:
            lease = await self.store.acquire(call_id, scopes, self.lease_ttl, now)
            if not lease.granted:
                return lease_refusal(policy, lease.refused_scope, internal=internal)
        self.leases[call_id] = _Lease(account_id, line, internal, admission.counted, policy)
        if self.metrics is not None:
            self.metrics.fairuse_leases.set(len(self.leases))
        return admission

    def _account(self, admission: Admission, account_id: str, device: str) -> None:
        """Refusals and alerts: a log event and labelled metrics; repeated alerts of one
        limit and level are logged once a minute per account."""
        if not admission.allowed:
            log.info("fairuse.refused", account=account_id, device=device,
                     limit=admission.limit, status=admission.status, warning=admission.warning)
            if self.metrics is not None:
                self.metrics.fairuse_refusals.labels(admission.limit).inc()
        now = time.monotonic()
        for alert in admission.actions:
            key = (account_id, alert.key)
            if now - self._alerted.get(key, -1e9) < 60:
                continue
            self._alerted[key] = now
            if len(self._alerted) > 100_000:
                self._alerted.clear()
            if self.metrics is not None:
                self.metrics.fairuse_alerts.labels(alert.limit, str(alert.level)).inc()
            log.warning("fairuse.alert", account=account_id, device=device,
                        limit=alert.limit, alert_level=str(alert.level), value=alert.value,
                        threshold=alert.threshold, message=alert.message)
            if self.alert_sink is not None and "webhook" in alert.actions:
                try:
                    self.alert_sink(f"fairuse_{alert.limit}", alert.message,
                                    account=account_id, device=device,
                                    level=str(alert.level), value=alert.value,
                                    threshold=alert.threshold)
                except Exception as exc:
                    log.warning("fairuse.alert_post_failed", error=str(exc))

    # -- during and after the call ---------------------------------------------------------
    def max_duration(self, call_id: str, *, fax: bool = False) -> tuple[int, int | None] | None:
        """(cut after seconds, warn that many seconds before) for an admitted call; None
        when it has no lease (emergency, fair use off)."""
        lease = self.leases.get(call_id)
        if lease is None:
            return None
        cut = lease.policy.max_duration(fax=fax, internal=lease.internal)
        return cut, lease.policy.duration_warning(internal=lease.internal)

    async def call_ended(self, call_id: str, *, duration: float | None,
                         start: float) -> None:
        """Release the call's lease (exactly once) and count its minutes."""
        lease = self.leases.pop(call_id, None)
        if lease is None:
            return
        if self.metrics is not None:
            self.metrics.fairuse_leases.set(len(self.leases))
        try:
            await self.store.release(call_id)
            if lease.internal or not duration:
                return
            billable = lease.policy.billable(duration)
            if lease.counted and billable:
                await self.store.add_minutes(lease.account_id, lease.line, month_of(start),
                                             billable)
            await self.store.record_call_end(
                lease.account_id, duration, self.wall_clock(),
                short_call_seconds=lease.policy.plan.patterns.short_calls.max_seconds)
        except Exception as exc:
            log.error("fairuse.call_end_failed", call_id=call_id, error=repr(exc))

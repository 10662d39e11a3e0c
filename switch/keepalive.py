"""OPTIONS keepalive to registered UDP contacts, and eviction of the dead ones.

Every `interval` seconds each live UDP binding received on one of this node's
sockets gets an OPTIONS sent along its flow (which also keeps the phone's NAT
mapping open). Any response, even an error, proves the contact alive; a
transaction timeout (Timer F) counts a failure, and after `max_failures`
consecutive failures the binding is removed and counted.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog

from sip.message import SipRequest

from .location import Binding, BindingStore
from .metrics import SwitchMetrics
from .registrar import contact_flow
from .signalling import RequestTimeout, SignallingCore

log = structlog.get_logger("switch.keepalive")

MAX_PINGS_IN_FLIGHT = 256


class ContactKeepalive:
    def __init__(
        self,
        core: SignallingCore,
        store: BindingStore,
        metrics: SwitchMetrics,
        *,
        realm: str,
        interval: float,
        max_failures: int,
        user_agent: str,
    ) -> None:
        self.core = core
        self.store = store
        self.metrics = metrics
        self.realm = realm
        self.interval = interval
        self.max_failures = max_failures
        self.user_agent = user_agent
        self.listeners: list[tuple[str, str, int]] = []
        self.failures: dict[tuple[str, str], int] = {}

    def build_options(self, binding: Binding) -> SipRequest:
        flow = binding.flow
        host = flow.local_host
        sent_by = f"[{host}]:{flow.local_port}" if ":" in host else f"{host}:{flow.local_port}"
        headers = [
            ("Via", f"SIP/2.0/UDP {sent_by};branch=z9hG4bK{secrets.token_hex(8)};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:keepalive@{self.realm}>;tag={secrets.token_hex(6)}"),
            ("To", f"<{binding.contact}>"),
            ("Call-ID", f"ka-{secrets.token_hex(10)}"),
            ("CSeq", "1 OPTIONS"),
            ("User-Agent", self.user_agent),
        ]
        return SipRequest("OPTIONS", binding.contact, headers)

    async def ping(self, binding: Binding) -> bool:
        """Send one OPTIONS; True when the contact answered. Evicts after too many misses."""
        key = (binding.aor, binding.contact)
        try:
            await self.core.request(self.build_options(binding), contact_flow(binding))
        except RequestTimeout:
            count = self.failures.get(key, 0) + 1
            if count < self.max_failures:
                self.failures[key] = count
                return False
            self.failures.pop(key, None)
            if await self.store.remove(binding.aor, binding.contact):
                self.metrics.keepalive_evictions.inc()
                log.info("registrar.contact_evicted", aor=binding.aor,
                         contact=binding.contact, failures=count)
            return False
        self.failures.pop(key, None)
        return True

    def _is_ours(self, binding: Binding) -> bool:
        flow = binding.flow
        return flow.transport == "udp" and any(
            t == "udp" and h == flow.local_host and p == flow.local_port
            for t, h, p in self.listeners
        )

    async def sweep(self) -> int:
        """Ping every UDP binding of this node once; returns how many were pinged."""
        gate = asyncio.Semaphore(MAX_PINGS_IN_FLIGHT)
        tasks = []

        async def guarded(binding: Binding) -> None:
            try:
                await self.ping(binding)
            finally:
                gate.release()

        pinged: set[tuple[str, str]] = set()
        async for binding in self.store.iter_bindings(time.time()):
            if not self._is_ours(binding):
                continue
            pinged.add((binding.aor, binding.contact))
            await gate.acquire()
            tasks.append(asyncio.create_task(guarded(binding)))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Forget the misses of bindings that are gone (expired, unregistered, moved).
        for key in [k for k in self.failures if k not in pinged]:
            del self.failures[key]
        return len(tasks)

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registrar.keepalive_failed", error=str(exc))

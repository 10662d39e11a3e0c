"""Wiring: one switch process built from its settings, run on asyncio.

`Softswitch` owns every long-lived object (transports, transaction layer,
registrar, stores, metrics) — the only place with process-wide state — and
`run(settings)` runs it until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import signal
import time

import structlog

from e911.notify import Notifier
from e911.numbers import EmergencyNumberTable
from e911.service import EmergencyService
from fairuse.service import FairUseService
from fairuse.store import create_fairuse_store
from media.announcement import AnnouncementSession
from media.backend import MediaBackend
from media.relay import RtpRelay
from media.rtpengine import RtpengineBackend
from sip.message import SipRequest, SipResponse, make_response
from sip.timers import TimerSettings
from sip.transport import Flow, make_server_ssl_context

from .admin import AdminServer
from .auth import DigestAuthenticator, FailureBan, NonceCountTracker, NonceIssuer
from .calls import CallControl, CallEnd
from .cdr import CallRecord, LedgerLockedError, ledger_from_settings
from .dashboard import register_dashboard
from .dialplan import DialPlan
from .directory import DeviceDirectory
from .keepalive import ContactKeepalive
from .lifecycle import AvailabilityTracker, availability_path, drain
from .location import BindingStore, MemoryBindingStore, create_store
from .metrics import SwitchMetrics
from .registrar import Registrar
from .settings import ConfigError, Settings, load_settings
from .settings import Media as MediaSettings
from .signalling import SignallingCore
from .softphone import SOFTPHONE_OPENAPI_PATHS, register_softphone
from .trunks import TrunkRegistry

log = structlog.get_logger("switch.app")

EXPIRY_SWEEP_SECONDS = 5.0


def create_media_backend(settings: MediaSettings) -> MediaBackend | None:
    """The media backend the YAML asks for (None: SDP passes through untouched)."""
    if settings.backend == "none":
        return None
    if settings.backend == "rtpengine":
        host, _, port = settings.rtpengine.rpartition(":")
        return RtpengineBackend(
            (host.strip("[]"), int(port)),
            media_timeout=settings.media_timeout or None,
        )
    relay = RtpRelay(
        bind_host=settings.bind_host,
        advertise_host=settings.advertise_host,
        port_range=(settings.port_min, settings.port_max),
        media_timeout=settings.media_timeout or None,
    )
    if not getattr(settings, "webrtc", True):  # media.webrtc: false, no browser bridging
        return relay
    from media.hybrid import HybridMediaBackend  # aiortc is loaded only when bridging

    return HybridMediaBackend(relay)


class LoadWatch:
    """How much new work to shed, from 100 ms samples of the event loop's lag, of the share
    of wall time its thread spent on the CPU, and of how full the UDP listeners' receive
    buffers are (the kernel's queue of datagrams not read yet).

    * lag over 250 ms (the loop runs late): shed every new call and registration;
    * the receive queue over half full and not shrinking — datagrams arrive faster than
      they are handled, answers already come later than the phones' 500 ms
      retransmission timer, and the kernel is about to drop what its buffer cannot hold —
      or, for a switch without that signal, the thread busy over 97 %: shed 10 % more,
      at most 90 %;
    * no lag, the queue under 10 % full and the thread under 97 %: shed 5 % less.

    A busy switch that keeps its queue empty is coping: it sheds nothing. Shedding a share,
    not everything, keeps it serving at capacity while the excess is told to come back
    later (503 with Retry-After).
    """

    STEP_UP = 0.1
    STEP_DOWN = 0.05
    MAX_PARTIAL = 0.9

    def __init__(self, *, high_lag: float = 0.25, low_lag: float = 0.05,
                 high_busy: float = 0.97, high_queue: float = 0.5,
                 low_queue: float = 0.1) -> None:
        self.high_lag, self.low_lag = high_lag, low_lag
        self.high_busy = high_busy
        self.high_queue, self.low_queue = high_queue, low_queue
        self.lag = 0.0
        self.busy = 0.0
        self.queue: float | None = None
        self.shed = 0.0  # the share of new calls and registrations refused

    @property
    def overloaded(self) -> bool:
        return self.shed > 0.0

    def sample(self, *, lag: float, busy: float, queue: float | None = None) -> bool | None:
        """Take one sample (``queue``: the receive buffers' fill, None when unknown);
        True when shedding starts, False when it ends, else None."""
        was = self.overloaded
        # one slow turn (a garbage collection of a second, say) is not overload
        self.lag = 0.8 * self.lag + 0.2 * max(0.0, lag)
        self.busy = 0.5 * self.busy + 0.5 * min(1.0, max(0.0, busy))
        previous, self.queue = self.queue, queue
        if queue is None:
            backlog, drained = self.busy > self.high_busy, self.busy <= self.high_busy
        else:
            # more only while the queue is long and not draining yet: once the share shed
            # is enough, the queue shrinks and the share holds, then eases off
            backlog = queue > self.high_queue and queue >= (previous or 0.0)
            drained = queue < self.low_queue
        if self.lag > self.high_lag:
            self.shed = 1.0
        elif backlog:
            self.shed = min(self.MAX_PARTIAL, self.shed + self.STEP_UP)
        elif drained and self.lag < self.low_lag and self.busy <= self.high_busy:
            self.shed = max(0.0, round(self.shed - self.STEP_DOWN, 6))
        elif self.shed > self.MAX_PARTIAL:  # the lag is gone, the load is not
            self.shed = self.MAX_PARTIAL
        if self.overloaded != was:
            return self.overloaded
        return None


class Softswitch:
    def __init__(self, settings: Settings, *, metrics: SwitchMetrics | None = None,
                 timers: TimerSettings | None = None, config_path: str | None = None) -> None:
        """`timers`: SIP transaction timers (T1, T2, T4); RFC 3261 defaults when None
        (tests shorten them so Timer F expires in seconds)."""
        self.settings = settings
        self.config_path = config_path  # what reload() reads again
        self.metrics = metrics or SwitchMetrics()
        self.metrics.enable_process_metrics()  # process_* and python_info (health)
        self.directory = DeviceDirectory(settings)
        # Emergency, test and helpline dial strings: the packaged table, the operator's
        # file (emergency.numbers_file) on top; SIGHUP re-reads them without a restart.
        self.numbers = EmergencyNumberTable.load(settings.emergency.numbers_file)
        self.dialplans = {
            account.id: DialPlan.from_settings(
                settings.dialplan, [d.extension for d in account.devices], numbers=self.numbers
            )
            for account in settings.accounts
        }
        self.store: BindingStore = create_store(
            settings.store.backend, settings.store.redis_url, settings.store.key_prefix
        )
        auth = settings.auth
        secret = (
            auth.secret.get_secret_value().encode() if auth.secret else secrets.token_bytes(32)
        )
        issuer = NonceIssuer(secret, auth.nonce_lifetime)
        tracker = NonceCountTracker(max_entries=200_000, lifetime=auth.nonce_lifetime)
        self.authenticator = DigestAuthenticator(
            settings.realm, list(auth.algorithms), issuer, tracker, self.directory.credentials
        )
        self.bans = FailureBan(
            auth.ban.max_failures_per_source,
            auth.ban.max_failures_per_user,
            auth.ban.window,
            auth.ban.ban_time,
        )
        self.server_header = settings.switch.user_agent
        self.core = SignallingCore(
            self.metrics,
            max_message_size=settings.switch.max_message_size,
            server_header=self.server_header,
            is_local_domain=self._is_local_host,
            timers=timers,
        )
        self.registrar = Registrar(
            settings.registrar,
            self.directory,
            self.store,
            self.authenticator,
            self.bans,
            self.metrics,
            server_header=self.server_header,
        )
        self.keepalive = ContactKeepalive(
            self.core, self.store, self.metrics,
            realm=settings.realm,
            interval=settings.registrar.keepalive_interval,
            max_failures=settings.registrar.keepalive_failures,
            user_agent=self.server_header,
        )
        self.media = create_media_backend(settings.media)
        self.trunks = TrunkRegistry.from_settings(settings, self.core)
        self.calls = CallControl(
            self.core, self.directory, self.store, self.authenticator, self.bans,
            self.metrics, self.media,
            no_answer_timeout=settings.calls.no_answer_timeout,
            session_expires=settings.calls.session_expires,
            trunks=self.trunks,
            accounts={account.id: account for account in settings.accounts},
            country=settings.dialplan.country,
            dialplan_for=self.dialplan_for, server_header=self.server_header,
            on_call_end=self.record_call,
        )
        self.emergency = EmergencyService(
            settings, self.trunks, self.metrics, send_message=self.calls.send_message,
            announcement_factory=self._announcement_player,
        )
        self.calls.emergency = self.emergency
        devices_per_account = {a.id: max(1, len(a.devices)) for a in settings.accounts}
        self.fairuse = FairUseService(
            settings.fair_use,
            create_fairuse_store(settings.store.backend, settings.store.redis_url,
                                 settings.store.key_prefix, settings.switch.node_id,
                                 on_state_change=self._fairuse_store_state),
            country=settings.dialplan.country, metrics=self.metrics,
            users=lambda account_id: devices_per_account.get(account_id, 1),
            lease_ttl=settings.fair_use.lease_seconds,
            alert_sink=Notifier([], admin_webhooks=list(settings.fair_use.webhooks)
                                ).alert_admins if settings.fair_use.webhooks else None,
        )
        self.calls.fairuse = self.fairuse
        self.registrar.on_registered = self._device_registered
        self.ledger, self.billing = ledger_from_settings(settings.cdr)
        # availability accounting (uptime, monthly availability): beside the CDR directory
        self.availability = AvailabilityTracker(availability_path(settings.cdr.directory),
                                                metrics=self.metrics)
        self.admin = AdminServer(self, settings.admin)
        self.admin.add_routes(register_dashboard)
        self.admin.add_routes(register_softphone, openapi_paths=SOFTPHONE_OPENAPI_PATHS)
        # a registrar on the in-memory store answers without waiting: run it eagerly; one
        # on Redis awaits redis-py, whose timeouts need a task around them
        self.core.register_handler("REGISTER", self.registrar.handle_register,
                                   eager=isinstance(self.store, MemoryBindingStore))
        self.core.register_handler("OPTIONS", self.handle_options, eager=True)
        self.listening: list[tuple[str, str, int]] = []
        self._messages: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []

    async def record_call(self, end: CallEnd) -> None:
        """Append the call's CDR; returns once it is on disk (fsync'd)."""
        call = end.call
        destination = call.destination
        media = None
        # The media backend's leg "A" is whoever offered first: the callee on a late offer.
        directions = (("caller_to_callee", "a_to_b"), ("callee_to_caller", "b_to_a"))
        if call.callee_offered_first:
            directions = (("caller_to_callee", "b_to_a"), ("callee_to_caller", "a_to_b"))
        if end.media_stats:
            media = {
                name: {
                    "packets": end.media_stats[key]["packets"],
                    "bytes": end.media_stats[key]["bytes"],
                    "lost": end.media_stats[key]["lost"],
                    "jitter_ms": end.media_stats[key]["jitter_ms"] or 0.0,
                }
                for name, key in directions
            }
        for direction, values in (media or {}).items():
            self.metrics.media_packets.labels(direction).inc(values["packets"])
            self.metrics.media_bytes.labels(direction).inc(values["bytes"])
            self.metrics.media_lost_packets.labels(direction).inc(values["lost"])
        record = CallRecord.for_call(
            call_id=call.call_id,
            account=call.account_id,
            device=(call.caller or call.callee).extension if (call.caller or call.callee) else "",
            caller=(
                (call.caller.did or call.caller.extension) if call.caller
                else (call.caller_number or "anonymous")
            ),
            callee_dialled=call.callee_dialled,
            callee_e164=getattr(destination, "e164", None),
            classification=call.classification,
            trunk=getattr(call.trunk, "id", None),
            start=call.started_at,
            answer=call.answered_at,
            end=call.ended_at or call.started_at,
            end_cause=call.end_cause,
            hangup_by=call.hangup_by,
            sip_status=call.final_status or 0,
            media=media,
            node=self.settings.switch.node_id,
            billing=self.billing,
            direction=("inbound" if call.caller is None else
                       "internal" if call.classification == "internal" else "outbound"),
        )
        await self.ledger.append(record)

    def _device_registered(self, device, source_ip: str) -> None:
        """Every registration: the emergency layer follows nomadic devices' networks and
        tells the user (SIP MESSAGE) when their location is unconfirmed or abroad."""
        message = self.emergency.on_registered(device, source_ip)
        if message:
            task = asyncio.get_running_loop().create_task(
                self.calls.send_message(device.username, message))
            self._messages.add(task)
            task.add_done_callback(self._messages.discard)

    def _fairuse_store_state(self, degraded: bool) -> None:
        self.metrics.fairuse_store_degraded.set(1 if degraded else 0)
        if degraded:
            log.error("fairuse.store_degraded",
                      detail="Redis unreachable: fair-use counters are local to this node")
        else:
            log.info("fairuse.store_recovered")

    def _announcement_player(self):
        """A player for the "all emergency routes failed" announcement (EM-13)."""
        media = self.settings.media
        ports = getattr(self.media, "ports", None)
        if ports is None:
            return None
        return AnnouncementSession(
            ports=ports, bind_host=media.bind_host,
            advertise_host=media.advertise_host or media.bind_host,
            wav=self.settings.emergency.announcement,
            max_seconds=3600,  # retries go on until the caller hangs up (EM-13)
        )

    async def reload(self, path: str | None = None) -> tuple[bool, list[str]]:
        """Apply the configuration file again without dropping registrations or calls.
        An invalid file changes nothing: its `file:line: key: problem` errors come back.
        Listen sockets, the binding store, the media backend and the CDR directory are
        fixed at start: a change to them is reported and needs a restart."""
        source = path or self.config_path
        if source is None:
            return False, ["the switch was not started from a configuration file"]
        try:
            new = await asyncio.to_thread(load_settings, source)
        except ConfigError as error:
            log.error("switch.reload_refused", errors=error.errors)
            return False, list(error.errors)
        old = self.settings
        restart_needed = [
            name for name in ("listen", "store", "media", "cdr", "tls")
            if old.model_dump(include={name}) != new.model_dump(include={name})
        ]
        try:
            numbers = EmergencyNumberTable.load(new.emergency.numbers_file)
            directory = DeviceDirectory(new)
            dialplans = {
                account.id: DialPlan.from_settings(
                    new.dialplan, [d.extension for d in account.devices], numbers=numbers)
                for account in new.accounts
            }
        except Exception as exc:  # the loader validated it: this is a bug, not bad input
            log.exception("switch.reload_failed")
            return False, [f"{source}: reload failed: {exc}"]
        self.settings = new
        self.numbers = numbers
        self.directory = directory
        self.registrar.directory = directory
        self.calls.directory = directory
        self.authenticator.lookup_credentials = directory.credentials
        self.dialplans = dialplans
        self.calls.accounts = {account.id: account for account in new.accounts}
        self.calls.country = new.dialplan.country
        self.calls.no_answer_timeout = new.calls.no_answer_timeout
        self.calls.session_expires = new.calls.session_expires
        old_trunks = self.trunks
        self.trunks = TrunkRegistry.from_settings(new, self.core)
        self.calls.trunks = self.trunks
        self.trunks.start()
        await old_trunks.stop()
        self.emergency.reconfigure(new, self.trunks)
        self.fairuse.settings = new.fair_use
        self.fairuse.lease_ttl = new.fair_use.lease_seconds
        self.admin.after_reload()
        log.info("switch.reloaded", source=str(source), devices=len(directory),
                 restart_needed=restart_needed)
        return True, [f"{name}: changed, applied at the next restart" for name in restart_needed]

    def dialplan_for(self, account_id: str) -> DialPlan:
        return self.dialplans[account_id]

    def _is_local_host(self, host: str) -> bool:
        if self.directory.is_local_domain(host):
            return True
        bare = host.strip("[]").lower()
        return any(bare == h.strip("[]").lower() for _, h, _ in self.listening)

    async def handle_options(self, request: SipRequest, flow: Flow, now: float) -> SipResponse:
        """OPTIONS to the switch: 200 with what it supports (RFC 3261 §11.2)."""
        return make_response(
            request, 200, "OK", to_tag=secrets.token_hex(6),
            headers=[
                ("Server", self.server_header),
                ("Allow", ", ".join(sorted(self.core.allowed_methods))),
                ("Accept", "application/sdp"),
                ("Supported", "path, outbound"),
            ],
        )

    async def start(self) -> None:
        if self.media is not None:
            await self.media.start()
        for report in self.ledger.open():
            log.warning("cdr.recovered", report=str(report))
        self.emergency.open()
        await self.fairuse.start()
        tls_context = None
        if self.settings.tls.certificate and self.settings.tls.private_key:
            tls_context = make_server_ssl_context(
                str(self.settings.tls.certificate), str(self.settings.tls.private_key)
            )
        for entry in self.settings.listen:
            host, port = await self.core.listen(
                entry.transport, entry.host, entry.port,
                tls_context if entry.transport in ("tls", "wss") else None,
                path=entry.path,
            )
            self.listening.append((entry.transport, host, port))
        self.availability.open()  # available from here: SIP listeners are up
        self._background.append(asyncio.create_task(self.availability.run()))
        self._background.append(asyncio.create_task(self._sweep_expired()))
        self._background.append(asyncio.create_task(self._emergency_housekeeping()))
        self._background.append(asyncio.create_task(self._watch_overload()))
        if self.emergency.activation is not None and self.settings.emergency.provider:
            self._background.append(asyncio.create_task(self.emergency.run_activation(
                self.settings.emergency.provider.sync_interval)))
        for test_call in self.settings.emergency.test_calls:
            self._background.append(asyncio.create_task(self._scheduled_test_calls(test_call)))
        self.trunks.start()
        self.keepalive.listeners = self.listening
        self._background.append(asyncio.create_task(self.keepalive.run()))
        await self.admin.start()
        log.info(
            "switch.ready",
            node=self.settings.switch.node_id,
            listening=[f"{t}:{h}:{p}" for t, h, p in self.listening],
            devices=len(self.directory),
            store=self.settings.store.backend,
        )

    async def _scheduled_test_calls(self, schedule) -> None:
        """Emergency test calls from a device on a schedule (EM-80)."""
        await asyncio.sleep(schedule.first_after)
        while True:
            try:
                result = await self.calls.place_test_call(
                    schedule.device, service_urn=schedule.service_urn)
                log.info("emergency.test_call_done", **result)
            except Exception:
                log.exception("emergency.test_call_failed", device=schedule.device)
            await asyncio.sleep(schedule.every_minutes * 60)

    async def _watch_overload(self, period: float = 0.1) -> None:
        """Overload control, sampled every 100 ms (see `LoadWatch`): while the event loop
        lags or datagrams queue up unread, a share of new ordinary calls and new
        registrations is refused with 503 and Retry-After; emergency calls are never
        shed."""
        loop = asyncio.get_running_loop()
        watch = LoadWatch()
        while True:
            started, cpu_started = loop.time(), time.thread_time()
            await asyncio.sleep(period)
            elapsed = loop.time() - started
            change = watch.sample(lag=elapsed - period,
                                 busy=(time.thread_time() - cpu_started) / max(elapsed, 1e-6),
                                 queue=self.core.transports.udp_receive_queue_fill())
            self.calls.shed_fraction = self.core.shed_fraction = watch.shed
            if change is True:
                log.warning("switch.overloaded", lag_ms=round(watch.lag * 1000, 1),
                            busy=round(watch.busy, 2), queue=watch.queue, shed=watch.shed)
            elif change is False:
                log.info("switch.overload_ended", lag_ms=round(watch.lag * 1000, 1),
                         busy=round(watch.busy, 2))

    async def _emergency_housekeeping(self) -> None:
        """Hourly: expired callback windows dropped, audit files past the retention
        pruned (in a worker thread: pruning waits for the journal writer)."""
        retention = self.settings.emergency.retention_days
        while True:
            await asyncio.sleep(3600)
            try:
                self.emergency.callbacks.prune()
                if retention is not None:
                    pruned = await asyncio.to_thread(self.emergency.journal.prune, retention)
                    if pruned:
                        log.info("emergency.journal_pruned", files=[str(p) for p in pruned])
            except Exception:
                log.exception("emergency.housekeeping_failed")

    async def _sweep_expired(self) -> None:
        while True:
            try:
                now = time.time()
                expired = await self.store.expire(now)
                if expired:
                    log.debug("registrar.expired", bindings=expired)
                self.metrics.bindings_active.set(await self.store.count(now))
                self.metrics.banned_sources.set(self.bans.banned_count(now))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store outage must not kill the sweeper
                log.warning("registrar.sweep_failed", error=str(exc))
            self.refresh_gauges()
            await asyncio.sleep(EXPIRY_SWEEP_SECONDS)

    def refresh_gauges(self) -> None:
        """Gauges read from their owners at each sweep: media sessions anchored, relay
        port pairs free (built-in relay only), configured devices without a dispatchable
        location (EM-81). Never raises: a failure is logged and the sweep goes on."""
        try:
            sessions = getattr(self.media, "session_count", None)
            if sessions is None:  # rtpengine or no backend: the calls with anchored media
                sessions = sum(1 for call in self.calls.calls.values() if call.media)
            self.metrics.media_sessions_active.set(sessions)
            ports = getattr(self.media, "ports", None)
            if ports is not None:
                self.metrics.media_ports_free.set(ports.available)
            locations = self.emergency.locations
            self.metrics.emergency_devices_without_location.set(sum(
                1 for _, device in self.settings.iter_devices()
                if not locations.has_location(device.username or device.extension)))
        except Exception as exc:
            log.warning("metrics.refresh_failed", error=str(exc))

    async def stop(self) -> None:
        await self.admin.stop()
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.calls.close()
        await self.trunks.stop()
        await self.core.close()
        if self.media is not None:
            await self.media.close()
        await self.ledger.close()
        await self.emergency.close()
        await self.fairuse.close()
        await self.store.close()
        self.availability.close()
        log.info("switch.stopped")


async def serve(settings: Settings, config_path: str | None = None) -> None:
    switch = Softswitch(settings, config_path=config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()

    def reload() -> None:
        task = loop.create_task(switch.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, reload)
    await switch.start()
    # Everything built at start (settings, device directory, dial plans) lives as long as
    # the process: keep it out of the garbage collector's full passes, whose pauses would
    # otherwise grow with the configuration and delay SIP responses.
    gc.collect()
    gc.freeze()
    # Completed transactions live 32 s (Timer J) and are promoted to the oldest generation,
    # so full collections ran every few seconds under load, each pausing 0.2-0.8 s. Most
    # garbage here is freed by reference counting; a full pass every tenth of the default
    # count is enough (measured: 14 -> 2 full passes and 1,360 -> 0 retransmissions in
    # 40 s of 1,000 REGISTER/s).
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)
    try:
        await stop.wait()
        # Graceful shutdown: new INVITEs get 503 + Retry-After, calls in progress have
        # calls.shutdown_grace seconds to end (a second SIGTERM/SIGINT cuts it short);
        # stop() then hangs up the rest and flushes the CDR ledger and emergency journal.
        stop.clear()
        await drain(switch, switch.settings.calls.shutdown_grace, interrupted=stop)
    finally:
        await switch.stop()


def run(settings: Settings, config_path: str | None = None) -> int:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works too
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(settings, config_path))
        else:
            asyncio.run(serve(settings, config_path))
    except (OSError, LedgerLockedError, ValueError) as exc:
        # e.g. a port in use, a second switch on the same CDR directory, a bad Redis URL
        log.error("switch.start_failed", error=str(exc))
        return 1
    return 0

"""The emergency call service: what the call control asks when a device dials an
emergency, test or helpline number, and what it tells back.

Everything an emergency call needs at call time is in memory (EM-82): the sites and
their routes, the devices' locations, the trunks' emergency profiles. The slow parts
never delay the INVITE: the audit journal is written ahead by its own writer thread
(EM-70), notifications go out as their own tasks (EM-60).

For one call, the call control (switch/calls.py) does:

    ctx = service.begin(call, device, destination)   # classified: journal, notify, callback
    for trunk in service.routes(ctx):                  # the caller's site's routes, in order
        invite = service.invite_for(ctx, trunk, sdp, default_location=...)
        service.invite_sent(ctx, trunk, request)       # exact Request-URI, headers, PIDF-LO
        service.response(ctx, trunk, status, reason)   # every attempt's outcome
        service.answered(ctx, trunk)
    service.all_failed(ctx)                            # FAILED notification, announcement
    service.finished(ctx, call, cause)

A callback from the PSAP within the window after the call reaches the device that
made it (`callback_for`, EM-41).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sip.multipart import BodyPart, parse_multipart

from .activation import ActivationRegistry, ActivationService, HttpJsonProvider
from .audit import EmergencyJournal
from .callback import CallbackWindows
from .civic import CivicAddress
from .locations import (
    DeviceLocationConfig,
    LocationService,
    NetworkMapping,
    ResolvedLocation,
    Site,
)
from .lost import LostClient, lost_service_urn, route_for
from .notify import EmergencyNotification, Notifier
from .pidf import build_pidf
from .profiles import (
    EmergencyProfile,
    EmergencyProfileError,
    ProfileKind,
    build_emergency_invite,
    location_parts,
)
from .readiness import readiness

if TYPE_CHECKING:
    from switch.directory import Device
    from switch.metrics import SwitchMetrics
    from switch.settings import Settings

log = structlog.get_logger("e911")


@dataclass(slots=True)
class EmergencyCall:
    """One emergency (or test, or helpline) call as the emergency layer sees it."""

    call_id: str
    device: Device
    number_class: str  # "emergency" | "test" | "helpline"
    dialled: str  # what the device dialled (URI text)
    emergency_number: str | None  # the short number, prefix removed (None for a URN)
    service_urn: str | None
    test: bool
    site: Site | None
    location: ResolvedLocation
    callback_number: str | None
    pidf: tuple[str, bytes] | None  # the switch's location: (Content-ID, document)
    default_pidf: tuple[str, bytes] | None  # the site's validated address, for a 424 retry
    device_parts: list[BodyPart]
    started: float
    other_parts: list[BodyPart] = field(default_factory=list)
    outcome: str = "ROUTING"
    trunk_id: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)


def _text_parts(message: Any) -> bytes:
    """The text/plain content of a response: its body, or its text/plain parts."""
    content_type = (message.header("Content-Type") or "").lower()
    if content_type.startswith("text/plain"):
        return message.body
    if content_type.startswith("multipart/"):
        try:
            parts = parse_multipart(message.header("Content-Type") or "", message.body)
        except Exception:
            return b""
        return b"\n".join(p.body for p in parts
                           if (p.content_type or "").lower().startswith("text/plain"))
    return b""


def _cid(call_id: str) -> str:
    """A Call-ID made safe for the left part of a Content-ID (RFC 2392 addr-spec)."""
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in call_id)[:64] or "call"


def _profile(settings_profile: Any) -> EmergencyProfile | None:
    if settings_profile is None:
        return None
    return EmergencyProfile(
        kind=ProfileKind(settings_profile.profile),
        esrp_route=settings_profile.esrp_route,
        resource_priority=settings_profile.resource_priority,
        trusted_esnet=settings_profile.trusted_esnet,
        priority=settings_profile.priority,
        geolocation_routing=settings_profile.geolocation_routing,
        send_location=settings_profile.send_location,
        emergency_number=settings_profile.emergency_number,
        provider_info_url=settings_profile.provider_info_url,
    )


def sites_from_settings(settings: Settings) -> list[Site]:
    sites = []
    for site in settings.emergency.sites:
        sites.append(Site(
            id=site.id,
            country=site.country,
            address=CivicAddress.from_elements(site.address),
            callback_number=site.callback_number,
            routes=tuple(site.routes),
            webhooks=tuple(site.notify.webhooks),
            desk_devices=tuple(site.notify.devices),
            locations={
                location.id: {name: getattr(location, name)
                              for name in ("BLD", "FLR", "UNIT", "ROOM", "SEAT")
                              if getattr(location, name) is not None}
                for location in site.locations
            },
            networks=tuple(
                NetworkMapping(subnet=ipaddress.ip_network(network.subnet), site_id=site.id,
                               location_id=network.location, country=network.country)
                for network in site.networks
            ),
        ))
    return sites


def devices_from_settings(settings: Settings) -> list[DeviceLocationConfig]:
    return [
        DeviceLocationConfig(
            username=device.username, site_id=device.site, location_id=device.location,
            mobility=device.mobility, did=device.did, extension=device.extension,
            account_id=account.id,
        )
        for account, device in settings.iter_devices()
    ]


def dids_of_site(settings: Settings) -> dict[str, list[str]]:
    """The numbers each site's emergency service is provisioned for at the provider:
    its devices' DIDs and its callback number (a number shared by two sites goes with
    the first)."""
    seen: set[str] = set()
    result: dict[str, list[str]] = {site.id: [] for site in settings.emergency.sites}
    numbers = [(device.site, device.did) for _, device in settings.iter_devices()]
    numbers += [(site.id, site.callback_number) for site in settings.emergency.sites]
    for site_id, number in numbers:
        if site_id in result and number and number not in seen:
            seen.add(number)
            result[site_id].append(number)
    return result


def readiness_of(settings: Settings) -> list[str]:
    """What keeps emergency calling from being ready (EM-81): sites without a validated
    address, route or notification recipient, devices without a location, trunks in
    routes without an emergency profile. Empty when ready."""
    section = settings.emergency
    if not section.sites:
        return ["no emergency site is configured"]
    default_site = section.default_site or section.sites[0].id
    return readiness(
        sites_from_settings(settings), devices_from_settings(settings),
        {trunk.id: (trunk.emergency.profile if trunk.emergency else None)
         for trunk in settings.trunks},
        default_site_id=default_site,
    )


def activation_problems_of(settings: Settings) -> list[str]:
    """The provider activation states as last journaled (read offline: the provider is
    not called), for the readiness command."""
    provider = settings.emergency.provider
    if provider is None:
        return []
    service = ActivationService(
        ActivationRegistry(Path(settings.emergency.journal_dir) / "activation.jsonl"),
        HttpJsonProvider(provider.url, None, provider.timeout),
        sites_from_settings(settings), dids_of_site(settings),
    )
    return service.readiness_problems()


class EmergencyService:
    def __init__(
        self,
        settings: Settings,
        trunks: Any,
        metrics: SwitchMetrics,
        *,
        send_message: Callable[[str, str], Awaitable[bool]] | None = None,
        announcement_factory: Callable[[], Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        section = settings.emergency
        self.section = section
        self.realm = settings.realm
        self.provider_info = (section.provider_info_url
                              or f"https://{settings.switch.domains[0]}/emergency/provider-info")
        self.country = settings.dialplan.country
        self.trunks = trunks
        self.metrics = metrics
        self.wall_clock = wall_clock
        self.announcement_factory = announcement_factory
        self.route_timeout = section.route_timeout
        self.retry_interval = section.retry_interval
        self.release_ordinary_calls = section.release_ordinary_calls
        # With no site configured there is nothing to locate devices against: the policy
        # of refusing ordinary calls of unlocated devices applies once sites exist.
        self.refuses_unlocated = section.unlocated_devices == "refuse" and bool(section.sites)
        self.accounts = {account.id: account for account in settings.accounts}
        self.sites = {site.id: site for site in sites_from_settings(settings)}
        default_site = section.default_site or (section.sites[0].id if section.sites else None)
        self.default_site_id = default_site
        self.locations = LocationService(
            list(self.sites.values()), devices_from_settings(settings),
            journal_path=Path(section.journal_dir) / "locations.jsonl",
            default_site_id=default_site, wall_clock=wall_clock,
        )
        self.callbacks = CallbackWindows(section.callback_window)
        self.journal = EmergencyJournal(Path(section.journal_dir), wall_clock=wall_clock,
                                        on_failure=self._journal_failed)
        self.notifier = Notifier(
            [], send_message=send_message, on_delivery=self._delivered,
            on_alarm=self._notification_alarm, admin_webhooks=list(section.admin_webhooks),
        )
        self.profiles = {trunk.id: _profile(trunk.emergency) for trunk in self._all_trunks()}
        self.lost = self._lost_clients()
        self.activation: ActivationService | None = None
        provider = section.provider
        if provider is not None:
            self.activation = ActivationService(
                ActivationRegistry(Path(section.journal_dir) / "activation.jsonl",
                                   wall_clock=wall_clock),
                HttpJsonProvider(provider.url, provider.token.get_secret_value()
                                 if provider.token else None, provider.timeout),
                list(self.sites.values()), dids_of_site(settings),
                on_alert=lambda kind, text: self._alert(kind, text),
                poll_initial=provider.poll_initial, poll_attempts=provider.poll_attempts,
            )
        self._static_problems = readiness_of(settings)
        metrics.emergency_readiness_problems.set(len(self.problems))

    @property
    def problems(self) -> list[str]:
        """Readiness problems now (EM-81): the configuration's, then the provider's
        activation states (pending, failed)."""
        problems = list(self._static_problems)
        if self.activation is not None:
            problems += self.activation.readiness_problems()
        return problems

    async def run_activation(self, interval: float) -> None:
        """Keep the provider's validation and provisioning states current (EM-51)."""
        if self.activation is None:
            return
        while True:
            try:
                await self.activation.sync_all()
            except Exception:
                log.exception("emergency.activation_sync_failed")
            self.metrics.emergency_readiness_problems.set(len(self.problems))
            await asyncio.sleep(interval)

    def reconfigure(self, settings: Settings, trunks: Any) -> None:
        """A reloaded configuration: sites, devices, routes and profiles replaced; the
        journal, callback windows and nomadic devices' learned networks kept."""
        section = settings.emergency
        sites = {site.id: site for site in sites_from_settings(settings)}
        default_site = section.default_site or (section.sites[0].id if section.sites else None)
        self.locations.replace(list(sites.values()), devices_from_settings(settings),
                               default_site_id=default_site)
        self.section = section
        self.sites = sites
        self.default_site_id = default_site
        self.trunks = trunks
        self.country = settings.dialplan.country
        self.accounts = {account.id: account for account in settings.accounts}
        self.route_timeout = section.route_timeout
        self.retry_interval = section.retry_interval
        self.release_ordinary_calls = section.release_ordinary_calls
        self.refuses_unlocated = section.unlocated_devices == "refuse" and bool(section.sites)
        self.profiles = {trunk.id: _profile(trunk.emergency) for trunk in self._all_trunks()}
        self.lost = self._lost_clients()
        self.notifier.admin_webhooks = list(section.admin_webhooks)
        if self.activation is not None:
            try:
                self.activation.update(list(sites.values()), dids_of_site(settings))
            except ValueError as exc:
                log.error("emergency.activation_update_failed", error=str(exc))
        self._static_problems = readiness_of(settings)
        self.metrics.emergency_readiness_problems.set(len(self.problems))

    def _lost_clients(self) -> dict[str, LostClient]:
        return {
            trunk.id: LostClient(trunk.emergency.lost_server,
                                 timeout=trunk.emergency.lost_timeout)
            for trunk in self._all_trunks()
            if trunk.emergency is not None and trunk.emergency.profile == "i3"
            and trunk.emergency.lost_server
        }

    async def lost_route(self, ctx: EmergencyCall, trunk: Any) -> str | None:
        """The Route the ECRF gives for the caller's location (EM-32), None to use the
        trunk's configured ESRP route (no LoST server, no answer in time, a helpline)."""
        client = self.lost.get(trunk.id)
        if client is None or ctx.number_class == "helpline" or ctx.location.address is None:
            return None
        answer = await client.find_service(ctx.location.address,
                                           lost_service_urn(ctx.service_urn, ctx.test))
        self.journal.record(ctx.call_id, "lost", trunk=trunk.id,
                            uris=list(answer.uris) if answer else [],
                            from_cache=answer.from_cache if answer else False)
        return route_for(answer) if answer else None

    def _all_trunks(self) -> list[Any]:
        return list(getattr(self.trunks, "trunks", []) or [])

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        self.journal.open()
        for problem in self.problems:
            log.warning("emergency.not_ready", problem=problem)

    async def close(self) -> None:
        for client in self.lost.values():
            await client.close()
        await self.notifier.close(2.0)
        await self.journal.flush(timeout=5)
        await self.journal.aclose()

    # -- registration (nomadic devices, EM-52/53/55) ----------------------------------------------
    def on_registered(self, device: Device, source_ip: str) -> str | None:
        """A device registered from ``source_ip``: its location follows its network.
        Returns the text to send the user (SIP MESSAGE), if any."""
        outcome = self.locations.on_register(device.username, source_ip)
        if not outcome.network_changed:  # a refresh from the same network: nothing new
            return None
        if outcome.unverified:
            self._alert("location_unverified", f"{device.username}: registered from"
                        f" {source_ip}, a network with no known location",
                        device=device.username, source=source_ip)
        if outcome.foreign_country:
            self._alert("foreign_country", f"{device.username}: registered from"
                        f" {outcome.foreign_country}", device=device.username,
                        source=source_ip)
        if outcome.moved_fixed:
            self._alert("device_moved", f"{device.username}: a fixed device registered"
                        f" from {source_ip}, outside its site", device=device.username,
                        source=source_ip)
        return outcome.message

    def has_location(self, username: str) -> bool:
        return self.locations.has_location(username)

    # -- the call --------------------------------------------------------------------------------
    def begin(self, call: Any, device: Device, destination: Any) -> EmergencyCall:
        now = self.wall_clock()
        number_class = getattr(destination, "emergency_class", None) or (
            "test" if destination.is_test_call else "emergency")
        location = self.locations.resolve(device.username)
        site = location.site or self.sites.get(self.default_site_id or "")
        account = self.accounts.get(device.account_id)
        callback_number = (device.did or (site.callback_number if site else None)
                           or (account.main_number if account else None))
        try:
            _sdp, device_parts, other_parts = location_parts(
                call.a_request.header("Content-Type") or "", call.a_request.body)
        except Exception as exc:  # a malformed body never stops the call
            log.warning("emergency.device_body_unreadable", error=str(exc))
            device_parts, other_parts = [], []
        entity = f"sip:{callback_number or device.username}@{self.realm}"
        pidf = default_pidf = None
        try:
            if location.address is not None and location.address.elements():
                pidf = (f"loc-{_cid(call.call_id)}@{self.realm}",
                        build_pidf(location.address, entity=entity,
                                   device_id=device.username, timestamp=now,
                                   method=location.method, provided_by=self.provider_info))
            if site is not None:
                default_pidf = (f"default-{_cid(call.call_id)}@{self.realm}",
                                build_pidf(site.address, entity=entity,
                                           device_id=device.username, timestamp=now,
                                           method="Default", provided_by=self.provider_info))
        except ValueError as exc:  # the call goes out without a PIDF-LO rather than not
            log.error("emergency.pidf_failed", call_id=call.call_id, error=str(exc))
        ctx = EmergencyCall(
            call_id=call.call_id, device=device, number_class=number_class,
            dialled=destination.dialled, emergency_number=destination.emergency_number,
            service_urn=destination.service_urn, test=number_class == "test", site=site,
            location=location, callback_number=callback_number, pidf=pidf,
            default_pidf=default_pidf, device_parts=list(device_parts), started=now,
            other_parts=list(other_parts),
        )
        self.metrics.emergency_calls.labels(number_class, str(location.status)).inc()
        self.journal.record(
            call.call_id, "classified", number_class=number_class, dialled=ctx.dialled,
            emergency_number=ctx.emergency_number, service_urn=ctx.service_urn,
            device=device.username, extension=device.extension, account=device.account_id,
            user=device.display_name, site=site.id if site else None,
            callback_number=callback_number, location=dict(location.address.elements())
            if location.address is not None else {},
            location_status=str(location.status), location_note=location.note,
            foreign_country=location.foreign_country,
            device_locations=[part.body for part in device_parts],
        )
        log.warning("emergency.call", call_id=call.call_id, number_class=number_class,
                    dialled=ctx.dialled, device=device.username, callback=callback_number,
                    location=location.address.summary() if location.address else None,
                    location_status=str(location.status))
        if callback_number and number_class != "helpline":
            try:
                self.callbacks.open(callback_number, device.username, call.call_id)
            except ValueError as exc:
                log.warning("emergency.callback_window_failed", error=str(exc))
        if str(location.status) != "verified":
            self._alert("location_unverified",
                        f"emergency call from {device.username} with a"
                        f" {location.status} location", device=device.username,
                        call_id=call.call_id)
        self._notify(ctx)
        return ctx

    def routes(self, ctx: EmergencyCall) -> list[Any]:
        """The caller's site's routes in order, then every other trunk with an emergency
        profile, then the account's ordinary trunk: an emergency call always has a
        route to try (EM-13, EM-26)."""
        by_id = {trunk.id: trunk for trunk in self._all_trunks()}
        ordered: list[Any] = []
        for trunk_id in (ctx.site.routes if ctx.site else ()):
            if trunk_id in by_id and by_id[trunk_id] not in ordered:
                ordered.append(by_id[trunk_id])
        for trunk in by_id.values():
            if trunk.emergency is not None and trunk not in ordered:
                ordered.append(trunk)
        if not ordered:
            fallback = self.trunks.for_outbound(ctx.device.account_id)
            if fallback is not None:
                ordered.append(fallback)
        return ordered

    def invite_for(self, ctx: EmergencyCall, trunk: Any, sdp: bytes, *,
                   default_location: bool = False, route: str | None = None) -> Any:
        profile = self.profiles.get(trunk.id) or EmergencyProfile(kind=ProfileKind.NAT)
        if route is not None and profile.kind is ProfileKind.I3:
            profile = dataclasses.replace(profile, esrp_route=route)
        pidf = ctx.default_pidf if default_location else ctx.pidf
        display = ctx.device.display_name or ctx.device.extension
        number = ctx.emergency_number
        if number is None and ctx.service_urn and not ctx.test:
            # a URN dialled towards a profile that sends digits: the site's emergency number
            country = ctx.site.country if ctx.site else self.country
            number = "911" if country in ("US", "CA") else "112"
        try:
            return build_emergency_invite(
                profile, dialled_number=number, service_urn=ctx.service_urn,
                number_class=ctx.number_class, trunk_domain=trunk.domain,
                callback_number=ctx.callback_number or "", display_name=display, sdp=sdp,
                switch_pidf=pidf, device_parts=[] if default_location else ctx.device_parts,
                test_call=ctx.test, other_parts=ctx.other_parts,
                fallback_user=ctx.device.extension,
            )
        except EmergencyProfileError as exc:
            log.warning("emergency.profile_cannot_carry", call_id=ctx.call_id,
                        trunk=trunk.id, error=str(exc))
            return None

    def invite_sent(self, ctx: EmergencyCall, trunk: Any, request: Any) -> None:
        if not ctx.attempts:  # the first route's INVITE: the setup latency of the call
            self.metrics.emergency_setup_seconds.labels(ctx.number_class).observe(
                max(0.0, self.wall_clock() - ctx.started))
        ctx.trunk_id = trunk.id
        ctx.attempts.append({"trunk": trunk.id, "sent": self.wall_clock()})
        identity = [(name, value) for name, value in request.headers
                    if name in ("From", "To", "P-Asserted-Identity", "Geolocation",
                                "Geolocation-Routing", "Priority", "Resource-Priority",
                                "Route", "Call-Info", "Content-Type")]
        self.journal.record(ctx.call_id, "invite_sent", trunk=trunk.id,
                            request_uri=str(request.uri), headers=identity,
                            body=request.body)

    def response(self, ctx: EmergencyCall, trunk: Any, status: int | None, reason: str, *,
                 body: bytes = b"") -> None:
        result = str(status) if status is not None else (
            "unreachable" if "unreachable" in reason else "timeout")
        self.metrics.emergency_route_attempts.labels(trunk.id, result).inc()
        if ctx.attempts and ctx.attempts[-1].get("trunk") == trunk.id:
            ctx.attempts[-1]["result"] = result
        self.journal.record(ctx.call_id, "response", trunk=trunk.id, status=status,
                            reason=reason, body=body)
        log.warning("emergency.route_failed", call_id=ctx.call_id, trunk=trunk.id,
                    status=status, reason=reason)

    def answered(self, ctx: EmergencyCall, trunk: Any, response: Any = None) -> None:
        self.metrics.emergency_route_attempts.labels(trunk.id, "200").inc()
        ctx.outcome = "ANSWERED"
        text = _text_parts(response) if response is not None else b""
        self.journal.record(ctx.call_id, "answered", trunk=trunk.id, text=text)
        if ctx.test and text:  # a PSAP's readback of a test call (RFC 6881 ED-78)
            self.test_result(ctx, trunk, response.status, text)
        self._notify(ctx)

    def preempted(self, ctx: EmergencyCall, trunk: Any, released_call_id: str | None) -> None:
        if released_call_id is not None:
            self.metrics.emergency_preemptions.labels(trunk.id).inc()
        self.journal.record(ctx.call_id, "preemption", trunk=trunk.id,
                            released_call_id=released_call_id)

    def all_failed(self, ctx: EmergencyCall) -> None:
        ctx.outcome = "FAILED"
        self.metrics.emergency_alarms.labels("all_routes_failed").inc()
        self.journal.record(ctx.call_id, "route_failed", attempts=ctx.attempts)
        log.error("emergency.all_routes_failed", call_id=ctx.call_id, attempts=ctx.attempts)
        self._notify(ctx)

    def finished(self, ctx: EmergencyCall, call: Any, cause: str) -> None:
        outcome = ("answered" if getattr(call, "answered_at", None) else
                   "cancelled" if cause == "cancelled" else "failed")
        self.metrics.emergency_outcomes.labels(outcome, self._profile_label(ctx)).inc()
        self.journal.record(ctx.call_id, "ended", cause=cause, outcome=outcome,
                            status=getattr(call, "final_status", None))
        if outcome != "answered":
            ctx.outcome = "FAILED" if outcome == "failed" else "CANCELLED"
            self._notify(ctx)

    def _profile_label(self, ctx: EmergencyCall) -> str:
        """The emergency profile of the call's last route (an INVITE built without one
        uses the national profile), "none" when no INVITE went out."""
        if ctx.trunk_id is None:
            return "none"
        profile = self.profiles.get(ctx.trunk_id)
        return str(profile.kind if profile is not None else ProfileKind.NAT)

    def test_result(self, ctx: EmergencyCall, trunk: Any, status: int | None,
                    text: bytes) -> None:
        """The outcome of an on-demand test call (EM-80), with the PSAP's text/plain."""
        ctx.outcome = "ANSWERED" if status is not None and status < 300 else "FAILED"
        self.journal.record(ctx.call_id, "test_result", trunk=trunk.id if trunk else None,
                            status=status, text=text)
        log.warning("emergency.test_call", call_id=ctx.call_id, trunk=trunk.id if trunk
                    else None, status=status)

    def announce_first(self, ctx: EmergencyCall) -> bool:
        """Whether the caller hears the announcement before routing (EM-53 policy b)."""
        return (self.section.foreign_policy == "announce_and_route"
                and ctx.location.foreign_country is not None)

    def announcement_player(self) -> Any:
        return self.announcement_factory() if self.announcement_factory else None

    # -- callbacks (EM-41) -----------------------------------------------------------------------
    def callback_for(self, number: str, request: Any) -> str | None:
        """The device a call to ``number`` goes to because it is the callback number of
        a recent emergency call (None otherwise)."""
        if not number:
            return None
        entry = self.callbacks.lookup(number)
        if entry is None:
            return None
        self.callbacks.record_callback(number)
        self.journal.record(entry.call_id, "callback", number=number,
                            device=entry.username, inbound_call_id=request.call_id)
        log.warning("emergency.callback", call_id=entry.call_id, number=number,
                    device=entry.username)
        return entry.username

    # -- notifications ------------------------------------------------------------------------
    def _notify(self, ctx: EmergencyCall) -> None:
        """On-site notification of the call's state; never raises (it must never keep
        an emergency call from going out)."""
        try:
            self._send_notification(ctx)
        except Exception:
            log.exception("emergency.notify_failed", call_id=ctx.call_id)

    def _send_notification(self, ctx: EmergencyCall) -> None:
        if ctx.number_class == "helpline" and not self.section.notify_helplines:
            return
        site = ctx.site
        webhooks = list(site.webhooks) if site else []
        devices = list(site.desk_devices) if site else []
        if ctx.test and self.section.test_call_notify == "admin":
            webhooks, devices = list(self.section.admin_webhooks), []
        address = ctx.location.address
        notification = EmergencyNotification(
            call_id=ctx.call_id, dialled=ctx.emergency_number or ctx.service_urn or ctx.dialled,
            number_class=ctx.number_class, time=ctx.started,
            extension=ctx.device.extension,
            user=ctx.device.display_name or ctx.device.extension,
            device=ctx.device.username, account=ctx.device.account_id,
            site=site.id if site else "", callback_number=ctx.callback_number or "",
            location=dict(address.elements()) if address is not None else {},
            location_summary=address.summary() if address is not None else "",
            location_status=str(ctx.location.status), trunk=ctx.trunk_id,
            outcome=ctx.outcome, test=ctx.test,
        )
        self.notifier.notify(notification, recipients=webhooks, devices=devices)

    def _delivered(self, recipient: str, outcome: str, detail: str) -> None:
        channel = "webhook" if recipient.startswith(("http://", "https://")) else "sip"
        self.metrics.emergency_notifications.labels(channel, str(outcome)).inc()
        label = detail.split(":", 1)[0]  # "call <Call-ID>" or "alert <kind>"
        call_id = label.removeprefix("call ") if label.startswith("call ") else ""
        self.journal.record(call_id, "notification", recipient=recipient,
                            outcome=str(outcome), detail=detail)

    def _notification_alarm(self, recipient: str, reason: str) -> None:
        self.metrics.emergency_alarms.labels("notification_failed").inc()
        log.error("emergency.notification_alarm", recipient=recipient, reason=reason)

    def _journal_failed(self, exc: Exception) -> None:
        self.metrics.emergency_alarms.labels("journal_failed").inc()
        log.error("emergency.journal_failed", error=str(exc))

    def _alert(self, kind: str, text: str, **fields: Any) -> None:
        self.metrics.emergency_alarms.labels(kind).inc()
        try:
            self.notifier.alert_admins(kind, text, **fields)
        except Exception:
            log.exception("emergency.alert_failed", kind=kind)

"""Emergency locations of SIP devices: the dispatchable address sent to the PSAP.

The location model (EM-50): *sites* carry a validated civic address (RFC 5139), named
*locations* refine a site (BLD/FLR/UNIT/ROOM/SEAT, plus LOC), and *devices* are either
*fixed* (their site and location are provisioned) or *nomadic* (their location follows
the network they REGISTER from, through admin-defined subnet mappings, EM-52).

:class:`LocationService` answers three questions:

* ``resolve(username)``: the address to put in the PIDF-LO of an emergency INVITE, with
  its status (verified / default / unconfirmed, EM-24) and PIDF ``method``. It works from
  memory only (EM-82) and never raises: missing data gives the default site's address.
* ``has_location(username)``: whether a device may place non-emergency calls under a
  "no location, no service" policy.
* ``on_register(username, source_ip)``: what a REGISTER from that address means for the
  device's location: a new mapped location, an unconfirmed one (the switch prompts the
  user by SIP MESSAGE), a foreign country (EM-53 warning) or a fixed device that moved
  (EM-55 admin alert).

Every change of a device's location is appended to a journal (JSON Lines, one fsync per
write) with who made it, when, and the old and new address summaries. At start-up the
journal restores each nomadic device's last confirmed location, so a restart does not
forget where a softphone was last verified.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import structlog

from e911.civic import CivicAddress

__all__ = [
    "DeviceLocationConfig",
    "LocationService",
    "LocationStatus",
    "NetworkMapping",
    "Refinement",
    "RegisterOutcome",
    "ResolvedLocation",
    "Site",
    "address_summary",
    "normalise_e164",
]

log = structlog.get_logger("e911.locations")

Mobility = Literal["fixed", "nomadic"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: PIDF-LO ``<gp:method>`` values used here (RFC 4119 method tokens; "Default" per EM-24).
METHOD_MANUAL = "Manual"
METHOD_DEFAULT = "Default"

_E164 = re.compile(r"\+[1-9]\d{6,14}")  # up to 15 digits; 7 is the shortest in use
_VISUAL_SEPARATORS = re.compile(r"[\s\-.()/]")
_COUNTRY = re.compile(r"[A-Z]{2}")
#: In-memory journal size when no journal file is configured.
MEMORY_JOURNAL_ENTRIES = 10_000

# RFC 5139 element -> Refinement attribute (the parts a location may refine).
_REFINEMENT_ELEMENTS: dict[str, str] = {
    "BLD": "building",
    "FLR": "floor",
    "UNIT": "unit",
    "ROOM": "room",
    "SEAT": "seat",
    "LOC": "location_info",
}


def normalise_e164(number: str) -> str:
    """``number`` as E.164 with a leading "+" ("+1 312-555-0100" and "13125550100" give
    "+13125550100"). Raises ValueError if it is not an E.164 number."""
    if not isinstance(number, str):
        raise ValueError(f"callback number {number!r} is not text")
    compact = _VISUAL_SEPARATORS.sub("", number)
    if not compact.startswith("+"):
        compact = "+" + compact
    if not _E164.fullmatch(compact):
        raise ValueError(f"callback number {number!r} is not an E.164 number (e.g. +13125550100)")
    return compact


def address_summary(address: CivicAddress) -> str:
    """One-line human-readable form of a civic address, for journals and messages."""
    summary = getattr(address, "summary", None)
    if callable(summary):
        return str(summary())
    return ", ".join(f"{element} {value}" for element, value in address.elements()) or "(none)"


def _country(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _COUNTRY.fullmatch(value.strip().upper()):
        raise ValueError(f"{what} {value!r} is not an ISO 3166-1 alpha-2 country code")
    return value.strip().upper()


@dataclass(frozen=True, slots=True)
class Refinement:
    """A location within a site: the parts that replace the site address's own (None keeps
    the site's value)."""

    building: str | None = None
    floor: str | None = None
    unit: str | None = None
    room: str | None = None
    seat: str | None = None
    location_info: str | None = None

    def __post_init__(self) -> None:
        for attribute in _REFINEMENT_ELEMENTS.values():
            value = getattr(self, attribute)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"location {attribute} {value!r} is not text")

    @classmethod
    def from_elements(cls, elements: Mapping[str, str | None]) -> Refinement:
        """From RFC 5139 element names: {"FLR": "12", "ROOM": "1204"}. Raises ValueError
        for an element a location cannot refine."""
        unknown = sorted(name for name in elements if name not in _REFINEMENT_ELEMENTS)
        if unknown:
            raise ValueError(f"location element(s) {', '.join(map(str, unknown))} not allowed;"
                             f" use {', '.join(_REFINEMENT_ELEMENTS)}")
        return cls(**{_REFINEMENT_ELEMENTS[name]: None if value is None else str(value)
                      for name, value in elements.items()})

    @classmethod
    def from_address(cls, address: CivicAddress) -> Refinement:
        """The refining parts of a civic address (its empty parts keep the site's value)."""
        return cls(**{attribute: getattr(address, attribute) or None
                      for attribute in _REFINEMENT_ELEMENTS.values()})

    def apply(self, site_address: CivicAddress) -> CivicAddress:
        """The site address refined by this location."""
        return site_address.refine(building=self.building, floor=self.floor, unit=self.unit,
                                   room=self.room, seat=self.seat,
                                   location_info=self.location_info)


@dataclass(frozen=True, slots=True)
class NetworkMapping:
    """An admin-defined source network: devices registering from ``subnet`` are at
    ``site_id`` (and ``location_id`` within it, if given). ``country`` overrides the site's
    country as the network's country (e.g. a VPN concentrator abroad)."""

    subnet: IPNetwork
    site_id: str
    location_id: str | None = None
    country: str | None = None

    def __post_init__(self) -> None:
        subnet: Any = self.subnet
        if not isinstance(subnet, ipaddress.IPv4Network | ipaddress.IPv6Network):
            try:
                subnet = ipaddress.ip_network(str(subnet).strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"network {self.subnet!r} is not a subnet: {exc}") from None
            object.__setattr__(self, "subnet", subnet)
        if not isinstance(self.site_id, str) or not self.site_id:
            raise ValueError(f"network {subnet}: site id missing")
        object.__setattr__(self, "country", _country(self.country, f"network {subnet} country"))


@dataclass(frozen=True)
class Site:
    """A site: its validated civic address, emergency callback number (E.164), emergency
    routes (trunk ids in preference order), MLTS notification recipients, named locations
    and source-network mappings."""

    id: str
    country: str
    address: CivicAddress
    callback_number: str | None = None
    routes: tuple[str, ...] = ()
    webhooks: tuple[str, ...] = ()
    desk_devices: tuple[str, ...] = ()
    locations: Mapping[str, Refinement] = field(default_factory=dict, hash=False)
    networks: tuple[NetworkMapping, ...] = ()
    emails: tuple[str, ...] = ()
    sms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("site id missing")
        object.__setattr__(self, "country", _country(self.country, f"site {self.id} country"))
        if not isinstance(self.address, CivicAddress):
            raise ValueError(f"site {self.id}: address is not a CivicAddress")
        if self.callback_number is not None:
            try:
                number = normalise_e164(self.callback_number)
            except ValueError as exc:
                raise ValueError(f"site {self.id}: {exc}") from None
            object.__setattr__(self, "callback_number", number)
        for name in ("routes", "webhooks", "desk_devices", "networks", "emails", "sms"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"site {self.id}: {name} must be a list, not a string")
            object.__setattr__(self, name, tuple(value))
        for mapping in self.networks:
            if not isinstance(mapping, NetworkMapping):
                raise ValueError(f"site {self.id}: network {mapping!r} is not a NetworkMapping")
        locations: dict[str, Refinement] = {}
        for location_id, value in dict(self.locations).items():
            if isinstance(value, Refinement):
                locations[location_id] = value
            elif isinstance(value, CivicAddress):
                locations[location_id] = Refinement.from_address(value)
            elif isinstance(value, Mapping):
                try:
                    locations[location_id] = Refinement.from_elements(value)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"site {self.id} location {location_id}: {exc}") from None
            else:
                raise ValueError(f"site {self.id} location {location_id}: {value!r} is not a"
                                 " refinement (BLD/FLR/UNIT/ROOM/SEAT)")
        object.__setattr__(self, "locations", MappingProxyType(locations))

    @property
    def notification_recipients(self) -> tuple[str, ...]:
        """Every MLTS notification recipient (webhooks, security-desk devices, email, SMS)."""
        return self.webhooks + self.desk_devices + self.emails + self.sms

    def location_address(self, location_id: str | None) -> CivicAddress | None:
        """The site address refined by ``location_id`` (the site address for None); None
        if the site has no such location."""
        if location_id is None:
            return self.address
        refinement = self.locations.get(location_id)
        return None if refinement is None else refinement.apply(self.address)


@dataclass(frozen=True, slots=True)
class DeviceLocationConfig:
    """A device's provisioned emergency data. ``did`` is its own callback number, if any."""

    username: str
    site_id: str | None = None
    location_id: str | None = None
    mobility: Mobility = "fixed"
    did: str | None = None
    extension: str | None = None
    account_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not self.username:
            raise ValueError("device username missing")
        if self.mobility not in ("fixed", "nomadic"):
            raise ValueError(f"device {self.username}: mobility {self.mobility!r} is not"
                             " 'fixed' or 'nomadic'")
        if self.location_id is not None and self.site_id is None:
            raise ValueError(f"device {self.username}: location {self.location_id!r} given"
                             " without a site")


class LocationStatus(StrEnum):
    """How much the PSAP can trust the address (EM-24, EM-70 audit field)."""

    VERIFIED = "verified"
    DEFAULT = "default"
    UNCONFIRMED = "unconfirmed"


# the empty address of a device with no site at all (CivicAddress is immutable: one is enough)
_NO_ADDRESS = CivicAddress()


@dataclass(frozen=True, slots=True)
class ResolvedLocation:
    """The location to send with an emergency call. ``method`` is the PIDF-LO method.
    ``foreign_country`` is set when the device last registered from another country than
    its site's (EM-53 flag for the audit record and the notification)."""

    address: CivicAddress
    status: LocationStatus
    method: str
    site: Site | None
    location_id: str | None
    verified: bool
    note: str = ""
    foreign_country: str | None = None

    @property
    def site_id(self) -> str | None:
        return None if self.site is None else self.site.id

    @property
    def summary(self) -> str:
        return address_summary(self.address)


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    """What a REGISTER meant for the device's location.

    ``message`` is text for the user (sent as SIP MESSAGE); it is only set when the device
    arrives on a new network (``network_changed``), so re-registrations do not repeat it.
    ``moved_fixed`` and ``foreign_country`` describe the current registration every time.
    """

    changed: bool
    status: LocationStatus
    unverified: bool
    foreign_country: str | None
    moved_fixed: bool
    message: str | None
    network_changed: bool = False


@dataclass(frozen=True, slots=True)
class _Placement:
    site_id: str
    location_id: str | None


@dataclass(slots=True)
class _DeviceState:
    """What the switch learned about a device at run time."""

    network_key: str | None = None  # "net:<subnet>" (mapped) or "ip:<address>" (unmapped)
    source_ip: str | None = None
    mapped: _Placement | None = None  # the mapping of the current network (None: unmapped)
    current: _Placement | None = None  # nomadic: verified placement on the current network
    confirmed: _Placement | None = None  # nomadic: last verified placement
    override: _Placement | None = None  # fixed: set_location() replacing the provisioned one
    override_basis: tuple[str | None, str | None] | None = None
    foreign_country: str | None = None
    moved: bool = False


@dataclass(frozen=True, slots=True)
class _Model:
    """The indexed configuration: replaced as a whole on reload."""

    sites: Mapping[str, Site]
    devices: Mapping[str, DeviceLocationConfig]
    addresses: Mapping[tuple[str, str | None], CivicAddress]
    # ip version -> [(prefix length, {network bits: mapping})], longest prefix first
    networks: Mapping[int, tuple[tuple[int, Mapping[int, NetworkMapping]], ...]]
    site_networks: Mapping[str, tuple[NetworkMapping, ...]]


def _build_model(sites: Iterable[Site], devices: Iterable[DeviceLocationConfig]) -> _Model:
    site_index: dict[str, Site] = {}
    for site in sites:
        if not isinstance(site, Site):
            raise ValueError(f"{site!r} is not a Site")
        if site.id in site_index:
            raise ValueError(f"site {site.id} defined twice")
        site_index[site.id] = site
    device_index: dict[str, DeviceLocationConfig] = {}
    for device in devices:
        if not isinstance(device, DeviceLocationConfig):
            raise ValueError(f"{device!r} is not a DeviceLocationConfig")
        if device.username in device_index:
            raise ValueError(f"device {device.username} defined twice")
        device_index[device.username] = device
    addresses: dict[tuple[str, str | None], CivicAddress] = {}
    for site in site_index.values():
        addresses[(site.id, None)] = site.address
        for location_id, refinement in site.locations.items():
            addresses[(site.id, location_id)] = refinement.apply(site.address)
    tables: dict[int, dict[int, dict[int, NetworkMapping]]] = {4: {}, 6: {}}
    site_networks: dict[str, list[NetworkMapping]] = {}
    for site in site_index.values():
        for mapping in site.networks:
            target = site_index.get(mapping.site_id)
            if target is None:
                raise ValueError(f"site {site.id}: network {mapping.subnet} maps to unknown"
                                 f" site {mapping.site_id}")
            if mapping.location_id is not None and mapping.location_id not in target.locations:
                raise ValueError(f"site {site.id}: network {mapping.subnet} maps to unknown"
                                 f" location {mapping.location_id} of site {target.id}")
            subnet = mapping.subnet
            table = tables[subnet.version].setdefault(subnet.prefixlen, {})
            bits = int(subnet.network_address) >> (subnet.max_prefixlen - subnet.prefixlen)
            if bits in table and table[bits] != mapping:
                raise ValueError(f"network {subnet} is mapped twice")
            table[bits] = mapping
            site_networks.setdefault(mapping.site_id, []).append(mapping)
    networks = {
        version: tuple((length, MappingProxyType(table))
                       for length, table in sorted(by_length.items(), reverse=True))
        for version, by_length in tables.items()
    }
    return _Model(sites=MappingProxyType(site_index), devices=MappingProxyType(device_index),
                  addresses=MappingProxyType(addresses), networks=MappingProxyType(networks),
                  site_networks=MappingProxyType({k: tuple(v) for k, v in site_networks.items()}))


def _parse_source_ip(source_ip: str) -> IPAddress | None:
    """The address in "10.0.0.1", "10.0.0.1:5060", "[2001:db8::1]:5060", "fe80::1%eth0"."""
    if not isinstance(source_ip, str):
        return None
    return _parse_source_text(source_ip)


@functools.lru_cache(maxsize=8192)  # devices re-register from the same few addresses
def _parse_source_text(source_ip: str) -> IPAddress | None:
    text = source_ip.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class LocationService:
    """The in-memory emergency location model (see the module docstring).

    Raises ValueError at construction (or ``replace``) for an inconsistent configuration:
    duplicate site ids or usernames, a network mapped twice, or a mapping to an unknown
    site or location. Devices referring to unknown sites or locations are accepted (their
    calls get the default location; ``readiness()`` reports them).
    """

    def __init__(self, sites: Iterable[Site], devices: Iterable[DeviceLocationConfig], *,
                 journal_path: Path | None = None, default_site_id: str | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._model = _build_model(sites, devices)
        self._journal_path = None if journal_path is None else Path(journal_path)
        self.default_site_id = default_site_id
        self._wall_clock = wall_clock
        self._states: dict[str, _DeviceState] = {}
        self._memory_journal: deque[dict[str, Any]] = deque(maxlen=MEMORY_JOURNAL_ENTRIES)
        #: Journal writes that failed (the change still took effect; an alarm is due).
        self.journal_failures = 0
        if self._journal_path is not None:
            self._restore_from_journal()

    # -- configuration ---------------------------------------------------------------

    @property
    def sites(self) -> Mapping[str, Site]:
        return self._model.sites

    @property
    def devices(self) -> Mapping[str, DeviceLocationConfig]:
        return self._model.devices

    @property
    def default_site(self) -> Site | None:
        if self.default_site_id is None:
            return None
        return self._model.sites.get(self.default_site_id)

    def replace(self, sites: Iterable[Site], devices: Iterable[DeviceLocationConfig], *,
                default_site_id: str | None | Literal[False] = False) -> None:
        """Hot reload: new sites and devices (and default site, unless left at False).
        Learned state is kept: each nomadic device's location is re-derived from its last
        source address under the new mappings, and user confirmations on an unchanged
        network stay. Resulting location changes are journaled as made by "admin". On a
        ValueError the old configuration stays in force."""
        new_model = _build_model(sites, devices)
        before = {username: self._resolve(username)
                  for username in self._model.devices if username in new_model.devices}
        self._model = new_model
        if default_site_id is not False:
            self.default_site_id = default_site_id
        for username in list(self._states):
            if username not in new_model.devices:
                del self._states[username]
        for username, state in self._states.items():
            device = new_model.devices[username]
            if state.override is not None and state.override_basis != (device.site_id,
                                                                        device.location_id):
                state.override = None  # the provisioned location was edited: it wins
                state.override_basis = None
            if device.mobility == "fixed":
                state.current = None
                state.confirmed = None
            else:
                state.override = None
                state.override_basis = None
            if state.source_ip is not None:
                self._observe_network(device, state, state.source_ip, reload=True)
        entries = []
        for username in sorted(new_model.devices):
            after = self._resolve(username)
            old = before.get(username)
            if old is not None and _location_key(old) != _location_key(after):
                entries.append(self._entry(username, "admin", "reload", old, after))
        self._append_journal(entries)

    # -- emergency call --------------------------------------------------------------

    def resolve(self, username: str) -> ResolvedLocation:
        """The location for ``username``'s emergency call. Memory only; never raises."""
        try:
            return self._resolve(username)
        except Exception as exc:  # an emergency call is never blocked by a location bug
            log.exception("emergency_location_failed", username=username)
            return self._default(None, f"location lookup failed: {exc!r}", None)

    def has_location(self, username: str) -> bool:
        """Whether the device has a dispatchable location now: a fixed device with a valid
        site and location, or a nomadic device whose current network is mapped (or whose
        location was confirmed on it)."""
        device = self._model.devices.get(username)
        if device is None:
            return False
        state = self._states.get(username)
        if device.mobility == "fixed":
            placement = self._fixed_placement(device, state)
            return (placement is not None and placement.location_id is not None
                    and self._address(placement) is not None)
        return (state is not None and state.current is not None
                and self._address(state.current) is not None)

    # -- registrar ---------------------------------------------------------------------

    def on_register(self, username: str, source_ip: str) -> RegisterOutcome:
        """Update the device's location from the source address of its REGISTER."""
        device = self._model.devices.get(username)
        if device is None:
            return RegisterOutcome(changed=False, status=LocationStatus.DEFAULT, unverified=True,
                                   foreign_country=None, moved_fixed=False, message=None)
        state = self._states.setdefault(username, _DeviceState())
        before = self._resolve(username)
        network_changed = self._observe_network(device, state, source_ip, reload=False)
        after = self._resolve(username)
        changed = _location_key(before) != _location_key(after)
        if changed:
            self._append_journal([self._entry(username, "registrar", "register", before, after,
                                              source_ip=source_ip)])
            log.info("emergency_location_changed", username=username, source_ip=source_ip,
                     old=address_summary(before.address), new=address_summary(after.address),
                     status=str(after.status))
        message = None
        if network_changed:
            parts = []
            if device.mobility == "nomadic" and state.mapped is None:
                parts.append(_unconfirmed_message(after))
            if state.foreign_country is not None:
                parts.append(_foreign_message(state.foreign_country, self._home_country(device)))
            message = " ".join(parts) or None
        if state.moved and network_changed:
            log.warning("emergency_fixed_device_moved", username=username, source_ip=source_ip,
                        site_id=device.site_id)
        return RegisterOutcome(changed=changed, status=after.status,
                               unverified=after.status is not LocationStatus.VERIFIED,
                               foreign_country=state.foreign_country, moved_fixed=state.moved,
                               message=message, network_changed=network_changed)

    # -- admin / user confirmation ---------------------------------------------------------

    def set_location(self, username: str, site_id: str, location_id: str | None, *,
                     by: str) -> ResolvedLocation:
        """Confirm or set the device's location (``by``: the user's name or "admin").
        Always journaled. A nomadic device keeps it while on the same network; a fixed
        device keeps it until its provisioned location is edited. Raises ValueError for an
        unknown device, site or location."""
        device = self._model.devices.get(username)
        if device is None:
            raise ValueError(f"unknown device {username!r}")
        site = self._model.sites.get(site_id)
        if site is None:
            raise ValueError(f"unknown site {site_id!r}")
        if location_id is not None and location_id not in site.locations:
            raise ValueError(f"site {site_id} has no location {location_id!r}")
        if not isinstance(by, str) or not by:
            raise ValueError("who set the location (by) is missing")
        state = self._states.setdefault(username, _DeviceState())
        before = self._resolve(username)
        placement = _Placement(site_id, location_id)
        if device.mobility == "nomadic":
            state.current = placement
            state.confirmed = placement
        elif placement == _Placement(device.site_id or "", device.location_id):
            state.override = None
            state.override_basis = None
        else:
            state.override = placement
            state.override_basis = (device.site_id, device.location_id)
        after = self._resolve(username)
        self._append_journal([self._entry(username, by, "confirm", before, after)])
        return after

    def history(self, username: str | None = None) -> list[dict[str, Any]]:
        """Journaled location changes (oldest first), all or one device's."""
        entries = (self._read_journal() if self._journal_path is not None
                   else list(self._memory_journal))
        if username is None:
            return entries
        return [entry for entry in entries if entry.get("username") == username]

    # -- internals -----------------------------------------------------------------------

    def _address(self, placement: _Placement) -> CivicAddress | None:
        return self._model.addresses.get((placement.site_id, placement.location_id))

    def _fixed_placement(self, device: DeviceLocationConfig,
                         state: _DeviceState | None) -> _Placement | None:
        if state is not None and state.override is not None:
            return state.override
        if device.site_id is None:
            return None
        return _Placement(device.site_id, device.location_id)

    def _home_country(self, device: DeviceLocationConfig) -> str | None:
        site = self._model.sites.get(device.site_id or "") or self.default_site
        return None if site is None else site.country

    def _verified(self, placement: _Placement, note: str,
                  foreign: str | None) -> ResolvedLocation | None:
        address = self._address(placement)
        if address is None:
            return None
        return ResolvedLocation(address=address, status=LocationStatus.VERIFIED,
                                method=METHOD_MANUAL, site=self._model.sites[placement.site_id],
                                location_id=placement.location_id, verified=True, note=note,
                                foreign_country=foreign)

    def _default(self, site: Site | None, note: str, foreign: str | None) -> ResolvedLocation:
        if site is None:
            site = self.default_site
            if site is None:
                return ResolvedLocation(
                    address=_NO_ADDRESS, status=LocationStatus.DEFAULT, method=METHOD_DEFAULT,
                    site=None, location_id=None, verified=False,
                    note=f"{note}; no default site configured: no address",
                    foreign_country=foreign)
            note = f"{note}; default site {site.id}"
        return ResolvedLocation(address=site.address, status=LocationStatus.DEFAULT,
                                method=METHOD_DEFAULT, site=site, location_id=None,
                                verified=False, note=note, foreign_country=foreign)

    def _resolve(self, username: str) -> ResolvedLocation:
        device = self._model.devices.get(username)
        state = self._states.get(username)
        foreign = None if state is None else state.foreign_country
        if device is None:
            return self._default(None, f"device {username!r} has no location configuration",
                                 foreign)
        if device.mobility == "fixed":
            placement = self._fixed_placement(device, state)
            if placement is None:
                return self._default(None, "device has no site", foreign)
            site = self._model.sites.get(placement.site_id)
            if site is None:
                return self._default(None, f"site {placement.site_id!r} is not configured",
                                     foreign)
            if placement.location_id is None:
                return self._default(site, "fixed device without a location in its site",
                                     foreign)
            note = ("registered from a network outside its site"
                    if state is not None and state.moved else "")
            resolved = self._verified(placement, note, foreign)
            if resolved is None:
                return self._default(site, f"location {placement.location_id!r} is not defined"
                                     f" at site {site.id}", foreign)
            return resolved
        # nomadic
        if state is not None and state.current is not None:
            resolved = self._verified(state.current, "", foreign)
            if resolved is not None:
                return resolved
        last = None if state is None else state.confirmed
        if last is None and device.site_id is not None and device.location_id is not None:
            last = _Placement(device.site_id, device.location_id)  # provisioned home location
        if last is not None:
            address = self._address(last)
            if address is not None:
                return ResolvedLocation(
                    address=address, status=LocationStatus.UNCONFIRMED, method=METHOD_MANUAL,
                    site=self._model.sites[last.site_id], location_id=last.location_id,
                    verified=False, note="last confirmed location; current network not mapped",
                    foreign_country=foreign)
        site = self._model.sites.get(device.site_id or "")
        return self._default(site, "nomadic device without a confirmed location", foreign)

    def _match(self, address: IPAddress) -> NetworkMapping | None:
        for length, table in self._model.networks.get(address.version, ()):
            mapping = table.get(int(address) >> (address.max_prefixlen - length))
            if mapping is not None:
                return mapping
        return None

    def _observe_network(self, device: DeviceLocationConfig, state: _DeviceState,
                         source_ip: str, *, reload: bool) -> bool:
        """Apply a REGISTER source address (or re-apply it after a reload) to the state;
        returns whether the device is on a different network than before."""
        address = _parse_source_ip(source_ip)
        mapping = None if address is None else self._match(address)
        key = f"net:{mapping.subnet}" if mapping is not None else f"ip:{address or source_ip}"
        network_changed = key != state.network_key
        placement = (None if mapping is None
                     else _Placement(mapping.site_id, mapping.location_id))
        if device.mobility == "nomadic":
            if placement is not None and (network_changed or placement != state.mapped):
                state.current = placement
                state.confirmed = placement
            elif placement is None and (network_changed or (reload and state.mapped is not None)):
                state.current = None  # on an unknown network: location unconfirmed
        state.mapped = placement
        state.network_key = key
        state.source_ip = source_ip
        home = self._home_country(device)
        network_country = None
        if mapping is not None:
            network_country = mapping.country or self._model.sites[mapping.site_id].country
        state.foreign_country = (network_country if network_country is not None
                                 and home is not None and network_country != home else None)
        state.moved = False
        if device.mobility == "fixed":
            fixed = self._fixed_placement(device, state)
            if fixed is not None and self._model.site_networks.get(fixed.site_id):
                state.moved = mapping is None or mapping.site_id != fixed.site_id
        return network_changed

    def _entry(self, username: str, who: str, reason: str, old: ResolvedLocation,
               new: ResolvedLocation, *, source_ip: str | None = None) -> dict[str, Any]:
        now = self._wall_clock()
        device = self._model.devices.get(username)
        return {
            "when": _iso(now),
            "ts": now,
            "username": username,
            "who": who,
            "reason": reason,
            "old": address_summary(old.address),
            "old_status": str(old.status),
            "new": address_summary(new.address),
            "status": str(new.status),
            "site_id": new.site_id,
            "location_id": new.location_id,
            "source_ip": source_ip,
            "config": None if device is None else [device.site_id, device.location_id],
        }

    def _append_journal(self, entries: list[dict[str, Any]]) -> None:
        """Append entries as JSON lines with one write and one fsync. A failure is logged
        and counted, never raised: the location change has already taken effect."""
        if not entries:
            return
        if self._journal_path is None:
            self._memory_journal.extend(entries)
            return
        data = "".join(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n"
                       for entry in entries).encode()
        try:
            self._journal_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a torn last line stays apart from the new ones
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.journal_failures += 1
            log.error("emergency_location_journal_failed", path=str(self._journal_path),
                      error=str(exc), entries=len(entries))

    def _read_journal(self) -> list[dict[str, Any]]:
        assert self._journal_path is not None
        try:
            raw = self._journal_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("emergency_location_journal_unreadable", path=str(self._journal_path),
                      error=str(exc))
            return []
        entries = []
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn or damaged line
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def _restore_from_journal(self) -> None:
        """Each nomadic device's last verified location becomes its last confirmed one;
        a fixed device's set_location() override comes back if its provisioning is the
        same as when it was made."""
        last: dict[str, dict[str, Any]] = {}
        last_verified: dict[str, dict[str, Any]] = {}
        for entry in self._read_journal():
            username = entry.get("username")
            if isinstance(username, str):
                last[username] = entry
                if entry.get("status") == LocationStatus.VERIFIED:
                    last_verified[username] = entry
        for username, device in self._model.devices.items():
            source = last_verified if device.mobility == "nomadic" else last
            entry = source.get(username)
            if entry is None:
                continue
            site_id, location_id = entry.get("site_id"), entry.get("location_id")
            if (entry.get("status") != LocationStatus.VERIFIED or not isinstance(site_id, str)
                    or not (location_id is None or isinstance(location_id, str))):
                continue
            placement = _Placement(site_id, location_id)
            if self._address(placement) is None:
                continue
            if device.mobility == "nomadic":
                self._states.setdefault(username, _DeviceState()).confirmed = placement
            elif (entry.get("reason") == "confirm"
                  and entry.get("config") == [device.site_id, device.location_id]
                  and placement != _Placement(device.site_id or "", device.location_id)):
                state = self._states.setdefault(username, _DeviceState())
                state.override = placement
                state.override_basis = (device.site_id, device.location_id)


def _location_key(resolved: ResolvedLocation) -> tuple[CivicAddress, LocationStatus]:
    return resolved.address, resolved.status


def _unconfirmed_message(resolved: ResolvedLocation) -> str:
    if resolved.status is LocationStatus.UNCONFIRMED:
        fallback = f"your last confirmed address ({address_summary(resolved.address)})"
    elif resolved.site is not None:
        fallback = f"the default address of site {resolved.site.id}"
    else:
        fallback = "no address"
    return ("Your emergency location is unconfirmed: this network is not known to the"
            f" phone system. Emergency calls will carry {fallback}. Please confirm your"
            " location with your administrator or in your softphone.")


def _foreign_message(country: str, home: str | None) -> str:
    return (f"Warning: you are connected from a network in {country}, outside {home}."
            " Emergency calls from this phone may not reach local emergency services;"
            " use a local phone or mobile.")

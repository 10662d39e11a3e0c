"""Emergency-calling readiness (EM-81): the problems that would make a 911/112 call from
this switch go out without a validated address, an emergency route, an on-site (MLTS)
notification, a trunk emergency profile, or a device location.

:func:`readiness` returns one line per problem, for the start-up log and the health
status, in a fixed order: the default site, then sites (by id), trunks (by id) and
devices (by username).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from e911.locations import DeviceLocationConfig, Site

__all__ = ["readiness"]


def _site_lines(site: Site, trunks: Mapping[str, str | None]) -> list[str]:
    lines: list[str] = []
    problems = list(site.address.validate())
    address_country = site.address.country.strip().upper()
    if address_country and address_country != site.country:
        problems.append(f"address country {address_country} differs from the site's"
                        f" country {site.country}")
    if problems:
        lines.append(f"{site.id}: address not validated: {'; '.join(problems)}")
    if not site.routes:
        lines.append(f"{site.id}: no emergency route")
    for trunk_id in dict.fromkeys(site.routes):
        if trunk_id not in trunks:
            lines.append(f"{site.id}: route {trunk_id} is not a configured trunk")
    if not site.notification_recipients:
        lines.append(f"{site.id}: no MLTS notification recipient")
    return lines


def _has_location(device: DeviceLocationConfig | None, sites: Mapping[str, Site]) -> bool:
    if device is None or device.site_id is None:
        return False
    site = sites.get(device.site_id)
    if site is None:
        return False
    if device.mobility == "nomadic":
        return True  # its location comes from the network it registers from (EM-52)
    return device.location_id is not None and device.location_id in site.locations


def readiness(sites: Iterable[Site], devices: Iterable[DeviceLocationConfig],
              trunks: Mapping[str, str | None], *, active_devices: set[str] | None = None,
              default_site_id: str | None = None) -> list[str]:
    """Readiness problems, one line each ([] = ready).

    ``trunks`` maps every configured trunk id to its emergency profile name (None or ""
    if it has none). ``active_devices`` limits the device checks to those usernames
    (registered devices); None checks every configured device. A default site is the one
    whose address goes with calls of devices that have none (EM-24).
    """
    site_index: dict[str, Site] = {}
    for site in sites:
        site_index.setdefault(site.id, site)
    device_index: dict[str, DeviceLocationConfig] = {}
    for device in devices:
        device_index.setdefault(device.username, device)

    lines: list[str] = []
    if default_site_id is None or default_site_id not in site_index:
        lines.append("no default site")
    for site_id in sorted(site_index):
        lines.extend(_site_lines(site_index[site_id], trunks))
    routed = {trunk_id for site in site_index.values() for trunk_id in site.routes}
    for trunk_id in sorted(routed):
        if trunk_id in trunks and not trunks[trunk_id]:
            lines.append(f"{trunk_id}: no emergency profile")
    usernames = set(device_index) if active_devices is None else set(active_devices)
    for username in sorted(usernames):
        if not _has_location(device_index.get(username), site_index):
            lines.append(f"{username}: no location")
    return lines

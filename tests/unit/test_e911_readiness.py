"""Emergency readiness checks (EM-81): one line per problem, in a fixed order."""

from __future__ import annotations

from e911.civic import CivicAddress
from e911.locations import DeviceLocationConfig, Refinement, Site
from e911.readiness import readiness

CHICAGO = CivicAddress.from_elements({"country": "US", "A1": "IL", "A3": "Chicago",
                                      "RD": "Wacker", "STS": "Dr", "HNO": "233",
                                      "PC": "60606"})
TRUNKS: dict[str, str | None] = {"ETRUNK": "P-PIDF", "BACKUP": "P-DLR", "PLAIN": None}


def site(site_id: str, **changes: object) -> Site:
    values: dict[str, object] = {
        "address": CHICAGO, "callback_number": "+13125550100", "routes": ("ETRUNK",),
        "webhooks": ("https://hooks.example/e911",),
        "locations": {"flr12": Refinement(floor="12", room="1204")},
    }
    values.update(changes)
    return Site(site_id, "US", **values)  # type: ignore[arg-type]


GOOD_DEVICES = [
    DeviceLocationConfig("dev1", "S1", "flr12", "fixed"),
    DeviceLocationConfig("dev3", "S1", None, "nomadic"),
]


def test_ready_configuration_has_no_problem() -> None:
    assert readiness([site("S1")], GOOD_DEVICES, TRUNKS, default_site_id="S1") == []


def test_site_without_recipients_is_reported_in_the_em81_form() -> None:
    sites = [site("S1"), site("S2", webhooks=())]
    assert readiness(sites, GOOD_DEVICES, TRUNKS, default_site_id="S1") == [
        "S2: no MLTS notification recipient"]


def test_any_recipient_kind_counts() -> None:
    sites = [site("S1", webhooks=(), desk_devices=("security",)),
             site("S2", webhooks=(), emails=("desk@example.com",)),
             site("S3", webhooks=(), sms=("+13125550199",))]
    assert readiness(sites, [], TRUNKS, default_site_id="S1") == []


def test_invalid_site_address_lists_its_problems() -> None:
    address = CivicAddress.from_elements({"country": "US", "A1": "IL", "RD": "Wacker"})
    lines = readiness([site("S1", address=address)], [], TRUNKS, default_site_id="S1")
    assert lines == ["S1: address not validated: house number (HNO) missing; "
                     "postal code (PC) missing"]


def test_address_country_must_match_site_country() -> None:
    berlin = CivicAddress.from_elements({"country": "DE", "A1": "BE", "A3": "Berlin",
                                         "RD": "Unter den Linden", "HNO": "1", "PC": "10117"})
    lines = readiness([site("S1", address=berlin)], [], TRUNKS, default_site_id="S1")
    assert lines == ["S1: address not validated: address country DE differs from the site's"
                     " country US"]


def test_routes_and_trunk_profiles() -> None:
    sites = [site("S1", routes=()), site("S2", routes=("GHOST", "PLAIN", "ETRUNK")),
             site("S3", routes=("PLAIN",))]
    lines = readiness(sites, [], TRUNKS, default_site_id="S1")
    assert lines == [
        "S1: no emergency route",
        "S2: route GHOST is not a configured trunk",
        "PLAIN: no emergency profile",  # once, though two sites route through it
    ]


def test_unused_trunk_without_profile_is_not_reported() -> None:
    assert readiness([site("S1")], [], {"ETRUNK": "P-I3", "OFFICE": None},
                     default_site_id="S1") == []


def test_empty_profile_name_counts_as_none() -> None:
    assert readiness([site("S1")], [], {"ETRUNK": ""}, default_site_id="S1") == [
        "ETRUNK: no emergency profile"]


def test_devices_without_location() -> None:
    devices = GOOD_DEVICES + [
        DeviceLocationConfig("dev2", "S1", None, "fixed"),  # fixed, site only
        DeviceLocationConfig("dev9", None, None, "fixed"),  # no site
        DeviceLocationConfig("dev4", None, None, "nomadic"),  # nomadic without site
        DeviceLocationConfig("dev7", "S1", "roof", "fixed"),  # undefined location
        DeviceLocationConfig("dev8", "GONE", None, "nomadic"),  # unknown site
    ]
    lines = readiness([site("S1")], devices, TRUNKS, default_site_id="S1")
    assert lines == ["dev2: no location", "dev4: no location", "dev7: no location",
                     "dev8: no location", "dev9: no location"]


def test_only_active_devices_are_checked_when_given() -> None:
    devices = GOOD_DEVICES + [DeviceLocationConfig("dev2", "S1", None, "fixed"),
                              DeviceLocationConfig("dev9", None, None, "fixed")]
    lines = readiness([site("S1")], devices, TRUNKS, active_devices={"dev1", "dev9", "ghost"},
                      default_site_id="S1")
    assert lines == ["dev9: no location", "ghost: no location"]


def test_no_default_site() -> None:
    assert readiness([site("S1")], [], TRUNKS) == ["no default site"]
    assert readiness([site("S1")], [], TRUNKS, default_site_id="S9") == ["no default site"]


def test_order_is_deterministic() -> None:
    sites = [site("S2", webhooks=(), routes=()), site("S1", routes=("NEW", "PLAIN"))]
    devices = [DeviceLocationConfig("zed"), DeviceLocationConfig("amy")]
    expected = [
        "no default site",
        "S1: route NEW is not a configured trunk",
        "S2: no emergency route",
        "S2: no MLTS notification recipient",
        "PLAIN: no emergency profile",
        "amy: no location",
        "zed: no location",
    ]
    assert readiness(sites, devices, TRUNKS) == expected
    assert readiness(list(reversed(sites)), list(reversed(devices)), TRUNKS) == expected

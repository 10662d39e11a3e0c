"""The emergency location model: sites, locations, fixed and nomadic devices (EM-24, EM-50,
EM-52, EM-53, EM-55), the location journal and hot reload."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from e911.civic import CivicAddress
from e911.locations import (
    DeviceLocationConfig,
    LocationService,
    LocationStatus,
    NetworkMapping,
    Refinement,
    ResolvedLocation,
    Site,
    address_summary,
    normalise_e164,
)

CHICAGO = CivicAddress.from_elements({"country": "US", "A1": "IL", "A3": "Chicago",
                                      "RD": "Wacker", "STS": "Dr", "HNO": "233",
                                      "PC": "60606"})
EVANSTON = CivicAddress.from_elements({"country": "US", "A1": "IL", "A3": "Evanston",
                                       "RD": "Sheridan", "STS": "Rd", "HNO": "633",
                                       "PC": "60208"})
BERLIN = CivicAddress.from_elements({"country": "DE", "A1": "BE", "A3": "Berlin",
                                     "RD": "Unter den Linden", "HNO": "1", "PC": "10117"})
T0 = 1_800_000_000.0


def make_sites(*, s1_networks: tuple[NetworkMapping, ...] | None = None) -> list[Site]:
    s1_default = (
        NetworkMapping(ipaddress.ip_network("10.2.0.0/16"), "S1"),
        NetworkMapping(ipaddress.ip_network("10.2.0.0/24"), "S1", "flr3"),
        NetworkMapping(ipaddress.ip_network("2001:db8:2::/48"), "S1", "flr3"),
    )
    return [
        Site("S1", "US", CHICAGO, callback_number="+13125550100", routes=("ETRUNK",),
             webhooks=("https://hooks.example/e911",),
             locations={"flr12": Refinement(floor="12", room="1204"),
                        "flr3": Refinement.from_elements({"FLR": "3"})},
             networks=s1_default if s1_networks is None else s1_networks),
        Site("S2", "US", EVANSTON, routes=("ETRUNK",), desk_devices=("security",),
             locations={"lab": Refinement(building="B", room="Lab-1")},
             networks=(NetworkMapping("10.3.0.0/24", "S2", "lab"),)),
        Site("DE1", "DE", BERLIN, routes=("DETRUNK",), webhooks=("https://hooks.example/de",),
             networks=(NetworkMapping("10.50.0.0/16", "DE1"),
                       NetworkMapping("10.60.0.0/16", "S2", country="DE"))),
    ]


def make_devices() -> list[DeviceLocationConfig]:
    return [
        DeviceLocationConfig("dev1", "S1", "flr12", "fixed", did="+13125550101",
                             extension="101", account_id="acme"),
        DeviceLocationConfig("dev2", "S1", None, "fixed", extension="102"),
        DeviceLocationConfig("dev3", "S1", None, "nomadic", extension="103"),
        DeviceLocationConfig("dev9", None, None, "fixed", extension="109"),
        DeviceLocationConfig("dev5", "S1", "flr12", "nomadic", extension="105"),
        DeviceLocationConfig("dev6", "S2", "lab", "fixed", extension="106"),
        DeviceLocationConfig("dev7", "S2", "nowhere", "fixed", extension="107"),
        DeviceLocationConfig("dev8", "GONE", None, "fixed", extension="108"),
    ]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make_service(tmp_path: Path | None, *, default_site_id: str | None = "S1",
                 clock: Clock | None = None) -> LocationService:
    journal = None if tmp_path is None else tmp_path / "locations.jsonl"
    return LocationService(make_sites(), make_devices(), journal_path=journal,
                           default_site_id=default_site_id, wall_clock=clock or Clock())


def journal_lines(tmp_path: Path) -> list[dict]:
    path = tmp_path / "locations.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- resolve() for fixed devices ------------------------------------------------------


def test_fixed_device_with_site_and_location_gets_full_verified_address(tmp_path: Path) -> None:
    resolved = make_service(tmp_path).resolve("dev1")
    assert resolved.status is LocationStatus.VERIFIED
    assert resolved.verified is True
    assert resolved.method == "Manual"
    assert resolved.site is not None and resolved.site.id == "S1"
    assert resolved.site_id == "S1"
    assert resolved.location_id == "flr12"
    assert resolved.address.floor == "12" and resolved.address.room == "1204"
    assert resolved.address.road == "Wacker" and resolved.address.house_number == "233"
    assert ("FLR", "12") in resolved.address.elements()
    assert resolved.foreign_country is None


def test_fixed_device_with_site_but_no_location_gets_site_address_as_default() -> None:
    resolved = make_service(None).resolve("dev2")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.method == "Default"
    assert resolved.verified is False
    assert resolved.address == CHICAGO
    assert resolved.site_id == "S1"
    assert resolved.location_id is None


def test_fixed_device_with_undefined_location_falls_back_to_its_site() -> None:
    resolved = make_service(None).resolve("dev7")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.address == EVANSTON
    assert "nowhere" in resolved.note


def test_device_without_site_gets_default_site_address() -> None:
    resolved = make_service(None, default_site_id="S2").resolve("dev9")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.method == "Default"
    assert resolved.address == EVANSTON
    assert resolved.site_id == "S2"
    assert "default site S2" in resolved.note


def test_device_with_unknown_site_gets_default_site_address() -> None:
    resolved = make_service(None).resolve("dev8")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.address == CHICAGO
    assert "GONE" in resolved.note


def test_no_default_site_still_resolves_with_empty_address_and_note() -> None:
    service = make_service(None, default_site_id=None)
    resolved = service.resolve("dev9")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.method == "Default"
    assert resolved.site is None
    assert resolved.address.elements() == []
    assert "no default site" in resolved.note


def test_unknown_default_site_id_behaves_as_no_default_site() -> None:
    resolved = make_service(None, default_site_id="NOPE").resolve("dev9")
    assert resolved.site is None and "no default site" in resolved.note


def test_unknown_device_resolves_to_default_site() -> None:
    resolved = make_service(None).resolve("stranger")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.address == CHICAGO
    assert "stranger" in resolved.note


def test_resolve_never_raises_even_on_internal_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    service = make_service(None)

    def broken(username: str) -> ResolvedLocation:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "_resolve", broken)
    resolved = service.resolve("dev1")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.address == CHICAGO
    assert "boom" in resolved.note


# -- nomadic devices: network-based location (EM-52) ------------------------------------


def test_nomadic_device_never_registered_gets_site_default() -> None:
    resolved = make_service(None).resolve("dev3")
    assert resolved.status is LocationStatus.DEFAULT
    assert resolved.address == CHICAGO


def test_nomadic_register_from_mapped_subnet_gives_verified_location(tmp_path: Path) -> None:
    clock = Clock()
    service = make_service(tmp_path, clock=clock)
    outcome = service.on_register("dev3", "10.2.0.77")
    assert outcome.changed is True
    assert outcome.status is LocationStatus.VERIFIED
    assert outcome.unverified is False
    assert outcome.message is None
    assert outcome.network_changed is True
    resolved = service.resolve("dev3")
    assert resolved.status is LocationStatus.VERIFIED and resolved.method == "Manual"
    assert resolved.address.floor == "3"
    assert resolved.location_id == "flr3"
    lines = journal_lines(tmp_path)
    assert len(lines) == 1
    assert lines[0]["username"] == "dev3"
    assert lines[0]["who"] == "registrar"
    assert lines[0]["ts"] == T0
    assert lines[0]["when"] == "2027-01-15T08:00:00.000Z"
    assert lines[0]["old"] == address_summary(CHICAGO)
    assert lines[0]["new"] == address_summary(resolved.address)
    assert lines[0]["site_id"] == "S1" and lines[0]["location_id"] == "flr3"
    assert lines[0]["old_status"] == "default" and lines[0]["status"] == "verified"
    assert lines[0]["source_ip"] == "10.2.0.77"


def test_most_specific_subnet_wins() -> None:
    service = make_service(None)
    service.on_register("dev3", "10.2.0.5")  # in the /24 (FLR 3) and in the /16 (site only)
    assert service.resolve("dev3").location_id == "flr3"
    service.on_register("dev3", "10.2.9.5")  # only in the /16
    resolved = service.resolve("dev3")
    assert resolved.status is LocationStatus.VERIFIED
    assert resolved.location_id is None
    assert resolved.address == CHICAGO


def test_specificity_does_not_depend_on_declaration_order() -> None:
    networks = (NetworkMapping("10.2.0.0/24", "S1", "flr3"), NetworkMapping("10.2.0.0/16", "S1"))
    sites = make_sites(s1_networks=networks)
    service = LocationService(sites, make_devices(), default_site_id="S1")
    service.on_register("dev3", "10.2.0.200")
    assert service.resolve("dev3").location_id == "flr3"


def test_ipv6_and_port_and_mapped_ipv4_source_addresses_are_matched() -> None:
    service = make_service(None)
    service.on_register("dev3", "[2001:db8:2::10]:5060")
    assert service.resolve("dev3").location_id == "flr3"
    service.on_register("dev3", "10.3.0.4:5060")
    assert service.resolve("dev3").location_id == "lab"
    service.on_register("dev3", "::ffff:10.2.0.9")
    assert service.resolve("dev3").location_id == "flr3"


def test_nomadic_move_to_unmapped_network_keeps_last_confirmed_flagged_unconfirmed(
        tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.on_register("dev3", "10.2.0.7")
    outcome = service.on_register("dev3", "10.9.0.7")
    assert outcome.changed is True
    assert outcome.status is LocationStatus.UNCONFIRMED
    assert outcome.unverified is True
    assert outcome.message is not None and "unconfirmed" in outcome.message
    resolved = service.resolve("dev3")
    assert address_summary(resolved.address) in outcome.message  # what a call would carry
    assert resolved.status is LocationStatus.UNCONFIRMED
    assert resolved.verified is False
    assert resolved.address.floor == "3"
    assert service.has_location("dev3") is False
    lines = journal_lines(tmp_path)
    assert [line["status"] for line in lines] == ["verified", "unconfirmed"]
    assert lines[1]["old"] == lines[1]["new"]  # same address, status changed


def test_unmapped_without_confirmed_location_prompts_and_stays_default() -> None:
    service = make_service(None)
    outcome = service.on_register("dev3", "192.0.2.1")
    assert outcome.changed is False
    assert outcome.status is LocationStatus.DEFAULT
    assert outcome.unverified is True
    assert outcome.message is not None and "unconfirmed" in outcome.message
    assert "site S1" in outcome.message


def test_reregistration_from_same_network_is_no_change_and_no_new_prompt(
        tmp_path: Path) -> None:
    service = make_service(tmp_path)
    first = service.on_register("dev3", "10.9.0.7")
    again = service.on_register("dev3", "10.9.0.7")
    assert first.message is not None
    assert again.message is None and again.network_changed is False
    assert again.changed is False and again.unverified is True
    service.on_register("dev3", "10.2.0.1")
    same_subnet = service.on_register("dev3", "10.2.0.2")
    assert same_subnet.changed is False and same_subnet.network_changed is False
    assert len(journal_lines(tmp_path)) == 1


def test_nomadic_provisioned_location_is_its_unconfirmed_fallback() -> None:
    service = make_service(None)
    resolved = service.resolve("dev5")
    assert resolved.status is LocationStatus.UNCONFIRMED
    assert resolved.address.room == "1204"


def test_unparseable_source_address_counts_as_unmapped_network() -> None:
    service = make_service(None)
    outcome = service.on_register("dev3", "not-an-ip")
    assert outcome.unverified is True
    assert outcome.message is not None


def test_register_of_unknown_device_is_harmless() -> None:
    service = make_service(None)
    outcome = service.on_register("stranger", "10.2.0.1")
    assert outcome.changed is False and outcome.unverified is True
    assert outcome.message is None


# -- foreign country (EM-53) and fixed device moved (EM-55) -------------------------


def test_register_from_network_in_other_country_warns() -> None:
    service = make_service(None)
    outcome = service.on_register("dev3", "10.50.1.1")
    assert outcome.foreign_country == "DE"
    assert outcome.message is not None
    assert "may not reach local emergency services" in outcome.message
    resolved = service.resolve("dev3")
    assert resolved.foreign_country == "DE"
    assert resolved.site_id == "DE1"  # the call still carries the mapped address (policy a)
    home = service.on_register("dev3", "10.2.0.1")
    assert home.foreign_country is None
    assert service.resolve("dev3").foreign_country is None


def test_mapping_country_overrides_site_country() -> None:
    service = make_service(None)
    outcome = service.on_register("dev3", "10.60.0.1")  # site S2 (US) but declared DE
    assert outcome.foreign_country == "DE"


def test_foreign_warning_only_on_arrival_on_the_network() -> None:
    service = make_service(None)
    service.on_register("dev3", "10.50.1.1")
    again = service.on_register("dev3", "10.50.1.2")
    assert again.foreign_country == "DE" and again.message is None


def test_fixed_device_registering_from_unmapped_network_is_moved() -> None:
    service = make_service(None)
    outcome = service.on_register("dev1", "10.9.0.1")
    assert outcome.moved_fixed is True
    assert outcome.changed is False
    assert outcome.status is LocationStatus.VERIFIED
    assert outcome.unverified is False
    resolved = service.resolve("dev1")
    assert resolved.status is LocationStatus.VERIFIED  # still sends its provisioned address
    assert "outside its site" in resolved.note


def test_fixed_device_registering_from_another_sites_network_is_moved() -> None:
    service = make_service(None)
    assert service.on_register("dev1", "10.3.0.9").moved_fixed is True
    assert service.on_register("dev1", "10.2.44.1").moved_fixed is False
    assert service.resolve("dev1").note == ""


def test_fixed_device_at_site_without_networks_is_never_moved() -> None:
    sites = make_sites(s1_networks=())
    service = LocationService(sites, make_devices(), default_site_id="S1")
    assert service.on_register("dev1", "10.9.0.1").moved_fixed is False


def test_fixed_device_location_never_follows_the_network(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.on_register("dev1", "10.3.0.9")
    assert service.resolve("dev1").location_id == "flr12"
    assert journal_lines(tmp_path) == []


# -- has_location --------------------------------------------------------------------


def test_has_location() -> None:
    service = make_service(None)
    assert service.has_location("dev1") is True
    assert service.has_location("dev2") is False  # site only
    assert service.has_location("dev7") is False  # undefined location
    assert service.has_location("dev9") is False  # no site
    assert service.has_location("stranger") is False
    assert service.has_location("dev3") is False
    service.on_register("dev3", "10.2.9.9")
    assert service.has_location("dev3") is True
    service.on_register("dev3", "172.16.0.1")
    assert service.has_location("dev3") is False


# -- set_location and history ----------------------------------------------------------


def test_user_confirmation_on_unmapped_network_is_verified_and_kept(tmp_path: Path) -> None:
    clock = Clock()
    service = make_service(tmp_path, clock=clock)
    service.on_register("dev3", "192.0.2.50")
    clock.now += 60
    resolved = service.set_location("dev3", "S2", "lab", by="dev3")
    assert resolved.status is LocationStatus.VERIFIED
    assert resolved.address.room == "Lab-1"
    assert service.has_location("dev3") is True
    again = service.on_register("dev3", "192.0.2.50")  # re-REGISTER, same network
    assert again.changed is False and again.status is LocationStatus.VERIFIED
    moved = service.on_register("dev3", "192.0.2.51")  # another unknown network
    assert moved.status is LocationStatus.UNCONFIRMED
    assert service.resolve("dev3").address.room == "Lab-1"
    history = service.history("dev3")
    assert [entry["who"] for entry in history] == ["dev3", "registrar"]
    assert history[0]["ts"] == T0 + 60
    assert history[0]["reason"] == "confirm"
    assert history[0]["site_id"] == "S2" and history[0]["location_id"] == "lab"
    assert history == journal_lines(tmp_path)


def test_admin_sets_fixed_device_location(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    resolved = service.set_location("dev2", "S1", "flr12", by="admin")
    assert resolved.status is LocationStatus.VERIFIED
    assert service.resolve("dev2").address.room == "1204"
    assert service.has_location("dev2") is True
    (line,) = journal_lines(tmp_path)
    assert line["who"] == "admin" and line["username"] == "dev2"
    assert line["old_status"] == "default" and line["status"] == "verified"


def test_set_location_rejects_unknown_references() -> None:
    service = make_service(None)
    with pytest.raises(ValueError, match="unknown device"):
        service.set_location("nobody", "S1", None, by="admin")
    with pytest.raises(ValueError, match="unknown site"):
        service.set_location("dev1", "S9", None, by="admin")
    with pytest.raises(ValueError, match="no location"):
        service.set_location("dev1", "S1", "roof", by="admin")
    with pytest.raises(ValueError, match="by"):
        service.set_location("dev1", "S1", None, by="")


def test_history_filters_by_device_and_works_without_journal_file() -> None:
    service = make_service(None)
    service.on_register("dev3", "10.2.0.1")
    service.set_location("dev2", "S1", "flr3", by="admin")
    assert [entry["username"] for entry in service.history()] == ["dev3", "dev2"]
    assert [entry["username"] for entry in service.history("dev2")] == ["dev2"]
    assert service.history("dev1") == []


def test_history_skips_torn_lines_and_new_lines_start_clean(tmp_path: Path) -> None:
    path = tmp_path / "locations.jsonl"
    path.write_text('{"username": "old", "status": "verified"}\n{"username": "to')
    service = make_service(tmp_path)
    service.on_register("dev3", "10.2.0.1")
    history = service.history()
    assert [entry["username"] for entry in history] == ["old", "dev3"]


def test_journal_failure_does_not_block_the_change(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    service = LocationService(make_sites(), make_devices(), default_site_id="S1",
                              journal_path=blocker / "locations.jsonl")
    outcome = service.on_register("dev3", "10.2.0.1")
    assert outcome.changed is True
    assert service.resolve("dev3").status is LocationStatus.VERIFIED
    assert service.journal_failures == 1
    assert service.history() == []


def test_restart_restores_last_confirmed_location_from_journal(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.on_register("dev3", "10.3.0.1")  # verified at S2 lab
    service.on_register("dev3", "10.9.9.9")  # unconfirmed afterwards
    service.set_location("dev2", "S1", "flr3", by="admin")
    restarted = make_service(tmp_path)
    resolved = restarted.resolve("dev3")
    assert resolved.status is LocationStatus.UNCONFIRMED
    assert resolved.address.room == "Lab-1"
    assert restarted.resolve("dev2").location_id == "flr3"
    assert restarted.resolve("dev2").status is LocationStatus.VERIFIED


# -- replace (hot reload) --------------------------------------------------------------


def test_replace_keeps_learned_nomadic_location(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.on_register("dev3", "10.2.0.1")
    service.set_location("dev2", "S1", "flr12", by="admin")
    service.replace(make_sites(), make_devices())
    assert service.resolve("dev3").location_id == "flr3"
    assert service.resolve("dev3").status is LocationStatus.VERIFIED
    assert service.resolve("dev2").location_id == "flr12"  # provisioning unchanged
    assert len(journal_lines(tmp_path)) == 2  # nothing changed: nothing journaled


def test_replace_remaps_nomadic_device_and_journals_as_admin(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    service.on_register("dev3", "10.2.0.1")
    networks = (NetworkMapping("10.2.0.0/24", "S1", "flr12"),)
    service.replace(make_sites(s1_networks=networks), make_devices())
    resolved = service.resolve("dev3")
    assert resolved.location_id == "flr12"
    last = journal_lines(tmp_path)[-1]
    assert last["who"] == "admin" and last["reason"] == "reload"
    assert last["username"] == "dev3"


def test_replace_unmapping_network_makes_location_unconfirmed() -> None:
    service = make_service(None)
    service.on_register("dev3", "10.2.0.1")
    service.replace(make_sites(s1_networks=()), make_devices())
    assert service.resolve("dev3").status is LocationStatus.UNCONFIRMED


def test_replace_drops_removed_devices_and_edited_provisioning_wins() -> None:
    service = make_service(None)
    service.set_location("dev2", "S1", "flr12", by="admin")
    service.on_register("dev3", "10.2.0.1")
    devices = [d for d in make_devices() if d.username != "dev3"]
    devices = [DeviceLocationConfig("dev2", "S1", "flr3", "fixed") if d.username == "dev2"
               else d for d in devices]
    service.replace(make_sites(), devices)
    assert service.resolve("dev2").location_id == "flr3"
    assert service.resolve("dev3").status is LocationStatus.DEFAULT
    assert "dev3" not in service.devices


def test_replace_with_bad_config_keeps_old_one() -> None:
    service = make_service(None)
    sites = make_sites()
    with pytest.raises(ValueError, match="defined twice"):
        service.replace(sites + [sites[0]], make_devices())
    assert service.resolve("dev1").status is LocationStatus.VERIFIED


def test_replace_can_change_default_site() -> None:
    service = make_service(None)
    service.replace(make_sites(), make_devices(), default_site_id="S2")
    assert service.resolve("dev9").address == EVANSTON


# -- configuration errors -----------------------------------------------------------


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="mobility"):
        DeviceLocationConfig("x", "S1", None, "roaming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without a site"):
        DeviceLocationConfig("x", None, "flr1")
    with pytest.raises(ValueError, match="E.164"):
        Site("S", "US", CHICAGO, callback_number="call me")
    with pytest.raises(ValueError, match="country"):
        Site("S", "USA", CHICAGO)
    with pytest.raises(ValueError, match="not allowed"):
        Refinement.from_elements({"RD": "Main"})
    with pytest.raises(ValueError, match="not a subnet"):
        NetworkMapping("10.0.0.0/33", "S1")
    with pytest.raises(ValueError, match="must be a list"):
        Site("S", "US", CHICAGO, routes="ETRUNK")  # type: ignore[arg-type]
    dangling = [Site("S", "US", CHICAGO, networks=(NetworkMapping("10.0.0.0/8", "T"),))]
    with pytest.raises(ValueError, match="unknown site T"):
        LocationService(dangling, [])
    bad_location = [Site("S", "US", CHICAGO, networks=(NetworkMapping("10.0.0.0/8", "S", "x"),))]
    with pytest.raises(ValueError, match="unknown location x"):
        LocationService(bad_location, [])
    twice = [Site("S", "US", CHICAGO, networks=(NetworkMapping("10.0.0.0/8", "S"),
                                                NetworkMapping("10.1.2.3/8", "S", None, "DE")))]
    with pytest.raises(ValueError, match="mapped twice"):
        LocationService(twice, [])
    with pytest.raises(ValueError, match="defined twice"):
        LocationService([], [DeviceLocationConfig("a"), DeviceLocationConfig("a")])


def test_site_normalises_inputs() -> None:
    site = Site("S", "us", CHICAGO, callback_number="1 312-555-0100", routes=["A", "B"],
                locations={"x": {"FLR": "2"}, "y": CivicAddress(room="9")})
    assert site.country == "US"
    assert site.callback_number == "+13125550100"
    assert site.routes == ("A", "B")
    assert site.location_address("x") is not None and site.location_address("x").floor == "2"
    assert site.location_address("y") is not None and site.location_address("y").room == "9"
    assert site.location_address("y").road == "Wacker"
    assert site.location_address("z") is None
    assert normalise_e164("+44 20 7946 0000") == "+442079460000"

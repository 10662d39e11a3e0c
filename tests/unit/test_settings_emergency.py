"""The `emergency:` settings section and the device, account and trunk keys it uses:
every mistake is reported as `file:line: key: problem`, cross references are checked,
and emergency numbers are refused as forwarding targets and speed dials (EM-06)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from switch.settings import ConfigError, Settings, load_settings_text

BASE = """\
dialplan: {country: FR, outside_line_prefix: "0"}
accounts:
  - id: acme
    suspended: false
    devices:
      - {extension: "101", password: "p101-secret", site: lyon, location: b312, did: "+33478000101"}
      - {extension: "102", password: "p102-secret", site: lyon, mobility: nomadic}
      - {extension: "103", password: "p103-secret"%s}
trunks:
  - id: orange
    kind: peer
    host: 127.0.0.2
    addresses: [127.0.0.2]
    channels: 2
    emergency: {profile: nat%s}
emergency:
  callback_window: 1800
  sites:
    - id: lyon
      country: FR
      address: {country: FR, A1: "69", A3: Lyon, RD: Rue de la République, HNO: 10, PC: "69002"%s}
      callback_number: "+33478000100"
      routes: [orange%s]
      locations: [{id: b312, FLR: 3, ROOM: B312}]
      networks: [{subnet: 10.2.0.0/24, location: b312%s}]
      notify: {devices: ["101"], webhooks: ["http://127.0.0.1:9/hook"]}
"""


def config(device: str = "", profile: str = "", address: str = "", routes: str = "",
           network: str = "") -> str:
    return BASE % (device, profile, address, routes, network)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings_text(text, "cfg.yaml")
    return caught.value.errors


def test_a_complete_emergency_section_loads(tmp_path: Path) -> None:
    settings: Settings = load_settings_text(config(), str(tmp_path / "switch.yaml"))
    site = settings.emergency.sites[0]
    assert site.address["HNO"] == "10"  # numbers in addresses are accepted unquoted
    assert site.locations[0].FLR == "3"
    assert site.networks[0].subnet == "10.2.0.0/24"
    assert settings.trunks[0].channels == 2
    assert settings.trunks[0].emergency.profile == "nat"
    assert settings.emergency.journal_dir == tmp_path / "var" / "emergency"
    device = settings.accounts[0].devices[1]
    assert device.mobility == "nomadic" and device.location is None


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"routes": ", sfr"}, "cfg.yaml:23: emergency.sites[0].routes[1]: unknown trunk 'sfr'"),
        ({"network": ", country: FRA"}, "cfg.yaml:25: emergency.sites[0].networks[0].country:"),
        ({"address": ", BOGUS: x"}, "cfg.yaml:21: emergency.sites[0].address: unknown civic address element 'BOGUS'"),
        ({"profile": ", resource_priority: esnet.1"},
         "cfg.yaml:15: trunks[0].emergency.resource_priority: Resource-Priority is only sent"
         " to a trusted emergency network"),
        ({"profile": ", kind: x"}, "cfg.yaml:15: trunks[0].emergency.kind: unknown key"),
        ({"device": ", site: paris"},
         "cfg.yaml:8: accounts[0].devices[2].site: unknown emergency site 'paris'"),
        ({"device": ", site: lyon, location: attic"},
         "cfg.yaml:8: accounts[0].devices[2].location: site 'lyon' has no location 'attic'"),
    ],
)
def test_mistakes_point_at_their_line(kwargs: dict[str, str], expected: str) -> None:
    errors = errors_of(config(**kwargs))
    assert any(line.startswith(expected) for line in errors), errors


@pytest.mark.parametrize("target", ["112", "0112", "18", "urn:service:sos", "sip:112@pbx"])
def test_emergency_numbers_are_refused_as_forwarding_targets(target: str) -> None:
    errors = errors_of(config(device=f', forward_all: "{target}"'))
    assert any("accounts[0].devices[2].forward_all" in e and "is an emergency number" in e
               for e in errors), errors


@pytest.mark.parametrize("target", ["112", "017", "116000"])
def test_emergency_numbers_are_refused_as_speed_dials(target: str) -> None:
    errors = errors_of(config(device=f', speed_dials: {{"*1": "{target}"}}'))
    assert any("speed_dials.*1" in e and "is an emergency number" in e for e in errors), errors


def test_ordinary_forwarding_and_speed_dials_are_accepted() -> None:
    settings = load_settings_text(
        config(device=', forward_all: "102", speed_dials: {"*1": "0478000000"}'), "cfg.yaml")
    device = settings.accounts[0].devices[2]
    assert device.forward_all == "102" and device.speed_dials == {"*1": "0478000000"}


def test_callback_window_below_thirty_minutes_is_refused() -> None:
    text = config().replace("callback_window: 1800", "callback_window: 600")
    assert any("emergency.callback_window" in e for e in errors_of(text))


def test_a_bad_numbers_file_is_reported(tmp_path: Path) -> None:
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text(textwrap.dedent("""\
        FR:
          emergency: ["1x2"]
        """))
    text = config().replace("callback_window: 1800",
                            f"callback_window: 1800\n  numbers_file: {numbers}")
    errors = errors_of(text)
    assert any("emergency.numbers_file" in e and "numbers.yaml:2" in e for e in errors), errors

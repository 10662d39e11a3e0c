"""Settings loading: valid files load into typed values, and every kind of problem is
reported as one exact ``file:line: key: problem`` line pointing at the right line."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from pydantic import SecretStr

from switch.settings import ConfigError, Settings, load_settings, load_settings_text

REPO = Path(__file__).resolve().parents[2]


def errors_of(text: str, filename: str = "cfg.yaml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings_text(textwrap.dedent(text), filename)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def load(text: str, filename: str = "cfg.yaml") -> Settings:
    return load_settings_text(textwrap.dedent(text), filename)


# ---- valid configurations -------------------------------------------------------------


def test_empty_file_gives_documented_defaults() -> None:
    settings = load("")
    assert settings.switch.node_id == "node-1"
    assert settings.switch.domains == ["127.0.0.1", "localhost"]
    assert settings.switch.max_message_size == 65535
    assert [(e.transport, e.host, e.port) for e in settings.listen] == [
        ("udp", "127.0.0.1", 5060),
        ("tcp", "127.0.0.1", 5060),
    ]
    assert settings.registrar.default_expires == 3600
    assert settings.registrar.keepalive_interval == 30
    assert settings.auth.algorithms == ["SHA-256", "MD5"]
    assert settings.auth.ban.ban_time == 600
    assert settings.store.backend == "memory"
    assert settings.logging.level == "info" and settings.logging.format == "json"
    assert settings.accounts == []
    assert settings.realm == "127.0.0.1"


def test_valid_account_loads_with_username_defaulting_to_extension() -> None:
    settings = load(
        """
        switch:
          domains: [PBX.Example.com, "[::1]"]
        auth:
          realm: corp
        accounts:
          - id: acme
            name: ACME Corp
            main_number: "+33 1 23 45 67 89"
            devices:
              - extension: "0100"
                password: s3cret-pass
                did: "+33123456790"
              - extension: "1001"
                username: acme-1001
                kind: ata
                ha1_md5: 0123456789ABCDEF0123456789abcdef
        """
    )
    assert settings.switch.domains == ["pbx.example.com", "::1"]
    assert settings.realm == "corp"
    account = settings.accounts[0]
    assert account.main_number == "+33123456789"
    first, second = account.devices
    assert (first.extension, first.username, first.kind) == ("0100", "0100", "softphone")
    assert isinstance(first.password, SecretStr)
    assert first.password.get_secret_value() == "s3cret-pass"
    assert "s3cret-pass" not in repr(settings) and "s3cret-pass" not in str(first)
    assert (second.username, second.kind, second.password) == ("acme-1001", "ata", None)
    assert settings.find_device("acme-1001") == (account, second)
    assert settings.find_device("nobody") is None
    assert [d.extension for _, d in settings.iter_devices()] == ["0100", "1001"]
    assert settings.is_local_domain("[::1]") and settings.is_local_domain("PBX.EXAMPLE.COM")
    assert not settings.is_local_domain("example.org")


def test_realm_defaults_to_first_domain() -> None:
    assert load("switch: {domains: [voice.example.net, 10.0.0.1]}\n").realm == "voice.example.net"


@pytest.mark.parametrize("name", ["switch.yaml", "example-full.yaml"])
def test_shipped_configurations_load(name: str) -> None:
    settings = load_settings(REPO / "config" / name)
    assert settings.listen
    assert settings.accounts and all(account.devices for account in settings.accounts)


def test_embedded_default_listens_on_loopback_only_with_four_demo_devices() -> None:
    settings = load_settings(REPO / "config" / "switch.yaml")
    assert {(e.transport, e.host, e.port) for e in settings.listen} == {
        ("udp", "127.0.0.1", 5060),
        ("tcp", "127.0.0.1", 5060),
    }
    assert settings.store.backend == "memory"
    devices = [device for _, device in settings.iter_devices()]
    assert [d.extension for d in devices] == ["1000", "1001", "1002", "1003"]
    assert [d.kind for d in devices] == ["desk_phone", "ata", "softphone", "softphone"]
    assert all(d.password is not None for d in devices)


def test_example_full_ha1_hashes_match_documented_passwords() -> None:
    settings = load_settings(REPO / "config" / "example-full.yaml")
    assert settings.store.backend == "redis"
    assert any(e.host == "::" for e in settings.listen)
    devices = {d.username: d for _, d in settings.iter_devices()}
    md5 = hashlib.md5(f"2001:{settings.realm}:change-me-2001".encode()).hexdigest()
    sha = hashlib.sha256(f"2002:{settings.realm}:change-me-2002".encode()).hexdigest()
    assert devices["2001"].ha1_md5 is not None
    assert devices["2001"].ha1_md5.get_secret_value() == md5
    assert devices["2002"].ha1_sha256 is not None
    assert devices["2002"].ha1_sha256.get_secret_value() == sha


def test_tls_files_are_resolved_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "cert.pem").write_text("cert")
    (tmp_path / "tls" / "key.pem").write_text("key")
    config = tmp_path / "switch.yaml"
    config.write_text(
        "listen:\n"
        "  - {transport: tls, host: 127.0.0.1, port: 5061}\n"
        "tls:\n"
        "  certificate: tls/cert.pem\n"
        "  private_key: tls/key.pem\n"
    )
    settings = load_settings(config)
    assert settings.tls.certificate == tmp_path / "tls" / "cert.pem"
    assert settings.tls.private_key == tmp_path / "tls" / "key.pem"


# ---- errors: one exact line per problem -------------------------------------------------


def test_missing_credentials_point_at_the_device_line() -> None:
    assert errors_of(
        """\
        accounts:
          - id: acme
            devices:
              - extension: "1000"
                password: x
              - extension: "1001"
                display_name: Bob
        """,
        "config/switch.yaml",
    ) == [
        "config/switch.yaml:6: accounts[0].devices[1].password:"
        " either password, ha1_md5 or ha1_sha256 is required"
    ]


def test_two_credentials_point_at_the_second_one() -> None:
    assert errors_of(
        """\
        accounts:
          - id: acme
            devices:
              - extension: "1000"
                password: x
                ha1_sha256: "0000000000000000000000000000000000000000000000000000000000000000"
        """
    ) == [
        "cfg.yaml:6: accounts[0].devices[0].ha1_sha256:"
        " only one of password, ha1_md5 or ha1_sha256 may be given"
    ]


def test_unquoted_numeric_secrets_are_refused() -> None:
    assert errors_of(
        """\
        accounts:
          - id: acme
            devices:
              - {extension: "1000", password: 1234}
              - {extension: "1001", ha1_md5: 01234567890123456789012345678901}
        """
    ) == [
        "cfg.yaml:4: accounts[0].devices[0].password: must be a quoted string",
        "cfg.yaml:5: accounts[0].devices[1].ha1_md5: must be a quoted string",
    ]


def test_unknown_keys_are_refused_at_their_line() -> None:
    assert errors_of(
        """\
        switch:
          node_id: a
          domian: [x]
        registrar:
          max_expiry: 10
        colour: blue
        """
    ) == [
        "cfg.yaml:3: switch.domian: unknown key",
        "cfg.yaml:5: registrar.max_expiry: unknown key",
        "cfg.yaml:6: colour: unknown key",
    ]


def test_bad_listen_entries_report_each_field() -> None:
    assert errors_of(
        """\
        listen:
          - {transport: udp, host: 127.0.0.1, port: 5060}
          - transport: sctp
            host: pbx.example.com
            port: 70000
        """
    ) == [
        "cfg.yaml:3: listen[1].transport: must be one of 'udp', 'tcp', 'tls', 'ws' or 'wss'",
        "cfg.yaml:4: listen[1].host: must be an IPv4 or IPv6 address literal",
        "cfg.yaml:5: listen[1].port: must be at most 65535",
    ]


def test_empty_lists_are_refused() -> None:
    assert errors_of("switch:\n  domains: []\nlisten: []\n") == [
        "cfg.yaml:2: switch.domains: must have at least 1 item",
        "cfg.yaml:3: listen: must have at least 1 item",
    ]


def test_missing_required_key_points_at_the_nearest_parent() -> None:
    assert errors_of(
        """\
        listen:
          - transport: udp
            host: 127.0.0.1
        """
    ) == ["cfg.yaml:2: listen[0].port: is required"]


def test_expires_must_be_ordered() -> None:
    assert errors_of("registrar:\n  min_expires: 60\n  default_expires: 30\n") == [
        "cfg.yaml:3: registrar.default_expires: must be between min_expires and max_expires"
    ]
    assert errors_of("registrar:\n  min_expires: 9000\n  max_expires: 7200\n") == [
        "cfg.yaml:2: registrar.min_expires: must not be greater than max_expires"
    ]


def test_wrong_types_and_enumerations() -> None:
    assert errors_of(
        """\
        registrar:
          keepalive_interval: often
        auth:
          algorithms: [SHA-256, SHA-512-256]
        store: {backend: etcd}
        logging:
          level: verbose
        """
    ) == [
        "cfg.yaml:2: registrar.keepalive_interval: must be an integer",
        "cfg.yaml:4: auth.algorithms[1]: must be one of 'SHA-256' or 'MD5'",
        "cfg.yaml:5: store.backend: must be one of 'memory' or 'redis'",
        "cfg.yaml:7: logging.level: must be one of 'debug', 'info', 'warning' or 'error'",
    ]


def test_duplicate_algorithm_and_short_secret() -> None:
    assert errors_of("auth:\n  algorithms: [MD5, MD5]\n  secret: short\n") == [
        "cfg.yaml:2: auth.algorithms[1]: duplicate algorithm 'MD5'",
        "cfg.yaml:3: auth.secret: must be at least 16 characters",
    ]


def test_tls_listen_requires_existing_files(tmp_path: Path) -> None:
    config = str(tmp_path / "sw.yaml")
    assert errors_of(
        """\
        listen:
          - {transport: tls, host: "::1", port: 5061}
        tls:
          certificate: missing.pem
        """,
        config,
    ) == [
        f"{config}:3: tls.private_key: is required when a listen entry uses tls",
        f"{config}:4: tls.certificate: file not found: {tmp_path / 'missing.pem'}",
    ]


def test_tls_paths_need_not_exist_without_a_tls_listener(tmp_path: Path) -> None:
    settings = load("tls: {certificate: /nonexistent/c.pem, private_key: k.pem}\n")
    assert settings.tls.certificate == Path("/nonexistent/c.pem")


def test_duplicates_across_the_configuration() -> None:
    assert errors_of(
        """\
        accounts:
          - id: acme
            main_number: "+33123456789"
            devices:
              - {extension: "1000", password: a}
              - {extension: "1000", username: other, password: b}
          - id: acme
            devices:
              - {extension: "1000", password: c, did: "+33123456789"}
        listen:
          - {transport: udp, host: 127.0.0.1, port: 5060}
          - {transport: udp, host: 127.0.0.1, port: 5060}
        """
    ) == [
        "cfg.yaml:6: accounts[0].devices[1].extension:"
        " duplicate extension '1000' (already used by devices[0])",
        "cfg.yaml:7: accounts[1].id: duplicate account id 'acme' (already used by accounts[0])",
        "cfg.yaml:9: accounts[1].devices[0].did:"
        " number +33123456789 is already used by accounts[0].main_number",
        "cfg.yaml:9: accounts[1].devices[0].username:"
        " duplicate username '1000' (already used by accounts[0].devices[0])",
        "cfg.yaml:12: listen[1]: duplicate listen entry udp 127.0.0.1 5060 (same as listen[0])",
    ]


def test_device_field_formats() -> None:
    assert errors_of(
        """\
        accounts:
          - id: "acme corp"
            main_number: "0123456789"
            devices:
              - extension: 1000
                password: x
              - extension: "10a"
                username: "bad user@host"
                kind: fax
                ha1_md5: "abc"
              - extension: "1002"
                password: ""
                did: "+33 12"
        """
    ) == [
        "cfg.yaml:2: accounts[0].id: must start with a letter or digit and hold only letters,"
        " digits, '_', '.', '-' (at most 64)",
        'cfg.yaml:3: accounts[0].main_number: must be an E.164 number starting with "+",'
        ' e.g. "+33123456789"',
        'cfg.yaml:5: accounts[0].devices[0].extension: must be a quoted string (write it as "1000")',
        "cfg.yaml:7: accounts[0].devices[1].extension: must match the pattern ^[0-9]{1,15}$",
        "cfg.yaml:8: accounts[0].devices[1].username: must be 1 to 64 characters among letters,"
        " digits and . _ ~ ! $ & ' ( ) * + , ; = -",
        "cfg.yaml:9: accounts[0].devices[1].kind: must be one of 'desk_phone', 'ata' or 'softphone'",
        "cfg.yaml:10: accounts[0].devices[1].ha1_md5: must be 32 hexadecimal digits",
        "cfg.yaml:12: accounts[0].devices[2].password: must not be empty",
        "cfg.yaml:13: accounts[0].devices[2].did: is not a possible phone number for its country code",
    ]


def test_more_than_1000_devices_is_refused() -> None:
    devices = "".join(
        f'      - {{extension: "{1000 + n}", password: p}}\n' for n in range(1001)
    )
    text = "accounts:\n  - id: big\n    devices:\n" + devices
    with pytest.raises(ConfigError) as caught:
        load_settings_text(text, "cfg.yaml")
    assert caught.value.errors == [
        "cfg.yaml:3: accounts[0].devices: at most 1000 devices per account (found 1001)"
    ]
    exactly_1000 = "accounts:\n  - id: big\n    devices:\n" + "".join(
        devices.splitlines(True)[:1000]
    )
    assert len(load_settings_text(exactly_1000, "cfg.yaml").accounts[0].devices) == 1000


def test_yaml_syntax_error_has_its_line() -> None:
    assert errors_of("switch:\n  domains: [a, b\nlisten: []\n") == [
        "cfg.yaml:3: (yaml): expected ',' or ']', but got ':'"
        " (while parsing a flow sequence started at line 2)"
    ]


def test_duplicate_yaml_key_does_not_echo_the_value() -> None:
    errors = errors_of(
        """\
        accounts:
          - id: a
            devices:
              - extension: "1"
                password: first-secret
                password: second-secret
        """
    )
    assert errors == ['cfg.yaml:6: (yaml): duplicate key "password"']


def test_root_must_be_a_mapping() -> None:
    assert errors_of("- a\n- b\n") == ["cfg.yaml:1: (root): must be a mapping of sections"]


def test_section_of_the_wrong_shape() -> None:
    assert errors_of("switch: 5\naccounts: {id: x}\n") == [
        "cfg.yaml:1: switch: must be a mapping",
        "cfg.yaml:2: accounts: must be a list",
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing)
    assert caught.value.errors == [f"{missing}:1: (file): cannot read: No such file or directory"]


def test_error_lines_never_contain_secret_values() -> None:
    errors = errors_of(
        """\
        auth:
          secret: tiny-secret
        accounts:
          - id: a
            devices:
              - {extension: "1", password: pw-value-1, ha1_md5: not-hex-value}
        """
    )
    joined = "\n".join(errors)
    assert "auth.secret" in joined and "ha1_md5" in joined
    for secret in ("tiny-secret", "pw-value-1", "not-hex-value"):
        assert secret not in joined


def test_settings_built_directly_still_run_whole_file_checks() -> None:
    device = {"extension": "1000", "password": "x"}
    with pytest.raises(ValueError) as caught:
        Settings.model_validate({"accounts": [{"id": "a", "devices": [device, dict(device)]}]})
    assert "duplicate extension '1000'" in str(caught.value)

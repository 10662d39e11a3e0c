"""Typed settings for the softswitch, loaded from one YAML file.

The YAML is read with ruamel.yaml's round-trip loader so that every mapping key and
sequence item keeps its line number; the data is then validated by pydantic models
(unknown keys are refused). Every problem found is reported as one line

    file:line: dotted.key[0].path: problem

collected in :class:`ConfigError.errors`; nothing here ever lets a traceback reach
the operator. ``docs/configuration.md`` is the reference for every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from fairuse.policy import FairUse
from switch.admin import AdminSettings
from switch.dialplan import DialPlanError, EmergencyNumbers, extension_conflicts

__all__ = [
    "Account",
    "Auth",
    "BanPolicy",
    "Cdr",
    "CdrBilling",
    "ConfigError",
    "Device",
    "DialPlanSection",
    "Listen",
    "Logging",
    "Registrar",
    "Settings",
    "Store",
    "Switch",
    "Tls",
    "TrunkSettings",
    "load_settings",
    "load_settings_text",
]

Path_ = tuple[str | int, ...]

MAX_DEVICES_PER_ACCOUNT = 1000


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` holds one ``file:line: key: problem``
    line per problem found."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors: list[str] = list(errors)


# --------------------------------------------------------------------------------------
# Reporting several problems from one validator
# --------------------------------------------------------------------------------------

_PROBLEMS = "config_problems"


class _Problems:
    """Collects ``(relative key path, message)`` pairs inside a model validator and raises
    them all at once; :func:`_format_errors` expands them back into separate lines."""

    def __init__(self) -> None:
        self.items: list[tuple[Path_, str]] = []

    def add(self, path: Path_, message: str) -> None:
        self.items.append((path, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise PydanticCustomError(
                _PROBLEMS,
                "{summary}",
                {"summary": "; ".join(m for _, m in self.items), "problems": tuple(self.items)},
            )


def _one_problem(path: Path_, message: str) -> PydanticCustomError:
    return PydanticCustomError(
        _PROBLEMS, "{summary}", {"summary": message, "problems": ((path, message),)}
    )


# --------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------

_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_SIP_USER = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=-]{1,64}$")
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _require_text(value: Any, example: str) -> Any:
    """Numbers typed without quotes lose leading zeros and '+' in YAML: insist on quotes."""
    if isinstance(value, bool) or isinstance(value, int | float):
        raise ValueError(f'must be a quoted string (write it as "{example}")')
    return value


def _e164(value: str) -> str:
    text = value.strip().replace(" ", "").replace("-", "")
    if not text.startswith("+"):
        raise ValueError('must be an E.164 number starting with "+", e.g. "+33123456789"')
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"is not a phone number ({exc._msg})") from None
    if not phonenumbers.is_possible_number(parsed):
        raise ValueError("is not a possible phone number for its country code")
    normalized = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not _E164.match(normalized):
        raise ValueError("is not a valid E.164 number")
    return normalized


def _identifier(value: str) -> str:
    """An account or trunk id: the shape that is safe in logs, Redis keys and file names."""
    if not _ACCOUNT_ID.match(value):
        raise ValueError(
            "must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
            " (at most 64)"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


class Switch(_Model):
    node_id: str = Field(
        default="node-1", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$"
    )
    domains: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"], min_length=1)
    user_agent: str = Field(default="softswitch/0.1", min_length=1, max_length=200)
    max_message_size: int = Field(default=65535, ge=1024, le=16 * 1024 * 1024)

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, domains: list[str]) -> list[str]:
        problems = _Problems()
        seen: set[str] = set()
        normalized: list[str] = []
        for index, domain in enumerate(domains):
            name = domain.strip().lower()
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            try:
                name = str(ipaddress.ip_address(name))
            except ValueError:
                if not _DOMAIN.match(name):
                    problems.add((index,), "must be a host name or an IP address")
                    continue
            if name in seen:
                problems.add((index,), f"duplicate domain {name!r}")
            seen.add(name)
            normalized.append(name)
        problems.raise_if_any()
        return normalized


class Listen(_Model):
    transport: Literal["udp", "tcp", "tls", "ws", "wss"]
    host: str
    port: int = Field(ge=1, le=65535)
    # HTTP path of the WebSocket upgrade (ws/wss only, RFC 7118); wss uses the tls files
    path: str = "/"

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/") or any(c.isspace() for c in path) or "?" in path:
            raise ValueError("must be an absolute HTTP path like '/' or '/sip' (no query)")
        return path

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        text = host.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address literal") from None


class Tls(_Model):
    certificate: Path | None = None
    private_key: Path | None = None


class Registrar(_Model):
    min_expires: int = Field(default=60, ge=1)
    max_expires: int = Field(default=7200, ge=1, le=7 * 24 * 3600)
    default_expires: int = Field(default=3600, ge=1)
    max_contacts_per_aor: int = Field(default=10, ge=1, le=100)
    keepalive_interval: int = Field(default=30, ge=0, le=3600)
    keepalive_failures: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _check_order(self) -> Registrar:
        problems = _Problems()
        if self.min_expires > self.max_expires:
            problems.add(("min_expires",), "must not be greater than max_expires")
        elif not self.min_expires <= self.default_expires <= self.max_expires:
            problems.add(("default_expires",), "must be between min_expires and max_expires")
        problems.raise_if_any()
        return self


class BanPolicy(_Model):
    max_failures_per_source: int = Field(default=10, ge=1)
    max_failures_per_user: int = Field(default=20, ge=1)
    window: int = Field(default=60, ge=1)
    ban_time: int = Field(default=600, ge=0)


class Auth(_Model):
    realm: str | None = Field(default=None, min_length=1, max_length=253)
    algorithms: list[Literal["SHA-256", "MD5"]] = Field(
        default_factory=lambda: ["SHA-256", "MD5"], min_length=1
    )
    nonce_lifetime: int = Field(default=300, ge=10, le=86400)
    secret: SecretStr | None = None
    ban: BanPolicy = Field(default_factory=BanPolicy)

    @field_validator("realm")
    @classmethod
    def _check_realm(cls, realm: str | None) -> str | None:
        if realm is not None and ('"' in realm or "\\" in realm or realm != realm.strip()):
            raise ValueError("must not contain quotes, backslashes or surrounding spaces")
        return realm

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return secret

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(cls, algorithms: list[str]) -> list[str]:
        problems = _Problems()
        for index, name in enumerate(algorithms):
            if name in algorithms[:index]:
                problems.add((index,), f"duplicate algorithm {name!r}")
        problems.raise_if_any()
        return algorithms


class Media(_Model):
    """How call media is anchored: the built-in RTP relay, rtpengine, or not at all."""

    backend: Literal["relay", "rtpengine", "none"] = "relay"
    bind_host: str = "127.0.0.1"  # relay sockets bind here
    advertise_host: str | None = None  # address written into SDP (default: bind_host)
    port_min: int = Field(default=20000, ge=1024, le=65534)
    port_max: int = Field(default=29999, ge=1025, le=65535)
    media_timeout: int = Field(default=60, ge=0, le=86400)  # 0 = never end silent calls
    rtpengine: str = "127.0.0.1:2223"  # ng control address, host:port
    # WebRTC devices (browsers over ws/wss) bridged to plain RTP with aiortc (relay only)
    webrtc: bool = True

    @field_validator("bind_host")
    @classmethod
    def _check_bind(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address") from None
        return host

    @field_validator("rtpengine")
    @classmethod
    def _check_ng(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return value

    @model_validator(mode="after")
    def _check_range(self) -> Media:
        if self.port_max - self.port_min < 3:
            raise ValueError("port_max must be at least port_min + 3 (two RTP/RTCP pairs)")
        return self


class Calls(_Model):
    """Call control timers."""

    no_answer_timeout: int = Field(default=60, ge=5, le=600)  # ringing before 480
    session_expires: int = Field(default=1800, ge=90, le=86400)  # refresh every half of it
    # graceful shutdown (SIGTERM): new calls get 503 while calls in progress have this long
    # to end before the rest are hung up
    shutdown_grace: int = Field(default=30, ge=0, le=3600)


class Store(_Model):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field(default="softswitch:", max_length=64)

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url


class Logging(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class CdrBilling(_Model):
    increment: int = Field(default=6, ge=1, le=3600)
    minimum: int = Field(default=18, ge=0, le=3600)


class Cdr(_Model):
    """The CDR ledger (switch/cdr.py). A relative ``directory`` is relative to the
    directory of the configuration file, like every other path in it."""

    directory: Path = Path("var/cdr")
    rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=4096, le=1 << 40)
    rotate_daily: bool = True
    fsync: bool = True
    billing: CdrBilling = Field(default_factory=CdrBilling)


DEFAULT_DIALPLAN_COUNTRY = "FR"


class DialPlanSection(_Model):
    """How dialled strings are read (switch/dialplan.py); one country for the switch."""

    country: str = DEFAULT_DIALPLAN_COUNTRY
    outside_line_prefix: str | None = None
    extra_emergency_numbers: list[str] = Field(default_factory=list, max_length=100)

    @field_validator("country", "outside_line_prefix", mode="before")
    @classmethod
    def _code_text(cls, value: Any) -> Any:
        return _require_text(value, str(value))

    @field_validator("country")
    @classmethod
    def _check_country(cls, value: str) -> str:
        code = value.strip().upper()
        if code not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"unknown country {value!r}: an ISO 3166 alpha-2 code libphonenumber knows,"
                ' e.g. "FR", "US", "GB"'
            )
        return code

    @field_validator("outside_line_prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9]{1,4}", value):
            raise ValueError("must be 1 to 4 digits (or null for none)")
        return value

    @field_validator("extra_emergency_numbers", mode="before")
    @classmethod
    def _extras_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            problems = _Problems()
            for index, item in enumerate(value):
                if isinstance(item, bool) or isinstance(item, int | float):
                    problems.add((index,), f'must be a quoted string (write it as "{item}")')
            problems.raise_if_any()
        return value

    @field_validator("extra_emergency_numbers")
    @classmethod
    def _check_extras(cls, value: list[str]) -> list[str]:
        problems = _Problems()
        for index, number in enumerate(value):
            if not re.fullmatch(r"[0-9]{1,15}", number):
                problems.add((index,), "must be 1 to 15 digits")
            elif number in value[:index]:
                problems.add((index,), f"duplicate number {number!r}")
        problems.raise_if_any()
        return value


class Device(_Model):
    extension: str = Field(pattern=r"^[0-9]{1,15}$")
    username: str = ""
    kind: Literal["desk_phone", "ata", "softphone"] = "softphone"
    password: SecretStr | None = None
    ha1_md5: SecretStr | None = None
    ha1_sha256: SecretStr | None = None
    display_name: str | None = Field(default=None, max_length=100)
    did: str | None = None
    # emergency location (e911/): the site and location the device is at; a nomadic device
    # gets its location from the network it registers from (emergency.sites[].networks)
    site: str | None = None
    location: str | None = None
    mobility: Literal["fixed", "nomadic"] = "fixed"
    # calling features
    class_of_service: Literal["unrestricted", "internal_only"] = "unrestricted"
    do_not_disturb: bool = False
    forward_all: str | None = Field(default=None, min_length=1, max_length=64)
    speed_dials: dict[str, str] = Field(default_factory=dict, max_length=100)

    @field_validator("speed_dials")
    @classmethod
    def _check_speed_dials(cls, value: dict[str, str]) -> dict[str, str]:
        problems = _Problems()
        for code, target in value.items():
            if not re.fullmatch(r"[*#][0-9]{1,4}", str(code)):
                problems.add((code,), "a speed-dial code is * or # then 1 to 4 digits")
            elif not isinstance(target, str) or not target.strip():
                problems.add((code,), "must be a number to dial")
        problems.raise_if_any()
        return value

    @field_validator("extension", mode="before")
    @classmethod
    def _extension_text(cls, value: Any) -> Any:
        return _require_text(value, str(value))

    @field_validator("username", mode="before")
    @classmethod
    def _username_text(cls, value: Any) -> Any:
        return _require_text(value, str(value))

    @field_validator("password", "ha1_md5", "ha1_sha256", mode="before")
    @classmethod
    def _secret_text(cls, value: Any) -> Any:
        if isinstance(value, bool) or isinstance(value, int | float):
            raise ValueError("must be a quoted string")
        return value

    @field_validator("username")
    @classmethod
    def _check_username(cls, username: str) -> str:
        if not _SIP_USER.match(username):
            raise ValueError(
                "must be 1 to 64 characters among letters, digits and . _ ~ ! $ & ' ( ) * + , ; = -"
            )
        return username

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty")
        return value

    @field_validator("ha1_md5")
    @classmethod
    def _check_ha1_md5(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _HEX32.match(value.get_secret_value()):
            raise ValueError("must be 32 hexadecimal digits")
        return value

    @field_validator("ha1_sha256")
    @classmethod
    def _check_ha1_sha256(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _HEX64.match(value.get_secret_value()):
            raise ValueError("must be 64 hexadecimal digits")
        return value

    @field_validator("did", mode="before")
    @classmethod
    def _did_text(cls, value: Any) -> Any:
        return _require_text(value, f"+{value}")

    @field_validator("did")
    @classmethod
    def _check_did(cls, value: str | None) -> str | None:
        return None if value is None else _e164(value)

    @model_validator(mode="after")
    def _check_credentials(self) -> Device:
        given = [
            name
            for name in ("password", "ha1_md5", "ha1_sha256")
            if getattr(self, name) is not None
        ]
        if not given:
            raise _one_problem(("password",), "either password, ha1_md5 or ha1_sha256 is required")
        if len(given) > 1:
            raise _one_problem(
                (given[1],), "only one of password, ha1_md5 or ha1_sha256 may be given"
            )
        if not self.username:
            self.username = self.extension
        return self

    @property
    def has_password(self) -> bool:
        return self.password is not None


class Account(_Model):
    id: str
    name: str | None = Field(default=None, max_length=200)
    main_number: str | None = None
    # a suspended account's devices still register and make emergency calls, nothing else
    suspended: bool = False
    devices: list[Device] = Field(default_factory=list)

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return _require_text(value, str(value))

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("main_number", mode="before")
    @classmethod
    def _main_number_text(cls, value: Any) -> Any:
        return _require_text(value, f"+{value}")

    @field_validator("main_number")
    @classmethod
    def _check_main_number(cls, value: str | None) -> str | None:
        return None if value is None else _e164(value)

    @field_validator("devices", mode="before")
    @classmethod
    def _check_device_count(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_DEVICES_PER_ACCOUNT:
            raise ValueError(
                f"at most {MAX_DEVICES_PER_ACCOUNT} devices per account (found {len(value)})"
            )
        return value

    @property
    def display_name(self) -> str:
        return self.name or self.id


class EmergencyProfileSettings(_Model):
    """How an emergency call looks on this trunk (e911/profiles.py): ``dlr`` (US dynamic
    location routing: 911, identity only), ``pidf`` (911 + PIDF-LO by value), ``i3`` (NENA
    i3: urn:service:sos, PIDF-LO, Route to the ESRP), ``nat`` (EU national: the dialled
    short number, the site's number as identity)."""

    profile: Literal["dlr", "pidf", "i3", "nat"]
    esrp_route: str | None = Field(default=None, max_length=500)
    resource_priority: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+\.[0-9]+$")
    trusted_esnet: bool = False
    priority: bool = False
    geolocation_routing: bool = True
    send_location: bool | None = None  # default: pidf and i3 send PIDF-LO, dlr and nat not
    emergency_number: str = Field(default="911", pattern=r"^[0-9]{1,15}$")
    provider_info_url: str | None = Field(default=None, max_length=500)
    # i3: the ECRF (LoST, RFC 5222) that names the PSAP for the caller's location; on
    # failure or after lost_timeout the configured esrp_route is used (EM-32)
    lost_server: str | None = Field(default=None, max_length=500)
    lost_timeout: float = Field(default=0.5, gt=0, le=5)

    @field_validator("lost_server")
    @classmethod
    def _check_lost_server(cls, value: str | None) -> str | None:
        if value is not None:
            from e911.lost import lost_server_problems

            problems = lost_server_problems(value)
            if problems:
                raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _lost_only_for_i3(self) -> EmergencyProfileSettings:
        if self.lost_server is not None and self.profile != "i3":
            raise _one_problem(("lost_server",), "a LoST server is used by the i3 profile only")
        return self


class EmergencyLocationSettings(_Model):
    """A location inside a site: the RFC 5139 elements that refine the site's address."""

    id: str
    BLD: str | None = Field(default=None, max_length=100)
    FLR: str | None = Field(default=None, max_length=100)
    UNIT: str | None = Field(default=None, max_length=100)
    ROOM: str | None = Field(default=None, max_length=100)
    SEAT: str | None = Field(default=None, max_length=100)

    @field_validator("BLD", "FLR", "UNIT", "ROOM", "SEAT", "id", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # floors and rooms are often numbers: accept them unquoted
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class EmergencyNetworkSettings(_Model):
    """A network devices register from: nomadic devices on it are at this location."""

    subnet: str
    location: str | None = None
    country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")

    @field_validator("subnet")
    @classmethod
    def _check_subnet(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"must be an IP network ({exc})") from None


class EmergencyNotifySettings(_Model):
    webhooks: list[str] = Field(default_factory=list, max_length=20)
    devices: list[str] = Field(default_factory=list, max_length=20)  # security-desk usernames

    @field_validator("webhooks")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return _webhook_urls(value)


def _webhook_urls(value: list[str]) -> list[str]:
    problems = _Problems()
    for index, url in enumerate(value):
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(url)):
            problems.add((index,), "must be an http:// or https:// URL")
    problems.raise_if_any()
    return value


class EmergencySite(_Model):
    """A place devices are at: its civic address (RFC 5139 element names), the number
    that rings back its callers, its ordered emergency routes and who is told on site."""

    id: str
    country: str = Field(pattern=r"^[A-Z]{2}$")
    address: dict[str, str]
    callback_number: str | None = None
    routes: list[str] = Field(default_factory=list, max_length=10)
    notify: EmergencyNotifySettings = Field(default_factory=EmergencyNotifySettings)
    locations: list[EmergencyLocationSettings] = Field(default_factory=list)
    networks: list[EmergencyNetworkSettings] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("address", mode="before")
    @classmethod
    def _address_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): (str(v) if isinstance(v, int) else v) for k, v in value.items()}
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: dict[str, str]) -> dict[str, str]:
        from e911.civic import CivicAddress

        try:
            CivicAddress.from_elements(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("callback_number", mode="before")
    @classmethod
    def _callback_text(cls, value: Any) -> Any:
        return _require_text(value, f"+{value}")

    @field_validator("callback_number")
    @classmethod
    def _check_callback(cls, value: str | None) -> str | None:
        return None if value is None else _e164(value)


class EmergencyProviderSettings(_Model):
    """The operator's emergency-service provider API (e911/activation.py, EM-51):
    addresses validated and DIDs provisioned with it; the generic JSON API, or an
    adapter of the same interface for a real provider."""

    url: str = Field(pattern=r"^https?://\S+$")
    token: SecretStr | None = None
    timeout: float = Field(default=10.0, gt=0, le=120)
    sync_interval: float = Field(default=3600.0, ge=30)
    poll_initial: float = Field(default=5.0, gt=0, le=600)
    poll_attempts: int = Field(default=6, ge=1, le=20)


class EmergencyTestCall(_Model):
    """A scheduled emergency test call (933 / urn:service:test.sos) from a device."""

    device: str  # username
    every_minutes: int = Field(default=7 * 24 * 60, ge=1, le=366 * 24 * 60)
    first_after: float = Field(default=60.0, ge=0.1, le=366 * 86400)  # seconds after start
    service_urn: bool = False  # urn:service:test.sos even where 933 exists


class Emergency(_Model):
    """Emergency calling (e911/): sites and locations, routes, notifications, the audit
    journal. Emergency calls are never refused by any limit of the switch."""

    journal_dir: Path = Path("var/emergency")
    retention_days: int | None = Field(default=None, ge=30, le=36500)  # None: keep all
    # gp:provided-by of the switch's PIDF-LO (RFC 7852 ProviderInfo, by reference);
    # default https://<first domain>/emergency/provider-info
    provider_info_url: str | None = Field(default=None, pattern=r"^https://\S+$")
    numbers_file: Path | None = None  # extra dial strings, same format as e911/data
    callback_window: int = Field(default=1800, ge=1800, le=7 * 86400)
    unlocated_devices: Literal["refuse", "allow"] = "refuse"
    release_ordinary_calls: bool = True
    route_timeout: float = Field(default=8.0, ge=0.5, le=60)
    retry_interval: float = Field(default=5.0, ge=0.5, le=300)
    announcement: Path | None = None  # WAV, 8 kHz mono 16-bit; default: SIT tones
    admin_webhooks: list[str] = Field(default_factory=list, max_length=20)
    test_call_notify: Literal["admin", "site"] = "admin"
    # EM-53: a device registered from another country: "route" (to the home country's
    # emergency routes, flagged), or "announce_and_route" (the caller first hears the
    # announcement telling to use a local phone, while the call is routed all the same)
    foreign_policy: Literal["route", "announce_and_route"] = "route"
    notify_helplines: bool = False
    default_site: str | None = None
    test_calls: list[EmergencyTestCall] = Field(default_factory=list, max_length=100)
    provider: EmergencyProviderSettings | None = None
    sites: list[EmergencySite] = Field(default_factory=list, max_length=10_000)

    @field_validator("admin_webhooks")
    @classmethod
    def _check_urls(cls, value: list[str]) -> list[str]:
        return _webhook_urls(value)


_TRUNK_TARGET = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/([0-9]{1,15})$")


def _host_name(value: str) -> str:
    """A host name or an IP literal (brackets allowed), normalised; ValueError if neither."""
    text = value.strip().lower()
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if not _DOMAIN.match(text):
        raise ValueError("must be a host name or an IP address")
    return text


class TrunkSettings(_Model):
    """One SIP trunk (switch/trunks.py): a ``provider`` the switch authenticates to with
    digest (and may register to), or a ``peer`` trusted by source address."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    kind: Literal["provider", "peer"] = "provider"
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    transport: Literal["udp", "tcp", "tls"] | None = None
    username: str | None = Field(default=None, min_length=1, max_length=128)
    password: SecretStr | None = None
    realm: str | None = Field(default=None, min_length=1, max_length=253)
    # YAML key ``register`` (the attribute name would shadow pydantic's BaseModel.register)
    register_to_provider: bool = Field(default=False, alias="register")
    register_expires: int = Field(default=3600, ge=60, le=86400)
    from_domain: str | None = None
    addresses: list[str] = Field(default_factory=list, max_length=256)
    dids: dict[str, str] = Field(default_factory=dict)
    accounts: list[str] = Field(default_factory=list)
    number_format: Literal["e164", "e164_without_plus", "national"] = "e164"
    trust_identity: bool = True
    channels: int | None = Field(default=None, ge=1, le=100_000)  # concurrent calls
    emergency: EmergencyProfileSettings | None = None

    @field_validator("id", "username", "password", "realm", mode="before")
    @classmethod
    def _quoted_text(cls, value: Any) -> Any:
        return _require_text(value, str(value))

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _identifier(value)

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return _host_name(value)

    @field_validator("from_domain")
    @classmethod
    def _check_from_domain(cls, value: str | None) -> str | None:
        return None if value is None else _host_name(value)

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str | None) -> str | None:
        if value is not None and not _SIP_USER.match(value):
            raise ValueError("must be letters, digits and . _ ~ ! $ & ' ( ) * + , ; = -")
        return value

    @field_validator("realm")
    @classmethod
    def _check_realm(cls, value: str | None) -> str | None:
        if value is not None and ('"' in value or "\\" in value or value != value.strip()):
            raise ValueError("must not contain quotes, backslashes or surrounding spaces")
        return value

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        problems = _Problems()
        networks: list[str] = []
        for index, text in enumerate(value):
            try:
                network = str(ipaddress.ip_network(str(text).strip(), strict=True))
            except ValueError as exc:
                problems.add((index,), f"must be an IP address or network ({exc})")
                continue
            if network in networks:
                problems.add((index,), f"duplicate network {network}")
            networks.append(network)
        problems.raise_if_any()
        return networks

    @field_validator("dids")
    @classmethod
    def _check_dids(cls, value: dict[str, str]) -> dict[str, str]:
        problems = _Problems()
        dids: dict[str, str] = {}
        for key, target in value.items():
            try:
                number = _e164(str(key))
            except ValueError as exc:
                hint = "" if str(key).startswith("+") else f' (quote it: "+{key}")'
                problems.add((key,), f"{exc}{hint}")
                continue
            if not isinstance(target, str) or not _TRUNK_TARGET.match(target):
                problems.add((key,), 'must be "account/extension", e.g. "demo/1000"')
                continue
            if number in dids:
                problems.add((key,), f"duplicate number {number}")
            dids[number] = target
        problems.raise_if_any()
        return dids

    @field_validator("accounts")
    @classmethod
    def _check_accounts(cls, value: list[str]) -> list[str]:
        problems = _Problems()
        for index, account_id in enumerate(value):
            if not _ACCOUNT_ID.match(account_id):
                problems.add((index,), "is not an account id")
            elif account_id in value[:index]:
                problems.add((index,), f"duplicate account {account_id!r}")
        problems.raise_if_any()
        return value

    @model_validator(mode="after")
    def _check_kind(self) -> TrunkSettings:
        problems = _Problems()
        if self.kind == "provider":
            for name in ("username", "password"):
                if getattr(self, name) is None:
                    problems.add(
                        (name,),
                        "is required for a provider (use kind: peer for a trunk trusted by"
                        " address)",
                    )
        else:
            if self.register_to_provider:
                problems.add(("register",), "only a provider can be registered to")
            if not self.addresses:
                problems.add(("addresses",), "a peer needs at least one source address")
            if (self.username is None) != (self.password is None):
                missing = "password" if self.password is None else "username"
                problems.add((missing,), "username and password go together")
        problems.raise_if_any()
        return self


def _trunk_problems(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Trunk ids are unique; DIDs and ``accounts`` name configured accounts/extensions."""
    extensions: dict[str, set[str]] = {}
    for raw_account in _sequence(data.get("accounts")):
        account = _mapping(raw_account)
        account_id = account.get("id")
        if isinstance(account_id, str):
            extensions.setdefault(account_id, set()).update(
                device.get("extension")
                for device in map(_mapping, _sequence(account.get("devices")))
                if isinstance(device.get("extension"), str)
            )
    problems: list[tuple[Path_, str]] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(_sequence(data.get("trunks"))):
        trunk = _mapping(raw)
        trunk_id = trunk.get("id")
        if isinstance(trunk_id, str):
            if trunk_id in seen:
                problems.append(
                    (
                        ("trunks", index, "id"),
                        f"duplicate trunk id {trunk_id!r} (already used by trunks[{seen[trunk_id]}])",
                    )
                )
            else:
                seen[trunk_id] = index
        for key, target in _mapping(trunk.get("dids")).items():
            match = _TRUNK_TARGET.match(target) if isinstance(target, str) else None
            if match is None:
                continue
            account_id, extension = match.groups()
            if account_id not in extensions:
                message = f"unknown account {account_id!r}"
            elif extension not in extensions[account_id]:
                message = f"account {account_id!r} has no extension {extension!r}"
            else:
                continue
            problems.append((("trunks", index, "dids", key), message))
        for a_index, account_id in enumerate(_sequence(trunk.get("accounts"))):
            if isinstance(account_id, str) and account_id not in extensions:
                problems.append(
                    (("trunks", index, "accounts", a_index), f"unknown account {account_id!r}")
                )
    return problems


class Settings(_Model):
    switch: Switch = Field(default_factory=Switch)
    listen: list[Listen] = Field(
        default_factory=lambda: [
            Listen(transport="udp", host="127.0.0.1", port=5060),
            Listen(transport="tcp", host="127.0.0.1", port=5060),
        ],
        min_length=1,
    )
    tls: Tls = Field(default_factory=Tls)
    registrar: Registrar = Field(default_factory=Registrar)
    auth: Auth = Field(default_factory=Auth)
    store: Store = Field(default_factory=Store)
    media: Media = Field(default_factory=Media)
    calls: Calls = Field(default_factory=Calls)
    logging: Logging = Field(default_factory=Logging)
    cdr: Cdr = Field(default_factory=Cdr)
    dialplan: DialPlanSection = Field(default_factory=DialPlanSection)
    accounts: list[Account] = Field(default_factory=list)
    trunks: list[TrunkSettings] = Field(default_factory=list, max_length=100)
    emergency: Emergency = Field(default_factory=Emergency)
    fair_use: FairUse = Field(default_factory=FairUse)
    admin: AdminSettings = Field(default_factory=AdminSettings)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Settings:
        context = info.context if isinstance(info.context, dict) else {}
        base_dir = Path(context.get("base_dir", "."))
        if not context.get("cross_checked"):
            # Built directly (not through load_settings*): run the whole-file checks here.
            problems = _Problems()
            for path, message in _cross_problems(self.model_dump(), base_dir):
                problems.add(path, message)
            problems.raise_if_any()
        for name in ("certificate", "private_key"):
            value: Path | None = getattr(self.tls, name)
            if value is not None and not value.is_absolute():
                setattr(self.tls, name, base_dir / value)
        if not self.cdr.directory.is_absolute():
            self.cdr.directory = base_dir / self.cdr.directory
        references = self.fair_use.reference_problems(
            [account.id for account in self.accounts],
            [device.username for _, device in self.iter_devices()],
            [trunk.id for trunk in self.trunks],
        )
        if references:
            problems = _Problems()
            for path, message in references:
                problems.add(path, message)
            problems.raise_if_any()
        for name in ("journal_dir", "numbers_file", "announcement"):
            value = getattr(self.emergency, name)
            if value is not None and not value.is_absolute():
                setattr(self.emergency, name, base_dir / value)
        if self.emergency.numbers_file is not None:
            from e911.numbers import EmergencyNumberTable, NumberTableError

            try:
                EmergencyNumberTable.load(self.emergency.numbers_file)
            except NumberTableError as exc:
                raise _one_problem(("emergency", "numbers_file"),
                                   "; ".join(exc.problems)) from None
        return self

    # ---- conveniences -----------------------------------------------------------------

    @property
    def realm(self) -> str:
        """The digest realm: ``auth.realm`` or, when unset, the first SIP domain."""
        return self.auth.realm or self.switch.domains[0]

    def iter_devices(self) -> Iterator[tuple[Account, Device]]:
        """Every configured device with the account it belongs to, in file order."""
        for account in self.accounts:
            for device in account.devices:
                yield account, device

    def find_device(self, username: str) -> tuple[Account, Device] | None:
        """The device whose SIP auth user is ``username`` (unique across the config)."""
        for account, device in self.iter_devices():
            if device.username == username:
                return account, device
        return None

    def is_local_domain(self, host: str) -> bool:
        """True when ``host`` (a domain or IP literal, brackets allowed) is one of ours."""
        name = host.strip().lower()
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            pass
        return name in self.switch.domains


# --------------------------------------------------------------------------------------
# Loading and error reporting
# --------------------------------------------------------------------------------------


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number_or_none(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return _e164(value)
    except ValueError:
        return None


def _cross_problems(data: dict[str, Any], base_dir: Path) -> list[tuple[Path_, str]]:
    """Checks that span several entries (uniqueness, TLS files). Runs on the plain data,
    skipping entries of the wrong shape (the models report those), so that these
    problems are reported together with every other one."""
    problems: list[tuple[Path_, str]] = []

    # listen: no duplicate sockets; TLS files exist when a tls socket is configured
    seen_sockets: dict[tuple[Any, ...], int] = {}
    needs_tls = False
    for index, raw in enumerate(_sequence(data.get("listen"))):
        entry = _mapping(raw)
        transport, host, port = entry.get("transport"), entry.get("host"), entry.get("port")
        needs_tls = needs_tls or transport in ("tls", "wss")
        if isinstance(host, str):
            try:
                host = str(ipaddress.ip_address(host.strip().strip("[]")))
            except ValueError:
                pass
        socket = (transport, host, port)
        if not all(isinstance(part, str | int) for part in socket):
            continue
        if socket in seen_sockets:
            problems.append(
                (
                    ("listen", index),
                    f"duplicate listen entry {transport} {host} {port}"
                    f" (same as listen[{seen_sockets[socket]}])",
                )
            )
        else:
            seen_sockets[socket] = index
    if needs_tls:
        tls = _mapping(data.get("tls"))
        for name in ("certificate", "private_key"):
            value = tls.get(name)
            if value is None:
                problems.append((("tls", name), "is required when a listen entry uses tls"))
                continue
            if not isinstance(value, str | os.PathLike):
                continue
            path = Path(value)
            resolved = path if path.is_absolute() else base_dir / path
            if not resolved.is_file():
                problems.append((("tls", name), f"file not found: {resolved}"))
            elif not os.access(resolved, os.R_OK):
                problems.append((("tls", name), f"file not readable: {resolved}"))

    # accounts: unique ids; extensions unique per account; usernames and numbers overall
    account_ids: dict[str, int] = {}
    usernames: dict[str, str] = {}
    numbers: dict[str, str] = {}
    for a_index, raw_account in enumerate(_sequence(data.get("accounts"))):
        account = _mapping(raw_account)
        account_id = account.get("id")
        if isinstance(account_id, str):
            if account_id in account_ids:
                problems.append(
                    (
                        ("accounts", a_index, "id"),
                        f"duplicate account id {account_id!r}"
                        f" (already used by accounts[{account_ids[account_id]}])",
                    )
                )
            else:
                account_ids[account_id] = a_index
        main_number = _number_or_none(account.get("main_number"))
        if main_number is not None:
            if main_number in numbers:
                problems.append(
                    (
                        ("accounts", a_index, "main_number"),
                        f"number {main_number} is already used by {numbers[main_number]}",
                    )
                )
            else:
                numbers[main_number] = f"accounts[{a_index}].main_number"
        extensions: dict[str, int] = {}
        for d_index, raw_device in enumerate(_sequence(account.get("devices"))):
            device = _mapping(raw_device)
            where = f"accounts[{a_index}].devices[{d_index}]"
            here: Path_ = ("accounts", a_index, "devices", d_index)
            extension = device.get("extension")
            if isinstance(extension, str):
                if extension in extensions:
                    problems.append(
                        (
                            (*here, "extension"),
                            f"duplicate extension {extension!r}"
                            f" (already used by devices[{extensions[extension]}])",
                        )
                    )
                else:
                    extensions[extension] = d_index
            username = device.get("username") or extension
            if isinstance(username, str):
                if username in usernames:
                    problems.append(
                        (
                            (*here, "username"),
                            f"duplicate username {username!r} (already used by {usernames[username]})",
                        )
                    )
                else:
                    usernames[username] = where
            did = _number_or_none(device.get("did"))
            if did is not None:
                if did in numbers:
                    problems.append(
                        ((*here, "did"), f"number {did} is already used by {numbers[did]}")
                    )
                else:
                    numbers[did] = f"{where}.did"
    problems.extend(_dialplan_problems(data))
    problems.extend(_trunk_problems(data))
    problems.extend(_emergency_problems(data))
    return problems


def _emergency_problems(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Sites name configured trunks and devices; devices name configured sites and
    locations; no forwarding target or speed dial is an emergency number (EM-06)."""
    from switch.dialplan import DialPlan

    problems: list[tuple[Path_, str]] = []
    section = _mapping(data.get("emergency"))
    trunk_ids = {
        trunk.get("id") for trunk in map(_mapping, _sequence(data.get("trunks")))
    }
    usernames: set[str] = set()
    for account in map(_mapping, _sequence(data.get("accounts"))):
        for device in map(_mapping, _sequence(account.get("devices"))):
            name = device.get("username") or device.get("extension")
            if isinstance(name, str):
                usernames.add(name)
    sites: dict[str, set[str]] = {}
    for s_index, raw_site in enumerate(_sequence(section.get("sites"))):
        site = _mapping(raw_site)
        site_id = site.get("id")
        here: Path_ = ("emergency", "sites", s_index)
        if isinstance(site_id, str):
            if site_id in sites:
                problems.append(((*here, "id"), f"duplicate site id {site_id!r}"))
            sites[site_id] = set()
        location_ids = sites.get(site_id, set()) if isinstance(site_id, str) else set()
        for l_index, location in enumerate(map(_mapping, _sequence(site.get("locations")))):
            location_id = location.get("id")
            if isinstance(location_id, str):
                if location_id in location_ids:
                    problems.append(((*here, "locations", l_index, "id"),
                                     f"duplicate location id {location_id!r}"))
                location_ids.add(location_id)
        for r_index, route in enumerate(_sequence(site.get("routes"))):
            if isinstance(route, str) and route not in trunk_ids:
                problems.append(((*here, "routes", r_index), f"unknown trunk {route!r}"))
        for n_index, network in enumerate(map(_mapping, _sequence(site.get("networks")))):
            location = network.get("location")
            if isinstance(location, str) and location not in location_ids:
                problems.append(((*here, "networks", n_index, "location"),
                                 f"site {site_id!r} has no location {location!r}"))
        for d_index, username in enumerate(
            _sequence(_mapping(site.get("notify")).get("devices"))
        ):
            if isinstance(username, str) and username not in usernames:
                problems.append(((*here, "notify", "devices", d_index),
                                 f"unknown device username {username!r}"))
    for t_index, test_call in enumerate(map(_mapping, _sequence(section.get("test_calls")))):
        device = test_call.get("device")
        if isinstance(device, str) and device not in usernames:
            problems.append((("emergency", "test_calls", t_index, "device"),
                             f"unknown device username {device!r}"))
    default_site = section.get("default_site")
    if isinstance(default_site, str) and default_site not in sites:
        problems.append((("emergency", "default_site"), f"unknown site {default_site!r}"))
    for t_index, trunk in enumerate(map(_mapping, _sequence(data.get("trunks")))):
        profile = _mapping(trunk.get("emergency"))
        if profile.get("resource_priority") and not profile.get("trusted_esnet"):
            problems.append(((
                "trunks", t_index, "emergency", "resource_priority"),
                "Resource-Priority is only sent to a trusted emergency network:"
                " set trusted_esnet: true or remove it (RFC 7135)"))

    dialplan = _mapping(data.get("dialplan") or {})
    country = dialplan.get("country", DEFAULT_DIALPLAN_COUNTRY)
    prefix = dialplan.get("outside_line_prefix")
    try:
        plan = DialPlan(str(country).strip().upper(),
                        prefix if isinstance(prefix, str) else None)
    except (DialPlanError, ValueError):
        plan = None
    for a_index, account in enumerate(map(_mapping, _sequence(data.get("accounts")))):
        for d_index, device in enumerate(map(_mapping, _sequence(account.get("devices")))):
            here = ("accounts", a_index, "devices", d_index)
            site_id, location_id = device.get("site"), device.get("location")
            if isinstance(site_id, str) and site_id not in sites:
                problems.append(((*here, "site"), f"unknown emergency site {site_id!r}"))
            elif isinstance(location_id, str):
                if not isinstance(site_id, str):
                    problems.append(((*here, "location"), "a location needs a site"))
                elif location_id not in sites[site_id]:
                    problems.append(((*here, "location"),
                                     f"site {site_id!r} has no location {location_id!r}"))
            if plan is None:
                continue
            targets: list[tuple[Path_, Any]] = [((*here, "forward_all"), device.get("forward_all"))]
            targets += [((*here, "speed_dials", code), target)
                        for code, target in _mapping(device.get("speed_dials")).items()]
            for path, target in targets:
                if isinstance(target, str) and target.strip():
                    try:
                        emergency = plan.classify(target.strip()).is_emergency
                    except Exception:
                        emergency = False
                    if emergency:
                        problems.append((path, f"{target!r} is an emergency number: emergency"
                                               " numbers cannot be forwarding targets or"
                                               " speed dials (dial them directly)"))
    return problems


def _dialplan_problems(data: dict[str, Any]) -> list[tuple[Path_, str]]:
    """Extensions an emergency number would shadow (9-911, 112, ...) are refused: emergency
    recognition always comes first in the dial plan, so such an extension would never ring.
    Without a ``dialplan`` section the default country applies."""
    section = _mapping(data.get("dialplan") or {})
    country = section.get("country", DEFAULT_DIALPLAN_COUNTRY)
    prefix = section.get("outside_line_prefix")
    if not isinstance(country, str) or not isinstance(prefix, str | None):
        return []  # wrong shapes are reported by the model
    if prefix is not None and not re.fullmatch(r"[0-9]{1,4}", prefix):
        prefix = None
    extras = [
        number
        for number in _sequence(section.get("extra_emergency_numbers"))
        if isinstance(number, str) and re.fullmatch(r"[0-9]{1,15}", number)
    ]
    try:
        emergency = EmergencyNumbers(country.strip().upper(), extras)
    except DialPlanError:
        return []
    problems: list[tuple[Path_, str]] = []
    for a_index, raw_account in enumerate(_sequence(data.get("accounts"))):
        for d_index, raw_device in enumerate(_sequence(_mapping(raw_account).get("devices"))):
            extension = _mapping(raw_device).get("extension")
            if not isinstance(extension, str) or not extension.isascii():
                continue
            for message in extension_conflicts([extension], emergency, prefix).values():
                path: Path_ = ("accounts", a_index, "devices", d_index, "extension")
                problems.append((path, message))
    return problems


def _to_plain(node: Any, path: Path_, lines: dict[Path_, int]) -> Any:
    """Copies the round-trip tree into plain Python values, recording the 1-based line of
    every mapping key and sequence item under its key path."""
    if isinstance(node, CommentedMap):
        result: dict[str, Any] = {}
        for key, value in node.items():
            name = str(key)
            try:
                lines[(*path, name)] = node.lc.key(key)[0] + 1
            except (KeyError, IndexError, TypeError, AttributeError):
                pass  # merged (<<) keys have no position of their own
            result[name] = _to_plain(value, (*path, name), lines)
        return result
    if isinstance(node, CommentedSeq):
        items: list[Any] = []
        for index, value in enumerate(node):
            try:
                lines[(*path, index)] = node.lc.item(index)[0] + 1
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
            items.append(_to_plain(value, (*path, index), lines))
        return items
    if isinstance(node, dict):
        return {str(k): _to_plain(v, (*path, str(k)), lines) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_to_plain(v, (*path, i), lines) for i, v in enumerate(node)]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    value = getattr(node, "value", None)  # TaggedScalar and friends
    if isinstance(value, str):
        return value
    return node


def _dotted(path: Path_) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(root)"


def _line_of(path: Path_, lines: dict[Path_, int]) -> int:
    for end in range(len(path), 0, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return 1


_FRIENDLY = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "path_type": "must be a file path",
}


def _message(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind in _FRIENDLY:
        return _FRIENDLY[kind]
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "too_short":
        minimum = ctx.get("min_length")
        return f"must have at least {minimum} item{'s' if minimum != 1 else ''}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "string_too_short":
        minimum = ctx.get("min_length")
        return "must not be empty" if minimum == 1 else f"must be at least {minimum} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx.get('pattern')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = next(iter(ctx.values()), "")
        words = {
            "greater_than_equal": "at least",
            "greater_than": "greater than",
            "less_than_equal": "at most",
            "less_than": "less than",
        }[kind]
        return f"must be {words} {bound}"
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message


def _format_errors(
    errors: Iterable[Any],
    cross: list[tuple[Path_, str]],
    filename: str,
    lines: dict[Path_, int],
) -> list[str]:
    found: list[tuple[int, str, str]] = []
    for path, message in cross:
        found.append((_line_of(path, lines), _dotted(path), message))
    for error in errors:
        loc: Path_ = tuple(error.get("loc", ()))
        ctx = error.get("ctx") or {}
        if error.get("type") == _PROBLEMS:
            entries = [((*loc, *sub), message) for sub, message in ctx.get("problems", ())]
        else:
            entries = [(loc, _message(error))]
        for path, message in entries:
            line = _line_of(path, lines)
            found.append((line, _dotted(path), message))
    unique = sorted(set(found), key=lambda item: (item[0], item[1], item[2]))
    return [f"{filename}:{line}: {key}: {message}" for line, key, message in unique]


_DUPLICATE_KEY = re.compile(r'found duplicate key "(?P<key>[^"]*)"')


def _yaml_error(exc: YAMLError, filename: str) -> str:
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = str(exc.problem or exc.context or "invalid YAML")
        duplicate = _DUPLICATE_KEY.search(problem)
        if duplicate:
            # ruamel's text quotes both values, which may be secrets: never repeat them.
            problem = f'duplicate key "{duplicate.group("key")}"'
        elif exc.context and exc.context_mark is not None and exc.problem:
            problem = f"{problem} ({exc.context} started at line {exc.context_mark.line + 1})"
        return f"{filename}:{line}: (yaml): {problem}"
    return f"{filename}:1: (yaml): {str(exc).splitlines()[0] if str(exc) else 'invalid YAML'}"


def load_settings_text(text: str, filename: str) -> Settings:
    """Parses and validates a configuration given as text; ``filename`` is used in error
    lines and its directory is the base for relative paths (TLS files)."""
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(text)
    except YAMLError as exc:
        raise ConfigError([_yaml_error(exc, filename)]) from None
    except Exception as exc:  # noqa: BLE001 - any loader failure is a config problem
        raise ConfigError([f"{filename}:1: (yaml): {exc}"]) from None
    lines: dict[Path_, int] = {}
    data = _to_plain(tree, (), lines)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: (root): must be a mapping of sections"])
    base_dir = Path(filename).resolve().parent
    cross = _cross_problems(data, base_dir)
    try:
        settings = Settings.model_validate(
            data, context={"base_dir": base_dir, "cross_checked": True}
        )
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors(), cross, filename, lines)) from None
    if cross:
        raise ConfigError(_format_errors([], cross, filename, lines))
    return settings


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Reads, parses and validates the YAML configuration file at ``path``."""
    filename = os.fspath(path)
    try:
        text = Path(filename).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{filename}:1: (file): not UTF-8 text ({exc.reason})"]) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([f"{filename}:1: (file): cannot read: {reason}"]) from None
    return load_settings_text(text, filename)

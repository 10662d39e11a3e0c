"""The accounts and devices the switch serves, indexed for the registrar.

Built from the settings at start (and on reload): SIP username → Device, with the
credentials digest authentication needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .auth import StoredCredentials
from .settings import Settings


@dataclass(slots=True, frozen=True)
class Device:
    """A phone, ATA or softphone line of an account (an extension)."""

    account_id: str
    extension: str
    username: str
    kind: str
    display_name: str | None
    did: str | None
    credentials: StoredCredentials
    site: str | None = None
    location: str | None = None
    mobility: str = "fixed"
    class_of_service: str = "unrestricted"
    do_not_disturb: bool = False
    forward_all: str | None = None
    speed_dials: dict[str, str] = field(default_factory=dict)
    account_suspended: bool = False

    def __repr__(self) -> str:
        return f"Device({self.account_id}/{self.extension}, user={self.username!r})"


class DeviceDirectory:
    def __init__(self, settings: Settings) -> None:
        self.realm = settings.realm
        self.domains = {d.lower() for d in settings.switch.domains}
        self._by_username: dict[str, Device] = {}
        self._by_extension: dict[tuple[str, str], Device] = {}
        for account in settings.accounts:
            for dev in account.devices:
                username = dev.username or dev.extension
                creds = StoredCredentials(
                    username=username,
                    password=_secret(dev.password),
                    ha1_md5=_secret(dev.ha1_md5),
                    ha1_sha256=_secret(dev.ha1_sha256),
                )
                device = self._by_username[username] = Device(
                    account_id=account.id,
                    extension=dev.extension,
                    username=username,
                    kind=str(getattr(dev.kind, "value", dev.kind)),
                    display_name=dev.display_name,
                    did=dev.did,
                    credentials=creds,
                    site=dev.site,
                    location=dev.location,
                    mobility=dev.mobility,
                    class_of_service=dev.class_of_service,
                    do_not_disturb=dev.do_not_disturb,
                    forward_all=dev.forward_all,
                    speed_dials=dict(dev.speed_dials),
                    account_suspended=account.suspended,
                )
                self._by_extension[(account.id, dev.extension)] = device

    def __len__(self) -> int:
        return len(self._by_username)

    def device(self, username: str) -> Device | None:
        return self._by_username.get(username)

    def device_by_extension(self, account_id: str, extension: str) -> Device | None:
        """The device with this extension in the account (extensions are per account)."""
        return self._by_extension.get((account_id, extension))

    def credentials(self, username: str) -> StoredCredentials | None:
        device = self._by_username.get(username)
        return device.credentials if device else None

    def is_local_domain(self, host: str) -> bool:
        return host.lower().strip("[]") in self.domains or host.lower() in self.domains

    def aor(self, username: str) -> str:
        """The canonical address-of-record of a device: username@realm."""
        return f"{username}@{self.realm}"


def _secret(value) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)

"""Emergency-service activation of site addresses and DIDs with the emergency provider (EM-51).

Before a 911 call from a DID reaches the right PSAP with the right dispatchable address, the
emergency provider (the carrier behind the trunk: its VPC / ALI database) must know the
address: it is validated against the provider's geocoding or MSAG data, then each DID (the
provider's "endpoint", whose number goes in From / P-Asserted-Identity) is provisioned with
it, and the provider confirms when it is emergency-enabled, sometimes minutes later.

Every site address and every DID moves through::

    draft -> validating -> validated -> provisioned -> emergency_enabled
                      \\-> failed (with the provider's reason)

A DID skips "validating": its address is its site's, validated once for the site. A site is
``provisioned`` once every DID of it has been pushed, ``emergency_enabled`` once every one is
enabled with the site's (normalized) address.

:class:`ActivationRegistry` keeps the state of each (kind, id) ("site" / "did") in memory and
appends every change (time, old state, new state, reason, and the whole record after it) to a
journal of JSON lines, fsync'd, read back at start-up.

:class:`ActivationService` drives the provider: ``sync_site()`` validates the site address,
provisions every DID of the site, and polls each pending DID with backoff (a bounded number of
times; the next sync carries on). An address change is pushed to the provider while the old
address stays in force: the DID stays ``emergency_enabled`` with the old address, the new one
is carried as its pending ``change``, and it becomes the address in force only when the
provider confirms it. Anything not enabled raises an admin alert (``on_alert(kind, text)``,
once per new problem) and is listed by ``readiness_problems()`` (EM-81).

Nothing here blocks or delays a call: the call path never consults these states. A 911 call
from a DID that is pending or failed at the provider still goes out, with the switch's own
PIDF-LO and callback number (EM-24); the states only feed alerts and the health status.

The provider interface is :class:`EmergencyProvider`. The real providers' APIs (Bandwidth
geocodeRequest and 911 endpoints, Telnyx emergency addresses / ``emergency_status``, Twilio
emergency addresses, DIDWW...) each need an adapter implementing it. :class:`HttpJsonProvider`
is a generic adapter for the small JSON-over-HTTP API below; it is what the tests use.

    POST /addresses/validate      body: {RFC 5139 element: value, ...}
                                  200:  {"valid": bool, "normalized": {elements} | null,
                                         "reason": str}
    POST /e911/endpoints          body: {"did": "+E164", "address": {elements}}
                                  200:  {"id": str, "status": "pending"|"enabled"|"failed",
                                         "reason": str}
    GET  /e911/endpoints/{id}     200:  same as the POST answer

Requests carry ``Authorization: Bearer <token>`` and ``Content-Type: application/json``; any
other HTTP status, a malformed answer, a refused connection or a timeout is a
:class:`ProviderError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog

from .civic import CivicAddress
from .locations import Site, normalise_e164

__all__ = [
    "ActivationRecord",
    "ActivationRegistry",
    "ActivationService",
    "ActivationState",
    "AddressChange",
    "DID",
    "EmergencyProvider",
    "HttpJsonProvider",
    "ProviderError",
    "ProvisionResult",
    "SITE",
    "ValidationResult",
]

log = structlog.get_logger("e911.activation")

SITE = "site"
DID = "did"
KINDS = (SITE, DID)


class ActivationState(StrEnum):
    DRAFT = "draft"
    VALIDATING = "validating"
    VALIDATED = "validated"
    PROVISIONED = "provisioned"  # pushed to the provider, waiting for its confirmation
    EMERGENCY_ENABLED = "emergency_enabled"
    FAILED = "failed"


_S = ActivationState
# Allowed moves (a state may also be re-entered with new details). Nothing reaches
# provisioned or emergency_enabled without passing through validated, and nothing goes
# back to draft.
_ALLOWED: dict[ActivationState, frozenset[ActivationState]] = {
    _S.DRAFT: frozenset({_S.VALIDATING, _S.VALIDATED, _S.FAILED}),
    _S.VALIDATING: frozenset({_S.VALIDATED, _S.FAILED}),
    _S.VALIDATED: frozenset({_S.VALIDATING, _S.PROVISIONED, _S.EMERGENCY_ENABLED, _S.FAILED}),
    _S.PROVISIONED: frozenset({_S.VALIDATING, _S.VALIDATED, _S.EMERGENCY_ENABLED, _S.FAILED}),
    _S.EMERGENCY_ENABLED: frozenset({_S.VALIDATING, _S.VALIDATED, _S.PROVISIONED, _S.FAILED}),
    _S.FAILED: frozenset({_S.VALIDATING, _S.VALIDATED}),
}


class ProviderError(Exception):
    """The provider could not be asked or gave an unusable answer (not a refusal)."""


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """The provider's verdict on an address; ``normalized`` is its (MSAG) form."""

    valid: bool
    normalized: CivicAddress | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    """The provider's state of a DID's emergency endpoint (after a push or a status query)."""

    accepted: bool
    pending: bool = False
    reason: str = ""
    reference: str | None = None  # the provider's endpoint id, to ask its status

    @property
    def state(self) -> ActivationState:
        if not self.accepted:
            return ActivationState.FAILED
        return ActivationState.PROVISIONED if self.pending else ActivationState.EMERGENCY_ENABLED


class EmergencyProvider(Protocol):
    """What the activation needs from an emergency provider (one adapter per provider API)."""

    async def validate(self, address: CivicAddress) -> ValidationResult: ...

    async def provision(self, did: str, address: CivicAddress) -> ProvisionResult: ...

    async def status(self, reference: str) -> ProvisionResult: ...


@dataclass(frozen=True, slots=True)
class AddressChange:
    """A new address pushed for an emergency-enabled DID, not yet confirmed by the provider
    (``state``: validated, provisioned or failed). The old address stays in force meanwhile."""

    address: CivicAddress
    state: ActivationState
    reason: str = ""
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class ActivationRecord:
    """The activation state of one site address (kind "site") or DID (kind "did").

    ``address``: for a site, its configured address; for a DID, the address provisioned
    (the one in force when ``state`` is emergency_enabled). ``normalized``: the provider's
    form of a site's address. ``reference``: the provider's endpoint id of a DID.
    """

    kind: str
    id: str
    state: ActivationState
    reason: str = ""
    address: CivicAddress | None = None
    normalized: CivicAddress | None = None
    reference: str | None = None
    site: str | None = None
    change: AddressChange | None = None
    updated: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.state is ActivationState.EMERGENCY_ENABLED

    @property
    def address_in_force(self) -> CivicAddress | None:
        """The address the provider has confirmed for this DID (None if not enabled)."""
        return self.address if self.enabled else None

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the journal's ``record``; also what an API shows)."""
        change = None
        if self.change is not None:
            change = {"address": _address_json(self.change.address),
                      "state": str(self.change.state), "reason": self.change.reason,
                      "reference": self.change.reference}
        return {
            "kind": self.kind, "id": self.id, "state": str(self.state), "reason": self.reason,
            "address": None if self.address is None else _address_json(self.address),
            "normalized": None if self.normalized is None else _address_json(self.normalized),
            "reference": self.reference, "site": self.site, "change": change,
            "updated": self.updated,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActivationRecord:
        """Inverse of ``as_dict``; ValueError (or TypeError) on a malformed record."""
        change = None
        raw_change = data.get("change")
        if raw_change is not None:
            change = AddressChange(address=_address_from_json(raw_change["address"]),
                                   state=ActivationState(raw_change["state"]),
                                   reason=str(raw_change.get("reason") or ""),
                                   reference=_optional_text(raw_change.get("reference")))
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        record_id = data["id"]
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("record id missing")
        return cls(
            kind=kind, id=record_id, state=ActivationState(data["state"]),
            reason=str(data.get("reason") or ""),
            address=_optional_address(data.get("address")),
            normalized=_optional_address(data.get("normalized")),
            reference=_optional_text(data.get("reference")),
            site=_optional_text(data.get("site")), change=change,
            updated=float(data.get("updated") or 0.0),
        )


def _address_json(address: CivicAddress) -> dict[str, str]:
    return address.as_mapping()


def _address_from_json(value: Any) -> CivicAddress:
    if not isinstance(value, Mapping):
        raise ValueError(f"an address must be an object of RFC 5139 elements, not {value!r}")
    for element, text in value.items():
        if text is not None and not isinstance(text, str):
            raise ValueError(f"address element {element!r} is not text")
    return CivicAddress.from_elements(value)


def _optional_address(value: Any) -> CivicAddress | None:
    return None if value is None else _address_from_json(value)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not text")
    return str(value)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind {kind!r} (expected 'site' or 'did')")


_UNSET: Any = object()


class ActivationRegistry:
    """Activation states of site addresses and DIDs, journaled (see the module docstring).

    Journal line: ``{"time", "ts", "kind", "id", "stage", "old", "new", "reason", "record"}``
    where ``stage`` is "activation" (the record's own state) or "address_change" (the
    pending new address of an enabled DID) and ``record`` is the whole record after the
    change. ``journal_path`` None keeps the journal in memory. A journal write failure is
    logged and counted (``journal_failures``), never raised.
    """

    def __init__(self, journal_path: Path | str | None, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.journal_path = None if journal_path is None else Path(journal_path)
        self.wall_clock = wall_clock
        self.journal_failures = 0
        self._records: dict[tuple[str, str], ActivationRecord] = {}
        self._memory: list[dict[str, Any]] = []
        if self.journal_path is not None:
            for entry in self.history():
                try:
                    record = ActivationRecord.from_dict(entry["record"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("emergency_activation_journal_line_skipped", error=str(exc))
                    continue
                self._records[(record.kind, record.id)] = record

    def state(self, kind: str, record_id: str) -> ActivationState:
        """The state of a site address or DID (draft when never seen)."""
        _check_kind(kind)
        record = self._records.get((kind, record_id))
        return ActivationState.DRAFT if record is None else record.state

    def record(self, kind: str, record_id: str) -> ActivationRecord | None:
        _check_kind(kind)
        return self._records.get((kind, record_id))

    def all(self) -> list[ActivationRecord]:
        """Every known record, sites first, each kind by id."""
        return [self._records[key] for key in sorted(self._records)
                if key[0] == SITE] + [self._records[key] for key in sorted(self._records)
                                      if key[0] == DID]

    def transition(self, kind: str, record_id: str, new: ActivationState | str,
                   reason: str = "", *, address: CivicAddress | None = _UNSET,
                   normalized: CivicAddress | None = _UNSET, reference: str | None = _UNSET,
                   site: str | None = _UNSET, change: AddressChange | None = _UNSET,
                   ) -> ActivationRecord:
        """Move a record to ``new`` (fields not given are kept) and journal it. Raises
        ValueError for an unknown kind or state, or a move the state machine forbids."""
        _check_kind(kind)
        new_state = ActivationState(new)
        current = self._records.get((kind, record_id))
        old_state = ActivationState.DRAFT if current is None else current.state
        if new_state is ActivationState.DRAFT or (
                new_state is not old_state and new_state not in _ALLOWED[old_state]):
            raise ValueError(f"{kind} {record_id}: {old_state} -> {new_state} is not allowed")
        base = current or ActivationRecord(kind=kind, id=record_id, state=old_state)
        fields: dict[str, Any] = {"state": new_state, "reason": reason}
        for name, value in (("address", address), ("normalized", normalized),
                            ("reference", reference), ("site", site), ("change", change)):
            if value is not _UNSET:
                fields[name] = value
        return self._commit(base, replace(base, **fields), "activation", str(old_state),
                            str(new_state), reason)

    def set_change(self, kind: str, record_id: str, change: AddressChange | None,
                   reason: str = "") -> ActivationRecord:
        """Set (or drop, with None) the pending address change of an emergency-enabled
        record, journaled as stage "address_change". ValueError if it is not enabled."""
        _check_kind(kind)
        current = self._records.get((kind, record_id))
        if current is None or not current.enabled:
            raise ValueError(f"{kind} {record_id}: an address change needs an "
                             "emergency-enabled record")
        old = "none" if current.change is None else str(current.change.state)
        new = "none" if change is None else str(change.state)
        return self._commit(current, replace(current, change=change), "address_change", old,
                            new, reason)

    def history(self, kind: str | None = None, record_id: str | None = None,
                ) -> list[dict[str, Any]]:
        """Journal entries, oldest first; all, or one kind's, or one record's."""
        entries = self._read() if self.journal_path is not None else list(self._memory)
        return [entry for entry in entries
                if (kind is None or entry.get("kind") == kind)
                and (record_id is None or entry.get("id") == record_id)]

    # -- internals ----------------------------------------------------------------------

    def _commit(self, before: ActivationRecord, after: ActivationRecord, stage: str, old: str,
                new: str, reason: str) -> ActivationRecord:
        now = self.wall_clock()
        after = replace(after, updated=now)
        if replace(before, updated=now) == after and (before.kind, before.id) in self._records:
            return before  # nothing changed: no journal line
        self._records[(after.kind, after.id)] = after
        entry = {"time": _iso(now), "ts": now, "kind": after.kind, "id": after.id,
                 "stage": stage, "old": old, "new": new, "reason": reason,
                 "record": after.as_dict()}
        self._append(entry)
        log.info("emergency.activation", kind=after.kind, id=after.id, stage=stage, old=old,
                 new=new, reason=reason)
        return after

    def _append(self, entry: dict[str, Any]) -> None:
        if self.journal_path is None:
            self._memory.append(entry)
            return
        data = (json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n").encode()
        try:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # keep a torn last line apart from this one
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.journal_failures += 1
            log.error("emergency_activation_journal_failed", path=str(self.journal_path),
                      error=str(exc))

    def _read(self) -> list[dict[str, Any]]:
        assert self.journal_path is not None
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("emergency_activation_journal_unreadable", path=str(self.journal_path),
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


# -- the service -----------------------------------------------------------------------------

AlertCallback = Callable[[str, str], Any]


class ActivationService:
    """Brings every configured site address and DID to emergency_enabled at the provider.

    ``dids_of_site`` maps a site id to its DIDs (E.164; the devices' DIDs and the site's
    callback number). Raises ValueError for an unknown site id, a DID that is not E.164 or
    that belongs to two sites. Polling a pending DID waits ``poll_initial`` seconds, then
    doubles up to ``poll_max``, at most ``poll_attempts`` times per sync.
    """

    def __init__(self, registry: ActivationRegistry, provider: EmergencyProvider,
                 sites: Iterable[Site], dids_of_site: Mapping[str, Iterable[str]],
                 on_alert: AlertCallback | None = None, *, poll_initial: float = 2.0,
                 poll_max: float = 60.0, poll_attempts: int = 6, concurrency: int = 8,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if not poll_initial > 0 or not poll_max >= poll_initial:
            raise ValueError("poll delays must be positive, poll_max >= poll_initial")
        if poll_attempts < 1 or concurrency < 1:
            raise ValueError("poll_attempts and concurrency must be at least 1")
        self.registry = registry
        self.provider = provider
        self.on_alert = on_alert
        self.poll_initial = poll_initial
        self.poll_max = poll_max
        self.poll_attempts = poll_attempts
        self._sleep = sleep
        self._slots = asyncio.Semaphore(concurrency)  # DIDs being pushed or polled
        self._site_slots = asyncio.Semaphore(concurrency)  # sites being synced by sync_all
        self._locks: dict[str, asyncio.Lock] = {}
        self._alerted: dict[str, set[str]] = {}
        self.sites: dict[str, Site] = {}
        self._dids: dict[str, tuple[str, ...]] = {}
        self.update(sites, dids_of_site)

    def update(self, sites: Iterable[Site], dids_of_site: Mapping[str, Iterable[str]]) -> None:
        """Replace the sites and their DIDs (configuration reload); ValueError, with every
        problem, leaves the previous ones in place."""
        problems: list[str] = []
        site_index: dict[str, Site] = {}
        for site in sites:
            if not isinstance(site, Site):
                problems.append(f"{site!r} is not a Site")
            elif site.id in site_index:
                problems.append(f"site {site.id} is listed twice")
            else:
                site_index[site.id] = site
        owner: dict[str, str] = {}
        dids: dict[str, tuple[str, ...]] = {site_id: () for site_id in site_index}
        for site_id, numbers in dids_of_site.items():
            if site_id not in site_index:
                problems.append(f"DIDs given for unknown site {site_id!r}")
                continue
            if isinstance(numbers, str):
                problems.append(f"site {site_id}: DIDs must be a list, not a string")
                continue
            listed: list[str] = []
            for number in numbers:
                try:
                    did = normalise_e164(number)
                except ValueError:
                    problems.append(f"site {site_id}: DID {number!r} is not an E.164 number")
                    continue
                if did in owner and owner[did] != site_id:
                    problems.append(f"DID {did} is listed for sites {owner[did]} and {site_id}")
                    continue
                if did not in owner:
                    owner[did] = site_id
                    listed.append(did)
            dids[site_id] = tuple(listed)
        if problems:
            raise ValueError("emergency activation: " + "; ".join(problems))
        self.sites = site_index
        self._dids = dids

    def dids(self, site_id: str) -> tuple[str, ...]:
        return self._dids.get(site_id, ())

    # -- sync ----------------------------------------------------------------------------

    async def sync_site(self, site: Site | str) -> ActivationRecord:
        """Validate the site's address, provision each of its DIDs, poll the pending ones
        (bounded), raise alerts for anything not enabled. Returns the site's record.
        Provider failures become states and alerts; ValueError only for an unknown site."""
        if isinstance(site, str):
            if site not in self.sites:
                raise ValueError(f"unknown site {site!r}")
            site = self.sites[site]
        lock = self._locks.setdefault(site.id, asyncio.Lock())
        async with lock:
            normalized, reason = await self._validate_site(site)
            if normalized is None:
                self._site_invalid(site, reason)
            else:
                await asyncio.gather(*(self._sync_did_slot(site, did, normalized)
                                       for did in self.dids(site.id)))
                self._settle_site(site, normalized)
            self._raise_alerts(site)
        record = self.registry.record(SITE, site.id)
        assert record is not None
        return record

    async def sync_all(self) -> None:
        """``sync_site`` for every site (at most ``concurrency`` sites at a time, so that
        one site's pending DIDs do not hold the others up); a failure is logged."""
        async def one(site: Site) -> None:
            async with self._site_slots:
                try:
                    await self.sync_site(site)
                except Exception:
                    log.exception("emergency.activation_sync_failed", site=site.id)

        await asyncio.gather(*(one(site) for site in list(self.sites.values())))

    async def run(self, interval: float) -> None:
        """Sync every site every ``interval`` seconds, until cancelled."""
        if not interval > 0:
            raise ValueError("the activation interval must be positive")
        while True:
            await self.sync_all()
            await self._sleep(interval)

    # -- readiness (EM-81) ---------------------------------------------------------------

    def readiness_problems(self) -> list[str]:
        """One line per site address or DID that is not emergency-enabled, by site id then
        DID ([] = all enabled)."""
        return [text for site_id in sorted(self.sites)
                for _, text in self._problems(self.sites[site_id])]

    def _problems(self, site: Site) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        record = self.registry.record(SITE, site.id)
        if record is None or record.address != site.address or record.state in (
                _S.DRAFT, _S.VALIDATING):
            problems.append(("address_unvalidated",
                             f"{site.id}: address not yet validated by the provider"))
        elif record.state is _S.FAILED:
            problems.append(("address_invalid", f"{site.id}: address failed validation:"
                             f" {record.reason or 'no reason given'}"))
        for did in self.dids(site.id):
            did_record = self.registry.record(DID, did)
            state = _S.DRAFT if did_record is None else did_record.state
            if state is _S.EMERGENCY_ENABLED:
                assert did_record is not None
                change = did_record.change
                if change is None:
                    continue
                if change.state is _S.FAILED:
                    problems.append(("address_change_failed",
                                     f"{did}: address change failed: "
                                     f"{change.reason or 'no reason given'}; the old address"
                                     " stays in force"))
                else:
                    problems.append(("address_change_pending",
                                     f"{did}: address change pending at the provider; the"
                                     " old address stays in force"))
            elif state is _S.PROVISIONED:
                problems.append(("emergency_pending",
                                 f"{did}: emergency service pending at the provider"))
            elif state is _S.FAILED:
                assert did_record is not None
                problems.append(("emergency_failed", f"{did}: emergency service failed: "
                                 f"{did_record.reason or 'no reason given'}"))
            else:
                problems.append(("emergency_not_provisioned",
                                 f"{did}: emergency service not provisioned at the provider"))
        return problems

    # -- internals -----------------------------------------------------------------------

    async def _validate_site(self, site: Site) -> tuple[CivicAddress | None, str]:
        record = self.registry.record(SITE, site.id)
        if (record is not None and record.address == site.address
                and record.normalized is not None
                and record.state in (_S.VALIDATED, _S.PROVISIONED, _S.EMERGENCY_ENABLED)):
            return record.normalized, ""
        self.registry.transition(SITE, site.id, _S.VALIDATING, "sent to the provider",
                                 address=site.address, normalized=None)
        try:
            result = await self.provider.validate(site.address)
            if not isinstance(result, ValidationResult):
                raise ProviderError(f"validate() gave {type(result).__name__}, "
                                    "not a ValidationResult")
        except Exception as exc:
            reason = f"provider error: {exc}"
            self.registry.transition(SITE, site.id, _S.FAILED, reason)
            return None, reason
        if not result.valid:
            reason = result.reason or "no reason given"
            self.registry.transition(SITE, site.id, _S.FAILED, reason)
            return None, reason
        normalized = result.normalized or site.address
        self.registry.transition(SITE, site.id, _S.VALIDATED, "address validated by the"
                                 " provider", normalized=normalized)
        return normalized, ""

    def _site_invalid(self, site: Site, reason: str) -> None:
        why = f"site {site.id} address failed validation: {reason}"
        for did in self.dids(site.id):
            record = self.registry.record(DID, did)
            if record is not None and record.enabled:
                change = AddressChange(site.address, _S.FAILED, why)
                if record.change != change:
                    self.registry.set_change(DID, did, change, why)
            else:
                self.registry.transition(DID, did, _S.FAILED, why, site=site.id)

    async def _sync_did_slot(self, site: Site, did: str, normalized: CivicAddress) -> None:
        async with self._slots:
            try:
                await self._sync_did(site, did, normalized)
            except Exception:  # one DID's trouble never stops the others
                log.exception("emergency.activation_did_failed", site=site.id, did=did)

    async def _sync_did(self, site: Site, did: str, normalized: CivicAddress) -> None:
        record = self.registry.record(DID, did)
        if record is not None and record.enabled:
            await self._change_address(site, did, record, normalized)
            return
        if (record is not None and record.state is _S.PROVISIONED and record.reference
                and record.address == normalized):
            reference = record.reference  # pushed before (last sync or before a restart)
        else:
            self.registry.transition(DID, did, _S.VALIDATED, f"site {site.id} address"
                                     " validated", address=normalized, site=site.id,
                                     reference=None, change=None)
            result = await self._provision(did, normalized)
            if result.state is not _S.PROVISIONED:
                self.registry.transition(DID, did, result.state, result.reason
                                         or _default_reason(result.state),
                                         reference=result.reference)
                return
            reference = result.reference or ""
            self.registry.transition(DID, did, _S.PROVISIONED, result.reason
                                     or "pending at the provider", reference=reference)
            self._settle_site(site, normalized, final=False)
        outcome = await self._poll(did, reference)
        if outcome is not None:
            self.registry.transition(DID, did, outcome.state, outcome.reason
                                     or _default_reason(outcome.state))

    async def _change_address(self, site: Site, did: str, record: ActivationRecord,
                              normalized: CivicAddress) -> None:
        """An enabled DID whose site address is now ``normalized``: push it, keep the old
        one in force until the provider confirms."""
        if record.address == normalized:
            if record.change is not None:
                self.registry.set_change(DID, did, None, "the address in force is the"
                                         " site's address again")
            return
        change = record.change
        if (change is not None and change.address == normalized
                and change.state is _S.PROVISIONED and change.reference):
            reference = change.reference
        else:
            self.registry.set_change(DID, did, AddressChange(normalized, _S.VALIDATED),
                                     "new site address validated; the old address stays in"
                                     " force")
            result = await self._provision(did, normalized)
            if result.state is _S.FAILED:
                self.registry.set_change(DID, did, AddressChange(
                    normalized, _S.FAILED, result.reason or "refused by the provider",
                    result.reference), result.reason or "refused by the provider")
                return
            if result.state is _S.EMERGENCY_ENABLED:
                self._confirm_change(did, normalized, result.reference, result.reason)
                return
            reference = result.reference or ""
            self.registry.set_change(DID, did, AddressChange(
                normalized, _S.PROVISIONED, result.reason, reference),
                "new address pending at the provider; the old address stays in force")
            self._settle_site(site, normalized, final=False)
        outcome = await self._poll(did, reference)
        if outcome is None:
            return
        if outcome.state is _S.EMERGENCY_ENABLED:
            self._confirm_change(did, normalized, reference, outcome.reason)
        else:
            reason = outcome.reason or "refused by the provider"
            self.registry.set_change(DID, did, AddressChange(normalized, _S.FAILED, reason,
                                                             reference), reason)

    def _confirm_change(self, did: str, address: CivicAddress, reference: str | None,
                        reason: str) -> None:
        self.registry.transition(DID, did, _S.EMERGENCY_ENABLED, reason
                                 or "the provider confirmed the new address", address=address,
                                 reference=reference, change=None)

    async def _provision(self, did: str, address: CivicAddress) -> ProvisionResult:
        try:
            result = await self.provider.provision(did, address)
            if not isinstance(result, ProvisionResult):
                raise ProviderError(f"provision() gave {type(result).__name__}, "
                                    "not a ProvisionResult")
        except Exception as exc:
            return ProvisionResult(accepted=False, reason=f"provider error: {exc}")
        if result.state is _S.PROVISIONED and not result.reference:
            return ProvisionResult(accepted=False, reason="the provider accepted the DID as"
                                   " pending but gave no endpoint id to follow")
        return result

    async def _poll(self, did: str, reference: str) -> ProvisionResult | None:
        """The provider's final answer for ``reference`` (enabled or failed), or None if
        it is still pending (or unreachable) after the bounded attempts."""
        delay = self.poll_initial
        for attempt in range(1, self.poll_attempts + 1):
            await self._sleep(delay)
            delay = min(delay * 2, self.poll_max)
            try:
                result = await self.provider.status(reference)
                if not isinstance(result, ProvisionResult):
                    raise ProviderError(f"status() gave {type(result).__name__}, "
                                        "not a ProvisionResult")
            except Exception as exc:
                log.warning("emergency.activation_status_failed", did=did,
                            reference=reference, attempt=attempt, error=str(exc))
                continue
            if result.state is not _S.PROVISIONED:
                return result
        return None

    def _settle_site(self, site: Site, normalized: CivicAddress, *, final: bool = True
                     ) -> None:
        """The site's state from its DIDs': emergency_enabled when all have the site's
        address in force, provisioned when all are pushed. ``final`` False (a DID was just
        pushed, polls follow) only moves a validated site to provisioned."""
        dids = self.dids(site.id)
        records = [self.registry.record(DID, did) for did in dids]

        def in_force(record: ActivationRecord | None) -> bool:
            return (record is not None and record.enabled and record.address == normalized
                    and record.change is None)

        def pushed(record: ActivationRecord | None) -> bool:
            if record is None:
                return False
            if record.address == normalized and record.state in (_S.PROVISIONED,
                                                                 _S.EMERGENCY_ENABLED):
                return True
            change = record.change
            return (record.enabled and change is not None and change.address == normalized
                    and change.state is _S.PROVISIONED)

        if not final:
            if (self.registry.state(SITE, site.id) is _S.VALIDATED
                    and all(pushed(record) for record in records)):
                self.registry.transition(SITE, site.id, _S.PROVISIONED,
                                         "every DID of the site is pushed to the provider")
            return
        if dids and all(in_force(record) for record in records):
            self.registry.transition(SITE, site.id, _S.EMERGENCY_ENABLED,
                                     "every DID of the site is emergency-enabled")
        elif dids and all(pushed(record) for record in records):
            self.registry.transition(SITE, site.id, _S.PROVISIONED,
                                     "every DID of the site is pushed to the provider")
        else:
            reason = ("no DID to provision" if not dids
                      else "not every DID of the site is accepted by the provider")
            self.registry.transition(SITE, site.id, _S.VALIDATED, reason)

    def _raise_alerts(self, site: Site) -> None:
        problems = self._problems(site)
        seen = self._alerted.get(site.id, set())
        for kind, text in problems:
            if text in seen or self.on_alert is None:
                continue
            try:
                self.on_alert(kind, text)
            except Exception:
                log.exception("emergency.activation_alert_failed", kind=kind)
        self._alerted[site.id] = {text for _, text in problems}


def _default_reason(state: ActivationState) -> str:
    if state is _S.EMERGENCY_ENABLED:
        return "enabled by the provider"
    if state is _S.FAILED:
        return "refused by the provider"
    return "pending at the provider"


# -- the generic JSON-over-HTTP provider -----------------------------------------------------

_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")
_MAX_HEADERS = 100


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class HttpJsonProvider:
    """:class:`EmergencyProvider` over the generic JSON API of the module docstring
    (HTTP/1.1 on asyncio streams, one connection per request; https verifies the
    certificate). Raises ValueError for a bad base URL, token or timeout."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 10.0, *,
                 max_body: int = 1 << 20, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"provider URL {base_url!r} must be http:// or https:// with a"
                             " host")
        if parts.query or parts.fragment:
            raise ValueError(f"provider URL {base_url!r} must not have a query or fragment")
        if token is not None and (not token or any(c in token for c in "\r\n")):
            raise ValueError("provider token must be non-empty text on one line")
        if not timeout > 0:
            raise ValueError("provider timeout must be positive")
        self.base_url = base_url
        self.host = parts.hostname
        self.https = parts.scheme == "https"
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"provider URL {base_url!r}: {exc}") from None
        self.port = port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        host_text = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host_text if port is None else f"{host_text}:{port}"
        self.token = token
        self.timeout = timeout
        self.max_body = max_body
        self.ssl_context = ssl_context

    async def validate(self, address: CivicAddress) -> ValidationResult:
        answer = await self._request("POST", "/addresses/validate", _address_json(address))
        valid = answer.get("valid")
        if not isinstance(valid, bool):
            raise ProviderError(f"validate answer without a boolean 'valid': {answer!r:.200}")
        normalized = answer.get("normalized")
        try:
            address_out = None if normalized is None else _address_from_json(normalized)
        except (TypeError, ValueError) as exc:
            raise ProviderError(f"validate answer: bad normalized address: {exc}") from None
        return ValidationResult(valid=valid, normalized=address_out,
                                reason=_reason(answer))

    async def provision(self, did: str, address: CivicAddress) -> ProvisionResult:
        answer = await self._request("POST", "/e911/endpoints",
                                     {"did": did, "address": _address_json(address)})
        return _endpoint(answer)

    async def status(self, reference: str) -> ProvisionResult:
        if not isinstance(reference, str) or not reference:
            raise ProviderError("no endpoint id to ask the status of")
        answer = await self._request(
            "GET", f"/e911/endpoints/{urllib.parse.quote(reference, safe='')}", None)
        result = _endpoint(answer)
        return result if result.reference else replace(result, reference=reference)

    # -- HTTP ---------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: Any) -> dict[str, Any]:
        what = f"{method} {self.prefix}{path}"
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        try:
            response = await asyncio.wait_for(self._exchange(method, self.prefix + path,
                                                             payload), self.timeout)
        except TimeoutError:
            raise ProviderError(f"{what}: no answer within {self.timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                UnicodeError) as exc:
            raise ProviderError(f"{what}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(response.body) if response.body else None
        except ValueError:
            answer = None
        if not 200 <= response.status < 300:
            detail = _reason(answer) if isinstance(answer, dict) else ""
            if not detail:
                detail = response.body[:200].decode("utf-8", "replace").strip()
            raise ProviderError(f"{what}: HTTP {response.status} {response.reason}"
                                + (f": {detail}" if detail else ""))
        if not isinstance(answer, dict):
            raise ProviderError(f"{what}: the answer is not a JSON object")
        return answer

    async def _exchange(self, method: str, target: str, payload: bytes | None) -> _Response:
        context = None
        if self.https:
            context = self.ssl_context or ssl.create_default_context()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context)
        try:
            head = [f"{method} {target or '/'} HTTP/1.1", f"Host: {self.host_header}",
                    "User-Agent: softswitch-e911", "Accept: application/json",
                    "Connection: close"]
            if self.token is not None:
                head.append(f"Authorization: Bearer {self.token}")
            if payload is not None:
                head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + (payload or b""))
            await writer.drain()
            while True:
                response = await self._read_head(reader)
                if response.status >= 200 or response.status < 100:
                    break  # skip interim 1xx answers
            response.body = await self._read_body(reader, response.headers)
            return response
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader) -> _Response:
        line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise ProviderError(f"not an HTTP answer: {line[:80]!r}")
        response = _Response(status=int(match.group(1)), reason=match.group(2) or "")
        for _ in range(_MAX_HEADERS):
            header = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            if not header:
                return response
            name, _, value = header.partition(":")
            response.headers[name.strip().lower()] = value.strip()
        raise ProviderError("too many HTTP header lines")

    async def _read_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]
                         ) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = (await reader.readline()).split(b";", 1)[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise ProviderError("bad chunk size in the HTTP answer") from None
                if size == 0:
                    return bytes(body)
                if len(body) + size > self.max_body:
                    raise ProviderError("HTTP answer too large")
                body += await reader.readexactly(size)
                await reader.readexactly(2)  # CRLF after each chunk
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ProviderError(f"bad Content-Length {length!r}")
            if int(length) > self.max_body:
                raise ProviderError("HTTP answer too large")
            return await reader.readexactly(int(length))
        body = bytearray()  # no length: the body ends when the provider closes
        while chunk := await reader.read(65536):
            body += chunk
            if len(body) > self.max_body:
                raise ProviderError("HTTP answer too large")
        return bytes(body)


def _reason(answer: Mapping[str, Any]) -> str:
    reason = answer.get("reason")
    return reason.strip() if isinstance(reason, str) else ""


def _endpoint(answer: Mapping[str, Any]) -> ProvisionResult:
    status = answer.get("status")
    if status not in ("pending", "enabled", "failed"):
        raise ProviderError(f"endpoint answer with status {status!r} (expected pending,"
                            " enabled or failed)")
    reference = answer.get("id")
    if reference is not None and (isinstance(reference, bool)
                                  or not isinstance(reference, str | int)):
        raise ProviderError(f"endpoint answer with id {reference!r}")
    return ProvisionResult(accepted=status != "failed", pending=status == "pending",
                           reason=_reason(answer),
                           reference=None if reference in (None, "") else str(reference))

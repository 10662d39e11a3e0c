"""Unit tests of e911.activation (EM-51): the activation state machine of site addresses and
DIDs, its fsync'd journal, and the service driving a fake emergency provider (validate,
provision, status polling with backoff, address changes that keep the old address in force,
alerts and EM-81 readiness lines)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from e911.activation import (
    DID,
    SITE,
    ActivationRecord,
    ActivationRegistry,
    ActivationService,
    ActivationState,
    AddressChange,
    ProviderError,
    ProvisionResult,
    ValidationResult,
)
from e911.civic import CivicAddress
from e911.locations import Site

S = ActivationState
T0 = 1_700_000_000.0
DID1 = "+13125550101"
DID2 = "+13125550102"
MAIN = CivicAddress(country="US", subdivision="IL", city="Chicago", road="Main",
                    street_suffix="St", house_number="10", postal_code="60601")
BAD = dataclasses.replace(MAIN, house_number="999")
MOVED = dataclasses.replace(MAIN, road="Lake", house_number="200")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def site(address: CivicAddress = MAIN, site_id: str = "chi") -> Site:
    return Site(id=site_id, country="US", address=address, callback_number=DID2)


def normalized(address: CivicAddress) -> CivicAddress:
    return dataclasses.replace(address, road=address.road.upper())


class FakeProvider:
    """Invalid: house number 999. DIDs: ``pending[did]`` status answers "pending" before
    "enabled"; ``refuse[did]`` refuses the push; ``fail_later[did]`` fails at status."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.refuse: dict[str, str] = {}
        self.fail_later: dict[str, str] = {}
        self.validate_error: Exception | None = None
        self.status_error: Exception | None = None
        self.validated: list[CivicAddress] = []
        self.provisioned: list[tuple[str, CivicAddress, str]] = []
        self.polled: list[str] = []
        self._endpoints: dict[str, tuple[str, int]] = {}

    async def validate(self, address: CivicAddress) -> ValidationResult:
        self.validated.append(address)
        if self.validate_error is not None:
            raise self.validate_error
        if address.house_number == "999":
            return ValidationResult(False, None, "house number not in MSAG range")
        return ValidationResult(True, normalized(address), "")

    async def provision(self, did: str, address: CivicAddress) -> ProvisionResult:
        reference = f"ep-{len(self.provisioned) + 1}"
        self.provisioned.append((did, address, reference))
        if did in self.refuse:
            return ProvisionResult(False, False, self.refuse[did], reference)
        self._endpoints[reference] = (did, self.pending.get(did, 0))
        return ProvisionResult(True, True, "", reference)

    async def status(self, reference: str) -> ProvisionResult:
        self.polled.append(reference)
        if self.status_error is not None:
            raise self.status_error
        did, left = self._endpoints[reference]
        if left > 0:
            self._endpoints[reference] = (did, left - 1)
            return ProvisionResult(True, True, "", reference)
        if did in self.fail_later:
            return ProvisionResult(False, False, self.fail_later[did], reference)
        return ProvisionResult(True, False, "", reference)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def make(tmp_path: Path, provider: FakeProvider | None = None, *, sites: list[Site] | None = None,
         dids: dict[str, list[str]] | None = None, poll_attempts: int = 5,
         ) -> tuple[ActivationService, FakeProvider, list[tuple[str, str]], Sleeps]:
    provider = provider or FakeProvider()
    alerts: list[tuple[str, str]] = []
    sleeps = Sleeps()
    registry = ActivationRegistry(tmp_path / "activation.jsonl", wall_clock=Clock())
    service = ActivationService(
        registry, provider, sites or [site()], dids if dids is not None else {"chi": [DID1, DID2]},
        lambda kind, text: alerts.append((kind, text)), poll_initial=1.0, poll_max=4.0,
        poll_attempts=poll_attempts, sleep=sleeps)
    return service, provider, alerts, sleeps


def journal(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in
            (tmp_path / "activation.jsonl").read_text().splitlines()]


# -- registry -------------------------------------------------------------------------------


def test_unknown_record_is_draft_and_unknown_kind_is_refused(tmp_path: Path) -> None:
    registry = ActivationRegistry(tmp_path / "a.jsonl")
    assert registry.state(SITE, "chi") is S.DRAFT
    assert registry.record(DID, DID1) is None
    assert registry.all() == []
    with pytest.raises(ValueError, match="unknown activation kind 'trunk'"):
        registry.state("trunk", "x")


def test_transitions_are_journaled_fsynced_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    registry = ActivationRegistry(path, wall_clock=Clock())
    registry.transition(SITE, "chi", S.VALIDATING, "sent", address=MAIN)
    registry.transition(SITE, "chi", S.VALIDATED, "ok", normalized=normalized(MAIN))
    registry.transition(DID, DID1, S.VALIDATED, "site ok", address=MAIN, site="chi")
    registry.transition(DID, DID1, S.PROVISIONED, "pending", reference="ep-7")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["kind"], e["id"], e["old"], e["new"], e["reason"]) for e in lines] == [
        ("site", "chi", "draft", "validating", "sent"),
        ("site", "chi", "validating", "validated", "ok"),
        ("did", DID1, "draft", "validated", "site ok"),
        ("did", DID1, "validated", "provisioned", "pending"),
    ]
    assert lines[0]["time"].endswith("Z") and lines[0]["ts"] > T0
    assert lines[3]["record"]["reference"] == "ep-7"
    assert lines[1]["record"]["normalized"]["RD"] == "MAIN"

    reloaded = ActivationRegistry(path)
    assert reloaded.state(SITE, "chi") is S.VALIDATED
    assert reloaded.record(SITE, "chi") == registry.record(SITE, "chi")
    assert reloaded.record(DID, DID1) == registry.record(DID, DID1)
    assert [r.id for r in reloaded.all()] == ["chi", DID1]


def test_torn_and_garbage_lines_are_skipped_at_reload(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    registry = ActivationRegistry(path)
    registry.transition(SITE, "chi", S.VALIDATING, "sent", address=MAIN)
    with path.open("a") as handle:
        handle.write('{"kind": "site", "id": "chi", "record": {"kind": "site", "id": "chi", '
                     '"state": "bogus"}}\n{"kind": "site", "id": "ch')
    reloaded = ActivationRegistry(path)
    assert reloaded.state(SITE, "chi") is S.VALIDATING
    reloaded.transition(SITE, "chi", S.FAILED, "bad")  # appended on its own line
    assert ActivationRegistry(path).state(SITE, "chi") is S.FAILED


@pytest.mark.parametrize(("path", "bad"), [
    ([], S.EMERGENCY_ENABLED),
    ([], S.PROVISIONED),
    ([S.VALIDATING], S.PROVISIONED),
    ([S.VALIDATING, S.FAILED], S.EMERGENCY_ENABLED),
    ([S.VALIDATING, S.VALIDATED], S.DRAFT),
])
def test_the_state_machine_refuses_shortcuts(path: list[ActivationState],
                                             bad: ActivationState) -> None:
    registry = ActivationRegistry(None)
    for state in path:
        registry.transition(DID, DID1, state)
    with pytest.raises(ValueError, match="is not allowed"):
        registry.transition(DID, DID1, bad)


def test_a_repeated_identical_transition_writes_no_line(tmp_path: Path) -> None:
    registry = ActivationRegistry(tmp_path / "a.jsonl")
    registry.transition(SITE, "chi", S.VALIDATING, "sent", address=MAIN)
    registry.transition(SITE, "chi", S.VALIDATING, "sent", address=MAIN)
    registry.transition(SITE, "chi", S.VALIDATING, "sent again", address=MAIN)
    assert len(registry.history()) == 2


def test_an_address_change_needs_an_enabled_record() -> None:
    registry = ActivationRegistry(None)
    registry.transition(DID, DID1, S.VALIDATED, address=MAIN)
    with pytest.raises(ValueError, match="needs an emergency-enabled record"):
        registry.set_change(DID, DID1, AddressChange(MOVED, S.VALIDATED))


def test_record_round_trips_through_json() -> None:
    record = ActivationRecord(DID, DID1, S.EMERGENCY_ENABLED, "ok", address=MAIN,
                              reference="ep-1", site="chi",
                              change=AddressChange(MOVED, S.PROVISIONED, "", "ep-2"),
                              updated=T0)
    assert ActivationRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    assert record.address_in_force == MAIN
    assert dataclasses.replace(record, state=S.PROVISIONED).address_in_force is None


def test_provision_result_state() -> None:
    assert ProvisionResult(False).state is S.FAILED
    assert ProvisionResult(True, True).state is S.PROVISIONED
    assert ProvisionResult(True, False).state is S.EMERGENCY_ENABLED


# -- service ---------------------------------------------------------------------------------


def test_bad_configuration_is_refused_with_every_problem() -> None:
    registry = ActivationRegistry(None)
    with pytest.raises(ValueError) as info:
        ActivationService(registry, FakeProvider(), [site(), site(MOVED, "nyc")],
                          {"chi": [DID1, "12"], "nyc": [DID1], "gone": [DID2]})
    text = str(info.value)
    assert "'12' is not an E.164 number" in text
    assert f"DID {DID1} is listed for sites chi and nyc" in text
    assert "unknown site 'gone'" in text
    with pytest.raises(ValueError, match="must be a list"):
        ActivationService(registry, FakeProvider(), [site()], {"chi": DID1})


async def test_unknown_site_is_a_clear_error(tmp_path: Path) -> None:
    service, *_ = make(tmp_path)
    with pytest.raises(ValueError, match="unknown site 'nowhere'"):
        await service.sync_site("nowhere")


def test_readiness_before_any_sync_lists_everything(tmp_path: Path) -> None:
    service, *_ = make(tmp_path)
    assert service.readiness_problems() == [
        "chi: address not yet validated by the provider",
        f"{DID1}: emergency service not provisioned at the provider",
        f"{DID2}: emergency service not provisioned at the provider",
    ]


async def test_invalid_address_fails_site_and_dids_and_alerts(tmp_path: Path) -> None:
    service, provider, alerts, _ = make(tmp_path, sites=[site(BAD)])
    record = await service.sync_site("chi")
    assert record.state is S.FAILED
    assert record.reason == "house number not in MSAG range"
    for did in (DID1, DID2):
        assert service.registry.state(DID, did) is S.FAILED
    assert provider.provisioned == []
    why = "site chi address failed validation: house number not in MSAG range"
    assert service.readiness_problems() == [
        "chi: address failed validation: house number not in MSAG range",
        f"{DID1}: emergency service failed: {why}",
        f"{DID2}: emergency service failed: {why}",
    ]
    assert alerts[0] == ("address_invalid",
                         "chi: address failed validation: house number not in MSAG range")
    assert {kind for kind, _ in alerts[1:]} == {"emergency_failed"}
    assert [(e["old"], e["new"]) for e in journal(tmp_path) if e["kind"] == "site"] == [
        ("draft", "validating"), ("validating", "failed")]

    await service.sync_site("chi")  # same problems: no new alert
    assert len(alerts) == 3


async def test_after_the_fix_enabled_only_once_the_provider_confirms(tmp_path: Path) -> None:
    service, provider, alerts, sleeps = make(tmp_path, sites=[site(BAD)])
    provider.pending[DID1] = 2
    await service.sync_site("chi")
    service.update([site(MAIN)], {"chi": [DID1, DID2]})
    record = await service.sync_site("chi")

    assert record.state is S.EMERGENCY_ENABLED
    assert record.normalized == normalized(MAIN)
    did1 = service.registry.record(DID, DID1)
    assert did1 is not None and did1.state is S.EMERGENCY_ENABLED
    assert did1.address_in_force == normalized(MAIN)  # the provider's normalized form
    assert [d for d, _, _ in provider.provisioned] == [DID1, DID2]
    assert all(address == normalized(MAIN) for _, address, _ in provider.provisioned)
    assert provider.polled.count("ep-1") == 3  # pending, pending, enabled
    assert [(e["old"], e["new"]) for e in journal(tmp_path) if e["id"] == DID1] == [
        ("draft", "failed"), ("failed", "validated"), ("validated", "provisioned"),
        ("provisioned", "emergency_enabled")]
    assert sorted(sleeps.delays) == sorted([1.0, 2.0, 4.0, 1.0])
    assert service.readiness_problems() == []


async def test_pending_beyond_the_bound_alerts_and_resumes_next_sync(tmp_path: Path) -> None:
    service, provider, alerts, sleeps = make(tmp_path, poll_attempts=4)
    provider.pending[DID1] = 6
    record = await service.sync_site("chi")
    # DID1: 4 bounded polls doubling up to poll_max; DID2: one poll, concurrently
    assert sorted(sleeps.delays) == [1.0, 1.0, 2.0, 4.0, 4.0]
    assert provider.polled.count("ep-1") == 4
    assert record.state is S.PROVISIONED  # every DID pushed, not every one enabled
    assert service.registry.state(DID, DID1) is S.PROVISIONED
    assert service.registry.state(DID, DID2) is S.EMERGENCY_ENABLED
    assert service.readiness_problems() == [f"{DID1}: emergency service pending at the provider"]
    assert alerts == [("emergency_pending", f"{DID1}: emergency service pending at the provider")]

    record = await service.sync_site("chi")
    assert record.state is S.EMERGENCY_ENABLED
    assert [d for d, _, _ in provider.provisioned] == [DID1, DID2]  # not pushed again
    assert provider.validated == [MAIN]  # validated once for the unchanged address
    assert service.readiness_problems() == []


async def test_refused_did_fails_with_reason_and_is_retried(tmp_path: Path) -> None:
    service, provider, alerts, _ = make(tmp_path)
    provider.refuse[DID2] = "number not on this account"
    await service.sync_site("chi")
    record = service.registry.record(DID, DID2)
    assert record is not None and record.state is S.FAILED
    assert record.reason == "number not on this account"
    assert (f"{DID2}: emergency service failed: number not on this account"
            in service.readiness_problems())
    assert ("emergency_failed", f"{DID2}: emergency service failed: number not on this account"
            ) in alerts
    del provider.refuse[DID2]
    assert (await service.sync_site("chi")).state is S.EMERGENCY_ENABLED


async def test_failed_at_status_time_is_failed(tmp_path: Path) -> None:
    service, provider, _, _ = make(tmp_path)
    provider.pending[DID1] = 1
    provider.fail_later[DID1] = "PSAP boundary lookup failed"
    await service.sync_site("chi")
    record = service.registry.record(DID, DID1)
    assert record is not None and record.state is S.FAILED
    assert record.reason == "PSAP boundary lookup failed"


async def test_address_change_keeps_the_old_address_until_confirmed(tmp_path: Path) -> None:
    service, provider, alerts, _ = make(tmp_path, poll_attempts=2)
    await service.sync_site("chi")
    assert service.registry.state(DID, DID1) is S.EMERGENCY_ENABLED

    provider.pending[DID1] = 3  # longer than one sync polls
    service.update([site(MOVED)], {"chi": [DID1, DID2]})
    await service.sync_site("chi")
    did1 = service.registry.record(DID, DID1)
    assert did1 is not None and did1.state is S.EMERGENCY_ENABLED
    assert did1.address_in_force == normalized(MAIN)
    assert did1.change is not None and did1.change.state is S.PROVISIONED
    assert did1.change.address == normalized(MOVED)
    did2 = service.registry.record(DID, DID2)
    assert did2 is not None and did2.address_in_force == normalized(MOVED)  # confirmed at once
    assert service.registry.state(SITE, "chi") is S.PROVISIONED
    pending_line = (f"{DID1}: address change pending at the provider; the old address stays"
                    " in force")
    assert service.readiness_problems() == [pending_line]
    assert ("address_change_pending", pending_line) in alerts

    await service.sync_site("chi")
    did1 = service.registry.record(DID, DID1)
    assert did1 is not None and did1.change is None
    assert did1.address_in_force == normalized(MOVED)
    assert service.registry.state(SITE, "chi") is S.EMERGENCY_ENABLED
    changes = [(e["old"], e["new"]) for e in journal(tmp_path)
               if e["id"] == DID1 and e["stage"] == "address_change"]
    assert changes == [("none", "validated"), ("validated", "provisioned")]
    assert journal(tmp_path)[-2]["record"]["address"]["RD"] == "LAKE"  # the promotion line


async def test_refused_address_change_leaves_the_old_address(tmp_path: Path) -> None:
    service, provider, alerts, _ = make(tmp_path)
    await service.sync_site("chi")
    provider.refuse[DID1] = "address outside the service area"
    service.update([site(MOVED)], {"chi": [DID1, DID2]})
    await service.sync_site("chi")
    did1 = service.registry.record(DID, DID1)
    assert did1 is not None and did1.state is S.EMERGENCY_ENABLED
    assert did1.address_in_force == normalized(MAIN)
    assert did1.change is not None and did1.change.state is S.FAILED
    line = (f"{DID1}: address change failed: address outside the service area; the old"
            " address stays in force")
    assert service.readiness_problems() == [line]
    assert ("address_change_failed", line) in alerts


async def test_change_to_an_invalid_address_keeps_dids_enabled(tmp_path: Path) -> None:
    service, provider, _, _ = make(tmp_path)
    await service.sync_site("chi")
    service.update([site(BAD)], {"chi": [DID1, DID2]})
    assert (await service.sync_site("chi")).state is S.FAILED
    for did in (DID1, DID2):
        record = service.registry.record(DID, did)
        assert record is not None and record.address_in_force == normalized(MAIN)
        assert record.change is not None and record.change.state is S.FAILED
    assert len(provider.provisioned) == 2  # nothing pushed for the invalid address

    service.update([site(MAIN)], {"chi": [DID1, DID2]})  # reverted: the change is dropped
    assert (await service.sync_site("chi")).state is S.EMERGENCY_ENABLED
    assert service.readiness_problems() == []


async def test_provider_errors_become_states_not_crashes(tmp_path: Path) -> None:
    service, provider, alerts, _ = make(tmp_path)
    provider.validate_error = ProviderError("connection refused")
    record = await service.sync_site("chi")
    assert record.state is S.FAILED and record.reason == "provider error: connection refused"
    provider.validate_error = None
    provider.status_error = ProviderError("timeout")
    await service.sync_site("chi")
    assert service.registry.state(DID, DID1) is S.PROVISIONED  # still pending, polled later
    provider.status_error = None
    assert (await service.sync_site("chi")).state is S.EMERGENCY_ENABLED


async def test_restart_resumes_polling_without_pushing_again(tmp_path: Path) -> None:
    service, provider, _, _ = make(tmp_path, poll_attempts=1)
    provider.pending[DID1] = 5
    provider.pending[DID2] = 5
    await service.sync_site("chi")
    assert len(provider.provisioned) == 2
    provider._endpoints = {ref: (did, 0) for ref, (did, _) in provider._endpoints.items()}

    registry = ActivationRegistry(tmp_path / "activation.jsonl")
    assert registry.state(DID, DID1) is S.PROVISIONED
    restarted = ActivationService(registry, provider, [site()], {"chi": [DID1, DID2]},
                                  poll_initial=0.001, poll_max=0.001, poll_attempts=1)
    assert (await restarted.sync_site("chi")).state is S.EMERGENCY_ENABLED
    assert len(provider.provisioned) == 2


async def test_alert_callback_failure_does_not_stop_the_sync(tmp_path: Path) -> None:
    def broken(kind: str, text: str) -> None:
        raise RuntimeError("webhook down")

    registry = ActivationRegistry(None)
    service = ActivationService(registry, FakeProvider(), [site(BAD)], {"chi": [DID1]},
                                broken, poll_initial=0.001, poll_max=0.001)
    assert (await service.sync_site("chi")).state is S.FAILED


async def test_run_syncs_every_interval(tmp_path: Path) -> None:
    service, provider, _, sleeps = make(tmp_path, sites=[site(BAD)])

    async def sleep(delay: float) -> None:
        sleeps.delays.append(delay)
        if sleeps.delays.count(30.0) == 2:
            raise asyncio.CancelledError

    service._sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        await service.run(30.0)
    assert len(provider.validated) == 2  # a failed address is asked again each round
    with pytest.raises(ValueError, match="positive"):
        await service.run(0)


async def test_sync_all_covers_every_site(tmp_path: Path) -> None:
    sites = [site(MAIN, "chi"), site(BAD, "nyc")]
    service, provider, _, _ = make(tmp_path, sites=sites, dids={"chi": [DID1], "nyc": [DID2]})
    await service.sync_all()
    assert service.registry.state(SITE, "chi") is S.EMERGENCY_ENABLED
    assert service.registry.state(SITE, "nyc") is S.FAILED
    assert service.registry.state(DID, DID2) is S.FAILED
    assert service.readiness_problems()[0].startswith("nyc: address failed validation")

"""EM-51 against a mock emergency provider over real HTTP on loopback.

A small asyncio HTTP/1.1 server on 127.0.0.1 (port chosen by the OS) plays the provider's
JSON API of e911.activation (POST /addresses/validate, POST /e911/endpoints, GET
/e911/endpoints/{id}), with a bearer token. It answers "invalid" for a house number outside
the MSAG range, valid (normalized to uppercase street names) otherwise; one DID stays pending
for two status queries before it is enabled, the other is enabled at once. The tests drive
ActivationService with HttpJsonProvider through: invalid address -> failed + alerts; the fix
-> emergency_enabled only once the provider confirms; an address change during which the old
address stays in force until the provider confirms the new one; and the client's errors
(HTTP error status, wrong token, silence, malformed answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from e911.activation import (
    DID,
    SITE,
    ActivationRegistry,
    ActivationService,
    ActivationState,
    HttpJsonProvider,
    ProviderError,
)
from e911.civic import CivicAddress
from e911.locations import Site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

S = ActivationState
TOKEN = "s3cret-token"
DID1 = "+13125550101"
DID2 = "+13125550102"
MAIN = CivicAddress(country="US", subdivision="IL", city="Chicago", road="Main",
                    street_suffix="St", house_number="10", postal_code="60601")
BAD = dataclasses.replace(MAIN, house_number="99999")
MOVED = dataclasses.replace(MAIN, road="Lake", house_number="200")


class MockProvider:
    """The provider's side. ``pending_polls[did]``: status answers "pending" before
    "enabled"; ``on_status(did, endpoint_id)`` is called before each status answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.pending_polls: dict[str, int] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.on_status: Any = None
        self.mode = "normal"  # or "error500", "silent", "garbage", "chunked"
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/v1"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self._exchange(reader, writer)
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        method, target, _ = (await reader.readline()).decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (line := (await reader.readline()).decode().rstrip("\r\n")):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        request = {"method": method, "path": target, "headers": headers,
                   "json": json.loads(body) if body else None}
        self.requests.append(request)
        if self.mode == "silent":
            await asyncio.sleep(10)
            return
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return self._answer(writer, 401, {"reason": "bad token"})
        if self.mode == "error500":
            return self._answer(writer, 500, {"reason": "database maintenance"})
        if self.mode == "garbage":
            return self._answer(writer, 200, {"valid": "maybe"})
        status, answer = await self._route(method, target, request["json"])
        self._answer(writer, status, answer, chunked=self.mode == "chunked")

    async def _route(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/api/v1/addresses/validate":
            if body.get("HNO") == "99999":
                return 200, {"valid": False, "normalized": None,
                             "reason": "house number 99999 is outside the MSAG range"}
            normal = dict(body, RD=body["RD"].upper())
            return 200, {"valid": True, "normalized": normal, "reason": ""}
        if method == "POST" and path == "/api/v1/e911/endpoints":
            endpoint_id = f"ep{len(self.endpoints) + 1}"
            left = self.pending_polls.get(body["did"], 0)
            self.endpoints[endpoint_id] = {"did": body["did"], "address": body["address"],
                                           "left": left}
            return 200, {"id": endpoint_id, "status": "pending", "reason": ""}
        prefix = "/api/v1/e911/endpoints/"
        if method == "GET" and path.startswith(prefix):
            endpoint_id = path[len(prefix):]
            endpoint = self.endpoints.get(endpoint_id)
            if endpoint is None:
                return 404, {"reason": "no such endpoint"}
            if self.on_status is not None:
                self.on_status(endpoint["did"], endpoint_id)
            if endpoint["left"] > 0:
                endpoint["left"] -= 1
                return 200, {"id": endpoint_id, "status": "pending", "reason": ""}
            return 200, {"id": endpoint_id, "status": "enabled", "reason": ""}
        return 404, {"reason": f"no route {method} {path}"}

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: int, answer: dict[str, Any], *,
                chunked: bool = False) -> None:
        data = json.dumps(answer).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nConnection: close\r\n"
        if chunked:
            half = len(data) // 2
            body = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                            for part in (data[:half], data[half:])) + b"0\r\n\r\n"
            writer.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode() + body)
        else:
            writer.write((head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data)


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockProvider, str]]:
    provider = MockProvider()
    url = await provider.start()
    try:
        yield provider, url
    finally:
        await provider.stop()


def site(address: CivicAddress) -> Site:
    return Site(id="chi", country="US", address=address, callback_number=DID2)


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_invalid_then_fixed_then_moved(mock: tuple[MockProvider, str],
                                             tmp_path: Path) -> None:
    server, url = mock
    server.pending_polls[DID1] = 2
    journal_path = tmp_path / "emergency" / "activation.jsonl"
    registry = ActivationRegistry(journal_path)
    alerts: list[tuple[str, str]] = []
    service = ActivationService(
        registry, HttpJsonProvider(url, TOKEN, timeout=5), [site(BAD)], {"chi": [DID1, DID2]},
        lambda kind, text: alerts.append((kind, text)), poll_initial=0.01, poll_max=0.04,
        poll_attempts=5)

    # 1. The provider says invalid: failed, DIDs not enabled, alerts, readiness.
    record = await service.sync_site("chi")
    assert record.state is S.FAILED
    assert record.reason == "house number 99999 is outside the MSAG range"
    assert registry.state(DID, DID1) is S.FAILED and registry.state(DID, DID2) is S.FAILED
    assert [r["path"] for r in server.requests] == ["/api/v1/addresses/validate"]
    sent = server.requests[0]
    assert sent["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert sent["headers"]["content-type"] == "application/json"
    assert sent["json"] == {"country": "US", "A1": "IL", "A3": "Chicago", "RD": "Main",
                            "STS": "St", "HNO": "99999", "PC": "60601"}
    invalid_line = "chi: address failed validation: house number 99999 is outside the MSAG range"
    assert service.readiness_problems()[0] == invalid_line
    assert ("address_invalid", invalid_line) in alerts
    assert service.readiness_problems()[1].startswith(f"{DID1}: emergency service failed: ")

    # 2. After the fix: enabled only once the provider confirms (pending twice for DID1).
    seen_while_pending: list[ActivationState] = []
    server.on_status = lambda did, _id: seen_while_pending.append(registry.state(DID, did))
    service.update([site(MAIN)], {"chi": [DID1, DID2]})
    record = await service.sync_site("chi")
    assert record.state is S.EMERGENCY_ENABLED
    assert set(seen_while_pending) == {S.PROVISIONED}  # never enabled before the provider says
    assert len([r for r in server.requests if r["path"] == "/api/v1/e911/endpoints/ep1"]) == 3
    pushed = [r["json"] for r in server.requests if r["path"] == "/api/v1/e911/endpoints"]
    assert [p["did"] for p in pushed] == [DID1, DID2]
    assert pushed[0]["address"]["RD"] == "MAIN"  # the provider's normalized form is pushed
    did1 = registry.record(DID, DID1)
    assert did1 is not None and did1.reference == "ep1"
    assert did1.address_in_force is not None and did1.address_in_force.road == "MAIN"
    assert service.readiness_problems() == []
    lines = journal(journal_path)
    assert [(e["old"], e["new"]) for e in lines if e["id"] == DID1] == [
        ("draft", "failed"), ("failed", "validated"), ("validated", "provisioned"),
        ("provisioned", "emergency_enabled")]
    assert [(e["old"], e["new"]) for e in lines if e["kind"] == SITE] == [
        ("draft", "validating"), ("validating", "failed"), ("failed", "validating"),
        ("validating", "validated"), ("validated", "provisioned"),
        ("provisioned", "emergency_enabled")]
    assert all(e["time"].endswith("Z") and e["reason"] for e in lines)

    # 3. Address change: the old address stays in force until the provider confirms.
    server.pending_polls[DID1] = 2
    in_force_while_pending: list[tuple[ActivationState, str | None, str | None]] = []

    def watch(did: str, _endpoint: str) -> None:
        if did == DID1:
            record = registry.record(DID, did)
            assert record is not None
            in_force_while_pending.append((
                record.state, record.address_in_force.road if record.address_in_force else None,
                record.change.address.road if record.change else None))

    server.on_status = watch
    service.update([site(MOVED)], {"chi": [DID1, DID2]})
    await service.sync_site("chi")
    assert in_force_while_pending == [(S.EMERGENCY_ENABLED, "MAIN", "LAKE")] * 3
    did1 = registry.record(DID, DID1)
    assert did1 is not None and did1.change is None and did1.reference == "ep3"
    assert did1.address_in_force is not None and did1.address_in_force.road == "LAKE"
    assert registry.state(SITE, "chi") is S.EMERGENCY_ENABLED
    change_lines = [(e["old"], e["new"]) for e in journal(journal_path)
                    if e["id"] == DID1 and e["stage"] == "address_change"]
    assert change_lines == [("none", "validated"), ("validated", "provisioned")]

    # 4. A restart reads the states back from the journal.
    again = ActivationRegistry(journal_path)
    assert [(r.kind, r.id, r.state) for r in again.all()] == [
        (SITE, "chi", S.EMERGENCY_ENABLED), (DID, DID1, S.EMERGENCY_ENABLED),
        (DID, DID2, S.EMERGENCY_ENABLED)]
    assert again.record(DID, DID1) == registry.record(DID, DID1)


async def test_pending_is_reported_and_alerted(mock: tuple[MockProvider, str]) -> None:
    server, url = mock
    server.pending_polls[DID1] = 100
    alerts: list[tuple[str, str]] = []
    service = ActivationService(
        ActivationRegistry(None), HttpJsonProvider(url, TOKEN, timeout=5), [site(MAIN)],
        {"chi": [DID1]}, lambda kind, text: alerts.append((kind, text)),
        poll_initial=0.01, poll_max=0.01, poll_attempts=2)
    assert (await service.sync_site("chi")).state is S.PROVISIONED
    line = f"{DID1}: emergency service pending at the provider"
    assert service.readiness_problems() == [line]
    assert alerts == [("emergency_pending", line)]


async def test_client_reports_provider_errors(mock: tuple[MockProvider, str]) -> None:
    server, url = mock
    provider = HttpJsonProvider(url, TOKEN, timeout=0.5)

    server.mode = "chunked"
    result = await provider.validate(MAIN)
    assert result.valid and result.normalized is not None and result.normalized.road == "MAIN"

    server.mode = "error500"
    with pytest.raises(ProviderError, match="HTTP 500 X: database maintenance"):
        await provider.provision(DID1, MAIN)

    server.mode = "garbage"
    with pytest.raises(ProviderError, match="boolean 'valid'"):
        await provider.validate(MAIN)

    server.mode = "normal"
    with pytest.raises(ProviderError, match="HTTP 401 X: bad token"):
        await HttpJsonProvider(url, "wrong", timeout=0.5).validate(MAIN)
    with pytest.raises(ProviderError, match="HTTP 404 X: no such endpoint"):
        await provider.status("ep/../nope")
    assert server.requests[-1]["path"] == "/api/v1/e911/endpoints/ep%2F..%2Fnope"

    server.mode = "silent"
    with pytest.raises(ProviderError, match="no answer within 0.5 s"):
        await provider.status("ep1")


async def test_unreachable_provider_fails_validation_with_reason() -> None:
    server = MockProvider()
    url = await server.start()
    await server.stop()  # nothing listens on that port any more
    service = ActivationService(ActivationRegistry(None), HttpJsonProvider(url, TOKEN, 2),
                                [site(MAIN)], {"chi": [DID1]})
    record = await service.sync_site("chi")
    assert record.state is S.FAILED and record.reason.startswith("provider error: ")
    assert service.readiness_problems() == [
        f"chi: address failed validation: {record.reason}",
        f"{DID1}: emergency service failed: site chi address failed validation: "
        + record.reason]


def test_bad_provider_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        HttpJsonProvider("ftp://provider.example", TOKEN)
    with pytest.raises(ValueError, match="one line"):
        HttpJsonProvider("https://provider.example", "a\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="timeout must be positive"):
        HttpJsonProvider("https://provider.example", TOKEN, 0)

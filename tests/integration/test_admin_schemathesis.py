"""The admin API held to its OpenAPI document by schemathesis (property-based).

A switch with its admin listener runs on an event loop in a background thread (the
schemathesis calls are synchronous HTTP requests from the test thread): device 1000 is
registered by a `SipUA` and in a call with 1001, so the list routes return real items.
The document is loaded from the running listener's ``/openapi.json``; for each operation
schemathesis generates requests from the document (at most 20 per operation, derandomized,
no deadline) and checks every response against it: documented status codes, content
types, headers and JSON schemas, no server error, and that the bearer-token security is
not ignored. Reads go with a read token; the writes that are safe to repeat (hang up an
unknown call, set a location, set and clear blacklist exceptions) with a write token.
Path parameters are drawn from the document and, half the time, from the switch's real
devices, account and call, so the 200 answers are checked too.

Left out: ``POST /api/v1/emergency/test-calls`` (each one is a call to the emergency
trunk) and ``POST /api/v1/reload``; test_admin_api.py covers both.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_admin_api import (
    ACCOUNT,
    ALICE,
    BOB,
    READ_TOKEN,
    WRITE_TOKEN,
    admin_settings,
    switch_config,
)

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from etrunk import TRUNK_HOST  # noqa: E402
from sipua import SipUA  # noqa: E402
from switch_process import free_port  # noqa: E402

from switch.admin import AdminServer  # noqa: E402
from switch.app import Softswitch  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

T = TypeVar("T")
MAX_EXAMPLES = 20
LOOP_TIMEOUT_S = 20.0
# operations not run here (see the module docstring)
LOCATION = "/api/v1/devices/{username}/location"
LEFT_OUT = {"POST /api/v1/emergency/test-calls", "POST /api/v1/reload"}


@dataclass
class LiveApi:
    base: str
    call_id: str  # a call in progress (1000 -> 1001)


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = LOOP_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    workdir = tmp_path_factory.mktemp("admin_schemathesis")
    runner = LoopThread()
    stack = contextlib.AsyncExitStack()

    async def start() -> LiveApi:
        text = switch_config(workdir, free_port("udp", TRUNK_HOST))
        switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")))
        await switch.start()
        stack.push_async_callback(switch.stop)
        admin = AdminServer(switch, admin_settings())
        await admin.start()
        stack.push_async_callback(admin.stop)
        _, host, port = switch.listening[0]
        phones = []
        for device in (ALICE, BOB):
            ua = await stack.enter_async_context(SipUA(device.extension, device.password,
                                                       (host, port)))
            response = await ua.register(expires=300)
            assert response is not None and response.status == 200, response
            phones.append(ua)
        call = await phones[0].invite(BOB.extension, timeout=5)
        assert call.answered, call
        assert admin.address is not None
        return LiveApi(f"http://{admin.address[0]}:{admin.address[1]}", call.call_id)

    try:
        yield runner.run(start())
    finally:
        with contextlib.suppress(Exception):
            runner.run(stack.aclose())
        runner.close()


def _real_path_parameters(path: str, api: LiveApi) -> dict[str, str]:
    values = {"username": ALICE.extension, "account_id": ACCOUNT, "call_id": api.call_id}
    return {name: value for name, value in values.items() if "{" + name + "}" in path}


def _property_test(strategy: st.SearchStrategy[Any], headers: dict[str, str],
                   excluded_checks: list[Any]) -> Callable[[], None]:
    """A Hypothesis test: each generated case sent and its response validated."""

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def exercise(case: Any) -> None:
        case.call_and_validate(headers=headers, excluded_checks=excluded_checks)

    return exercise


def test_every_operation_conforms_to_the_openapi_document(live_api: LiveApi) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    keys = {f"{op.method.upper()} {op.path}" for op in operations}
    documented = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items()
                  for method in item}
    # schemathesis leaves out the route its document came from
    assert keys == documented - {"GET /openapi.json"} and len(keys) >= 20, keys ^ documented
    failures: dict[str, str] = {}
    ran = []
    for operation in operations:
        key = f"{operation.method.upper()} {operation.path}"
        if key in LEFT_OUT:
            continue
        token = READ_TOKEN if operation.method.lower() == "get" else WRITE_TOKEN
        strategies = [operation.as_strategy(generation_mode=mode)
                      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        real = _real_path_parameters(operation.path, live_api)
        if real and operation.method.lower() != "delete":  # never hang up the real call
            strategies.append(operation.as_strategy(path_parameters=real))
        excluded = []
        if key == f"PUT {LOCATION}":
            # the document cannot know the configured sites: a generated site is unknown
            # (400); a real one must be accepted and answered as documented
            excluded.append(schemathesis.checks.positive_data_acceptance)
            strategies.append(operation.as_strategy(
                path_parameters=real, body={"site": "hq", "location": "f2"}))
        if key == "GET /api/v1/emergency/audit":
            # a negative case here combines a missing Authorization (replaced by this
            # test's token) with an extra query parameter without a value (dropped by
            # the HTTP client): the request on the wire is valid, and the switch rejects
            # unknown parameters it does receive (tests/integration/test_admin_api.py)
            excluded.append(schemathesis.checks.negative_data_rejection)
        exercise = _property_test(st.one_of(strategies),
                                  {"Authorization": f"Bearer {token}"}, excluded)
        try:
            exercise()
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported below
            failures[key] = f"{type(exc).__name__}: {exc}"[:3000]
        ran.append(key)
    assert not failures, "\n\n".join(f"{key}\n{text}" for key, text in failures.items())
    assert len(ran) == len(operations) - len(LEFT_OUT), ran

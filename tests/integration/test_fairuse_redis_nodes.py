"""Two switch nodes (two OS processes) share concurrency leases through one redis-server.

Each node process runs ``RedisFairUseStore`` against the same Redis and key prefix, takes
leases for the same account at the same moment, then refreshes the ones it holds every
``ttl / 3`` as a node does while its calls live. Across both, exactly the account's limit
is granted. When one node is killed with SIGKILL (no release, no more refreshes), its
slots come free within the lease expiry, while the survivor's leases stay held, and a
node that stops cleanly releases everything it held.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fairuse.store import RedisFairUseStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]

REPO = Path(__file__).resolve().parents[2]
LIMIT = 5
ATTEMPTS_PER_NODE = 3  # 6 asked for 5 slots: each node holds at least 2
TTL_S = 2.0
LAPSE_MARGIN_S = 1.0
START_TIMEOUT_S = 10.0

# One node: connect, wait for "go" on stdin, acquire ATTEMPTS leases at once, report, then
# refresh the granted ones every ttl/3 until stdin closes; then release them and report.
NODE_SCRIPT = r"""
import asyncio, json, sys, time
from fairuse.store import RedisFairUseStore

async def main():
    url, prefix, node, account = sys.argv[1:5]
    limit, attempts, ttl = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    store = RedisFairUseStore(url, prefix, node)
    await store.ping()
    print(json.dumps({"ready": node}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    now = time.time()
    results = await asyncio.gather(*(
        store.acquire(f"{node}-call-{i}", [("account", account, limit)], ttl, now)
        for i in range(attempts)
    ))
    held = [f"{node}-call-{i}" for i, r in enumerate(results) if r.granted]
    refused = [r.refused_scope for r in results if not r.granted]
    print(json.dumps({"granted": len(held), "refused": refused}), flush=True)
    stdin_closed = loop.run_in_executor(None, sys.stdin.readline)
    while not stdin_closed.done():
        for call_id in held:
            await store.refresh(call_id, ttl, time.time())
        await asyncio.wait([stdin_closed], timeout=ttl / 3)
    released = [await store.release(call_id) for call_id in held]
    print(json.dumps({"released": sum(released)}), flush=True)
    await store.close()

asyncio.run(main())
"""


class Node:
    """One node process and its line-oriented JSON reports."""

    def __init__(self, name: str, redis_url: str, prefix: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.name = name
        self.process = subprocess.Popen(
            [
                sys.executable, "-c", NODE_SCRIPT, redis_url, prefix, name, "acme",
                str(LIMIT), str(ATTEMPTS_PER_NODE), str(TTL_S),
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=REPO, env=env, text=True,
        )  # fmt: skip

    def report(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"node {self.name} exited: {stderr[-2000:]}")
        return json.loads(line)

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=5.0)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def nodes(redis_server: str) -> Iterator[tuple[Node, Node, str]]:
    prefix = f"fu-nodes-{uuid.uuid4().hex[:8]}:"
    first, second = Node("node-a", redis_server, prefix), Node("node-b", redis_server, prefix)
    try:
        yield first, second, prefix
    finally:
        first.stop()
        second.stop()


async def test_two_nodes_share_the_limit_and_a_killed_nodes_leases_lapse(
    redis_server: str, nodes: tuple[Node, Node, str]
) -> None:
    first, second, prefix = nodes
    assert first.report() == {"ready": "node-a"}
    assert second.report() == {"ready": "node-b"}
    first.send("go\n")
    second.send("go\n")
    reports = {"node-a": first.report(), "node-b": second.report()}
    granted = {name: int(report["granted"]) for name, report in reports.items()}
    assert sum(granted.values()) == LIMIT
    assert min(granted.values()) >= 2
    refusals = [scope for report in reports.values() for scope in report["refused"]]
    assert refusals == ["account"] * (2 * ATTEMPTS_PER_NODE - LIMIT)

    observer = RedisFairUseStore(redis_server, prefix, "observer")
    try:
        assert await observer.active("account", "acme", time.time()) == LIMIT
        extra = await observer.acquire("observer-call", [("account", "acme", LIMIT)], TTL_S,
                                       time.time())  # fmt: skip
        assert (extra.granted, extra.refused_scope) == (False, "account")

        victim, survivor = first, second
        kept = granted[survivor.name]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=5.0)
        killed_at = time.monotonic()
        freed_after = None
        while time.monotonic() - killed_at < TTL_S + LAPSE_MARGIN_S + 1.0:
            if await observer.active("account", "acme", time.time()) == kept:
                freed_after = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        assert freed_after is not None, "the killed node's leases did not lapse"
        assert freed_after <= TTL_S + LAPSE_MARGIN_S

        # the survivor refreshes: its leases outlive a whole ttl after the lapse
        await asyncio.sleep(TTL_S)
        assert await observer.active("account", "acme", time.time()) == kept
        freed = await observer.acquire("observer-call", [("account", "acme", LIMIT)], TTL_S,
                                       time.time())  # fmt: skip
        assert freed.granted and freed.counts == {"account:acme": kept + 1}
        assert await observer.release("observer-call") is True

        assert survivor.process.stdin is not None
        survivor.process.stdin.close()  # a clean stop releases every lease it holds
        assert survivor.report() == {"released": kept}
        assert survivor.process.wait(timeout=5.0) == 0
        assert await observer.active("account", "acme", time.time()) == 0
    finally:
        await observer.close()

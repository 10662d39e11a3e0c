"""Shared test fixtures: a real redis-server on loopback, and free loopback ports.

``free_port`` is a plain helper; import it with ``from conftest import free_port``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 5.0
REDIS_START_ATTEMPTS = 3


def free_port(kind: str = "udp", host: str = LOOPBACK) -> int:
    """A port the OS just reported free on ``host`` for ``kind`` ("udp" or "tcp")."""
    if kind not in ("udp", "tcp"):
        raise ValueError(f"kind must be 'udp' or 'tcp', not {kind!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(family, sock_type) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=REDIS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=REDIS_STOP_TIMEOUT_S)


def _start_redis(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    failures: list[str] = []
    for attempt in range(REDIS_START_ATTEMPTS):
        port = free_port("tcp")
        log_path = workdir / f"redis-{attempt}.log"
        command = [
            binary,
            "--port", str(port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(workdir),
            "--logfile", str(log_path),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir
        )
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _redis_answers_ping(port):
                return process, port
            time.sleep(0.05)
        _stop(process)
        log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        stderr = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
        failures.append(f"port {port}: exit={process.returncode} {stderr} {log}".strip())
    raise RuntimeError("redis-server did not answer PING:\n" + "\n".join(failures))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port; yields ``redis://127.0.0.1:PORT/0``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (not found on PATH): run `make test`, "
            "which installs it before running the suite"
        )
    with tempfile.TemporaryDirectory(prefix="softswitch-redis-") as tmp:
        try:
            process, port = _start_redis(binary, Path(tmp))
        except RuntimeError as exc:
            pytest.fail(str(exc))
        try:
            yield f"redis://{LOOPBACK}:{port}/0"
        finally:
            _stop(process)
            if process.stderr:
                process.stderr.close()

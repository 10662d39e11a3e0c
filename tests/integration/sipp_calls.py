"""SIPp helpers shared by the call tests that need more than test_calls_sipp's launcher:
another loopback address (``-i 127.0.0.2`` for a trunk's side), several calls per process
(``-m``/``-r``), keys, and reading what a SIPp peer received from its message trace.

The :class:`Sipp` process wrapper and :func:`sipp_group` come from test_calls_sipp.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from switch_process import LOOPBACK_V4, free_port
from test_calls_sipp import SIPP_DIR, SIPP_WALL_S, Sipp, _sipp, sipp_group

__all__ = [
    "SIPP_DIR",
    "SIPP_WALL_S",
    "ReceivedMessage",
    "Sipp",
    "auth_injection",
    "launch_sipp",
    "provider_scenario",
    "received_requests",
    "sipp_group",
]


def launch_sipp(
    workdir: Path,
    name: str,
    scenario: Path | str,
    *,
    host: str = LOOPBACK_V4,
    port: int | None = None,
    target: tuple[str, int] | None = None,
    calls: int = 1,
    rate: float | None = None,
    hold_ms: int = 0,
    injection: Path | None = None,
    keys: dict[str, str] | None = None,
    service: str | None = None,
    wall_s: float = SIPP_WALL_S,
    trace: bool = True,
) -> Sipp:
    """Start one SIPp in ``workdir/name`` bound to ``host`` (a loopback address).
    ``scenario`` is a file name under tests/peers/sipp or a path."""
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    path = scenario if isinstance(scenario, Path) else SIPP_DIR / scenario
    port = port or free_port("udp", host)
    command = [
        _sipp(), "-sf", str(path), "-i", host, "-p", str(port),
        "-mp", str(free_port("udp", host)), "-cp", str(free_port("udp", host)),
        "-m", str(calls), "-nostdin", "-buff_size", "4194304",
        "-timeout", f"{max(1.0, wall_s - 3):.0f}s", "-timeout_error", "-max_retrans", "4",
        "-trace_err",
    ]  # fmt: skip
    if trace:
        command.append("-trace_msg")
    if rate is not None:
        command += ["-r", f"{rate:g}", "-rp", "1000"]
    if hold_ms:
        command += ["-d", str(hold_ms)]
    if injection is not None:
        command += ["-inf", str(injection)]
    if service is not None:
        command += ["-s", service]
    for key, value in (keys or {}).items():
        command += ["-key", key, value]
    if target is not None:
        command.insert(1, f"{target[0]}:{target[1]}")
    process = subprocess.Popen(
        command, cwd=directory, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return Sipp(name, directory, port, process)


def auth_injection(
    path: Path,
    *,
    auth_user: str,
    password: str,
    callee: str,
    from_user: str | None = None,
    domain: str = LOOPBACK_V4,
) -> Path:
    """An injection file for the authenticating UAC scenarios
    (``from_user;password;domain;[authentication ...];callee``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "SEQUENTIAL\n"
        f"{from_user or auth_user};{password};{domain};"
        f"[authentication username={auth_user} password={password}];{callee}\n"
    )
    return path


def provider_scenario(directory: Path, *, username: str, password: str) -> Path:
    """uas_provider_auth.xml with the credentials its verifyauth checks filled in."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (SIPP_DIR / "uas_provider_auth.xml").read_text(encoding="iso-8859-1")
    text = text.replace("{USERNAME}", username).replace("{PASSWORD}", password)
    path = directory / "uas_provider_auth.xml"
    path.write_text(text, encoding="iso-8859-1")
    return path


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One SIP message a SIPp process received, as its trace logged it."""

    start_line: str
    headers: list[tuple[str, str]]
    text: str

    @property
    def method(self) -> str:
        return self.start_line.split(" ", 1)[0]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        compact = {"f": "from", "t": "to", "i": "call-id", "v": "via", "m": "contact"}
        wanted = name.lower()
        return [v for n, v in self.headers if compact.get(n.lower(), n.lower()) == wanted]


_TRACE_ENTRY = re.compile(r"^-{5,} .*$", re.MULTILINE)


def _received(sipp: Sipp) -> Iterable[ReceivedMessage]:
    for path in sorted(sipp.workdir.glob("*_messages.log")):
        trace = path.read_text(errors="replace")
        for entry in _TRACE_ENTRY.split(trace):
            head, _, message = entry.strip().partition("\n")
            if "message received" not in head:
                continue
            lines = message.strip("\r\n").replace("\r\n", "\n").split("\n")
            start, headers = lines[0].strip(), []
            for line in lines[1:]:
                if not line.strip():
                    break
                if line[:1] in (" ", "\t") and headers:
                    name, value = headers[-1]
                    headers[-1] = (name, f"{value} {line.strip()}")
                elif ":" in line:
                    name, value = line.split(":", 1)
                    headers.append((name.strip(), value.strip()))
            yield ReceivedMessage(start, headers, message)


def received_requests(sipp: Sipp, method: str) -> list[ReceivedMessage]:
    """The ``method`` requests a SIPp process received (retransmissions included), in
    order, from its ``-trace_msg`` log."""
    return [m for m in _received(sipp) if m.method == method and "SIP/2.0" in m.start_line]

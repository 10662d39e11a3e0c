"""Run the real switch as a subprocess for integration tests, and talk SIP to it.

`running_switch(workdir, ...)` writes a YAML configuration with free loopback ports,
starts ``python -m switch run --config FILE``, waits (bounded) for the
``switch.ready`` log line and yields a :class:`SwitchProcess`; on exit it stops the
process by its PID (SIGTERM, then SIGKILL after 5 s).

`SipUdpClient` is a small blocking SIP-over-UDP client (one socket, loopback only)
with a digest MD5 helper, enough to query and change registrations from a test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = REPO_ROOT / "tests" / "peers"
LOOPBACK_V4 = "127.0.0.1"
LOOPBACK_V6 = "::1"
READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
PORT_ATTEMPTS = 50


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------


def free_port(kind: str = "udp", host: str = LOOPBACK_V4) -> int:
    """A port the OS just reported free on ``host`` for ``kind`` ("udp" or "tcp")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(family, sock_type) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int, kind: str, host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    with socket.socket(family, sock_type) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_sip_port(
    hosts: Iterable[str] = (LOOPBACK_V4,), kinds: Iterable[str] = ("udp", "tcp")
) -> int:
    """A port free for every transport kind on every host (SIP uses one port number for
    UDP and TCP)."""
    hosts, kinds = list(hosts), list(kinds)
    for _ in range(PORT_ATTEMPTS):
        port = free_port(kinds[0], hosts[0])
        if all(_port_is_free(port, k, h) for h in hosts for k in kinds):
            return port
    raise RuntimeError(f"no port free for {kinds} on {hosts} after {PORT_ATTEMPTS} attempts")


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class SipDevice:
    extension: str
    password: str
    # more device settings (did, site, location, mobility, do_not_disturb...), as YAML keys
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def numbered(cls, first: int, last: int) -> list[SipDevice]:
        """Devices ``first``..``last`` (inclusive) with password ``pw<extension>``, the
        convention of the SIPp injection files."""
        return [cls(str(n), f"pw{n}") for n in range(first, last + 1)]


@dataclass(slots=True)
class Listener:
    transport: str
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


def make_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 / ::1 / localhost, made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _yaml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid, always-quoted YAML scalar


def build_config(
    listeners: list[Listener],
    devices: list[SipDevice],
    *,
    domains: Iterable[str] = (LOOPBACK_V4,),
    registrar: dict[str, int] | None = None,
    ban: dict[str, int] | None = None,
    algorithms: Iterable[str] = ("MD5", "SHA-256"),
    tls_files: tuple[Path, Path] | None = None,
    log_level: str = "info",
    sections: dict[str, dict[str, Any]] | None = None,
    account: dict[str, Any] | None = None,
) -> str:
    """The YAML text of a switch configuration for a test. ``sections`` adds top-level
    sections as they are (e.g. ``{"media": {"port_min": 42000}, "calls": {...}}``);
    ``account`` adds keys to the test account (``main_number``, ``suspended``)."""
    registrar_values = {
        "min_expires": 2,
        "max_expires": 7200,
        "default_expires": 3600,
        "keepalive_interval": 0,
        **(registrar or {}),
    }
    ban_values = {
        "max_failures_per_source": 1000,
        "max_failures_per_user": 1000,
        "window": 60,
        "ban_time": 600,
        **(ban or {}),
    }
    lines = [
        "switch:",
        "  node_id: itest",
        f"  domains: [{', '.join(_yaml_string(d) for d in domains)}]",
        "listen:",
    ]
    for entry in listeners:
        lines.append(
            f"  - {{transport: {entry.transport}, host: {_yaml_string(entry.host)},"
            f" port: {entry.port}}}"
        )
    if tls_files is not None:
        lines += [
            "tls:",
            f"  certificate: {_yaml_string(str(tls_files[0]))}",
            f"  private_key: {_yaml_string(str(tls_files[1]))}",
        ]
    lines.append("registrar:")
    lines += [f"  {key}: {value}" for key, value in registrar_values.items()]
    lines += [
        "auth:",
        f"  algorithms: [{', '.join(algorithms)}]",
        "  ban:",
    ]
    lines += [f"    {key}: {value}" for key, value in ban_values.items()]
    lines += [
        "store:",
        "  backend: memory",
        "logging:",
        f"  level: {log_level}",
        "  format: json",
        "accounts:",
        "  - id: itest",
    ]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in (account or {}).items()]
    lines.append("    devices:")
    for device in devices:
        extra = "".join(f", {key}: {json.dumps(value)}"
                        for key, value in device.settings.items())
        lines.append(
            f"      - {{extension: {_yaml_string(device.extension)},"
            f" password: {_yaml_string(device.password)}{extra}}}"
        )
    if not devices:
        lines[-1] = "    devices: []"
    for name, values in (sections or {}).items():
        lines.append(f"{name}: {json.dumps(values)}")  # JSON is YAML flow style
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------


class SwitchStartError(RuntimeError):
    """The switch exited or stayed silent before logging ``switch.ready``."""


@dataclass
class SwitchProcess:
    """A running switch: its listeners and the JSON log lines it wrote so far."""

    config_path: Path
    listeners: list[Listener]
    process: subprocess.Popen[bytes] | None = None
    log_lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    # -- addresses ------------------------------------------------------------------
    def listener(self, transport: str = "udp", host: str = LOOPBACK_V4) -> Listener:
        for entry in self.listeners:
            if entry.transport == transport and entry.host == host:
                return entry
        raise KeyError(f"no {transport} listener on {host}")

    def address(self, transport: str = "udp", host: str = LOOPBACK_V4) -> tuple[str, int]:
        return self.listener(transport, host).address

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    # -- logs -------------------------------------------------------------------------
    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The parsed JSON log events so far (only ``name`` when given)."""
        with self._lock:
            lines = list(self.log_lines)
        found = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def log_text(self) -> str:
        with self._lock:
            return "\n".join(self.log_lines)

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        return self.events(name)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        command = [sys.executable, "-m", "switch", "run", "--config", str(self.config_path)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            exited = self.process.poll()
            self.stop()
            state = f"exited with status {exited}" if exited is not None else "still silent"
            raise SwitchStartError(
                f"switch {state} without switch.ready within {timeout:.0f} s; log:\n"
                + self.log_text()[-4000:]
            )

    def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                self.log_lines.append(line)
            if '"switch.ready"' in line:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which then sees poll() != None

    def stop(self) -> int | None:
        """SIGTERM by PID (a second one after 0.5 s cuts the graceful drain of calls
        still up short), SIGKILL after 5 s; returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_GRACE_S)
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        if process.stderr is not None:
            process.stderr.close()
        return process.returncode


def prepare_switch(
    workdir: Path,
    devices: Iterable[SipDevice] = (),
    *,
    udp: bool = True,
    tcp: bool = True,
    ipv6: bool = False,
    tls: bool = False,
    registrar: dict[str, int] | None = None,
    ban: dict[str, int] | None = None,
    algorithms: Iterable[str] = ("MD5", "SHA-256"),
    log_level: str = "info",
    domains: Iterable[str] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    account: dict[str, Any] | None = None,
) -> SwitchProcess:
    """Writes the configuration (free ports, optional ::1 and TLS) into ``workdir`` and
    returns the not yet started process object."""
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = [k for k, wanted in (("udp", udp), ("tcp", tcp)) if wanted]
    listeners: list[Listener] = []
    hosts = [LOOPBACK_V4, LOOPBACK_V6] if ipv6 else [LOOPBACK_V4]
    if kinds:
        port = free_sip_port(hosts, kinds)
        listeners += [Listener(kind, host, port) for host in hosts for kind in kinds]
    tls_files = None
    if tls:
        tls_files = make_self_signed_certificate(workdir)
        tls_port = free_sip_port(hosts, ["tcp"])
        listeners += [Listener("tls", host, tls_port) for host in hosts]
    if domains is None:
        domains = [LOOPBACK_V4, LOOPBACK_V6] if ipv6 else [LOOPBACK_V4]
    config_path = workdir / "switch.yaml"
    config_path.write_text(
        build_config(
            listeners,
            list(devices),
            domains=domains,
            registrar=registrar,
            ban=ban,
            algorithms=algorithms,
            tls_files=tls_files,
            log_level=log_level,
            sections=sections,
            account=account,
        ),
        encoding="utf-8",
    )
    return SwitchProcess(config_path=config_path, listeners=listeners)


@contextlib.contextmanager
def running_switch(
    workdir: Path, devices: Iterable[SipDevice] = (), **options: Any
) -> Iterator[SwitchProcess]:
    """Starts the switch (see :func:`prepare_switch` for the options), yields it once it
    logged ``switch.ready``, and stops it by PID afterwards."""
    switch = prepare_switch(workdir, devices, **options)
    switch.start()
    try:
        yield switch
    finally:
        switch.stop()


# --------------------------------------------------------------------------------------
# A tiny SIP client over UDP
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class SipReply:
    """A SIP response as received: raw bytes plus what the tests look at."""

    raw: bytes
    status: int
    reason: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        wanted = name.lower()
        aliases = {"v": "via", "m": "contact", "i": "call-id", "f": "from", "t": "to"}
        return [v for n, v in self.headers if aliases.get(n.lower(), n.lower()) == wanted]

    @classmethod
    def parse(cls, data: bytes) -> SipReply:
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", errors="replace")
        lines = head.split("\r\n")
        match = re.match(r"SIP/2\.0 (\d{3}) ?(.*)$", lines[0])
        if match is None:
            raise ValueError(f"not a SIP response: {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and headers:
                name, value = headers[-1]
                headers[-1] = (name, value + " " + line.strip())
            elif ":" in line:
                name, value = line.split(":", 1)
                headers.append((name.strip(), value.strip()))
        return cls(data, int(match.group(1)), match.group(2), headers)


def parse_challenge(value: str) -> dict[str, str]:
    """The parameters of a ``Digest ...`` WWW-Authenticate value."""
    scheme, _, rest = value.partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a digest challenge: {value!r}")
    params = {}
    for match in re.finditer(r'([A-Za-z0-9_-]+)\s*=\s*("([^"\\]|\\.)*"|[^,\s]+)', rest):
        raw = match.group(2)
        params[match.group(1).lower()] = raw[1:-1] if raw.startswith('"') else raw
    return params


def digest_md5_authorization(
    challenge: dict[str, str],
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
) -> str:
    """An ``Authorization`` value answering an MD5 challenge (RFC 2617 / 7616, qop=auth
    when offered)."""

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    realm, nonce = challenge["realm"], challenge["nonce"]
    ha1 = md5(f"{username}:{realm}:{password}")
    ha2 = md5(f"{method}:{uri}")
    parts = [
        f'username="{username}"',
        f'realm="{realm}"',
        f'nonce="{nonce}"',
        f'uri="{uri}"',
        "algorithm=MD5",
    ]
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    if "auth" in qops:
        cnonce = secrets.token_hex(8)
        nc_text = f"{nc:08x}"
        response = md5(f"{ha1}:{nonce}:{nc_text}:{cnonce}:auth:{ha2}")
        parts += ["qop=auth", f"nc={nc_text}", f'cnonce="{cnonce}"']
    else:
        response = md5(f"{ha1}:{nonce}:{ha2}")
    parts.append(f'response="{response}"')
    if "opaque" in challenge:
        parts.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(parts)


def md5_challenge(reply: SipReply) -> dict[str, str]:
    for value in reply.all("WWW-Authenticate"):
        params = parse_challenge(value)
        if params.get("algorithm", "MD5").upper() == "MD5":
            return params
    raise AssertionError(f"no MD5 challenge in {reply.raw!r}")


class SipUdpClient:
    """One UDP socket on loopback sending requests and reading the answers."""

    def __init__(self, server: tuple[str, int], *, timeout: float = 3.0) -> None:
        self.server = server
        self.family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.bind((server[0], 0))
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.local = self.sock.getsockname()[:2]
        self.cseq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SipUdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def host_port(self) -> str:
        host, port = self.local
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def server_host_port(self) -> str:
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def receive(self, timeout: float | None = None) -> SipReply | None:
        """The next response (provisional ones included), or None after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                return None
            if data.startswith(b"SIP/2.0 "):
                return SipReply.parse(data)
            # a request from the switch (keepalive OPTIONS): not what the tests wait for

    def final(self, timeout: float | None = None) -> SipReply | None:
        """The next final (non-1xx) response."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self.receive(max(0.0, deadline - time.monotonic()))
            if reply is None or reply.status >= 200:
                return reply

    def request_bytes(
        self,
        method: str,
        request_uri: str,
        *,
        from_uri: str | None = None,
        to_uri: str | None = None,
        call_id: str | None = None,
        cseq: int | None = None,
        branch: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        via_params: str = ";rport",
        from_tag: str | None = None,
        to_tag: str | None = None,
    ) -> bytes:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        from_uri = from_uri or f"sip:tester@{self.server_host_port}"
        to_uri = to_uri or from_uri
        lines = [
            f"{method} {request_uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.host_port}"
            f";branch={branch or 'z9hG4bK' + secrets.token_hex(8)}{via_params}",
            "Max-Forwards: 70",
            f"From: <{from_uri}>;tag={from_tag or secrets.token_hex(4)}",
            f"To: <{to_uri}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {call_id or secrets.token_hex(10)}@itest",
            f"CSeq: {cseq} {method}",
            *(f"{name}: {value}" for name, value in headers),
            f"Content-Length: {len(body)}",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def request(self, method: str, request_uri: str, **kwargs: Any) -> SipReply | None:
        self.send_raw(self.request_bytes(method, request_uri, **kwargs))
        return self.final()

    def register(
        self,
        user: str,
        password: str | None,
        *,
        domain: str | None = None,
        contact: str | None = None,
        expires: int | None = None,
        call_id: str | None = None,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> tuple[SipReply | None, SipReply | None]:
        """REGISTER for ``user@domain`` (the switch's address by default); answers one
        401 with MD5 digest when ``password`` is given. Returns (first, last) final
        responses. ``contact=None`` sends no Contact: a query of the bindings."""
        domain = domain or self.server_host_port
        aor = f"sip:{user}@{domain}"
        call_id = call_id or secrets.token_hex(10)
        headers: list[tuple[str, str]] = list(extra_headers)
        if contact is not None:
            headers.append(("Contact", contact))
        if expires is not None:
            headers.append(("Expires", str(expires)))
        request_uri = f"sip:{domain}"
        first = self.request(
            "REGISTER", request_uri, from_uri=aor, to_uri=aor, call_id=call_id, headers=headers
        )
        if first is None or first.status != 401 or password is None:
            return first, first
        authorization = digest_md5_authorization(
            md5_challenge(first), "REGISTER", request_uri, user, password
        )
        second = self.request(
            "REGISTER",
            request_uri,
            from_uri=aor,
            to_uri=aor,
            call_id=call_id,
            headers=[*headers, ("Authorization", authorization)],
        )
        return first, second

    def bindings(self, user: str, password: str, domain: str | None = None) -> list[str]:
        """The Contact values the switch returns for a REGISTER query of ``user``."""
        _, reply = self.register(user, password, domain=domain)
        if reply is None or reply.status != 200:
            raise AssertionError(f"REGISTER query for {user} failed: {reply and reply.raw!r}")
        contacts: list[str] = []
        for value in reply.all("Contact"):
            contacts += [c.strip() for c in re.split(r",(?=\s*<)", value) if c.strip()]
        return contacts

"""Processes under test: the switch and Kamailio, started and stopped by PID, and what
/proc says about them (CPU seconds, resident memory) and about the machine."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
STOP_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """A benchmark could not be run (a process did not start, a tool is missing)."""


def free_udp_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def options_answered(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when an OPTIONS sent to host:port over UDP gets a final response."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        sock.settimeout(timeout)
        local_port = sock.getsockname()[1]
        tag = os.urandom(6).hex()
        request = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local_port};branch=z9hG4bK{tag};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:bench@{host}>;tag={tag}\r\n"
            f"To: <sip:{host}:{port}>\r\n"
            f"Call-ID: bench-probe-{tag}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        try:
            sock.sendto(request.encode(), (host, port))
            data = sock.recv(65535)
        except OSError:  # timeout or refused: not listening yet
            return False
    return data.startswith(b"SIP/2.0 2")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0.0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # after the command name: state(0) ppid(1) ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of a process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM one process, SIGKILL it if it is still alive after ``timeout``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: poll for existence
            finished = 0 if _alive(pid) else pid
        if finished == pid:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def machine_description() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total = 0
    try:
        with open("/proc/meminfo") as meminfo:
            mem_total = int(meminfo.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    sipp_version = ""
    if shutil.which("sipp"):
        out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10)
        found = re.search(r"SIPp v?([\w.\-]+)", out.stdout + out.stderr)
        sipp_version = found.group(1).rstrip(".") if found else ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": mem_total,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "sipp": sipp_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _python_path() -> str:
    """The repository first, so the switch under test is this checkout's code."""
    existing = os.environ.get("PYTHONPATH", "")
    return f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)


# --------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------


@dataclass
class SwitchProcess:
    """``python -m switch run --config FILE`` in its own session, stderr to a file, run
    from the configuration's folder so relative state (the CDR ledger) stays there."""

    config_path: Path
    log_path: Path
    sip_port: int
    heap_probe: bool = False
    pid: int = 0
    load_seconds: float = 0.0
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, ready_timeout: float = 120.0) -> None:
        """Start the switch and wait until it answers OPTIONS on its UDP port (the
        ``switch.ready`` line is an info event, hidden at the benchmark's warning level)."""
        started = time.monotonic()
        launcher = (
            [str(Path(__file__).with_name("heap_probe.py"))] if self.heap_probe
            else ["-m", "switch"]
        )
        if self.heap_probe:
            command = [sys.executable, *launcher, "--config", str(self.config_path)]
        else:
            command = [sys.executable, *launcher, "run", "--config", str(self.config_path)]
        env = dict(os.environ, PYTHONPATH=_python_path())
        env["BENCH_HEAP_REPORT"] = str(self.heap_report_path)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.config_path.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._process.pid
        deadline = started + ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(
                    f"switch exited with {self._process.returncode}: {self.log_tail()}"
                )
            if options_answered(self.sip_port):
                self.load_seconds = time.monotonic() - started
                return
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"switch not ready after {ready_timeout:.0f} s: {self.log_tail()}")

    @property
    def heap_report_path(self) -> Path:
        return self.log_path.with_suffix(".heap.json")

    def start_heap_trace(self) -> None:
        """Heap probe only: trace every allocation from now on."""
        os.kill(self.pid, signal.SIGUSR1)

    def heap_report(self, timeout: float = 120.0) -> dict:
        """Heap probe only: what is still allocated since start_heap_trace()."""
        import json

        self.heap_report_path.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.heap_report_path.exists():
                return json.loads(self.heap_report_path.read_text())
            time.sleep(0.2)
        raise BenchError("the heap probe wrote no report")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=STOP_TIMEOUT_S)


# --------------------------------------------------------------------------------------
# Kamailio, through the shared peer scripts
# --------------------------------------------------------------------------------------


def peers_dir() -> Path | None:
    """Folder of the shared peer configurations (``$PEERS_DIR``, else ``../shared/peers``
    beside the repository)."""
    candidates = [os.environ.get("PEERS_DIR", ""), str(REPO_ROOT.parent / "shared" / "peers")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "kamailio" / "start_kamailio.sh").is_file():
            return Path(candidate)
    return None


def ensure_kamailio() -> str | None:
    """Path of ``kamailio``, installing the Debian package when it is missing.
    None (with the reason printed) when it cannot be had."""
    found = shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if os.access("/usr/sbin/kamailio", os.X_OK) else None
    )
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("bench: kamailio not found, installing it with apt-get", flush=True)
    for command in (
        [*sudo, "apt-get", "update", "-qq"],
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "kamailio"],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            print(f"bench: {' '.join(command)} failed: {result.stderr[-500:]}", flush=True)
            return None
    return shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if os.access("/usr/sbin/kamailio", os.X_OK) else None
    )


@dataclass
class KamailioProcess:
    """Kamailio with the shared benchmark cfg (UDP 127.0.0.1:5080), run folder of ours.
    ``defines`` are the cfg's ``-A`` options, e.g. ``WITH_INVITE_AUTH`` (407 on INVITE) or
    ``STATIC_DST="sip:127.0.0.1:PORT"`` (where INVITEs to unregistered users go)."""

    peers: Path
    run_dir: Path
    children: int = 4
    defines: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    main_pid: int = 0

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, KAM_RUN_DIR=str(self.run_dir))
        sbin = "/usr/sbin:/sbin"
        env["PATH"] = f"{env.get('PATH', '')}:{sbin}"
        return env

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        script = self.peers / "kamailio" / "start_kamailio.sh"
        result = subprocess.run(
            ["bash", str(script), "-A", f"CHILDREN={self.children}",
             *(arg for define in self.defines for arg in ("-A", define))],
            env=self._env(), capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise BenchError(f"kamailio did not start: {result.stdout}{result.stderr}")
        self.main_pid = int((self.run_dir / "kamailio.pid").read_text().strip())
        # the workers fork a moment after the main process: wait for them to settle
        time.sleep(1.0)
        self.pids = sorted({self.main_pid, *self._children_of(self.main_pid)})

    @staticmethod
    def _children_of(pid: int) -> list[int]:
        result = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10
        )
        return [int(p) for p in result.stdout.split()]

    def alive(self) -> bool:
        return bool(self.main_pid) and _alive(self.main_pid)

    def stop(self) -> None:
        script = self.peers / "kamailio" / "stop_kamailio.sh"
        if self.main_pid:
            subprocess.run(
                ["bash", str(script)], env=self._env(), capture_output=True, timeout=30
            )
            if _alive(self.main_pid):
                stop_pid(self.main_pid)
        self.main_pid = 0

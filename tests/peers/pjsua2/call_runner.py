#!/usr/bin/env python3
"""Runs the switch and two pjsua2 user agents (call_client.py) that call each other
through it, all inside a private network namespace (start it with `unshare -n`), where
only `lo` exists, so that pjsip writes 127.0.0.1 in its SDP.

    unshare -n PYTHON call_runner.py --config switch.yaml --switch-udp 127.0.0.1:PORT \
        --report report.json --callee 1011:pw1011:DIGITS --caller 1010:pw1010:DIGITS \
        --seconds 2.5

Steps: bring `lo` up; start the switch and wait for `switch.ready`; start the callee
and wait until it registered; start the caller, which calls the callee's extension;
wait (bounded) for both to exit; stop the switch by PID. Everything observed goes to
--report (JSON): each client's events and exit status, the switch log lines. Exit
status 0 when both clients exited 0, 1 when one did not, 3 when the runner failed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "integration"))

from netns_runner import bring_loopback_up  # noqa: E402
from switch_process import SwitchProcess  # noqa: E402

CLIENT = HERE / "call_client.py"
CLIENT_WALL_S = 30.0
REGISTER_WAIT_S = 10.0


class Client:
    """One call_client.py process and the JSON events it printed."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.events: list[dict[str, object]] = []
        self.lines: queue.Queue[dict[str, object] | None] = queue.Queue()
        self.process = subprocess.Popen(
            [sys.executable, str(CLIENT), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "text": line.rstrip("\n")}
            if not isinstance(event, dict):
                event = {"event": "output", "text": line.rstrip("\n")}
            self.events.append(event)
            self.lines.put(event)
        self.lines.put(None)

    def wait_event(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if event is None:
                return False
            if event.get("event") == name:
                return True

    def finish(self, deadline: float) -> int | None:
        try:
            return self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
            return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--switch-udp", required=True, help="host:port of the UDP listener")
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--caller", required=True, help="extension:password:dtmf")
    parser.add_argument("--callee", required=True, help="extension:password:dtmf")
    parser.add_argument("--seconds", type=float, default=2.5)
    args = parser.parse_args()
    host, _, port = args.switch_udp.rpartition(":")
    registrar = f"sip:{host}:{port}"
    caller_ext, caller_pw, caller_dtmf = args.caller.split(":")
    callee_ext, callee_pw, callee_dtmf = args.callee.split(":")

    report: dict[str, object] = {"runner_error": None, "clients": {}}
    status = 3
    bring_loopback_up()
    switch = SwitchProcess(config_path=args.config, listeners=[])
    clients: list[Client] = []
    try:
        switch.start()
        common = ["--registrar", registrar, "--domain", host, "--timeout", "20"]
        callee = Client(
            "callee",
            [*common, "--user", callee_ext, "--password", callee_pw, "--dtmf", callee_dtmf],
        )
        clients.append(callee)
        if not callee.wait_event("registered", REGISTER_WAIT_S):
            raise RuntimeError("the callee did not register")
        caller = Client("caller", [
            *common, "--user", caller_ext, "--password", caller_pw, "--dtmf", caller_dtmf,
            "--call", f"sip:{callee_ext}@{host}:{port}", "--seconds", str(args.seconds),
        ])  # fmt: skip
        clients.append(caller)
        deadline = time.monotonic() + CLIENT_WALL_S
        statuses = [client.finish(deadline) for client in clients]
        status = 0 if statuses == [0, 0] else 1
        assert switch.process is not None
        report["switch_exited_early"] = switch.process.poll()
    except Exception as exc:  # noqa: BLE001 - reported to the test, never swallowed
        report["runner_error"] = repr(exc)
        status = 3
    finally:
        for client in clients:
            if client.process.poll() is None:
                os.kill(client.process.pid, signal.SIGKILL)
                client.process.wait(timeout=5)
            report["clients"][client.name] = {  # type: ignore[index]
                "status": client.process.returncode,
                "events": client.events,
            }
        switch.stop()
        report["switch_log"] = switch.log_lines
        args.report.write_text(json.dumps(report, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs the switch and the pjsua2 registration client together inside a private
network namespace (start it with `unshare -n`), where only `lo` exists, so that
pjsip sees no address but loopback.

    unshare -n PYTHON netns_runner.py --config switch.yaml --switch-udp 127.0.0.1:PORT \
        --user 1000 --password pw1000 --report report.json -- CLIENT ARGS...

Steps: bring `lo` up; start the switch from --config and wait for `switch.ready`;
start the client (register_client.py with CLIENT ARGS); when the client reports it is
registered, query the switch's bindings for --user with a REGISTER of our own
(digest, no Contact); tell the client to unregister; after the client exits, query
again; stop the switch by PID. Everything observed goes to --report (JSON): client
events, both binding queries, switch log lines. Exit status: the client's, or 3 when
the runner itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "integration"))

from switch_process import SipUdpClient, SwitchProcess  # noqa: E402

CLIENT = HERE / "register_client.py"
CLIENT_WALL_S = 40.0


def bring_loopback_up() -> None:
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(p)), None
    )
    if ip is None:
        raise RuntimeError("the `ip` command (iproute2) is missing")
    subprocess.run([ip, "link", "set", "lo", "up"], check=True, timeout=10)


def query(target: tuple[str, int], user: str, password: str) -> list[str] | str:
    try:
        with SipUdpClient(target) as client:
            return client.bindings(user, password)
    except (AssertionError, OSError) as exc:
        return f"query failed: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--switch-udp", required=True, help="host:port of the UDP listener")
    parser.add_argument("--user", required=True, help="whose bindings to query")
    parser.add_argument("--password", required=True)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("client_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    client_args = [a for a in args.client_args if a != "--"]
    host, _, port = args.switch_udp.rpartition(":")
    target = (host.strip("[]"), int(port))

    report: dict[str, object] = {"client_events": [], "queries": {}, "runner_error": None}
    client_status = 3
    bring_loopback_up()
    switch = SwitchProcess(config_path=args.config, listeners=[])
    try:
        switch.start()
        client = subprocess.Popen(
            [sys.executable, str(CLIENT), *client_args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert client.stdout is not None
            for line in client.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + CLIENT_WALL_S
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                report["runner_error"] = f"client still running after {CLIENT_WALL_S} s"
                os.kill(client.pid, signal.SIGKILL)
                break
            if line is None:
                break
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "text": line.rstrip("\n")}
            report["client_events"].append(event)  # type: ignore[union-attr]
            if event.get("event") == "registered":
                report["queries"]["registered"] = query(  # type: ignore[index]
                    target, args.user, args.password
                )
                assert client.stdin is not None
                try:
                    client.stdin.write("unregister\n")
                    client.stdin.flush()
                except OSError:
                    pass
        client_status = client.wait(timeout=10)
        report["queries"]["after"] = query(target, args.user, args.password)  # type: ignore[index]
        assert switch.process is not None
        report["switch_exited_early"] = switch.process.poll()
    except Exception as exc:  # noqa: BLE001 - reported to the test, never swallowed
        report["runner_error"] = repr(exc)
        client_status = 3
    finally:
        switch.stop()
        report["switch_log"] = switch.log_lines
        args.report.write_text(json.dumps(report, indent=1))
    return client_status


if __name__ == "__main__":
    sys.exit(main())

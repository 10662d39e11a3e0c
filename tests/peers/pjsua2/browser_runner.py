#!/usr/bin/env python3
"""Runs a browser softphone (WebRTC over SIP over secure WebSocket, RFC 7118 ``wss``) and
a PJSIP desk phone (SIP over UDP, plain RTP) calling each other through the switch, all
inside a private network namespace (start it with `unshare -n`), where only `lo` exists,
so that pjsip writes 127.0.0.1 in its SDP.

    unshare -n PYTHON browser_runner.py --config switch.yaml --workdir DIR \
        --report report.json --browser 1000:PASSWORD --desk 1001:PASSWORD \
        --browser-tone browser.wav --desk-tone desk.wav

Steps: bring `lo` up; start the switch in this process from --config (a ``udp`` and a
``wss`` listener, the built-in relay with its WebRTC bridge, the admin listener serving
the /phone page); start the PJSIP phone (tone_client.py: registers --desk over UDP,
auto-answers, plays --desk-tone into each call, records each call to a WAV); start
headless Chromium (test_dashboard's launcher) whose fake microphone plays
--browser-tone, open /phone and register --browser over ``wss``; note the switch's
binding of the browser (its transport). Then two calls:

1. ``browser_to_desk``: the page dials the desk phone, which answers by itself; the
   browser's ear (a WebAudio AnalyserNode on the remote track, read over DevTools) is
   read until its loudest frequency is --desk-hz (bounded); the page hangs up.
2. ``desk_to_browser``: the desk phone calls the browser's extension, the page answers
   from its Answer button; the same ear; the desk phone hangs up.

Each call's facts go to --report (JSON): the ear's last reading and whether it heard
the desk tone, the desk phone's recording (a WAV the test analyses), the page's status
history. Also: the phone's events, Chromium's log tail, ``runner_error`` (None unless a
step failed: the steps after it did not run). The PIDs of the processes started here
are written to DIR/pids as they start, so a test that has to kill this runner can stop
them too. Exit status 0 when the runner finished its steps, 3 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
for folder in (HERE, TESTS / "integration", TESTS / "peers", TESTS.parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from netns_runner import bring_loopback_up  # noqa: E402
from test_dashboard import DevTools  # noqa: E402
from test_dashboard import chromium as launch_chromium  # noqa: E402
from test_softphone_page import CHROMIUM_FLAGS, PhoneBench, click, fill  # noqa: E402

from switch.app import Softswitch  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402
from switch.softphone import PAGE_PATH  # noqa: E402

PHONE = HERE / "tone_client.py"
WAIT_S = 10.0  # one signalling or media step
HOLD_S = 1.5  # the call stays up this long after the browser heard the desk tone
RUNNER_WALL_S = 60.0  # the whole scenario, then the runner gives up (cleanly)
BROWSER_FLAGS = [
    *CHROMIUM_FLAGS,
    # the switch's wss listener has the test's self-signed certificate
    "--ignore-certificate-errors",
    # the bridge's ICE candidate is 127.0.0.1: let the browser pair loopback candidates
    "--allow-loopback-in-peer-connection",
    # the ear's AudioContext runs without a user gesture
    "--autoplay-policy=no-user-gesture-required",
]

# The browser's ear: an AnalyserNode on the remote audio track of the JsSIP session's
# RTCPeerConnection. read() gives the loudest bin (skipping DC) and the levels (dBFS) at
# the probe frequencies, in their order.
INSTALL_EAR = """
(async (probes) => {
  const s = window.softphone.session;
  if (!s || !s.connection) throw new Error("no JsSIP session with a peer connection");
  const tracks = s.connection.getReceivers().map((r) => r.track)
                  .filter((t) => t && t.kind === "audio");
  if (tracks.length === 0) throw new Error("no remote audio track");
  if (window.testEar) window.testEar.ctx.close();
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 4096;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(new MediaStream(tracks)).connect(analyser);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const hz = ctx.sampleRate / analyser.fftSize;
  const level = (f) => Math.max(...[-1, 0, 1].map((d) => bins[Math.round(f / hz) + d]));
  window.testEar = { ctx: ctx, read: () => {
    analyser.getFloatFrequencyData(bins);
    let peak = 2;
    for (let i = 3; i < bins.length; i++) if (bins[i] > bins[peak]) peak = i;
    const levels = probes.map(level);
    return { state: ctx.state, track: tracks[0].readyState, peak_hz: peak * hz,
             peak_db: bins[peak], levels: levels };
  } };
  return ctx.state;
})(__PROBES__)
"""


class StepFailed(Exception):
    """A step of the scenario did not happen in time; the message says which."""


# --------------------------------------------------------------------------------------
# The PJSIP desk phone (tone_client.py) as a child process
# --------------------------------------------------------------------------------------


class DeskPhone:
    """tone_client.py: JSON events from its stdout, commands to its stdin."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "output", "text": text[:500]}
            self.events.append(event)
            self._changed.set()
        self.events.append({"event": "eof"})
        self._changed.set()

    async def wait(self, check: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = WAIT_S) -> dict[str, Any]:
        """The first event (seen so far or to come, bounded) that ``check`` accepts."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((e for e in self.events if check(e)), None)
            if found is not None:
                return found
            if self.events and self.events[-1].get("event") == "eof":
                raise StepFailed(f"{what}: the desk phone exited")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepFailed(f"{what}: nothing after {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def command(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((line + "\n").encode())
        await self.process.stdin.drain()

    def last_call(self) -> int:
        numbers = [int(e["call"]) for e in self.events if e.get("event") in
                   ("incoming", "calling")]
        return max(numbers, default=0)

    async def stop(self) -> int | None:
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.command("quit")
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        return self.process.returncode


@contextlib.asynccontextmanager
async def desk_phone(args: argparse.Namespace, registrar: tuple[str, int]
                     ) -> AsyncIterator[DeskPhone]:
    extension, password = args.desk.split(":", 1)
    host, port = registrar
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PHONE), "--registrar", f"sip:{host}:{port}", "--domain", host,
        "--user", extension, "--password", password, "--tone", str(args.desk_tone),
        "--record-dir", str(args.workdir / "desk-recordings"), "--timeout", "70",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    note_pid(args.workdir, "desk-phone", process.pid)
    phone = DeskPhone(process)
    try:
        yield phone
    finally:
        await phone.stop()


def note_pid(workdir: Path, name: str, pid: int) -> None:
    with (workdir / "pids").open("a") as out:
        out.write(f"{name} {pid}\n")


def chromium_pid(profile: Path) -> int | None:
    """The browser's PID, from the profile's SingletonLock link ("HOST-PID")."""
    with contextlib.suppress(OSError, ValueError):
        return int(os.readlink(profile / "SingletonLock").rpartition("-")[2])
    return None


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------


async def page_history(page: DevTools) -> list[Any]:
    with contextlib.suppress(Exception):
        return list(await page.evaluate("window.softphone.events"))
    return []


async def wait_page(page: DevTools, expression: str, check: Callable[[Any], bool],
                    what: str) -> Any:
    try:
        return await page.wait_for(expression, check, what, timeout=WAIT_S)
    except AssertionError as exc:
        raise StepFailed(f"{exc}; the page said: {await page_history(page)};"
                         f" console errors: {page.console_errors}") from None


async def wait_state(page: DevTools, state: str, what: str) -> None:
    await wait_page(page, "window.softphone.state", lambda v: v == state, what)


async def listen(page: DevTools, frequency: float, probes: list[float]) -> dict[str, Any]:
    """Installs the ear on the current call and reads it until its loudest frequency is
    ``frequency`` (bounded); returns the last reading and whether it heard it."""
    state = await page.evaluate(INSTALL_EAR.replace("__PROBES__", json.dumps(probes)))
    reading: Any = None
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        reading = await page.evaluate("window.testEar.read()")
        if isinstance(reading, dict):  # levels by probe, keyed "440", "1000"
            reading["levels"] = {f"{f:g}": v for f, v in zip(probes, reading["levels"],
                                                              strict=True)}
        if (isinstance(reading, dict) and abs(reading["peak_hz"] - frequency) < 25
                and reading["peak_db"] > -60):
            return {"heard": True, "reading": reading, "context": state}
        await asyncio.sleep(0.1)
    return {"heard": False, "reading": reading, "context": state}


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------


async def browser_binding(switch: Softswitch, aor: str) -> list[dict[str, Any]]:
    bindings = await switch.store.lookup(aor, time.time())
    return [{"contact": b.contact, "transport": b.flow.transport,
             "remote": f"{b.flow.remote_host}:{b.flow.remote_port}",
             "user_agent": b.user_agent} for b in bindings]


async def browser_calls_desk(page: DevTools, phone: DeskPhone, desk: str, desk_hz: float,
                             probes: list[float], call: dict[str, Any]) -> None:
    number = phone.last_call() + 1
    await fill(page, "number", desk)
    await click(page, "call")
    call["desk_call"] = number
    await phone.wait(lambda e: e.get("event") == "incoming" and e.get("call") == number,
                     "the browser's INVITE reaching the desk phone")
    await phone.wait(lambda e: e.get("event") == "media_active" and e.get("call") == number,
                     "audio up on the desk phone")
    await wait_state(page, "confirmed", "the call confirmed on the page")
    call["ear"] = await listen(page, desk_hz, probes)
    await asyncio.sleep(HOLD_S)
    await click(page, "hangup")
    recorded = await phone.wait(
        lambda e: e.get("event") == "recorded" and e.get("call") == number,
        "the desk phone's call ending after the page hung up")
    call["recording"] = recorded["path"]
    await wait_state(page, "ended", "the call ending on the page")


async def desk_calls_browser(page: DevTools, phone: DeskPhone, target: str, desk_hz: float,
                             probes: list[float], call: dict[str, Any]) -> None:
    number = phone.last_call() + 1
    call["desk_call"] = number
    await phone.command(f"call {target}")
    await wait_state(page, "ringing", "the desk phone's call ringing on the page")
    await click(page, "answer")
    await phone.wait(lambda e: e.get("event") == "media_active" and e.get("call") == number,
                     "audio up on the desk phone")
    await wait_state(page, "confirmed", "the answered call confirmed on the page")
    call["ear"] = await listen(page, desk_hz, probes)
    await asyncio.sleep(HOLD_S)
    await phone.command("hangup")
    recorded = await phone.wait(
        lambda e: e.get("event") == "recorded" and e.get("call") == number,
        "the desk phone's call ending after it hung up")
    call["recording"] = recorded["path"]
    await wait_state(page, "ended", "the call ending on the page after the desk's BYE")


async def calls_both_ways(page: DevTools, phone: DeskPhone, switch: Softswitch,
                          bench: PhoneBench, args: argparse.Namespace,
                          report: dict[str, Any]) -> None:
    """Registers the page over wss, then the two calls (see the module docstring)."""
    browser_ext, browser_password = args.browser.split(":", 1)
    desk_ext = args.desk.split(":", 1)[0]
    probes = [args.desk_hz, args.browser_hz]
    udp = bench.bound("udp")
    await page.navigate(bench.base + PAGE_PATH)
    report["page_ws_url"] = await page.evaluate("document.getElementById('ws').value")
    if await page.evaluate("typeof JsSIP") != "object":
        raise StepFailed(f"JsSIP did not load: {page.exceptions}")
    await fill(page, "ext", browser_ext)
    await fill(page, "password", browser_password)
    await click(page, "register")
    await wait_page(page, "window.softphone.registered", lambda v: v is True,
                    "the page registering over the secure WebSocket")
    report["browser_bindings"] = await browser_binding(
        switch, f"{browser_ext}@{switch.settings.switch.domains[0]}")

    calls: dict[str, dict[str, Any]] = {"browser_to_desk": {}, "desk_to_browser": {}}
    report["calls"] = calls
    await browser_calls_desk(page, phone, desk_ext, args.desk_hz, probes,
                             calls["browser_to_desk"])
    calls["browser_to_desk"]["page_events"] = await page_history(page)
    await desk_calls_browser(page, phone, f"sip:{browser_ext}@{udp[0]}:{udp[1]}",
                             args.desk_hz, probes, calls["desk_to_browser"])
    calls["desk_to_browser"]["page_events"] = await page_history(page)


async def scenario(args: argparse.Namespace, report: dict[str, Any]) -> None:
    settings = load_settings_text(args.config.read_text(), str(args.config))
    switch = Softswitch(settings)
    await switch.start()
    try:
        assert switch.admin.address is not None, "the admin listener did not start"
        bench = PhoneBench(switch, switch.admin)
        udp = bench.bound("udp")
        async with desk_phone(args, udp) as phone:
            report["desk_events"] = phone.events  # the same list, filled as it goes
            try:
                await phone.wait(lambda e: e.get("event") in ("registered", "not_registered"),
                                 "the desk phone registering over UDP")
                if not any(e.get("event") == "registered" for e in phone.events):
                    raise StepFailed(f"the desk phone did not register: {phone.events}")
                async with launch_chromium(args.workdir, [
                        *BROWSER_FLAGS, f"--use-file-for-fake-audio-capture={args.browser_tone}"
                ]) as page:
                    pid = chromium_pid(args.workdir / "chromium-profile")
                    if pid is not None:
                        note_pid(args.workdir, "chromium", pid)
                    try:
                        await calls_both_ways(page, phone, switch, bench, args, report)
                    finally:  # what the page said, also when a step failed
                        report["page_events"] = await page_history(page)
                        report["page_exceptions"] = page.exceptions
                        report["page_console_errors"] = page.console_errors
            finally:
                report["desk_status"] = await phone.stop()
    finally:
        await switch.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--report", required=True, type=Path)
    parser.add_argument("--browser", required=True, help="extension:password (the page)")
    parser.add_argument("--desk", required=True, help="extension:password (PJSIP, UDP)")
    parser.add_argument("--browser-tone", required=True, type=Path)
    parser.add_argument("--desk-tone", required=True, type=Path)
    parser.add_argument("--browser-hz", type=float, default=1000.0)
    parser.add_argument("--desk-hz", type=float, default=440.0)
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()

    report: dict[str, Any] = {"runner_error": None}
    status = 0
    try:
        bring_loopback_up()
        asyncio.run(asyncio.wait_for(scenario(args, report), RUNNER_WALL_S))
    except BaseException as exc:  # noqa: BLE001 - reported to the test, never swallowed
        report["runner_error"] = f"{type(exc).__name__}: {exc}"
        status = 3
    log = args.workdir / "chromium.log"
    if log.exists():
        report["chromium_log_tail"] = log.read_text(errors="replace")[-3000:]
    args.report.write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())

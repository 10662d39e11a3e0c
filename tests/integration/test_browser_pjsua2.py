"""Audio both ways between a browser softphone on SIP over secure WebSocket and a PJSIP
desk phone on SIP over UDP (the "WebRTC softphones" issue's interoperability test).

The switch listens on UDP and on ``wss`` (RFC 7118, with a self-signed certificate made
here with openssl), anchors media in its built-in relay whose WebRTC bridge speaks ICE and
DTLS-SRTP to the browser and plain RTP to the desk phone, and its admin listener serves the
softphone page (/phone, JsSIP) over plain HTTP on 127.0.0.1 (a secure context for the
microphone). Debian's ``chromium`` (headless, fake media device whose microphone plays a
1 kHz WAV; the certificate accepted with --ignore-certificate-errors) opens the page and
registers as 1000 over ``wss``. The desk phone 1001 is PJSIP (pjsua2, pjsip 2.14,
tests/peers/pjsua2/tone_client.py): registered over UDP, it plays a 440 Hz WAV into each
call and records what it receives to a WAV.

pjsip writes the host's default-route address into its SDP unless only loopback exists,
so the switch, Chromium and the desk phone all run in one private network namespace
(`unshare -n`), driven by tests/peers/pjsua2/browser_runner.py, which writes a JSON report.

- The switch's binding for 1000 is over ``wss``.
- The page dials 1001, which answers by itself; the page hangs up.
- 1001 calls 1000 and the page answers from its Answer button; 1001 hangs up.
- In each call the browser hears 440 Hz (a WebAudio AnalyserNode on the remote track of
  the JsSIP session, read over DevTools: the loudest frequency, far above 1 kHz) and the
  desk phone's recording holds 1 kHz (Goertzel, far above 440 Hz and other probes).

Chromium, pjsua2, unshare or the JsSIP bundle missing is a failure, not a skip:
``make test`` installs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest
from switch_process import (
    LOOPBACK_V4,
    PEERS_DIR,
    Listener,
    SipDevice,
    build_config,
    make_self_signed_certificate,
)
from test_calls_pjsua2 import goertzel_power, read_samples
from test_softphone_page import require_bundle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RUNNER = PEERS_DIR / "pjsua2" / "browser_runner.py"
RUNNER_WALL_S = 75.0  # the runner gives up by itself after 60 s
BROWSER = SipDevice("1000", "pw1000-" + os.urandom(4).hex())  # the softphone page (wss)
DESK = SipDevice("1001", "pw1001-" + os.urandom(4).hex())  # PJSIP (udp)
BROWSER_TONE_HZ = 1000.0  # the browser's fake microphone
DESK_TONE_HZ = 440.0  # the PJSIP desk phone's player
PROBE_HZ = (300.0, DESK_TONE_HZ, 600.0, 800.0, BROWSER_TONE_HZ, 1400.0, 2000.0, 3000.0)
# inside the runner's own network namespace nothing else binds: fixed ports are free.
# Not 5061 for wss: Chromium refuses to connect to the SIP ports 5060/5061
# (ERR_UNSAFE_PORT, its NAT-slipstreaming block list)
UDP_PORT, WSS_PORT, ADMIN_PORT = 5060, 8443, 8088
RELAY_PORTS = (30000, 30099)


def write_tone(path: Path, frequency: float, rate: int, seconds: float = 1.0) -> None:
    """A mono 16-bit WAV of a steady tone, a whole number of periods (it loops cleanly)."""
    samples = (int(16000 * math.sin(2 * math.pi * frequency * n / rate))
               for n in range(int(rate * seconds)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))


def tone_powers(samples: list[int], rate: int) -> tuple[dict[float, float], int]:
    """Mean Goertzel power per probe over the recording's non-silent 50 ms blocks
    (Hann-windowed), and how many blocks that was."""
    block = rate // 20
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / (block - 1)) for n in range(block)]
    totals = dict.fromkeys(PROBE_HZ, 0.0)
    blocks = 0
    for start in range(0, len(samples) - block, block):
        chunk = samples[start:start + block]
        if max(abs(s) for s in chunk) < 1000:  # before the media flowed, or a gap
            continue
        blocks += 1
        windowed = [s * w for s, w in zip(chunk, window, strict=True)]
        for frequency in PROBE_HZ:
            totals[frequency] += goertzel_power(windowed, rate, frequency)
    return {f: total / max(1, blocks) for f, total in totals.items()}, blocks


def switch_config(workdir: Path) -> Path:
    cert, key = make_self_signed_certificate(workdir)
    sections: dict[str, Any] = {
        "media": {"backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORTS[0],
                  "port_max": RELAY_PORTS[1], "media_timeout": 0},
        "cdr": {"directory": str(workdir / "cdr")},
        "admin": {"enabled": True, "listen": {"host": LOOPBACK_V4, "port": ADMIN_PORT}},
    }
    listeners = [Listener("udp", LOOPBACK_V4, UDP_PORT), Listener("wss", LOOPBACK_V4, WSS_PORT)]
    # MD5 first for pjsip; over a WebSocket the switch offers JsSIP the MD5 challenge alone
    text = build_config(listeners, [BROWSER, DESK], sections=sections,
                        algorithms=("MD5", "SHA-256"), tls_files=(cert, key))
    path = workdir / "switch.yaml"
    path.write_text(text)
    return path


def require_tools() -> None:
    require_bundle()
    for tool, package in (("chromium", "chromium"), ("unshare", "util-linux"),
                          ("ip", "iproute2"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` is missing (Debian package {package}): run `make test`")
    try:
        import pjsua2  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"module pjsua2 missing ({exc}): run `make test` (pjsua2-pybind11 wheel)")


def stop_listed(pids_file: Path) -> None:
    """After the runner was killed: the processes it noted (Chromium, the desk phone)."""
    if not pids_file.exists():
        return
    for line in pids_file.read_text().splitlines():
        name, _, pid = line.partition(" ")
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            if name == "chromium":  # its renderers share its process group
                os.killpg(int(pid), signal.SIGKILL)
            else:
                os.kill(int(pid), signal.SIGKILL)


def run_scenario(workdir: Path) -> tuple[dict[str, Any], str]:
    config = switch_config(workdir)
    browser_wav, desk_wav = workdir / "browser-tone.wav", workdir / "desk-tone.wav"
    write_tone(browser_wav, BROWSER_TONE_HZ, 48000)
    write_tone(desk_wav, DESK_TONE_HZ, 8000)
    report_path = workdir / "report.json"
    command = [
        "unshare", "-n", sys.executable, str(RUNNER), "--config", str(config),
        "--workdir", str(workdir), "--report", str(report_path),
        "--browser", f"{BROWSER.extension}:{BROWSER.password}",
        "--desk", f"{DESK.extension}:{DESK.password}",
        "--browser-tone", str(browser_wav), "--desk-tone", str(desk_wav),
        "--browser-hz", str(BROWSER_TONE_HZ), "--desk-hz", str(DESK_TONE_HZ),
    ]  # fmt: skip
    log_path = workdir / "runner.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=RUNNER_WALL_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the runner leads its own session
            process.wait(timeout=5)
            stop_listed(workdir / "pids")
            pytest.fail("the browser/pjsua2 runner hung and was killed:\n"
                        + log_path.read_text(errors="replace")[-3000:])
    output = log_path.read_text(errors="replace")
    if not report_path.exists():
        pytest.fail(f"the runner wrote no report (exit {process.returncode}):\n{output[-3000:]}")
    return json.loads(report_path.read_text()), output


def test_browser_over_wss_and_pjsip_over_udp_hear_each_other(tmp_path: Path) -> None:
    require_tools()
    report, output = run_scenario(tmp_path)
    detail = (f"runner_error={report.get('runner_error')}\n"
              f"page: {report.get('page_events')}\n"
              f"calls: {json.dumps(report.get('calls'))[-3000:]}\n"
              f"desk phone: {json.dumps(report.get('desk_events'))[-2500:]}\n"
              f"chromium: {report.get('chromium_log_tail', '')[-800:]}\n"
              f"runner output:\n{output[-2500:]}")
    assert report["runner_error"] is None, detail

    # the page registered over the secure WebSocket, and the switch bound it there
    assert report["page_ws_url"] == f"wss://{LOOPBACK_V4}:{WSS_PORT}/", report["page_ws_url"]
    transports = [b["transport"] for b in report["browser_bindings"]]
    assert transports == ["wss"], report["browser_bindings"]

    # pjsip wrote only loopback in its SDP (the namespace worked)
    sdp = [e for e in report["desk_events"] if e.get("event") == "sdp"]
    assert sdp and all(e["local_addresses"] == [LOOPBACK_V4] for e in sdp), detail

    for name in ("browser_to_desk", "desk_to_browser"):
        call = report["calls"][name]
        # the browser heard the desk phone's 440 Hz, loudest and well above its own 1 kHz
        ear = call["ear"]
        assert ear["heard"], (name, ear, detail)
        levels = ear["reading"]["levels"]
        assert levels[f"{DESK_TONE_HZ:g}"] > levels[f"{BROWSER_TONE_HZ:g}"] + 20, (name, ear)
        # the desk phone's recording of the call holds the browser's 1 kHz, and not an
        # echo of its own 440 Hz
        samples, rate = read_samples(Path(call["recording"]))
        powers, blocks = tone_powers(samples, rate)
        assert blocks >= 10, (name, f"only {blocks} blocks of audio reached the desk phone",
                              detail)
        strongest_other = max(p for f, p in powers.items() if f != BROWSER_TONE_HZ)
        assert powers[BROWSER_TONE_HZ] > 100 * strongest_other, (name, powers, detail)

    assert report["page_exceptions"] == [], report["page_exceptions"]
    assert report["desk_status"] == 0, detail

"""Calls between real user agents registered to the switch, media through its relay.

1. Two PJSIP user agents (pjsua2, pjsip 2.14) register and call each other. They run
   with the switch inside `unshare -n` (only `lo` exists, so pjsip's SDP says
   127.0.0.1), driven by tests/peers/pjsua2/call_runner.py. The wheel binds no tone
   generator, WAV player, recorder or media port (see PEERS.md), so the tones each UA
   sends are RFC 4733 telephone-events on its RTP stream: each side's digits must be
   detected, in order, by the other side's pjsip, and the CDR must show RTP relayed both
   ways.
2. The audible tone: two baresip 1.0 user agents (baresip plays a WAV file and writes
   what it decodes to a WAV file). The caller plays 1000 Hz, the callee 600 Hz; a
   Goertzel filter over each side's decoded audio finds the other side's tone far above
   the other frequencies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import pytest
from switch_process import (
    LOOPBACK_V4,
    PEERS_DIR,
    SipDevice,
    SipUdpClient,
    free_port,
    free_sip_port,
    prepare_switch,
    running_switch,
)

RUNNER = PEERS_DIR / "pjsua2" / "call_runner.py"
RUNNER_WALL_S = 45.0
DEVICES = SipDevice.numbered(1010, 1013)
CALL_SECONDS = 2.5
CALLER_DIGITS = "1234"
CALLEE_DIGITS = "98#"
MEDIA = {"backend": "relay", "bind_host": LOOPBACK_V4, "media_timeout": 0}

pytestmark = pytest.mark.timeout(90)


def _cdr_records(config_path: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((config_path.parent / "var" / "cdr").glob("cdr-*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


# --------------------------------------------------------------------------------------
# pjsua2 ↔ pjsua2
# --------------------------------------------------------------------------------------


def _require_pjsua2() -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed: run `make test`")
    try:
        import pjsua2  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"module pjsua2 missing ({exc}): run `make test` (pjsua2-pybind11 wheel)")


def _client_events(report: dict[str, Any], client: str, name: str) -> list[dict[str, Any]]:
    return [e for e in report["clients"][client]["events"] if e.get("event") == name]


def test_two_pjsua2_phones_call_each_other_through_the_relay(tmp_path: Path) -> None:
    _require_pjsua2()
    relay_min = 30000  # inside the runner's own network namespace: nothing else there
    switch = prepare_switch(
        tmp_path, DEVICES, tcp=False,
        sections={"media": {**MEDIA, "port_min": relay_min, "port_max": relay_min + 99}},
    )  # fmt: skip
    host, port = switch.address("udp")
    report_path = tmp_path / "report.json"
    caller, callee = DEVICES[0], DEVICES[1]
    command = [
        "unshare", "-n", sys.executable, str(RUNNER),
        "--config", str(switch.config_path), "--switch-udp", f"{host}:{port}",
        "--report", str(report_path), "--seconds", str(CALL_SECONDS),
        "--caller", f"{caller.extension}:{caller.password}:{CALLER_DIGITS}",
        "--callee", f"{callee.extension}:{callee.password}:{CALLEE_DIGITS}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=RUNNER_WALL_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the runner leads its own session
        output, _ = process.communicate(timeout=5)
        pytest.fail(f"pjsua2 call runner hung and was killed:\n{output.decode()[-3000:]}")
    text = output.decode(errors="replace")
    if not report_path.exists():
        pytest.fail(f"runner wrote no report (exit {process.returncode}):\n{text[-3000:]}")
    report = json.loads(report_path.read_text())
    detail = (
        f"exit {process.returncode}, runner_error={report.get('runner_error')}\n"
        f"clients: {json.dumps(report['clients'])[-4000:]}\nswitch log tail:\n"
        + "\n".join(report["switch_log"][-25:])
        + f"\nrunner output:\n{text[-1500:]}"
    )
    assert process.returncode == 0 and report["runner_error"] is None, detail
    assert report["switch_exited_early"] is None, detail

    for side in ("caller", "callee"):
        # pjsip wrote only loopback in its SDP (the namespace worked) and audio went up
        sdp = _client_events(report, side, "sdp")
        assert sdp and all(e["local_addresses"] == [LOOPBACK_V4] for e in sdp), detail
        assert _client_events(report, side, "media_active"), detail
        states = [e["state"] for e in _client_events(report, side, "call_state")]
        assert "CONFIRMED" in states and states[-1] == "DISCONNECTED", detail
    # the telephone-events each side sent crossed the relay and were decoded, in order
    assert _client_events(report, "callee", "result")[0]["digits_received"] == CALLER_DIGITS, detail
    assert _client_events(report, "caller", "result")[0]["digits_received"] == CALLEE_DIGITS, detail

    records = _cdr_records(switch.config_path)
    assert len(records) == 1, records
    record = records[0]
    assert (record["device"], record["callee_dialled"]) == (caller.extension, callee.extension)
    assert record["end_cause"] == "normal" and record["hangup_by"] == "caller", record
    # 20 ms packets for about CALL_SECONDS each way (from the answer on), and no loss
    least = int(CALL_SECONDS * 50 * 0.6)
    for direction in ("caller_to_callee", "callee_to_caller"):
        stats = record["media"][direction]
        assert stats["packets"] >= least, record
        assert stats["lost"] == 0, record


# --------------------------------------------------------------------------------------
# baresip ↔ baresip: an audible tone, detected with a Goertzel filter
# --------------------------------------------------------------------------------------

SAMPLE_RATE = 8000
CALLER_TONE_HZ = 1000.0
CALLEE_TONE_HZ = 600.0
PROBE_HZ = (300.0, 450.0, 600.0, 800.0, 1000.0, 1400.0, 2000.0, 3000.0)
BARESIP_WALL_S = 20.0


def write_tone(path: Path, frequency: float, seconds: float) -> None:
    """A 16-bit mono WAV of a sine at half of full scale."""
    frames = int(SAMPLE_RATE * seconds)
    samples = (
        int(16000 * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE)) for n in range(frames)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))


def read_samples(path: Path) -> tuple[list[int], int]:
    with wave.open(str(path), "rb") as source:
        assert source.getsampwidth() == 2, path
        channels, rate = source.getnchannels(), source.getframerate()
        raw = source.readframes(source.getnframes())
    samples = list(struct.unpack(f"<{len(raw) // 2}h", raw))[::channels]
    return samples, rate


def goertzel_power(samples: list[float], rate: int, frequency: float) -> float:
    """Power of ``frequency`` in ``samples`` (Goertzel's second-order filter)."""
    coefficient = 2 * math.cos(2 * math.pi * frequency / rate)
    previous = before = 0.0
    for sample in samples:
        previous, before = sample + coefficient * previous - before, previous
    return previous * previous + before * before - coefficient * previous * before


def tone_powers(samples: list[int], rate: int) -> dict[float, float]:
    """Mean Goertzel power per probe frequency over 50 ms blocks of non-silent audio
    (Hann-windowed, so that a strong tone does not leak into the neighbouring probes)."""
    block = rate // 20
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / (block - 1)) for n in range(block)]
    totals = dict.fromkeys(PROBE_HZ, 0.0)
    blocks = 0
    for start in range(0, len(samples) - block, block):
        chunk = samples[start : start + block]
        if max(abs(s) for s in chunk) < 1000:  # silence before the media flowed
            continue
        blocks += 1
        windowed = [s * w for s, w in zip(chunk, window, strict=True)]
        for frequency in PROBE_HZ:
            totals[frequency] += goertzel_power(windowed, rate, frequency)
    assert blocks >= 10, f"only {blocks} blocks of audio"
    return {f: total / blocks for f, total in totals.items()}


def _tcp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK_V4, port))
        except OSError:
            return False
    return True


def baresip_config(folder: Path, sip_port: int, ctrl_port: int, rtp_min: int) -> None:
    """A headless baresip configuration: WAV in, decoded audio dumped to WAV files."""
    (folder / "dump").mkdir(parents=True)
    (folder / "config").write_text(
        "\n".join([
            "poll_method\tepoll",
            f"sip_listen\t{LOOPBACK_V4}:{sip_port}",
            f"net_interface\t{LOOPBACK_V4}",
            "audio_player\taubridge,nul",
            "audio_alert\taubridge,nul",
            f"audio_source\taufile,{folder / 'tone.wav'}",
            "audio_srate\t8000",
            "audio_channels\t1",
            f"rtp_ports\t{rtp_min}-{rtp_min + 19}",
            "module_path\t/usr/lib/baresip/modules",
            "module\tg711.so",
            "module\taufile.so",
            "module\taubridge.so",
            "module\tsndfile.so",
            "module_app\taccount.so",
            "module_app\tmenu.so",
            "module_app\tctrl_tcp.so",
            f"ctrl_tcp_listen\t{LOOPBACK_V4}:{ctrl_port}",
            f"snd_path\t{folder / 'dump'}",
        ]) + "\n"
    )  # fmt: skip


def start_baresip(folder: Path, seconds: int, command: str | None = None) -> subprocess.Popen:
    binary = shutil.which("baresip")
    if binary is None:
        pytest.fail("baresip is not installed (Debian package baresip): run `make test`")
    args = [binary, "-f", str(folder), "-t", str(seconds)]
    if command:
        args += ["-e", command]
    with (folder / "baresip.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            args, cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _wait_registered(target: tuple[str, int], device: SipDevice, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    contacts: list[str] = []
    with SipUdpClient(target) as client:
        while time.monotonic() < deadline:
            contacts = client.bindings(device.extension, device.password)
            if contacts:
                return contacts
            time.sleep(0.1)
    return contacts


def _dump(folder: Path, kind: str) -> Path:
    """baresip's sndfile dump of ``kind`` ("dec": what it decoded, "enc": what it sent)."""
    found = sorted((folder / "dump").glob(f"*-{kind}.wav"))
    assert found, f"no {kind} dump in {folder}: {os.listdir(folder / 'dump')}"
    return found[-1]


def test_two_baresip_phones_hear_each_others_tone_through_the_relay(tmp_path: Path) -> None:
    caller, callee = DEVICES[2], DEVICES[3]
    relay_min = 12000 + 2 * (os.getpid() % 1000)  # below the ephemeral ports (32768+)
    sections = {"media": {**MEDIA, "port_min": relay_min, "port_max": relay_min + 99}}
    # baresip 1.0 (libre) gives up ("Function not implemented") on a 401 that also offers
    # SHA-256 digest: this switch offers MD5 only
    with running_switch(
        tmp_path / "switch", DEVICES, tcp=False, sections=sections, algorithms=("MD5",)
    ) as switch:
        host, port = switch.address("udp")
        folders = {}
        taken: set[int] = set()
        for name, device, tone in (
            ("caller", caller, CALLER_TONE_HZ),
            ("callee", callee, CALLEE_TONE_HZ),
        ):
            folder = tmp_path / name
            # baresip also listens for TLS on the next port: both must be free, and apart
            # from the other phone's pair
            for _ in range(50):
                sip_port = free_sip_port([LOOPBACK_V4], ["udp", "tcp"])
                if ({sip_port, sip_port + 1} & taken) or not _tcp_port_free(sip_port + 1):
                    continue
                break
            taken.update({sip_port - 1, sip_port, sip_port + 1, sip_port + 2})
            baresip_config(
                folder,
                sip_port,
                free_port("tcp"),
                (relay_min + 200 if name == "caller" else relay_min + 240),
            )
            answer = ";answermode=auto" if name == "callee" else ""
            (folder / "accounts").write_text(
                f"<sip:{device.extension}@{host}:{port}>;auth_pass={device.password};"
                f"regint=600;audio_codecs=PCMU{answer}\n"
            )
            write_tone(folder / "tone.wav", tone, 10.0)
            folders[name] = folder
        processes = []
        try:
            processes.append(start_baresip(folders["callee"], 12))
            assert _wait_registered((host, port), callee, 5.0), (
                folders["callee"] / "baresip.log"
            ).read_text(errors="replace")[-2000:]
            processes.append(
                start_baresip(folders["caller"], 4, f"/dial sip:{callee.extension}@{host}:{port}")
            )
            stop_process(processes[1], BARESIP_WALL_S)  # the caller hangs up at -t
            answered = switch.wait_for_event("call.ended", timeout=5.0)
        finally:
            for process in processes:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGTERM)
                stop_process(process, 5.0)
        logs = {n: (f / "baresip.log").read_text(errors="replace") for n, f in folders.items()}
        detail = f"caller log:\n{logs['caller'][-2500:]}\ncallee log:\n{logs['callee'][-2500:]}"
        assert answered, detail + switch.log_text()[-2000:]

    records = _cdr_records(switch.config_path)
    assert len(records) == 1, records
    record = records[0]
    assert record["end_cause"] == "normal" and record["sip_status"] == 200, record
    for direction in ("caller_to_callee", "callee_to_caller"):
        assert record["media"][direction]["packets"] >= 50, record  # ≥ 1 s of 20 ms packets

    for listener, expected in (("callee", CALLER_TONE_HZ), ("caller", CALLEE_TONE_HZ)):
        samples, rate = read_samples(_dump(folders[listener], "dec"))
        powers = tone_powers(samples, rate)
        strongest_other = max(p for f, p in powers.items() if f != expected)
        assert powers[expected] > 1000 * strongest_other, (listener, powers, detail)

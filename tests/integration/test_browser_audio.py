"""Audio both ways between a real browser softphone (WebRTC) and a UDP desk phone.

The issue's media test with a real browser: an in-process switch listens on UDP and on
SIP over WebSocket (RFC 7118, ``ws``) with the built-in relay as media backend, so a call
between a WebSocket device and a UDP device goes through the WebRTC bridge (ICE and
DTLS-SRTP towards the browser, plain G.711 RTP towards the desk phone). The switch's own
admin listener serves the softphone page (/phone, JsSIP).

Debian's ``chromium`` (headless, fake media device whose microphone plays a WAV of a 1 kHz
tone written by the test) opens the page, registers as 1000 over the WebSocket (digest
MD5). The desk phone 1001 is tests/peers/sipua.py over UDP, whose SDP names a plain RTP
socket that sends G.711 of a 440 Hz tone and decodes what it receives.

- The page dials 1001: the desk phone hears the browser's 1 kHz (Goertzel on the decoded
  G.711) and the browser hears the phone's 440 Hz (a WebAudio AnalyserNode on the remote
  track of the JsSIP session's RTCPeerConnection, read over the DevTools protocol).
- The desk phone calls 1000 and the page answers from its Answer button: the same, both
  ways.

Chromium or the JsSIP bundle missing is a failure, not a skip: ``make test`` installs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import struct
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from switch_process import LOOPBACK_V4, Listener, SipDevice, build_config, free_port
from test_softphone_page import PhoneBench, click, fill, require_bundle
from test_webrtc_calls import PhoneRtp, has_tone, rtp_target, wait_until

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from sipua import SipUA  # noqa: E402
from test_dashboard import DevTools  # noqa: E402
from test_dashboard import chromium as launch_chromium  # noqa: E402

from switch.app import Softswitch  # noqa: E402
from switch.settings import load_settings_text  # noqa: E402
from switch.softphone import PAGE_PATH  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BROWSER = SipDevice("1000", "pw1000-" + os.urandom(4).hex())  # the softphone page (WS)
DESK = SipDevice("1001", "pw1001-" + os.urandom(4).hex())  # the desk phone (UDP)
RELAY_PORT_MIN = 46000 + 20 * (os.getpid() % 300)
WAIT_S = 8.0
BROWSER_TONE_HZ = 1000.0  # what the browser's fake microphone plays
PHONE_TONE_HZ = 440.0  # what the desk phone sends
WAV_RATE = 48000
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--no-pings", "--mute-audio", "--remote-allow-origins=*",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    # the bridge's ICE candidate is 127.0.0.1: let the browser pair loopback candidates
    "--allow-loopback-in-peer-connection",
    # the test's AudioContext starts running without a user gesture
    "--autoplay-policy=no-user-gesture-required",
]


def write_tone_wav(path: Path, frequency: float = BROWSER_TONE_HZ, seconds: float = 1.0) -> None:
    """A mono 16-bit WAV of a steady tone; a whole number of periods, so it loops cleanly."""
    count = int(WAV_RATE * seconds)
    samples = (int(16000 * math.sin(2 * math.pi * frequency * n / WAV_RATE))
               for n in range(count))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(WAV_RATE)
        out.writeframes(b"".join(struct.pack("<h", s) for s in samples))


# --------------------------------------------------------------------------------------
# The switch: UDP + WS, relay media (WebRTC bridge), its admin listener with /phone
# --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def audio_switch(workdir: Path) -> AsyncIterator[PhoneBench]:
    sections: dict[str, Any] = {
        "media": {"backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORT_MIN,
                  "port_max": RELAY_PORT_MIN + 19, "media_timeout": 0},
        "cdr": {"directory": str(workdir / "cdr")},
        "admin": {"enabled": True, "listen": {"host": LOOPBACK_V4, "port": 0}},
    }
    listeners = [Listener("udp", LOOPBACK_V4, free_port("udp", LOOPBACK_V4)),
                 Listener("ws", LOOPBACK_V4, free_port("tcp", LOOPBACK_V4))]
    # the switch challenges WebSocket clients (JsSIP) with MD5 alone
    text = build_config(listeners, [BROWSER, DESK], sections=sections,
                        algorithms=("SHA-256", "MD5"))
    switch = Softswitch(load_settings_text(text, str(workdir / "switch.yaml")))
    await switch.start()
    try:
        assert switch.admin.address is not None, "the admin listener did not start"
        yield PhoneBench(switch, switch.admin)
    finally:
        await switch.stop()


@contextlib.asynccontextmanager
async def desk_phone(bench: PhoneBench) -> AsyncIterator[tuple[SipUA, PhoneRtp]]:
    """The desk phone registered over UDP; its SDP names the tone socket (PhoneRtp)."""
    loop = asyncio.get_running_loop()
    transport, rtp = await loop.create_datagram_endpoint(PhoneRtp,
                                                         local_addr=(LOOPBACK_V4, 0))
    try:
        async with SipUA(DESK.extension, DESK.password, bench.bound("udp")) as phone:
            phone.rtp_port = rtp.port
            response = await phone.register(expires=300)
            assert response is not None and response.status == 200, response
            yield phone, rtp
    finally:
        transport.close()


# --------------------------------------------------------------------------------------
# Chromium (fake microphone: the WAV) through the DevTools protocol
# --------------------------------------------------------------------------------------


def chromium(workdir: Path, wav: Path) -> contextlib.AbstractAsyncContextManager[DevTools]:
    """Chromium whose fake microphone plays ``wav``."""
    return launch_chromium(workdir, [*CHROMIUM_FLAGS,
                                     f"--use-file-for-fake-audio-capture={wav}"])


async def page_history(page: DevTools) -> str:
    with contextlib.suppress(Exception):
        return str(await page.evaluate("JSON.stringify(window.softphone.events)"))
    return "?"


async def wait_state(page: DevTools, state: str, what: str) -> None:
    try:
        await page.wait_for("window.softphone.state", lambda v: v == state, what,
                            timeout=WAIT_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page said: {await page_history(page)};"
                             f" console errors: {page.console_errors}") from None


async def open_and_register(page: DevTools, bench: PhoneBench) -> None:
    await page.navigate(bench.base + PAGE_PATH)
    assert await page.evaluate("typeof JsSIP") == "object", page.exceptions
    await fill(page, "ext", BROWSER.extension)
    await fill(page, "password", BROWSER.password)
    await click(page, "register")
    try:
        await page.wait_for("window.softphone.registered", lambda v: v is True,
                            "the page registering over the WebSocket", timeout=WAIT_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page said: {await page_history(page)}") from None


# What the browser hears: an AnalyserNode on the remote audio track of the JsSIP session's
# peer connection; ``read()`` gives the loudest bin's frequency and level (dBFS) and the
# levels at the two tones' frequencies.
INSTALL_EAR = """
(async () => {
  const s = window.softphone.session;
  if (!s || !s.connection) throw new Error("no JsSIP session with a peer connection");
  const tracks = s.connection.getReceivers().map((r) => r.track)
                  .filter((t) => t && t.kind === "audio");
  if (tracks.length === 0) throw new Error("no remote audio track");
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 4096;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(new MediaStream(tracks)).connect(analyser);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const hz = ctx.sampleRate / analyser.fftSize;
  const at = (f) => Math.max(...[-1, 0, 1].map((d) => bins[Math.round(f / hz) + d]));
  window.testEar = { ctx: ctx, read: () => {
    analyser.getFloatFrequencyData(bins);
    let peak = 1;  // skip DC
    for (let i = 2; i < bins.length; i++) if (bins[i] > bins[peak]) peak = i;
    return { state: ctx.state, track: tracks[0].readyState, peak_hz: peak * hz,
             peak_db: bins[peak], db_440: at(440), db_1000: at(1000) };
  } };
  return ctx.state;
})()
"""


async def browser_hears(page: DevTools, frequency: float) -> dict[str, Any]:
    """Waits (bounded) until the browser's loudest received frequency is ``frequency``."""
    state = await page.evaluate(INSTALL_EAR)
    assert state == "running", f"the page's AudioContext is {state}"

    def heard(reading: Any) -> bool:
        return (isinstance(reading, dict) and abs(reading["peak_hz"] - frequency) < 25
                and reading["peak_db"] > -60)

    try:
        return await page.wait_for("window.testEar.read()", heard,
                                   f"the browser hearing {frequency:g} Hz", timeout=WAIT_S)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the page said: {await page_history(page)}") from None


async def phone_hears(rtp: PhoneRtp, frequency: float) -> None:
    heard = await wait_until(lambda: has_tone(rtp.decoded, frequency), WAIT_S)
    assert heard, (f"the desk phone did not hear {frequency:g} Hz"
                   f" ({len(rtp.received)} RTP packets received)")


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


async def test_browser_calls_desk_phone_audio_both_ways(tmp_path: Path) -> None:
    require_bundle()
    wav = tmp_path / "tone.wav"
    write_tone_wav(wav)
    tasks: list[asyncio.Task[None]] = []
    async with audio_switch(tmp_path) as bench, chromium(tmp_path, wav) as page, \
            desk_phone(bench) as (desk, rtp):
        try:
            await open_and_register(page, bench)
            await fill(page, "number", DESK.extension)
            await click(page, "call")
            invite = await desk.wait_for("INVITE", WAIT_S)
            assert invite is not None, "the browser's INVITE did not reach the desk phone"
            # the bridge: the desk phone sees plain RTP/AVP SDP, not the browser's SAVPF
            target, rtp.codec = rtp_target(invite.body)
            tasks.append(asyncio.create_task(rtp.send_tone(target, PHONE_TONE_HZ)))
            await wait_state(page, "confirmed", "the call being answered on the page")
            assert await desk.wait_for("ACK", WAIT_S) is not None

            await phone_hears(rtp, BROWSER_TONE_HZ)
            reading = await browser_hears(page, PHONE_TONE_HZ)
            assert reading["db_440"] > reading["db_1000"] + 20, reading  # not its own tone
            assert not has_tone(rtp.decoded, PHONE_TONE_HZ)  # no echo of the phone's tone

            await click(page, "hangup")
            assert await desk.wait_for("BYE", WAIT_S) is not None, "no BYE to the desk phone"
            await wait_state(page, "ended", "the call ending on the page")
            assert page.exceptions == [], page.exceptions
        finally:
            await _cancel(tasks)


async def test_desk_phone_calls_browser_audio_both_ways(tmp_path: Path) -> None:
    require_bundle()
    wav = tmp_path / "tone.wav"
    write_tone_wav(wav)
    tasks: list[asyncio.Task[None]] = []
    async with audio_switch(tmp_path) as bench, chromium(tmp_path, wav) as page, \
            desk_phone(bench) as (desk, rtp):
        try:
            await open_and_register(page, bench)
            call = await desk.invite(BROWSER.extension, wait="sent")
            await wait_state(page, "ringing", "the desk phone's call ringing on the page")
            await click(page, "answer")
            final = await call.wait_final(WAIT_S)
            assert final is not None and final.status == 200, final
            target, rtp.codec = rtp_target(final.body)  # plain RTP/AVP towards the phone
            tasks.append(asyncio.create_task(rtp.send_tone(target, PHONE_TONE_HZ)))
            await wait_state(page, "confirmed", "the answered call confirmed on the page")

            await phone_hears(rtp, BROWSER_TONE_HZ)
            reading = await browser_hears(page, PHONE_TONE_HZ)
            assert reading["db_440"] > reading["db_1000"] + 20, reading
            assert not has_tone(rtp.decoded, PHONE_TONE_HZ)

            bye = await call.bye()
            assert bye is not None and bye.status == 200, bye
            await wait_state(page, "ended", "the call ending on the page after BYE")
            assert page.exceptions == [], page.exceptions
        finally:
            await _cancel(tasks)

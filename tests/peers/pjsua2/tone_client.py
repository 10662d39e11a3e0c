#!/usr/bin/env python3
"""A PJSIP desk phone (module `pjsua2` of the `pjsua2-pybind11` wheel) that registers to
the switch over UDP, plays a WAV file into every call it has and records what it receives
in each call to a WAV file of its own, so a test can tell which tone crossed the switch.

The wheel binds neither ``AudioMediaPlayer`` nor ``AudioMediaRecorder`` (PEERS.md), but
its bundled ``libpjsua`` exports pjsua's C API: the WAV player and recorder are made with
``pjsua_player_create`` / ``pjsua_recorder_create`` through ctypes and wired to the call's
conference-bridge port (``AudioMedia.portId``) with ``pjsua_conf_connect``. The sound
device is the null device; the player loops for as long as the call lasts.

It auto-answers an incoming call with 200 (486 when a call is already up) and obeys
lines on stdin:
    call URI     place a call to URI
    hangup       end the current call (BYE, or CANCEL while it rings)
    quit         leave (exit status 0)

Every fact is one JSON line on stdout, e.g.
    {"event": "registered", "code": 200}
    {"event": "incoming", "call": 1, "from": "..."}
    {"event": "call_state", "call": 1, "state": "CONFIRMED", "code": 200}
    {"event": "sdp", "call": 1, "local_addresses": ["127.0.0.1"]}
    {"event": "media_active", "call": 1, "recording": "/.../call-1.wav"}
    {"event": "recorded", "call": 1, "path": "/.../call-1.wav"}   (after DISCONNECTED)
    {"event": "error", "what": "..."}

pjsip runs without a worker thread of its own (threadCnt=0): the main thread polls it with
``pjsua_handle_events`` (the wheel does not bind ``libHandleEvents``; through ctypes the
poll runs without the GIL), so every callback comes on the main thread. With a pjsip
worker thread, a callback holding a pjsip lock while it waits for the GIL deadlocks
against a pjsua2 call from Python holding the GIL while it waits for that lock (seen:
``Account.create`` against ``onRegState`` when the 200 to REGISTER comes back fast).
Callbacks queue events for the main loop and catch everything: an exception escaping a
callback would abort the process.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pjsua2 as pj

_OUTPUT_LOCK = threading.Lock()


def emit(**fields: object) -> None:
    line = json.dumps(fields) + "\n"
    with _OUTPUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def guarded(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a pjsua2 callback so that nothing escapes into pjsip's thread."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - must never reach pjsip's thread
            try:
                emit(event="callback_error", where=callback.__name__, error=repr(exc))
            except BaseException:  # noqa: BLE001
                pass
        return None

    wrapper.__name__ = callback.__name__
    return wrapper


# --------------------------------------------------------------------------------------
# pjsua's C API for the WAV player and recorder (not bound by the wheel)
# --------------------------------------------------------------------------------------


class PjStr(ctypes.Structure):
    """pj_str_t: a pointer and a length (no terminating NUL needed)."""

    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t)]


def pj_str(text: str) -> PjStr:
    data = text.encode()
    return PjStr(data, len(data))


class PjsuaMedia:
    """pjsua_player_* / pjsua_recorder_* / pjsua_conf_* / pjsua_handle_events of the
    wheel's libpjsua."""

    def __init__(self) -> None:
        folder = Path(pj.__file__).resolve().parent / "pjsua2_pybind11.libs"
        found = sorted(glob.glob(str(folder / "libpjsua-*.so*")))
        if not found:
            raise RuntimeError(f"no libpjsua in {folder}: is pjsua2-pybind11 installed?")
        lib = ctypes.CDLL(found[0])  # the copy pjsua2 already loaded: one pjsua instance
        int_p = ctypes.POINTER(ctypes.c_int)
        lib.pjsua_player_create.argtypes = [ctypes.POINTER(PjStr), ctypes.c_uint, int_p]
        lib.pjsua_player_get_conf_port.argtypes = [ctypes.c_int]
        lib.pjsua_recorder_create.argtypes = [
            ctypes.POINTER(PjStr), ctypes.c_uint, ctypes.c_void_p, ctypes.c_ssize_t,
            ctypes.c_uint, int_p,
        ]  # fmt: skip
        lib.pjsua_recorder_get_conf_port.argtypes = [ctypes.c_int]
        lib.pjsua_recorder_destroy.argtypes = [ctypes.c_int]
        lib.pjsua_conf_connect.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pjsua_handle_events.argtypes = [ctypes.c_uint]
        for name in ("pjsua_handle_events", "pjsua_player_create", "pjsua_recorder_create", "pjsua_recorder_destroy",
                     "pjsua_conf_connect", "pjsua_player_get_conf_port",
                     "pjsua_recorder_get_conf_port"):
            getattr(lib, name).restype = ctypes.c_int
        self.lib = lib

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: pj_status_t {status}")

    def player(self, path: Path) -> int:
        """A looping WAV player; returns its conference port."""
        name, player_id = pj_str(str(path)), ctypes.c_int(-1)
        self._check(self.lib.pjsua_player_create(ctypes.byref(name), 0,
                                                 ctypes.byref(player_id)),
                    f"pjsua_player_create({path})")
        return int(self.lib.pjsua_player_get_conf_port(player_id.value))

    def recorder(self, path: Path) -> tuple[int, int]:
        """A WAV recorder; returns (recorder id, its conference port)."""
        name, recorder_id = pj_str(str(path)), ctypes.c_int(-1)
        self._check(self.lib.pjsua_recorder_create(ctypes.byref(name), 0, None, -1, 0,
                                                   ctypes.byref(recorder_id)),
                    f"pjsua_recorder_create({path})")
        return recorder_id.value, int(self.lib.pjsua_recorder_get_conf_port(recorder_id.value))

    def close_recorder(self, recorder_id: int) -> None:
        """Stops recording and writes the WAV header's final sizes."""
        self._check(self.lib.pjsua_recorder_destroy(recorder_id), "pjsua_recorder_destroy")

    def poll(self, milliseconds: int) -> None:
        """Runs pjsip's timers and network events for up to ``milliseconds`` (callbacks
        come from here, on this thread)."""
        self.lib.pjsua_handle_events(milliseconds)

    def connect(self, source: int, sink: int) -> None:
        self._check(self.lib.pjsua_conf_connect(source, sink),
                    f"pjsua_conf_connect({source}, {sink})")


# --------------------------------------------------------------------------------------
# The user agent
# --------------------------------------------------------------------------------------


class TonePhone:
    """What the callbacks and the stdin reader tell the main loop: (kind, call, details)."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        self.registered = False
        self.number = 0
        self.lock = threading.Lock()

    def next_number(self) -> int:
        with self.lock:
            self.number += 1
            return self.number


class ToneCall(pj.Call):
    def __init__(self, account: ToneAccount, number: int, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.phone = account.phone
        self.number = number
        self.media_port: int | None = None
        self.recorder: int | None = None
        self.ended = False

    @guarded
    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.info
        emit(event="call_state", call=self.number, state=str(info.stateText),
             code=int(info.lastStatusCode), reason=str(info.lastReason))
        if info.state == pj.InvState.DISCONNECTED:
            self.phone.events.put(("ended", self, int(info.lastStatusCode)))

    @guarded
    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802
        for media in self.info.media:
            if media.type == pj.MediaType.AUDIO and media.status == pj.CallMediaStatus.ACTIVE:
                port = int(self.getAudioMedia(media.index).portId)
                self.phone.events.put(("media", self, port))

    @guarded
    def onCallSdpCreated(self, prm: pj.OnCallSdpCreatedParam) -> None:  # noqa: N802
        addresses = sorted(set(re.findall(r"IN IP4 (\S+)", prm.sdp.wholeSdp)))
        emit(event="sdp", call=self.number, local_addresses=addresses)


class ToneAccount(pj.Account):
    def __init__(self, phone: TonePhone) -> None:
        super().__init__()
        self.phone = phone
        self.calls: list[ToneCall] = []  # keeps the Python objects alive

    def live_call(self) -> ToneCall | None:
        return next((c for c in reversed(self.calls) if not c.ended), None)

    @guarded
    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802
        code, expiration = int(prm.code), int(prm.expiration)
        emit(event="reg_state", code=code, expiration=expiration)
        if code == 200 and expiration > 0:
            self.phone.registered = True

    @guarded
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802
        busy = self.live_call() is not None
        call = ToneCall(self, self.phone.next_number(), prm.callId)
        self.calls.append(call)
        emit(event="incoming", call=call.number, busy=busy,
             **{"from": str(call.info.remoteUri)})
        answer = pj.CallOpParam(True)
        answer.statusCode = pj.StatusCode.BUSY_HERE if busy else pj.StatusCode.OK
        call.answer(answer)


def read_commands(phone: TonePhone) -> None:
    for line in sys.stdin:
        phone.events.put(("command", None, line.strip()))
    phone.events.put(("command", None, "quit"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registrar", required=True, help="e.g. sip:127.0.0.1:5060")
    parser.add_argument("--domain", required=True, help="AOR domain, e.g. 127.0.0.1")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--tone", required=True, type=Path, help="16-bit PCM WAV to send")
    parser.add_argument("--record-dir", required=True, type=Path)
    parser.add_argument("--timeout", type=float, default=60.0, help="lifetime bound, s")
    parser.add_argument("--loglevel", type=int, default=1)
    args = parser.parse_args()

    endpoint = pj.Endpoint()
    endpoint.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0  # polled from the main thread: see the module docstring
    config.uaConfig.mainThreadOnly = False
    config.logConfig.level = args.loglevel
    config.logConfig.consoleLevel = args.loglevel
    config.medConfig.noVad = True
    endpoint.libInit(config)
    transport = pj.TransportConfig()
    transport.port = 0
    transport.boundAddress = "127.0.0.1"
    transport.publicAddress = "127.0.0.1"
    endpoint.transportCreate(pj.TransportType.UDP, transport)
    endpoint.libStart()
    endpoint.audDevManager.setNullDev()

    pjsua = PjsuaMedia()
    player_port = pjsua.player(args.tone.resolve())
    args.record_dir.mkdir(parents=True, exist_ok=True)

    phone = TonePhone()
    account_config = pj.AccountConfig()
    account_config.idUri = f"sip:{args.user}@{args.domain}"
    account_config.regConfig.registrarUri = args.registrar
    account_config.regConfig.timeoutSec = 300
    account_config.regConfig.retryIntervalSec = 60
    account_config.sipConfig.authCreds.append(
        pj.AuthCredInfo("digest", "*", args.user, 0, args.password)
    )
    account = ToneAccount(phone)
    account.create(account_config)

    status = 1
    deadline = time.monotonic() + args.timeout
    try:
        registering = time.monotonic() + 10.0
        while not phone.registered and time.monotonic() < registering:
            pjsua.poll(20)
        if not phone.registered:
            emit(event="not_registered")
            return
        emit(event="registered", code=200)
        threading.Thread(target=read_commands, args=(phone,), daemon=True).start()
        while time.monotonic() < deadline:
            try:
                kind, call, detail = phone.events.get_nowait()
            except queue.Empty:
                pjsua.poll(20)
                continue
            try:
                if kind == "media" and call.media_port != detail:
                    call.media_port = detail
                    pjsua.connect(player_port, detail)  # our tone into the call
                    path = args.record_dir.resolve() / f"call-{call.number}.wav"
                    if call.recorder is None:
                        call.recorder, recorder_port = pjsua.recorder(path)
                        pjsua.connect(detail, recorder_port)  # what the call brings us
                    emit(event="media_active", call=call.number, recording=str(path))
                elif kind == "ended" and not call.ended:
                    call.ended = True
                    if call.recorder is not None:
                        pjsua.close_recorder(call.recorder)
                        emit(event="recorded", call=call.number, status=detail,
                             path=str(args.record_dir.resolve() / f"call-{call.number}.wav"))
                elif kind == "command":
                    verb, _, operand = str(detail).partition(" ")
                    if verb == "quit":
                        status = 0
                        return
                    if verb == "call" and operand:
                        new = ToneCall(account, phone.next_number())
                        account.calls.append(new)
                        emit(event="calling", call=new.number, uri=operand)
                        new.makeCall(operand, pj.CallOpParam(True))
                    elif verb == "hangup":
                        live = account.live_call()
                        if live is None:
                            emit(event="error", what="hangup: no call")
                        else:
                            live.hangup(pj.CallOpParam(True))
                    elif verb:
                        emit(event="error", what=f"unknown command {detail!r}")
            except Exception as exc:  # noqa: BLE001 - reported, the phone goes on
                emit(event="error", what=f"{kind}: {exc!r}")
        emit(event="timeout", seconds=args.timeout)
    finally:
        emit(event="exit", status=status)
        # No shutdown()/libDestroy() (slow, and in this wheel prone to deadlocks): leave at
        # once; the OS closes the sockets and the switch's binding simply expires.
        os._exit(status)


if __name__ == "__main__":
    main()

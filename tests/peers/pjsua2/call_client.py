#!/usr/bin/env python3
"""A PJSIP user agent (module `pjsua2` of the `pjsua2-pybind11` wheel) that registers to
the switch and places or answers one call, sending RTP from the null sound device and
DTMF digits as RFC 4733 telephone-events (in-band RTP, so they cross the media relay).

Every fact is printed on stdout as one JSON line, e.g.
    {"event": "registered", "code": 200}
    {"event": "call_state", "state": "CONFIRMED", "code": 200}
    {"event": "media_active"}
    {"event": "dtmf_sent", "digits": "1234"}
    {"event": "dtmf", "digit": "1"}                  (received from the other party)
    {"event": "sdp", "local_addresses": ["127.0.0.1"]}
    {"event": "result", "ok": true, ...}

Roles:
  --call URI    (caller) once registered, call URI; when the call is confirmed with audio,
                send --dtmf, keep the call --seconds, hang up.
  (no --call)   (callee) answer the first incoming call with 200 at once; when audio is
                active, send --dtmf; wait (bounded by --timeout) for the caller's BYE.

The wheel binds no tone generator, WAV player, recorder or media port, so the audible
part of a call here is the null device's silence plus telephone-events (see PEERS.md).

pjsip calls back on its own worker thread (threadCnt=1); an exception escaping a
callback would abort the process, so every callback catches everything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time

import pjsua2 as pj

_OUTPUT_LOCK = threading.Lock()
DTMF_START_DELAY_S = 0.4  # let both streams run before the first digit


def emit(**fields: object) -> None:
    line = json.dumps(fields) + "\n"
    with _OUTPUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def guarded(callback):
    """Wraps a pjsua2 callback so that nothing escapes into pjsip's thread."""

    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - must never reach pjsip's thread
            try:
                emit(event="callback_error", where=callback.__name__, error=repr(exc))
            except BaseException:  # noqa: BLE001
                pass
        return None

    return wrapper


class Phone:
    """What both roles share: state flags the main thread waits on."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.registered: int | None = None
        self.incoming: pj.Call | None = None
        self.confirmed = False
        self.disconnected = False
        self.media_active = False
        self.digits: list[str] = []
        self.last_status: int | None = None

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(remaining)
            return True

    def update(self, **values: object) -> None:
        with self.lock:
            for name, value in values.items():
                setattr(self, name, value)
            self.lock.notify_all()


class PhoneCall(pj.Call):
    def __init__(
        self, account: pj.Account, phone: Phone, endpoint: pj.Endpoint, call_id: int | None = None
    ) -> None:
        if call_id is None:
            super().__init__(account)
        else:
            super().__init__(account, call_id)
        self.phone = phone
        self.endpoint = endpoint

    @guarded
    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.info
        state = info.state
        emit(
            event="call_state",
            state=str(info.stateText),
            code=int(info.lastStatusCode),
            reason=str(info.lastReason),
        )
        if state == pj.InvState.CONFIRMED:
            self.phone.update(confirmed=True, last_status=int(info.lastStatusCode))
        elif state == pj.InvState.DISCONNECTED:
            self.phone.update(disconnected=True, last_status=int(info.lastStatusCode))

    @guarded
    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802
        for media in self.info.media:
            if media.type == pj.MediaType.AUDIO and media.status == pj.CallMediaStatus.ACTIVE:
                audio = self.getAudioMedia(media.index)
                manager = self.endpoint.audDevManager
                manager.captureDevMedia.startTransmit(audio)
                audio.startTransmit(manager.playbackDevMedia)
                if not self.phone.media_active:
                    emit(event="media_active")
                self.phone.update(media_active=True)

    @guarded
    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:  # noqa: N802
        digit = str(prm.digit)
        emit(event="dtmf", digit=digit)
        with self.phone.lock:
            self.phone.digits.append(digit)
            self.phone.lock.notify_all()

    @guarded
    def onCallSdpCreated(self, prm: pj.OnCallSdpCreatedParam) -> None:  # noqa: N802
        addresses = sorted(set(re.findall(r"IN IP4 (\S+)", prm.sdp.wholeSdp)))
        emit(event="sdp", local_addresses=addresses)


class PhoneAccount(pj.Account):
    def __init__(self, phone: Phone, endpoint: pj.Endpoint) -> None:
        super().__init__()
        self.phone = phone
        self.endpoint = endpoint
        self.calls: list[PhoneCall] = []  # keeps the Python objects alive

    @guarded
    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802
        code = int(prm.code)
        emit(event="reg_state", code=code, expiration=int(prm.expiration))
        if code == 200 and int(prm.expiration) > 0:
            self.phone.update(registered=code)

    @guarded
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802
        call = PhoneCall(self, self.phone, self.endpoint, prm.callId)
        self.calls.append(call)
        emit(event="incoming", call_id=int(prm.callId))
        if self.phone.incoming is not None:  # one call at a time
            answer = pj.CallOpParam(True)
            answer.statusCode = pj.StatusCode.BUSY_HERE
            call.answer(answer)
            return
        self.phone.update(incoming=call)
        answer = pj.CallOpParam(True)
        answer.statusCode = pj.StatusCode.OK
        call.answer(answer)


def send_dtmf(call: pj.Call, digits: str) -> None:
    if not digits:
        return
    time.sleep(DTMF_START_DELAY_S)
    call.dialDtmf(digits)  # RFC 4733 telephone-events on the call's RTP stream
    emit(event="dtmf_sent", digits=digits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registrar", required=True, help="e.g. sip:127.0.0.1:5060")
    parser.add_argument("--domain", required=True, help="AOR domain, e.g. 127.0.0.1")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--call", default="", help="URI to call (caller role)")
    parser.add_argument("--dtmf", default="", help="digits to send once audio is up")
    parser.add_argument("--seconds", type=float, default=2.0, help="caller: call length")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--loglevel", type=int, default=1)
    args = parser.parse_args()

    endpoint = pj.Endpoint()
    endpoint.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 1
    config.uaConfig.mainThreadOnly = False
    config.logConfig.level = args.loglevel
    config.logConfig.consoleLevel = args.loglevel
    config.medConfig.noVad = True  # RTP every 20 ms, silence included
    endpoint.libInit(config)
    transport = pj.TransportConfig()
    transport.port = 0
    transport.boundAddress = "127.0.0.1"
    transport.publicAddress = "127.0.0.1"
    endpoint.transportCreate(pj.TransportType.UDP, transport)
    endpoint.libStart()
    endpoint.audDevManager.setNullDev()

    phone = Phone()
    account_config = pj.AccountConfig()
    account_config.idUri = f"sip:{args.user}@{args.domain}"
    account_config.regConfig.registrarUri = args.registrar
    account_config.regConfig.timeoutSec = 300
    account_config.regConfig.retryIntervalSec = 60
    account_config.sipConfig.authCreds.append(
        pj.AuthCredInfo("digest", "*", args.user, 0, args.password)
    )
    account = PhoneAccount(phone, endpoint)
    account.create(account_config)

    ok = False
    call: PhoneCall | None = None
    try:
        if not phone.wait(lambda: phone.registered == 200, 5.0):
            emit(event="not_registered")
            return
        emit(event="registered", code=200)
        deadline = time.monotonic() + args.timeout
        if args.call:
            call = PhoneCall(account, phone, endpoint)
            account.calls.append(call)
            call.makeCall(args.call, pj.CallOpParam(True))
        else:
            if not phone.wait(lambda: phone.incoming is not None, args.timeout):
                emit(event="no_incoming_call")
                return
            call = phone.incoming
        up = phone.wait(
            lambda: phone.disconnected or (phone.confirmed and phone.media_active),
            max(0.1, deadline - time.monotonic()),
        )
        if not up or phone.disconnected:
            emit(event="call_not_established", status=phone.last_status)
            return
        assert call is not None
        send_dtmf(call, args.dtmf)
        if args.call:
            phone.wait(lambda: phone.disconnected, args.seconds)
            hung_up_here = not phone.disconnected
            if hung_up_here:
                call.hangup(pj.CallOpParam(True))
            ended = phone.wait(lambda: phone.disconnected, 5.0)
            ok = ended and hung_up_here
        else:
            ok = phone.wait(lambda: phone.disconnected, max(0.1, deadline - time.monotonic()))
    finally:
        with phone.lock:
            digits = "".join(phone.digits)
        emit(
            event="result",
            ok=ok,
            digits_received=digits,
            confirmed=phone.confirmed,
            media_active=phone.media_active,
            last_status=phone.last_status,
        )
        # No shutdown()/libDestroy(): in this wheel they can deadlock against a callback
        # waiting for the GIL on pjsip's thread. Leave at once; the OS closes the sockets
        # (the switch forgets the binding when the test's switch stops).
        os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()

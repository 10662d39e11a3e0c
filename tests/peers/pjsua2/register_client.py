#!/usr/bin/env python3
"""A PJSIP user agent (module `pjsua2` of the `pjsua2-pybind11` wheel) that registers
to the switch, keeps its registration refreshed, and unregisters.

Every registration state change is printed on stdout as one JSON line:
    {"event": "reg_state", "code": 200, "reason": "OK", "expiration": 3}
Modes:
  default           wait for --want-ok successful REGISTERs (200 with an expiry),
                    print {"event": "registered", "ok": n}, wait for a line on stdin
                    (or --hold seconds when stdin closes), unregister, print
                    {"event": "unregistered", "code": ...}; exit 0 when all went well.
  --expect-failure  the password is wrong: exit 0 when a final failure (401/403) was
                    reported and no 200 ever was, within --timeout seconds.

pjsip calls back on its own worker thread (threadCnt=1); an exception escaping a
callback would abort the process, so every callback catches everything and only
records facts; the main thread waits on events with deadlines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import pjsua2 as pj

_OUTPUT_LOCK = threading.Lock()


def emit(**fields: object) -> None:
    """One JSON line on stdout, whole even when two threads report at once."""
    line = json.dumps(fields) + "\n"
    with _OUTPUT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


class RegisteringAccount(pj.Account):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.states: list[tuple[int, str, int]] = []

    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802 - pjsua2 API
        try:
            code, reason, expiration = int(prm.code), str(prm.reason), int(prm.expiration)
            with self.changed:
                self.states.append((code, reason, expiration))
                self.changed.notify_all()
            emit(event="reg_state", code=code, reason=reason, expiration=expiration)
        except BaseException as exc:  # noqa: BLE001 - must never reach pjsip's thread
            try:
                emit(event="callback_error", error=repr(exc))
            except BaseException:  # noqa: BLE001
                pass

    def successes(self) -> int:
        with self.lock:
            return sum(1 for code, _, exp in self.states if code == 200 and exp > 0)

    def wait_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
            return True


def wait_for_go(hold: float) -> None:
    """Returns when the runner writes a line on stdin, or after ``hold`` seconds."""
    done = threading.Event()

    def read() -> None:
        try:
            sys.stdin.readline()
        finally:
            done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(hold)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registrar", required=True, help="e.g. sip:127.0.0.1:5060")
    parser.add_argument("--domain", required=True, help="AOR domain, e.g. 127.0.0.1")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--expires", type=int, default=3)
    parser.add_argument("--refresh-before", type=int, default=1)
    parser.add_argument("--want-ok", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--expect-failure", action="store_true")
    parser.add_argument("--loglevel", type=int, default=1)
    args = parser.parse_args()

    endpoint = pj.Endpoint()
    endpoint.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 1
    config.uaConfig.mainThreadOnly = False
    config.logConfig.level = args.loglevel
    config.logConfig.consoleLevel = args.loglevel
    endpoint.libInit(config)
    transport = pj.TransportConfig()
    transport.port = 0
    transport.boundAddress = "127.0.0.1"
    transport.publicAddress = "127.0.0.1"
    endpoint.transportCreate(pj.TransportType.UDP, transport)
    endpoint.libStart()
    endpoint.audDevManager.setNullDev()

    account_config = pj.AccountConfig()
    account_config.idUri = f"sip:{args.user}@{args.domain}"
    account_config.regConfig.registrarUri = args.registrar
    account_config.regConfig.timeoutSec = args.expires
    account_config.regConfig.delayBeforeRefreshSec = args.refresh_before
    account_config.regConfig.retryIntervalSec = 60
    account_config.regConfig.firstRetryIntervalSec = 60
    account_config.sipConfig.authCreds.append(
        pj.AuthCredInfo("digest", "*", args.user, 0, args.password)
    )
    account = RegisteringAccount()
    account.create(account_config)
    emit(event="started", user=args.user, registrar=args.registrar, expires=args.expires)

    ok = False
    try:
        if args.expect_failure:
            failed = account.wait_until(
                lambda: any(code >= 300 for code, _, _ in account.states), args.timeout
            )
            time.sleep(1.0)  # room for a wrongly accepted retry to show up
            ok = failed and account.successes() == 0
            emit(event="failure_seen", failed=failed, successes=account.successes())
        else:
            enough = account.wait_until(lambda: account.successes() >= args.want_ok, args.timeout)
            emit(event="registered", ok=account.successes(), enough=enough)
            if enough:
                wait_for_go(args.hold)
                before = len(account.states)
                account.setRegistration(False)
                unregistered = account.wait_until(
                    lambda: any(
                        code == 200 and exp == 0 for code, _, exp in account.states[before:]
                    ),
                    5.0,
                )
                emit(event="unregistered", done=unregistered)
                ok = unregistered
    finally:
        with account.lock:
            states = list(account.states)
        emit(event="result", ok=ok, states=states)
    # No Account.shutdown()/libDestroy(): in this wheel they can deadlock against a
    # callback waiting for the GIL on pjsip's thread. Everything to say is said, the
    # registration is already removed: leave at once; the OS closes the sockets.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()

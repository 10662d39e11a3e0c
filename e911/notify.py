"""On-site notification of emergency calls (Kari's Law, 47 CFR 9.16(b)(2); EMERGENCY.md EM-60).

When a device places an emergency call (911, 112, 18, ... or a 933 / ``urn:service:test.sos``
test call), the people on the caller's site must learn of it at once: the fact of the call, the
dialled number, date and time, extension, user and device, the callback number, the location
sent to the PSAP (with floor and room, and whether it was verified or a default, EM-24), the
emergency trunk and the outcome (ROUTING, ANSWERED, FAILED, EM-13), and a TEST flag (EM-07).

`EmergencyNotification` holds that content, as JSON for webhooks (`to_json`) and as one short
line for a SIP MESSAGE to a security-desk phone (`to_text`).

`Notifier.notify` never delays the emergency INVITE: it only schedules one asyncio task per
recipient and returns. Each task POSTs the JSON to a webhook (a small HTTP/1.1 client on
asyncio streams, http:// or https://) or asks the switch to send a SIP MESSAGE to a device, and
retries with backoff. The first failure of a delivery raises an alarm saying it is being
retried; the last failure raises a second alarm. Every outcome goes to ``on_delivery`` so the
audit journal (EM-70) can record it. `Notifier.alert_admins` sends admin alerts (unverified
location, device moved, journal failure, ...) through the same machinery.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

__all__ = [
    "LOCATION_STATUSES",
    "NUMBER_CLASSES",
    "DeliveryOutcome",
    "EmergencyNotification",
    "Notifier",
    "format_utc",
    "summarize_location",
    "validate_webhook_url",
]

log = structlog.get_logger("e911.notify")

NUMBER_CLASSES = frozenset({"emergency", "test", "helpline"})
LOCATION_STATUSES = frozenset({"verified", "default", "unconfirmed"})

# Elements shown in a one-line location summary, most specific first within the building,
# then the street address (RFC 5139 element names).
_SUMMARY_PARTS: tuple[tuple[str, str], ...] = (
    ("NAM", "{}"),
    ("BLD", "bldg {}"),
    ("FLR", "floor {}"),
    ("UNIT", "unit {}"),
    ("ROOM", "room {}"),
    ("SEAT", "seat {}"),
    ("LOC", "{}"),
)
_STREET_PARTS = ("HNO", "HNS", "PRD", "RD", "STS", "POD")
_PLACE_PARTS = ("PC", "A3", "A1", "country")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_STATUS_LINE = 8192


class DeliveryOutcome:
    """The ``outcome`` values passed to ``on_delivery``."""

    DELIVERED = "delivered"  # the recipient accepted it (2xx / MESSAGE accepted)
    RETRYING = "retrying"  # this attempt failed, another one is scheduled
    FAILED = "failed"  # the last attempt failed; an alarm was raised
    CANCELLED = "cancelled"  # Notifier.close() cancelled a delivery still in progress


def format_utc(timestamp: float) -> str:
    """``2026-11-01T09:30:00.250Z`` for a float epoch timestamp."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summarize_location(location: Mapping[str, str]) -> str:
    """One readable line from RFC 5139 civic elements: ``floor 3, room B312, 12 Rue X, Lyon``."""
    parts = [
        template.format(location[key]) for key, template in _SUMMARY_PARTS if location.get(key)
    ]
    street = " ".join(location[key] for key in _STREET_PARTS if location.get(key))
    if street:
        parts.append(street)
    parts.extend(location[key] for key in _PLACE_PARTS if location.get(key))
    return ", ".join(parts) if parts else "no location"


def validate_webhook_url(url: str) -> list[str]:
    """The problems with a webhook URL (empty when it can be used)."""
    if not isinstance(url, str) or not url:
        return [f"webhook URL must be a non-empty string, not {url!r}"]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"webhook URL {url!r} is malformed: {exc}"]
    problems = []
    if parts.scheme not in _DEFAULT_PORTS:
        problems.append(f"webhook URL {url!r} must use http:// or https://, not {parts.scheme!r}")
    if not parts.hostname:
        problems.append(f"webhook URL {url!r} has no host")
    if port == 0:
        problems.append(f"webhook URL {url!r} has port 0")
    if any(ch in url for ch in "\r\n\t "):
        problems.append(f"webhook URL {url!r} contains whitespace")
    return problems


@dataclass
class EmergencyNotification:
    """What the site is told about one emergency, test or helpline call (EM-60)."""

    call_id: str
    dialled: str  # the digits or URN the caller dialled, e.g. "911", "18", "urn:service:sos"
    number_class: str  # "emergency" | "test" | "helpline"
    time: float  # epoch seconds of the classification / INVITE
    extension: str
    user: str  # display name of the caller
    device: str  # the registered username of the calling device
    account: str
    site: str
    callback_number: str
    location: dict[str, str] = field(default_factory=dict)  # RFC 5139 elements sent to the PSAP
    location_summary: str = ""
    location_status: str = "verified"  # "verified" | "default" | "unconfirmed"
    trunk: str | None = None
    outcome: str = "ROUTING"  # "ROUTING" | "ANSWERED" | "FAILED" | "ENDED" ...
    test: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid emergency notification: " + "; ".join(problems))
        if not self.location_summary:
            self.location_summary = summarize_location(self.location)
        if self.number_class == "test":
            self.test = True

    def problems(self) -> list[str]:
        """What is wrong with the fields (empty when the notification can be sent)."""
        problems = []
        for name in ("call_id", "dialled", "extension", "user", "device", "account", "site"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, not {getattr(self, name)!r}")
        if not isinstance(self.callback_number, str):
            problems.append(f"callback_number must be a string, not {self.callback_number!r}")
        if not isinstance(self.location_summary, str):
            problems.append(f"location_summary must be a string, not {self.location_summary!r}")
        if self.number_class not in NUMBER_CLASSES:
            problems.append(
                f"number_class must be one of {sorted(NUMBER_CLASSES)}, not {self.number_class!r}"
            )
        if self.location_status not in LOCATION_STATUSES:
            problems.append(
                f"location_status must be one of {sorted(LOCATION_STATUSES)}, "
                f"not {self.location_status!r}"
            )
        if (
            isinstance(self.time, bool)
            or not isinstance(self.time, int | float)
            or not math.isfinite(self.time)
            or self.time < 0
        ):
            problems.append(f"time must be a finite epoch timestamp, not {self.time!r}")
        if not isinstance(self.location, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.location.items()
        ):
            problems.append("location must map RFC 5139 element names to strings")
        if self.trunk is not None and not isinstance(self.trunk, str):
            problems.append(f"trunk must be a string or None, not {self.trunk!r}")
        if not isinstance(self.outcome, str) or not self.outcome:
            problems.append(f"outcome must be a non-empty string, not {self.outcome!r}")
        if not isinstance(self.test, bool):
            problems.append(f"test must be a bool, not {self.test!r}")
        return problems

    def to_json(self) -> dict[str, Any]:
        """The webhook payload: every field, ``floor``/``room`` from FLR/ROOM, ISO-8601 UTC time."""
        return {
            "call_id": self.call_id,
            "dialled": self.dialled,
            "number_class": self.number_class,
            "time": format_utc(self.time),
            "extension": self.extension,
            "user": self.user,
            "device": self.device,
            "account": self.account,
            "site": self.site,
            "callback_number": self.callback_number,
            "location": dict(self.location),
            "location_summary": self.location_summary,
            "location_status": self.location_status,
            "floor": self.location.get("FLR"),
            "room": self.location.get("ROOM"),
            "trunk": self.trunk,
            "outcome": self.outcome,
            "test": self.test,
        }

    def to_text(self) -> str:
        """One short line for a security-desk SIP MESSAGE, prefixed ``TEST `` for test calls."""
        moment = datetime.fromtimestamp(self.time, UTC)
        kind = "HELPLINE" if self.number_class == "helpline" else "EMERGENCY"
        status = self.location_status
        if status != "verified":
            status += ", LOCATION NOT VERIFIED"
        who = f"ext {self.extension}" + (f" ({self.user})" if self.user else "")
        text = (
            f"{kind} {self.dialled} dialled by {who}"
            f" at {moment:%Y-%m-%d %H:%M:%S}Z"
            f" — callback {self.callback_number or 'none'}"
            f" — location: {self.location_summary} ({status})"
            f" — trunk {self.trunk or 'none'}"
            f" — {self.outcome}"
        )
        return f"TEST {text}" if self.test else text


SendMessage = Callable[[str, str], Awaitable[bool]]
DeliveryCallback = Callable[[str, str, str], None]
AlarmCallback = Callable[[str, str], None]


class _DeliveryError(Exception):
    """One delivery attempt failed; the message says why."""


class Notifier:
    """Delivers emergency notifications and admin alerts without ever blocking the call."""

    def __init__(
        self,
        webhooks: Iterable[str] = (),
        *,
        send_message: SendMessage | None = None,
        retry_delays: Iterable[float] = (1, 2, 5, 10, 30, 60),
        timeout: float = 5.0,
        on_delivery: DeliveryCallback | None = None,
        on_alarm: AlarmCallback | None = None,
        admin_webhooks: Iterable[str] = (),
    ) -> None:
        if isinstance(webhooks, str) or isinstance(admin_webhooks, str):
            raise TypeError("webhooks and admin_webhooks must be lists of URLs, not one string")
        self.webhooks = list(webhooks)
        self.admin_webhooks = list(admin_webhooks)
        problems = [
            p for url in self.webhooks + self.admin_webhooks for p in validate_webhook_url(url)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        delays = list(retry_delays)
        if not all(
            isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d) and d >= 0
            for d in delays
        ):
            raise ValueError(
                f"retry_delays must be non-negative numbers of seconds, not {delays!r}"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.retry_delays: tuple[float, ...] = tuple(float(d) for d in delays)
        self.timeout = float(timeout)
        self._send_message = send_message
        self._on_delivery = on_delivery
        self._on_alarm = on_alarm
        self._tasks: set[asyncio.Task[None]] = set()
        self._ssl_context: ssl.SSLContext | None = None

    # -- public API -------------------------------------------------------------------------

    def notify(
        self,
        notification: EmergencyNotification,
        *,
        recipients: Iterable[str] | None = None,
        devices: Iterable[str] = (),
    ) -> None:
        """Schedule delivery to webhook ``recipients`` (default: the constructor's ``webhooks``)
        and to security-desk ``devices`` (usernames, by SIP MESSAGE); returns at once."""
        if not isinstance(notification, EmergencyNotification):
            raise TypeError(f"notify() needs an EmergencyNotification, not {type(notification)!r}")
        loop = asyncio.get_running_loop()  # RuntimeError outside the event loop
        urls = self.webhooks if recipients is None else _as_list(recipients, "recipients")
        usernames = _as_list(devices, "devices")
        payload = json.dumps(notification.to_json(), ensure_ascii=False).encode()
        text = notification.to_text()
        log.warning(
            "emergency.notification",
            call_id=notification.call_id,
            text=text,
            webhooks=len(urls),
            devices=len(usernames),
        )
        label = f"call {notification.call_id}"
        for url in dict.fromkeys(urls):
            problems = validate_webhook_url(url)
            if problems:
                self._refuse(str(url), label, "; ".join(problems))
            else:
                self._start(loop, url, label, lambda url=url: self._post(url, payload))
        for username in dict.fromkeys(usernames):
            if not isinstance(username, str) or not username.strip():
                self._refuse(str(username), label, f"device username {username!r} is not usable")
            else:
                self._start(
                    loop, username, label, lambda username=username: self._message(username, text)
                )

    def alert_admins(self, kind: str, text: str, **fields: Any) -> None:
        """Log an ``emergency.alert`` warning and POST ``{"alert", "text", **fields}`` to the
        admin webhooks (unverified location, device moved, foreign country, journal failure)."""
        log.warning("emergency.alert", kind=kind, text=text, **fields)
        if not self.admin_webhooks:
            return
        loop = asyncio.get_running_loop()
        body: dict[str, Any] = {"alert": kind, "text": text}
        body.update((key, value) for key, value in fields.items() if key not in body)
        payload = json.dumps(body, ensure_ascii=False, default=str).encode()
        label = f"alert {kind}"
        for url in dict.fromkeys(self.admin_webhooks):
            self._start(loop, url, label, lambda url=url: self._post(url, payload))

    def pending(self) -> int:
        """How many deliveries are still in flight (attempting or waiting to retry)."""
        return sum(1 for task in self._tasks if not task.done())

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for deliveries in flight, then cancel the rest."""
        tasks = [task for task in self._tasks if not task.done()]
        if not tasks:
            return
        if timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
        remaining = [task for task in tasks if not task.done()]
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)

    # -- delivery with retries --------------------------------------------------------------

    def _start(
        self,
        loop: asyncio.AbstractEventLoop,
        recipient: str,
        label: str,
        attempt: Callable[[], Awaitable[str]],
    ) -> None:
        task = loop.create_task(self._deliver(recipient, label, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self, recipient: str, label: str, attempt: Callable[[], Awaitable[str]]
    ) -> None:
        attempts = len(self.retry_delays) + 1
        try:
            for number in range(1, attempts + 1):
                try:
                    detail = await attempt()
                except _DeliveryError as exc:
                    reason = str(exc)
                except Exception as exc:  # a failing send_message must not end the retries
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    self._report(recipient, DeliveryOutcome.DELIVERED, f"{label}: {detail}")
                    return
                if number == attempts:
                    break
                delay = self.retry_delays[number - 1]
                self._report(
                    recipient,
                    DeliveryOutcome.RETRYING,
                    f"{label}: attempt {number}/{attempts} failed ({reason}); retry in {delay:g} s",
                )
                if number == 1:
                    self._alarm(recipient, f"{label}: delivery failed ({reason}); retrying")
                await asyncio.sleep(delay)
            final = f"{label}: delivery failed after {attempts} attempt(s): {reason}"
            self._report(recipient, DeliveryOutcome.FAILED, final)
            self._alarm(recipient, final)
        except asyncio.CancelledError:
            self._report(recipient, DeliveryOutcome.CANCELLED, f"{label}: notifier closed")
            raise

    def _refuse(self, recipient: str, label: str, reason: str) -> None:
        """A recipient that can never be reached: fail it at once, with an alarm, no retries."""
        final = f"{label}: not delivered: {reason}"
        self._report(recipient, DeliveryOutcome.FAILED, final)
        self._alarm(recipient, final)

    def _report(self, recipient: str, outcome: str, detail: str) -> None:
        log.info(
            "emergency.notify_delivery",
            recipient=_safe_url(recipient),
            outcome=outcome,
            detail=detail,
        )
        if self._on_delivery is not None:
            try:
                self._on_delivery(recipient, outcome, detail)
            except Exception:
                log.exception("emergency.notify_callback_failed", callback="on_delivery")

    def _alarm(self, recipient: str, reason: str) -> None:
        log.error("emergency.notify_alarm", recipient=_safe_url(recipient), reason=reason)
        if self._on_alarm is not None:
            try:
                self._on_alarm(recipient, reason)
            except Exception:
                log.exception("emergency.notify_callback_failed", callback="on_alarm")

    # -- one attempt ------------------------------------------------------------------------

    async def _message(self, username: str, text: str) -> str:
        if self._send_message is None:
            raise _DeliveryError("no SIP MESSAGE sender is configured")
        try:
            accepted = await asyncio.wait_for(self._send_message(username, text), self.timeout)
        except TimeoutError:
            raise _DeliveryError(f"MESSAGE not answered within {self.timeout:g} s") from None
        if not accepted:
            raise _DeliveryError("MESSAGE not accepted")
        return "MESSAGE accepted"

    async def _post(self, url: str, payload: bytes) -> str:
        problems = validate_webhook_url(url)
        if problems:
            raise _DeliveryError("; ".join(problems))
        try:
            async with asyncio.timeout(self.timeout):
                status, reason = await self._http_post(url, payload)
        except TimeoutError:
            raise _DeliveryError(f"no HTTP answer within {self.timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise _DeliveryError(f"cannot reach webhook: {exc or type(exc).__name__}") from None
        except ValueError as exc:  # e.g. a status line over the stream reader's limit
            raise _DeliveryError(f"webhook sent an unreadable answer: {exc}") from None
        if not 200 <= status < 300:
            raise _DeliveryError(f"HTTP {status} {reason}".rstrip())
        return f"HTTP {status}"

    async def _http_post(self, url: str, payload: bytes) -> tuple[int, str]:
        """POST ``payload`` as JSON over HTTP/1.1 (Connection: close); the status and reason."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        context = self._tls_context() if secure else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if secure else None
        )
        try:
            host_header = f"[{host}]" if ":" in host else host
            if parts.port is not None:
                host_header += f":{port}"
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            lines = [
                f"POST {target} HTTP/1.1",
                f"Host: {host_header}",
                "User-Agent: softswitch-e911-notify",
                "Content-Type: application/json",
                f"Content-Length: {len(payload)}",
                "Connection: close",
            ]
            if parts.username is not None:
                credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                lines.append(
                    "Authorization: Basic " + base64.b64encode(credentials.encode()).decode()
                )
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
            status_line = await reader.readline()
            return _parse_status_line(status_line)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _parse_status_line(line: bytes) -> tuple[int, str]:
    if not line:
        raise _DeliveryError("webhook closed the connection without an HTTP answer")
    if len(line) > _MAX_STATUS_LINE:
        raise _DeliveryError("webhook sent an over-long HTTP status line")
    words = line.decode("latin-1").strip().split(" ", 2)
    if len(words) < 2 or not words[0].startswith("HTTP/") or not words[1].isdigit():
        raise _DeliveryError(f"webhook sent a malformed HTTP status line {line[:80]!r}")
    return int(words[1]), words[2] if len(words) > 2 else ""


def _as_list(values: Iterable[str], name: str) -> list[str]:
    if isinstance(values, str | bytes):
        raise TypeError(f"{name} must be a list of strings, not one string")
    return list(values)


def _safe_url(recipient: str) -> str:
    """A recipient for logs: a URL without its credentials and query (which may hold tokens)."""
    if "://" not in recipient:
        return recipient
    try:
        parts = urlsplit(recipient)
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "<malformed URL>"
    return f"{parts.scheme}://{netloc}{parts.path}"

"""Unit tests for the Kari's Law on-site notification (EM-60, EM-07, EM-24, EM-13).

Every webhook here is a local asyncio HTTP server on a free 127.0.0.1 port; security-desk
devices are a fake ``send_message`` coroutine standing in for the switch's SIP MESSAGE sender.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from structlog.testing import capture_logs

from e911.notify import (
    DeliveryOutcome,
    EmergencyNotification,
    Notifier,
    summarize_location,
    validate_webhook_url,
)

LOOPBACK = "127.0.0.1"
TINY_DELAYS = (0.01, 0.02)
LYON_ROOM = {
    "country": "FR",
    "A1": "69",
    "A3": "Lyon",
    "RD": "Rue de la République",
    "HNO": "12",
    "FLR": "3",
    "PC": "69002",
    "ROOM": "B312",
}


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


@dataclass
class WebhookSink:
    """A NOTIFY-SINK: answers each POST with the next status (the last one repeats), or hangs."""

    statuses: list[int] = field(default_factory=lambda: [200])
    hang: bool = False
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, sock: socket.socket | None = None) -> WebhookSink:
        if sock is None:
            self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        else:
            self._server = await asyncio.start_server(self._handle, sock=sock)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/hook") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            if self.hang:
                await asyncio.wait_for(self._release.wait(), 30.0)
                return
            request_line = (await reader.readline()).decode().rstrip("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode().rstrip("\r\n")) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Request(method, target, headers, body))
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


@dataclass
class Journal:
    """Records on_delivery and on_alarm calls, as the audit journal would."""

    deliveries: list[tuple[str, str, str]] = field(default_factory=list)
    alarms: list[tuple[str, str]] = field(default_factory=list)

    def on_delivery(self, recipient: str, outcome: str, detail: str) -> None:
        self.deliveries.append((recipient, outcome, detail))

    def on_alarm(self, recipient: str, reason: str) -> None:
        self.alarms.append((recipient, reason))

    def outcomes(self, recipient: str) -> list[str]:
        return [outcome for who, outcome, _ in self.deliveries if who == recipient]


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the time limit")
        await asyncio.sleep(0.005)


def make_notification(**changes: object) -> EmergencyNotification:
    values: dict[str, object] = {
        "call_id": "c0ffee@10.0.0.5",
        "dialled": "911",
        "number_class": "emergency",
        "time": 1_780_000_000.25,
        "extension": "101",
        "user": "Alice Martin",
        "device": "alice-desk",
        "account": "acme",
        "site": "lyon",
        "callback_number": "+33472000101",
        "location": dict(LYON_ROOM),
        "location_summary": "floor 3, room B312, 12 Rue de la République, Lyon",
        "location_status": "verified",
        "trunk": "etrunk-1",
        "outcome": "ROUTING",
        "test": False,
    }
    values.update(changes)
    return EmergencyNotification(**values)  # type: ignore[arg-type]


def free_bound_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port but not listening: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


# -- the notification content --------------------------------------------------------------


def test_to_json_has_every_field_with_floor_room_and_utc_time() -> None:
    payload = make_notification().to_json()
    assert payload["floor"] == "3"
    assert payload["room"] == "B312"
    assert payload["time"] == "2026-05-28T20:26:40.250Z"
    assert payload["location"] == LYON_ROOM
    assert payload["test"] is False
    json.dumps(payload)  # serialisable as is


def test_floor_and_room_are_none_when_the_location_lacks_them() -> None:
    payload = make_notification(location={"country": "FR", "A3": "Lyon"}).to_json()
    assert payload["floor"] is None
    assert payload["room"] is None


def test_to_text_is_one_line_with_the_essentials() -> None:
    text = make_notification().to_text()
    assert text.startswith(
        "EMERGENCY 911 dialled by ext 101 (Alice Martin) at 2026-05-28 20:26:40Z"
    )
    for part in ("+33472000101", "room B312", "(verified)", "trunk etrunk-1", "ROUTING"):
        assert part in text
    assert "\n" not in text


def test_unverified_location_is_flagged_in_the_text_and_payload() -> None:
    notification = make_notification(location_status="default")
    assert "(default, LOCATION NOT VERIFIED)" in notification.to_text()
    assert notification.to_json()["location_status"] == "default"


def test_test_calls_are_marked_test() -> None:
    notification = make_notification(dialled="933", number_class="test")
    assert notification.test is True
    assert notification.to_text().startswith("TEST EMERGENCY 933 dialled")
    assert notification.to_json()["test"] is True


def test_location_summary_is_built_when_missing() -> None:
    notification = make_notification(location_summary="")
    assert notification.location_summary == summarize_location(LYON_ROOM)
    assert "floor 3" in notification.location_summary
    assert "room B312" in notification.location_summary
    assert summarize_location({}) == "no location"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"number_class": "sos"}, "number_class"),
        ({"location_status": "maybe"}, "location_status"),
        ({"time": float("nan")}, "time"),
        ({"location": {"FLR": 3}}, "location"),
        ({"outcome": ""}, "outcome"),
    ],
)
def test_bad_fields_are_refused_with_a_clear_error(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_notification(**changes)


def test_bad_webhook_urls_are_refused() -> None:
    assert validate_webhook_url("http://127.0.0.1:8080/x") == []
    assert validate_webhook_url("https://desk.example/hook") == []
    assert validate_webhook_url("ftp://desk.example/") != []
    assert validate_webhook_url("http:///nohost") != []
    assert validate_webhook_url("http://h:99999/") != []
    with pytest.raises(ValueError, match="http:// or https://"):
        Notifier(["mailto:desk@example.com"])
    with pytest.raises(ValueError, match="retry_delays"):
        Notifier([], retry_delays=(-1,))
    with pytest.raises(TypeError):
        Notifier("http://127.0.0.1/hook")  # type: ignore[arg-type]


# -- delivery to webhooks ------------------------------------------------------------------


async def test_delivered_payload_has_every_field_and_floor_room() -> None:
    sink = await WebhookSink().start()
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, on_alarm=journal.on_alarm
    )
    notification = make_notification()
    url = sink.url("/kari?token=abc")
    try:
        notifier.notify(notification, recipients=[url], devices=[])
        await until(lambda: journal.outcomes(url) == [DeliveryOutcome.DELIVERED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert len(sink.requests) == 1
    request = sink.requests[0]
    assert request.method == "POST"
    assert request.target == "/kari?token=abc"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["connection"] == "close"
    assert request.headers["host"] == f"{LOOPBACK}:{sink.port}"
    payload = request.json()
    expected_keys = {
        "call_id", "dialled", "number_class", "time", "extension", "user", "device", "account",
        "site", "callback_number", "location", "location_summary", "location_status", "trunk",
        "outcome", "test", "floor", "room",
    }  # fmt: skip
    assert set(payload) == expected_keys
    assert payload == notification.to_json()
    assert payload["floor"] == LYON_ROOM["FLR"]
    assert payload["room"] == LYON_ROOM["ROOM"]
    assert journal.alarms == []
    assert notifier.pending() == 0


async def test_default_recipients_are_the_constructor_webhooks() -> None:
    sink = await WebhookSink().start()
    journal = Journal()
    notifier = Notifier([sink.url()], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery)
    try:
        notifier.notify(make_notification())
        await until(lambda: journal.outcomes(sink.url()) == [DeliveryOutcome.DELIVERED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert len(sink.requests) == 1


async def test_notify_returns_at_once_while_the_sink_hangs() -> None:
    sink = await WebhookSink(hang=True).start()
    desk_released = asyncio.Event()

    async def slow_message(username: str, text: str) -> bool:
        await asyncio.wait_for(desk_released.wait(), 30.0)
        return True

    journal = Journal()
    notifier = Notifier(
        [],
        send_message=slow_message,
        retry_delays=TINY_DELAYS,
        timeout=30.0,
        on_delivery=journal.on_delivery,
        on_alarm=journal.on_alarm,
    )
    try:
        started = time.perf_counter()
        notifier.notify(make_notification(), recipients=[sink.url()], devices=["desk-1"])
        elapsed = time.perf_counter() - started
        assert elapsed < 0.010, f"notify() took {elapsed * 1000:.1f} ms"
        assert notifier.pending() == 2
        await until(lambda: sink.connections == 1)  # the POST really is stuck at the sink
        assert notifier.pending() == 2
        await notifier.close(0.05)
        assert notifier.pending() == 0
    finally:
        desk_released.set()
        await sink.stop()
    assert journal.outcomes(sink.url()) == [DeliveryOutcome.CANCELLED]
    assert journal.outcomes("desk-1") == [DeliveryOutcome.CANCELLED]
    assert sink.requests == []


async def test_sink_down_raises_an_alarm_and_delivery_is_retried_until_it_is_up() -> None:
    sock = free_bound_socket()
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}/hook"
    sink = WebhookSink()
    journal = Journal()

    def on_alarm(recipient: str, reason: str) -> None:
        journal.on_alarm(recipient, reason)
        sock.listen()  # NOTIFY-SINK comes back while the delivery waits to retry

    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, on_alarm=on_alarm
    )
    try:
        notifier.notify(make_notification(), recipients=[url])
        await until(lambda: journal.alarms != [])
        await sink.start(sock=sock)
        await until(lambda: DeliveryOutcome.DELIVERED in journal.outcomes(url))
    finally:
        await notifier.close(1.0)
        await sink.stop()
        sock.close()
    assert len(journal.alarms) == 1
    recipient, reason = journal.alarms[0]
    assert recipient == url
    assert "retrying" in reason
    assert "cannot reach webhook" in reason
    assert journal.outcomes(url) == [DeliveryOutcome.RETRYING, DeliveryOutcome.DELIVERED]
    assert len(sink.requests) == 1
    assert sink.requests[0].json()["call_id"] == "c0ffee@10.0.0.5"


async def test_sink_answering_500_then_200_is_retried_and_delivered() -> None:
    sink = await WebhookSink(statuses=[500, 200]).start()
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, on_alarm=journal.on_alarm
    )
    try:
        notifier.notify(make_notification(), recipients=[sink.url()])
        await until(lambda: DeliveryOutcome.DELIVERED in journal.outcomes(sink.url()))
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert len(sink.requests) == 2
    assert sink.requests[0].body == sink.requests[1].body
    assert journal.outcomes(sink.url()) == [DeliveryOutcome.RETRYING, DeliveryOutcome.DELIVERED]
    assert len(journal.alarms) == 1
    assert "HTTP 500" in journal.alarms[0][1]


async def test_last_failure_raises_a_final_alarm() -> None:
    sink = await WebhookSink(statuses=[503]).start()
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, on_alarm=journal.on_alarm
    )
    try:
        notifier.notify(make_notification(), recipients=[sink.url()])
        await until(lambda: DeliveryOutcome.FAILED in journal.outcomes(sink.url()))
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert len(sink.requests) == 3  # first attempt plus one per retry delay
    assert journal.outcomes(sink.url()) == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.FAILED,
    ]
    assert [("retrying" in reason) for _, reason in journal.alarms] == [True, False]
    assert "after 3 attempt(s)" in journal.alarms[1][1]
    assert notifier.pending() == 0


async def test_a_hanging_sink_times_out_and_is_retried() -> None:
    sink = await WebhookSink(hang=True).start()
    journal = Journal()
    notifier = Notifier(
        [],
        retry_delays=(0.01,),
        timeout=0.05,
        on_delivery=journal.on_delivery,
        on_alarm=journal.on_alarm,
    )
    try:
        notifier.notify(make_notification(), recipients=[sink.url()])
        await until(lambda: DeliveryOutcome.FAILED in journal.outcomes(sink.url()))
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert sink.connections == 2
    assert "no HTTP answer within 0.05 s" in journal.alarms[-1][1]


async def test_failed_outcome_is_still_notified() -> None:
    sink = await WebhookSink().start()
    journal = Journal()
    notifier = Notifier([], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery)
    try:
        notifier.notify(make_notification(outcome="FAILED", trunk=None), recipients=[sink.url()])
        await until(lambda: journal.outcomes(sink.url()) == [DeliveryOutcome.DELIVERED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    payload = sink.requests[0].json()
    assert payload["outcome"] == "FAILED"
    assert payload["trunk"] is None
    assert payload["floor"] == "3"


async def test_test_call_payload_is_marked_test() -> None:
    sink = await WebhookSink().start()
    sent: list[tuple[str, str]] = []

    async def send_message(username: str, text: str) -> bool:
        sent.append((username, text))
        return True

    notifier = Notifier([], send_message=send_message, retry_delays=TINY_DELAYS)
    try:
        notifier.notify(
            make_notification(dialled="933", number_class="test"),
            recipients=[sink.url()],
            devices=["desk-1"],
        )
        await until(lambda: len(sink.requests) == 1 and len(sent) == 1)
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert sink.requests[0].json()["test"] is True
    assert sent[0][1].startswith("TEST EMERGENCY 933")


async def test_an_unusable_recipient_fails_at_once_without_stopping_the_others() -> None:
    sink = await WebhookSink().start()
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, on_alarm=journal.on_alarm
    )
    try:
        notifier.notify(make_notification(), recipients=["gopher://x/", sink.url()], devices=[""])
        await until(lambda: journal.outcomes(sink.url()) == [DeliveryOutcome.DELIVERED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert journal.outcomes("gopher://x/") == [DeliveryOutcome.FAILED]
    assert journal.outcomes("") == [DeliveryOutcome.FAILED]
    assert {who for who, _ in journal.alarms} == {"gopher://x/", ""}


async def test_notify_needs_a_notification() -> None:
    with pytest.raises(TypeError, match="EmergencyNotification"):
        Notifier([]).notify({"dialled": "911"})  # type: ignore[arg-type]


# -- delivery to security-desk devices by SIP MESSAGE --------------------------------------


async def test_send_message_gets_the_text_for_each_device() -> None:
    sent: list[tuple[str, str]] = []

    async def send_message(username: str, text: str) -> bool:
        sent.append((username, text))
        return True

    journal = Journal()
    notifier = Notifier(
        [], send_message=send_message, retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery
    )
    notification = make_notification()
    notifier.notify(notification, recipients=[], devices=["desk-1", "desk-2"])
    await until(lambda: len(journal.deliveries) == 2)
    await notifier.close(1.0)
    assert sorted(sent) == [("desk-1", notification.to_text()), ("desk-2", notification.to_text())]
    assert journal.outcomes("desk-1") == [DeliveryOutcome.DELIVERED]


async def test_a_refused_or_failing_message_is_retried() -> None:
    answers: list[bool | Exception] = [False, ConnectionResetError("tls gone"), True]
    calls: list[str] = []

    async def send_message(username: str, text: str) -> bool:
        calls.append(username)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    journal = Journal()
    notifier = Notifier(
        [],
        send_message=send_message,
        retry_delays=TINY_DELAYS,
        on_delivery=journal.on_delivery,
        on_alarm=journal.on_alarm,
    )
    notifier.notify(make_notification(), recipients=[], devices=["desk-1"])
    await until(lambda: DeliveryOutcome.DELIVERED in journal.outcomes("desk-1"))
    await notifier.close(1.0)
    assert calls == ["desk-1"] * 3
    assert journal.outcomes("desk-1") == [
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.RETRYING,
        DeliveryOutcome.DELIVERED,
    ]
    assert "tls gone" in journal.deliveries[1][2]
    assert len(journal.alarms) == 1 and "MESSAGE not accepted" in journal.alarms[0][1]


async def test_devices_without_a_message_sender_raise_an_alarm() -> None:
    journal = Journal()
    notifier = Notifier([], retry_delays=(), on_alarm=journal.on_alarm)
    notifier.notify(make_notification(), recipients=[], devices=["desk-1"])
    await until(lambda: journal.alarms != [])
    await notifier.close(1.0)
    assert "no SIP MESSAGE sender" in journal.alarms[0][1]


# -- admin alerts --------------------------------------------------------------------------


async def test_alert_admins_posts_and_logs() -> None:
    sink = await WebhookSink().start()
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=TINY_DELAYS, on_delivery=journal.on_delivery, admin_webhooks=[sink.url()]
    )
    try:
        with capture_logs() as logs:
            notifier.alert_admins(
                "location_unverified", "DEV-9 has no verified location", device="dev-9", site="lyon"
            )
        await until(lambda: journal.outcomes(sink.url()) == [DeliveryOutcome.DELIVERED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert sink.requests[0].json() == {
        "alert": "location_unverified",
        "text": "DEV-9 has no verified location",
        "device": "dev-9",
        "site": "lyon",
    }
    alerts = [entry for entry in logs if entry["event"] == "emergency.alert"]
    assert len(alerts) == 1
    assert alerts[0]["log_level"] == "warning"
    assert alerts[0]["kind"] == "location_unverified"


def test_alert_admins_logs_even_without_admin_webhooks_or_event_loop() -> None:
    with capture_logs() as logs:
        Notifier([]).alert_admins("journal_failure", "audit journal fsync failed", path="/x")
    assert [(e["event"], e["log_level"]) for e in logs] == [("emergency.alert", "warning")]


async def test_https_webhook_goes_through_tls_and_a_handshake_failure_is_a_failed_delivery() -> (
    None
):
    sink = await WebhookSink(hang=True).start()  # plain TCP: never completes a TLS handshake
    url = f"https://{LOOPBACK}:{sink.port}/hook"
    journal = Journal()
    notifier = Notifier(
        [], retry_delays=(), timeout=0.2, on_delivery=journal.on_delivery, on_alarm=journal.on_alarm
    )
    try:
        notifier.notify(make_notification(), recipients=[url])
        await until(lambda: journal.outcomes(url) == [DeliveryOutcome.FAILED])
    finally:
        await notifier.close(1.0)
        await sink.stop()
    assert sink.connections == 1
    assert len(journal.alarms) == 1 and "delivery failed after 1 attempt(s)" in journal.alarms[0][1]

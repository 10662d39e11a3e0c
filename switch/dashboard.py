"""The switch's built-in live dashboard, served by the admin listener (switch/admin.py).

For the operator who runs no Prometheus/Grafana: one self-contained web page (inline CSS
and JavaScript, hand-drawn SVG charts, no CDN, nothing fetched from elsewhere) that shows,
live, what the softswitch is doing — registered contacts (registrar bindings), calls in
progress, call attempts per second, the answer-seizure ratio (ASR), emergency calls and
how they ended, fair-use refusals by the limit that refused them, RTP packets relayed per
second and their loss, and health (SIP listening, emergency-calling readiness problems,
the shared fair-use store) — with the list of active calls (each with a hang-up button)
and the list of devices that have no dispatchable emergency location.

Routes (added with ``AdminServer.add_routes(register_dashboard)`` before ``start()``)
    ``GET /dashboard``
        The page. It holds no data, so it needs no token; it asks for an admin token once
        and keeps it in the tab's ``sessionStorage`` (gone when the tab closes).
    ``GET /api/v1/events``
        Server-sent events: one JSON snapshot per second (see `DashboardFeed.snapshot`),
        the first one with the last two minutes of chart history. ``?count=N`` ends the
        stream after N snapshots (for scripts: ``curl -N ...?count=1``).

Authentication
    A browser's ``EventSource`` cannot send an ``Authorization`` header, so this one route
    also takes the token as ``?token=`` (checked with ``AdminServer.authenticate``, the same
    constant-time comparison as the bearer header; a read token is enough). The admin
    listener writes no access log and logs paths without their query string, so the token
    is not written anywhere by the switch; the page is served with ``Referrer-Policy:
    no-referrer`` so the URL does not leak either. Everything else the page does goes
    through the ordinary JSON API with ``Authorization: Bearer``: hanging up a call is
    ``DELETE /api/v1/calls/{call_id}`` and needs a write token (with a read token the
    buttons are shown disabled). A stream whose token disappears in a configuration
    reload gets an ``event: revoked`` and ends.

Cost
    Snapshots are computed at most once per second whatever the number of viewers (they
    share one), at most `MAX_STREAMS` streams are served at once, the lists are capped,
    and the devices-without-location list is recomputed every few seconds only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from e911.audit import format_utc

from .admin import BEARER_REALM, TOKEN_KEY, ApiError

if TYPE_CHECKING:
    from prometheus_client import Counter

    from media.backend import MediaStats

    from .admin import AdminServer, AdminToken

log = structlog.get_logger("switch.dashboard")

PAGE_PATH = "/dashboard"
EVENTS_PATH = "/api/v1/events"
INTERVAL_S = 1.0  # one snapshot per second
RETRY_MS = 3000  # how long a browser waits before reconnecting a dropped stream
MAX_RATE_GAP_S = 5.0  # a rate over a longer gap is not shown
RATE_WINDOW_S = 60.0  # ASR and media loss are measured over the last minute
HISTORY_POINTS = 120  # chart points kept for a new viewer (two minutes)
MAX_STREAMS = 20  # concurrent event streams
MAX_CALLS_LISTED = 100
MAX_DEVICES_LISTED = 100
MAX_COUNT = 86_400
MEDIA_QUERY_LIMIT = 200  # active calls whose live RTP counters are read per snapshot
MEDIA_QUERY_TIMEOUT_S = 0.5  # for all of them together
STORE_TIMEOUT_S = 1.0
UNLOCATED_REFRESH_S = 5.0


@dataclass(slots=True)
class _Sample:
    """Cumulative counters at one instant (monotonic seconds), for rates over time."""

    at: float
    attempted: float
    answered: float
    media_packets: float
    media_lost: float


def _counter_by(counter: Counter, label: str) -> dict[str, float]:
    """A labelled counter's current totals, by the value of ``label``."""
    totals: dict[str, float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else format_utc(timestamp)


def _call_item(call: Any, now: float) -> dict[str, Any]:
    caller = call.caller
    callee = call.callee
    since = call.answered_at or call.started_at
    return {
        "call_id": call.call_id,
        "state": getattr(call.state, "value", str(call.state)),
        "caller": (caller.extension if caller is not None
                   else (call.caller_number or "anonymous")),
        "callee": callee.extension if callee is not None else call.callee_dialled,
        "classification": call.classification,
        "trunk": getattr(call.trunk, "id", None),
        "emergency": call.emergency is not None,
        "started": _iso(call.started_at),
        "answered": _iso(call.answered_at),
        "duration_seconds": max(0, int(now - since)),
    }


class DashboardFeed:
    """What the dashboard shows, read from the switch: metrics, the call control, the
    binding store, emergency locations and readiness. One per admin listener."""

    def __init__(self, server: AdminServer, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.clock = clock
        self.wall_clock = wall_clock
        self.closing = asyncio.Event()
        self.streams = 0
        self._samples: deque[_Sample] = deque()
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._last: dict[str, Any] | None = None
        self._last_at = float("-inf")
        self._lock = asyncio.Lock()
        self._unlocated: dict[str, Any] = {"total": 0, "items": []}
        self._unlocated_at = float("-inf")
        self._unlocated_settings: object = None
        self._media_seen = (0.0, 0.0)

    @property
    def switch(self) -> Any:
        return self.server.switch

    # -- the snapshot ---------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        """The dashboard's numbers now (shared: recomputed at most once per interval).

        Keys: ``time``, ``node``, ``uptime_seconds``; ``registrations`` {active};
        ``calls`` {active, attempted, answered, per_second (null on a first reading),
        asr (0..1 or null), asr_window ("last_minute", "since_start" or null)};
        ``emergency`` {active, classified, outcomes {answered, failed, cancelled, ...}};
        ``fair_use`` {refusals {limit: n}, refusals_total, leases, store_degraded};
        ``media`` {packets_per_second, lost_per_second (null on a first reading),
        loss_ratio (last minute, 0..1 or null), packets_total};
        ``health`` (the /healthz/ready fields); ``active_calls`` {total, items};
        ``devices_without_location`` {total, items}."""
        async with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last_at < INTERVAL_S * 0.9:
                return self._last
            snapshot = await self._compute(now)
            self._last, self._last_at = snapshot, now
            return snapshot

    def history(self) -> list[dict[str, Any]]:
        """The chart points of the last snapshots (oldest first)."""
        return list(self._history)

    async def _compute(self, now: float) -> dict[str, Any]:
        switch = self.switch
        metrics = switch.metrics
        wall = self.wall_clock()
        attempted = metrics.value("softswitch_calls_attempted_total")
        answered = metrics.value("softswitch_calls_answered_total")
        packets, lost = await self._media_totals()
        sample = _Sample(now, attempted, answered, packets, lost)
        previous = self._samples[-1] if self._samples else None
        self._samples.append(sample)
        while self._samples and self._samples[0].at < now - RATE_WINDOW_S:
            self._samples.popleft()
        oldest = self._samples[0]

        def rate(field: str) -> float | None:
            """Per second since the previous reading; None without a recent one (the
            first viewer after a quiet spell)."""
            if previous is None or not 0 < sample.at - previous.at <= MAX_RATE_GAP_S:
                return None
            delta = getattr(sample, field) - getattr(previous, field)
            return round(max(0.0, delta) / (sample.at - previous.at), 2)

        window_attempts = attempted - oldest.attempted
        if window_attempts > 0:
            asr: float | None = (answered - oldest.answered) / window_attempts
            asr_window: str | None = "last_minute"
        elif attempted > 0:
            asr, asr_window = answered / attempted, "since_start"
        else:
            asr, asr_window = None, None
        if asr is not None:
            asr = round(min(1.0, max(0.0, asr)), 4)
        window_packets = max(0.0, packets - oldest.media_packets)
        window_lost = max(0.0, lost - oldest.media_lost)
        loss_ratio = (round(window_lost / (window_packets + window_lost), 4)
                      if window_packets + window_lost > 0 else None)

        calls = sorted(switch.calls.calls.values(), key=lambda c: (c.started_at, c.call_id))
        refusals = {limit: int(n) for limit, n in
                    sorted(_counter_by(metrics.fairuse_refusals, "limit").items())}
        outcomes = {"answered": 0, "failed": 0, "cancelled": 0}
        for outcome, n in _counter_by(metrics.emergency_outcomes, "outcome").items():
            outcomes[outcome] = int(n)
        classified = sum(_counter_by(metrics.emergency_calls, "number_class").values())
        health = self.server.readiness()
        snapshot = {
            "time": format_utc(wall),
            "node": switch.settings.switch.node_id,
            "uptime_seconds": round(wall - self.server.started_at, 1),
            "registrations": {"active": await self._registrations(wall)},
            "calls": {
                "active": len(calls),
                "attempted": int(attempted),
                "answered": int(answered),
                "per_second": rate("attempted"),
                "asr": asr,
                "asr_window": asr_window,
            },
            "emergency": {
                "active": sum(1 for call in calls if call.emergency is not None),
                "classified": int(classified),
                "outcomes": outcomes,
            },
            "fair_use": {
                "refusals": refusals,
                "refusals_total": sum(refusals.values()),
                "leases": int(metrics.value("softswitch_fairuse_leases")),
                "store_degraded": bool(health.get("fair_use_store_degraded")),
            },
            "media": {
                "packets_per_second": rate("media_packets"),
                "lost_per_second": rate("media_lost"),
                "loss_ratio": loss_ratio,
                "packets_total": int(packets),
            },
            "health": health,
            "active_calls": {"total": len(calls),
                             "items": [_call_item(call, wall)
                                       for call in calls[:MAX_CALLS_LISTED]]},
            "devices_without_location": self._devices_without_location(now),
        }
        self._history.append({
            "time": snapshot["time"],
            "registrations": snapshot["registrations"]["active"],
            "calls_active": len(calls),
            "calls_per_second": snapshot["calls"]["per_second"],
            "media_packets_per_second": snapshot["media"]["packets_per_second"],
        })
        return snapshot

    async def _registrations(self, wall: float) -> int:
        """Live bindings from the store (the gauge lags up to the sweep interval)."""
        try:
            return int(await asyncio.wait_for(self.switch.store.count(wall), STORE_TIMEOUT_S))
        except OSError as exc:  # TimeoutError and ConnectionError included
            log.debug("dashboard.store_unavailable", error=str(exc))
        except Exception as exc:  # a store outage must not end the stream
            log.debug("dashboard.store_failed", error=repr(exc))
        return int(self.switch.metrics.value("softswitch_registrar_bindings_active"))

    async def _media_totals(self) -> tuple[float, float]:
        """RTP packets relayed and lost so far: the ended calls' counters plus what the
        media backend counts for the calls in progress. Never lower than the last reading
        (a call leaves the active list a moment before its counters reach the metrics; a
        backend query may time out), so rates do not jump when a call ends."""
        metrics = self.switch.metrics
        packets = sum(_counter_by(metrics.media_packets, "direction").values())
        lost = sum(_counter_by(metrics.media_lost_packets, "direction").values())
        backend = self.switch.media
        if backend is not None:
            active = [c.call_id for c in list(self.switch.calls.calls.values()) if c.media]

            async def query(call_id: str) -> MediaStats | None:
                try:
                    return await backend.query(call_id)
                except Exception as exc:  # a call ending meanwhile, an rtpengine error
                    log.debug("dashboard.media_query_failed", call_id=call_id,
                              error=repr(exc))
                    return None

            try:
                results = await asyncio.wait_for(
                    asyncio.gather(*(query(c) for c in active[:MEDIA_QUERY_LIMIT])),
                    MEDIA_QUERY_TIMEOUT_S)
            except TimeoutError:
                log.debug("dashboard.media_query_timeout", calls=len(active))
                results = []
            for stats in results:
                if stats is not None:
                    packets += stats.a_to_b.packets + stats.b_to_a.packets
                    lost += stats.a_to_b.lost + stats.b_to_a.lost
        self._media_seen = (max(packets, self._media_seen[0]), max(lost, self._media_seen[1]))
        return self._media_seen

    def _devices_without_location(self, now: float) -> dict[str, Any]:
        settings = self.switch.settings
        if (now - self._unlocated_at < UNLOCATED_REFRESH_S
                and self._unlocated_settings is settings):
            return self._unlocated
        locations = self.switch.emergency.locations
        items = []
        total = 0
        for _, device in settings.iter_devices():
            username = device.username or device.extension
            if locations.has_location(username):
                continue
            total += 1
            if len(items) < MAX_DEVICES_LISTED:
                items.append({"username": username, "extension": device.extension,
                              "site": device.site, "mobility": device.mobility})
        self._unlocated = {"total": total, "items": items}
        self._unlocated_at, self._unlocated_settings = now, settings
        return self._unlocated

    # -- HTTP handlers --------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        response = web.Response(text=PAGE_HTML.replace("__NONCE__", nonce),
                                content_type="text/html", charset="utf-8")
        response.headers.update({
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
                " connect-src 'self'; img-src 'self' data:; base-uri 'none';"
                " form-action 'none'; frame-ancestors 'none'"),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        })
        return response

    def _token_of(self, request: web.Request) -> tuple[AdminToken | None, str]:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        text = value.strip() if scheme.lower() == "bearer" else request.query.get("token", "")
        return self.server.authenticate(text), text

    async def events(self, request: web.Request) -> web.StreamResponse:
        token, text = self._token_of(request)
        if token is None:
            given = "Authorization" in request.headers or "token" in request.query
            raise ApiError(401, "the token is not valid" if given else
                           "a token is required (Authorization: Bearer, or ?token=)",
                           headers={"WWW-Authenticate": BEARER_REALM})
        count_text = request.query.get("count")
        count = 0
        if count_text is not None:
            try:
                count = int(count_text)
            except ValueError:
                raise ApiError(400, f"count must be an integer, not {count_text!r}") from None
            if not 1 <= count <= MAX_COUNT:
                raise ApiError(400, f"count must be between 1 and {MAX_COUNT}")
        request[TOKEN_KEY] = token  # the admin listener logs who asked
        if self.streams >= MAX_STREAMS:
            raise ApiError(503, f"already {MAX_STREAMS} dashboard streams open")
        self.streams += 1
        try:
            return await self._stream(request, token, text, count)
        finally:
            self.streams -= 1

    async def _stream(self, request: web.Request, token: AdminToken, text: str,
                      count: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a reverse proxy must not hold the events back
        })
        await response.prepare(request)
        log.info("dashboard.stream_opened", token=token.name)
        sent = 0
        try:
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            while not self.closing.is_set():
                current = self.server.authenticate(text)  # a reload may have revoked it
                if current is None:
                    await response.write(b'event: revoked\ndata: {}\n\n')
                    break
                snapshot = dict(await self.snapshot())
                snapshot["viewer"] = {"token": current.name, "role": current.role}
                if sent == 0:
                    snapshot["history"] = self.history()[:-1]
                data = json.dumps(snapshot, separators=(",", ":"), default=str)
                await response.write(f"data: {data}\n\n".encode())
                sent += 1
                if count and sent >= count:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), INTERVAL_S)
        except ConnectionError:  # the viewer went away
            pass
        except Exception:  # a bug: end this stream (the response is already under way)
            log.exception("dashboard.stream_failed", token=token.name)
        log.info("dashboard.stream_closed", token=token.name, snapshots=sent)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def close(self, app: web.Application | None = None) -> None:
        """End the event streams (the admin listener is stopping)."""
        self.closing.set()


def register_dashboard(app: web.Application, server: AdminServer) -> None:
    """Add the dashboard's routes to the admin listener's application (the ``register``
    callable of ``AdminServer.add_routes``)."""
    feed = DashboardFeed(server)
    app.router.add_get(PAGE_PATH, feed.page)
    app.router.add_get(EVENTS_PATH, feed.events)
    app.on_shutdown.append(feed.close)


#: OpenAPI path items of the dashboard's routes (``add_routes(..., openapi_paths=...)``).
DASHBOARD_OPENAPI_PATHS: dict[str, Any] = {
    PAGE_PATH: {"get": {
        "summary": "the live dashboard (an HTML page; it asks for a token itself)",
        "operationId": "getDashboard", "security": [],
        "responses": {"200": {"description": "the page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    EVENTS_PATH: {"get": {
        "summary": "the dashboard's live numbers: a JSON snapshot per second, as"
                   " server-sent events",
        "operationId": "getDashboardEvents",
        "description": "The token may also be given as ?token= (EventSource cannot send"
                       " headers). The stream goes on until the client leaves, unless"
                       " count is given.",
        "parameters": [
            {"name": "token", "in": "query", "required": False,
             "schema": {"type": "string"}},
            {"name": "count", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT}},
        ],
        "responses": {
            "200": {"description": "the event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "503": {"description": "too many dashboard streams open",
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"}}}},
        }}},
}


PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>softswitch · live</title>
<link rel="icon" href="data:,">
<style nonce="__NONCE__">
:root { --bg:#0f1419; --panel:#171f28; --line:#27323d; --text:#e6edf3; --muted:#8b98a5;
  --ok:#3fb950; --warn:#d29922; --bad:#f85149; --accent:#58a6ff; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; align-items: center; gap: 12px; padding: 12px 20px;
  border-bottom: 1px solid var(--line); }
header h1 { margin: 0; font-size: 17px; font-weight: 600; }
header .spacer { flex: 1; }
.muted { color: var(--muted); }
.pill { padding: 2px 10px; border-radius: 10px; font-size: 12px; background: var(--line);
  color: var(--muted); }
.pill.live { background: #12361f; color: var(--ok); }
.pill.down { background: #3d1416; color: var(--bad); }
main { padding: 16px 20px; display: grid; gap: 16px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(175px, 1fr)); gap: 12px; }
.tile, .panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; }
.tile { min-height: 100px; }
.tile h2, .panel h2 { margin: 0 0 6px; font-size: 12px; font-weight: 500; color: var(--muted);
  text-transform: uppercase; letter-spacing: .04em; }
.value { font-size: 30px; font-weight: 600; font-variant-numeric: tabular-nums; }
.value.word { font-size: 24px; line-height: 45px; white-space: nowrap; }
.sub { color: var(--muted); font-size: 12px; margin-top: 4px; }
.ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.chart svg { display: block; width: 100%; height: 90px; }
.chart polyline { fill: none; stroke: var(--accent); stroke-width: 1.5;
  vector-effect: non-scaling-stroke; }
.chart polygon { fill: rgba(88, 166, 255, .15); stroke: none; }
.chart line { stroke: var(--line); stroke-width: 1; vector-effect: non-scaling-stroke; }
.chart .head { display: flex; justify-content: space-between; }
.lists { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); gap: 12px; }
@media (max-width: 900px) { .lists { grid-template-columns: 1fr; } }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 500; }
td.num { font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 0 6px; margin-left: 6px; border-radius: 4px;
  font-size: 11px; background: var(--bad); color: #fff; }
button { font: inherit; padding: 3px 10px; border-radius: 6px; border: 1px solid var(--line);
  background: #222c37; color: var(--text); cursor: pointer; }
button:disabled { opacity: .45; cursor: not-allowed; }
button.armed { background: var(--bad); border-color: var(--bad); color: #fff; }
.empty { color: var(--muted); padding: 8px 0 2px; }
#notice { min-height: 1.4em; }
#login { position: fixed; inset: 0; background: rgba(0, 0, 0, .65); display: flex;
  align-items: center; justify-content: center; }
#login[hidden] { display: none; }
#login form { background: var(--panel); border: 1px solid var(--line); border-radius: 10px;
  padding: 20px 24px; width: min(440px, 92vw); display: grid; gap: 10px; }
#login input { font: inherit; padding: 6px 8px; border-radius: 6px; border: 1px solid var(--line);
  background: var(--bg); color: var(--text); }
#login-error { color: var(--bad); min-height: 1.2em; }
</style>
</head>
<body>
<header>
  <h1>softswitch</h1><span class="muted" id="node"></span>
  <span class="pill" id="status">not connected</span>
  <span class="spacer"></span>
  <span class="muted" id="updated"></span>
  <span class="muted" id="viewer"></span>
  <button type="button" id="logout">Change token</button>
</header>
<main>
  <section class="tiles">
    <div class="tile" id="tile-registrations"><h2>Registrations</h2>
      <div class="value" id="registrations">—</div><div class="sub">active bindings</div></div>
    <div class="tile" id="tile-calls"><h2>Active calls</h2>
      <div class="value" id="calls-active">—</div><div class="sub" id="calls-active-sub"></div></div>
    <div class="tile" id="tile-cps"><h2>Calls per second</h2>
      <div class="value" id="cps">—</div><div class="sub" id="cps-sub"></div></div>
    <div class="tile" id="tile-asr"><h2>ASR</h2>
      <div class="value" id="asr">—</div><div class="sub" id="asr-sub"></div></div>
    <div class="tile" id="tile-emergency"><h2>Emergency calls</h2>
      <div class="value" id="emergency-active">—</div><div class="sub" id="emergency-sub"></div></div>
    <div class="tile" id="tile-fairuse"><h2>Fair-use refusals</h2>
      <div class="value" id="refusals">—</div><div class="sub" id="refusals-sub"></div></div>
    <div class="tile" id="tile-media"><h2>Media packets/s</h2>
      <div class="value" id="pps">—</div><div class="sub" id="media-sub"></div></div>
    <div class="tile" id="tile-health"><h2>Health</h2>
      <div class="value" id="health">—</div><div class="sub" id="health-sub"></div></div>
  </section>
  <section class="charts">
    <div class="panel chart"><div class="head"><h2>Active calls</h2>
      <span class="sub" id="chart-calls-max"></span></div>
      <svg id="chart-calls" viewBox="0 0 300 80" preserveAspectRatio="none">
        <line x1="0" y1="79" x2="300" y2="79"></line><polygon></polygon><polyline></polyline></svg></div>
    <div class="panel chart"><div class="head"><h2>Calls per second</h2>
      <span class="sub" id="chart-cps-max"></span></div>
      <svg id="chart-cps" viewBox="0 0 300 80" preserveAspectRatio="none">
        <line x1="0" y1="79" x2="300" y2="79"></line><polygon></polygon><polyline></polyline></svg></div>
    <div class="panel chart"><div class="head"><h2>Media packets per second</h2>
      <span class="sub" id="chart-pps-max"></span></div>
      <svg id="chart-pps" viewBox="0 0 300 80" preserveAspectRatio="none">
        <line x1="0" y1="79" x2="300" y2="79"></line><polygon></polygon><polyline></polyline></svg></div>
  </section>
  <div id="notice" class="muted"></div>
  <section class="lists">
    <div class="panel"><h2>Active calls <span id="calls-count"></span></h2>
      <table><thead><tr><th>Caller</th><th>Callee</th><th>Type</th><th>State</th>
        <th>Duration</th><th></th></tr></thead><tbody id="calls-body"></tbody></table>
      <div class="empty" id="calls-empty">no call in progress</div></div>
    <div class="panel"><h2>Devices without a location <span id="unlocated-count"></span></h2>
      <table><thead><tr><th>Device</th><th>Site</th><th>Mobility</th></tr></thead>
        <tbody id="unlocated-body"></tbody></table>
      <div class="empty" id="unlocated-empty">every device has a location</div></div>
  </section>
</main>
<div id="login" hidden>
  <form id="login-form" autocomplete="off">
    <h1>softswitch dashboard</h1>
    <label for="token">Admin token (a read token shows, a write token may also hang up)</label>
    <input id="token" type="password" spellcheck="false">
    <div id="login-error"></div>
    <button type="submit" id="login-submit">Connect</button>
  </form>
</div>
<script nonce="__NONCE__">
"use strict";
(() => {
  const KEY = "softswitch.dashboard.token";
  const POINTS = 60;
  const $ = (id) => document.getElementById(id);
  const series = { calls: [], cps: [], pps: [] };
  const rows = new Map();
  let source = null;
  let retry = null;
  let role = null;

  const token = () => sessionStorage.getItem(KEY);
  const setText = (id, value) => { const el = $(id); if (el.textContent !== value) el.textContent = value; };
  const int = (n) => (n === null || n === undefined) ? "—" : Math.round(n).toLocaleString("en");
  const rate = (x) => (x === null || x === undefined) ? "—" : (x >= 10 ? x.toFixed(0) : x.toFixed(1));
  const pct = (x) => (x === null || x === undefined) ? "—"
    : (x * 100).toFixed(Number.isInteger(x * 100) ? 0 : 1) + " %";
  const duration = (s) => {
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    return (h ? h + ":" + two(m) : String(m)) + ":" + two(r);
  };

  function setStatus(label, kind) {
    const el = $("status");
    el.textContent = label;
    el.className = "pill" + (kind ? " " + kind : "");
  }

  function notice(message, bad) {
    const el = $("notice");
    el.textContent = message;
    el.className = bad ? "bad" : "muted";
  }

  function stop() {
    if (source) { source.close(); source = null; }
    if (retry) { clearTimeout(retry); retry = null; }
  }

  function showLogin(message) {
    stop();
    setStatus("not connected", "");
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  async function checkToken(value) {
    const answer = await fetch("/api/v1/calls?limit=1", {
      headers: { Authorization: "Bearer " + value }, cache: "no-store" });
    return answer.status;
  }

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) { $("login-error").textContent = "enter a token"; return; }
    let status;
    try { status = await checkToken(value); }
    catch (error) { $("login-error").textContent = "the switch did not answer"; return; }
    if (status === 401) { $("login-error").textContent = "the switch does not know this token"; return; }
    if (status !== 200) { $("login-error").textContent = "unexpected answer: HTTP " + status; return; }
    sessionStorage.setItem(KEY, value);
    $("token").value = "";
    $("login").hidden = true;
    connect();
  });

  $("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });

  function connect() {
    stop();
    const value = token();
    if (!value) { showLogin(""); return; }
    setStatus("connecting", "");
    source = new EventSource("/api/v1/events?token=" + encodeURIComponent(value));
    source.onmessage = (event) => {
      let snapshot;
      try { snapshot = JSON.parse(event.data); } catch (error) { return; }
      render(snapshot);
      setStatus("live", "live");
    };
    source.addEventListener("revoked", () => {
      sessionStorage.removeItem(KEY);
      showLogin("the token is no longer valid");
    });
    source.onerror = () => {
      setStatus("reconnecting", "down");
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        retry = setTimeout(recheck, 3000);
      }
    };
  }

  async function recheck() {
    retry = null;
    const value = token();
    if (!value) { showLogin(""); return; }
    try {
      if (await checkToken(value) === 401) {
        sessionStorage.removeItem(KEY);
        showLogin("the token is no longer valid");
        return;
      }
    } catch (error) { /* the switch is down: try again */ }
    connect();
  }

  function push(list, value) {
    list.push(Number(value) || 0);
    while (list.length > POINTS) list.shift();
  }

  function drawChart(id, points) {
    const svg = $(id);
    const max = Math.max(1, ...points);
    const step = 300 / (POINTS - 1);
    const first = POINTS - points.length;
    const coords = points.map((v, i) =>
      ((first + i) * step).toFixed(1) + "," + (78 - (v / max) * 72).toFixed(1));
    svg.querySelector("polyline").setAttribute("points", coords.join(" "));
    svg.querySelector("polygon").setAttribute("points", coords.length < 2 ? "" :
      coords.join(" ") + " 300,79 " + (first * step).toFixed(1) + ",79");
    setText(id + "-max", "max " + rate(max));
  }

  function cell(row, value, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = value;
    row.appendChild(td);
    return td;
  }

  function resetButton(button) {
    button.classList.remove("armed");
    button.dataset.busy = "";
    button.textContent = "Hang up";
    button.disabled = role !== "write";
  }

  async function hangUp(button, callId) {
    if (role !== "write" || button.dataset.busy) return;
    if (!button.classList.contains("armed")) {
      button.classList.add("armed");
      button.textContent = "Confirm";
      clearTimeout(button.disarm);
      button.disarm = setTimeout(() => resetButton(button), 4000);
      return;
    }
    clearTimeout(button.disarm);
    button.dataset.busy = "1";
    button.disabled = true;
    button.textContent = "Hanging up…";
    let answer;
    try {
      answer = await fetch("/api/v1/calls/" + encodeURIComponent(callId), {
        method: "DELETE", headers: { Authorization: "Bearer " + token() } });
    } catch (error) {
      notice("hang-up failed: the switch did not answer", true);
      resetButton(button);
      return;
    }
    if (answer.status === 204) { notice("call " + callId + " hung up", false); return; }
    if (answer.status === 404) { notice("the call had already ended", false); return; }
    let reason = "";
    try { reason = (await answer.json()).error || ""; } catch (error) { /* not JSON */ }
    notice("hang-up refused (HTTP " + answer.status + "): " + reason, true);
    resetButton(button);
  }

  function callRow(call) {
    const row = document.createElement("tr");
    row.dataset.callId = call.call_id;
    row.cells_ = {
      caller: cell(row, ""), callee: cell(row, ""), type: cell(row, ""),
      state: cell(row, ""), duration: cell(row, "", "num"),
    };
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hangup";
    button.textContent = "Hang up";
    button.addEventListener("click", () => hangUp(button, call.call_id));
    td.appendChild(button);
    row.appendChild(td);
    row.button_ = button;
    return row;
  }

  function updateCallRow(row, call) {
    const c = row.cells_;
    c.caller.textContent = call.caller;
    c.callee.textContent = call.callee;
    c.type.textContent = call.classification + (call.trunk ? " via " + call.trunk : "");
    if (call.emergency) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "EMERGENCY";
      c.type.appendChild(badge);
    }
    c.state.textContent = call.state;
    c.duration.textContent = duration(call.duration_seconds);
    const button = row.button_;
    if (!button.dataset.busy) button.disabled = role !== "write";
    button.title = role === "write" ? "end this call on both legs"
      : "hanging up needs a write token";
  }

  function renderCalls(list) {
    const body = $("calls-body");
    const seen = new Set();
    for (const call of list.items) {
      seen.add(call.call_id);
      let row = rows.get(call.call_id);
      if (!row) { row = callRow(call); rows.set(call.call_id, row); }
      updateCallRow(row, call);
      body.appendChild(row);
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) { row.remove(); rows.delete(id); }
    }
    setText("calls-count", list.total > list.items.length
      ? "(" + list.items.length + " of " + list.total + ")" : "(" + list.total + ")");
    $("calls-empty").hidden = list.items.length > 0;
  }

  function renderUnlocated(list) {
    const body = $("unlocated-body");
    const key = JSON.stringify(list);
    if (body.dataset.key !== key) {
      body.dataset.key = key;
      body.replaceChildren();
      for (const device of list.items) {
        const row = document.createElement("tr");
        row.dataset.device = device.username;
        cell(row, device.extension === device.username ? device.username
          : device.username + " (" + device.extension + ")");
        cell(row, device.site || "—");
        cell(row, device.mobility);
        body.appendChild(row);
      }
    }
    setText("unlocated-count", "(" + list.total + ")");
    $("unlocated-empty").hidden = list.total > 0;
  }

  function render(s) {
    role = s.viewer ? s.viewer.role : null;
    setText("viewer", s.viewer ? "token " + s.viewer.token + " (" + s.viewer.role + ")" : "");
    setText("node", s.node ? "node " + s.node : "");
    setText("updated", "updated " + new Date(s.time).toLocaleTimeString("en-GB"));
    setText("registrations", int(s.registrations.active));
    setText("calls-active", int(s.calls.active));
    setText("calls-active-sub", int(s.calls.answered) + " answered of " +
      int(s.calls.attempted) + " since start");
    setText("cps", rate(s.calls.per_second));
    setText("cps-sub", "call attempts, last second");
    setText("asr", pct(s.calls.asr));
    setText("asr-sub", s.calls.asr_window === "last_minute" ? "answered / attempted, last minute"
      : s.calls.asr_window === "since_start" ? "answered / attempted, since start"
      : "no call attempted yet");
    const e = s.emergency;
    setText("emergency-active", int(e.active));
    setText("emergency-sub", "in progress · ended: " + Object.entries(e.outcomes)
      .map(([k, v]) => k + " " + v).join(", "));
    $("emergency-active").className = "value" + (e.active > 0 ? " bad" : "");
    const f = s.fair_use;
    setText("refusals", int(f.refusals_total));
    const reasons = Object.entries(f.refusals).filter(([, v]) => v > 0);
    setText("refusals-sub", (reasons.length ? reasons.map(([k, v]) => k + " " + v).join(", ")
      : "none") + " · leases " + int(f.leases));
    const m = s.media;
    setText("pps", rate(m.packets_per_second));
    setText("media-sub", "loss " + pct(m.loss_ratio) + " (last minute) · " +
      rate(m.lost_per_second) + " lost/s");
    const h = s.health;
    setText("health", h.ready ? "ready" : "not ready");
    $("health").className = "value word " + (h.ready ? "ok" : "bad");
    const problems = [];
    if (!h.sip_listening) problems.push("SIP not listening");
    if (h.emergency_problems) problems.push(h.emergency_problems + " emergency problem(s)");
    if (h.fair_use_store_degraded) problems.push("fair-use store degraded");
    setText("health-sub", problems.length ? problems.join(" · ") : "SIP listening · emergency ready");
    if (s.history) {
      series.calls = []; series.cps = []; series.pps = [];
      for (const point of s.history.slice(-(POINTS - 1))) {
        push(series.calls, point.calls_active);
        push(series.cps, point.calls_per_second);
        push(series.pps, point.media_packets_per_second);
      }
    }
    push(series.calls, s.calls.active);
    push(series.cps, s.calls.per_second);
    push(series.pps, m.packets_per_second);
    drawChart("chart-calls", series.calls);
    drawChart("chart-cps", series.cps);
    drawChart("chart-pps", series.pps);
    renderCalls(s.active_calls);
    renderUnlocated(s.devices_without_location);
  }

  if (token()) connect(); else showLogin("");
})();
</script>
</body>
</html>
"""

__all__ = [
    "DASHBOARD_OPENAPI_PATHS",
    "EVENTS_PATH",
    "PAGE_PATH",
    "DashboardFeed",
    "register_dashboard",
]

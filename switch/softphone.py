"""A minimal browser softphone served by the switch's admin listener (switch/admin.py).

One page, ``GET /phone``: a SIP user agent in the browser built on JsSIP (the npm package
``jssip``, bundled for the browser at install time, never copied into the repository) that
registers to the switch over SIP over WebSocket (RFC 7118: a ``ws``/``wss`` listen entry),
places and answers audio-only calls (WebRTC), hangs up, sends DTMF (SIP INFO,
``application/dtmf-relay``), shows incoming calls, and has an emergency button that dials
the site's emergency number and shows, while the call is up, the emergency location the
switch sends with it. After registering, the page shows the device's emergency location
and, when it is not verified (a nomadic device on an unmapped network: unconfirmed or
default, EM-24/EM-52), a notice with a site and location picker to confirm it; the
emergency button never waits for that confirmation.

Routes (added with ``AdminServer.add_routes(register_softphone,
openapi_paths=SOFTPHONE_OPENAPI_PATHS)`` before ``start()``)
    ``GET /phone``
        The page. It holds no data and needs no token. The server fills in the default
        WebSocket URL (the page's own host, the port and path of the switch's first
        ``ws``/``wss`` listener) and the emergency number (911 in NANP countries, 112
        elsewhere: both are emergency numbers in every country, EMERGENCY.md).
    ``GET /phone/jssip.js``
        JsSIP's browser bundle, read from ``node_modules/.softphone/jssip.min.js`` (built by
        ``make node_modules/.stamp``: ``npm install`` then ``npm run build:softphone``).
        503 with a message when it has not been built.
    ``POST /phone/location``
        The caller's own emergency location, for the page to show. Body ``{"username":
        ..., "password": ...}``: the device's SIP credentials, checked here against the
        device directory (the configured password or HA1), not through SIP and not with an
        admin token — a softphone user holds no admin token. Answers the same view as
        ``GET /api/v1/devices/{username}/location``, plus ``can_confirm`` and, for a
        nomadic device, ``choices``: the sites (id, country, one-line civic summary) and
        their named locations (id, summary) the user may confirm (see `location_choices`
        for which sites and why). A source address with `MAX_FAILURES` wrong passwords in
        `FAILURE_WINDOW_S` gets 429 until the window ends (password guessing here is as
        bounded as over SIP).
    ``POST /phone/location/confirm``
        A nomadic device's user confirms where they are (EM-52: on an unmapped network
        the location is unconfirmed until the user confirms one). Body: the same
        credentials plus ``site`` and ``location`` (a location id of that site; null only
        for a site without named locations). Calls ``LocationService.set_location(...,
        by=<username>)``, so the change is journaled with who made it, and answers the new
        view; the next emergency call carries that address with ``method`` Manual. 401 for
        wrong credentials (counted by the same limiter, 429 when locked out), 403 for a
        fixed device (its location is provisioned by the admin, EM-50), 409 when the
        device has no emergency location configuration, 400 for a site or location that is
        not among the device's choices. Confirming never gates an emergency call: the
        page's emergency button dials at once whatever the status (EM-24).

Security
    The page is served with a strict Content-Security-Policy (inline script and style only
    with the response's nonce, JsSIP from this listener only, no framing); ``connect-src``
    allows ``ws:``/``wss:`` because the user may point the phone at any WebSocket URL.
    Browsers allow microphone access only on a secure context: ``http://127.0.0.1`` or
    ``localhost``, or the admin listener behind a TLS proxy (with a ``wss`` listener).
    The location routes answer only the authenticated device's own location and the
    choices of sites and locations of its account: no other device's data.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from sip.digest import compute_ha1

from .admin import ApiError, _location_view

if TYPE_CHECKING:
    from .admin import AdminServer

log = structlog.get_logger("switch.softphone")

PAGE_PATH = "/phone"
LIBRARY_PATH = "/phone/jssip.js"
LOCATION_PATH = "/phone/location"
CONFIRM_PATH = "/phone/location/confirm"
REPOSITORY = Path(__file__).resolve().parents[1]
#: where `npm run build:softphone` writes JsSIP's browser bundle (see package.json)
JSSIP_BUNDLE = REPOSITORY / "node_modules" / ".softphone" / "jssip.min.js"
NANP_COUNTRIES = frozenset({"US", "CA", "PR", "GU", "VI", "AS", "MP"})
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
MAX_TRACKED_SOURCES = 10_000
MAX_CREDENTIAL_LENGTH = 256
MAX_ID_LENGTH = 256
MAX_BODY_BYTES = 4096


def emergency_number_for(country: str) -> str:
    """The number the emergency button dials: 911 in NANP countries, 112 elsewhere."""
    return "911" if country.upper() in NANP_COUNTRIES else "112"


def password_matches(credentials: Any, realm: str, password: str) -> bool:
    """Whether ``password`` is the device's SIP password (constant-time; HA1 when only a
    hashed credential is configured)."""
    given = password.encode("utf-8", "surrogatepass")
    if credentials.password is not None:
        return hmac.compare_digest(given, credentials.password.encode("utf-8"))
    for algorithm in ("MD5", "SHA-256"):
        stored = credentials.ha1(algorithm, realm)
        if stored:
            computed = compute_ha1(algorithm, credentials.username, realm, password)
            return hmac.compare_digest(computed.lower().encode(), stored.lower().encode())
    return False


class Softphone:
    """The softphone page's handlers, for one admin listener."""

    def __init__(self, server: AdminServer, *, bundle: Path = JSSIP_BUNDLE,
                 clock: Any = time.monotonic) -> None:
        self.server = server
        self.bundle = bundle
        self.clock = clock
        self._failures: dict[str, tuple[float, int]] = {}  # source -> (window start, count)

    @property
    def switch(self) -> Any:
        return self.server.switch

    def websocket_listener(self) -> dict[str, Any] | None:
        """Scheme, port and path of the switch's first ws/wss listener (None: none)."""
        switch = self.switch
        entries = list(getattr(switch.settings, "listen", []))
        bound = list(getattr(switch, "listening", []))
        for index, entry in enumerate(entries):
            if entry.transport not in ("ws", "wss"):
                continue
            port = bound[index][2] if index < len(bound) else entry.port
            return {"scheme": entry.transport, "port": int(port), "path": entry.path}
        return None

    def page_config(self) -> dict[str, Any]:
        settings = self.switch.settings
        domains = list(settings.switch.domains)
        return {
            "websocket": self.websocket_listener(),
            "domain": domains[0] if domains else "",
            "emergency_number": emergency_number_for(settings.dialplan.country),
            "location_path": LOCATION_PATH,
            "confirm_path": CONFIRM_PATH,
        }

    # -- HTTP handlers --------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        config = json.dumps(self.page_config()).replace("<", "\\u003c")
        text = PAGE_HTML.replace("__NONCE__", nonce).replace("__CONFIG__", config)
        response = web.Response(text=text, content_type="text/html", charset="utf-8")
        response.headers.update({
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'self' 'nonce-{nonce}';"
                f" style-src 'nonce-{nonce}'; connect-src 'self' ws: wss:;"
                " media-src 'self' blob: mediastream:; img-src 'self' data:;"
                " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Permissions-Policy": "microphone=(self), camera=()",
        })
        return response

    async def library(self, request: web.Request) -> web.Response:
        try:
            body = self.bundle.read_bytes()
        except OSError:
            raise ApiError(503, "the JsSIP browser bundle is not built: run `make"
                                " node_modules/.stamp` (npm install, npm run build:softphone)"
                           ) from None
        return web.Response(body=body, content_type="text/javascript", charset="utf-8",
                            headers={"Cache-Control": "public, max-age=3600",
                                     "X-Content-Type-Options": "nosniff"})

    def _throttled(self, source: str) -> bool:
        entry = self._failures.get(source)
        if entry is None:
            return False
        started, count = entry
        if self.clock() - started >= FAILURE_WINDOW_S:
            del self._failures[source]
            return False
        return count >= MAX_FAILURES

    def _failed(self, source: str) -> None:
        now = self.clock()
        if len(self._failures) >= MAX_TRACKED_SOURCES:
            self._failures = {k: v for k, v in self._failures.items()
                              if now - v[0] < FAILURE_WINDOW_S}
            if len(self._failures) >= MAX_TRACKED_SOURCES:
                self._failures.clear()
        started, count = self._failures.get(source, (now, 0))
        if now - started >= FAILURE_WINDOW_S:
            started, count = now, 0
        self._failures[source] = (started, count + 1)

    async def _authenticated(self, request: web.Request, fields: str
                             ) -> tuple[Any, dict[str, Any]]:
        """The device whose SIP credentials the JSON body carries, and the body. 429 while
        the source is locked out, 413/400 for a bad body (``fields`` names the expected
        members in the message), 401 for wrong credentials (counted)."""
        source = request.remote or "?"
        if self._throttled(source):
            raise ApiError(429, f"too many wrong passwords: wait {int(FAILURE_WINDOW_S)} s")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, "the body is too large")
        raw = await request.read()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "the body is too large")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, f"the body must be JSON: {fields}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object: {fields}")
        username, password = body.get("username"), body.get("password")
        if not (isinstance(username, str) and isinstance(password, str)
                and 0 < len(username) <= MAX_CREDENTIAL_LENGTH
                and len(password) <= MAX_CREDENTIAL_LENGTH):
            raise ApiError(400, "username and password must be strings"
                                f" (at most {MAX_CREDENTIAL_LENGTH} characters)")
        directory = self.switch.directory
        device = directory.device(username)
        if device is None or not password_matches(device.credentials, directory.realm,
                                                  password):
            self._failed(source)
            log.info("softphone.location_refused", source=source, path=request.path)
            raise ApiError(401, "wrong username or password")
        return device, body

    def location_view(self, device: Any) -> dict[str, Any]:
        """The device's own emergency location (the admin API's view), whether the user
        may confirm another one, and the choices to confirm from."""
        locations = self.switch.emergency.locations
        username = device.username
        resolved = locations.resolve(username)
        can_confirm = _can_confirm(locations, username)
        return {
            "username": username,
            "mobility": device.mobility,
            "has_location": locations.has_location(username),
            **_location_view(resolved),
            "can_confirm": can_confirm,
            "choices": location_choices(locations, username) if can_confirm else [],
        }

    async def location(self, request: web.Request) -> web.Response:
        device, _ = await self._authenticated(request, '{"username", "password"}')
        return _no_store_json(self.location_view(device))

    async def confirm(self, request: web.Request) -> web.Response:
        fields = '{"username", "password", "site", "location"}'
        device, body = await self._authenticated(request, fields)
        site_id, location_id = body.get("site"), body.get("location")
        if not (isinstance(site_id, str) and 0 < len(site_id) <= MAX_ID_LENGTH):
            raise ApiError(400, f"site must be a site id (text, at most {MAX_ID_LENGTH}"
                                " characters)")
        if not (location_id is None
                or (isinstance(location_id, str) and 0 < len(location_id) <= MAX_ID_LENGTH)):
            raise ApiError(400, "location must be a location id of the site (text), or null"
                                " for a site without named locations")
        username = device.username
        locations = self.switch.emergency.locations
        if device.mobility != "nomadic":
            raise ApiError(403, "this phone is a fixed device: its emergency location is"
                                " provisioned by the administrator and cannot be changed here")
        if username not in locations.devices:
            raise ApiError(409, f"device {username!r} has no emergency location"
                                " configuration (is emergency calling configured?)")
        choices = {choice["id"]: choice for choice in location_choices(locations, username)}
        choice = choices.get(site_id)
        if choice is None:
            raise ApiError(400, f"site {site_id!r} is not one you may confirm; choose one"
                                f" of: {', '.join(sorted(choices)) or '(none configured)'}")
        known = [entry["id"] for entry in choice["locations"]]
        if location_id is None and known:
            raise ApiError(400, f"site {site_id!r} has named locations: choose one of"
                                f" {', '.join(known)} (a floor or room is part of a"
                                " dispatchable location)")
        if location_id is not None and location_id not in known:
            raise ApiError(400, f"site {site_id!r} has no location {location_id!r}; choose"
                                f" one of: {', '.join(known) or '(none: send null)'}")
        try:
            await asyncio.to_thread(locations.set_location, username, site_id, location_id,
                                    by=username)
        except ValueError as exc:  # a reload removed it in the meantime
            raise ApiError(400, str(exc)) from None
        log.info("softphone.location_confirmed", username=username, site=site_id,
                 location=location_id, source=request.remote or "?")
        return _no_store_json(self.location_view(device))


def _no_store_json(view: dict[str, Any]) -> web.Response:
    return web.json_response(view, dumps=lambda v: json.dumps(v, default=str),
                             headers={"Cache-Control": "no-store"})


def _can_confirm(locations: Any, username: str) -> bool:
    device = locations.devices.get(username)
    return device is not None and device.mobility == "nomadic"


def location_choices(locations: Any, username: str) -> list[dict[str, Any]]:
    """The sites a nomadic device's user may confirm, each with its named locations:
    ``[{"id", "country", "summary", "locations": [{"id", "summary"}]}]``, sorted by id.

    The choices are the sites of the device's *account* (every site a device of that
    account is provisioned at), plus the site the device's location resolves to now
    (its mapped network's or the default site, whose address the device already sees),
    not every configured site. On a multi-tenant switch other accounts' sites are other
    customers' premises: listing them would disclose their addresses and floors to any
    softphone user, and confirming one would send the user's emergency calls with that
    site's callback number and emergency route (EM-26: the caller's site supplies both).
    A user who is at none of their organisation's sites cannot confirm one here: their
    call then goes out with the last confirmed or default address, flagged unverified
    (EM-24), and the admin can set a location (PUT /api/v1/devices/{username}/location).
    Only sites and their locations are listed, never devices."""
    device = locations.devices.get(username)
    if device is None:
        return []
    sites = locations.sites
    wanted = {other.site_id for other in locations.devices.values()
              if other.account_id == device.account_id and other.site_id is not None}
    if device.site_id is not None:
        wanted.add(device.site_id)
    current = locations.resolve(username).site_id
    if current is not None:
        wanted.add(current)
    choices = []
    for site_id in sorted(wanted):
        site = sites.get(site_id)
        if site is None:
            continue
        entries = []
        for location_id in sorted(site.locations):
            address = site.location_address(location_id)
            entries.append({"id": location_id,
                            "summary": "" if address is None else address.summary()})
        choices.append({"id": site.id, "country": site.country,
                        "summary": site.address.summary(), "locations": entries})
    return choices


def register_softphone(app: web.Application, server: AdminServer) -> None:
    """Add the softphone's routes to the admin listener's application (the ``register``
    callable of ``AdminServer.add_routes``)."""
    softphone = Softphone(server)
    app.router.add_get(PAGE_PATH, softphone.page)
    app.router.add_get(LIBRARY_PATH, softphone.library)
    app.router.add_post(LOCATION_PATH, softphone.location)
    app.router.add_post(CONFIRM_PATH, softphone.confirm)


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_CREDENTIALS_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["username", "password"],
    "properties": {"username": {"type": "string", "minLength": 1,
                                "maxLength": MAX_CREDENTIAL_LENGTH},
                   "password": {"type": "string", "maxLength": MAX_CREDENTIAL_LENGTH}}}
_LOCATION_VIEW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["username", "mobility", "has_location", "status", "summary", "can_confirm",
                 "choices"],
    "properties": {
        "username": {"type": "string"},
        "mobility": {"type": "string", "enum": ["fixed", "nomadic"]},
        "has_location": {"type": "boolean"},
        "status": {"type": "string", "enum": ["verified", "default", "unconfirmed"]},
        "site": {"type": ["string", "null"]},
        "location": {"type": ["string", "null"]},
        "verified": {"type": "boolean"},
        "method": {"type": "string"},
        "summary": {"type": "string"},
        "address": {"type": "object"},
        "note": {"type": "string"},
        "foreign_country": {"type": ["string", "null"]},
        "can_confirm": {"type": "boolean"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["id", "summary", "locations"],
            "properties": {
                "id": {"type": "string"}, "country": {"type": "string"},
                "summary": {"type": "string"},
                "locations": {"type": "array", "items": {
                    "type": "object", "required": ["id", "summary"],
                    "properties": {"id": {"type": "string"},
                                   "summary": {"type": "string"}}}}}}}}}


#: OpenAPI path items of the softphone's routes (``add_routes(..., openapi_paths=...)``).
SOFTPHONE_OPENAPI_PATHS: dict[str, Any] = {
    PAGE_PATH: {"get": {
        "summary": "the browser softphone (an HTML page; SIP over WebSocket with JsSIP)",
        "operationId": "getSoftphone", "security": [],
        "responses": {"200": {"description": "the page",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    LIBRARY_PATH: {"get": {
        "summary": "JsSIP's browser bundle, as installed by the build",
        "operationId": "getSoftphoneLibrary", "security": [],
        "responses": {
            "200": {"description": "the script",
                    "content": {"text/javascript": {"schema": {"type": "string"}}}},
            "503": {"description": "the bundle is not built (make node_modules/.stamp)"}}}},
    LOCATION_PATH: {"post": {
        "summary": "the calling device's own emergency location, after its SIP password",
        "operationId": "postSoftphoneLocation", "security": [],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": _CREDENTIALS_SCHEMA}}},
        "responses": {
            "200": {"description": "the location (as GET /api/v1/devices/{username}/location)"
                                   " with the choices the user may confirm",
                    "content": {"application/json": {"schema": _LOCATION_VIEW_SCHEMA}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": _error_response("wrong username or password"),
            "413": _error_response("the body is larger than 4 KiB"),
            "429": _error_response("too many wrong passwords from this source")}}},
    CONFIRM_PATH: {"post": {
        "summary": "a nomadic device's user confirms their emergency location",
        "operationId": "postSoftphoneLocationConfirm", "security": [],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            **_CREDENTIALS_SCHEMA,
            "required": ["username", "password", "site", "location"],
            "properties": {
                **_CREDENTIALS_SCHEMA["properties"],
                "site": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                "location": {"type": ["string", "null"], "minLength": 1,
                             "maxLength": MAX_ID_LENGTH}}}}}},
        "responses": {
            "200": {"description": "the new location (journaled as set by the user)",
                    "content": {"application/json": {"schema": _LOCATION_VIEW_SCHEMA}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": _error_response("wrong username or password"),
            "403": _error_response("a fixed device: its location is provisioned by the"
                                   " administrator"),
            "409": _error_response("the device has no emergency location configuration"),
            "413": _error_response("the body is larger than 4 KiB"),
            "429": _error_response("too many wrong passwords from this source")}}},
}


PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>softswitch · phone</title>
<link rel="icon" href="data:,">
<style nonce="__NONCE__">
body { font: 15px system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2430; }
main { max-width: 420px; margin: 1.5em auto; background: #fff; padding: 1.2em;
       border-radius: 10px; box-shadow: 0 1px 4px #0002; }
h1 { font-size: 1.2em; margin: 0 0 .8em; }
label { display: block; font-size: .85em; margin-top: .5em; color: #4a5568; }
input, select { width: 100%; box-sizing: border-box; padding: .45em; font-size: 1em;
                border: 1px solid #cbd2dc; border-radius: 6px; background: #fff; }
button { padding: .55em .9em; font-size: 1em; border: 0; border-radius: 6px;
         background: #2b6cb0; color: #fff; cursor: pointer; }
button:disabled { background: #a0aec0; cursor: default; }
.row { display: flex; gap: .5em; margin-top: .7em; flex-wrap: wrap; }
.pad { display: grid; grid-template-columns: repeat(3, 1fr); gap: .4em; margin-top: .7em; }
.pad button { background: #e2e8f0; color: #1d2430; font-size: 1.15em; }
#hangup { background: #c53030; }
#answer { background: #2f855a; }
#emergency { background: #9b2c2c; width: 100%; font-weight: bold; margin-top: .9em; }
#status { margin-top: .9em; padding: .5em; background: #edf2f7; border-radius: 6px; }
#incoming { margin-top: .7em; padding: .5em; background: #fefcbf; border-radius: 6px; }
#location { margin-top: .7em; padding: .5em; background: #fed7d7; border-radius: 6px;
            white-space: pre-line; }
#where { margin-top: .7em; padding: .5em; background: #edf2f7; border-radius: 6px; }
#where.notice { background: #fefcbf; }
#where.confirmed { background: #c6f6d5; }
#where-text, #where-error { white-space: pre-line; }
#where-error { color: #9b2c2c; margin-top: .3em; }
[hidden] { display: none !important; }
</style>
</head>
<body>
<main>
<h1>softswitch phone</h1>
<label for="ws">WebSocket URL</label><input id="ws" autocomplete="off">
<label for="ext">Extension</label><input id="ext" autocomplete="username">
<label for="password">Password</label>
<input id="password" type="password" autocomplete="current-password">
<div class="row"><button id="register">Register</button>
<button id="unregister" disabled>Unregister</button></div>
<label for="number">Number</label><input id="number" inputmode="tel" autocomplete="off">
<div class="pad" id="pad"></div>
<div class="row"><button id="call" disabled>Call</button>
<button id="answer" disabled>Answer</button>
<button id="hangup" disabled>Hang up</button></div>
<div id="incoming" hidden></div>
<div id="where" hidden>
<div id="where-text"></div>
<div id="where-picker" hidden>
<label for="where-site">Site</label><select id="where-site"></select>
<label for="where-location">Location</label><select id="where-location"></select>
<div class="row"><button id="where-confirm">Confirm my location</button></div>
</div>
<div id="where-error" hidden></div>
</div>
<button id="emergency" disabled>Emergency (112/911)</button>
<div id="location" hidden></div>
<div id="status">Not registered.</div>
<audio id="remote" autoplay></audio>
</main>
<script id="config" type="application/json">__CONFIG__</script>
<script src="/phone/jssip.js"></script>
<script nonce="__NONCE__">
"use strict";
(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const media = { audio: true, video: false };
  // what a test (or a curious user in the console) can observe
  const phone = window.softphone = { registered: false, sessions: [], events: [],
                                     session: null, state: "idle", location: null,
                                     where: null, emergency: false };
  let ua = null;

  function status(text) {
    $("status").textContent = text;
    phone.events.push(text);
  }
  function buttons() {
    const s = phone.session;
    const live = s !== null && !s.isEnded();
    $("register").disabled = ua !== null;
    $("unregister").disabled = ua === null;
    $("call").disabled = !phone.registered || live;
    $("emergency").disabled = !phone.registered || live;
    $("answer").disabled = !(live && s.direction === "incoming" && phone.state === "ringing");
    $("hangup").disabled = !live;
    // the address shown during an emergency call is the one sent with it: no change then
    $("where-confirm").disabled = !phone.registered || (live && phone.emergency);
  }
  if (config.websocket) {
    const w = config.websocket;
    const host = location.hostname.includes(":") ? "[" + location.hostname + "]"
                                                 : location.hostname;
    $("ws").value = w.scheme + "://" + host + ":" + w.port + w.path;
  }
  $("emergency").textContent = "Emergency (" + config.emergency_number + ")";
  for (const key of ["1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "0", "#"]) {
    const b = document.createElement("button");
    b.textContent = key;
    b.dataset.tone = key;
    b.addEventListener("click", () => pressed(key));
    $("pad").appendChild(b);
  }

  function pressed(key) {
    const s = phone.session;
    if (s !== null && s.isEstablished()) {
      s.sendDTMF(key, { transportType: "INFO", duration: 160 });  // SIP INFO (dtmf-relay)
      status("DTMF " + key + " sent.");
    } else {
      $("number").value += key;
    }
  }

  function register() {
    if (typeof JsSIP === "undefined") {
      status("The JsSIP library did not load (/phone/jssip.js): is it built?");
      return;
    }
    const ext = $("ext").value.trim();
    if (!/^[A-Za-z0-9._+-]+$/.test(ext)) { status("Enter your extension."); return; }
    const domain = config.domain || location.hostname;
    let socket;
    try {
      socket = new JsSIP.WebSocketInterface($("ws").value.trim());
    } catch (err) {
      status("Bad WebSocket URL: " + err.message);
      return;
    }
    ua = new JsSIP.UA({ sockets: [socket], uri: "sip:" + ext + "@" + domain,
                        password: $("password").value, register: true,
                        session_timers: false, user_agent: "softswitch-phone (JsSIP)" });
    ua.on("connecting", () => status("Connecting…"));
    ua.on("disconnected", () => { phone.registered = false; status("Disconnected."); buttons(); });
    ua.on("registered", () => {
      const fresh = !phone.registered;  // a first registration, or after a reconnection
      phone.registered = true;
      status("Registered as " + ext + ".");
      buttons();
      if (fresh) refreshWhere();  // the network may have changed: the location too
    });
    ua.on("unregistered", () => { phone.registered = false; status("Not registered.");
                                  buttons(); });
    ua.on("registrationFailed", (e) => { phone.registered = false;
      status("Registration failed: " + (e.cause || "?")); buttons(); });
    ua.on("newRTCSession", (e) => attach(e.session, e.originator));
    ua.start();
    buttons();
  }

  function unregister() {
    if (ua === null) return;
    const old = ua;
    ua = null;
    phone.registered = false;
    old.stop();  // un-REGISTERs, ends calls, closes the WebSocket
    phone.where = null;
    $("where").hidden = true;
    status("Not registered.");
    buttons();
  }

  function attach(session, originator) {
    if (phone.session !== null && !phone.session.isEnded()) {
      if (originator === "remote") session.terminate({ status_code: 486 });  // busy here
      return;
    }
    phone.session = session;
    phone.sessions.push({ originator: originator, direction: session.direction });
    phone.state = originator === "remote" ? "ringing" : "calling";
    const who = session.remote_identity ? session.remote_identity.uri.user : "?";
    if (originator === "remote") {
      $("incoming").textContent = "Incoming call from " + who;
      $("incoming").hidden = false;
      status("Ringing: call from " + who + ".");
    }
    session.on("peerconnection", (e) => watchAudio(e.peerconnection));
    if (session.connection) watchAudio(session.connection);
    session.on("progress", () => { if (originator === "local") status("Ringing…"); });
    session.on("accepted", () => { phone.state = "answered"; $("incoming").hidden = true;
                                   status("In call with " + who + "."); buttons(); });
    session.on("confirmed", () => { phone.state = "confirmed"; buttons(); });
    session.on("newInfo", (e) => { if (e.originator === "remote") status("INFO received."); });
    const end = (text) => (e) => {
      phone.state = "ended";
      $("incoming").hidden = true;
      $("location").hidden = true;
      phone.emergency = false;
      status(text + (e && e.cause ? " (" + e.cause + ")" : "") + ".");
      buttons();
    };
    session.on("ended", end("Call ended"));
    session.on("failed", end("Call failed"));
    buttons();
  }

  function watchAudio(pc) {
    pc.addEventListener("track", (e) => {
      if (e.streams && e.streams[0]) $("remote").srcObject = e.streams[0];
    });
  }

  function call(target) {
    if (ua === null || !phone.registered) { status("Register first."); return null; }
    if (!/^[0-9*#+]+$/.test(target)) { status("Enter a number to call."); return null; }
    status("Calling " + target + "…");
    return ua.call("sip:" + target + "@" + (config.domain || location.hostname),
                   { mediaConstraints: media, pcConfig: { iceServers: [] } });
  }

  // the caller's own location (and the choices to confirm): POST with the SIP credentials
  async function postLocation(path, extra) {
    const body = Object.assign({ username: $("ext").value.trim(),
                                 password: $("password").value }, extra || {});
    const reply = await fetch(path, {
      method: "POST", cache: "no-store", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    let data = {};
    try { data = await reply.json(); } catch (err) { data = {}; }
    if (!reply.ok) throw new Error(data.error || ("HTTP " + reply.status));
    return data;
  }

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = text;
    select.appendChild(o);
  }

  function fillLocations() {
    const data = phone.where;
    const select = $("where-location");
    select.replaceChildren();
    const site = (data && data.choices || []).find((c) => c.id === $("where-site").value);
    if (!site) return;
    if (site.locations.length === 0) option(select, "", "the site's address");
    for (const l of site.locations) option(select, l.id, l.id + " — " + l.summary);
    if (data.site === site.id && data.location) select.value = data.location;
  }

  // the location notice: the address emergency calls carry now and, when it is not
  // verified, a picker to confirm one (EM-52); never in the way of an emergency call
  function showWhere(data, confirmed) {
    phone.where = data;
    const box = $("where");
    const verified = data.status === "verified";
    const address = data.summary || "no address";
    box.className = confirmed ? "confirmed" : (verified ? "" : "notice");
    if (confirmed) {
      $("where-text").textContent = "Emergency location confirmed: " + address;
    } else if (verified) {
      $("where-text").textContent = "Emergency location: " + address;
    } else {
      $("where-text").textContent =
        "Your emergency location is not confirmed (" + data.status + "): emergency calls" +
        " now carry " + address + "." +
        (data.can_confirm ? "\nPick where you are and confirm it."
                          : "\nAsk your administrator to set this phone's location.");
    }
    const picker = !verified && data.can_confirm && data.choices.length > 0;
    $("where-picker").hidden = !picker;
    if (picker) {
      const sites = $("where-site");
      sites.replaceChildren();
      for (const c of data.choices) option(sites, c.id, c.id + " — " + c.summary);
      if (data.choices.some((c) => c.id === data.site)) sites.value = data.site;
      fillLocations();
    }
    $("where-error").hidden = true;
    box.hidden = false;
    buttons();
  }

  async function refreshWhere() {
    try {
      showWhere(await postLocation(config.location_path), false);
    } catch (err) {
      $("where-error").textContent = "Emergency location unavailable: " + err.message;
      $("where-error").hidden = false;
      $("where").hidden = false;
    }
  }

  async function confirmWhere() {
    const button = $("where-confirm");
    button.disabled = true;
    const chosen = $("where-location").value;
    try {
      const data = await postLocation(config.confirm_path, {
        site: $("where-site").value, location: chosen === "" ? null : chosen });
      showWhere(data, true);
      status("Emergency location confirmed.");
    } catch (err) {
      $("where-error").textContent = "Not confirmed: " + err.message;
      $("where-error").hidden = false;
    }
    buttons();
  }

  // during an emergency call: the address the switch sends with it (resolved now, as the
  // switch does for the INVITE; confirming is disabled until the call ends)
  async function showLocation() {
    const box = $("location");
    box.hidden = false;
    box.textContent = "Emergency call: the location sent with your call…";
    try {
      const data = await postLocation(config.location_path);
      phone.location = data;
      const flag = data.status === "verified" ? ""
        : "\n(not verified: " + data.status + (data.note ? "; " + data.note : "") + ")";
      box.textContent = "Emergency call: the location sent with your call\n" +
        (data.summary || "no location on record (" + data.status + ")") + flag;
    } catch (err) {
      box.textContent = "Emergency call: location unavailable (" + err.message + ")";
    }
  }

  $("register").addEventListener("click", register);
  $("unregister").addEventListener("click", unregister);
  $("call").addEventListener("click", () => call($("number").value.trim()));
  $("answer").addEventListener("click", () => {
    const s = phone.session;
    if (s !== null && phone.state === "ringing") {
      s.answer({ mediaConstraints: media, pcConfig: { iceServers: [] } });
      phone.state = "answering";
      buttons();
    }
  });
  $("hangup").addEventListener("click", () => {
    const s = phone.session;
    if (s !== null && !s.isEnded()) s.terminate();  // CANCEL, BYE or a 486 as due
  });
  $("where-site").addEventListener("change", fillLocations);
  $("where-confirm").addEventListener("click", confirmWhere);
  // dials at once whatever the location status: an emergency call is never delayed (EM-24)
  $("emergency").addEventListener("click", () => {
    if (call(config.emergency_number) !== null) {
      phone.emergency = true;
      buttons();
      showLocation();
    }
  });
  window.addEventListener("beforeunload", () => { if (ua !== null) ua.stop(); });
  buttons();
})();
</script>
</body>
</html>
"""

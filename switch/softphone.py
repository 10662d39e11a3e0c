"""A minimal browser softphone served by the switch's admin listener (switch/admin.py).

One page, ``GET /phone``: a SIP user agent in the browser built on JsSIP (the npm package
``jssip``, bundled for the browser at install time, never copied into the repository) that
registers to the switch over SIP over WebSocket (RFC 7118: a ``ws``/``wss`` listen entry),
places and answers audio-only calls (WebRTC), hangs up, sends DTMF (SIP INFO,
``application/dtmf-relay``), shows incoming calls, and has an emergency button that dials
the site's emergency number and shows the device's registered emergency location while
the call is up.

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
        ``GET /api/v1/devices/{username}/location``. A source address with
        `MAX_FAILURES` wrong passwords in `FAILURE_WINDOW_S` gets 429 until the window
        ends (password guessing here is as bounded as over SIP).

Security
    The page is served with a strict Content-Security-Policy (inline script and style only
    with the response's nonce, JsSIP from this listener only, no framing); ``connect-src``
    allows ``ws:``/``wss:`` because the user may point the phone at any WebSocket URL.
    Browsers allow microphone access only on a secure context: ``http://127.0.0.1`` or
    ``localhost``, or the admin listener behind a TLS proxy (with a ``wss`` listener).
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from sip.digest import compute_ha1

from .admin import ApiError

if TYPE_CHECKING:
    from .admin import AdminServer

log = structlog.get_logger("switch.softphone")

PAGE_PATH = "/phone"
LIBRARY_PATH = "/phone/jssip.js"
LOCATION_PATH = "/phone/location"
REPOSITORY = Path(__file__).resolve().parents[1]
#: where `npm run build:softphone` writes JsSIP's browser bundle (see package.json)
JSSIP_BUNDLE = REPOSITORY / "node_modules" / ".softphone" / "jssip.min.js"
NANP_COUNTRIES = frozenset({"US", "CA", "PR", "GU", "VI", "AS", "MP"})
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
MAX_TRACKED_SOURCES = 10_000
MAX_CREDENTIAL_LENGTH = 256


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

    async def location(self, request: web.Request) -> web.Response:
        source = request.remote or "?"
        if self._throttled(source):
            raise ApiError(429, f"too many wrong passwords: wait {int(FAILURE_WINDOW_S)} s")
        if request.content_length is not None and request.content_length > 4096:
            raise ApiError(413, "the body is too large")
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body must be JSON: {\"username\", \"password\"}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object: {\"username\", \"password\"}")
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
            log.info("softphone.location_refused", source=source)
            raise ApiError(401, "wrong username or password")
        locations = self.switch.emergency.locations
        resolved = locations.resolve(username)
        view = {
            "username": username,
            "mobility": device.mobility,
            "has_location": locations.has_location(username),
            "status": str(resolved.status),
            "site": resolved.site_id,
            "location": resolved.location_id,
            "verified": resolved.verified,
            "method": resolved.method,
            "summary": resolved.summary,
            "address": resolved.address.as_mapping(),
            "note": resolved.note,
        }
        return web.json_response(view, dumps=lambda v: json.dumps(v, default=str),
                                 headers={"Cache-Control": "no-store"})


def register_softphone(app: web.Application, server: AdminServer) -> None:
    """Add the softphone's routes to the admin listener's application (the ``register``
    callable of ``AdminServer.add_routes``)."""
    softphone = Softphone(server)
    app.router.add_get(PAGE_PATH, softphone.page)
    app.router.add_get(LIBRARY_PATH, softphone.library)
    app.router.add_post(LOCATION_PATH, softphone.location)


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
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["username", "password"],
            "properties": {"username": {"type": "string"},
                           "password": {"type": "string"}}}}}},
        "responses": {
            "200": {"description": "the location (as GET /api/v1/devices/{username}/location)",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"description": "wrong username or password"},
            "429": {"description": "too many wrong passwords from this source"}}}},
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
input { width: 100%; box-sizing: border-box; padding: .45em; font-size: 1em;
        border: 1px solid #cbd2dc; border-radius: 6px; }
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
                                     session: null, state: "idle", location: null };
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
    ua.on("registered", () => { phone.registered = true; status("Registered as " + ext + ".");
                                buttons(); });
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

  async function showLocation() {
    const box = $("location");
    box.hidden = false;
    box.textContent = "Emergency call: your registered location…";
    try {
      const reply = await fetch(config.location_path, {
        method: "POST", cache: "no-store", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("ext").value.trim(),
                               password: $("password").value }) });
      const data = await reply.json();
      if (!reply.ok) throw new Error(data.error || reply.status);
      phone.location = data;
      box.textContent = "Emergency call: your registered location\n" +
        (data.summary || "no location on record (" + data.status + ")") +
        (data.note ? "\n" + data.note : "");
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
  $("emergency").addEventListener("click", () => {
    if (call(config.emergency_number) !== null) showLocation();
  });
  window.addEventListener("beforeunload", () => { if (ua !== null) ua.stop(); });
  buttons();
})();
</script>
</body>
</html>
"""

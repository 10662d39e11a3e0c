"""The admin HTTP listener of the switch: the JSON admin API, `/metrics` and health checks.

Operators (and their tooling) reach the running switch here: the registrar's bindings,
the B2BUA's active calls (list, hang up), devices and their emergency locations (read,
set, history; EMERGENCY.md EM-50..EM-55), the emergency sites, readiness (EM-81), the
audit journal export (EM-70), emergency test calls (EM-80), fair-use usage per account and
runtime blacklist exceptions, configuration reload, availability (uptime and this month's
availability), a person's data (export, erasure by pseudonymisation: switch/privacy.py),
and Prometheus metrics.

Security
    Every route except ``/healthz/*`` and ``/openapi.json`` needs ``Authorization: Bearer
    <token>`` with a token of the ``admin.tokens`` list: role ``read`` for GET, role
    ``write`` for every change (401 without or with an unknown token, 403 for a read token
    on a write). ``/metrics`` needs a token unless ``admin.metrics_public``. The listener
    binds loopback unless ``admin.listen.host`` says otherwise. Tokens are compared in
    constant time and never logged.

Wiring (done by the switch)::

    self.admin = AdminServer(self, settings.admin)   # Softswitch.__init__
    await self.admin.start()                          # end of Softswitch.start
    await self.admin.stop()                           # start of Softswitch.stop
    self.admin.after_reload()                         # end of an applied Softswitch.reload

Extensions (the dashboard)
    ``AdminServer.add_routes(register, openapi_paths=...)`` before ``start()``: ``register
    (app, server)`` adds aiohttp routes, wrapping handlers with ``server.guard(role, h)`` to
    get the same bearer-token checks (``server.authenticate(text)`` checks a token taken
    from elsewhere, e.g. a cookie); ``openapi_paths`` are merged into ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from e911.audit import format_utc, parse_time
from e911.service import readiness_of
from fairuse.policy import AccountFairUse, BlacklistExceptions, FairUse
from fairuse.store import month_of

from .lifecycle import AvailabilityError
from .openapi import COUNTRY, E164_PREFIX, MONTH, SIP_USERNAME, openapi_document
from .privacy import PrivacyBusyError, PrivacyError, erase_running, export_running

if TYPE_CHECKING:
    from e911.locations import ResolvedLocation, Site

    from .app import Softswitch
    from .location import Binding

log = structlog.get_logger("switch.admin")

Role = Literal["read", "write"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteRegistrar = Callable[[web.Application, "AdminServer"], None]

MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_AUDIT_ENTRIES = 100_000
DEFAULT_AUDIT_ENTRIES = 10_000
MAX_BODY_BYTES = 64 * 1024
MIN_TOKEN_LENGTH = 16
BEARER_REALM = 'Bearer realm="softswitch-admin"'
# where a guarded request keeps the token that authorised it (handlers log its name)
TOKEN_KEY: Any = (web.RequestKey("admin_token", object) if hasattr(web, "RequestKey")
                  else "admin_token")
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN_TEXT = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what fits an HTTP header


# --------------------------------------------------------------------------------------
# The ``admin:`` section
# --------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class AdminListen(_Model):
    """Where the admin listener binds: loopback by default. Port 0 picks a free port."""

    host: str = Field(default="127.0.0.1", min_length=1, max_length=253)
    port: int = Field(default=8080, ge=0, le=65535)


class AdminToken(_Model):
    """One bearer token: who holds it (``name``, written in logs and location history)
    and what it may do (``read``: GET only; ``write``: everything)."""

    name: str
    token: SecretStr
    role: Role = "read"

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _TOKEN_NAME.match(value):
            raise ValueError("must start with a letter or digit and hold only letters,"
                             " digits, '_', '.', '-' (at most 64)")
        return value

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if len(text) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters"
                             " (e.g. the output of `openssl rand -hex 32`)")
        if not _TOKEN_TEXT.match(text):
            raise ValueError("must hold only visible ASCII characters (no spaces)")
        return value


class AdminSettings(_Model):
    """The ``admin:`` section: the admin HTTP listener (API, /metrics, dashboard)."""

    enabled: bool = False
    listen: AdminListen = Field(default_factory=AdminListen)
    tokens: list[AdminToken] = Field(default_factory=list, max_length=100)
    metrics_public: bool = False  # /metrics without a token (for a Prometheus scraper)

    @model_validator(mode="after")
    def _check_tokens(self) -> AdminSettings:
        names: set[str] = set()
        secrets: set[str] = set()
        for entry in self.tokens:
            if entry.name in names:
                raise ValueError(f"tokens: the name {entry.name!r} is used twice")
            names.add(entry.name)
            text = entry.token.get_secret_value()
            if text in secrets:
                raise ValueError(f"tokens: the token of {entry.name!r} is also another's")
            secrets.add(text)
        return self


# --------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------


class LocationUpdate(_Model):
    site: str = Field(min_length=1, max_length=200)
    location: str | None = Field(default=None, min_length=1, max_length=200)


class TestCallRequest(_Model):
    device: str = Field(pattern=SIP_USERNAME)
    service_urn: bool = False


class ExceptionsUpdate(_Model):
    countries: list[Annotated[str, Field(pattern=COUNTRY)]] = Field(
        default_factory=list, max_length=300)
    prefixes: list[Annotated[str, Field(pattern=E164_PREFIX)]] = Field(
        default_factory=list, max_length=1000)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as JSON ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, *, headers: Mapping[str, str] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, default=str))


def _error_response(status: int, message: str, headers: Mapping[str, str] | None = None
                    ) -> web.Response:
    response = _json({"error": message}, status)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else format_utc(timestamp)


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return value


def _page(request: web.Request) -> tuple[int, int]:
    return (_int_query(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE),
            _int_query(request, "offset", 0, 0, 10_000_000))


def _time_query(request: web.Request, name: str) -> str | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        return format_utc(parse_time(text))
    except (ValueError, OverflowError, OSError):
        raise ApiError(400, f"{name} must be an ISO-8601 date or date-time (UTC when no"
                            f" offset), e.g. 2026-01-31 or 2026-01-31T12:00:00Z") from None


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    if not request.can_read_body:
        raise ApiError(400, "a JSON body is required")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())) or "(body)"
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise ApiError(400, "; ".join(problems)) from None


def ipaddress_is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _binding_view(binding: Binding, now: float) -> dict[str, Any]:
    flow = binding.flow
    return {
        "aor": binding.aor,
        "contact": binding.contact,
        "expires": binding.expires_in(now),
        "expires_at": _iso(binding.expires_at),
        "source": f"{flow.transport}:{flow.remote_host}:{flow.remote_port}",
        "user_agent": binding.user_agent,
        "account": binding.account_id,
        "device": binding.device,
        "instance_id": binding.instance_id,
        "registered_at": _iso(binding.registered_at) if binding.registered_at else None,
    }


def _location_view(resolved: ResolvedLocation) -> dict[str, Any]:
    return {
        "status": str(resolved.status),
        "site": resolved.site_id,
        "location": resolved.location_id,
        "verified": resolved.verified,
        "method": resolved.method,
        "summary": resolved.summary,
        "address": resolved.address.as_mapping(),
        "note": resolved.note,
        "foreign_country": resolved.foreign_country,
    }


def _site_view(site: Site) -> dict[str, Any]:
    locations = []
    for location_id in sorted(site.locations):
        address = site.location_address(location_id)
        locations.append({"id": location_id,
                          "summary": address.summary() if address is not None else ""})
    return {
        "id": site.id,
        "country": site.country,
        "address": site.address.as_mapping(),
        "summary": site.address.summary(),
        "callback_number": site.callback_number,
        "routes": list(site.routes),
        "locations": locations,
        "networks": [{"subnet": str(n.subnet), "location": n.location_id,
                      "country": n.country} for n in site.networks],
        # recipients are counted, not shown: webhook URLs may carry credentials
        "notification_recipients": len(site.notification_recipients),
    }


def _call_view(call: Any) -> dict[str, Any]:
    caller = call.caller
    callee = call.callee
    return {
        "call_id": call.call_id,
        "state": getattr(call.state, "value", str(call.state)),
        "account": call.account_id,
        "caller": (caller.extension if caller is not None
                   else (call.caller_number or "anonymous")),
        "callee": callee.extension if callee is not None else call.callee_dialled,
        "dialled": call.callee_dialled,
        "classification": call.classification,
        "trunk": getattr(call.trunk, "id", None),
        "started": _iso(call.started_at),
        "answered": _iso(call.answered_at),
        "emergency": call.emergency is not None,
    }


def _exceptions_view(value: BlacklistExceptions | None) -> dict[str, list[str]]:
    if value is None:
        return {"countries": [], "prefixes": []}
    return {"countries": list(value.countries), "prefixes": list(value.prefixes)}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def with_blacklist_exceptions(base: FairUse, additions: Mapping[str, BlacklistExceptions]
                              ) -> FairUse:
    """``base`` (the configured ``fair_use`` section, left untouched) with ``additions``
    added to each account's blacklist exceptions; an account the YAML does not list gets
    an entry with only its exceptions (so the default plan still applies to it)."""
    if not additions:
        return base
    accounts = dict(base.accounts)
    for account_id, extra in additions.items():
        account = accounts.get(account_id) or AccountFairUse()
        configured = account.blacklist_exceptions
        merged = BlacklistExceptions(
            countries=_unique([*configured.countries, *extra.countries]),
            prefixes=_unique([*configured.prefixes, *extra.prefixes]),
        )
        accounts[account_id] = account.model_copy(update={"blacklist_exceptions": merged})
    effective = base.model_copy(update={"accounts": accounts})
    # model_copy shares the private policy cache with ``base``: give the copy its own
    effective._cache = {}
    return effective


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class AdminServer:
    """The admin HTTP listener of one switch (see the module docstring)."""

    def __init__(self, switch: Softswitch, settings: AdminSettings | None = None) -> None:
        self.switch = switch
        self.settings = settings if settings is not None else (
            getattr(switch.settings, "admin", None) or AdminSettings())
        self.started_at = time.time()
        self._registrars: list[RouteRegistrar] = []
        self._openapi_extra: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None
        self._address: tuple[str, int] | None = None
        self.app: web.Application | None = None
        #: blacklist exceptions added through the API, by account (kept in memory only)
        self.runtime_exceptions: dict[str, BlacklistExceptions] = {}
        self._readiness_cache: tuple[object, list[str]] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the listener is bound to; None when not started or disabled."""
        return self._address

    @property
    def started(self) -> bool:
        return self._runner is not None

    def add_routes(self, register: RouteRegistrar, *,
                   openapi_paths: Mapping[str, Any] | None = None) -> None:
        """Let an extension (the dashboard) add its routes; call before ``start()``."""
        if self._runner is not None:
            raise RuntimeError("add routes before the admin listener starts")
        self._registrars.append(register)
        self._openapi_extra.update(openapi_paths or {})

    async def start(self) -> None:
        """Bind and serve (nothing when ``admin.enabled`` is false). OSError when the
        address is taken."""
        if not self.settings.enabled or self._runner is not None:
            return
        self.app = self._build_app()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.listen.host, self.settings.listen.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses  # the bound sockets' names (port 0 resolved)
        if addresses:
            host, port = addresses[0][:2]
            self._address = (str(host), int(port))
        else:  # pragma: no cover - a started TCP site always has a socket
            self._address = (self.settings.listen.host, self.settings.listen.port)
        if not ipaddress_is_loopback(self._address[0]):
            log.warning("admin.listening_beyond_loopback", host=self._address[0],
                        detail="bearer tokens cross the network in clear text: put the"
                               " listener behind a TLS proxy or keep it on loopback")
        if not self.settings.tokens:
            log.warning("admin.no_tokens",
                        detail="no admin token configured: every API call is refused")
        log.info("admin.listening", host=self._address[0], port=self._address[1],
                 tokens=len(self.settings.tokens))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self._address = None
        if runner is not None:
            await runner.cleanup()
            log.info("admin.stopped")

    def apply(self, settings: AdminSettings) -> None:
        """A reloaded ``admin:`` section: tokens and metrics_public take effect at once
        (a changed listen address needs a restart)."""
        self.settings = settings

    def after_reload(self) -> None:
        """A reload was applied: the new ``admin:`` section (tokens) taken, the API's
        runtime blacklist exceptions put back on top of the new ``fair_use`` section."""
        admin = getattr(self.switch.settings, "admin", None)
        if isinstance(admin, AdminSettings):
            self.apply(admin)
        self.reapply_runtime_exceptions()

    def reapply_runtime_exceptions(self) -> None:
        """Re-apply the API's blacklist exceptions on top of the configured ``fair_use``
        section (after a reload replaced it)."""
        self.switch.fairuse.settings = with_blacklist_exceptions(
            self.switch.settings.fair_use, self.runtime_exceptions)

    # -- authentication -----------------------------------------------------------------
    def authenticate(self, text: str | None) -> AdminToken | None:
        """The configured token equal to ``text`` (constant-time compare), or None."""
        if not text:
            return None
        given = text.encode("utf-8", "surrogatepass")
        found = None
        for entry in self.settings.tokens:
            if hmac.compare_digest(given, entry.token.get_secret_value().encode()):
                found = entry
        return found

    def _bearer(self, request: web.Request) -> AdminToken | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.authenticate(value.strip())

    def guard(self, role: Role, handler: Handler) -> Handler:
        """``handler`` behind the bearer-token check for ``role``."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            token = self._bearer(request)
            if token is None:
                reason = ("a bearer token is required" if "Authorization" not in request.headers
                          else "the bearer token is not valid")
                raise ApiError(401, reason, headers={"WWW-Authenticate": BEARER_REALM})
            if role == "write" and token.role != "write":
                raise ApiError(403, f"token {token.name!r} may only read",
                               headers={"WWW-Authenticate":
                                        f'{BEARER_REALM}, error="insufficient_scope"'})
            request[TOKEN_KEY] = token
            return await handler(request)

        return guarded

    # -- the application -------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_get("/openapi.json", self._openapi)
        r.add_get("/healthz/live", self._live)
        r.add_get("/healthz/ready", self._ready)
        r.add_get("/metrics", self._metrics)
        read, write = (lambda h: self.guard("read", h)), (lambda h: self.guard("write", h))
        v1 = "/api/v1"
        r.add_get(f"{v1}/registrations", read(self._registrations))
        r.add_get(f"{v1}/registrations/{{username}}", read(self._registration))
        r.add_get(f"{v1}/calls", read(self._calls))
        r.add_delete(f"{v1}/calls/{{call_id}}", write(self._hangup))
        r.add_get(f"{v1}/devices", read(self._devices))
        r.add_get(f"{v1}/devices/{{username}}/location", read(self._location))
        r.add_put(f"{v1}/devices/{{username}}/location", write(self._set_location))
        r.add_get(f"{v1}/devices/{{username}}/location/history", read(self._history))
        r.add_get(f"{v1}/sites", read(self._sites))
        r.add_get(f"{v1}/emergency/readiness", read(self._readiness))
        r.add_get(f"{v1}/emergency/audit", read(self._audit))
        r.add_post(f"{v1}/emergency/test-calls", write(self._test_call))
        usage = f"{v1}/fair-use/accounts/{{account_id}}"
        r.add_get(f"{usage}/usage", read(self._usage))
        r.add_get(f"{usage}/blacklist-exceptions", read(self._exceptions))
        r.add_put(f"{usage}/blacklist-exceptions", write(self._set_exceptions))
        r.add_delete(f"{usage}/blacklist-exceptions", write(self._clear_exceptions))
        r.add_post(f"{v1}/reload", write(self._reload))
        r.add_get(f"{v1}/availability", read(self._availability))
        r.add_get(f"{v1}/privacy/{{person}}", read(self._privacy_export))
        r.add_post(f"{v1}/privacy/{{person}}/erase", write(self._privacy_erase))
        for register in self._registrars:
            register(app, self)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {name: value for name, value in exc.headers.items()
                       if name.lower() in ("allow", "www-authenticate")}
            response = _error_response(exc.status, exc.reason, headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("admin.request_failed", method=request.method, path=request.path)
            response = _error_response(500, f"internal error: {type(exc).__name__}")
        token = request.get(TOKEN_KEY)
        event = log.info if request.method not in ("GET", "HEAD") else log.debug
        event("admin.request", method=request.method, path=request.path,
              status=response.status, token=token.name if token else None)
        return response

    # -- open routes ----------------------------------------------------------------------
    async def _openapi(self, request: web.Request) -> web.Response:
        document = openapi_document(metrics_public=self.settings.metrics_public)
        document["paths"].update(self._openapi_extra)
        return _json(document)

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "uptime_seconds": round(time.time() - self.started_at, 3)})

    def emergency_problems(self) -> list[str]:
        """The emergency readiness problems of the configuration in force (computed once
        per configuration: health probes come every few seconds)."""
        settings = self.switch.settings
        if self._readiness_cache is None or self._readiness_cache[0] is not settings:
            self._readiness_cache = (settings, readiness_of(settings))
        return list(self._readiness_cache[1])

    def readiness(self) -> dict[str, Any]:
        """What /healthz/ready reports: SIP listening, emergency readiness, the fair-use
        store. Counts only: the problems themselves are at /api/v1/emergency/readiness."""
        switch = self.switch
        problems = self.emergency_problems()
        degraded = bool(getattr(switch.fairuse.store, "degraded", False))
        listening = bool(switch.listening)
        ready = listening and not problems and not degraded
        return {
            "ready": ready,
            "sip_listening": listening,
            "emergency_problems": len(problems),
            "fair_use_store_degraded": degraded,
        }

    async def _ready(self, request: web.Request) -> web.Response:
        state = self.readiness()
        return _json(state, 200 if state["ready"] else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if not self.settings.metrics_public:
            return await self.guard("read", self._metrics_text)(request)
        return await self._metrics_text(request)

    async def _metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.switch.metrics.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    # -- registrations --------------------------------------------------------------------
    def _configured_usernames(self) -> list[str]:
        return [device.username or device.extension
                for _, device in self.switch.settings.iter_devices()]

    async def _registrations(self, request: web.Request) -> web.Response:
        limit, offset = _page(request)
        now = time.time()
        bindings = [binding async for binding in self.switch.store.iter_bindings(now)]
        bindings.sort(key=lambda b: (b.aor, b.contact))
        page = bindings[offset:offset + limit]
        return _json({"total": len(bindings), "limit": limit, "offset": offset,
                      "items": [_binding_view(b, now) for b in page]})

    def _device_or_404(self, username: str) -> Any:
        device = self.switch.directory.device(username)
        if device is None:
            raise ApiError(404, f"no device {username!r}")
        return device

    async def _registration(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        self._device_or_404(username)
        aor = self.switch.directory.aor(username)
        now = time.time()
        bindings = await self.switch.store.lookup(aor, now)
        return _json({"username": username, "aor": aor,
                      "bindings": [_binding_view(b, now) for b in bindings]})

    # -- calls ----------------------------------------------------------------------------
    async def _calls(self, request: web.Request) -> web.Response:
        limit, offset = _page(request)
        calls = sorted(self.switch.calls.calls.values(), key=lambda c: (c.started_at, c.call_id))
        page = calls[offset:offset + limit]
        return _json({"total": len(calls), "limit": limit, "offset": offset,
                      "items": [_call_view(call) for call in page]})

    async def _hangup(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        if not self.switch.calls.hangup(call_id, cause="admin"):
            raise ApiError(404, f"no active call {call_id!r}")
        log.info("admin.call_hung_up", call_id=call_id, token=request[TOKEN_KEY].name)
        return web.Response(status=204)

    # -- devices and locations ----------------------------------------------------------
    def _device_view(self, username: str) -> dict[str, Any] | None:
        device = self.switch.directory.device(username)
        if device is None:
            return None
        locations = self.switch.emergency.locations
        return {
            "username": username,
            "extension": device.extension,
            "account": device.account_id,
            "kind": device.kind,
            "site": device.site,
            "location": device.location,
            "mobility": device.mobility,
            "has_location": locations.has_location(username),
            "location_status": _location_view(locations.resolve(username)),
        }

    async def _devices(self, request: web.Request) -> web.Response:
        limit, offset = _page(request)
        usernames = self._configured_usernames()
        views = [self._device_view(u) for u in usernames[offset:offset + limit]]
        return _json({"total": len(usernames), "limit": limit, "offset": offset,
                      "items": [view for view in views if view is not None]})

    def _location_of(self, username: str) -> dict[str, Any]:
        device = self._device_or_404(username)
        locations = self.switch.emergency.locations
        return {"username": username, "mobility": device.mobility,
                "has_location": locations.has_location(username),
                **_location_view(locations.resolve(username))}

    async def _location(self, request: web.Request) -> web.Response:
        return _json(self._location_of(request.match_info["username"]))

    async def _set_location(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        self._device_or_404(username)
        update: LocationUpdate = await _body(request, LocationUpdate)
        token: AdminToken = request[TOKEN_KEY]
        locations = self.switch.emergency.locations
        if username not in locations.devices:
            raise ApiError(409, f"device {username!r} has no emergency location"
                                " configuration (is emergency calling configured?)")
        try:
            await asyncio.to_thread(locations.set_location, username, update.site,
                                    update.location, by=f"admin:{token.name}")
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        log.info("admin.location_set", username=username, site=update.site,
                 location=update.location, token=token.name)
        return _json(self._location_of(username))

    async def _history(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        self._device_or_404(username)
        entries = await asyncio.to_thread(self.switch.emergency.locations.history, username)
        return _json({"username": username, "entries": entries})

    async def _sites(self, request: web.Request) -> web.Response:
        sites = self.switch.emergency.locations.sites
        return _json({"default_site": self.switch.emergency.locations.default_site_id,
                      "sites": [_site_view(sites[key]) for key in sorted(sites)]})

    # -- emergency ------------------------------------------------------------------------
    async def _readiness(self, request: web.Request) -> web.Response:
        problems = self.emergency_problems()
        locations = self.switch.emergency.locations
        unlocated = [u for u in self._configured_usernames() if not locations.has_location(u)]
        return _json({"ready": not problems, "problems": problems,
                      "devices_without_location": unlocated})

    async def _audit(self, request: web.Request) -> web.StreamResponse:
        unknown = sorted(set(request.query) - {"from", "until", "call_id", "limit", "format"})
        if unknown:
            raise ApiError(400, f"unknown query parameter {unknown[0]!r}"
                                " (from, until, call_id, limit, format)")
        start = _time_query(request, "from")
        until = _time_query(request, "until")
        call_id = request.query.get("call_id") or None
        limit = _int_query(request, "limit", DEFAULT_AUDIT_ENTRIES, 1, MAX_AUDIT_ENTRIES)
        form = request.query.get("format", "json")
        if form not in ("json", "jsonl"):
            raise ApiError(400, f"format must be json or jsonl, not {form!r}")
        journal = self.switch.emergency.journal

        def read() -> tuple[list[dict[str, Any]], bool]:
            entries: list[dict[str, Any]] = []
            for entry in journal.read(call_id=call_id, start=start, until=until):
                if len(entries) == limit:
                    return entries, True
                entries.append(entry)
            return entries, False

        entries, truncated = await asyncio.to_thread(read)
        if form == "jsonl":
            text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
            response = web.Response(text=text, content_type="application/x-ndjson")
            response.headers["X-Truncated"] = "true" if truncated else "false"
            return response
        return _json({"entries": entries, "count": len(entries), "truncated": truncated})

    async def _test_call(self, request: web.Request) -> web.Response:
        body: TestCallRequest = await _body(request, TestCallRequest)
        self._device_or_404(body.device)
        if not self.switch.emergency.locations.sites:
            raise ApiError(409, "emergency calling is not configured (no site)")
        token: AdminToken = request[TOKEN_KEY]
        log.info("admin.test_call", device=body.device, token=token.name)
        try:
            result = await self.switch.calls.place_test_call(
                body.device, service_urn=body.service_urn)
        except ValueError as exc:
            raise ApiError(409, str(exc)) from None
        return _json(result, 202)

    # -- fair use ------------------------------------------------------------------------
    def _account_or_404(self, account_id: str) -> Any:
        for account in self.switch.settings.accounts:
            if account.id == account_id:
                return account
        raise ApiError(404, f"no account {account_id!r}")

    async def _usage(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request.match_info["account_id"])
        fairuse = self.switch.fairuse
        store = fairuse.store
        now = time.time()
        month = month_of(now)
        base = fairuse.policy(account.id, None, None)
        devices = []
        account_seconds = 0
        for device in account.devices:
            username = device.username or device.extension
            policy = fairuse.policy(account.id, username, None)
            line_seconds, account_seconds = await store.minutes(account.id, username, month)
            devices.append({
                "device": username,
                "extension": device.extension,
                "active_calls": await store.active("device", f"{account.id}/{username}", now),
                "max_calls": policy.concurrency.device,
                "seconds": line_seconds,
                "quota_seconds": policy.line_quota_seconds,
            })
        if not account.devices:
            _, account_seconds = await store.minutes(account.id, "-", month)
        patterns = await store.pattern_counters(account.id, now)
        return _json({
            "account": account.id,
            "month": month,
            "enabled": fairuse.enabled,
            "plan": base.plan_name,
            "store_degraded": bool(getattr(store, "degraded", False)),
            "leases": {
                "account": {"active": await store.active("account", account.id, now),
                            "max_calls": base.concurrency.account},
                "this_node": sum(1 for lease in fairuse.leases.values()
                                 if lease.account_id == account.id),
            },
            "minutes": {
                "lines": devices,
                "pooled": {"seconds": account_seconds, "quota_seconds": base.pool_quota_seconds,
                           "users": base.users},
                "account": {"seconds": account_seconds,
                            "quota_seconds": base.account_quota_seconds},
            },
            "patterns": dataclasses.asdict(patterns),
        })

    def _exceptions_document(self, account_id: str) -> dict[str, Any]:
        configured = self.switch.settings.fair_use.accounts.get(account_id)
        runtime = self.runtime_exceptions.get(account_id)
        effective = self.switch.fairuse.settings.accounts.get(account_id)
        return {
            "account": account_id,
            "configured": _exceptions_view(configured.blacklist_exceptions
                                           if configured else None),
            "runtime": _exceptions_view(runtime),
            "effective": _exceptions_view(effective.blacklist_exceptions
                                          if effective else None),
        }

    async def _exceptions(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request.match_info["account_id"])
        return _json(self._exceptions_document(account.id))

    async def _set_exceptions(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request.match_info["account_id"])
        update: ExceptionsUpdate = await _body(request, ExceptionsUpdate)
        try:
            exceptions = BlacklistExceptions(countries=update.countries,
                                             prefixes=update.prefixes)
        except ValidationError as exc:
            messages = [str(e.get("msg", "")).removeprefix("Value error, ")
                        for e in exc.errors()]
            raise ApiError(400, "; ".join(messages)) from None
        if exceptions.countries or exceptions.prefixes:
            self.runtime_exceptions[account.id] = exceptions
        else:
            self.runtime_exceptions.pop(account.id, None)
        self.reapply_runtime_exceptions()
        log.info("admin.blacklist_exceptions_set", account=account.id,
                 countries=exceptions.countries, prefixes=exceptions.prefixes,
                 token=request[TOKEN_KEY].name)
        return _json(self._exceptions_document(account.id))

    async def _clear_exceptions(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request.match_info["account_id"])
        self.runtime_exceptions.pop(account.id, None)
        self.reapply_runtime_exceptions()
        log.info("admin.blacklist_exceptions_cleared", account=account.id,
                 token=request[TOKEN_KEY].name)
        return web.Response(status=204)

    # -- availability and personal data ----------------------------------------------------
    async def _availability(self, request: web.Request) -> web.Response:
        tracker = getattr(self.switch, "availability", None)
        if tracker is None:
            raise ApiError(501, "availability accounting is not available in this build")
        unknown = sorted(set(request.query) - {"month"})
        if unknown:
            raise ApiError(400, f"unknown query parameter {unknown[0]!r} (only month)")
        month = request.query.get("month")
        if month is not None and not re.match(MONTH, month):
            raise ApiError(400, f"month must be YYYY-MM, not {month!r}")
        try:
            return _json(tracker.report(month))
        except AvailabilityError as exc:
            raise ApiError(400, str(exc)) from None

    async def _privacy_export(self, request: web.Request) -> web.Response:
        person = request.match_info["person"]
        try:
            document = await export_running(self.switch, person)
        except PrivacyError as exc:
            raise ApiError(400, str(exc)) from None
        log.info("admin.privacy_export", kind=document["kind"], token=request[TOKEN_KEY].name)
        return _json(document)

    async def _privacy_erase(self, request: web.Request) -> web.Response:
        person = request.match_info["person"]
        token: AdminToken = request[TOKEN_KEY]
        try:
            report = await erase_running(self.switch, person)
        except PrivacyError as exc:
            raise ApiError(409 if isinstance(exc, PrivacyBusyError) else 400,
                           str(exc)) from None
        log.warning("admin.privacy_erased", kind=report["kind"], token=token.name,
                    cdr_records=report["cdr"]["records"],
                    location_entries=report["location_history"].get("entries", 0))
        return _json(report)

    # -- reload ---------------------------------------------------------------------------
    async def _reload(self, request: web.Request) -> web.Response:
        reload = getattr(self.switch, "reload", None)
        if reload is None:
            return _json({"applied": False, "notes": [],
                          "errors": ["configuration reload is not available in this build"]},
                         501)
        log.info("admin.reload", token=request[TOKEN_KEY].name)
        try:
            outcome = reload()
            if asyncio.iscoroutine(outcome) or isinstance(outcome, asyncio.Future):
                outcome = await outcome
        except Exception as exc:
            errors = getattr(exc, "errors", None)  # ConfigError: file:line: key: problem
            if not isinstance(errors, list | tuple):
                log.exception("admin.reload_failed")
                return _json({"applied": False, "notes": [],
                              "errors": [f"reload failed: {type(exc).__name__}: {exc}"]}, 500)
            return _json({"applied": False, "errors": [str(e) for e in errors], "notes": []},
                         400)
        applied, messages = _reload_outcome(outcome)
        if applied:
            self.after_reload()
            return _json({"applied": True, "errors": [], "notes": messages})
        return _json({"applied": False, "errors": messages, "notes": []}, 400)


def _reload_outcome(outcome: Any) -> tuple[bool, list[str]]:
    """(applied, messages) from what ``Softswitch.reload()`` returned: ``(applied,
    messages)`` (the errors of a refused file, or notes such as "needs a restart" of an
    applied one), None or True (applied), False, a list of error lines, or a mapping with
    ``applied`` / ``errors``."""
    if outcome is None or outcome is True:
        return True, []
    if outcome is False:
        return False, ["the configuration was not applied"]
    if (isinstance(outcome, tuple) and len(outcome) == 2 and isinstance(outcome[0], bool)
            and isinstance(outcome[1], list | tuple)):
        return outcome[0], [str(message) for message in outcome[1]]
    if isinstance(outcome, Mapping):
        errors = [str(e) for e in outcome.get("errors", []) or []]
        return bool(outcome.get("applied", not errors)), errors
    if isinstance(outcome, list | tuple):
        errors = [str(e) for e in outcome]
        return not errors, errors
    applied = getattr(outcome, "applied", None)
    if applied is not None:
        return bool(applied), [str(e) for e in getattr(outcome, "errors", []) or []]
    return True, []


__all__ = [
    "AdminListen",
    "AdminServer",
    "AdminSettings",
    "AdminToken",
    "ApiError",
    "with_blacklist_exceptions",
]

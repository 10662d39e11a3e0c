"""The registrar: REGISTER processing per RFC 3261 §10.3 with digest authentication.

Steps: domain of the Request-URI (404), To is a SIP AOR (400), ban check (403),
digest authentication (401 challenge, stale=true on an expired nonce), the
authenticated user may register this AOR (403), Contact and Expires checks
(400, 423 with Min-Expires), then the location service applies the change
atomically and the 200 OK lists every current binding.

Unknown users and wrong passwords both get a fresh 401 challenge, so nothing
outside can tell them apart; both count toward bans.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from email.utils import formatdate

import structlog

from sip.digest import parse_credentials
from sip.grammar import GrammarError
from sip.headers import STAR
from sip.message import SipRequest, SipResponse, make_response
from sip.transport import Flow as TransportFlow
from sip.uri import SipUri, TelUri, parse_uri

from .auth import AuthOutcome, DigestAuthenticator, FailureBan
from .directory import Device, DeviceDirectory
from .location import BindingStore, ContactUpdate, Flow, RegistrationRejected
from .metrics import SwitchMetrics
from .settings import Registrar as RegistrarSettings

log = structlog.get_logger("switch.registrar")


def binding_flow(flow: TransportFlow) -> Flow:
    """The location service's record of the transport flow a REGISTER came on."""
    return Flow(
        transport=flow.transport,
        remote_host=flow.remote[0],
        remote_port=flow.remote[1],
        local_host=flow.local[0],
        local_port=flow.local[1],
        connection_id=flow.connection_id,
    )


def transport_flow(flow: Flow) -> TransportFlow:
    """Back from a stored binding flow to the flow the transports send on."""
    return TransportFlow(
        flow.transport,
        (flow.local_host, flow.local_port),
        (flow.remote_host, flow.remote_port),
        flow.connection_id,
    )


def contact_flow(binding) -> TransportFlow:
    """Where to send requests for a binding (the device's NAT flow, RFC 5626 style).

    Stream bindings use their connection. A UDP binding is reached at the source address
    its REGISTER came from when the Contact names another host (the device is behind
    NAT); when the Contact's host is the source host itself, the Contact's port is
    trusted (a device that registers from one socket for another, e.g. a test UA).
    """
    flow = transport_flow(binding.flow)
    if flow.transport != "udp":
        return flow
    try:
        uri = parse_uri(binding.contact)
    except GrammarError:
        return flow
    if not isinstance(uri, SipUri):
        return flow
    host = uri.host.strip("[]")
    if host != flow.remote[0]:
        return flow
    port = uri.port or 5060
    if port == flow.remote[1]:
        return flow
    return TransportFlow("udp", flow.local, (host, port))


class Registrar:
    def __init__(
        self,
        settings: RegistrarSettings,
        directory: DeviceDirectory,
        store: BindingStore,
        authenticator: DigestAuthenticator,
        bans: FailureBan,
        metrics: SwitchMetrics,
        *,
        server_header: str = "softswitch",
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.store = store
        self.authenticator = authenticator
        self.bans = bans
        self.metrics = metrics
        self.server_header = server_header
        # told of every successful registration with contacts (device, source IP): the
        # emergency layer infers a nomadic device's location from its network
        self.on_registered: Callable[[Device, str], None] | None = None

    def _reply(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        *,
        result: str,
    ) -> SipResponse:
        self.metrics.registrations.labels(result).inc()
        extra = [("Server", self.server_header)]
        if headers:
            extra.extend(headers)
        return make_response(
            request, status, reason, to_tag=secrets.token_hex(6), headers=extra
        )

    def _challenge(self, request: SipRequest, now: float, *, stale: bool, result: str):
        values = self.authenticator.challenges(now, stale=stale,
                                               md5_first=_over_websocket(request))
        return self._reply(
            request, 401, None, [("WWW-Authenticate", v) for v in values], result=result
        )

    async def handle_register(
        self, request: SipRequest, flow: TransportFlow, now: float
    ) -> SipResponse:
        source_ip = flow.remote[0]
        ruri = request.request_uri
        if not isinstance(ruri, SipUri) or not self.directory.is_local_domain(ruri.host):
            return self._reply(request, 404, "Domain not served here", result="rejected")
        to_uri = request.to.uri
        if not isinstance(to_uri, SipUri) or to_uri.user is None:
            return self._reply(
                request, 400, "To must be a SIP address-of-record", result="rejected"
            )
        if self.bans.is_banned(source_ip, now):
            return self._reply(
                request, 403, "Too many failed authentications from this address",
                result="banned",
            )

        credentials = None
        for value in request.header_lines("Authorization"):
            parsed = parse_credentials(value)
            if parsed is not None and parsed.realm == self.authenticator.realm:
                credentials = parsed
                break
        auth = self.authenticator.verify(
            credentials, "REGISTER", now, request.body, request_uri=None
        )
        if auth.outcome is AuthOutcome.CHALLENGE:
            return self._challenge(request, now, stale=False, result="challenged")
        if auth.outcome is AuthOutcome.STALE:
            return self._challenge(request, now, stale=True, result="stale")
        if auth.outcome is AuthOutcome.FAILED:
            self.metrics.auth_failures.labels(_failure_kind(auth.reason)).inc()
            log.info(
                "register.auth_failed", source=source_ip, user=auth.username,
                reason=auth.reason, call_id=request.call_id,
            )
            ban = self.bans.record_failure(source_ip, auth.username, now)
            if ban is not None:
                self.metrics.bans.labels(ban.reason).inc()
                log.warning(
                    "register.source_banned", source=source_ip, trigger=ban.reason,
                    user=ban.username, failures=ban.failures, until=ban.until,
                )
            self.metrics.banned_sources.set(self.bans.banned_count(now))
            return self._challenge(request, now, stale=False, result="auth_failed")

        self.bans.record_success(source_ip, auth.username)
        device = self.directory.device(auth.username or "")
        to_user = to_uri.user_unescaped
        if (
            device is None
            or to_user not in (device.username, device.extension)
            or not self.directory.is_local_domain(to_uri.host)
        ):
            log.info(
                "register.forbidden_aor", source=source_ip, user=auth.username,
                to=str(to_uri), call_id=request.call_id,
            )
            return self._reply(
                request, 403, "Not allowed to register this address-of-record",
                result="rejected",
            )
        aor = self.directory.aor(device.username)
        try:
            contacts = request.contacts if request.header("Contact") is not None else []
        except GrammarError as exc:
            return self._reply(request, 400, f"Bad Contact: {exc}", result="rejected")

        cseq = request.cseq.seq
        try:
            if contacts == STAR:
                if request.expires != 0:
                    return self._reply(
                        request, 400, "Contact: * requires Expires: 0", result="rejected"
                    )
                bindings = await self.store.unregister_all(
                    aor, call_id=request.call_id, cseq=cseq, now=now
                )
                result = "unregister"
            elif not contacts:
                bindings = await self.store.lookup(aor, now)
                result = "ok"
            else:
                updates = []
                for contact in contacts:
                    update = self._contact_update(request, contact)
                    if isinstance(update, SipResponse):
                        return update
                    updates.append(update)
                bindings = await self.store.register(
                    aor,
                    updates,
                    call_id=request.call_id,
                    cseq=cseq,
                    flow=binding_flow(flow),
                    user_agent=request.header("User-Agent"),
                    account_id=device.account_id,
                    device=device.extension,
                    now=now,
                    max_contacts=self.settings.max_contacts_per_aor,
                )
                result = "unregister" if all(u.expires == 0 for u in updates) else "ok"
        except RegistrationRejected as exc:
            log.info(
                "register.rejected", aor=aor, status=exc.status, reason=exc.reason,
                call_id=request.call_id,
            )
            return self._reply(request, exc.status, exc.reason, result="rejected")

        if self.on_registered is not None and result == "ok" and contacts:
            try:
                self.on_registered(device, source_ip)
            except Exception:
                log.exception("register.hook_failed", aor=aor)
        log.debug(
            "register.ok", aor=aor, source=source_ip, transport=flow.transport,
            bindings=len(bindings), call_id=request.call_id,
        )
        headers = [
            ("Contact", _contact_value(b.contact, b.expires_in(now), b.q)) for b in bindings
        ]
        headers.append(("Date", _http_date(now)))
        return self._reply(request, 200, "OK", headers, result=result)

    def _contact_update(self, request: SipRequest, contact) -> ContactUpdate | SipResponse:
        if not isinstance(contact.uri, SipUri | TelUri):
            return self._reply(
                request, 400, "Contact must be a SIP or tel URI", result="rejected"
            )
        raw = contact.params.get("expires")
        if raw is not None:
            if not raw.isdigit():
                return self._reply(request, 400, "Bad expires parameter", result="rejected")
            expires = min(int(raw), 2**32 - 1)
        elif request.expires is not None:
            expires = request.expires
        else:
            expires = self.settings.default_expires
        if 0 < expires < self.settings.min_expires:
            return self._reply(
                request, 423, None, [("Min-Expires", str(self.settings.min_expires))],
                result="rejected",
            )
        expires = min(expires, self.settings.max_expires)
        q_raw = contact.params.get("q")
        q = None
        if q_raw is not None:
            try:
                q = float(q_raw)
            except ValueError:
                q = -1.0
            if not 0.0 <= q <= 1.0:
                return self._reply(request, 400, "Bad q parameter", result="rejected")
        reg_id = contact.params.get("reg-id")
        return ContactUpdate(
            contact=str(contact.uri),
            expires=expires,
            q=q,
            instance_id=contact.params.get("+sip.instance"),
            reg_id=int(reg_id) if reg_id and reg_id.isdigit() else None,
        )


_last_date: tuple[int, str] = (-1, "")


def _http_date(now: float) -> str:
    """The Date header value (RFC 3261 §20.17) for ``now``; formatted once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, formatdate(second, usegmt=True))
    return _last_date[1]


def _over_websocket(request: SipRequest) -> bool:
    """A request from a WebSocket client (a browser softphone)."""
    try:
        return request.top_via.transport.upper() in ("WS", "WSS")
    except Exception:
        return False


def _contact_value(uri: str, expires: int, q: float | None) -> str:
    value = f"<{uri}>;expires={expires}"
    if q is not None:
        value += f";q={q:g}"
    return value


def _failure_kind(reason: str) -> str:
    """Fold the authenticator's log reason into a bounded metric label."""
    if reason in ("unknown user", "wrong response", "no credentials for algorithm"):
        return "bad_credentials"
    if "nonce" in reason:
        return "bad_nonce"
    return "bad_request"

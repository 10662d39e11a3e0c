"""B2BUA call control: two legs per call and the logic between them.

Leg A is the caller's dialog (the switch is its UAS); leg B is the callee's (the
switch is its UAC). An INVITE from a device is authenticated (407 digest),
classified by the dial plan, and sent to every registered contact of the called
extension in parallel; the first 2xx wins and the other forks are cancelled.
Media is anchored through the configured `MediaBackend`: every SDP offer and
answer crossing the switch is rewritten. Provisional responses, 2xx, BYE from
either side, CANCEL, re-INVITE/UPDATE (hold, resume, codec change), INFO and
in-dialog OPTIONS are carried across. Each call, answered or not, ends with
one CDR.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from media.backend import MediaBackend, MediaError
from sip.dialog import Dialog, new_call_id, new_tag
from sip.digest import parse_credentials
from sip.grammar import GrammarError
from sip.headers import parse_name_address
from sip.message import SipRequest, SipResponse, make_response
from sip.multipart import BodyPart, build_multipart, parse_multipart
from sip.transaction import ClientTransaction, ServerTransaction, new_branch
from sip.transport import Flow
from sip.uri import SipUri, TelUri

from .auth import AuthOutcome, DigestAuthenticator, FailureBan
from .dialplan import DestinationKind, DialPlan
from .directory import Device, DeviceDirectory
from .identity import identity_for_request, inbound_identity
from .location import BindingStore
from .metrics import SwitchMetrics, call_kind_label
from .registrar import contact_flow
from .signalling import RequestTimeout, SignallingCore, should_shed
from .trunks import TrunkRegistry, answer_challenge, from_header, open_flow, request_uri_for

log = structlog.get_logger("switch.calls")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY"

# Statuses a caller is best told, in order of preference, when every fork failed
# (RFC 3261 §16.7 step 6, simplified): a definitive 6xx, busy, then the rest.
_PREFERRED_FAILURES = (600, 603, 604, 606, 486, 488, 480, 487, 408, 404)


class CallState(enum.Enum):
    ROUTING = "routing"
    EARLY = "early"
    ANSWERED = "answered"  # 2xx sent to the caller, its ACK not yet received
    CONFIRMED = "confirmed"
    ENDED = "ended"


@dataclass(slots=True)
class Fork:
    """One INVITE sent to one contact of the callee."""

    request: SipRequest
    flow: Flow
    transaction: ClientTransaction | None = None
    remote_tag: str | None = None
    final: int | None = None
    dialog: Dialog | None = None
    prack_seq: int = 1
    trunk: object | None = None  # the trunk this fork goes to (answers its challenges)
    attempt: asyncio.Future | None = None  # emergency route attempt: its final status
    progressed: bool = False  # a provisional response beyond 100 arrived


@dataclass(slots=True)
class Leg:
    """One established side of a call: its dialog, the flow that reaches the party,
    the name the media backend knows it by, and the last SDP it sent."""

    dialog: Dialog
    flow: Flow
    media_tag: str
    sdp: bytes = b""
    allows_update: bool = False


@dataclass(slots=True)
class Call:
    call_id: str  # leg A's Call-ID (also the media session id)
    a_request: SipRequest
    a_transaction: ServerTransaction
    a_flow: Flow
    a_tag: str  # our To tag towards the caller
    caller: Device | None  # None for a call from a trunk
    account_id: str
    callee_dialled: str
    started_at: float
    state: CallState = CallState.ROUTING
    callee: Device | None = None
    b_call_id: str = ""
    b_tag: str = ""  # our From tag towards the callee
    forks: list[Fork] = field(default_factory=list)
    winner: Fork | None = None
    legs: dict[str, Leg] = field(default_factory=dict)  # "a" (caller side), "b"
    refresh_task: asyncio.Task | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    end_cause: str = ""
    hangup_by: str = ""
    final_status: int | None = None
    cancelled: bool = False
    media: bool = False
    ok_response: SipResponse | None = None
    ringing_timer: asyncio.TimerHandle | None = None
    failures: list[SipResponse] = field(default_factory=list)
    transferred: bool = False
    callee_offered_first: bool = False
    b_ack_pending: bool = False  # late offer: the callee's ACK waits for the caller's
    b_ack_body: bytes = b""
    trunk: object | None = None
    caller_number: str | None = None  # inbound: who called, as the trunk said
    classification: str = "invalid"
    destination: object | None = None  # the dial plan's Destination
    emergency: object | None = None  # e911.service.EmergencyCall for an emergency call
    a_sdp: bytes = b""  # the SDP of the caller's INVITE (its body may be multipart)
    announcement: object | None = None  # player of the "all routes failed" announcement
    announced_answer: bytes = b""  # the SDP answer of that 183 (the 200 must repeat it)
    callback: bool = False  # a PSAP calling back (bypasses DND and forwarding)
    duration_timers: list = field(default_factory=list)  # fair-use cut (and its warning)
    fax: bool = False  # T.38 seen: the fax duration cap applies
    location_sent_at: float = float("-inf")  # last device location update relayed (EM-42)
    pending_location: tuple[str, bytes] | None = None  # the latest one held back
    forwarded: bool = False
    setup_observed: bool = False  # the setup time (first 18x or 2xx) is in the histogram

    @property
    def caller_tag(self) -> str:
        return self.a_request.from_.tag or ""


@dataclass(slots=True)
class CallEnd:
    """What the owner (CDR ledger, metrics) gets when a call ends."""

    call: Call
    media_stats: dict | None


class CallControl:
    def __init__(
        self,
        core: SignallingCore,
        directory: DeviceDirectory,
        store: BindingStore,
        authenticator: DigestAuthenticator,
        bans: FailureBan,
        metrics: SwitchMetrics,
        media: MediaBackend | None,
        *,
        dialplan_for: Callable[[str], DialPlan],
        server_header: str,
        no_answer_timeout: float = 60.0,
        session_expires: float = 1800.0,
        trunks: TrunkRegistry | None = None,
        accounts: dict | None = None,
        country: str = "FR",
        on_call_end: Callable[[CallEnd], object] | None = None,
        wall_clock: Callable[[], float] = time.time,
        emergency=None,
    ) -> None:
        self.core = core
        self.directory = directory
        self.store = store
        self.authenticator = authenticator
        self.bans = bans
        self.metrics = metrics
        self.media = media
        self.dialplan_for = dialplan_for
        self.server_header = server_header
        self.no_answer_timeout = no_answer_timeout
        self.session_expires = session_expires
        self.trunks = trunks
        self.accounts = accounts or {}
        self.country = country
        self.on_call_end = on_call_end
        self.wall_clock = wall_clock
        self.emergency = emergency  # e911.service.EmergencyService (None: plain hand-off)
        self.fairuse = None  # fairuse.service.FairUseService (None: no fair-use policy)
        # the share of new ordinary calls refused with 503 (Softswitch._watch_overload)
        self.shed_fraction = 0.0
        self.calls: dict[str, Call] = {}
        # calls carried by each trunk, oldest first (channel limits, emergency preemption)
        self.trunk_calls: dict[str, list[Call]] = {}
        # (Call-ID, our tag) → (call, "a" | "b")
        self.dialogs: dict[tuple[str, str], tuple[Call, str]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)
        if media is not None:
            media.on_timeout = self._on_media_timeout
            if hasattr(media, "on_dtmf_info"):  # a WebRTC bridge: phone DTMF to a browser
                media.on_dtmf_info = self._on_media_dtmf
        core.invite_handler = self.on_invite
        core.dialog_handler = self.on_in_dialog
        core.cancel_handler = self.on_cancel
        core.ack_handler = self.on_ack

    # -- helpers -----------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("calls.task_failed", error=repr(task.exception()))

    def _respond(self, call_or_tx, request: SipRequest, status: int, reason: str | None = None,
                 *, to_tag: str | None = None, headers=(), body: bytes = b"") -> None:
        transaction = call_or_tx.a_transaction if isinstance(call_or_tx, Call) else call_or_tx
        extra = [("Server", self.server_header), *headers]
        if body:
            extra.append(("Content-Type", "application/sdp"))
        response = make_response(request, status, reason, to_tag=to_tag, headers=extra, body=body)
        try:
            self.core.respond(transaction, response)
        except Exception as exc:  # a response the transaction state no longer allows
            log.info("calls.response_dropped", status=status, error=str(exc))
            return
        if isinstance(call_or_tx, Call) and 180 <= status < 300:
            self._setup_reached(call_or_tx)

    def _setup_reached(self, call: Call) -> None:
        """The caller got its first 18x or 2xx: the call's setup time goes into the
        histogram, once per call."""
        kind = call_kind_label(call.classification)
        if call.setup_observed or kind is None:
            return
        call.setup_observed = True
        self.metrics.call_setup_seconds.labels(kind).observe(
            max(0.0, self.wall_clock() - call.started_at))

    def _refuse(self, transaction: ServerTransaction, request: SipRequest, status: int,
                reason: str, **context) -> None:
        """Refuse an INVITE before a call exists: the status and reason to the caller, a log
        event and a metric (calls that exist end through `_fail` and get a CDR)."""
        self.metrics.sip_requests_rejected.labels("INVITE", str(status)).inc()
        log.info("call.refused", call_id=request.call_id, status=status, reason=reason,
                 source=transaction.flow.remote[0], **context)
        self._respond(transaction, request, status, reason, to_tag=new_tag())

    def _sent_by(self, flow: Flow) -> str:
        host, port = flow.local
        if flow.transport != "udp":
            for transport, lhost, lport in self.core.transports.listeners():
                if transport == flow.transport and lhost == host:
                    port = lport
                    break
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _contact(self, flow: Flow, user: str = "switch") -> str:
        suffix = "" if flow.transport == "udp" else f";transport={flow.transport}"
        return f"<sip:{user}@{self._sent_by(flow)}{suffix}>"

    @property
    def overloaded(self) -> bool:
        return self.shed_fraction > 0.0

    @overloaded.setter
    def overloaded(self, value: bool) -> None:
        """Shed all new ordinary calls (True) or none (False)."""
        self.shed_fraction = 1.0 if value else 0.0

    def _shed(self) -> bool:
        return should_shed(self.shed_fraction)

    # -- new calls ---------------------------------------------------------------------
    def on_invite(self, request: SipRequest, transaction: ServerTransaction) -> None:
        if self._shed() and not self._dials_emergency(request):
            # the event loop lags: new ordinary calls are shed at once, so that the
            # calls in progress and emergency calls keep the processor they need
            self.metrics.sip_requests_rejected.labels("INVITE", "503").inc()
            self._respond(transaction, request, 503, "Overloaded, try again later",
                          to_tag=new_tag(), headers=[("Retry-After", "5")])
            return
        self._spawn(self._new_call_or_500(request, transaction))

    async def _new_call_or_500(self, request: SipRequest,
                               transaction: ServerTransaction) -> None:
        """A failure before the call exists answers 500 instead of leaving the caller
        with a 100 Trying and silence."""
        try:
            await self._new_call(request, transaction)
        except Exception:
            log.exception("calls.new_call_failed")
            if request.call_id not in self.calls:
                self._respond(transaction, request, 500, "Internal error", to_tag=new_tag())

    async def _new_call(self, request: SipRequest, transaction: ServerTransaction) -> None:
        now = self.wall_clock()
        flow = transaction.flow
        source_ip = flow.remote[0]
        structlog.contextvars.bind_contextvars(call_id=request.call_id)
        trunk = self.trunks.identify_inbound(flow) if self.trunks is not None else None
        if trunk is not None:
            await self._new_inbound_call(request, transaction, trunk, now)
            return
        if self.bans.is_banned(source_ip, now) and not self._dials_emergency(request):
            # a banned address still gets the digest challenge for an emergency number
            self._refuse(transaction, request, 403,
                         "Too many failed authentications from this address")
            return
        credentials = None
        for value in request.header_lines("Proxy-Authorization"):
            parsed = parse_credentials(value)
            if parsed is not None and parsed.realm == self.authenticator.realm:
                credentials = parsed
                break
        auth = self.authenticator.verify(credentials, "INVITE", now, request.body)
        if auth.outcome is not AuthOutcome.OK:
            if auth.outcome is AuthOutcome.FAILED:
                self.metrics.auth_failures.labels("bad_credentials").inc()
                log.info("invite.auth_failed", call_id=request.call_id, source=source_ip,
                         user=auth.username, reason=auth.reason)
                ban = self.bans.record_failure(source_ip, auth.username, now)
                if ban is not None:
                    self.metrics.bans.labels(ban.reason).inc()
                    log.warning("calls.source_banned", source=source_ip, trigger=ban.reason)
            challenges = self.authenticator.challenges(
                now, stale=auth.outcome is AuthOutcome.STALE,
                md5_first=transaction.flow.transport in ("ws", "wss"),
            )
            self._respond(transaction, request, 407, None, to_tag=new_tag(),
                          headers=[("Proxy-Authenticate", c) for c in challenges])
            return
        caller = self.directory.device(auth.username or "")
        if caller is None:  # credentials of a device removed by a reload
            self._refuse(transaction, request, 403, "Unknown device")
            return
        self.bans.record_success(source_ip, auth.username)
        call = self._open_call(request, transaction, now, caller=caller,
                               account_id=caller.account_id)
        if call is None:
            return
        try:
            await self._route(call)
        except Exception:
            log.exception("calls.routing_failed")
            await self._fail(call, 500, "Internal error while routing the call", "failed")

    def _open_call(self, request: SipRequest, transaction: ServerTransaction, now: float, *,
                   caller: Device | None, account_id: str) -> Call | None:
        a_tag = new_tag()
        if request.call_id in self.calls:
            self._refuse(transaction, request, 482, "Loop Detected")
            return None
        call = Call(
            call_id=request.call_id, a_request=request, a_transaction=transaction,
            a_flow=transaction.flow, a_tag=a_tag, caller=caller, account_id=account_id,
            callee_dialled=_dialled(request), started_at=now,
        )
        call.a_sdp = _sdp_of(request)
        self.calls[call.call_id] = call
        self.metrics.calls_attempted.inc()
        self.metrics.calls_active.inc()
        self._respond(call, request, 100)
        return call

    async def _new_inbound_call(self, request: SipRequest, transaction: ServerTransaction,
                                trunk, now: float) -> None:
        """A call from a trunk: the called number (a DID) picks the device to ring. Within
        the callback window after an emergency call, a call to the callback number rings
        the device that made it, whatever its do-not-disturb and forwarding (EM-41)."""
        callback = None
        if self.emergency is not None:
            for uri in (request.request_uri, request.to.uri):
                callback = self.emergency.callback_for(_uri_number(uri), request)
                if callback is not None:
                    break
        if callback is not None:
            callee = self.directory.device(callback)
            if callee is not None:
                call = self._open_call(request, transaction, now, caller=None,
                                       account_id=callee.account_id)
                if call is None:
                    return
                call.callback = True
                await self._ring_inbound(call, trunk, callee, request, transaction)
                return
        if self._trunk_full(trunk):
            self._refuse(transaction, request, 503, f"All channels of trunk {trunk.id} are busy",
                         trunk=trunk.id)
            return
        target = self.trunks.did_target(trunk, _uri_number(request.request_uri))
        if target is None:
            target = self.trunks.did_target(trunk, _uri_number(request.to.uri))
        if target is None:
            self._refuse(transaction, request, 404, "Number not assigned", trunk=trunk.id)
            return
        account_id, extension = target
        callee = self.directory.device_by_extension(account_id, extension)
        if callee is None:
            self._refuse(transaction, request, 404, "Number not assigned", trunk=trunk.id)
            return
        call = self._open_call(request, transaction, now, caller=None, account_id=account_id)
        if call is None:
            return
        await self._ring_inbound(call, trunk, callee, request, transaction)

    async def _ring_inbound(self, call: Call, trunk, callee: Device, request: SipRequest,
                            transaction: ServerTransaction) -> None:
        call.trunk = trunk
        self._track_trunk(call, trunk)
        identity = inbound_identity(request, trusted=trunk.trust_identity,
                                    country=self.country, source=transaction.flow.remote[0])
        call.caller_number = identity.caller_number
        call.callee = callee
        call.classification = "external"
        display = identity.display_name if not identity.anonymous else "Anonymous"
        number = identity.caller_number if not identity.anonymous else "anonymous"
        from_value = _name_addr(display, f"sip:{number or 'unknown'}@{self.directory.realm}")
        try:
            await self._ring_device(call, callee, from_value, identity.headers_for_device())
        except Exception:
            log.exception("calls.routing_failed")
            await self._fail(call, 500, "Internal error while routing the call", "failed")

    async def _route(self, call: Call) -> None:
        caller = call.caller
        dialled = call.a_request.request_uri
        speed_dial = caller.speed_dials.get(_uri_number(dialled)) if caller.speed_dials else None
        plan = self.dialplan_for(caller.account_id)
        destination = plan.classify(speed_dial or dialled)
        if (destination.kind is DestinationKind.INVALID and speed_dial is None
                and not isinstance(dialled, SipUri | TelUri)):
            destination = plan.classify(call.a_request.to.uri)  # EM-03: the number in To
        call.destination = destination
        call.classification = str(destination.kind).lower()
        kind = destination.kind
        if kind is DestinationKind.EMERGENCY:
            # never refused by any limit of the switch (EM-10, EM-11, EM-12)
            await self._call_emergency(call, destination)
            return
        refusal = self._ordinary_call_refusal(caller, kind)
        if refusal is not None:
            await self._fail(call, 403, refusal, "refused")
            return
        if self.fairuse is not None and kind in (DestinationKind.INTERNAL,
                                                 DestinationKind.EXTERNAL):
            trunk = (self.trunks.for_outbound(caller.account_id, destination)
                     if kind is DestinationKind.EXTERNAL and self.trunks else None)
            admission = await self.fairuse.admit(call.call_id, caller.account_id,
                                                 caller.username, trunk.id if trunk else None,
                                                 destination, line=caller.extension)
            if not admission.allowed:
                headers = [("Warning", admission.warning_header(self.directory.realm))]
                if admission.retry_after:
                    headers.append(("Retry-After", str(admission.retry_after)))
                await self._fail(call, admission.status or 403, admission.warning,
                                 "refused", headers=headers)
                return
        if kind is DestinationKind.INTERNAL:
            callee = self.directory.device_by_extension(caller.account_id,
                                                        destination.extension or "")
            if callee is None:
                await self._fail(call, 404, "No such extension", "not_found")
                return
            call.callee = callee
            from_value = _name_addr(caller.display_name,
                                    f"sip:{caller.extension}@{self.directory.realm}")
            await self._ring_device(call, callee, from_value, [])
        elif kind is DestinationKind.EXTERNAL:
            await self._call_out(call, destination)
        else:
            await self._fail(call, 404, destination.reason or "Invalid number", "not_found")

    # -- limits of ordinary calls ---------------------------------------------------------------
    def _dials_emergency(self, request: SipRequest) -> bool:
        """Whether an INVITE (not yet authenticated) dials an emergency number of the
        site's plan: such a request is never refused before it is classified."""
        try:
            plan = self.dialplan_for(next(iter(self.accounts), ""))
            return plan.classify(request.request_uri).is_emergency
        except Exception:
            return False

    def _ordinary_call_refusal(self, caller: Device, kind) -> str | None:
        """Why a non-emergency call of this device is refused (None: it is not)."""
        if caller.account_suspended:
            return "Account suspended: only emergency calls are possible"
        if (self.emergency is not None and self.emergency.refuses_unlocated
                and not self.emergency.has_location(caller.username)):
            return ("No emergency location is registered for this device: calls are"
                    " refused until one is set (emergency calls still work)")
        if caller.class_of_service == "internal_only" and kind is not DestinationKind.INTERNAL:
            return "Outside calls are barred for this device"
        return None

    def _in_emergency_call(self, device: Device) -> bool:
        """Whether the device is the caller of an emergency call in progress (compared by
        username: a reload replaces the Device objects, not the calls)."""
        return any(c.emergency is not None and c.caller is not None
                   and c.caller.username == device.username
                   and c.state is not CallState.ENDED for c in self.calls.values())

    def _trunk_full(self, trunk) -> bool:
        channels = getattr(trunk, "channels", None)
        return channels is not None and len(self.trunk_calls.get(trunk.id, ())) >= channels

    def _track_trunk(self, call: Call, trunk) -> None:
        calls = self.trunk_calls.setdefault(trunk.id, [])
        if call not in calls:
            calls.append(call)

    def _untrack_trunk(self, call: Call, trunk=None) -> None:
        for trunk_id, calls in self.trunk_calls.items():
            if (trunk is None or trunk.id == trunk_id) and call in calls:
                calls.remove(call)

    def _release_ordinary_call(self, trunk) -> str | None:
        """Free a channel of a full trunk for an emergency call: the newest ordinary
        call on it is released (EM-13). Returns its Call-ID."""
        for victim in reversed(self.trunk_calls.get(trunk.id, [])):
            if victim.emergency is None and victim.state is not CallState.ENDED:
                self._untrack_trunk(victim, trunk)
                log.warning("emergency.call_preempted", call_id=victim.call_id, trunk=trunk.id)
                self.hangup(victim.call_id, "emergency_preemption",
                            reason='SIP;cause=503;text="Released for an emergency call"')
                return victim.call_id
        return None

    # -- emergency calls (e911/) -------------------------------------------------------------
    async def _call_emergency(self, call: Call, destination) -> None:
        """Route an emergency call: the caller's site's routes in order, each failure
        (error, timeout, unreachable, TLS) moving to the next at once, a 424 retried with
        the validated default location; if every route failed, an announcement to the
        caller and new rounds until someone answers or the caller hangs up (EM-13)."""
        em = self.emergency
        if em is None:  # no emergency layer configured: hand the call to the trunk
            await self._call_out(call, destination)
            return
        try:
            ctx = em.begin(call, call.caller, destination)
        except Exception:
            log.exception("emergency.begin_failed")
            await self._call_out(call, destination)
            return
        call.emergency = ctx
        sdp = await self._offer_media(call)
        if sdp is None:
            return
        call.b_call_id = new_call_id(self.directory.realm)
        call.b_tag = new_tag()
        self.dialogs[(call.call_id, call.a_tag)] = (call, "a")
        self.dialogs[(call.b_call_id, call.b_tag)] = (call, "b")
        call.state = CallState.EARLY
        cseq = itertools.count(1)
        announced = failed_reported = False
        if em.announce_first(ctx):
            # registered abroad: told to use a local phone, and routed home all the same
            announced = True
            await self._announce(call)
        while self._emergency_pending(call):
            for trunk in em.routes(ctx):
                if not self._emergency_pending(call):
                    return
                if await self._emergency_attempt(call, ctx, trunk, sdp, cseq):
                    return
            if not self._emergency_pending(call):
                return
            if not failed_reported:
                failed_reported = True
                em.all_failed(ctx)
                if not announced:
                    announced = True
                    await self._announce(call)
            deadline = time.monotonic() + em.retry_interval
            while self._emergency_pending(call) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    @staticmethod
    def _emergency_pending(call: Call) -> bool:
        return (call.state is CallState.EARLY and not call.cancelled and call.winner is None)

    async def _emergency_attempt(self, call: Call, ctx, trunk, sdp: bytes, cseq) -> bool:
        """One route: True when it answered (the call goes on), False to try the next."""
        em = self.emergency
        if self._trunk_full(trunk):
            released = (self._release_ordinary_call(trunk)
                        if em.release_ordinary_calls else None)
            em.preempted(ctx, trunk, released)
        flow, failures = await self.trunks.emergency_flow(trunk)
        for failure in failures:
            em.response(ctx, trunk, None, failure)
        if flow is None:
            return False
        default_location = False
        route = await em.lost_route(ctx, trunk)
        for _ in range(2):  # the second time: after a 424, with the default location only
            if not self._emergency_pending(call):
                return False
            invite = em.invite_for(ctx, trunk, sdp, default_location=default_location,
                                   route=route)
            if invite is None:
                em.response(ctx, trunk, None, "unreachable: the trunk's profile cannot carry"
                            " this call")
                return False
            request = self._emergency_request(call, invite, flow, next(cseq))
            fork = Fork(request, flow, trunk=trunk)
            fork.attempt = asyncio.get_running_loop().create_future()
            call.forks.append(fork)
            self._track_trunk(call, trunk)
            call.trunk = trunk
            self._send_fork(call, fork)
            em.invite_sent(ctx, trunk, request)
            outcome = await self._await_attempt(call, fork, em.route_timeout)
            if isinstance(outcome, int) and outcome < 300:
                return True
            status = outcome.status if isinstance(outcome, SipResponse) else None
            reason = (outcome.reason if isinstance(outcome, SipResponse)
                      else "no response in time")
            body = outcome.body if isinstance(outcome, SipResponse) else b""
            em.response(ctx, trunk, status, reason, body=body)
            self._untrack_trunk(call, trunk)
            if status == 424 and not default_location:
                default_location = True  # EM-31: never passed to the caller
                continue
            return False
        return False

    async def _await_attempt(self, call: Call, fork: Fork, route_timeout: float):
        """The attempt's final status (int for 2xx, the response otherwise); no answer
        beyond 100 Trying within ``route_timeout`` cancels it (None)."""
        deadline = time.monotonic() + route_timeout
        while True:
            if fork.attempt.done():
                return fork.attempt.result()
            if not self._emergency_pending(call):
                return None
            if not fork.progressed and time.monotonic() >= deadline:
                if fork.final is None:
                    fork.final = 408
                    self._cancel_fork(fork)
                return None
            try:
                await asyncio.wait_for(asyncio.shield(fork.attempt), 0.05)
            except TimeoutError:
                pass

    def _emergency_request(self, call: Call, invite, flow: Flow, cseq: int) -> SipRequest:
        headers = [
            ("Via", f"SIP/2.0/{flow.transport.upper()} {self._sent_by(flow)};"
                    f"branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"{_name_addr(invite.from_display, invite.from_uri)};tag={call.b_tag}"),
            ("To", invite.to),
            ("Call-ID", call.b_call_id),
            ("CSeq", f"{cseq} INVITE"),
            ("Contact", self._contact(flow, _contact_user(invite.from_uri))),
            ("Allow", ALLOW),
            ("User-Agent", self.server_header),
            *invite.headers,
        ]
        if invite.content_type:
            headers.append(("Content-Type", invite.content_type))
        return SipRequest("INVITE", invite.request_uri, headers, invite.body)

    async def _announce(self, call: Call) -> None:
        """Every route failed: a 183 with the announcement for the caller while the
        switch keeps trying (EM-13)."""
        player = self.emergency.announcement_player() if self.emergency else None
        body = b""
        if player is not None and call.a_sdp:
            try:
                body = await player.start(call.a_sdp)
                call.announcement = player
                call.announced_answer = body
            except Exception as exc:
                log.warning("emergency.announcement_failed", call_id=call.call_id,
                            error=str(exc))
                body = b""
        if call.state is CallState.EARLY:
            self._respond(call, call.a_request, 183, "Emergency call being retried",
                          to_tag=call.a_tag, headers=[("Contact", self._contact(call.a_flow))],
                          body=body)

    def _stop_announcement(self, call: Call) -> None:
        player, call.announcement = call.announcement, None
        if player is not None:
            try:
                player.stop()
            except Exception as exc:
                log.info("emergency.announcement_stop_failed", error=str(exc))

    async def place_test_call(self, username: str, *, service_urn: bool = False,
                              hold: float = 3.0) -> dict:
        """An emergency test call on behalf of a device (EM-80): 933 at US and Canadian
        sites, else ``urn:service:test.sos``; the same routes, location and callback
        number as the device's real emergency calls, marked TEST. The switch is the
        calling party (it offers a receive-only audio stream and listens to nothing);
        the result, and any text/plain answer of the PSAP, go to the audit journal."""
        em = self.emergency
        device = self.directory.device(username)
        if em is None or device is None:
            raise ValueError(f"no device {username!r}" if device is None
                             else "emergency calling is not configured")
        site = em.locations.resolve(username).site
        country = site.country if site is not None else em.country
        dialled = ("urn:service:test.sos" if service_urn or country not in ("US", "CA")
                   else "933")
        destination = self.dialplan_for(device.account_id).classify(dialled)
        call_id = new_call_id(self.directory.realm)
        fake = SipRequest("INVITE", f"sip:{dialled}@{self.directory.realm}"
                          if dialled == "933" else dialled,
                          [("Call-ID", call_id)], b"")
        holder = Call(call_id=call_id, a_request=fake, a_transaction=None, a_flow=None,
                      a_tag="", caller=device, account_id=device.account_id,
                      callee_dialled=dialled, started_at=self.wall_clock())
        ctx = em.begin(holder, device, destination)
        result: dict = {"call_id": call_id, "device": username, "dialled": dialled,
                        "attempts": []}
        for trunk in em.routes(ctx):
            flow, _failures = await self.trunks.emergency_flow(trunk)
            if flow is None:
                result["attempts"].append({"trunk": trunk.id, "result": "unreachable"})
                continue
            host = flow.local[0]
            sdp = (f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=test\r\nc=IN IP4 {host}\r\n"
                   f"t=0 0\r\nm=audio 9 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000"
                   f"\r\na=recvonly\r\n").encode()
            invite = em.invite_for(ctx, trunk, sdp, route=await em.lost_route(ctx, trunk))
            if invite is None:
                continue
            tag = new_tag()
            b_call_id = new_call_id(self.directory.realm)
            holder.b_call_id, holder.b_tag = b_call_id, tag
            request = self._emergency_request(holder, invite, flow, 1)
            em.invite_sent(ctx, trunk, request)
            try:
                response = await self.core.request(request, flow)
            except RequestTimeout:
                response = None
            status = response.status if response is not None else None
            text = b""
            if response is not None and (response.header("Content-Type") or "").startswith(
                    "text/plain"):
                text = response.body
            result["attempts"].append({"trunk": trunk.id, "result": status})
            if response is not None and 200 <= response.status < 300:
                em.answered(ctx, trunk)
            else:
                em.response(ctx, trunk, status,
                            response.reason if response else "no response")
            if response is not None and 200 <= response.status < 300:
                holder.answered_at = self.wall_clock()
                dialog = Dialog.as_uac(request, response)
                dialog.confirm(response)
                ack = dialog.create_request("ACK", self._sent_by(flow),
                                            transport=flow.transport.upper(), cseq=1)
                self.core.send_stateless(ack, flow)
                await asyncio.sleep(hold)
                self._send_in_dialog(dialog, flow, "BYE", None)
            if status is not None and status < 500:
                em.test_result(ctx, trunk, status, text)
                result.update(status=status, trunk=trunk.id,
                              text=text.decode("utf-8", "replace"))
                break
        else:
            em.test_result(ctx, None, None, b"")
            result.update(status=None, trunk=None, text="")
        em.finished(ctx, holder, "test_call")
        return result

    async def send_message(self, username: str, text: str) -> bool:
        """A SIP MESSAGE (RFC 3428) to every registered contact of a device; True when
        one of them accepted it (on-site notifications, location prompts)."""
        device = self.directory.device(username)
        if device is None:
            return False
        bindings = await self.store.lookup(self.directory.aor(username), self.wall_clock())
        delivered = False
        for binding in bindings:
            flow = contact_flow(binding)
            request = SipRequest("MESSAGE", binding.contact, [
                ("Via", f"SIP/2.0/{flow.transport.upper()} {self._sent_by(flow)};"
                        f"branch={new_branch()};rport"),
                ("Max-Forwards", "70"),
                ("From", f"<sip:switch@{self.directory.realm}>;tag={new_tag()}"),
                ("To", f"<sip:{device.extension}@{self.directory.realm}>"),
                ("Call-ID", new_call_id(self.directory.realm)),
                ("CSeq", "1 MESSAGE"),
                ("User-Agent", self.server_header),
                ("Content-Type", "text/plain;charset=utf-8"),
            ], text.encode())
            try:
                response = await self.core.request(request, flow)
            except RequestTimeout:
                response = None
            delivered = delivered or (response is not None and 200 <= response.status < 300)
        return delivered

    async def _ring_device(self, call: Call, callee: Device, from_value: str,
                           extra: list[tuple[str, str]]) -> None:
        """Fork to every registered contact of a device, in parallel. A device in an
        emergency call gets no call waiting (EM-40); do-not-disturb and forwarding apply
        except to a PSAP calling back (EM-41)."""
        if self._in_emergency_call(callee):
            await self._fail(call, 486, "Busy: emergency call in progress", "busy")
            return
        if not call.callback and call.emergency is None:
            if callee.do_not_disturb:
                await self._fail(call, 486, "Do not disturb", "busy")
                return
            if callee.forward_all and not call.forwarded:
                call.forwarded = True
                log.info("call.forwarded", call_id=call.call_id, by=callee.extension,
                         to=callee.forward_all)
                destination = self.dialplan_for(callee.account_id).classify(callee.forward_all)
                if destination.kind is DestinationKind.INTERNAL:
                    target = self.directory.device_by_extension(callee.account_id,
                                                                destination.extension or "")
                    if target is None:
                        await self._fail(call, 404, "Forwarding target does not exist",
                                         "not_found")
                        return
                    call.callee = target
                    await self._ring_device(call, target, from_value, extra)
                elif destination.kind is DestinationKind.EXTERNAL and call.caller is not None:
                    await self._call_out(call, destination)
                else:
                    await self._fail(call, 404, "Forwarding target is not callable",
                                     "not_found")
                return
        bindings = await self.store.lookup(self.directory.aor(callee.username),
                                           self.wall_clock())
        if not bindings:
            await self._fail(call, 480, "Callee is not registered", "unavailable")
            return
        # a callee reachable only over SIP over WebSocket is a browser: it wants WebRTC media
        browser = all(contact_flow(b).transport in ("ws", "wss") for b in bindings)
        body = await self._offer_media(call, hint="webrtc" if browser else None)
        if body is None:
            return
        to_value = f"<sip:{callee.extension}@{self.directory.realm}>"
        for binding in bindings:
            flow = contact_flow(binding)
            request = self._leg_invite(call, binding.contact, flow, body, from_value, to_value,
                                       extra)
            call.forks.append(Fork(request, flow))
        self._start_forks(call)

    async def _call_out(self, call: Call, destination) -> None:
        """Send the call to the public network through a trunk."""
        trunk = self.trunks.for_outbound(call.account_id, destination) if self.trunks else None
        if trunk is None:
            await self._fail(call, 503, "No trunk available for this destination", "failed")
            return
        if self._trunk_full(trunk):
            await self._fail(call, 503, f"All channels of trunk {trunk.id} are busy", "failed")
            return
        call.trunk = trunk
        self._track_trunk(call, trunk)
        flow = await self.trunks.flow_for(trunk)
        if flow is None:
            await self._fail(call, 503, f"Trunk {trunk.id} is unreachable", "failed")
            return
        try:
            ruri = request_uri_for(trunk, destination)
        except ValueError as exc:
            await self._fail(call, 404, str(exc), "not_found")
            return
        caller = call.caller
        identity = identity_for_request(
            call.a_request, caller, self.accounts.get(caller.account_id),
            domain=trunk.domain, country=self.country,
        )
        body = await self._offer_media(call)
        if body is None:
            return
        from_value = from_header(trunk, identity.identity)
        extra = list(identity.as_headers())
        request = self._leg_invite(call, ruri, flow, body, from_value, f"<{ruri}>", extra)
        call.forks.append(Fork(request, flow, trunk=trunk))
        self._start_forks(call)

    async def _offer_media(self, call: Call, hint: str | None = None) -> bytes | None:
        """The caller's SDP rewritten for the callee side (None: the call was failed).
        `hint`: what the callee is ("webrtc": a browser), for a backend that bridges."""
        body = call.a_sdp
        if call.cancelled:
            await self._fail(call, 487, None, "cancelled")
            return None
        if body and self.media is not None:
            try:
                if hint is not None and getattr(self.media, "takes_offer_hints", False):
                    body = await self.media.offer(call.call_id, call.caller_tag, body, hint)
                else:
                    body = await self.media.offer(call.call_id, call.caller_tag, body)
                call.media = True
            except MediaError as exc:
                await self._fail(call, exc.status, exc.reason, "failed")
                return None
        if call.cancelled:
            await self._fail(call, 487, None, "cancelled")
            return None
        return body

    def _start_forks(self, call: Call) -> None:
        self.dialogs[(call.call_id, call.a_tag)] = (call, "a")
        self.dialogs[(call.b_call_id, call.b_tag)] = (call, "b")
        call.state = CallState.EARLY
        for fork in call.forks:
            self._send_fork(call, fork)
        call.ringing_timer = asyncio.get_running_loop().call_later(
            self.no_answer_timeout, self._no_answer, call
        )

    def _send_fork(self, call: Call, fork: Fork) -> None:
        fork.transaction = self.core.start_request(
            fork.request, fork.flow, lambda r, f=fork: self._fork_response(call, f, r)
        )

    def _leg_invite(self, call: Call, ruri: str, flow: Flow, body: bytes, from_value: str,
                    to_value: str, extra: list[tuple[str, str]]) -> SipRequest:
        """The INVITE of the callee's leg to one target."""
        if not call.b_call_id:
            call.b_call_id = new_call_id(self.directory.realm)
            call.b_tag = new_tag()
        mf = call.a_request.max_forwards
        max_forwards = max(0, (mf if mf is not None else 70) - 1)
        return self._invite(ruri, flow, body, from_value, to_value, extra, call.b_call_id,
                            call.b_tag, max_forwards)

    def _invite(self, ruri: str, flow: Flow, body: bytes, from_value: str, to_value: str,
                extra: list[tuple[str, str]], call_id: str, tag: str,
                max_forwards: int = 70) -> SipRequest:
        headers = [
            ("Via", f"SIP/2.0/{flow.transport.upper()} {self._sent_by(flow)};"
                    f"branch={new_branch()};rport"),
            ("Max-Forwards", str(max_forwards)),
            ("From", f"{from_value};tag={tag}"),
            ("To", to_value),
            ("Call-ID", call_id),
            ("CSeq", "1 INVITE"),
            ("Contact", self._contact(flow)),
            ("Allow", ALLOW),
            ("Supported", "timer"),
            ("Session-Expires", f"{int(self.session_expires)};refresher=uac"),
            ("User-Agent", self.server_header),
            *extra,
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipRequest("INVITE", ruri, headers, body)

    # -- responses from the callee's contacts --------------------------------------------
    def _fork_response(self, call: Call, fork: Fork, response: SipResponse | None) -> None:
        if response is None:
            response = SipResponse(408, "No response from the callee", list(fork.request.headers))
        status = response.status
        if status < 200:
            if status == 100 or call.state is not CallState.EARLY:
                return
            fork.remote_tag = response.to.tag or fork.remote_tag
            fork.progressed = True
            if "100rel" in response.option_tags("Require") and response.header("RSeq"):
                self._prack(fork, response)
            self._spawn(self._relay_provisional(call, fork, response))
            return
        if 200 <= status < 300:
            if fork.final is not None and fork.final < 300:
                # a 2xx retransmission: our ACK was lost, send it again (unless the ACK
                # waits for the caller's answer to a late offer)
                if fork.dialog is not None and not call.b_ack_pending:
                    self._send_ack(fork, call.b_ack_body)
                return
            fork.final = status
            fork.remote_tag = response.to.tag
            fork.dialog = Dialog.as_uac(fork.request, response)
            fork.dialog.confirm(response)
            if call.winner is not None or call.state is CallState.ENDED or call.cancelled:
                self._send_ack(fork)
                self._send_in_dialog(fork.dialog, fork.flow, "BYE", None)
                return
            call.winner = fork
            if fork.attempt is not None and not fork.attempt.done():
                fork.attempt.set_result(status)
                if call.emergency is not None and self.emergency is not None:
                    # journaled before the caller gets the 200 (and can hang up)
                    self.emergency.answered(call.emergency, fork.trunk, response)
            self._spawn(self._answered(call, fork, response))
            return
        if status in (401, 407) and fork.trunk is not None and not call.cancelled:
            retry = answer_challenge(fork.trunk, fork.request, response)
            if retry is not None:
                fork.request = retry
                self._send_fork(call, fork)
                return
        fork.final = status
        call.failures.append(response)
        if fork.attempt is not None:  # an emergency route: the route loop decides
            if not fork.attempt.done():
                fork.attempt.set_result(response)
            return
        if call.winner is None and all(f.final is not None for f in call.forks):
            self._spawn(self._all_forks_failed(call))

    def _prack(self, fork: Fork, response: SipResponse) -> None:
        """Acknowledge a reliable provisional response (RFC 3262) in the early dialog.
        The switch never asks the caller for 100rel, so the PRACK ends here."""
        rseq = (response.header("RSeq") or "").strip()
        if not rseq.isdigit() or not response.to.tag:
            return
        early = Dialog.as_uac(fork.request, response)
        early.local_seq = max(early.local_seq, fork.prack_seq)
        prack = early.create_request(
            "PRACK", self._sent_by(fork.flow), transport=fork.flow.transport.upper(),
            extra_headers=[("RAck", f"{rseq} {fork.request.cseq.seq} INVITE")],
        )
        fork.prack_seq = early.local_seq
        self.core.start_request(prack, fork.flow, lambda r: None)

    async def _relay_provisional(self, call: Call, fork: Fork, response: SipResponse) -> None:
        body = _sdp_of(response)
        if body and self.media is not None and call.media and fork.remote_tag:
            try:
                body = await self.media.answer(call.call_id, call.caller_tag,
                                               fork.remote_tag, body)
            except MediaError as exc:
                log.info("calls.early_media_refused", error=str(exc))
                body = b""
        if call.state is not CallState.EARLY:
            return
        status = response.status if response.status in (180, 181, 182, 183) else 180
        self._respond(call, call.a_request, status, None, to_tag=call.a_tag,
                      headers=[("Contact", self._contact(call.a_flow))], body=body)

    async def _answered(self, call: Call, fork: Fork, response: SipResponse) -> None:
        if call.ringing_timer:
            call.ringing_timer.cancel()
        self._stop_announcement(call)
        for other in call.forks:
            if other is not fork and other.final is None:
                self._cancel_fork(other)
        body = _sdp_of(response)  # a PSAP may add parts (a test call's text readback)
        # Late offer: the caller's INVITE had no SDP, so the callee's 2xx carries the
        # offer; the caller's ACK will carry the answer, which the callee's ACK awaits.
        late_offer = not call.a_request.body and bool(body)
        try:
            if late_offer and self.media is not None:
                body = await self.media.offer(call.call_id, fork.remote_tag or "", body)
                call.media = True
                call.callee_offered_first = True  # the backend's leg "A" is the callee
            elif body and self.media is not None and call.media:
                body = await self.media.answer(call.call_id, call.caller_tag,
                                               fork.remote_tag or "", body)
        except MediaError as exc:
            self._send_ack(fork)
            self._send_in_dialog(fork.dialog, fork.flow, "BYE", None)
            await self._fail(call, exc.status, exc.reason, "failed")
            return
        if call.cancelled or call.state is CallState.ENDED:
            self._send_ack(fork)
            self._send_in_dialog(fork.dialog, fork.flow, "BYE", None)
            return
        if late_offer:
            call.b_ack_pending = True
        else:
            self._send_ack(fork)
        call.state = CallState.ANSWERED
        call.answered_at = self.wall_clock()
        call.final_status = 200
        a_dialog = Dialog.as_uas(call.a_request, call.a_tag)
        a_dialog.confirm()
        if fork.dialog is not None:  # PRACKs used sequence numbers of this dialog
            fork.dialog.local_seq = max(fork.dialog.local_seq, fork.prack_seq)
        call.legs["a"] = Leg(a_dialog, call.a_flow, call.caller_tag, call.a_request.body,
                             allows_update="UPDATE" in (call.a_request.header("Allow") or ""))
        call.legs["b"] = Leg(fork.dialog, fork.flow, fork.remote_tag or "", response.body,
                             allows_update="UPDATE" in (response.header("Allow") or ""))
        headers = [("Contact", self._contact(call.a_flow)), ("Allow", ALLOW)]
        if "timer" in call.a_request.option_tags("Supported"):
            # The switch refreshes both legs itself (RFC 4028 with refresher=uas here).
            headers.append(("Session-Expires", f"{int(self.session_expires)};refresher=uas"))
            headers.append(("Require", "timer"))
        extra = [("Server", self.server_header), *headers]
        reoffer = b""
        if call.announced_answer and body:
            # The caller already has an answer (the announcement's, in the 183): the 200
            # repeats it (RFC 3261 §13.2.1) and a re-INVITE then moves the caller's media
            # to the relay, as a new version of the same session (RFC 3264 §8).
            reoffer = _next_version(body, call.announced_answer)
            body = call.announced_answer
        if body:
            extra.append(("Content-Type", "application/sdp"))
        call.ok_response = make_response(call.a_request, 200, "OK", to_tag=call.a_tag,
                                         headers=extra, body=body)
        self.core.respond(call.a_transaction, call.ok_response)
        self.metrics.calls_answered.inc()
        self._setup_reached(call)
        self._schedule_duration_cut(call)
        log.info("call.answered", call_id=call.call_id,
                 caller=call.caller.extension if call.caller else call.caller_number,
                 callee=call.callee.extension if call.callee else None)
        self._spawn(self._retransmit_ok(call))
        if reoffer:
            self._spawn(self._reoffer_caller(call, reoffer))
        call.refresh_task = asyncio.get_running_loop().create_task(self._refresh_session(call))

    # -- fair-use duration caps ------------------------------------------------------------
    def _schedule_duration_cut(self, call: Call) -> None:
        """End the call at its plan's maximum duration (voice, or fax once T.38 is seen),
        with a warning to the calling device shortly before."""
        for handle in call.duration_timers:
            handle.cancel()
        call.duration_timers = []
        limits = self.fairuse.max_duration(call.call_id, fax=call.fax) if self.fairuse else None
        if limits is None or call.answered_at is None:
            return
        cut, warn_before = limits
        remaining = max(0.0, cut - (self.wall_clock() - call.answered_at))
        loop = asyncio.get_running_loop()
        kind = "fax" if call.fax else "voice"
        call.duration_timers.append(loop.call_later(remaining, self._duration_cut, call, cut,
                                                    kind))
        if warn_before and remaining > warn_before:
            call.duration_timers.append(loop.call_later(
                remaining - warn_before, self._duration_warning, call, warn_before))

    def _duration_warning(self, call: Call, seconds: int) -> None:
        log.info("fairuse.duration_warning", call_id=call.call_id, seconds=seconds)
        if call.caller is not None:
            self._spawn(self.send_message(
                call.caller.username,
                f"Fair use: this call will be ended in {seconds} s (maximum call duration)"))

    def _duration_cut(self, call: Call, cut: int, kind: str) -> None:
        if call.state not in (CallState.ANSWERED, CallState.CONFIRMED):
            return
        self.metrics.fairuse_duration_cuts.labels(kind).inc()
        log.info("fairuse.duration_cut", call_id=call.call_id, kind=kind, seconds=cut)
        self._hangup(call, "switch", "duration_limit",
                     reason=f'SIP;cause=200;text="Fair use: maximum {kind} call duration'
                            f' ({cut} s) reached"')

    async def _reoffer_caller(self, call: Call, offer: bytes) -> None:
        """After the ACK, a re-INVITE that points the caller at the relay instead of the
        announcement player."""
        deadline = time.monotonic() + 10
        while call.state is CallState.ANSWERED and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        leg = call.legs.get("a")
        if call.state is not CallState.CONFIRMED or leg is None:
            return
        request = leg.dialog.create_request(
            "INVITE", self._sent_by(leg.flow), transport=leg.flow.transport.upper(),
            extra_headers=[("Contact", self._contact(leg.flow)),
                           ("Content-Type", "application/sdp")], body=offer)
        try:
            response = await self.core.request(request, leg.flow)
        except RequestTimeout:
            response = None
        if response is not None and 200 <= response.status < 300:
            ack = leg.dialog.create_request("ACK", self._sent_by(leg.flow),
                                            transport=leg.flow.transport.upper(),
                                            cseq=request.cseq.seq)
            self.core.send_stateless(ack, leg.flow)
            if response.body:
                leg.sdp = response.body
        log.info("emergency.caller_reoffered", call_id=call.call_id,
                 status=response.status if response else None)

    async def _retransmit_ok(self, call: Call) -> None:
        """The UAS core retransmits its 2xx until the ACK comes (RFC 3261 §13.3.1.4)."""
        t1 = self.core.transactions.settings.t1
        interval = t1
        deadline = time.monotonic() + 64 * t1
        reliable = call.a_flow.transport != "udp"
        while call.state is CallState.ANSWERED:
            if time.monotonic() >= deadline:
                log.info("call.no_ack", call_id=call.call_id)
                self._hangup(call, "switch", "no_ack", reason="SIP;cause=408;text=\"No ACK\"")
                return
            await asyncio.sleep(interval)
            if call.state is CallState.ANSWERED and not reliable and call.ok_response:
                self.core.send_stateless(call.ok_response, call.a_flow)
            interval = min(interval * 2, 4.0)

    def _send_ack(self, fork: Fork, body: bytes = b"") -> None:
        if fork.dialog is None:
            return
        ack = fork.dialog.create_request(
            "ACK", self._sent_by(fork.flow), transport=fork.flow.transport.upper(),
            cseq=fork.request.cseq.seq,
            extra_headers=[("Content-Type", "application/sdp")] if body else None, body=body,
        )
        self.core.send_stateless(ack, fork.flow)

    def _cancel_fork(self, fork: Fork) -> None:
        req = fork.request
        headers = [(n, v) for n, v in req.headers
                   if n in ("Via", "From", "To", "Call-ID", "Max-Forwards")]
        headers = [h for h in headers if h[0] != "Via"]
        headers.insert(0, ("Via", req.header_lines("Via")[0]))
        headers.append(("CSeq", f"{req.cseq.seq} CANCEL"))
        headers.append(("Reason", 'SIP;cause=200;text="Call completed elsewhere"'))
        cancel = SipRequest("CANCEL", req.uri, headers)
        self.core.start_request(cancel, fork.flow, lambda r: None)

    def _no_answer(self, call: Call) -> None:
        if call.state is not CallState.EARLY:
            return
        for fork in call.forks:
            if fork.final is None:
                self._cancel_fork(fork)
        self._spawn(self._fail(call, 480, "No answer", "no_answer"))

    async def _all_forks_failed(self, call: Call) -> None:
        if call.state is CallState.ENDED:
            return
        if call.cancelled:
            await self._fail(call, 487, None, "cancelled")
            return
        statuses = [r.status for r in call.failures]
        chosen = next((s for s in _PREFERRED_FAILURES if s in statuses), None)
        if chosen is None:
            chosen = min(statuses) if statuses else 480
        if chosen in (401, 407):
            chosen = 480
        cause = {486: "busy", 600: "busy", 603: "declined", 480: "unavailable",
                 408: "no_answer"}.get(chosen, "failed")
        reason = next((r.reason for r in call.failures if r.status == chosen), None)
        if 300 <= chosen < 400:
            chosen, reason = 480, "Redirection is not supported"
        await self._fail(call, chosen, reason, cause)

    async def _fail(self, call: Call, status: int, reason: str | None, cause: str,
                    headers=()) -> None:
        if call.state is CallState.ENDED:
            return
        call.final_status = status
        self._respond(call, call.a_request, status, reason, to_tag=call.a_tag, headers=headers)
        await self._end(call, cause, "switch" if cause != "cancelled" else "caller")

    # -- CANCEL and ACK from the caller -------------------------------------------------------
    def on_cancel(self, cancel: SipRequest, transaction: ServerTransaction, invite_tx) -> None:
        self._respond(transaction, cancel, 200, to_tag=None)
        call = self.calls.get(cancel.call_id)
        if call is None or call.a_transaction is not invite_tx:
            self.core.respond(invite_tx, make_response(
                invite_tx.request, 487, to_tag=new_tag(),
                headers=[("Server", self.server_header)]))
            return
        if call.state in (CallState.ROUTING, CallState.EARLY):
            call.cancelled = True
            for fork in call.forks:
                if fork.final is None:
                    self._cancel_fork(fork)
            if call.state is CallState.EARLY:
                self._spawn(self._fail(call, 487, None, "cancelled"))

    def on_ack(self, ack: SipRequest) -> None:
        entry = self.dialogs.get((ack.call_id, ack.to.tag or ""))
        if entry is None:
            return
        call, side = entry
        if side == "a" and call.state is CallState.ANSWERED:
            call.state = CallState.CONFIRMED
            log.debug("call.confirmed", call_id=call.call_id)
            if call.b_ack_pending:
                self._spawn(self._complete_late_offer(call, ack.body))

    async def _complete_late_offer(self, call: Call, answer: bytes) -> None:
        """Send the callee the ACK with the caller's answer to its offer."""
        fork = call.winner
        body = answer
        if answer and call.media and self.media is not None:
            try:
                body = await self.media.answer(call.call_id, fork.remote_tag or "",
                                               call.caller_tag, answer)
            except MediaError as exc:
                log.info("call.late_answer_refused", call_id=call.call_id, error=str(exc))
        call.legs["a"].sdp = answer
        call.b_ack_body = body
        call.b_ack_pending = False
        self._send_ack(fork, body)

    # -- in-dialog requests --------------------------------------------------------------------
    def on_in_dialog(self, request: SipRequest, transaction: ServerTransaction) -> None:
        entry = self.dialogs.get((request.call_id, request.to.tag or ""))
        if entry is None or entry[0].state is CallState.ENDED:
            self._respond(transaction, request, 481, "Call/Transaction Does Not Exist")
            return
        call, side = entry
        if len(call.legs) < 2:
            self._respond(transaction, request, 491 if request.method == "INVITE" else 481)
            return
        if not call.legs[side].dialog.accept_remote_request(request):
            self._respond(transaction, request, 500, "CSeq out of order")
            return
        if request.method == "BYE":
            self._spawn(self._answer_bye(call, side, request, transaction))
            return
        if call.emergency is not None and side == "a":
            refusal = _emergency_in_dialog_refusal(request)
            if refusal is not None:  # EM-40: the PSAP is never held or transferred away
                log.info("emergency.feature_refused", call_id=call.call_id,
                         method=request.method, reason=refusal)
                self._respond(transaction, request, 403, refusal)
                return
        if request.method == "REFER":
            self._spawn(self._transfer(call, side, request, transaction))
            return
        if request.method == "NOTIFY":
            self._respond(transaction, request, 200)  # progress of a transfer we asked for
            return
        self._spawn(self._relay_in_dialog(call, side, request, transaction))

    async def _relay_in_dialog(self, call: Call, side: str, request: SipRequest,
                               transaction: ServerTransaction) -> None:
        """Carry re-INVITE, UPDATE, INFO, OPTIONS... to the other leg and its answer back."""
        other = call.legs[_OTHER[side]]
        other_dialog, other_flow = other.dialog, other.flow
        from_tag, to_tag = call.legs[side].media_tag, other.media_tag
        body = request.body
        content_type = request.header("Content-Type")
        multipart = (content_type or "").lower().startswith("multipart/")
        is_offer = request.method in ("INVITE", "UPDATE") and bool(body)
        if (call.emergency is not None and side == "a" and is_offer and multipart
                and b"application/pidf+xml" in body.lower()):
            # EM-42: a device's location update goes to the PSAP at most every 10 s; a
            # newer one arriving sooner is held back and sent when the interval is over
            now = time.monotonic()
            if now - call.location_sent_at < LOCATION_UPDATE_INTERVAL:
                first_held = call.pending_location is None
                call.pending_location = (content_type or "", body)
                body, content_type, multipart = _sdp_of(request), "application/sdp", False
                if first_held:
                    self._spawn(self._send_held_location(call))
            else:
                call.location_sent_at = now
        if is_offer and not call.fax and b"m=image" in body and b"t38" in body.lower():
            call.fax = True  # a fax re-INVITE (T.38): the fax duration cap applies
            self._schedule_duration_cut(call)
        if is_offer and call.media and self.media is not None:
            try:
                if multipart:
                    # an SDP with other parts (a device's updated PIDF-LO during an
                    # emergency call, EM-42): only the SDP part is rewritten
                    content_type, body = await self._offer_multipart(
                        call, from_tag, content_type or "", body)
                else:
                    body = await self.media.offer(call.call_id, from_tag, body)
            except MediaError as exc:
                self._respond(transaction, request, exc.status, exc.reason)
                return
        headers = []
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        for name in ("Info-Package", "Event", "Reason", "Geolocation",
                     "Geolocation-Routing"):
            if name.startswith("Geolocation") and call.emergency is None:
                continue
            value = request.header(name)
            if value is not None:
                headers.append((name, value))
        if request.method in ("INVITE", "UPDATE"):
            headers.append(("Contact", self._contact(other_flow)))
        out = other_dialog.create_request(
            request.method, self._sent_by(other_flow), transport=other_flow.transport.upper(),
            extra_headers=headers, body=body,
        )
        future: asyncio.Future = asyncio.get_running_loop().create_future()

        def listener(response: SipResponse | None) -> None:
            if response is None:
                if not future.done():
                    future.set_result(None)
                return
            if response.status >= 200 and not future.done():
                future.set_result(response)

        self.core.start_request(out, other_flow, listener)
        response = await future
        if is_offer and call.media and (response is None or response.status >= 300):
            # the other party refused the offer: a WebRTC bridge undoes its half of it
            rejected = getattr(self.media, "offer_rejected", None)
            if rejected is not None:
                await rejected(call.call_id, from_tag)
        if response is None:
            self._respond(transaction, request, 408, "No response from the other party")
            return
        answer = response.body
        if request.method == "INVITE" and 200 <= response.status < 300:
            ack = other_dialog.create_request("ACK", self._sent_by(other_flow),
                                              transport=other_flow.transport.upper(),
                                              cseq=out.cseq.seq)
            self.core.send_stateless(ack, other_flow)
        if is_offer and response.status < 300:
            call.legs[side].sdp = request.body
            if answer:
                other.sdp = answer
        if is_offer and answer and response.status < 300 and call.media and self.media:
            try:
                answer = await self.media.answer(call.call_id, from_tag, to_tag, answer)
            except MediaError as exc:
                self._respond(transaction, request, exc.status, exc.reason)
                return
        extra = []
        if request.method in ("INVITE", "UPDATE") and response.status < 300:
            extra.append(("Contact", self._contact(call.legs[side].flow)))
        if answer and response.header("Content-Type"):
            extra.append(("Content-Type", response.header("Content-Type")))
        resp = make_response(request, response.status, response.reason,
                             headers=[("Server", self.server_header), *extra], body=answer)
        self.core.respond(transaction, resp)


    async def _send_held_location(self, call: Call) -> None:
        """Send the PSAP the latest location update held back by the interval, in a
        re-INVITE carrying the caller's current SDP (EM-42)."""
        delay = call.location_sent_at + LOCATION_UPDATE_INTERVAL - time.monotonic()
        await asyncio.sleep(max(0.0, delay))
        held, call.pending_location = call.pending_location, None
        leg_a, leg_b = call.legs.get("a"), call.legs.get("b")
        if held is None or leg_a is None or leg_b is None or call.state is not (
                CallState.CONFIRMED):
            return
        content_type, body = held
        try:
            if call.media and self.media is not None:
                content_type, body = await self._offer_multipart(
                    call, leg_a.media_tag, content_type, body)
        except MediaError as exc:
            log.info("emergency.location_update_failed", call_id=call.call_id, error=str(exc))
            return
        call.location_sent_at = time.monotonic()
        request = leg_b.dialog.create_request(
            "INVITE", self._sent_by(leg_b.flow), transport=leg_b.flow.transport.upper(),
            extra_headers=[("Contact", self._contact(leg_b.flow)),
                           ("Content-Type", content_type)], body=body)
        try:
            response = await self.core.request(request, leg_b.flow)
        except RequestTimeout:
            response = None
        if response is not None and 200 <= response.status < 300:
            ack = leg_b.dialog.create_request("ACK", self._sent_by(leg_b.flow),
                                              transport=leg_b.flow.transport.upper(),
                                              cseq=request.cseq.seq)
            self.core.send_stateless(ack, leg_b.flow)
            answer = _sdp_of(response)
            if answer and call.media and self.media is not None:
                with contextlib.suppress(MediaError):
                    await self.media.answer(call.call_id, leg_a.media_tag, leg_b.media_tag,
                                            answer)
        log.info("emergency.location_update_sent", call_id=call.call_id,
                 status=response.status if response else None)

    async def _offer_multipart(self, call: Call, from_tag: str, content_type: str,
                               body: bytes) -> tuple[str, bytes]:
        try:
            parts = parse_multipart(content_type, body)
        except Exception as exc:
            raise MediaError(str(exc), 400, "Malformed multipart body") from None
        out = []
        for part in parts:
            if (part.content_type or "").lower().startswith("application/sdp"):
                part = BodyPart(list(part.headers),
                                await self.media.offer(call.call_id, from_tag, part.body))
            out.append(part)
        return build_multipart(out)

    # -- blind transfer (REFER, RFC 3515) -------------------------------------------------------
    async def _transfer(self, call: Call, side: str, refer: SipRequest,
                        transaction: ServerTransaction) -> None:
        """The party on `side` asks that the other party be connected to Refer-To.
        The switch places that call itself, keeps the other party's relay ports, and
        drops the transferor once the target answered (NOTIFY tells it how it went)."""
        try:
            target = parse_name_address(refer.header("Refer-To") or "")
        except GrammarError:
            self._respond(transaction, refer, 400, "Missing or malformed Refer-To")
            return
        if isinstance(target.uri, SipUri) and target.uri.headers:
            self._respond(transaction, refer, 501, "Attended transfer is not supported")
            return
        transferor = call.caller if side == "a" else call.callee
        kept_side = _OTHER[side]
        kept_device = call.callee if side == "a" else call.caller
        psap = call.emergency is not None and side == "b"
        new_callee = None
        targets: list[tuple[str, Flow]] = []
        if psap:
            # EM-40: the PSAP may transfer the caller (to another centre, an interpreter):
            # the new leg goes out through the PSAP's own trunk connection
            if not isinstance(target.uri, SipUri | TelUri):
                self._respond(transaction, refer, 400, "Refer-To must be a SIP or tel URI")
                return
            flow = call.legs["b"].flow
            host = getattr(target.uri, "host", None)
            if host and self.trunks is not None:
                # the Refer-To's own host (another PSAP, an interpreter service); the
                # PSAP's connection when it names none or cannot be reached
                port = getattr(target.uri, "port", None) or (
                    5061 if flow.transport == "tls" else 5060)
                opened = await open_flow(self.core, flow.transport, (host.strip("[]"), port))
                flow = opened or flow
            targets.append((str(target.uri), flow))
        else:
            if transferor is None or kept_device is None:
                self._respond(transaction, refer, 403, "Transfer not allowed on this call")
                return
            destination = self.dialplan_for(transferor.account_id).classify(target.uri)
            if destination.kind is not DestinationKind.INTERNAL:
                self._respond(transaction, refer, 403,
                              "Only transfers to extensions are supported")
                return
            new_callee = self.directory.device_by_extension(
                transferor.account_id, destination.extension or ""
            )
            bindings = (
                await self.store.lookup(self.directory.aor(new_callee.username),
                                        self.wall_clock())
                if new_callee is not None else []
            )
            if not bindings:
                self._respond(transaction, refer, 480, "Transfer target is not registered")
                return
            targets = [(binding.contact, contact_flow(binding)) for binding in bindings]
        self._respond(transaction, refer, 202, "Accepted")
        old = call.legs[side]
        self._notify_refer(old, "SIP/2.0 100 Trying", final=False)

        kept = call.legs[kept_side]
        body = kept.sdp
        if body and call.media and self.media is not None:
            try:
                body = await self.media.offer(call.call_id, kept.media_tag, body)
            except MediaError as exc:
                self._notify_refer(old, f"SIP/2.0 {exc.status} {exc.reason}", final=True)
                return
        t_call_id, t_tag = new_call_id(self.directory.realm), new_tag()
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        forks: list[Fork] = []
        if psap:
            from_value = _strip_tag(
                next((v for n, v in call.forks[-1].request.headers if n == "From"), ""))
            to_value = f"<{targets[0][0]}>"
            extra = [(n, v) for n, v in call.forks[-1].request.headers
                     if n == "P-Asserted-Identity"]
        else:
            from_value = _name_addr(kept_device.display_name,
                                    f"sip:{kept_device.extension}@{self.directory.realm}")
            to_value = f"<sip:{new_callee.extension}@{self.directory.realm}>"
            extra = []
        for uri, flow in targets:
            request = self._invite(uri, flow, body, from_value, to_value, extra, t_call_id,
                                   t_tag)
            forks.append(Fork(request, flow))

        def on_response(fork: Fork, response: SipResponse | None) -> None:
            if response is None or response.status >= 300:
                fork.final = 408 if response is None else response.status
                if all(f.final is not None for f in forks) and not outcome.done():
                    outcome.set_result((None, response))
                return
            if response.status >= 200:
                first = fork.final is None
                fork.final = response.status
                fork.remote_tag = response.to.tag
                fork.dialog = Dialog.as_uac(fork.request, response)
                fork.dialog.confirm(response)
                self._send_ack(fork)
                if outcome.done() or not first:
                    if first:
                        self._send_in_dialog(fork.dialog, fork.flow, "BYE", None)
                    return
                outcome.set_result((fork, response))

        for fork in forks:
            fork.transaction = self.core.start_request(
                fork.request, fork.flow, lambda r, f=fork: on_response(f, r)
            )
        try:
            winner, response = await asyncio.wait_for(outcome, self.no_answer_timeout)
        except TimeoutError:
            winner, response = None, None
        if winner is None:
            for fork in forks:
                if fork.final is None:
                    self._cancel_fork(fork)
            status = f"{response.status} {response.reason}" if response else "408 No answer"
            self._notify_refer(old, f"SIP/2.0 {status}", final=True)
            return
        for fork in forks:
            if fork is not winner and fork.final is None:
                self._cancel_fork(fork)
        answer = response.body
        if answer and call.media and self.media is not None:
            try:
                await self.media.answer(call.call_id, kept.media_tag, old.media_tag, answer)
            except MediaError as exc:
                log.info("call.transfer_media_failed", call_id=call.call_id, error=str(exc))
        if call.state is CallState.ENDED:
            self._send_in_dialog(winner.dialog, winner.flow, "BYE", None)
            return
        self._notify_refer(old, "SIP/2.0 200 OK", final=True)
        self._send_in_dialog(old.dialog, old.flow, "BYE", None)
        self.dialogs.pop((old.dialog.call_id, old.dialog.local_tag), None)
        call.legs[side] = Leg(winner.dialog, winner.flow, old.media_tag, answer,
                              allows_update="UPDATE" in (response.header("Allow") or ""))
        self.dialogs[(t_call_id, t_tag)] = (call, side)
        if side == "a":
            call.caller = new_callee
        elif new_callee is not None:
            call.callee = new_callee
        call.transferred = True
        log.info("call.transferred", call_id=call.call_id,
                 by=transferor.extension if transferor else "psap",
                 to=new_callee.extension if new_callee else targets[0][0])

    def _notify_refer(self, leg: Leg, sipfrag: str, *, final: bool) -> None:
        state = "terminated;reason=noresource" if final else "active;expires=60"
        self._send_in_dialog(
            leg.dialog, leg.flow, "NOTIFY", None,
            headers=[("Event", "refer"), ("Subscription-State", state),
                     ("Content-Type", "message/sipfrag;version=2.0")],
            body=sipfrag.encode() + b"\r\n",
        )

    # -- session refresh (RFC 4028) -------------------------------------------------------------
    async def _refresh_session(self, call: Call) -> None:
        """Every half session interval, refresh each leg (UPDATE where the party allows it,
        else an in-dialog OPTIONS); a leg that does not answer ends the call, so a dead
        phone cannot hold a call (and its fair-use slot) forever."""
        interval = self.session_expires / 2
        while call.state in (CallState.ANSWERED, CallState.CONFIRMED):
            await asyncio.sleep(interval)
            for leg in list(call.legs.values()):
                if call.state is CallState.ENDED:
                    return
                method = "UPDATE" if leg.allows_update else "OPTIONS"
                headers = []
                if method == "UPDATE":
                    headers = [("Session-Expires", f"{int(self.session_expires)};refresher=uac"),
                               ("Supported", "timer")]
                request = leg.dialog.create_request(
                    method, self._sent_by(leg.flow), transport=leg.flow.transport.upper(),
                    extra_headers=headers,
                )
                try:
                    response = await self.core.request(request, leg.flow)
                except RequestTimeout:
                    response = None
                if response is None or response.status in (408, 481):
                    log.info("call.session_expired", call_id=call.call_id,
                             status=response.status if response else None)
                    self._hangup(call, "switch", "session_timeout",
                                 reason='SIP;cause=408;text="Session refresh failed"')
                    return

    # -- ending ------------------------------------------------------------------------------
    def _send_in_dialog(self, dialog: Dialog | None, flow: Flow, method: str,
                        reason: str | None, *, headers=(), body: bytes = b"") -> None:
        if dialog is None:
            return
        extra = [("Reason", reason)] if reason else []
        extra.extend(headers)
        request = dialog.create_request(method, self._sent_by(flow),
                                        transport=flow.transport.upper(), extra_headers=extra,
                                        body=body)
        self.core.start_request(request, flow, lambda r: None)

    async def _answer_bye(self, call: Call, side: str, bye: SipRequest,
                          transaction: ServerTransaction) -> None:
        """A party hung up: BYE to the other leg, the call's record, then the 200. The
        200 waits for the CDR to be on disk, so a party that got it knows the call's
        record survives a crash of the switch (kill -9); BYE retransmissions meanwhile
        are absorbed by the transaction."""
        try:
            if call.state is not CallState.ENDED:
                for other_side, leg in call.legs.items():
                    if other_side != side:
                        self._send_in_dialog(leg.dialog, leg.flow, "BYE", None)
                await self._end(call, "normal", "caller" if side == "a" else "callee")
        finally:
            self._respond(transaction, bye, 200)

    def _hangup(self, call: Call, by: str, cause: str, *, skip: str | None = None,
                reason: str | None = None) -> None:
        """End an established call: BYE to each leg that did not hang up itself."""
        if call.state is CallState.ENDED:
            return
        for side, leg in call.legs.items():
            if side != skip:
                self._send_in_dialog(leg.dialog, leg.flow, "BYE", reason)
        self._spawn(self._end(call, cause, by))

    def hangup(self, call_id: str, cause: str = "admin", reason: str | None = None) -> bool:
        """End a call from the switch's side (admin, limits); True if it existed."""
        call = self.calls.get(call_id)
        if call is None:
            return False
        if call.state in (CallState.ROUTING, CallState.EARLY):
            call.cancelled = True
            for fork in call.forks:
                if fork.final is None:
                    self._cancel_fork(fork)
            self._spawn(self._fail(call, 480, "Call ended by the switch", cause))
        else:
            self._hangup(call, "switch", cause, reason=reason)
        return True

    def _on_media_timeout(self, call_id: str) -> None:
        call = self.calls.get(call_id)
        if call is not None and call.state in (CallState.ANSWERED, CallState.CONFIRMED):
            log.info("call.media_timeout", call_id=call_id)
            self._hangup(call, "switch", "media_timeout",
                         reason='SIP;cause=408;text="Media timeout"')

    def _on_media_dtmf(self, call_id: str, media_tag: str, digit: str, duration_ms: int) -> None:
        """A desk phone's RFC 4733 digit for a browser leg that takes no telephone-event
        RTP: SIP INFO with application/dtmf-relay in that leg's dialog."""
        call = self.calls.get(call_id)
        if call is None or call.state not in (CallState.ANSWERED, CallState.CONFIRMED):
            return
        leg = next((leg for leg in call.legs.values() if leg.media_tag == media_tag), None)
        if leg is None:
            return
        body = f"Signal={digit}\r\nDuration={duration_ms}\r\n".encode()
        log.info("call.dtmf_info", call_id=call_id, digit=digit)
        self._send_in_dialog(leg.dialog, leg.flow, "INFO", None,
                             headers=[("Content-Type", "application/dtmf-relay")], body=body)

    async def _end(self, call: Call, cause: str, by: str) -> None:
        if call.state is CallState.ENDED:
            return
        call.state = CallState.ENDED
        call.ended_at = self.wall_clock()
        call.end_cause = cause
        call.hangup_by = by
        if call.ringing_timer:
            call.ringing_timer.cancel()
        if call.refresh_task is not None and call.refresh_task is not asyncio.current_task():
            call.refresh_task.cancel()
        self.calls.pop(call.call_id, None)
        self.dialogs.pop((call.call_id, call.a_tag), None)
        self.dialogs.pop((call.b_call_id, call.b_tag), None)
        for leg in call.legs.values():  # a transferred leg has a dialog of its own
            self.dialogs.pop((leg.dialog.call_id, leg.dialog.local_tag), None)
        self.metrics.calls_active.dec()
        self.metrics.calls_ended.labels(cause).inc()
        kind = call_kind_label(call.classification)
        if call.answered_at is not None and kind is not None:
            self.metrics.call_duration_seconds.labels(kind).observe(
                max(0.0, call.ended_at - call.answered_at))
        self._untrack_trunk(call)
        self._stop_announcement(call)
        for handle in call.duration_timers:
            handle.cancel()
        if self.fairuse is not None:
            await self.fairuse.call_ended(
                call.call_id, start=call.started_at,
                duration=(call.ended_at - call.answered_at) if call.answered_at else None)
        if call.emergency is not None and self.emergency is not None:
            self.emergency.finished(call.emergency, call, cause)
        stats = None
        if call.media and self.media is not None:
            try:
                result = await self.media.delete(call.call_id)
                stats = result.as_dict() if result is not None else None
            except Exception as exc:
                log.warning("calls.media_delete_failed", error=str(exc))
        log.info("call.ended", call_id=call.call_id, account=call.account_id,
                 cause=cause, hangup_by=by, status=call.final_status)
        if self.on_call_end is not None:
            try:
                result = self.on_call_end(CallEnd(call, stats))
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("calls.record_failed")

    async def close(self, timeout: float = 5.0) -> None:
        """Hang up every call and wait (bounded) for their endings, CDRs included."""
        for call in list(self.calls.values()):
            self.hangup(call.call_id, "shutdown")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()


_OTHER = {"a": "b", "b": "a"}
LOCATION_UPDATE_INTERVAL = 10.0  # seconds between location updates to a PSAP (EM-42)


def _name_addr(display: str | None, uri: str) -> str:
    if display:
        escaped = display.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{uri}>'
    return f"<{uri}>"


_ORIGIN = re.compile(rb"^o=(\S+) (\S+) (\d+) (.*)$", re.M)


def _next_version(sdp: bytes, previous: bytes) -> bytes:
    """``sdp`` with the origin line of ``previous`` and its version plus one: a new offer
    in the session that ``previous`` answered (RFC 3264 §8)."""
    old = _ORIGIN.search(previous)
    if old is None:
        return sdp
    origin = b"o=%s %s %d %s" % (old.group(1), old.group(2), int(old.group(3)) + 1,
                                 old.group(4).rstrip(b"\r"))
    return _ORIGIN.sub(lambda _m: origin + (b"\r" if _m.group(0).endswith(b"\r") else b""),
                       sdp, count=1)


def _strip_tag(from_value: str) -> str:
    """A From header value without its tag parameter."""
    return re.sub(r";\s*tag=[^;>]*", "", from_value)


def _contact_user(uri: str) -> str:
    """The user part of a SIP URI text (the callback number of an emergency INVITE)."""
    user = uri.partition(":")[2].partition("@")[0]
    return user if user and re.fullmatch(r"\+?[0-9A-Za-z._-]+", user) else "switch"


def _sdp_of(request: SipRequest | SipResponse) -> bytes:
    """The SDP of a message: its body, or the application/sdp part of a multipart body
    (an emergency INVITE carrying the device's own PIDF-LO, a PSAP's answer with text)."""
    content_type = (request.header("Content-Type") or "").lower()
    if not request.body or not content_type.startswith("multipart/"):
        return request.body
    try:
        parts = parse_multipart(request.header("Content-Type") or "", request.body)
    except Exception:
        return b""
    for part in parts:
        if (part.content_type or "").lower().startswith("application/sdp"):
            return part.body
    return b""


_HOLD = re.compile(rb"^a=(sendonly|inactive)\s*$|^c=IN IP4 0\.0\.0\.0\s*$", re.M)


def _emergency_in_dialog_refusal(request: SipRequest) -> str | None:
    """Why the caller's in-dialog request is refused during an emergency call: a REFER
    (transfer away) or an offer putting the PSAP on hold (EM-40)."""
    if request.method == "REFER":
        return "Transfer is not allowed during an emergency call"
    if request.method in ("INVITE", "UPDATE") and request.body and _HOLD.search(
            _sdp_of(request)):
        return "Hold is not allowed during an emergency call"
    return None


def _dialled(request: SipRequest) -> str:
    return _uri_number(request.request_uri)


def _uri_number(uri: object) -> str:
    """The number (or user) a URI names: the user part of a SIP URI, a tel: number."""
    if isinstance(uri, SipUri):
        return uri.user_unescaped or ""
    if isinstance(uri, TelUri):
        return uri.number
    return str(uri)

"""ETRUNK: a fake emergency trunk (EMERGENCY.md §3.1) for the integration tests.

`EmergencyTrunkUAS` is a SIP UAS on a loopback UDP port (127.0.0.2 by default, so the
switch can tell it from devices registering from 127.0.0.1 when the trunk's
``addresses`` name it). It records every request it receives as a `RequestRecord`
``(time.monotonic(), raw bytes, parsed SipRequest)`` in ``requests`` (retransmissions
apart, in ``retransmissions``) and answers each new INVITE as its script says, one
behaviour per INVITE, the last one repeating:

- an int final status: 100 Trying, then (``ring=True``) 180 Ringing, then after
  ``answer_delay`` seconds the final response: a 2xx carries our SDP answer, a 424
  carries ``Geolocation-Error: 100`` (RFC 6442), every final is retransmitted until
  its ACK. An int below 200 sends that provisional response and never a final one
  (the INVITE rings until the switch CANCELs it: 200 to the CANCEL, 487 to the INVITE);
- ``"silent"``: nothing at all, not even to its CANCEL (a route that times out);
- a callable ``f(request)`` returning (or awaiting to) a list of items sent in order
  after the 100 Trying: an int status (built as above), a ``SipResponse`` (build it with
  :meth:`EmergencyTrunkUAS.reply` to get the dialog's To tag) or a float, a pause in
  seconds.

ACK gets nothing, BYE 200, CANCEL 200 and 487, REFER 202, other requests 200; a
re-INVITE in an answered call gets 200 with SDP. The trunk can also place a call to
the switch (:meth:`EmergencyTrunkUAS.call`), as a peer trunk would for a PSAP callback.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

_PEERS_DIR = str(Path(__file__).resolve().parent)
if _PEERS_DIR not in sys.path:  # tests/peers is a directory of scripts, not a package
    sys.path.append(_PEERS_DIR)

from sipua import (  # noqa: E402
    DEFAULT_SDP,
    Address,
    Call,
    IncomingInvite,
    InviteWait,
    RequestRecord,
    SipEndpoint,
    host_port,
)

from sip.message import SipRequest, SipResponse  # noqa: E402

__all__ = ["SILENT", "TRUNK_HOST", "Behaviour", "EmergencyTrunkUAS", "RequestRecord"]

TRUNK_HOST = "127.0.0.2"
SILENT = "silent"

ResponseItem = SipResponse | int | float
ScriptFunction = Callable[[SipRequest], Sequence[ResponseItem] | Awaitable[Sequence[ResponseItem]]]
Behaviour = int | str | ScriptFunction


def _check_script(script: Iterable[Behaviour]) -> list[Behaviour]:
    items = list(script)
    if not items:
        raise ValueError("the trunk's script needs at least one behaviour")
    for index, item in enumerate(items):
        if isinstance(item, bool):
            raise ValueError(f"script[{index}]: {item!r} is not a behaviour")
        if isinstance(item, int):
            if not 100 < item < 700:
                raise ValueError(f"script[{index}]: status {item} is not 101..699")
        elif isinstance(item, str):
            if item != SILENT:
                raise ValueError(f"script[{index}]: {item!r} (the only word is {SILENT!r})")
        elif not callable(item):
            raise ValueError(
                f"script[{index}]: {item!r} is neither a status, {SILENT!r} nor a callable"
            )
    return items


class EmergencyTrunkUAS(SipEndpoint):
    """A scripted UAS standing for an emergency trunk (ETRUNK-1/2)."""

    user = "etrunk"

    def __init__(
        self,
        script: Iterable[Behaviour] = (200,),
        *,
        host: str = TRUNK_HOST,
        port: int = 0,
        ring: bool = False,
        answer_delay: float = 0.0,
    ) -> None:
        super().__init__(host, port)
        self._script = _check_script(script)
        self._next = 0
        self.ring = ring
        self.answer_delay = answer_delay
        self.behaviours_used: list[Behaviour] = []  # what each new INVITE got, in order
        self.answered: list[Call] = []  # calls we answered with a 2xx
        self.outbound: list[Call] = []  # calls we placed to the switch
        self._invites_consumed: set[int] = set()
        self._consumed_by_method: set[int] = set()

    async def __aenter__(self) -> EmergencyTrunkUAS:
        await self.start()
        return self

    # -- the script ---------------------------------------------------------------------------
    @property
    def script(self) -> list[Behaviour]:
        return list(self._script)

    @script.setter
    def script(self, script: Iterable[Behaviour]) -> None:
        """A new script, started from its first behaviour at the next INVITE."""
        self._script = _check_script(script)
        self._next = 0

    def _next_behaviour(self) -> Behaviour:
        behaviour = self._script[min(self._next, len(self._script) - 1)]
        self._next += 1
        return behaviour

    # -- what was received ------------------------------------------------------------------
    def records(self, method: str) -> list[RequestRecord]:
        return [r for r in self.requests if r.request.method == method.upper()]

    @property
    def invites(self) -> list[RequestRecord]:
        """The INVITEs that started a call (re-INVITEs are in ``reinvites``)."""
        return [r for r in self.records("INVITE") if not r.request.to.tag]

    @property
    def reinvites(self) -> list[RequestRecord]:
        return [r for r in self.records("INVITE") if r.request.to.tag]

    async def wait_invite(self, timeout: float = 5.0) -> RequestRecord | None:
        """The next call-starting INVITE not yet returned (None after ``timeout``)."""
        return await self._wait_record(
            lambda r: r.request.method == "INVITE" and not r.request.to.tag,
            self._invites_consumed,
            timeout,
        )

    async def wait_request(self, method: str, timeout: float = 5.0) -> RequestRecord | None:
        """The next request of ``method`` not yet returned by ``wait_request``."""
        return await self._wait_record(
            lambda r: r.request.method == method.upper(), self._consumed_by_method, timeout
        )

    # -- answering ------------------------------------------------------------------------------
    def reply(
        self,
        request: SipRequest,
        status: int,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
    ) -> SipResponse:
        """A response to an INVITE this trunk received, with the To tag of its dialog
        (for script callables); a 2xx without ``body`` carries our SDP answer."""
        via = request.top_via
        state = self._incoming.get(via.branch or "") if via is not None else None
        if state is None:
            raise ValueError(f"no INVITE {request.call_id} received by this trunk")
        return self.invite_response(state, status, reason, headers=headers, body=body)

    async def on_new_invite(self, state: IncomingInvite) -> None:
        behaviour = self._next_behaviour()
        self.behaviours_used.append(behaviour)
        if behaviour == SILENT:
            state.silent = True
            return
        self.send_invite_response(state, self.invite_response(state, 100))
        if callable(behaviour):
            items = behaviour(state.request)
            if inspect.isawaitable(items):
                items = await items
            for item in items:
                if isinstance(item, float):
                    await asyncio.sleep(item)
                elif isinstance(item, int) and not isinstance(item, bool):
                    self._send_status(state, item)
                elif isinstance(item, SipResponse):
                    self.send_invite_response(state, item)
                else:
                    raise TypeError(
                        f"script callable gave {item!r}: not a status, "
                        "a SipResponse or a pause in seconds"
                    )
            return
        assert isinstance(behaviour, int)
        if behaviour < 200:
            self._send_status(state, behaviour)
            return  # rings until CANCEL
        if self.ring:
            self._send_status(state, 180)
        if self.answer_delay > 0:
            await asyncio.sleep(self.answer_delay)
        self._send_status(state, behaviour)

    def _send_status(self, state: IncomingInvite, status: int) -> None:
        try:
            response = self.invite_response(state, status)
        except ValueError:  # an offer we cannot answer
            response = self.invite_response(state, 488)
        self.send_invite_response(state, response)

    def on_answered(self, call: Call) -> None:
        self.answered.append(call)

    # -- calling the switch -------------------------------------------------------------------
    async def call(
        self, switch_addr: Address, to_number: str, from_number: str, *,
        sdp: bytes | None = DEFAULT_SDP, headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None, content_type: str | None = None,
        from_display: str | None = None, timeout: float = 10.0, wait: InviteWait = "final",
    ) -> Call:  # fmt: skip
        """An inbound call to the switch (no digest: a peer trunk is trusted by its source
        address): ``INVITE sip:<to_number>@<switch>`` from ``<sip:<from_number>@<our
        host>>``. Returns the `Call` (``.final``, ``.status``, ``.bye()``) when ``wait``
        is reached; 1xx/2xx are collected and the final response ACKed."""
        request_uri = f"sip:{to_number}@{host_port(switch_addr)}"
        from_value = f"<sip:{from_number}@{self.host}>"
        if from_display:
            from_value = f'"{from_display}" {from_value}'
        call = await self.place_call(
            request_uri, switch_addr, from_value=from_value,
            to_value=f"<sip:{to_number}@{switch_addr[0]}>", sdp=sdp, headers=headers,
            body=body, content_type=content_type, timeout=timeout, wait=wait,
        )  # fmt: skip
        self.outbound.append(call)
        return call

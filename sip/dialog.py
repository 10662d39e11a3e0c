"""SIP dialogs (RFC 3261 §12), sans-I/O.

A `Dialog` holds what both ends agreed on: Call-ID, local and remote tags,
local and remote CSeq, the remote target (Contact) and the route set. It builds
in-dialog requests (BYE, re-INVITE, UPDATE, INFO, ACK, ...) with the right
Request-URI and Route headers (loose routing, RFC 3261 §12.2.1.1) and checks
incoming in-dialog requests for CSeq order.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .message import SipRequest, SipResponse
from .transaction import new_branch


def new_tag() -> str:
    return secrets.token_hex(6)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"


@dataclass(slots=True)
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str | None
    local_uri: str  # our From/To header value without tag (name-addr text)
    remote_uri: str
    remote_target: str  # Request-URI for in-dialog requests (the peer's Contact)
    route_set: list[str] = field(default_factory=list)  # Route header values, in order
    local_seq: int = 0
    remote_seq: int | None = None
    secure: bool = False
    early: bool = True

    @property
    def id(self) -> tuple[str, str, str | None]:
        return (self.call_id, self.local_tag, self.remote_tag)

    # -- creation -----------------------------------------------------------------------
    @classmethod
    def as_uac(cls, request: SipRequest, response: SipResponse) -> Dialog:
        """The dialog a UAC gets from a 1xx-with-tag or 2xx to its INVITE (§12.1.2)."""
        contact = _first_contact_uri(response)
        routes = list(reversed(_route_values(response, "Record-Route")))
        return cls(
            call_id=request.call_id,
            local_tag=request.from_.tag or "",
            remote_tag=response.to.tag,
            local_uri=_without_tag(request.header("From") or ""),
            remote_uri=_without_tag(request.header("To") or ""),
            remote_target=contact or request.uri,
            route_set=routes,
            local_seq=request.cseq.seq,
            remote_seq=None,
            secure=request.uri.lower().startswith("sips:"),
            early=response.status < 200,
        )

    @classmethod
    def as_uas(cls, request: SipRequest, local_tag: str) -> Dialog:
        """The dialog a UAS creates when it answers an INVITE with a tag (§12.1.1)."""
        contact = _first_contact_uri(request)
        return cls(
            call_id=request.call_id,
            local_tag=local_tag,
            remote_tag=request.from_.tag,
            local_uri=_without_tag(request.header("To") or ""),
            remote_uri=_without_tag(request.header("From") or ""),
            remote_target=contact or "",
            route_set=_route_values(request, "Record-Route"),
            local_seq=0,
            remote_seq=request.cseq.seq,
            secure=request.uri.lower().startswith("sips:"),
            early=True,
        )

    # -- updates -------------------------------------------------------------------------
    def confirm(self, response: SipResponse | None = None) -> None:
        """A 2xx arrived (UAC) or was sent (UAS): the dialog is confirmed."""
        self.early = False
        if response is not None:
            if response.to.tag:
                self.remote_tag = response.to.tag
            contact = _first_contact_uri(response)
            if contact:
                self.remote_target = contact
            routes = _route_values(response, "Record-Route")
            if routes:
                self.route_set = list(reversed(routes))

    def accept_remote_request(self, request: SipRequest) -> bool:
        """Check an in-dialog request's CSeq (§12.2.2): False means answer 500.
        A target refresh (re-INVITE, UPDATE) updates the remote target."""
        seq = request.cseq.seq
        if request.method not in ("ACK", "CANCEL"):
            if self.remote_seq is not None and seq <= self.remote_seq:
                return False
            self.remote_seq = seq
        if request.method in ("INVITE", "UPDATE"):
            contact = _first_contact_uri(request)
            if contact:
                self.remote_target = contact
        return True

    # -- building requests ----------------------------------------------------------------------
    def create_request(
        self,
        method: str,
        via_sent_by: str,
        *,
        transport: str = "UDP",
        extra_headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        cseq: int | None = None,
    ) -> SipRequest:
        """An in-dialog request (§12.2.1.1). ACK and CANCEL reuse the given cseq; every
        other method takes the next local sequence number."""
        if cseq is None:
            self.local_seq += 1
            cseq = self.local_seq
        uri = self.remote_target
        routes = list(self.route_set)
        if routes and ";lr" not in routes[0].lower():
            # strict router: its URI becomes the Request-URI, the remote target goes last
            uri = routes[0].strip("<>").split(">")[0]
            routes = routes[1:] + [f"<{self.remote_target}>"]
        to_value = self.remote_uri + (f";tag={self.remote_tag}" if self.remote_tag else "")
        headers = [
            ("Via", f"SIP/2.0/{transport} {via_sent_by};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"{self.local_uri};tag={self.local_tag}"),
            ("To", to_value),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
        ]
        headers.extend(("Route", r) for r in routes)
        if extra_headers:
            headers.extend(extra_headers)
        return SipRequest(method, uri, headers, body)


def _first_contact_uri(message) -> str | None:
    try:
        contacts = message.contacts
    except Exception:  # a malformed Contact is treated as absent
        return None
    if not contacts or isinstance(contacts, str):
        return None
    return str(contacts[0].uri)


def _route_values(message, name: str) -> list[str]:
    try:
        return message.header_values(name)
    except Exception:
        return []


def _without_tag(value: str) -> str:
    """A From/To value without its tag parameter."""
    from .headers import parse_name_address

    try:
        address = parse_name_address(value)
    except Exception:
        return value
    address.params.pop("tag", None)
    return str(address)

"""Checks a UAS applies to a well-formed request before acting on it (RFC 3261 §8.2).

Each check answers with a `Rejection` (status, reason, extra headers) or None.
The order follows RFC 3261 §8.2 and the verdicts of RFC 4475 §3.1.2.17-18
(an unknown method is answered 501 before a CSeq mismatch gets 400).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .message import SipRequest
from .uri import AbsoluteUri

KNOWN_METHODS = frozenset(
    ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
     "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE")
)


@dataclass(slots=True)
class Rejection:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)


def check_request(
    request: SipRequest,
    *,
    allowed_methods: Collection[str],
    supported_schemes: Collection[str] = ("sip", "sips", "tel"),
    supported_options: Collection[str] = (),
) -> Rejection | None:
    """Method (501/405), CSeq method (400), URI scheme (416), Require (420)."""
    allow = ", ".join(sorted(allowed_methods))
    method = request.method
    if method not in allowed_methods:
        if method in KNOWN_METHODS:
            return Rejection(405, "Method Not Allowed", [("Allow", allow)])
        return Rejection(501, "Not Implemented", [("Allow", allow)])
    if request.cseq.method != method:
        return Rejection(400, "CSeq method does not match the request method")
    uri = request.request_uri
    if isinstance(uri, AbsoluteUri):
        # RFC 5031 service URNs (urn:service:sos...) are dialled in INVITEs: the dial
        # plan recognises them; any other absolute URI is not served
        if not (method in ("INVITE", "ACK", "CANCEL")
                and str(uri).lower().startswith("urn:service:")):
            return Rejection(416, "Unsupported URI Scheme")
    elif uri.scheme not in supported_schemes:
        return Rejection(416, "Unsupported URI Scheme")
    if method not in ("ACK", "CANCEL"):
        unsupported = [t for t in request.option_tags("Require") if t not in supported_options]
        if unsupported:
            return Rejection(420, "Bad Extension", [("Unsupported", ", ".join(unsupported))])
    return None


def check_body(
    request: SipRequest, *, accepted_types: Collection[str] = ("application/sdp",)
) -> Rejection | None:
    """Content-Type of the body (415 with Accept) and the Accept header (406)."""
    accept_value = ", ".join(accepted_types)
    if request.body and request.content_type not in accepted_types:
        if not (request.content_type or "").startswith("multipart/"):
            return Rejection(415, "Unsupported Media Type", [("Accept", accept_value)])
    accept = request.header_values("Accept")
    if accept:
        offered = {a.split(";")[0].strip().lower() for a in accept}
        if not offered & set(accepted_types) and "*/*" not in offered:
            return Rejection(406, "Not Acceptable", [("Accept", accept_value)])
    return None

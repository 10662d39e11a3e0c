"""The SIP message model: requests, responses, headers and their serialisation.

Headers are kept as an ordered list of (canonical name, raw value) pairs, as they
arrived; structured views (Via, To, CSeq, ...) are parsed on first use and
cached. The parser validates the headers every element relies on up front, so
the cached views of a parsed message do not raise.
"""

from __future__ import annotations

from collections.abc import Iterable

from .grammar import GrammarError
from .headers import (
    CANONICAL_NAMES,
    KNOWN_SPELLINGS,
    LIST_HEADERS,
    STAR,
    CSeq,
    NameAddress,
    Via,
    canonical_name,
    parse_contact_list,
    parse_content_type,
    parse_cseq,
    parse_name_address,
    parse_option_tags,
    parse_via_value,
    split_list,
)
from .uri import Uri, parse_uri

KNOWN_NAMES = frozenset(CANONICAL_NAMES.values())

REASON_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated", 200: "OK", 202: "Accepted",
    204: "No Notification", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    412: "Conditional Request Failed", 413: "Request Entity Too Large",
    414: "Request-URI Too Long", 415: "Unsupported Media Type", 416: "Unsupported URI Scheme",
    417: "Unknown Resource-Priority", 420: "Bad Extension", 421: "Extension Required",
    422: "Session Interval Too Small", 423: "Interval Too Brief", 424: "Bad Location Information",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 433: "Anonymity Disallowed",
    437: "Unsupported Certificate", 438: "Invalid Identity Header", 439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded", 469: "Bad Info Package", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required", 500: "Server Internal Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large", 555: "Push Notification Service Not Supported",
    580: "Precondition Failure", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}


def reason_phrase(status: int) -> str:
    return REASON_PHRASES.get(status) or REASON_PHRASES.get(status // 100 * 100, "Unknown")


class SipMessage:
    """Common part of requests and responses."""

    __slots__ = ("headers", "body", "_cache")

    def __init__(self, headers: Iterable[tuple[str, str]] | None = None, body: bytes = b""):
        self.headers: list[tuple[str, str]] = list(headers) if headers else []
        self.body = body
        self._cache: dict[str, object] = {}

    # -- raw access -------------------------------------------------------------
    # Header names are stored canonically (the parser and the mutators canonicalise), so a
    # known header is found by plain comparison; unknown names compare case-insensitively.
    def header(self, name: str) -> str | None:
        """The first value of a header (compact forms accepted), or None."""
        cname = KNOWN_SPELLINGS.get(name)
        if cname is None:
            cname = canonical_name(name)
            if cname not in KNOWN_NAMES:
                lower = cname.lower()
                for hname, value in self.headers:
                    if hname.lower() == lower:
                        return value
                return None
        for hname, value in self.headers:
            if hname == cname:
                return value
        return None

    def header_lines(self, name: str) -> list[str]:
        """Every raw value of a header, one per header line, unsplit."""
        cname = KNOWN_SPELLINGS.get(name)
        if cname is None:
            cname = canonical_name(name)
            if cname not in KNOWN_NAMES:
                lower = cname.lower()
                return [value for hname, value in self.headers if hname.lower() == lower]
        return [value for hname, value in self.headers if hname == cname]

    def header_values(self, name: str) -> list[str]:
        """All values of a header; list headers are split at top-level commas."""
        lines = self.header_lines(name)
        if canonical_name(name).lower() not in LIST_HEADERS:
            return lines
        out: list[str] = []
        for line in lines:
            out.extend(split_list(line))
        return out

    def _list_values(self, cname: str) -> list[str]:
        """header_values of a known list header given by its canonical name."""
        out: list[str] = []
        for hname, value in self.headers:
            if hname == cname:
                stripped = value.strip()
                if stripped and "," not in stripped:
                    out.append(stripped)
                else:
                    out.extend(split_list(value))
        return out

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None

    def set_header(self, name: str, value: str) -> None:
        """Replace every value of a header with one value (kept at the first position)."""
        cname = canonical_name(name)
        lower = cname.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for hname, hvalue in self.headers:
            if hname.lower() == lower:
                if not placed:
                    out.append((cname, value))
                    placed = True
            else:
                out.append((hname, hvalue))
        if not placed:
            out.append((cname, value))
        self.headers = out
        self._cache.clear()

    def add_header(self, name: str, value: str) -> None:
        self.headers.append((canonical_name(name), value))
        self._cache.clear()

    def prepend_header(self, name: str, value: str) -> None:
        """Insert a value before the first occurrence of that header (e.g. a new Via)."""
        cname = canonical_name(name)
        lower = cname.lower()
        for i, (hname, _) in enumerate(self.headers):
            if hname.lower() == lower:
                self.headers.insert(i, (cname, value))
                break
        else:
            self.headers.insert(0, (cname, value))
        self._cache.clear()

    def remove_header(self, name: str) -> None:
        lower = canonical_name(name).lower()
        self.headers = [(h, v) for h, v in self.headers if h.lower() != lower]
        self._cache.clear()

    # -- structured views (cached) ------------------------------------------------
    # Each view is parsed once and kept in _cache under its key (mutators clear the cache;
    # callers that edit `headers` directly drop the keys they invalidate).
    def _cached(self, key: str, build):
        try:
            return self._cache[key]
        except KeyError:
            value = build()
            self._cache[key] = value
            return value

    @property
    def vias(self) -> list[Via]:
        try:
            return self._cache["vias"]  # type: ignore[return-value]
        except KeyError:
            pass
        vias = [parse_via_value(v) for v in self._list_values("Via")]
        self._cache["vias"] = vias
        return vias

    @property
    def top_via(self) -> Via | None:
        vias = self.vias
        return vias[0] if vias else None

    @property
    def from_(self) -> NameAddress:
        try:
            return self._cache["from"]  # type: ignore[return-value]
        except KeyError:
            pass
        value = parse_name_address(self._required("From"))
        self._cache["from"] = value
        return value

    @property
    def to(self) -> NameAddress:
        try:
            return self._cache["to"]  # type: ignore[return-value]
        except KeyError:
            pass
        value = parse_name_address(self._required("To"))
        self._cache["to"] = value
        return value

    @property
    def call_id(self) -> str:
        try:
            return self._cache["call-id"]  # type: ignore[return-value]
        except KeyError:
            pass
        value = self._required("Call-ID").strip()
        self._cache["call-id"] = value
        return value

    @property
    def cseq(self) -> CSeq:
        try:
            return self._cache["cseq"]  # type: ignore[return-value]
        except KeyError:
            pass
        value = parse_cseq(self._required("CSeq"))
        self._cache["cseq"] = value
        return value

    @property
    def contacts(self) -> list[NameAddress] | str:
        """The Contact addresses, or "*" for a wildcard (REGISTER)."""
        try:
            return self._cache["contacts"]  # type: ignore[return-value]
        except KeyError:
            pass
        value = parse_contact_list(self._list_values("Contact"))
        self._cache["contacts"] = value
        return value

    @property
    def content_type(self) -> str | None:
        value = self.header("Content-Type")
        if value is None:
            return None
        try:
            return self._cache["ctype"]  # type: ignore[return-value]
        except KeyError:
            pass
        ctype = parse_content_type(value)[0]
        self._cache["ctype"] = ctype
        return ctype

    @property
    def expires(self) -> int | None:
        """The Expires header as seconds; None when absent or not a number
        (RFC 4475 §3.1.2.4: an oversize value may be treated as the default)."""
        value = self.header("Expires")
        if value is None:
            return None
        value = value.strip()
        if not value.isdigit():
            return None
        return min(int(value), 2**32 - 1)

    @property
    def max_forwards(self) -> int | None:
        value = self.header("Max-Forwards")
        return int(value.strip()) if value is not None else None

    def option_tags(self, name: str) -> list[str]:
        return parse_option_tags(self.header_lines(name))

    def _required(self, name: str) -> str:
        value = self.header(name)
        if value is None:
            raise GrammarError(f"missing {name} header")
        return value

    # -- serialisation ---------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """Serialise, with a Content-Length that matches the body."""
        lines = [self.start_line()]
        for name, value in self.headers:
            if name == "Content-Length":
                continue
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(self.body)}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class SipRequest(SipMessage):
    __slots__ = ("method", "uri", "version")

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
    ):
        super().__init__(headers, body)
        self.method = method
        self.uri = uri
        self.version = version

    @property
    def request_uri(self) -> Uri:
        return self._cached("ruri", lambda: parse_uri(self.uri))

    def start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri}>"


class SipResponse(SipMessage):
    __slots__ = ("status", "reason", "version")

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        version: str = "SIP/2.0",
    ):
        super().__init__(headers, body)
        self.status = status
        self.reason = reason if reason is not None else reason_phrase(status)
        self.version = version

    def start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason}>"


# Headers a response copies from its request (RFC 3261 §8.2.6.2).
_COPIED_TO_RESPONSE = ("via", "from", "to", "call-id", "cseq")


def make_response(
    request: SipRequest | list[tuple[str, str]],
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipResponse:
    """Build a response to a request (or to the raw headers of a request that could
    not be fully parsed): Via, From, To, Call-ID and CSeq are copied; a To tag is
    added when given and the To has none."""
    raw = request.headers if isinstance(request, SipRequest) else request
    copied: list[tuple[str, str]] = []
    for name, value in raw:
        lower = name.lower()
        if lower in _COPIED_TO_RESPONSE:
            if lower == "to" and to_tag and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            copied.append((name, value))
    response = SipResponse(status, reason, copied, body)
    for name, value in headers:
        response.headers.append((canonical_name(name), value))
    return response


__all__ = [
    "STAR",
    "SipMessage",
    "SipRequest",
    "SipResponse",
    "make_response",
    "reason_phrase",
]

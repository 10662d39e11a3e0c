"""Structured SIP header values: Via, name-addr (To/From/Contact/Route), CSeq.

Every parser here raises GrammarError on malformed input; the message parser
turns that into a 400 with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .grammar import (
    SIMPLE_PARAMS,
    TOKEN_CHARS,
    GrammarError,
    format_params,
    parse_params,
    quote,
    scan_quoted,
    scan_token,
    simple_params,
    skip_ws,
    split_top_level,
)
from .uri import SIMPLE_SIP_URI_PATTERN, SipUri, Uri, parse_uri, simple_sip_uri, split_hostport

# Compact forms (RFC 3261 §7.3.3 and extensions) and canonical spellings.
COMPACT_FORMS = {
    "i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
    "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
    "v": "Via", "o": "Event", "r": "Refer-To", "b": "Referred-By", "u": "Allow-Events",
    "x": "Session-Expires", "y": "Identity", "a": "Accept-Contact", "j": "Reject-Contact",
    "d": "Request-Disposition",
}
_CANONICAL = [
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Accept-Resource-Priority",
    "Alert-Info", "Allow", "Allow-Events", "Authentication-Info", "Authorization", "Call-ID",
    "Call-Info", "Contact", "Content-Disposition", "Content-Encoding", "Content-ID",
    "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date", "Error-Info",
    "Event", "Expires", "Flow-Timer", "From", "Geolocation", "Geolocation-Error",
    "Geolocation-Routing", "History-Info", "Identity", "In-Reply-To", "Max-Forwards",
    "Min-Expires", "Min-SE", "MIME-Version", "Organization", "P-Asserted-Identity",
    "P-Preferred-Identity", "Path", "Priority", "Privacy", "Proxy-Authenticate",
    "Proxy-Authorization", "Proxy-Require", "RAck", "Reason", "Record-Route", "Refer-To",
    "Referred-By", "Reject-Contact", "Replaces", "Reply-To", "Request-Disposition", "Require",
    "Resource-Priority", "Retry-After", "Route", "RSeq", "Server", "Service-Route",
    "Session-Expires", "SIP-ETag", "SIP-If-Match", "Subject", "Subscription-State",
    "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via", "Warning",
    "WWW-Authenticate",
]
CANONICAL_NAMES = {name.lower(): name for name in _CANONICAL}

# Headers whose values form a comma-separated list (RFC 3261 §7.3.1) and can be split.
LIST_HEADERS = frozenset(
    name.lower()
    for name in (
        "Via", "Contact", "Route", "Record-Route", "Path", "Service-Route", "Allow",
        "Supported", "Require", "Proxy-Require", "Unsupported", "Accept", "Accept-Encoding",
        "Accept-Language", "Allow-Events", "Content-Encoding", "P-Asserted-Identity",
        "Privacy", "Reason", "Warning", "History-Info", "Call-Info", "Alert-Info", "Error-Info",
        "Geolocation", "Resource-Priority", "Accept-Resource-Priority", "In-Reply-To",
    )
)
# Headers that must appear at most once (RFC 3261 §7.3.1, §20); a second value is a 400.
SINGLE_HEADERS = frozenset(
    ("to", "from", "call-id", "cseq", "max-forwards", "content-length", "content-type",
     "expires", "min-expires")
)

MAX_CSEQ = 2**32 - 1
# Methods of RFC 3261 and its extensions: tokens, so their spelling needs no character check.
KNOWN_METHODS = frozenset(
    ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY",
     "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE")
)


# Spellings seen on almost every message (canonical, lower-case, compact in either case),
# answered without lower-casing. Every key is a token; every value is a known canonical name.
_FAST_CANONICAL = {name: name for name in _CANONICAL}
_FAST_CANONICAL.update({name.lower(): name for name in _CANONICAL})
_FAST_CANONICAL.update(COMPACT_FORMS)
_FAST_CANONICAL.update({k.upper(): v for k, v in COMPACT_FORMS.items()})
KNOWN_SPELLINGS: dict[str, str] = _FAST_CANONICAL


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name (compact forms expanded)."""
    fast = _FAST_CANONICAL.get(name)
    if fast is not None:
        return fast
    lower = name.lower()
    if len(lower) == 1 and lower in COMPACT_FORMS:
        return COMPACT_FORMS[lower]
    return CANONICAL_NAMES.get(lower, name)


@dataclass(slots=True)
class Via:
    """One Via value: SIP/2.0/<transport> host[:port];params."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    protocol: str = "SIP/2.0"

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def is_rfc3261_branch(self) -> bool:
        """True when the branch carries the RFC 3261 magic cookie and something after it."""
        branch = self.branch
        return bool(branch) and branch.startswith("z9hG4bK") and len(branch) > 7

    @property
    def sent_by(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.protocol}/{self.transport} {self.sent_by}{format_params(self.params)}"


# Regular-expression pieces matching exactly the characters the general scanners accept.
_TOKEN_RE = r"[A-Za-z0-9.!%*_+`'~\-]+"
_PARAMS_RE = SIMPLE_PARAMS.pattern
# The usual Via, "SIP/2.0/UDP host[:port];params": hostname or IPv4 sent-by, no LWS other
# than the single gap before sent-by, parameters without quotes. Anything else (IPv6,
# LWS around "/" or ":", a lower-case "sip") goes through the general scanner.
_SIMPLE_VIA = re.compile(
    rf"SIP/2\.0/({_TOKEN_RE})[ \t]+([A-Za-z0-9._-]+)(?::([0-9]{{1,5}}))?({_PARAMS_RE})"
)


def parse_via_value(text: str) -> Via:
    """Parse one Via value (LWS allowed around "/" and ":", RFC 3261 §25.1)."""
    m = _SIMPLE_VIA.fullmatch(text)
    if m is not None:
        transport, host, port_text, params_text = m.groups()
        port = None if port_text is None else int(port_text)
        params = simple_params(params_text)
        if (
            params is not None
            and (port is None or port <= 65535)
            and ("branch" not in params or params["branch"])
        ):
            return Via(transport.upper(), host, port, params, "SIP/2.0")
    return _parse_via_general(text)


def _parse_via_general(text: str) -> Via:
    pos = skip_ws(text, 0)
    parts = []
    for i in range(3):
        tok, pos = scan_token(text, pos)
        if not tok:
            raise GrammarError("malformed Via sent-protocol")
        parts.append(tok)
        pos = skip_ws(text, pos)
        if i < 2:
            if pos >= len(text) or text[pos] != "/":
                raise GrammarError("malformed Via sent-protocol")
            pos = skip_ws(text, pos + 1)
    name, version, transport = parts
    if name.upper() != "SIP":
        raise GrammarError(f"unknown Via protocol {name!r}")
    start = pos
    n = len(text)
    if pos < n and text[pos] == "[":
        end = text.find("]", pos)
        if end < 0:
            raise GrammarError("unterminated IPv6 reference in Via")
        pos = end + 1
    while pos < n and (text[pos] in TOKEN_CHARS or text[pos] == ":") and text[pos] != ";":
        pos += 1
    hostport = text[start:pos]
    if not hostport:
        raise GrammarError("Via without sent-by")
    # LWS allowed around the colon before the port: "host : 5060"
    after = skip_ws(text, pos)
    if after < n and text[after] == ":":
        after = skip_ws(text, after + 1)
        port_start = after
        while after < n and text[after].isdigit():
            after += 1
        hostport = hostport + ":" + text[port_start:after]
        pos = after
    host, port = split_hostport(hostport)
    params, pos = parse_params(text, pos)
    if pos != len(text):
        raise GrammarError("garbage after Via value")
    if "branch" in params and not params["branch"]:
        raise GrammarError("empty Via branch")
    return Via(transport.upper(), host, port, params, f"{name.upper()}/{version}")


@dataclass(slots=True)
class NameAddress:
    """name-addr or addr-spec with header parameters (To, From, Contact, Route, ...)."""

    uri: Uri
    display_name: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def sip_uri(self) -> SipUri | None:
        return self.uri if isinstance(self.uri, SipUri) else None

    def __str__(self) -> str:
        if self.display_name is not None:
            dn = self.display_name
            head = (dn if dn and all(c in TOKEN_CHARS or c == " " for c in dn) else quote(dn))
            head += " "
        else:
            head = ""
        return f"{head}<{self.uri}>{format_params(self.params)}"


STAR = "*"


# The usual name-addr: an optional display name (a quoted string without escapes, or
# tokens separated by spaces), "<URI>" with printable ASCII and no whitespace inside, then
# parameters without quotes or LWS. Anything else goes through the general scanner.
_DISPLAY_RE = rf'(?:"([^"\\]*)"[ \t]*|({_TOKEN_RE}(?:[ \t]+{_TOKEN_RE})*)[ \t]*)?'
_SIMPLE_NAME_ADDR = re.compile(rf"{_DISPLAY_RE}<([!#-;=?-~]+)>({_PARAMS_RE})")
# The same with the usual SIP URI inside the brackets, parsed in the same match.
_SIMPLE_SIP_NAME_ADDR = re.compile(rf"{_DISPLAY_RE}<{SIMPLE_SIP_URI_PATTERN}>({_PARAMS_RE})")


def _display_name(quoted: str | None, words: str | None) -> str | None:
    if quoted is not None:
        return quoted
    if words is not None and (" " in words or "\t" in words):
        return " ".join(words.split())
    return words


def parse_name_address(text: str) -> NameAddress:
    """Parse name-addr / addr-spec followed by parameters (RFC 3261 §20.10, §20.20)."""
    m = _SIMPLE_SIP_NAME_ADDR.fullmatch(text)
    if m is not None:
        quoted, words, scheme, user, password, host, port, uri_params, params_text = m.groups()
        params = simple_params(params_text)
        uri = simple_sip_uri(scheme, user, password, host, port, uri_params)
        if params is not None and uri is not None:
            return NameAddress(uri, _display_name(quoted, words), params)
    else:
        m = _SIMPLE_NAME_ADDR.fullmatch(text)
        if m is not None:
            quoted, words, uri_text, params_text = m.groups()
            params = simple_params(params_text)
            if params is not None:
                return NameAddress(parse_uri(uri_text), _display_name(quoted, words), params)
    return _parse_name_address_general(text)


def _parse_name_address_general(text: str) -> NameAddress:
    pos = skip_ws(text, 0)
    n = len(text)
    display: str | None = None
    if pos < n and text[pos] == '"':
        display, pos = scan_quoted(text, pos)
        pos = skip_ws(text, pos)
        if pos >= n or text[pos] != "<":
            raise GrammarError("display name not followed by <URI>")
    else:
        lt = text.find("<", pos)
        if lt >= 0:
            words = text[pos:lt].split()
            for w in words:
                if not all(c in TOKEN_CHARS for c in w):
                    raise GrammarError(f"display name {text[pos:lt].strip()!r} must be quoted")
            display = " ".join(words) if words else None
            pos = lt
    if pos < n and text[pos] == "<":
        end = text.find(">", pos)
        if end < 0:
            raise GrammarError("unterminated <URI>")
        uri_text = text[pos + 1 : end]
        if uri_text != uri_text.strip():
            raise GrammarError("whitespace inside <URI>")
        uri = parse_uri(uri_text)
        pos = end + 1
    else:
        start = pos
        while pos < n and text[pos] not in "; \t":
            pos += 1
        uri_text = text[start:pos]
        if not uri_text:
            raise GrammarError("missing URI")
        if "?" in uri_text or "," in uri_text:
            raise GrammarError("a URI with headers or commas must be enclosed in <>")
        uri = parse_uri(uri_text)
    params, pos = parse_params(text, pos)
    if pos != n:
        raise GrammarError("garbage after address")
    return NameAddress(uri, display, params)


def parse_contact_list(values: list[str]) -> list[NameAddress] | str:
    """Contact values (already split at commas): a list of addresses, or STAR."""
    if len(values) == 1 and values[0].strip() == "*":
        return STAR
    out = []
    for value in values:
        if value.strip() == "*":
            raise GrammarError("Contact: * mixed with other contacts")
        out.append(parse_name_address(value))
    return out


@dataclass(slots=True, frozen=True)
class CSeq:
    seq: int
    method: str

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"


def parse_cseq(text: str) -> CSeq:
    parts = text.split()
    if len(parts) != 2:
        raise GrammarError("CSeq must be a number and a method")
    number, method = parts
    if not number.isdigit() or len(number) > 12:
        raise GrammarError("CSeq number is not a 32-bit integer")
    seq = int(number)
    if seq > MAX_CSEQ:
        raise GrammarError("CSeq number exceeds 2**32-1")
    if method not in KNOWN_METHODS and not all(c in TOKEN_CHARS for c in method):
        raise GrammarError("CSeq method is not a token")
    return CSeq(seq, method)


def parse_uint(text: str, name: str, maximum: int) -> int:
    text = text.strip()
    if not text.isdigit():
        raise GrammarError(f"{name} is not a number")
    value = int(text)
    if value > maximum:
        raise GrammarError(f"{name} {value} exceeds {maximum}")
    return value


def split_list(value: str) -> list[str]:
    """Split a list header value at top-level commas; empty elements are errors."""
    parts = split_top_level(value, ",")
    out = []
    for part in parts:
        stripped = part.strip()
        if not stripped:
            raise GrammarError("empty element in a comma-separated list")
        out.append(stripped)
    return out


def parse_option_tags(values: list[str]) -> list[str]:
    tags: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part:
                tags.append(part)
    return tags


def parse_content_type(text: str) -> tuple[str, dict[str, str | None]]:
    """"type/subtype;params" → ("type/subtype" lower-cased, params)."""
    pos = skip_ws(text, 0)
    mtype, pos = scan_token(text, pos)
    pos = skip_ws(text, pos)
    if not mtype or pos >= len(text) or text[pos] != "/":
        raise GrammarError("malformed media type")
    pos = skip_ws(text, pos + 1)
    subtype, pos = scan_token(text, pos)
    if not subtype:
        raise GrammarError("malformed media type")
    params, pos = parse_params(text, pos)
    if pos != len(text):
        raise GrammarError("garbage after media type")
    return f"{mtype}/{subtype}".lower(), params

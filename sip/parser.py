"""Parse SIP messages from bytes (RFC 3261 §7, torture cases of RFC 4475 / RFC 5118).

`parse_message` returns a SipRequest or SipResponse, or raises SipParseError.
The error carries the status the request deserves (400, 505, 413), a reason
phrase, whether it was a request, and the raw headers read so far, so the
caller can answer with `make_response(error.headers, error.status, error.reason)`
where a response is possible (RFC 4475: requests get 400, responses are dropped).

`parse_message_safe` wraps it for receive paths: it never raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .grammar import TOKEN_CHARS, GrammarError
from .headers import KNOWN_METHODS, KNOWN_SPELLINGS, SINGLE_HEADERS, canonical_name
from .message import SipMessage, SipRequest, SipResponse
from .uri import SipUri

DEFAULT_MAX_MESSAGE_SIZE = 65535
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")
_LWS = (" ", "\t")
# SINGLE_HEADERS by canonical name (the parser stores names canonically), in the set's own
# order, Content-Length apart: its repetitions are judged by value in parse_message.
_SINGLE_CANONICAL = tuple(
    canonical_name(lower) for lower in SINGLE_HEADERS if lower != "content-length"
)


@dataclass
class SipParseError(Exception):
    reason: str
    status: int = 400
    is_request: bool | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"

    @property
    def can_respond(self) -> bool:
        """A response can be sent when it was a request with a Via to send it back along."""
        if not self.is_request:
            return False
        return any(name == "Via" for name, _ in self.headers)


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        return data[:end], data[end + 4 :]
    # Tolerate bare-LF messages (RFC 3261 §7.5 recommends accepting LF line ends).
    end = data.find(b"\n\n")
    if end >= 0 and b"\r\n" not in data[:end]:
        return data[:end], data[end + 2 :]
    raise SipParseError("header section is not terminated by an empty line")


def _unfold_lines(head: str) -> list[str]:
    """Split the header section into logical lines, joining folded continuations."""
    lines: list[str] = []
    for raw in head.replace("\r\n", "\n").split("\n"):
        if raw and raw[0] in " \t":
            if len(lines) <= 1:
                raise SipParseError("folded line before the first header")
            lines[-1] = lines[-1].rstrip(" \t") + " " + raw.strip(" \t")
        else:
            lines.append(raw)
    return lines


def _split_lines(head: str) -> tuple[list[str], bool]:
    """The header section's lines, and whether they went through _unfold_lines. Usual case:
    CRLF line ends only, split as they are; a folded line among them is noticed while
    reading the headers (it starts with LWS), which then unfolds them."""
    lines = head.split("\r\n")
    if head.count("\n") != len(lines) - 1 or lines[0].startswith(_LWS):
        return _unfold_lines(head), True
    return lines, False


class _FoldedLine(Exception):
    """A header line starts with LWS: the lines need unfolding before they are read."""


def _read_header_lines(
    lines: list[str], unfolded: bool
) -> tuple[list[tuple[str, str]], str | None]:
    """(canonical name, value) of each header line after the start line, and the first
    malformed line's description. Unless the lines went through _unfold_lines, raises
    _FoldedLine at a line starting with LWS (a continuation to join first)."""
    headers: list[tuple[str, str]] = []
    error: str | None = None
    spellings = KNOWN_SPELLINGS
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        cname = spellings.get(name)  # known spellings are tokens without LWS
        if cname is None or not sep:
            if not unfolded and line.startswith(_LWS):
                raise _FoldedLine
            name = name.rstrip(" \t")
            if not sep or _TOKEN.fullmatch(name) is None:
                error = error or f"malformed header line {line[:40]!r}"
                continue
            cname = canonical_name(name)
        headers.append((cname, value.strip(" \t")))
    return headers, error


def _parse_start_line(line: str) -> tuple[bool, tuple]:
    if line.startswith("SIP/") or line[:4].upper() == "SIP/":
        # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        version, sep, rest = line.partition(" ")
        code, sep2, reason = rest.partition(" ")
        if not sep or len(code) != 3 or not code.isdigit():
            raise SipParseError("malformed status line", is_request=False)
        status = int(code)
        if not 100 <= status <= 699:
            raise SipParseError(f"status code {status} out of range", is_request=False)
        if version.upper() != "SIP/2.0":
            raise SipParseError(f"unsupported version {version}", 505, is_request=False)
        return False, (status, reason, version)
    parts = line.split(" ")
    if len(parts) != 3:
        raise SipParseError("malformed request line", is_request=True)
    method, uri, version = parts
    if method not in KNOWN_METHODS and (not method or any(c not in TOKEN_CHARS for c in method)):
        raise SipParseError("method is not a token", is_request=True)
    if not version.upper().startswith("SIP/"):
        raise SipParseError("malformed request line", is_request=True)
    return True, (method, uri, version)


def parse_message(
    data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, datagram: bool = True
) -> SipRequest | SipResponse:
    """Parse one message. On a datagram, a missing Content-Length means the body is
    the rest of the datagram (RFC 3261 §18.3); extra bytes after the body are ignored."""
    if len(data) > max_size:
        raise SipParseError("message too large", 513)
    # Leading CRLFs before a message are ignored (RFC 3261 §7.5).
    if data[:2] == b"\r\n":
        data = data.lstrip(b"\r\n")
    head_bytes, rest = _split_head(data)
    head = head_bytes.decode("utf-8", "surrogateescape")
    lines, unfolded = _split_lines(head)
    try:
        headers, error = _read_header_lines(lines, unfolded)
    except _FoldedLine:
        lines = _unfold_lines(head)
        headers, error = _read_header_lines(lines, True)
    if not lines[0]:
        raise SipParseError("empty start line")
    # The header names present (known names all canonicalise to one spelling); counted
    # per name only when some name repeats.
    counts: set[str] | dict[str, int] = {h[0] for h in headers}
    if len(counts) != len(headers):
        counts = _count_names(headers)

    try:
        is_request, start = _parse_start_line(lines[0])
    except SipParseError as exc:
        exc.headers = headers
        raise

    def fail(reason: str, status: int = 400) -> SipParseError:
        return SipParseError(reason, status, is_request, headers)

    if error:
        raise fail(error)
    if is_request and start[2].upper() != "SIP/2.0":
        raise fail(f"unsupported version {start[2]}", 505)

    msg: SipMessage
    if is_request:
        msg = SipRequest(start[0], start[1], headers, b"", start[2])
    else:
        msg = SipResponse(start[0], start[1], headers, b"", start[2])

    # Framing: Content-Length (a second, different value makes framing unknown).
    if "Content-Length" in counts:
        values = {v.strip() for n, v in headers if n == "Content-Length"}
        if len(values) > 1:
            raise fail("conflicting Content-Length values")
        clen_text = values.pop()
        if not clen_text.isdigit():
            raise fail("Content-Length is not a non-negative integer")
        clen = int(clen_text)
        if clen > len(rest):
            raise fail("Content-Length larger than the message")
        msg.body = rest[:clen]
    else:
        if not datagram:
            raise fail("Content-Length missing on a stream transport")
        msg.body = rest

    _validate(msg, fail, counts)
    return msg


def _count_names(headers: list[tuple[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _ in headers:
        cname = canonical_name(name)
        counts[cname] = counts.get(cname, 0) + 1
    return counts


def _validate(
    msg: SipMessage, fail, counts: set[str] | dict[str, int] | None = None
) -> None:
    """The checks every parsed message passes. counts: header lines per canonical name, or
    the set of names when none repeats."""
    if counts is None:
        counts = _count_names(msg.headers)
    for name in _REQUIRED:
        if name not in counts:
            raise fail(f"missing {name} header")
    if isinstance(counts, dict):
        for name in _SINGLE_CANONICAL:
            if counts.get(name, 0) > 1:
                raise fail(f"more than one {name} header")
    try:
        vias = msg.vias
        msg.from_  # noqa: B018 - parse and cache
        msg.to  # noqa: B018
        msg.cseq  # noqa: B018
        if not msg.call_id:
            raise GrammarError("empty Call-ID")
        if "Contact" in counts:
            msg.contacts  # noqa: B018
        mf = msg.header("Max-Forwards")
        if mf is not None and (not mf.strip().isdigit() or int(mf.strip()) > 255):
            raise GrammarError("Max-Forwards is not an integer from 0 to 255")
        if "Content-Type" in counts:
            msg.content_type  # noqa: B018
    except GrammarError as exc:
        raise fail(str(exc)) from None
    if not vias:
        raise fail("missing Via header")
    if isinstance(msg, SipRequest):
        try:
            uri = msg.request_uri
        except GrammarError as exc:
            raise fail(f"bad Request-URI: {exc}") from None
        if isinstance(uri, SipUri) and uri.headers is not None:
            raise fail("Request-URI must not carry headers")


def parse_message_safe(
    data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, datagram: bool = True
) -> SipRequest | SipResponse | SipParseError:
    """Like parse_message, but returns the error instead of raising; never raises."""
    try:
        return parse_message(data, max_size=max_size, datagram=datagram)
    except SipParseError as exc:
        return exc
    except Exception as exc:  # defensive: the receive path must never see an exception
        return SipParseError(f"unparseable message ({type(exc).__name__})")

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
from .headers import SINGLE_HEADERS, canonical_name
from .message import SipMessage, SipRequest, SipResponse
from .uri import SipUri

DEFAULT_MAX_MESSAGE_SIZE = 65535
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")


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
    if not method or any(c not in TOKEN_CHARS for c in method):
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
    lines = _unfold_lines(head)
    if not lines or not lines[0]:
        raise SipParseError("empty start line")
    headers: list[tuple[str, str]] = []
    error: str | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        if not sep or _TOKEN.fullmatch(name) is None:
            error = error or f"malformed header line {line[:40]!r}"
            continue
        headers.append((canonical_name(name), value.strip(" \t")))

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
    lengths = msg.header_lines("Content-Length")
    if lengths:
        values = {v.strip() for v in lengths}
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

    _validate(msg, fail)
    return msg


def _validate(msg: SipMessage, fail) -> None:
    counts: dict[str, int] = {}
    for name, _ in msg.headers:
        lower = name.lower()
        counts[lower] = counts.get(lower, 0) + 1
    for name in _REQUIRED:
        if name.lower() not in counts:
            raise fail(f"missing {name} header")
    for lower in SINGLE_HEADERS:
        if counts.get(lower, 0) > 1 and lower != "content-length":
            raise fail(f"more than one {canonical_name(lower)} header")
    try:
        vias = msg.vias
        msg.from_  # noqa: B018 - parse and cache
        msg.to  # noqa: B018
        msg.cseq  # noqa: B018
        if not msg.call_id:
            raise GrammarError("empty Call-ID")
        if "contact" in counts:
            msg.contacts  # noqa: B018
        mf = msg.header("Max-Forwards")
        if mf is not None and (not mf.strip().isdigit() or int(mf.strip()) > 255):
            raise GrammarError("Max-Forwards is not an integer from 0 to 255")
        if "content-type" in counts:
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

"""Sans-I/O framing of SIP messages carried over a byte stream (TCP, TLS).

A stream has no datagram boundaries, so a message ends where its header section
(terminated by an empty line) plus ``Content-Length`` bytes of body end
(RFC 3261 §18.3). Content-Length is therefore mandatory on streams.

Between messages, CRLFs are skipped (RFC 3261 §7.5); a double-CRLF ``"\\r\\n\\r\\n"``
is the RFC 5626 §3.5.1 keep-alive "ping", reported as :data:`KEEPALIVE` so the
transport can answer with a single-CRLF "pong".

After a :class:`FramingError` the stream cannot be resynchronised: the framer stops
producing output and the transport must close the connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "FRAMING_BAD",
    "FRAMING_OVERSIZE",
    "KEEPALIVE",
    "FramedItem",
    "FramingError",
    "KeepAlive",
    "StreamFramer",
]

FRAMING_BAD: Final = "bad_framing"
FRAMING_OVERSIZE: Final = "oversize"

_CR: Final = 0x0D
_LF: Final = 0x0A

# "Content-Length" or its compact form "l", at the start of a header line, LWS allowed
# before the colon; the value runs to the end of the line (a trailing CR is stripped later).
_CONTENT_LENGTH_LINE: Final = re.compile(
    rb"^(?:content-length|l)[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE
)

# More digits than this cannot be a sane length (and int() of huge strings is slow).
_MAX_LENGTH_DIGITS: Final = 12


@dataclass(frozen=True, slots=True)
class FramingError:
    """The stream is broken; ``kind`` is ``"bad_framing"`` or ``"oversize"``."""

    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """An RFC 5626 double-CRLF ping was received between messages."""


KEEPALIVE: Final = KeepAlive()

FramedItem = bytes | KeepAlive | FramingError


def _content_length(header_section: bytes) -> int | FramingError:
    """The Content-Length declared in a header section (start line included)."""
    first_line_end = header_section.find(b"\n")
    if first_line_end < 0:
        return FramingError(FRAMING_BAD, "missing Content-Length (required on stream transports)")
    length: int | None = None
    for match in _CONTENT_LENGTH_LINE.finditer(header_section, first_line_end + 1):
        text = match.group(1).strip(b" \t\r")
        if not text:
            return FramingError(FRAMING_BAD, "empty Content-Length")
        if not text.isdigit():
            if text[:1] == b"-" and text[1:].isdigit():
                return FramingError(FRAMING_BAD, f"negative Content-Length {text.decode('ascii')}")
            shown = text[:20].decode("ascii", "replace")
            return FramingError(FRAMING_BAD, f"non-numeric Content-Length {shown!r}")
        digits = text.lstrip(b"0") or b"0"
        if len(digits) > _MAX_LENGTH_DIGITS:
            return FramingError(
                FRAMING_OVERSIZE, f"Content-Length {digits[:20].decode()}... too large"
            )
        value = int(digits)
        if length is not None and value != length:
            return FramingError(
                FRAMING_BAD, f"conflicting Content-Length values {length} and {value}"
            )
        length = value
    if length is None:
        return FramingError(FRAMING_BAD, "missing Content-Length (required on stream transports)")
    return length


class StreamFramer:
    """Splits a byte stream into whole SIP messages.

    ``feed`` accepts arbitrary chunks and returns, in order, each complete message
    (header section, empty line and body, as bytes), :data:`KEEPALIVE` for each ping,
    and at most one :class:`FramingError`, after which the framer is dead.

    Work per byte is constant: the header terminator search resumes where the last
    one stopped and a body is waited for by comparing lengths only.
    """

    __slots__ = (
        "_buffer",
        "_failed",
        "_idle_line_feeds",
        "_in_message",
        "_max_message_size",
        "_message_length",
        "_scan_from",
    )

    def __init__(self, max_message_size: int = 65535) -> None:
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._in_message = False  # False: between messages, skipping CRLFs
        self._idle_line_feeds = 0  # LFs seen in the current run of CRLFs between messages
        self._scan_from = 0  # where the next header terminator search starts
        self._message_length = -1  # known once the header section is complete
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[FramedItem]:
        if self._failed:
            return []
        buffer = self._buffer
        buffer += data
        framed: list[FramedItem] = []
        while buffer:
            if not self._in_message:
                if not self._skip_crlfs(framed):
                    break
            if self._message_length < 0:
                outcome = self._find_header_end()
                if outcome is None:
                    break
                if isinstance(outcome, FramingError):
                    self._fail()
                    framed.append(outcome)
                    break
                self._message_length = outcome
            if len(buffer) < self._message_length:
                break
            framed.append(bytes(buffer[: self._message_length]))
            del buffer[: self._message_length]
            self._in_message = False
            self._message_length = -1
            self._scan_from = 0
        return framed

    def _skip_crlfs(self, framed: list[FramedItem]) -> bool:
        """Drop CR/LF bytes before a message; True when a message starts in the buffer."""
        buffer = self._buffer
        position = 0
        end = len(buffer)
        while position < end:
            byte = buffer[position]
            if byte == _LF:
                self._idle_line_feeds += 1
                if self._idle_line_feeds == 2:
                    framed.append(KEEPALIVE)
                    self._idle_line_feeds = 0
            elif byte != _CR:
                break
            position += 1
        if position:
            del buffer[:position]
        if not buffer:
            return False
        self._in_message = True
        self._idle_line_feeds = 0
        self._scan_from = 0
        return True

    def _find_header_end(self) -> int | FramingError | None:
        """Total message length once the header section is complete, else None."""
        buffer = self._buffer
        # A header section ends within the size limit, so no search goes further than
        # that, and the LF-only form is only looked for before the first CRLFCRLF: a
        # chunk holding many messages is not scanned to its end once per message.
        limit = self._max_message_size
        crlf_end = buffer.find(b"\r\n\r\n", max(0, self._scan_from - 3), limit)
        lf_stop = crlf_end if crlf_end >= 0 else limit
        lf_end = buffer.find(b"\n\n", max(0, self._scan_from - 1), lf_stop)
        if crlf_end < 0 and lf_end < 0:
            if len(buffer) > self._max_message_size:
                return FramingError(
                    FRAMING_OVERSIZE,
                    f"header section exceeds {self._max_message_size} bytes",
                )
            self._scan_from = len(buffer)
            return None
        header_end = lf_end + 2 if lf_end >= 0 else crlf_end + 4
        length = _content_length(bytes(buffer[:header_end]))
        if isinstance(length, FramingError):
            return length
        total = header_end + length
        if total > self._max_message_size:
            return FramingError(
                FRAMING_OVERSIZE,
                f"message of {total} bytes (Content-Length {length}) exceeds "
                f"{self._max_message_size} bytes",
            )
        return total

    def _fail(self) -> None:
        self._failed = True
        self._buffer.clear()

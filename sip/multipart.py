"""multipart/* bodies (RFC 2046 §5.1), as SIP carries them (RFC 5621): framing only.

Parts are split on the boundary from the Content-Type; each part has its own
headers and a binary-safe body (RFC 4475 §3.1.1.11: NULs, bare CR/LF and high
bytes inside a part are data, not framing).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from .grammar import GrammarError
from .headers import canonical_name, parse_content_type


@dataclass(slots=True)
class BodyPart:
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        lower = canonical_name(name).lower()
        for hname, value in self.headers:
            if hname.lower() == lower:
                return value
        return None

    @property
    def content_type(self) -> str | None:
        value = self.header("Content-Type")
        return parse_content_type(value)[0] if value else None


def parse_multipart(content_type: str, body: bytes) -> list[BodyPart]:
    """Split a multipart body. Raises GrammarError on a missing boundary or bad framing."""
    mtype, params = parse_content_type(content_type)
    if not mtype.startswith("multipart/"):
        raise GrammarError(f"{mtype} is not a multipart type")
    boundary = params.get("boundary")
    if not boundary:
        raise GrammarError("multipart body without a boundary parameter")
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    # The first delimiter may start the body or follow a CRLF (preamble before it).
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise GrammarError("multipart boundary not found")
        pos += 2
    parts: list[BodyPart] = []
    while True:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            raise GrammarError("unterminated multipart delimiter line")
        start = eol + 2
        nxt = body.find(b"\r\n" + delimiter, start)
        if nxt < 0:
            raise GrammarError("multipart body without a closing delimiter")
        parts.append(_parse_part(body[start:nxt]))
        pos = nxt + 2


def _parse_part(raw: bytes) -> BodyPart:
    if raw.startswith(b"\r\n"):
        return BodyPart([], raw[2:])
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise GrammarError("body part headers not terminated")
    headers: list[tuple[str, str]] = []
    for line in raw[:end].decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise GrammarError(f"malformed body part header {line[:40]!r}")
        headers.append((canonical_name(name.strip()), value.strip()))
    return BodyPart(headers, raw[end + 4 :])


def build_multipart(parts: list[BodyPart], subtype: str = "mixed",
                    boundary: str | None = None) -> tuple[str, bytes]:
    """Serialise parts; returns (Content-Type value, body)."""
    boundary = boundary or "boundary-" + secrets.token_hex(8)
    delim = b"--" + boundary.encode()
    out = bytearray()
    for part in parts:
        if delim in part.body:
            raise ValueError("boundary occurs inside a part")
        out += delim + b"\r\n"
        for name, value in part.headers:
            out += f"{name}: {value}\r\n".encode()
        out += b"\r\n" + part.body + b"\r\n"
    out += delim + b"--\r\n"
    return f"multipart/{subtype};boundary={boundary}", bytes(out)

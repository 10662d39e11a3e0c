"""Character classes and small scanners for the RFC 3261 §25 grammar.

Header values reach these functions already unfolded (every CRLF followed by
whitespace replaced by a single space), so LWS is plain spaces and tabs here.
"""

from __future__ import annotations

import re
import string

ALPHANUM = frozenset(string.ascii_letters + string.digits)
# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_CHARS = ALPHANUM | frozenset("-.!%*_+`'~")
WS = " \t"
HEXDIGITS = frozenset(string.hexdigits)


class GrammarError(ValueError):
    """A header value or URI that does not follow the SIP grammar."""


def skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in WS:
        pos += 1
    return pos


def scan_token(text: str, pos: int) -> tuple[str, int]:
    """Read a token starting at pos; returns (token, new_pos). Empty token if none."""
    start = pos
    n = len(text)
    while pos < n and text[pos] in TOKEN_CHARS:
        pos += 1
    return text[start:pos], pos


def scan_quoted(text: str, pos: int) -> tuple[str, int]:
    """Read a quoted-string whose opening quote is at pos.

    Returns the unescaped content and the position after the closing quote.
    """
    if pos >= len(text) or text[pos] != '"':
        raise GrammarError("expected a quoted string")
    out: list[str] = []
    pos += 1
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\\":
            if pos + 1 >= n:
                break
            out.append(text[pos + 1])
            pos += 2
            continue
        if ch == '"':
            return "".join(out), pos + 1
        out.append(ch)
        pos += 1
    raise GrammarError("unterminated quoted string")


def quote(text: str) -> str:
    """Make a quoted-string of text, escaping backslash and double quote."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split text at sep characters that are outside quotes and angle brackets."""
    if sep not in text:
        return [text]
    parts: list[str] = []
    depth = 0
    in_quote = False
    start = 0
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_quote:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            if depth:
                depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if in_quote:
        raise GrammarError("unterminated quoted string")
    parts.append(text[start:])
    return parts


# Characters allowed in a generic-param value besides quoted strings: tokens, hosts
# (IPv6 references with or without brackets, as RFC 5118 §4.5 asks to tolerate).
_PARAM_VALUE_CHARS = TOKEN_CHARS | frozenset("[]:/@?&$=")

# The usual shape of a parameter list, ";name=value;flag" with no LWS and no quoted values:
# matched whole, it parses exactly as the general loop below would (each name a token, each
# value one or more value characters, the value running to the next ";").
_TOKEN_CLASS = r"A-Za-z0-9.!%*_+`'~\-"
SIMPLE_PARAMS = re.compile(rf"(?:;[{_TOKEN_CLASS}]+(?:=[{_TOKEN_CLASS}\[\]:/@?&$=]+)?)*")


def simple_params(text: str) -> dict[str, str | None] | None:
    """Parameters of a list already matched whole by SIMPLE_PARAMS ("" or ";a=b;c"), names
    lower-cased; None when a name repeats (the general parser reports that error)."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text[1:].split(";"):
        name, sep, value = item.partition("=")
        key = name.lower()
        if key in params:
            return None
        params[key] = value if sep else None
    return params


def parse_params(text: str, pos: int, *, stop: str = "") -> tuple[dict[str, str | None], int]:
    """Parse *( SEMI generic-param ) starting at pos (LWS allowed around ; and =).

    Parameter names are lower-cased (they compare case-insensitively); values
    keep their case, quoted values are unquoted. Raises GrammarError on an
    empty or malformed parameter. Stops at end of text or at a char in stop.
    """
    if ";" not in stop and SIMPLE_PARAMS.fullmatch(text, pos) is not None:
        simple = simple_params(text[pos:])
        if simple is not None:
            return simple, len(text)
    return _parse_params_general(text, pos, stop)


def _parse_params_general(
    text: str, pos: int, stop: str
) -> tuple[dict[str, str | None], int]:
    params: dict[str, str | None] = {}
    n = len(text)
    while True:
        pos = skip_ws(text, pos)
        if pos >= n or text[pos] in stop:
            return params, pos
        if text[pos] != ";":
            raise GrammarError(f"unexpected {text[pos]!r} where a parameter was expected")
        pos = skip_ws(text, pos + 1)
        name, pos = scan_token(text, pos)
        if not name:
            raise GrammarError("empty parameter")
        pos = skip_ws(text, pos)
        value: str | None = None
        if pos < n and text[pos] == "=":
            pos = skip_ws(text, pos + 1)
            if pos < n and text[pos] == '"':
                value, pos = scan_quoted(text, pos)
            else:
                start = pos
                while pos < n and text[pos] in _PARAM_VALUE_CHARS:
                    pos += 1
                value = text[start:pos]
                if not value:
                    raise GrammarError(f"parameter {name!r} has an empty value")
        key = name.lower()
        if key in params:
            raise GrammarError(f"duplicate parameter {name!r}")
        params[key] = value


def format_params(params: dict[str, str | None]) -> str:
    out = []
    for name, value in params.items():
        if value is None:
            out.append(f";{name}")
        elif value and all(c in _PARAM_VALUE_CHARS for c in value):
            out.append(f";{name}={value}")
        else:
            out.append(f";{name}={quote(value)}")
    return "".join(out)


def unescape(text: str) -> str:
    """Decode %HH escapes (once). Invalid escapes are kept literally."""
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n:
            h = raw[i + 1 : i + 3]
            if chr(h[0]) in HEXDIGITS and chr(h[1]) in HEXDIGITS:
                out.append(int(h, 16))
                i += 3
                continue
        out.append(b)
        i += 1
    return out.decode("utf-8", "surrogateescape")

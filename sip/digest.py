"""HTTP Digest authentication for SIP (RFC 7616, RFC 8760, RFC 2617, RFC 3261 §22).

Sans-I/O and stdlib only. This module parses and formats the ``Authorization`` /
``Proxy-Authorization`` credentials and the ``WWW-Authenticate`` / ``Proxy-Authenticate``
challenges, and computes digest responses for the MD5, MD5-sess, SHA-256 and SHA-256-sess
algorithms with qop ``auth``, ``auth-int`` or no qop (RFC 2069 compatibility).

Parsing never raises: a header value that is not a well-formed Digest credential or
challenge gives ``None``. Every comparison of a received response against an expected one
goes through :func:`hmac.compare_digest`.

Nonce issuing, replay protection and user lookup live in ``switch.auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = [
    "ALGORITHMS",
    "DigestChallenge",
    "DigestCredentials",
    "build_authorization",
    "canonical_algorithm",
    "choose_challenge",
    "compute_ha1",
    "compute_response",
    "compute_userhash",
    "format_challenge",
    "format_credentials",
    "parse_challenge",
    "parse_credentials",
    "session_ha1",
    "verify_response",
]

# Canonical algorithm name -> hashlib constructor name.
ALGORITHMS: dict[str, str] = {
    "MD5": "md5",
    "MD5-sess": "md5",
    "SHA-256": "sha256",
    "SHA-256-sess": "sha256",
}
_CANONICAL_BY_LOWER: dict[str, str] = {name.lower(): name for name in ALGORITHMS}
# Preference when a client chooses among several challenges: stronger hash first.
_ALGORITHM_STRENGTH: dict[str, int] = {
    "SHA-256": 2,
    "SHA-256-sess": 2,
    "MD5": 1,
    "MD5-sess": 1,
}

DIGEST_SCHEME = "Digest"
MAX_HEADER_VALUE_LENGTH = 8192

_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
_WHITESPACE = frozenset(" \t\r\n")
_NONCE_COUNT_RE = re.compile(r"[0-9a-fA-F]{8}")
_EXTENDED_VALUE_RE = re.compile(r"(?i)(utf-8|iso-8859-1)'[^']*'(.*)")


def canonical_algorithm(name: str) -> str | None:
    """Return the canonical spelling of a supported algorithm name, or None."""
    return _CANONICAL_BY_LOWER.get(name.lower())


@dataclass(slots=True)
class DigestCredentials:
    """A parsed ``Authorization`` / ``Proxy-Authorization`` Digest header value."""

    scheme: str
    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None
    userhash: bool = False
    params: dict[str, str] = field(default_factory=dict)

    @property
    def nonce_count(self) -> int | None:
        """``nc`` as an integer, or None when absent or not hexadecimal."""
        if self.nc is None:
            return None
        try:
            return int(self.nc, 16)
        except ValueError:
            return None


@dataclass(slots=True)
class DigestChallenge:
    """A parsed ``WWW-Authenticate`` / ``Proxy-Authenticate`` Digest header value."""

    scheme: str
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    domain: str | None = None
    userhash: bool = False
    params: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _read_token(text: str, pos: int) -> tuple[str, int]:
    start = pos
    while pos < len(text) and text[pos] in _TOKEN_CHARS:
        pos += 1
    return text[start:pos], pos


# One auth-param (RFC 7235 §2.1, RFC 3261 §25.1 quoted-string), with the stray commas and
# whitespace that may precede it: a token name, "=", a token or a quoted-string whose
# quoted-pairs are unescaped afterwards (a control character other than HTAB/CR/LF, or a
# backslash before CR/LF, makes the quoted-string end early and the match fail).
_AUTH_PARAM_RE = re.compile(
    r"[ \t\r\n,]*(?P<name>[A-Za-z0-9\-.!%*_+`'~]+)[ \t\r\n]*=[ \t\r\n]*"
    # the quoted-string's content: runs of plain characters between quoted-pairs
    r"(?:\"(?P<quoted>[^\"\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*"
    r"(?:\\[^\r\n][^\"\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*)*)\""
    r"|(?P<token>[A-Za-z0-9\-.!%*_+`'~]+))[ \t\r\n]*"
)
_ONLY_SEPARATORS_RE = re.compile(r"[ \t\r\n,]*")
_QUOTED_PAIR_RE = re.compile(r"\\(.)", re.DOTALL)


def _parse_auth_params(text: str, pos: int) -> dict[str, str] | None:
    """Parse ``auth-param *(COMMA auth-param)``; None on any syntax error or duplicate.
    Empty list elements (stray commas) are tolerated, as in the #rule."""
    params: dict[str, str] = {}
    end = len(text)
    match_param = _AUTH_PARAM_RE.match
    while True:
        match = match_param(text, pos)
        if match is None:
            tail = _ONLY_SEPARATORS_RE.match(text, pos)
            return params if tail is not None and tail.end() == end else None
        key = match.group("name").lower()
        if key in params:
            return None
        value = match.group("quoted")
        if value is None:
            value = match.group("token")
        elif "\\" in value:
            value = _QUOTED_PAIR_RE.sub(r"\1", value)
        params[key] = value
        pos = match.end()
        if pos >= end:
            return params
        if text[pos] != ",":
            return None
        pos += 1


def _parse_digest_header(value: object) -> tuple[str, dict[str, str]] | None:
    if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE_LENGTH:
        return None
    pos = _skip_whitespace(value, 0)
    scheme, pos = _read_token(value, pos)
    if scheme.lower() != DIGEST_SCHEME.lower():
        return None
    if pos < len(value) and value[pos] not in _WHITESPACE:
        return None
    params = _parse_auth_params(value, pos)
    if params is None:
        return None
    return scheme, params


def _parse_bool(value: str | None) -> bool | None:
    if value is None:
        return False
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


def _normalise_algorithm(value: str | None) -> str:
    if value is None:
        return "MD5"
    return canonical_algorithm(value) or value


def _decode_extended_value(value: str) -> str | None:
    """Decode an RFC 8187 ext-value (``UTF-8''%c3%a4``) as used by ``username*``."""
    match = _EXTENDED_VALUE_RE.fullmatch(value)
    if match is None:
        return None
    charset = match.group(1).lower()
    try:
        return unquote(match.group(2), encoding=charset, errors="strict")
    except (UnicodeDecodeError, LookupError):
        return None


def parse_credentials(value: str) -> DigestCredentials | None:
    """Parse an ``Authorization`` / ``Proxy-Authorization`` header value.

    Returns None for any other scheme, for syntax errors, duplicate parameters, missing
    mandatory parameters or a malformed ``nc``. Never raises.
    """
    parsed = _parse_digest_header(value)
    if parsed is None:
        return None
    scheme, params = parsed
    if "username" in params and "username*" in params:
        return None
    if "username*" in params:
        username = _decode_extended_value(params["username*"])
    else:
        username = params.get("username")
    if username is None:
        return None
    required = [params.get(name) for name in ("realm", "nonce", "uri", "response")]
    if any(item is None for item in required):
        return None
    realm, nonce, uri, response = (item or "" for item in required)
    if not response:
        return None
    qop = params.get("qop")
    nc = params.get("nc")
    cnonce = params.get("cnonce")
    if nc is not None and _NONCE_COUNT_RE.fullmatch(nc) is None:
        return None
    if qop is not None:
        qop = qop.lower()
        if nc is None or cnonce is None:
            return None
    userhash = _parse_bool(params.get("userhash"))
    if userhash is None:
        return None
    return DigestCredentials(
        scheme=scheme,
        username=username,
        realm=realm,
        nonce=nonce,
        uri=uri,
        response=response,
        algorithm=_normalise_algorithm(params.get("algorithm")),
        qop=qop,
        nc=nc,
        cnonce=cnonce,
        opaque=params.get("opaque"),
        userhash=userhash,
        params=params,
    )


def parse_challenge(value: str) -> DigestChallenge | None:
    """Parse a ``WWW-Authenticate`` / ``Proxy-Authenticate`` header value (or None)."""
    parsed = _parse_digest_header(value)
    if parsed is None:
        return None
    scheme, params = parsed
    realm = params.get("realm")
    nonce = params.get("nonce")
    if realm is None or nonce is None:
        return None
    qop_value = params.get("qop")
    qop: tuple[str, ...] = ()
    if qop_value is not None:
        qop = tuple(item.strip().lower() for item in qop_value.split(",") if item.strip())
    userhash = _parse_bool(params.get("userhash"))
    if userhash is None:
        return None
    return DigestChallenge(
        scheme=scheme,
        realm=realm,
        nonce=nonce,
        algorithm=_normalise_algorithm(params.get("algorithm")),
        qop=qop,
        opaque=params.get("opaque"),
        stale=(params.get("stale") or "").lower() == "true",
        domain=params.get("domain"),
        userhash=userhash,
        params=params,
    )


# --------------------------------------------------------------------------- hashing


def _hash_hex(algorithm: str, data: str | bytes) -> str:
    canonical = canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm: {algorithm!r}")
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.new(ALGORITHMS[canonical], data).hexdigest()


def compute_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """H(username:realm:password) with the hash of ``algorithm``.

    For the ``-sess`` algorithms this is the base value; the session HA1 is derived from it
    with the nonce and cnonce by :func:`session_ha1` (done inside :func:`compute_response`),
    so a stored base HA1 serves both the plain and the session variant.
    """
    return _hash_hex(algorithm, f"{username}:{realm}:{password}")


def session_ha1(algorithm: str, ha1: str, nonce: str, cnonce: str) -> str:
    """HA1 for a ``-sess`` algorithm: H(H(user:realm:password):nonce:cnonce)."""
    return _hash_hex(algorithm, f"{ha1.lower()}:{nonce}:{cnonce}")


def compute_userhash(algorithm: str, username: str, realm: str) -> str:
    """The RFC 7616 §3.4.4 hashed username: H(username:realm)."""
    return _hash_hex(algorithm, f"{username}:{realm}")


def compute_response(
    algorithm: str,
    ha1: str,
    nonce: str,
    nc: str | int | None,
    cnonce: str | None,
    qop: str | None,
    method: str,
    uri: str,
    body: bytes = b"",
) -> str:
    """The request-digest (lowercase hex) for qop ``auth``, ``auth-int`` or no qop.

    ``ha1`` is the base H(username:realm:password); for ``-sess`` algorithms the session
    HA1 is derived here. Raises ValueError for an unsupported algorithm or qop, or when
    qop is given without nc/cnonce.
    """
    canonical = canonical_algorithm(algorithm)
    if canonical is None:
        raise ValueError(f"unsupported digest algorithm: {algorithm!r}")
    ha1 = ha1.lower()
    if canonical.endswith("-sess"):
        if cnonce is None:
            raise ValueError("-sess algorithms need a cnonce")
        ha1 = session_ha1(canonical, ha1, nonce, cnonce)
    qop_lower = qop.lower() if qop is not None else None
    if qop_lower == "auth-int":
        ha2 = _hash_hex(canonical, f"{method}:{uri}:{_hash_hex(canonical, body)}")
    elif qop_lower in (None, "auth"):
        ha2 = _hash_hex(canonical, f"{method}:{uri}")
    else:
        raise ValueError(f"unsupported qop: {qop!r}")
    if qop_lower is None:
        return _hash_hex(canonical, f"{ha1}:{nonce}:{ha2}")
    if nc is None or cnonce is None:
        raise ValueError("qop needs nc and cnonce")
    nc_text = f"{nc:08x}" if isinstance(nc, int) else nc
    return _hash_hex(canonical, f"{ha1}:{nonce}:{nc_text}:{cnonce}:{qop_lower}:{ha2}")


def verify_response(
    credentials: DigestCredentials, ha1: str, method: str, body: bytes = b""
) -> bool:
    """True when ``credentials.response`` matches the digest computed from ``ha1``.

    Constant-time comparison; False (never an exception) for an unsupported algorithm
    or qop.
    """
    try:
        expected = compute_response(
            credentials.algorithm,
            ha1,
            credentials.nonce,
            credentials.nc,
            credentials.cnonce,
            credentials.qop,
            method,
            credentials.uri,
            body,
        )
    except ValueError:
        return False
    return hmac.compare_digest(
        expected.encode("ascii"), credentials.response.lower().encode("utf-8")
    )


# --------------------------------------------------------------------------- formatting


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_challenge(
    realm: str,
    nonce: str,
    algorithm: str,
    qop: str | None = "auth",
    opaque: str | None = None,
    stale: bool = False,
) -> str:
    """A ``WWW-Authenticate`` / ``Proxy-Authenticate`` header value."""
    parts = [f"realm={_quote(realm)}", f"nonce={_quote(nonce)}"]
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    if stale:
        parts.append("stale=true")
    parts.append(f"algorithm={algorithm}")
    if qop:
        parts.append(f"qop={_quote(qop)}")
    return f"{DIGEST_SCHEME} " + ", ".join(parts)


def format_credentials(credentials: DigestCredentials) -> str:
    """An ``Authorization`` / ``Proxy-Authorization`` header value."""
    parts = [
        f"username={_quote(credentials.username)}",
        f"realm={_quote(credentials.realm)}",
        f"nonce={_quote(credentials.nonce)}",
        f"uri={_quote(credentials.uri)}",
        f"response={_quote(credentials.response)}",
        f"algorithm={credentials.algorithm}",
    ]
    if credentials.qop is not None:
        parts.append(f"qop={credentials.qop}")
        parts.append(f"nc={credentials.nc}")
        parts.append(f"cnonce={_quote(credentials.cnonce or '')}")
    if credentials.opaque is not None:
        parts.append(f"opaque={_quote(credentials.opaque)}")
    if credentials.userhash:
        parts.append("userhash=true")
    return f"{DIGEST_SCHEME} " + ", ".join(parts)


def _choose_qop(offered: tuple[str, ...]) -> str | None:
    if not offered:
        return None
    if "auth" in offered:
        return "auth"
    if "auth-int" in offered:
        return "auth-int"
    raise ValueError(f"no supported qop offered: {offered!r}")


def choose_challenge(values: Iterable[str]) -> DigestChallenge | None:
    """Pick the challenge a client should answer among several header values.

    The strongest supported algorithm wins (SHA-256 over MD5); among equals the first
    listed. Unparseable values, unsupported algorithms and challenges offering only
    unknown qop values are skipped. None when nothing usable is offered.
    """
    best: DigestChallenge | None = None
    best_strength = 0
    for value in values:
        challenge = parse_challenge(value)
        if challenge is None:
            continue
        strength = _ALGORITHM_STRENGTH.get(challenge.algorithm, 0)
        if strength == 0:
            continue
        if challenge.qop and not {"auth", "auth-int"} & set(challenge.qop):
            continue
        if strength > best_strength:
            best, best_strength = challenge, strength
    return best


def build_authorization(
    challenge: DigestChallenge,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """Answer ``challenge`` (client side, e.g. for trunks): the Authorization value.

    Chooses qop ``auth`` when offered, else ``auth-int``, else the RFC 2069 form. Raises
    ValueError when the challenge's algorithm or qop is unsupported (use
    :func:`choose_challenge` first to avoid that).
    """
    algorithm = canonical_algorithm(challenge.algorithm)
    if algorithm is None:
        raise ValueError(f"unsupported digest algorithm: {challenge.algorithm!r}")
    qop = _choose_qop(challenge.qop)
    nc_text: str | None = None
    if qop is not None or algorithm.endswith("-sess"):
        cnonce = cnonce if cnonce is not None else secrets.token_hex(16)
    if qop is not None:
        nc_text = f"{nc:08x}"
    ha1 = compute_ha1(algorithm, username, challenge.realm, password)
    response = compute_response(
        algorithm, ha1, challenge.nonce, nc_text, cnonce, qop, method, uri, body
    )
    sent_username = username
    if challenge.userhash:
        sent_username = compute_userhash(algorithm, username, challenge.realm)
    credentials = DigestCredentials(
        scheme=DIGEST_SCHEME,
        username=sent_username,
        realm=challenge.realm,
        nonce=challenge.nonce,
        uri=uri,
        response=response,
        algorithm=algorithm,
        qop=qop,
        nc=nc_text,
        cnonce=cnonce,
        opaque=challenge.opaque,
        userhash=challenge.userhash,
    )
    text = format_credentials(credentials)
    if qop is None and cnonce is not None:
        # -sess without qop (RFC 2617 allows it): the cnonce must still be sent.
        text += f", cnonce={_quote(cnonce)}"
    return text

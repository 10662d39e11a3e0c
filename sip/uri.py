"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), and other absolute URIs.

`parse_uri` never returns None: a URI of an unknown scheme becomes an
`AbsoluteUri` (RFC 4475 §3.3.2 wants such a request parsed, then refused with
416 by whoever cannot handle it). Malformed SIP/tel URIs raise GrammarError.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .grammar import GrammarError, unescape

_URI_FORBIDDEN_RE = re.compile(r'[\x00-\x20<>"\x7f]')
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# Characters that may appear escaped or raw in a URI user/param part; anything
# printable except the forbidden set is tolerated on input.


def _check_uri_chars(text: str) -> None:
    bad = _URI_FORBIDDEN_RE.search(text)
    if bad is not None:
        raise GrammarError(f"character {bad.group()!r} not allowed in a URI")


def parse_host(text: str) -> str:
    """Validate a host (hostname, IPv4 or bracketed IPv6 reference); returns it unchanged
    except for the RFC 5118 §4.10 three-colon form, which is normalised."""
    if not text:
        raise GrammarError("empty host")
    if text[0] == "[":
        if text[-1] != "]":
            raise GrammarError("unterminated IPv6 reference")
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            # RFC 5118 §4.10: RFC 3261's ABNF admits "2001:db8:::192.0.2.1"; tolerate it.
            fixed = inner.replace(":::", "::")
            try:
                ipaddress.IPv6Address(fixed)
            except ValueError:
                raise GrammarError(f"invalid IPv6 reference {text!r}") from None
            return "[" + fixed + "]"
        return text
    if _HOSTNAME.fullmatch(text) is None:
        raise GrammarError(f"invalid host {text!r}")
    return text


def split_hostport(text: str) -> tuple[str, int | None]:
    """Split "host[:port]" (host may be an IPv6 reference in brackets)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise GrammarError("unterminated IPv6 reference")
        host = text[: end + 1]
        rest = text[end + 1 :]
        if not rest:
            return parse_host(host), None
        if rest[0] != ":":
            raise GrammarError(f"garbage after IPv6 reference: {rest!r}")
        return parse_host(host), parse_port(rest[1:])
    if ":" in text:
        host, _, port = text.partition(":")
        return parse_host(host), parse_port(port)
    return parse_host(text), None


def parse_port(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > 5:
        raise GrammarError(f"invalid port {text!r}")
    port = int(text)
    if port > 65535:
        raise GrammarError(f"port {port} out of range")
    return port


def host_for_compare(host: str) -> str:
    return host.lower()


@dataclass(slots=True, eq=False)
class SipUri:
    """sip: or sips: URI. `user` keeps its escapes as received; `user_unescaped` decodes them."""

    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str | None = None  # raw "h=v&h=v" after "?", escaped

    @property
    def user_unescaped(self) -> str | None:
        return None if self.user is None else unescape(self.user)

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def aor(self) -> str:
        """The address-of-record form "user@host" (lower-cased host, unescaped user)."""
        user = self.user_unescaped
        host = self.host.lower()
        return f"{user}@{host}" if user is not None else host

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.hostport)
        for name, value in self.params.items():
            out.append(f";{name}" if value is None else f";{name}={value}")
        if self.headers:
            out.append("?" + self.headers)
        return "".join(out)

    def __eq__(self, other: object) -> bool:
        """URI comparison, RFC 3261 §19.1.4 (simplified: all params of both compared
        when present in both; user, transport, ttl, method, maddr must match)."""
        if not isinstance(other, SipUri):
            return NotImplemented
        if self.scheme != other.scheme:
            return False
        if self.user_unescaped != other.user_unescaped or self.password != other.password:
            return False
        if self.host.lower() != other.host.lower() or self.port != other.port:
            return False
        for name in set(self.params) | set(other.params):
            a, b = self.params.get(name, "\0"), other.params.get(name, "\0")
            if name in ("user", "ttl", "method", "maddr", "transport"):
                if (a or "").lower() != (b or "").lower():
                    return False
            elif a != "\0" and b != "\0" and (a or "").lower() != (b or "").lower():
                return False
        return (self.headers or "") == (other.headers or "")

    def __hash__(self) -> int:
        return hash((self.scheme, self.user_unescaped, self.host.lower(), self.port))

    def copy(self) -> SipUri:
        return SipUri(
            self.scheme, self.user, self.password, self.host, self.port, dict(self.params),
            self.headers,
        )


@dataclass(slots=True)
class TelUri:
    """tel: URI (RFC 3966): a global (+E.164) or local number with parameters."""

    number: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "tel"

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    @property
    def digits(self) -> str:
        """The number without visual separators (RFC 3966 §5.1.1)."""
        return "".join(c for c in self.number if c not in "-.()")

    def __str__(self) -> str:
        out = ["tel:", self.number]
        for name, value in self.params.items():
            out.append(f";{name}" if value is None else f";{name}={value}")
        return "".join(out)


@dataclass(slots=True)
class AbsoluteUri:
    """Any other URI (urn:, http:, im:, ...): kept as scheme and opaque text."""

    scheme: str
    rest: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"


Uri = SipUri | TelUri | AbsoluteUri


def _parse_uri_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(";"):
        if not item:
            raise GrammarError("empty URI parameter")
        name, sep, value = item.partition("=")
        if not name:
            raise GrammarError("URI parameter without a name")
        if sep and not value:
            raise GrammarError(f"URI parameter {name!r} has an empty value")
        params[name.lower()] = value if sep else None
    return params


# The usual SIP URI, "sip:user[:password]@host[:port];params", in printable ASCII, with no
# headers part, no IPv6 reference, no ";", "?" or "@" inside the userinfo and no "@", empty
# item or empty value among the parameters. A full match parses exactly as the general path
# below would (scheme lower-cased, first "@" ends the userinfo, first ";" starts the
# parameters); anything else takes that path. Groups: scheme, user, password, host, port,
# parameters (with their leading ";").
SIMPLE_SIP_URI_PATTERN = (
    r"(sips?|SIPS?):(?:([!#-9=A-~]+)(?::([!#-:=A-~]*))?@)?"
    r"([A-Za-z0-9._-]+)(?::([0-9]{1,5}))?"
    r"((?:;[!#-:A-~]+(?:=[!#-:=A-~]+)?)*)"
)
_SIMPLE_SIP_URI = re.compile(SIMPLE_SIP_URI_PATTERN)


def simple_sip_uri(
    scheme: str, user: str | None, password: str | None, host: str, port: str | None,
    params: str,
) -> SipUri | None:
    """The SipUri of SIMPLE_SIP_URI_PATTERN's groups; None when the port exceeds 65535
    (the general path reports that error)."""
    if port is None:
        port_number = None
    else:
        port_number = int(port)
        if port_number > 65535:
            return None
    return SipUri(
        scheme.lower(), user, password, host, port_number,
        _parse_uri_params(params[1:]) if params else {}, None,
    )


def parse_uri(text: str) -> Uri:
    """Parse a URI. Raises GrammarError if it is not a well-formed URI."""
    m = _SIMPLE_SIP_URI.fullmatch(text)
    if m is not None:
        uri = simple_sip_uri(*m.groups())
        if uri is not None:
            return uri
    return _parse_uri_general(text)


def _parse_uri_general(text: str) -> Uri:
    colon = text.find(":")
    if colon <= 0:
        raise GrammarError(f"not a URI: {text!r}")
    scheme = text[:colon].lower()
    if _SCHEME.fullmatch(scheme) is None:
        raise GrammarError(f"invalid URI scheme {text[:colon]!r}")
    _check_uri_chars(text)
    rest = text[colon + 1 :]
    if scheme in ("sip", "sips"):
        return _parse_sip_uri(scheme, rest)
    if scheme == "tel":
        number, _, params = rest.partition(";")
        if not number or any(c not in "0123456789+-.()*#ABCDabcdpw" for c in number):
            raise GrammarError(f"invalid tel number {number!r}")
        return TelUri(number, _parse_uri_params(params))
    if not rest:
        raise GrammarError(f"empty {scheme}: URI")
    return AbsoluteUri(scheme, rest)


def _parse_sip_uri(scheme: str, rest: str) -> SipUri:
    uri = SipUri(scheme=scheme)
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        user, sep, password = userinfo.partition(":")
        if not user:
            raise GrammarError("empty user part in SIP URI")
        uri.user = user
        uri.password = password if sep else None
    qmark = rest.find("?")
    if qmark >= 0:
        uri.headers = rest[qmark + 1 :]
        rest = rest[:qmark]
        if not uri.headers:
            raise GrammarError("empty header part in SIP URI")
    semi = rest.find(";")
    if semi >= 0:
        hostport, params = rest[:semi], rest[semi + 1 :]
        uri.params = _parse_uri_params(params)
    else:
        hostport = rest
    uri.host, uri.port = split_hostport(hostport)
    return uri

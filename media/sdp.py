"""SDP (RFC 8866, formerly RFC 4566): parse, serialize, and rewrite for a media relay.

The model keeps every line it does not need to understand verbatim and in order, so an
SDP that is parsed and serialized again comes out byte-identical (CRLF line endings).
Only what a relay touches is interpreted:

* ``o=`` (origin, RFC 8866 §5.2), whose session version must grow when a later SDP in
  the same session changes;
* ``c=`` at session and media level, IPv4 and IPv6 (``IN IP4`` / ``IN IP6``);
* ``m=`` media, port, optional port count, protocol and formats;
* ``a=rtcp:`` (RFC 3605) and ``a=rtcp-mux`` (RFC 5761);
* ``a=rtpmap`` for clock rates (jitter in RTCP is in RTP timestamp units).

Everything else, including ``a=crypto`` (SDES, RFC 4568), telephone-event payloads
(RFC 4733) and T.38 attributes of ``m=image``, passes through untouched.
:func:`rewrite_for_relay` replaces addresses and ports with the relay's.
Malformed SDP raises :class:`~media.backend.SdpError` (SIP 488).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from media.backend import SdpError

CRLF = "\r\n"

#: Clock rates of the static RTP payload types (RFC 3551 table 4) that carry audio.
STATIC_CLOCK_RATES: dict[int, int] = {
    0: 8000,
    3: 8000,
    4: 8000,
    5: 8000,
    6: 16000,
    7: 8000,
    8: 8000,
    9: 8000,
    10: 44100,
    11: 44100,
    12: 8000,
    13: 8000,
    14: 90000,
    15: 8000,
    16: 11025,
    17: 22050,
    18: 8000,
    25: 90000,
    26: 90000,
    28: 90000,
    31: 90000,
    32: 90000,
    33: 90000,
    34: 90000,
}

#: ICE attributes (RFC 8839). A relay that does not speak ICE removes them, otherwise an
#: ICE-capable phone would try to reach its peer directly, around the relay.
ICE_ATTRIBUTES = frozenset(
    {
        "candidate",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "remote-candidates",
        "end-of-candidates",
        "ice-pacing",
    }
)

UNSPECIFIED_ADDRESSES = frozenset({"0.0.0.0", "::"})


@dataclass(slots=True)
class Connection:
    """A ``c=`` value: ``<nettype> <addrtype> <address>[/ttl][/count]``."""

    net_type: str
    addr_type: str
    address: str
    suffix: str = ""  # "/127" or "/127/3" for multicast, kept verbatim

    def __str__(self) -> str:
        return f"{self.net_type} {self.addr_type} {self.address}{self.suffix}"

    @property
    def is_unspecified(self) -> bool:
        """0.0.0.0 or :: — the RFC 2543 way of saying "do not send to me" (hold)."""
        return self.address in UNSPECIFIED_ADDRESSES


@dataclass(slots=True)
class Origin:
    """An ``o=`` value: ``<username> <sess-id> <sess-version> <nettype> <addrtype> <addr>``."""

    username: str
    session_id: str
    session_version: int
    net_type: str
    addr_type: str
    address: str

    def __str__(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.session_version} "
            f"{self.net_type} {self.addr_type} {self.address}"
        )


@dataclass(slots=True)
class RtcpAttribute:
    """``a=rtcp:<port> [<nettype> <addrtype> <address>]`` (RFC 3605)."""

    port: int
    connection: Connection | None = None

    def __str__(self) -> str:
        return f"{self.port}" + (f" {self.connection}" if self.connection else "")


def address_type(address: str) -> str:
    """``IP4`` or ``IP6`` for a literal address; SdpError if it is neither."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError as exc:
        raise SdpError(f"not an IP address: {address!r}") from exc
    return "IP6" if parsed.version == 6 else "IP4"


def parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpError(f"bad c= line: {value!r}")
    net_type, addr_type, address = parts
    suffix = ""
    if "/" in address:
        address, _, rest = address.partition("/")
        suffix = "/" + rest
    if net_type != "IN":
        raise SdpError(f"unsupported network type in c=: {net_type!r}")
    if addr_type not in ("IP4", "IP6"):
        raise SdpError(f"unsupported address type in c=: {addr_type!r}")
    if not address:
        raise SdpError(f"empty address in c=: {value!r}")
    return Connection(net_type, addr_type, address, suffix)


def parse_origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpError(f"bad o= line: {value!r}")
    username, session_id, version, net_type, addr_type, address = parts
    if not version.isdigit():
        raise SdpError(f"bad session version in o=: {version!r}")
    return Origin(username, session_id, int(version), net_type, addr_type, address)


def _parse_port(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise SdpError(f"bad {what} port: {text!r}")
    return int(text)


@dataclass
class MediaDescription:
    """One ``m=`` section: the m= fields and the lines after it, verbatim and in order."""

    media: str
    port: int
    port_count: int | None
    proto: str
    formats: list[str]
    lines: list[tuple[str, str]] = field(default_factory=list)
    _raw_m: str | None = field(default=None, repr=False, compare=False)
    _raw_port: int | None = field(default=None, repr=False, compare=False)

    # -- the m= line ------------------------------------------------------------------
    def m_value(self) -> str:
        if self._raw_m is not None and self._raw_port == self.port:
            return self._raw_m
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        return " ".join([self.media, port, self.proto, *self.formats])

    @property
    def is_disabled(self) -> bool:
        return self.port == 0

    @property
    def is_rtp(self) -> bool:
        return "RTP/" in self.proto.upper()

    @property
    def is_udp(self) -> bool:
        """RTP over UDP (RTP/AVP, RTP/SAVP, UDP/TLS/RTP/SAVPF, ...) or UDPTL (T.38)."""
        proto = self.proto.upper()
        return "TCP" not in proto and ("RTP/" in proto or proto in ("UDPTL", "UDP"))

    @property
    def is_srtp(self) -> bool:
        return "SAVP" in self.proto.upper() or self.has_attribute("crypto")

    # -- attributes -------------------------------------------------------------------
    def attributes(self, name: str) -> list[str]:
        """Values of every ``a=name:value`` (``""`` for a flag ``a=name``)."""
        return [value for key, value in _attribute_items(self.lines) if key == name]

    def attribute(self, name: str) -> str | None:
        values = self.attributes(name)
        return values[0] if values else None

    def has_attribute(self, name: str) -> bool:
        return any(key == name for key, _ in _attribute_items(self.lines))

    def remove_attributes(self, names: frozenset[str] | set[str]) -> None:
        self.lines = [
            (kind, value)
            for kind, value in self.lines
            if not (kind == "a" and value.partition(":")[0] in names)
        ]

    def add_attribute(self, name: str, value: str | None = None) -> None:
        self.lines.append(("a", name if value is None else f"{name}:{value}"))

    @property
    def connection(self) -> Connection | None:
        for kind, value in self.lines:
            if kind == "c":
                return parse_connection(value)
        return None

    @property
    def rtcp(self) -> RtcpAttribute | None:
        value = self.attribute("rtcp")
        if value is None:
            return None
        parts = value.split(maxsplit=1)
        if not parts:
            raise SdpError("empty a=rtcp attribute")
        port = _parse_port(parts[0], "a=rtcp")
        return RtcpAttribute(port, parse_connection(parts[1]) if len(parts) > 1 else None)

    @property
    def rtcp_mux(self) -> bool:
        return self.has_attribute("rtcp-mux")

    @property
    def direction(self) -> str | None:
        """sendrecv / sendonly / recvonly / inactive when stated at media level."""
        for name in ("sendrecv", "sendonly", "recvonly", "inactive"):
            if self.has_attribute(name):
                return name
        return None

    def clock_rate(self, payload_type: str | None = None) -> int:
        """RTP clock rate of ``payload_type`` (default: the first format); 8000 if unknown."""
        if not self.formats:
            return 8000
        pt = payload_type if payload_type is not None else self.formats[0]
        for value in self.attributes("rtpmap"):
            number, _, encoding = value.partition(" ")
            if number == pt:
                pieces = encoding.split("/")
                if len(pieces) >= 2 and pieces[1].isdigit() and int(pieces[1]) > 0:
                    return int(pieces[1])
        if pt.isdigit() and int(pt) in STATIC_CLOCK_RATES:
            return STATIC_CLOCK_RATES[int(pt)]
        return 8000


def _attribute_items(lines: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    for kind, value in lines:
        if kind == "a":
            name, _, rest = value.partition(":")
            items.append((name, rest))
    return items


@dataclass
class SessionDescription:
    """A whole SDP: session-level lines (verbatim, in order) then the media sections."""

    lines: list[tuple[str, str]]
    media: list[MediaDescription]

    @property
    def origin(self) -> Origin:
        for kind, value in self.lines:
            if kind == "o":
                return parse_origin(value)
        raise SdpError("no o= line")

    @origin.setter
    def origin(self, origin: Origin) -> None:
        for index, (kind, _) in enumerate(self.lines):
            if kind == "o":
                self.lines[index] = ("o", str(origin))
                return
        raise SdpError("no o= line")

    @property
    def connection(self) -> Connection | None:
        for kind, value in self.lines:
            if kind == "c":
                return parse_connection(value)
        return None

    def session_attribute(self, name: str) -> str | None:
        for key, value in _attribute_items(self.lines):
            if key == name:
                return value
        return None

    def has_session_attribute(self, name: str) -> bool:
        return any(key == name for key, _ in _attribute_items(self.lines))

    def stream_connection(self, index: int) -> Connection | None:
        """The connection that applies to media ``index``: its own c= or the session's."""
        return self.media[index].connection or self.connection

    def stream_direction(self, index: int) -> str:
        """Effective direction of media ``index`` (media level, else session, else sendrecv)."""
        direction = self.media[index].direction
        if direction is not None:
            return direction
        for name in ("sendrecv", "sendonly", "recvonly", "inactive"):
            if self.has_session_attribute(name):
                return name
        return "sendrecv"

    def serialize(self) -> bytes:
        out: list[str] = [f"{kind}={value}" for kind, value in self.lines]
        for media in self.media:
            out.append(f"m={media.m_value()}")
            out.extend(f"{kind}={value}" for kind, value in media.lines)
        return (CRLF.join(out) + CRLF).encode("utf-8", "surrogateescape")

    def body_without_origin(self) -> bytes:
        """The serialized SDP with the o= line blanked: to tell whether content changed."""
        lines = [("o", "") if kind == "o" else (kind, value) for kind, value in self.lines]
        return SessionDescription(lines, self.media).serialize()


def parse_sdp(data: bytes) -> SessionDescription:
    """Parse an SDP body. Raises :class:`SdpError` for anything malformed."""
    if not data:
        raise SdpError("empty SDP")
    try:
        text = data.decode("utf-8", "surrogateescape")
    except Exception as exc:  # pragma: no cover - surrogateescape does not fail
        raise SdpError("undecodable SDP") from exc
    session_lines: list[tuple[str, str]] = []
    media: list[MediaDescription] = []
    current: MediaDescription | None = None
    seen_first = False
    for raw_line in text.replace("\r\n", "\n").split("\n"):
        line = raw_line.rstrip("\r")
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SdpError(f"bad SDP line: {line[:60]!r}")
        kind, value = line[0], line[2:]
        if not seen_first:
            if kind != "v" or value.strip() != "0":
                raise SdpError("SDP must start with v=0")
            seen_first = True
        if kind == "m":
            current = _parse_media_line(value)
            media.append(current)
        elif current is None:
            session_lines.append((kind, value))
        else:
            current.lines.append((kind, value))
    if not seen_first:
        raise SdpError("empty SDP")
    sdp = SessionDescription(session_lines, media)
    sdp.origin  # noqa: B018 - validates presence and syntax of o=
    if sdp.connection is not None:
        pass  # parse_connection already validated it
    for index, description in enumerate(media):
        for kind, value in description.lines:
            if kind == "c":
                parse_connection(value)
        if description.rtcp_mux or description.has_attribute("rtcp"):
            description.rtcp  # noqa: B018 - validates a=rtcp
        if not description.is_disabled and sdp.stream_connection(index) is None:
            raise SdpError(f"no c= for media {index} ({description.media})")
    return sdp


def _parse_media_line(value: str) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(f"bad m= line: {value!r}")
    media_type, port_text, proto, *formats = parts
    port_count: int | None = None
    if "/" in port_text:
        port_text, _, count_text = port_text.partition("/")
        if not count_text.isdigit():
            raise SdpError(f"bad port count in m=: {value!r}")
        port_count = int(count_text)
    port = _parse_port(port_text, "m=")
    return MediaDescription(
        media_type, port, port_count, proto, formats, _raw_m=value, _raw_port=port
    )


@dataclass(slots=True, frozen=True)
class RelayStreamPorts:
    """The relay's ports for one media section on one side: where that side sends to us.

    ``rtcp_mux`` says whether to keep ``a=rtcp-mux`` in the SDP written for that side.
    ``port`` 0 disables the stream (m= port 0, no allocation).
    """

    port: int
    rtcp_port: int
    rtcp_mux: bool = False


def rewrite_for_relay(
    sdp: SessionDescription,
    address: str,
    streams: Sequence[RelayStreamPorts | None],
    *,
    strip_ice: bool = True,
) -> SessionDescription:
    """A copy of ``sdp`` pointing at the relay: ``address`` and the ports in ``streams``.

    ``streams[i]`` is for ``sdp.media[i]``; ``None`` leaves the media's port as it is (a
    disabled stream stays at port 0). Session- and media-level ``c=`` become the relay's
    address (unless the media is disabled), ``a=rtcp`` is re-pointed at the relay's RTCP
    port (its RTP port when muxed), ``a=rtcp-mux`` is kept only where the stream says so.
    Everything else is kept verbatim, except ICE attributes when ``strip_ice``.
    """
    if len(streams) != len(sdp.media):
        raise SdpError("stream count does not match the SDP's media sections")
    addr_type = address_type(address)
    relay_connection = Connection("IN", addr_type, address.strip("[]"))
    session_lines = [
        ("c", str(relay_connection)) if kind == "c" else (kind, value) for kind, value in sdp.lines
    ]
    if strip_ice:
        session_lines = [
            (kind, value)
            for kind, value in session_lines
            if not (kind == "a" and value.partition(":")[0] in ICE_ATTRIBUTES)
        ]
    has_session_connection = any(kind == "c" for kind, _ in session_lines)
    media_out: list[MediaDescription] = []
    for description, ports in zip(sdp.media, streams, strict=True):
        copy = MediaDescription(
            description.media,
            description.port,
            description.port_count,
            description.proto,
            list(description.formats),
            list(description.lines),
            _raw_m=description._raw_m,
            _raw_port=description._raw_port,
        )
        if ports is None or ports.port == 0:
            if ports is not None:
                copy.port = 0
            media_out.append(copy)
            continue
        copy.port = ports.port
        rtcp_port = ports.port if ports.rtcp_mux else ports.rtcp_port
        new_lines: list[tuple[str, str]] = []
        had_connection = False
        for kind, value in copy.lines:
            if kind == "c":
                had_connection = True
                new_lines.append(("c", str(relay_connection)))
                continue
            if kind == "a":
                name, _, rest = value.partition(":")
                if strip_ice and name in ICE_ATTRIBUTES:
                    continue
                if name == "rtcp-mux" and not ports.rtcp_mux:
                    continue
                if name == "rtcp":
                    with_address = len(rest.split()) > 1
                    value = f"rtcp:{rtcp_port}" + (f" {relay_connection}" if with_address else "")
            new_lines.append((kind, value))
        if not had_connection and not has_session_connection:
            insert_at = next(
                (i for i, (kind, _) in enumerate(new_lines) if kind not in ("i",)), len(new_lines)
            )
            new_lines.insert(insert_at, ("c", str(relay_connection)))
        copy.lines = new_lines
        media_out.append(copy)
    return SessionDescription(session_lines, media_out)

"""LoST client: asks an ECRF which PSAP/ESRP serves an emergency call (EM-32, P-I3 profile).

An NG9-1-1 / NG112 (i3) trunk routes an emergency call by its location: before the INVITE
goes out, the switch asks the Emergency Call Routing Function with a LoST `findService`
request (RFC 5222) carrying the caller's civic address (RFC 5139 civicAddress, location
profile "civic") and the service URN (urn:service:sos[.x], RFC 5031). The ECRF answers a
`findServiceResponse` whose `mapping` lists the URIs of the ESRP or PSAP for that place; the
first sip:/sips: one becomes the INVITE's Route (`route_for`). When the ECRF does not
answer within the budget (500 ms by default), answers an error (`errors`), a `redirect`, or
anything unreadable, `find_service` returns None and the switch uses the trunk's configured
default ESRP route instead: LoST only ever refines the route, it never delays the call by
more than its budget nor stops it.

Answers are cached per (service URN, civic address) until their `mapping/@expires`
(RFC 5222 §5.2: an xs:dateTime, "NO-CACHE" or "NO-EXPIRATION"; the latter is capped at
`max_ttl`); failures are cached for a few seconds (`negative_ttl`) so that an ECRF outage
costs the budget once, not on every call. Concurrent look-ups of one key share one query.

Transport is HTTP/1.1 POST (RFC 5222 §12, Content-Type application/lost+xml) over plain
TCP or TLS with asyncio streams, one connection per query (Connection: close). Answers are
parsed with lxml with entity resolution, DTDs and network access off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog
from lxml import etree

from sip.grammar import GrammarError
from sip.uri import SipUri, parse_uri

from .civic import CivicAddress

log = structlog.get_logger("e911.lost")

LOST_NS = "urn:ietf:params:xml:ns:lost1"
CIVIC_NS = "urn:ietf:params:xml:ns:pidf:geopriv10:civicAddr"
XML_NS = "http://www.w3.org/XML/1998/namespace"
LOST_CONTENT_TYPE = "application/lost+xml"

DEFAULT_TIMEOUT = 0.5  # s, EM-32
DEFAULT_NEGATIVE_TTL = 5.0  # s a failure is remembered
DEFAULT_MAX_TTL = 86400.0  # s an answer is kept at most (NO-EXPIRATION, far-future expires)
MAX_ANSWER_BYTES = 256 * 1024
MAX_HEADER_LINES = 100

_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 5031 service URN: urn:service:<top-level>[.<sub>...], labels let-dig-hyp.
_SERVICE_URN = re.compile(r"urn:service:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
                          r"(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
_NO_CACHE = "NO-CACHE"
_NO_EXPIRATION = "NO-EXPIRATION"


class LostError(Exception):
    """A LoST exchange that gave no usable mapping. ``kind`` is one of "errors" (the server
    answered <errors>), "redirect" (<redirect>), "http" (non-2xx HTTP status), "malformed"
    (unreadable answer), "no-route" (a mapping without any usable sip:/sips: URI)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class LostAnswer:
    """One LoST mapping (RFC 5222 §5) as the call routing uses it.

    ``uris``: the mapping's <uri> values, the valid sip:/sips: ones first, in the server's
    order. ``expires``: absolute POSIX time until which the mapping is valid (``math.inf``
    for NO-EXPIRATION; the receipt time for NO-CACHE or an unreadable value).
    ``source``/``source_id``: the authoritative server and its mapping id.
    ``from_cache``: True when this answer was served from the client's cache.
    """

    uris: list[str]
    expires: float
    source: str
    service: str
    display_name: str | None = None
    source_id: str = ""
    service_number: str | None = None
    from_cache: bool = False


@dataclass(slots=True)
class _CacheEntry:
    answer: LostAnswer | None  # None: a remembered failure
    deadline: float  # on the client's monotonic clock


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def lost_server_problems(url: str) -> list[str]:
    """Problems with a LoST server URL ([] = usable): http:// or https:// with a host."""
    if not isinstance(url, str) or not url.strip():
        return ["LoST server URL is empty"]
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        return [f"LoST server URL {url!r}: {exc}"]
    problems: list[str] = []
    if parts.scheme not in _DEFAULT_PORTS:
        problems.append(f"LoST server URL {url!r} must use http:// or https://, "
                        f"not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        problems.append(f"LoST server URL {url!r} has no host")
    if port == 0:
        problems.append(f"LoST server URL {url!r} has port 0")
    if any(c.isspace() for c in url.strip()):
        problems.append(f"LoST server URL {url!r} contains white space")
    return problems


def normalise_service_urn(service_urn: str) -> str:
    """The service URN in lower case; ValueError unless it is urn:service:x[.y...]."""
    if not isinstance(service_urn, str):
        raise ValueError("service URN must be text")
    urn = service_urn.strip().lower()
    if _SERVICE_URN.fullmatch(urn) is None:
        raise ValueError(f"service URN {service_urn!r} is not urn:service:<service>[.<sub>]"
                         " (RFC 5031)")
    return urn


def lost_service_urn(service_urn: str | None, test: bool) -> str:
    """The service URN to ask the ECRF for: the dialled URN (urn:service:sos when a number
    was dialled), in its urn:service:test. form for a test call (RFC 6881 SP-40 test
    calls are routed like real ones, to a test service)."""
    urn = (service_urn or "urn:service:sos").strip().lower()
    if test and not urn.startswith("urn:service:test."):
        urn = "urn:service:test." + urn.removeprefix("urn:service:")
    return urn


def build_find_service(civic: CivicAddress, service_urn: str, *,
                       location_id: str | None = None) -> bytes:
    """The RFC 5222 <findService> request for ``civic`` and ``service_urn``: one
    <location profile="civic"> holding an RFC 5139 civicAddress with its elements in
    schema order, then <service>. ``recursive="true"``: the ECRF resolves on our behalf
    rather than redirecting us. ValueError on an empty address or a bad URN."""
    if not isinstance(civic, CivicAddress):
        raise ValueError("the location must be a CivicAddress")
    urn = normalise_service_urn(service_urn)
    elements = civic.elements()
    if not elements:
        raise ValueError("the civic address has no element to map")
    request = etree.Element(_q(LOST_NS, "findService"), nsmap={None: LOST_NS})
    request.set("recursive", "true")
    request.set("serviceBoundary", "reference")
    location = etree.SubElement(request, _q(LOST_NS, "location"))
    location.set("id", location_id or secrets.token_hex(8))
    location.set("profile", "civic")
    address = etree.SubElement(location, _q(CIVIC_NS, "civicAddress"), nsmap={None: CIVIC_NS})
    if civic.language:
        address.set(_q(XML_NS, "lang"), civic.language)
    for element, value in elements:
        etree.SubElement(address, _q(CIVIC_NS, element)).text = value
    etree.SubElement(request, _q(LOST_NS, "service")).text = urn
    return etree.tostring(request, xml_declaration=True, encoding="UTF-8")


def _parse_expires(value: str | None, now_wall: float) -> tuple[float, bool]:
    """(absolute POSIX expiry, whether the answer may be cached)."""
    if value is None:
        return now_wall, False
    value = value.strip()
    if value == _NO_CACHE:
        return now_wall, False
    if value == _NO_EXPIRATION:
        return math.inf, True
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        log.warning("lost.expires_unreadable", expires=value)
        return now_wall, False
    if moment.tzinfo is None:  # xs:dateTime without a zone: taken as UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp(), True


def _text(element: Any) -> str:
    return " ".join((element.text or "").split()) if element is not None else ""


def _sip_uri(text: str) -> SipUri | None:
    try:
        uri = parse_uri(text)
    except GrammarError:
        return None
    return uri if isinstance(uri, SipUri) and uri.host else None


def _error_summary(root: Any) -> str:
    parts = []
    for child in root:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        message = child.get("message")
        parts.append(f"{name}: {message}" if message else name)
    source = root.get("source")
    text = ", ".join(parts) or "no detail"
    return f"{text} (from {source})" if source else text


def _parse_xml(body: bytes) -> Any:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False, remove_comments=True,
                             remove_pis=True)
    try:
        root = etree.fromstring(body, parser)
    except etree.XMLSyntaxError as exc:
        raise LostError("malformed", f"answer is not well-formed XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise LostError("malformed", "answer carries a DOCTYPE (not allowed in LoST)")
    return root


def parse_find_service_response(body: bytes, *, now_wall: float | None = None
                                ) -> tuple[LostAnswer, bool]:
    """(answer, cacheable) from a LoST answer body. Raises LostError for <errors>,
    <redirect>, a malformed answer, or a mapping without any valid sip:/sips: URI."""
    now = time.time() if now_wall is None else now_wall
    root = _parse_xml(body)
    tag = root.tag if isinstance(root.tag, str) else ""
    if tag == _q(LOST_NS, "errors"):
        raise LostError("errors", f"ECRF error: {_error_summary(root)}")
    if tag == _q(LOST_NS, "redirect"):
        target = root.get("target") or "?"
        raise LostError("redirect", f"ECRF redirects to {target} (not followed)")
    if tag != _q(LOST_NS, "findServiceResponse"):
        raise LostError("malformed", f"answer is <{tag or root.tag}>, not a findServiceResponse")
    mappings = root.findall(_q(LOST_NS, "mapping"))
    if not mappings:
        raise LostError("malformed", "findServiceResponse without a mapping")
    for warning in root.findall(_q(LOST_NS, "warnings")):
        log.info("lost.warning", detail=_error_summary(warning))
    rejected: list[str] = []
    for mapping in mappings:
        sip: list[str] = []
        others: list[str] = []
        for uri_element in mapping.findall(_q(LOST_NS, "uri")):
            text = (uri_element.text or "").strip()
            if not text:
                continue
            scheme = text.split(":", 1)[0].lower()
            if scheme in ("sip", "sips"):
                if _sip_uri(text) is not None:
                    sip.append(text)
                else:
                    rejected.append(text)
            elif not any(c.isspace() or c in "<>\"" for c in text):
                others.append(text)
        if not sip:
            continue
        expires, cacheable = _parse_expires(mapping.get("expires"), now)
        display = next((_text(d) for d in mapping.findall(_q(LOST_NS, "displayName"))
                        if _text(d)), None)
        number = _text(mapping.find(_q(LOST_NS, "serviceNumber"))) or None
        answer = LostAnswer(
            uris=sip + others, expires=expires, source=mapping.get("source") or "",
            service=_text(mapping.find(_q(LOST_NS, "service"))), display_name=display,
            source_id=mapping.get("sourceId") or "", service_number=number,
        )
        return answer, cacheable and expires > now
    detail = f" (invalid: {', '.join(repr(r[:80]) for r in rejected[:3])})" if rejected else ""
    raise LostError("no-route", f"no mapping with a usable sip:/sips: URI{detail}")


def route_for(answer: LostAnswer) -> str:
    """The Route header value for ``answer``: its first sip:/sips: URI as a loose route,
    e.g. ``<sip:esrp@ecrf.example;lr>`` (URI headers and password dropped). ValueError
    when the answer has no valid sip:/sips: URI (never the case for `find_service`)."""
    for text in answer.uris:
        uri = _sip_uri(text)
        if uri is None:
            continue
        route = uri.copy()
        route.password = None
        route.headers = None
        if "lr" not in {name.lower() for name in route.params}:
            route.params["lr"] = None
        return f"<{route}>"
    raise ValueError("the LoST answer has no sip: or sips: URI to route to")


@dataclass(slots=True)
class _HttpAnswer:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class LostClient:
    """Queries one ECRF (LoST server) and caches its answers. See the module docstring.

    ``server_url``: http:// or https:// URL of the LoST service (ValueError if unusable).
    ``timeout``: the whole budget of one query (connect, send, answer), seconds.
    ``cache_size``: answers kept (least recently used dropped first).
    ``clock``: monotonic seconds for cache deadlines; ``wall_clock``: POSIX time, to turn
    the absolute ``expires`` into a deadline. ``ssl_context``: for https (default: the
    system's trust store).
    """

    def __init__(
        self,
        server_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        problems = lost_server_problems(server_url)
        if problems:
            raise ValueError("; ".join(problems))
        if not timeout > 0:
            raise ValueError(f"LoST timeout must be > 0 s, not {timeout!r}")
        if cache_size < 0:
            raise ValueError(f"LoST cache_size must be >= 0, not {cache_size!r}")
        if negative_ttl < 0 or max_ttl < 0:
            raise ValueError("LoST negative_ttl and max_ttl must be >= 0")
        self.server_url = server_url.strip()
        parts = urlsplit(self.server_url)
        self._scheme = parts.scheme
        self._host = parts.hostname or ""
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        host_header = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host_header + (f":{parts.port}" if parts.port is not None else "")
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = float(timeout)
        self.cache_size = cache_size
        self.clock = clock
        self.wall_clock = wall_clock
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self._ssl_context = ssl_context
        self._cache: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], _CacheEntry] = (
            OrderedDict())
        self._inflight: dict[tuple[str, tuple[tuple[str, str], ...]],
                             asyncio.Task[LostAnswer | None]] = {}
        self.queries = 0  # HTTP exchanges attempted (for metrics and tests)

    # -- public ------------------------------------------------------------------------------
    async def find_service(self, civic: CivicAddress, service_urn: str) -> LostAnswer | None:
        """The ECRF's mapping for ``civic`` and ``service_urn``, or None (failure, timeout,
        error, redirect: logged). Never raises, except CancelledError when the caller is
        cancelled; returns within ``timeout`` plus scheduling delays."""
        try:
            urn = normalise_service_urn(service_urn)
            if not isinstance(civic, CivicAddress):
                raise ValueError("the location must be a CivicAddress")
            elements = tuple(civic.elements())
            if not elements:
                raise ValueError("the civic address has no element to map")
        except ValueError as exc:
            log.warning("lost.not_asked", server=self.server_url, reason=str(exc))
            return None
        key = (urn, elements)
        entry = self._cache.get(key)
        if entry is not None:
            if entry.deadline > self.clock():
                self._cache.move_to_end(key)
                if entry.answer is None:
                    log.debug("lost.negative_cache_hit", server=self.server_url, service=urn)
                    return None
                return dataclasses.replace(entry.answer, uris=list(entry.answer.uris),
                                           from_cache=True)
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key, civic))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        try:
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and not _current_task_cancelling():
                return None  # the query was cancelled by close(), not our caller
            raise
        except Exception as exc:  # _query never raises; belt and braces
            log.error("lost.failed", server=self.server_url, service=urn,
                      reason=f"{type(exc).__name__}: {exc}")
            return None
        if answer is None:
            return None
        return dataclasses.replace(answer, uris=list(answer.uris))

    def clear(self) -> None:
        """Forget every cached answer and failure."""
        self._cache.clear()

    async def close(self) -> None:
        """Cancel the queries in flight (their callers get None)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    # -- internals ---------------------------------------------------------------------------
    def _forget(self, key: Any, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    def _remember(self, key: Any, answer: LostAnswer | None, ttl: float) -> None:
        if self.cache_size == 0 or ttl <= 0:
            return
        self._cache[key] = _CacheEntry(answer, self.clock() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _query(self, key: tuple[str, tuple[tuple[str, str], ...]],
                     civic: CivicAddress) -> LostAnswer | None:
        urn = key[0]
        started = time.monotonic()
        self.queries += 1
        try:
            body = build_find_service(civic, urn)
            async with asyncio.timeout(self.timeout):
                http = await self._exchange(body)
            answer, cacheable = self._answer_of(http)
        except Exception as exc:
            reason = _failure_reason(exc, self.timeout)
            log.warning("lost.failed", server=self.server_url, service=urn, reason=reason,
                        elapsed_ms=round((time.monotonic() - started) * 1000, 1))
            self._remember(key, None, self.negative_ttl)
            return None
        ttl = 0.0
        if cacheable:
            ttl = min(self.max_ttl, answer.expires - self.wall_clock())
            self._remember(key, answer, ttl)
        log.info("lost.answer", server=self.server_url, service=urn, uri=answer.uris[0],
                 source=answer.source, mapped_service=answer.service,
                 cached_for=round(max(ttl, 0.0), 1),
                 elapsed_ms=round((time.monotonic() - started) * 1000, 1))
        if answer.service and answer.service != urn:
            log.info("lost.service_substituted", requested=urn, mapped=answer.service)
        return answer

    def _answer_of(self, http: _HttpAnswer) -> tuple[LostAnswer, bool]:
        if 300 <= http.status < 400:
            location = http.headers.get("location", "?")
            raise LostError("http", f"HTTP {http.status} redirect to {location} (not followed)")
        if not 200 <= http.status < 300:
            detail = ""
            with contextlib.suppress(LostError):  # an <errors> body says why
                root = _parse_xml(http.body) if http.body else None
                if root is not None and root.tag == _q(LOST_NS, "errors"):
                    detail = f": {_error_summary(root)}"
            raise LostError("http", f"HTTP {http.status} {http.reason}".rstrip() + detail)
        content_type = http.headers.get("content-type", "").lower()
        if content_type and "xml" not in content_type:
            raise LostError("malformed", f"answer is {content_type}, not {LOST_CONTENT_TYPE}")
        if not http.body:
            raise LostError("malformed", "empty answer")
        return parse_find_service_response(http.body, now_wall=self.wall_clock())

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _exchange(self, body: bytes) -> _HttpAnswer:
        secure = self._scheme == "https"
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=self._tls() if secure else None,
            server_hostname=self._host if secure else None,
        )
        try:
            head = (
                f"POST {self._target} HTTP/1.1\r\n"
                f"Host: {self._host_header}\r\n"
                "User-Agent: softswitch-e911-lost\r\n"
                f"Content-Type: {LOST_CONTENT_TYPE}\r\n"
                f"Accept: {LOST_CONTENT_TYPE}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            return await _read_http_answer(reader)
        finally:
            # No wait_closed(): a TLS close handshake must not eat the routing budget.
            writer.close()


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _failure_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, LostError):
        return str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before the whole answer"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc}"
    if isinstance(exc, OSError):
        return f"cannot reach the LoST server: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


async def _read_http_answer(reader: asyncio.StreamReader) -> _HttpAnswer:
    for _ in range(5):  # skip 1xx interim answers
        status_line = await reader.readline()
        if not status_line:
            raise LostError("malformed", "connection closed without an HTTP answer")
        parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise LostError("malformed", f"bad HTTP status line {status_line[:80]!r}")
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES + 1):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise LostError("malformed", f"bad HTTP header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise LostError("malformed", "too many HTTP header lines")
        if 100 <= status < 200:
            continue
        return _HttpAnswer(status, reason, headers, await _read_body(reader, headers))
    raise LostError("malformed", "too many interim HTTP answers")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise LostError("malformed", f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                break
            total += size
            if total > MAX_ANSWER_BYTES:
                raise LostError("malformed", f"answer larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)  # CRLF after the chunk
        return b"".join(chunks)
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise LostError("malformed", f"bad Content-Length {length_text!r}")
        length = int(length_text)
        if length > MAX_ANSWER_BYTES:
            raise LostError("malformed", f"answer larger than {MAX_ANSWER_BYTES} bytes")
        return await reader.readexactly(length)
    body = await reader.read(MAX_ANSWER_BYTES + 1)
    while len(body) <= MAX_ANSWER_BYTES:
        more = await reader.read(MAX_ANSWER_BYTES + 1 - len(body))
        if not more:
            return body
        body += more
    raise LostError("malformed", f"answer larger than {MAX_ANSWER_BYTES} bytes")


__all__ = [
    "CIVIC_NS",
    "LOST_CONTENT_TYPE",
    "LOST_NS",
    "LostAnswer",
    "LostClient",
    "LostError",
    "build_find_service",
    "lost_server_problems",
    "lost_service_urn",
    "normalise_service_urn",
    "parse_find_service_response",
    "route_for",
]

"""LoST client (EM-32): findService towards a mock ECRF on loopback, answer parsing,
caching until `expires`, the 500 ms budget, failures giving None (the default ESRP route)."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import pytest
from lxml import etree

from e911.civic import ELEMENT_ORDER, CivicAddress
from e911.lost import (
    CIVIC_NS,
    LOST_NS,
    LostAnswer,
    LostClient,
    LostError,
    build_find_service,
    lost_server_problems,
    lost_service_urn,
    parse_find_service_response,
    route_for,
)

LOOPBACK = "127.0.0.1"
PSAP_URI = "sip:psap-a@127.0.0.1"

# Built with keywords in no particular order: the request must still follow the schema.
ADDRESS = CivicAddress(
    room="B312", postal_code="60601", floor="3", house_number="100", road="Main",
    street_suffix="St", city="Chicago", subdivision="IL", country="US", building="North",
    name="ACME HQ", language="en-US",
)


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def mapping_response(
    uris: list[str] | None = None,
    *,
    expires: str | None = None,
    service: str = "urn:service:sos",
    source: str = "ecrf.example",
) -> bytes:
    uris = [PSAP_URI] if uris is None else uris
    expires = expires or iso(time.time() + 300)
    uri_xml = "".join(f"<uri>{u}</uri>" for u in uris)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f'<findServiceResponse xmlns="{LOST_NS}">'
        f'<mapping expires="{expires}" lastUpdated="2024-01-01T00:00:00Z" source="{source}"'
        f' sourceId="m-42"><displayName xml:lang="en">Chicago PSAP A</displayName>'
        f"<service>{service}</service>{uri_xml}<serviceNumber>911</serviceNumber></mapping>"
        f'<path><via source="ecrf.example"/></path><locationUsed id="x"/>'
        f"</findServiceResponse>"
    ).encode()


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class MockEcrf:
    """An ECRF on loopback: answers each POST with ``respond(request)`` -> (status, headers,
    body) after ``delay`` seconds; counts requests."""

    respond: Callable[[Received], tuple[int, dict[str, str], bytes]] = (
        lambda _r: (200, {"Content-Type": "application/lost+xml"}, mapping_response()))
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> MockEcrf:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/lost"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=2.0)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request_line = (await reader.readline()).decode().rstrip("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers: dict[str, str] = {}
            for _ in range(100):
                line = (await reader.readline()).decode().rstrip("\r\n")
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Received(method, target, headers, body)
            self.requests.append(request)
            if self.delay:
                await asyncio.sleep(self.delay)
            status, answer_headers, answer = self.respond(request)
            head = f"HTTP/1.1 {status} Answer\r\n"
            if "Transfer-Encoding" not in answer_headers:
                answer_headers = {**answer_headers, "Content-Length": str(len(answer))}
            head += "".join(f"{k}: {v}\r\n" for k, v in answer_headers.items())
            writer.write(f"{head}Connection: close\r\n\r\n".encode() + answer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


@pytest.fixture
async def ecrf():
    server = await MockEcrf().start()
    yield server
    await server.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the request --------------------------------------------------------------------------


async def test_request_is_a_find_service_with_the_civic_address_in_schema_order(
    ecrf: MockEcrf,
) -> None:
    client = LostClient(ecrf.url)
    assert await client.find_service(ADDRESS, "urn:service:sos.fire") is not None
    [request] = ecrf.requests
    assert request.method == "POST"
    assert request.target == "/lost"
    assert request.headers["content-type"] == "application/lost+xml"
    assert request.headers["host"] == f"{LOOPBACK}:{ecrf.port}"
    root = etree.fromstring(request.body)
    assert root.tag == f"{{{LOST_NS}}}findService"
    [location] = root.findall(f"{{{LOST_NS}}}location")
    assert location.get("profile") == "civic"
    assert location.get("id")
    [address] = list(location)
    assert address.tag == f"{{{CIVIC_NS}}}civicAddress"
    assert address.get("{http://www.w3.org/XML/1998/namespace}lang") == "en-US"
    names = [etree.QName(child).localname for child in address]
    assert names == [element for element, _ in ADDRESS.elements()]
    assert names == sorted(names, key=ELEMENT_ORDER.index)  # schema order
    assert names.index("PC") < names.index("BLD") < names.index("ROOM")
    assert {etree.QName(c).localname: c.text for c in address}["RD"] == "Main"
    assert root.findtext(f"{{{LOST_NS}}}service") == "urn:service:sos.fire"
    # the service element follows the location (findService content order)
    assert [etree.QName(c).localname for c in root] == ["location", "service"]


def test_build_find_service_refuses_bad_urns_and_empty_addresses() -> None:
    with pytest.raises(ValueError, match="RFC 5031"):
        build_find_service(ADDRESS, "tel:911")
    with pytest.raises(ValueError, match="no element"):
        build_find_service(CivicAddress(), "urn:service:sos")
    body = build_find_service(ADDRESS, "URN:Service:SOS.Police", location_id="loc1")
    root = etree.fromstring(body)
    assert root.findtext(f"{{{LOST_NS}}}service") == "urn:service:sos.police"
    assert root.find(f"{{{LOST_NS}}}location").get("id") == "loc1"


def test_values_with_markup_characters_are_escaped() -> None:
    address = CivicAddress(country="US", subdivision="IL", road="A&B <Rd>", house_number="1")
    root = etree.fromstring(build_find_service(address, "urn:service:sos"))
    assert root.find(f".//{{{CIVIC_NS}}}RD").text == "A&B <Rd>"


# -- answers and the cache ----------------------------------------------------------------


async def test_answer_is_returned_and_becomes_the_route(ecrf: MockEcrf) -> None:
    client = LostClient(ecrf.url)
    before = time.time()
    answer = await client.find_service(ADDRESS, "urn:service:sos")
    assert answer is not None
    assert answer.uris == [PSAP_URI]
    assert before + 290 < answer.expires < before + 310
    assert answer.source == "ecrf.example"
    assert answer.source_id == "m-42"
    assert answer.service == "urn:service:sos"
    assert answer.display_name == "Chicago PSAP A"
    assert answer.service_number == "911"
    assert answer.from_cache is False
    assert route_for(answer) == "<sip:psap-a@127.0.0.1;lr>"


async def test_second_query_is_served_from_the_cache(ecrf: MockEcrf) -> None:
    client = LostClient(ecrf.url)
    first = await client.find_service(ADDRESS, "urn:service:sos")
    second = await client.find_service(ADDRESS, "URN:service:SOS")  # same key, any case
    assert first is not None and second is not None
    assert len(ecrf.requests) == 1
    assert second.from_cache is True
    assert second.uris == first.uris
    second.uris.append("sip:tamper@x")  # the caller's copy; the cache keeps its own
    third = await client.find_service(ADDRESS, "urn:service:sos")
    assert third is not None and third.uris == [PSAP_URI]
    # another service or another address is another question
    await client.find_service(ADDRESS, "urn:service:sos.police")
    await client.find_service(ADDRESS.refine(ROOM="C1"), "urn:service:sos")
    assert len(ecrf.requests) == 3


async def test_expired_answer_is_asked_again(ecrf: MockEcrf) -> None:
    clock = FakeClock()
    ecrf.respond = lambda _r: (200, {}, mapping_response(expires=iso(time.time() + 60)))
    client = LostClient(ecrf.url, clock=clock)
    assert await client.find_service(ADDRESS, "urn:service:sos") is not None
    clock.now += 50
    assert (await client.find_service(ADDRESS, "urn:service:sos")).from_cache
    assert len(ecrf.requests) == 1
    clock.now += 15  # past expires
    answer = await client.find_service(ADDRESS, "urn:service:sos")
    assert answer is not None and not answer.from_cache
    assert len(ecrf.requests) == 2


async def test_no_cache_answers_are_never_cached(ecrf: MockEcrf) -> None:
    ecrf.respond = lambda _r: (200, {}, mapping_response(expires="NO-CACHE"))
    client = LostClient(ecrf.url)
    for _ in range(2):
        answer = await client.find_service(ADDRESS, "urn:service:sos")
        assert answer is not None and answer.uris == [PSAP_URI]
    assert len(ecrf.requests) == 2


async def test_no_expiration_is_cached_but_capped_by_max_ttl(ecrf: MockEcrf) -> None:
    clock = FakeClock()
    ecrf.respond = lambda _r: (200, {}, mapping_response(expires="NO-EXPIRATION"))
    client = LostClient(ecrf.url, clock=clock, max_ttl=600)
    answer = await client.find_service(ADDRESS, "urn:service:sos")
    assert answer is not None and answer.expires == math.inf
    clock.now += 599
    assert (await client.find_service(ADDRESS, "urn:service:sos")).from_cache
    clock.now += 2
    await client.find_service(ADDRESS, "urn:service:sos")
    assert len(ecrf.requests) == 2


async def test_an_answer_already_expired_is_used_but_not_cached(ecrf: MockEcrf) -> None:
    ecrf.respond = lambda _r: (200, {}, mapping_response(expires=iso(time.time() - 10)))
    client = LostClient(ecrf.url)
    for _ in range(2):
        answer = await client.find_service(ADDRESS, "urn:service:sos")
        assert answer is not None and answer.uris == [PSAP_URI]
    assert len(ecrf.requests) == 2


async def test_concurrent_questions_share_one_query(ecrf: MockEcrf) -> None:
    ecrf.delay = 0.05
    client = LostClient(ecrf.url)
    answers = await asyncio.gather(
        *(client.find_service(ADDRESS, "urn:service:sos") for _ in range(5)))
    assert all(a is not None and a.uris == [PSAP_URI] for a in answers)
    assert len(ecrf.requests) == 1


async def test_least_recently_used_answers_are_dropped_beyond_cache_size(
    ecrf: MockEcrf,
) -> None:
    client = LostClient(ecrf.url, cache_size=2)
    rooms = [ADDRESS.refine(ROOM=str(n)) for n in range(3)]
    for room in rooms:
        await client.find_service(room, "urn:service:sos")
    assert len(ecrf.requests) == 3
    await client.find_service(rooms[2], "urn:service:sos")  # still cached
    assert len(ecrf.requests) == 3
    await client.find_service(rooms[0], "urn:service:sos")  # was dropped
    assert len(ecrf.requests) == 4


async def test_chunked_answer_is_read(ecrf: MockEcrf) -> None:
    body = mapping_response()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100])
                       for i in range(0, len(body), 100)) + b"0\r\n\r\n"
    ecrf.respond = lambda _r: (200, {"Transfer-Encoding": "chunked"}, chunked)
    answer = await LostClient(ecrf.url).find_service(ADDRESS, "urn:service:sos")
    assert answer is not None and answer.uris == [PSAP_URI]


async def test_sip_uris_come_first_and_invalid_ones_are_dropped(ecrf: MockEcrf) -> None:
    ecrf.respond = lambda _r: (200, {}, mapping_response(
        ["xmpp:psap@example.com", "sip:bad uri@x", "sips:psap-b@esrp.example:5061",
         PSAP_URI]))
    answer = await LostClient(ecrf.url).find_service(ADDRESS, "urn:service:sos")
    assert answer is not None
    assert answer.uris == ["sips:psap-b@esrp.example:5061", PSAP_URI, "xmpp:psap@example.com"]
    assert route_for(answer) == "<sips:psap-b@esrp.example:5061;lr>"


# -- failures give None (the default ESRP route is used) -----------------------------------


async def test_slow_ecrf_gives_none_within_the_budget(ecrf: MockEcrf) -> None:
    ecrf.delay = 2.0
    client = LostClient(ecrf.url, timeout=0.5)
    started = time.monotonic()
    answer = await client.find_service(ADDRESS, "urn:service:sos")
    elapsed = time.monotonic() - started
    assert answer is None
    assert 0.45 <= elapsed < 0.8
    assert len(ecrf.requests) == 1


async def test_ecrf_down_gives_none_fast() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        client = LostClient(f"http://{LOOPBACK}:{port}/lost")
        started = time.monotonic()
        assert await client.find_service(ADDRESS, "urn:service:sos") is None
        assert time.monotonic() - started < 0.3
    finally:
        sock.close()


async def test_failures_are_remembered_for_negative_ttl(ecrf: MockEcrf) -> None:
    clock = FakeClock()
    ecrf.respond = lambda _r: (500, {}, b"")
    client = LostClient(ecrf.url, clock=clock, negative_ttl=5.0)
    assert await client.find_service(ADDRESS, "urn:service:sos") is None
    assert await client.find_service(ADDRESS, "urn:service:sos") is None
    assert len(ecrf.requests) == 1
    ecrf.respond = lambda _r: (200, {}, mapping_response())
    clock.now += 6
    answer = await client.find_service(ADDRESS, "urn:service:sos")
    assert answer is not None and answer.uris == [PSAP_URI]
    assert len(ecrf.requests) == 2


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (200, {}, b"<findServiceResponse xmlns='urn:ietf:params:xml:ns:lost1'><mapping"),
        (200, {}, b"not xml at all"),
        (200, {}, b""),
        (200, {"Content-Type": "text/html"}, b"<html><body>oops</body></html>"),
        (200, {}, f"<errors xmlns='{LOST_NS}' source='ecrf.example'>"
                  "<notFound message='no PSAP here'/></errors>".encode()),
        (200, {}, f"<redirect xmlns='{LOST_NS}' target='other.example'"
                  " source='ecrf.example'/>".encode()),
        (200, {}, mapping_response(["xmpp:psap@example.com"])),  # nothing SIP can use
        (200, {}, mapping_response(["sip:x@y\r\nVia: SIP/2.0/UDP evil"])),  # header injection
        (200, {}, f"<listServicesResponse xmlns='{LOST_NS}'/>".encode()),
        (200, {}, b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY e 'PSAP'>]>"
                  b"<findServiceResponse xmlns='urn:ietf:params:xml:ns:lost1'>"
                  b"<mapping expires='NO-CACHE' source='s'><displayName>&e;</displayName>"
                  b"<uri>sip:psap@x</uri></mapping></findServiceResponse>"),
        (500, {}, f"<errors xmlns='{LOST_NS}'><internalError/></errors>".encode()),
        (302, {"Location": "http://elsewhere.example/lost"}, b""),
        (404, {}, b""),
    ],
    ids=["truncated-xml", "not-xml", "empty", "html", "errors", "redirect", "no-sip-uri",
         "crlf-uri", "wrong-answer", "doctype-entity", "http-500", "http-302", "http-404"],
)
async def test_unusable_answers_give_none(
    ecrf: MockEcrf, status: int, headers: dict[str, str], body: bytes,
) -> None:
    ecrf.respond = lambda _r: (status, headers, body)
    client = LostClient(ecrf.url)
    assert await client.find_service(ADDRESS, "urn:service:sos") is None
    assert len(ecrf.requests) == 1


async def test_bad_questions_give_none_without_asking(ecrf: MockEcrf) -> None:
    client = LostClient(ecrf.url)
    assert await client.find_service(CivicAddress(), "urn:service:sos") is None
    assert await client.find_service(ADDRESS, "911") is None
    assert await client.find_service("10 Main St", "urn:service:sos") is None  # type: ignore[arg-type]
    assert ecrf.requests == []


async def test_close_cancels_a_query_in_flight_and_its_caller_gets_none(
    ecrf: MockEcrf,
) -> None:
    ecrf.delay = 2.0
    client = LostClient(ecrf.url, timeout=5.0)
    pending = asyncio.ensure_future(client.find_service(ADDRESS, "urn:service:sos"))
    for _ in range(100):
        if ecrf.requests:
            break
        await asyncio.sleep(0.01)
    assert ecrf.requests
    await client.close()
    assert await asyncio.wait_for(pending, 1.0) is None


# -- pieces -------------------------------------------------------------------------------


def test_parse_reads_expires_with_a_zone_offset() -> None:
    moment = datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    local = moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    answer, cacheable = parse_find_service_response(
        mapping_response(expires=local), now_wall=moment.timestamp() - 100)
    assert answer.expires == moment.timestamp()
    assert cacheable is True


def test_parse_errors_carry_the_kind_and_the_server_message() -> None:
    with pytest.raises(LostError, match="notFound: nothing") as info:
        parse_find_service_response(
            f"<errors xmlns='{LOST_NS}'><notFound message='nothing'/></errors>".encode())
    assert info.value.kind == "errors"
    with pytest.raises(LostError) as info:
        parse_find_service_response(f"<redirect xmlns='{LOST_NS}' target='t'/>".encode())
    assert info.value.kind == "redirect"


def test_route_for_makes_a_loose_route_without_uri_headers() -> None:
    answer = LostAnswer(uris=["xmpp:a@b", "sip:esrp@10.0.0.1:5060;transport=tcp?Subject=x"],
                        expires=0.0, source="s", service="urn:service:sos")
    assert route_for(answer) == "<sip:esrp@10.0.0.1:5060;transport=tcp;lr>"
    already = LostAnswer(uris=["sip:esrp@h;lr"], expires=0.0, source="s", service="")
    assert route_for(already) == "<sip:esrp@h;lr>"
    with pytest.raises(ValueError, match="no sip"):
        route_for(LostAnswer(uris=["xmpp:a@b"], expires=0.0, source="s", service=""))


def test_server_urls_are_checked() -> None:
    assert lost_server_problems("https://ecrf.example/lost") == []
    assert lost_server_problems("http://[::1]:8080/") == []
    assert lost_server_problems("ftp://ecrf.example/")
    assert lost_server_problems("https:///lost")
    assert lost_server_problems("")
    with pytest.raises(ValueError, match="http:// or https://"):
        LostClient("ecrf.example")
    with pytest.raises(ValueError, match="timeout"):
        LostClient("http://ecrf.example/", timeout=0)


def test_service_urn_for_test_calls() -> None:
    assert lost_service_urn(None, False) == "urn:service:sos"
    assert lost_service_urn("urn:service:SOS.fire", False) == "urn:service:sos.fire"
    assert lost_service_urn(None, True) == "urn:service:test.sos"
    assert lost_service_urn("urn:service:sos.fire", True) == "urn:service:test.sos.fire"
    assert lost_service_urn("urn:service:test.sos", True) == "urn:service:test.sos"

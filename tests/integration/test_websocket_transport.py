"""SIP over WebSocket (RFC 7118) against the real switch process: a browser softphone's
transport beside UDP.

One switch for the module listens on UDP, WS and WSS (a self-signed certificate). A WS
device (aiohttp's WebSocket client offering the ``sip`` subprotocol, the way a browser's
SIP stack connects) registers with the 401 digest round; its Contact has
``;transport=ws`` and an ``.invalid`` host (§5), so the switch can reach it only over
the connection it registered on. A UDP device (tests/peers/sipua.py) calls it: the
INVITE arrives on the WebSocket, is answered with SDP, ACK and BYE follow. The WS device
calls the UDP device (407 round, ACK, BYE). WSS registers too; a handshake without the
``sip`` subprotocol is refused; and when the WebSocket closes, calls to that device no
longer reach it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from switch_process import (
    LOOPBACK_V4,
    Listener,
    SipDevice,
    SwitchProcess,
    build_config,
    free_port,
    make_self_signed_certificate,
)

from sip.digest import build_authorization, choose_challenge
from sip.message import SipRequest, SipResponse, make_response
from sip.parser import parse_message
from sip.transaction import new_branch

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from sipua import SipUA, offer_sdp  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WEB = SipDevice("1000", "pw1000")  # the browser softphone (WS / WSS)
DESK = SipDevice("1001", "pw1001")  # the desk phone (UDP)
WEB2 = SipDevice("1002", "pw1002")  # a second softphone, over WSS
RELAY_PORT_MIN = 50000 + 20 * (os.getpid() % 400)


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's browser gathers ICE host candidates on 127.0.0.1 only."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchProcess]:
    workdir = tmp_path_factory.mktemp("websocket")
    certificate = make_self_signed_certificate(workdir)
    listeners = [
        Listener("udp", LOOPBACK_V4, free_port("udp")),
        Listener("ws", LOOPBACK_V4, free_port("tcp")),
        Listener("wss", LOOPBACK_V4, free_port("tcp")),
    ]
    sections = {
        "media": {
            "backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORT_MIN,
            "port_max": RELAY_PORT_MIN + 19, "media_timeout": 0,
        },
    }  # fmt: skip
    config_path = workdir / "switch.yaml"
    config_path.write_text(
        build_config(listeners, [WEB, DESK, WEB2], tls_files=certificate, sections=sections),
        encoding="utf-8",
    )
    process = SwitchProcess(config_path=config_path, listeners=listeners)
    process.start()
    try:
        yield process
        assert process.process is not None and process.process.poll() is None, "switch died"
    finally:
        process.stop()


class WsDevice:
    """A softphone speaking SIP over one WebSocket connection, as a browser does."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, device: SipDevice,
        *, transport: str = "WS", ssl_context: ssl.SSLContext | None = None,
        host: str | None = None,
    ) -> None:  # fmt: skip
        self.session = session
        self.url = url
        self.device = device
        self.transport = transport
        self.ssl_context = ssl_context
        self.domain = LOOPBACK_V4
        # RFC 7118 §5: a made-up host under .invalid, the device has no reachable address
        self.host = host or f"{secrets.token_hex(6)}.invalid"
        self.websocket: aiohttp.ClientWebSocketResponse | None = None
        self.responses: asyncio.Queue[SipResponse] = asyncio.Queue()
        self.requests: asyncio.Queue[SipRequest] = asyncio.Queue()
        self.raw: list[tuple[aiohttp.WSMsgType, bytes]] = []
        self._reader: asyncio.Task | None = None
        self._cseq = 0

    @property
    def aor(self) -> str:
        return f"sip:{self.device.extension}@{self.domain}"

    @property
    def contact(self) -> str:
        return f"<sip:{self.device.extension}@{self.host};transport={self.transport.lower()}>"

    async def connect(self) -> None:
        self.websocket = await self.session.ws_connect(
            self.url, protocols=("sip",), ssl=self.ssl_context if self.ssl_context else True
        )
        assert self.websocket.protocol == "sip"
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self.websocket is not None:
            await self.websocket.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)

    async def _read(self) -> None:
        assert self.websocket is not None
        async for frame in self.websocket:
            if frame.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            data = frame.data.encode() if frame.type == aiohttp.WSMsgType.TEXT else frame.data
            self.raw.append((frame.type, data))
            message = parse_message(data, datagram=True)
            if isinstance(message, SipResponse):
                self.responses.put_nowait(message)
            else:
                self.requests.put_nowait(message)

    async def send(self, message: SipRequest | SipResponse) -> None:
        assert self.websocket is not None
        await self.websocket.send_str(message.to_bytes().decode())

    async def final_response(
        self, call_id: str, method: str | None = None, timeout: float = 5.0
    ) -> SipResponse:
        async with asyncio.timeout(timeout):
            while True:
                response = await self.responses.get()
                if response.call_id != call_id or response.status < 200:
                    continue
                if method is None or response.cseq.method == method:
                    return response

    async def next_request(self, method: str, timeout: float = 5.0) -> SipRequest:
        async with asyncio.timeout(timeout):
            while True:
                request = await self.requests.get()
                if request.method == method:
                    return request

    def request(
        self, method: str, uri: str, *, call_id: str, from_tag: str, to: str,
        extra: list[tuple[str, str]] | None = None, body: bytes = b"",
        cseq: int | None = None, branch: str | None = None,
    ) -> SipRequest:  # fmt: skip
        if cseq is None:
            self._cseq += 1
            cseq = self._cseq
        headers = [
            ("Via", f"SIP/2.0/{self.transport} {self.host};branch={branch or new_branch()}"),
            ("Max-Forwards", "70"),
            ("From", f"<{self.aor}>;tag={from_tag}"),
            ("To", to),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            ("Contact", self.contact),
            *(extra or []),
        ]
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipRequest(method, uri, headers, body)

    def credentials(self, request: SipRequest, challenge: SipResponse) -> tuple[str, str]:
        names = ("WWW-Authenticate", "Authorization")
        if challenge.status == 407:
            names = ("Proxy-Authenticate", "Proxy-Authorization")
        chosen = choose_challenge(challenge.header_lines(names[0]))
        assert chosen is not None, f"no usable challenge in {challenge.start_line}"
        value = build_authorization(
            chosen, request.method, str(request.request_uri), self.device.extension,
            self.device.password, body=request.body,
        )  # fmt: skip
        return (names[1], value)

    async def register(self, expires: int = 600) -> SipResponse:
        call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
        extra = [("Expires", str(expires)), ("Supported", "path, outbound")]
        first = self.request(
            "REGISTER",
            f"sip:{self.domain}",
            call_id=call_id,
            from_tag=tag,
            to=f"<{self.aor}>",
            extra=extra,
        )
        await self.send(first)
        challenge = await self.final_response(call_id)
        assert challenge.status == 401, challenge.start_line
        retry = self.request(
            "REGISTER",
            f"sip:{self.domain}",
            call_id=call_id,
            from_tag=tag,
            to=f"<{self.aor}>",
            extra=[*extra, self.credentials(first, challenge)],
        )
        await self.send(retry)
        return await self.final_response(call_id)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def ws_url(switch: SwitchProcess, scheme: str = "ws") -> str:
    host, port = switch.address(scheme)
    return f"{scheme}://{host}:{port}/"


@pytest.fixture
async def web(switch: SwitchProcess, session: aiohttp.ClientSession) -> AsyncIterator[WsDevice]:
    device = WsDevice(session, ws_url(switch), WEB, host="web1000.invalid")
    await device.connect()
    try:
        response = await device.register()
        assert response.status == 200, response.start_line
        yield device
        removed = await device.register(expires=0)
        assert removed.status == 200, removed.start_line
    finally:
        await device.close()


@pytest.fixture
async def desk(switch: SwitchProcess) -> AsyncIterator[SipUA]:
    async with SipUA(DESK.extension, DESK.password, switch.address("udp")) as phone:
        response = await phone.register()
        assert response is not None and response.status == 200
        yield phone


async def test_register_over_ws_with_digest(web: WsDevice) -> None:
    # the fixture's REGISTER got its 200 after the 401 round; the 200 lists the contact
    response = await web.register()
    assert response.status == 200
    contacts = " ".join(response.header_values("Contact"))
    assert web.host in contacts and "transport=ws" in contacts
    # the switch's Via stamping saw the WebSocket's real source
    assert response.top_via is not None and response.top_via.transport == "WS"
    assert response.top_via.params.get("received") == LOOPBACK_V4
    # every message came as a text frame (browser SIP stacks read text)
    assert web.raw and all(kind == aiohttp.WSMsgType.TEXT for kind, _ in web.raw)


async def test_udp_device_calls_ws_device(web: WsDevice, desk: SipUA) -> None:
    call = await desk.invite(WEB.extension, wait="sent")
    invite = await web.next_request("INVITE")
    # the INVITE came on the WebSocket, addressed to the registered .invalid contact
    assert web.host in str(invite.request_uri)
    assert invite.top_via is not None and invite.top_via.transport == "WS"
    # a callee on a WebSocket is a browser: the switch offers WebRTC (ICE, DTLS-SRTP)
    assert b"UDP/TLS/RTP/SAVPF" in invite.body and b"a=fingerprint:" in invite.body
    await web.send(make_response(invite, 180, "Ringing", to_tag="webtag"))
    browser = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    await browser.setRemoteDescription(RTCSessionDescription(invite.body.decode(), "offer"))
    await browser.setLocalDescription(await browser.createAnswer())
    answer = browser.localDescription.sdp.encode()
    ok = make_response(
        invite,
        200,
        "OK",
        to_tag="webtag",
        headers=[("Contact", web.contact), ("Content-Type", "application/sdp")],
    )
    ok.body = answer
    await web.send(ok)
    final = await call.wait_final(5)
    assert final is not None and final.status == 200
    ack = await web.next_request("ACK")
    assert ack.call_id == invite.call_id
    bye_response = await call.bye()
    bye = await web.next_request("BYE")
    assert bye.call_id == invite.call_id
    await web.send(make_response(bye, 200, "OK"))
    await browser.close()
    # the switch answered the desk phone's BYE only after (or independently of) ours
    assert bye_response is not None and bye_response.status == 200


async def test_ws_device_calls_udp_device(web: WsDevice, desk: SipUA) -> None:
    call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
    target = f"sip:{DESK.extension}@{LOOPBACK_V4}"
    offer = offer_sdp(LOOPBACK_V4, 40004)
    to = f"<{target}>"
    first = web.request("INVITE", target, call_id=call_id, from_tag=tag, to=to, body=offer)
    await web.send(first)
    challenge = await web.final_response(call_id)
    assert challenge.status == 407, challenge.start_line
    ack = web.request(
        "ACK",
        target,
        call_id=call_id,
        from_tag=tag,
        to=challenge.header("To") or to,
        cseq=first.cseq.seq,
        branch=first.top_via.params["branch"],
    )
    await web.send(ack)
    retry = web.request(
        "INVITE",
        target,
        call_id=call_id,
        from_tag=tag,
        to=to,
        body=offer,
        extra=[web.credentials(first, challenge)],
    )
    await web.send(retry)
    final = await web.final_response(call_id, "INVITE", timeout=8)
    assert final.status == 200, final.start_line
    assert final.body, "the 200 carries an SDP answer"
    assert len(desk.incoming_calls) == 1
    to_header = final.header("To")
    assert to_header is not None
    contact = final.contacts[0]
    assert not isinstance(contact, str)
    await web.send(
        web.request(
            "ACK",
            str(contact.uri),
            call_id=call_id,
            from_tag=tag,
            to=to_header,
            cseq=retry.cseq.seq,
        )
    )
    desk_call = desk.incoming_calls[0]
    assert await desk_call.wait_request("ACK", 5) is not None
    bye = web.request("BYE", str(contact.uri), call_id=call_id, from_tag=tag, to=to_header)
    await web.send(bye)
    bye_response = await web.final_response(call_id, "BYE")
    assert bye_response.status == 200
    assert await desk_call.wait_request("BYE", 5) is not None


async def test_wss_registers_with_self_signed_certificate(
    switch: SwitchProcess, session: aiohttp.ClientSession
) -> None:
    cafile = switch.config_path.parent / "cert.pem"
    context = ssl.create_default_context(cafile=str(cafile))
    device = WsDevice(session, ws_url(switch, "wss"), WEB2, transport="WSS", ssl_context=context)
    await device.connect()
    try:
        response = await device.register()
        assert response.status == 200, response.start_line
        assert "transport=wss" in " ".join(response.header_values("Contact"))
        assert response.top_via is not None and response.top_via.transport == "WSS"
    finally:
        await device.close()


async def test_wss_listener_speaks_tls(
    switch: SwitchProcess, session: aiohttp.ClientSession
) -> None:
    # a client that checks certificates against the system store rejects the self-signed
    # one: the listener really speaks TLS (not plain WebSocket on the wss port)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await session.ws_connect(ws_url(switch, "wss"), protocols=("sip",))


async def test_message_without_content_length_is_accepted(web: WsDevice) -> None:
    # one WebSocket message is one SIP message (RFC 7118 §5.3): Content-Length optional,
    # unlike on TCP where the switch answers 400 to a message without one
    call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
    options = web.request(
        "OPTIONS", f"sip:{LOOPBACK_V4}", call_id=call_id, from_tag=tag, to=f"<sip:{LOOPBACK_V4}>"
    )
    text = options.to_bytes().decode()
    assert "Content-Length" in text
    lines = [line for line in text.split("\r\n") if not line.startswith("Content-Length")]
    assert web.websocket is not None
    await web.websocket.send_bytes("\r\n".join(lines).encode())  # and as a binary frame
    response = await web.final_response(call_id, "OPTIONS")
    assert response.status == 200, response.start_line


@pytest.mark.parametrize("protocols", [("xmpp",), ()])
async def test_handshake_without_sip_subprotocol_is_refused(
    switch: SwitchProcess, session: aiohttp.ClientSession, protocols: tuple[str, ...]
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(ws_url(switch), protocols=protocols)
    assert refused.value.status == 400


async def test_closed_websocket_leaves_the_device_unreachable(
    switch: SwitchProcess, session: aiohttp.ClientSession, desk: SipUA
) -> None:
    device = WsDevice(session, ws_url(switch), WEB2)
    await device.connect()
    response = await device.register()
    assert response.status == 200
    before = len(switch.events("sip.send_failed"))
    await device.close()
    await asyncio.sleep(0.2)  # the switch notices the close
    call = await desk.invite(WEB2.extension, wait="sent")
    # the binding is reachable only over its connection: the INVITE has nowhere to go
    failed = await asyncio.to_thread(switch.wait_for_event, "sip.send_failed", before + 1, 5.0)
    assert any(event.get("transport") == "ws" for event in failed[before:])
    await call.cancel(timeout=3)

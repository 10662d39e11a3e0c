"""Browser softphone ↔ desk phone calls through the real switch, WebRTC media bridged.

One switch process listens on UDP and WS with the built-in relay (and so the WebRTC
bridge). The "browser" speaks SIP over WebSocket (aiohttp, the ``sip`` subprotocol) and
terminates its media in an aiortc peer connection (ICE, DTLS-SRTP) sending a 1 kHz tone.
The "desk phone" is tests/peers/sipua.py over UDP whose SDP names a plain RTP socket
sending G.711 of a 440 Hz tone. In both call directions each side must hear the other's
tone (Goertzel), and the desk phone must only ever see plain RTP/AVP SDP while the browser
only ever sees WebRTC SDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import struct
import sys
from array import array
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import aioice.ice
import av
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from switch_process import LOOPBACK_V4, Listener, SipDevice, SwitchProcess, build_config, free_port

from media.announcement import PCMA, PCMU, G711Codec
from media.backend import MediaError
from media.hybrid import HybridMediaBackend, is_webrtc_sdp
from media.relay import RtpRelay
from media.sdp import parse_sdp
from media.webrtc import ToneTrack
from sip.message import SipRequest, SipResponse, make_response

PEERS_DIR = Path(__file__).resolve().parents[1] / "peers"
if str(PEERS_DIR) not in sys.path:
    sys.path.append(str(PEERS_DIR))

from sipua import SipUA, offer_sdp  # noqa: E402
from test_websocket_transport import WsDevice  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]

WEB = SipDevice("1000", "pw1000")  # the browser softphone (WS)
DESK = SipDevice("1001", "pw1001")  # the desk phone (UDP)
OTHER = SipDevice("1002", "pw1002")  # a second desk phone (UDP)
RELAY_PORT_MIN = 52000 + 20 * (os.getpid() % 300)
DEADLINE_S = 8.0
WINDOW = 800  # 100 ms at 8 kHz


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's browser gathers ICE host candidates on 127.0.0.1 only."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwitchProcess]:
    workdir = tmp_path_factory.mktemp("webrtc")
    listeners = [
        Listener("udp", LOOPBACK_V4, free_port("udp")),
        Listener("ws", LOOPBACK_V4, free_port("tcp")),
    ]
    sections = {
        "media": {
            "backend": "relay", "bind_host": LOOPBACK_V4, "port_min": RELAY_PORT_MIN,
            "port_max": RELAY_PORT_MIN + 19, "media_timeout": 0,
        },
    }  # fmt: skip
    config_path = workdir / "switch.yaml"
    config_path.write_text(build_config(listeners, [WEB, DESK, OTHER], sections=sections), "utf-8")
    process = SwitchProcess(config_path=config_path, listeners=listeners)
    process.start()
    try:
        yield process
        assert process.process is not None and process.process.poll() is None, "switch died"
    finally:
        process.stop()


# -- audio ----------------------------------------------------------------------------------


def goertzel_power(samples: array[int] | list[int], frequency: float) -> float:
    coeff = 2 * math.cos(2 * math.pi * frequency / 8000)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (len(samples) ** 2)


def has_tone(samples: list[int], frequency: float) -> bool:
    """``frequency`` is loud and well above other telephone-band frequencies."""
    if len(samples) < WINDOW:
        return False
    window = samples[-WINDOW:]
    target = goertzel_power(window, frequency)
    others = [goertzel_power(window, f) for f in (300, 697, 1336, 1800, 2500)]
    return target > 1e5 and target > 20 * max(others)


async def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


class PhoneRtp(asyncio.DatagramProtocol):
    """The desk phone's RTP: sends a 440 Hz tone in G.711, decodes what it receives."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received: list[bytes] = []
        self.decoded: list[int] = []
        self.codec: G711Codec = PCMU

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        codec = {0: PCMU, 8: PCMA}.get(data[1] & 0x7F)
        if codec is not None:
            self.decoded.extend(codec.decode(data[12:]))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    async def send_tone(self, target: tuple[str, int], frequency: float = 440.0) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        seq, start = 0, loop.time()
        while True:  # cancelled by the test
            samples = array(
                "h",
                (
                    int(12000 * math.sin(2 * math.pi * frequency * (seq * 160 + n) / 8000))
                    for n in range(160)
                ),
            )
            pt = self.codec.payload_type
            header = struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, seq * 160, 0xD35C)
            self.transport.sendto(header + self.codec.encode(samples), target)
            seq += 1
            await asyncio.sleep(max(0.0, start + seq * 0.02 - loop.time()))


def rtp_target(sdp: bytes) -> tuple[tuple[str, int], G711Codec]:
    """Where plain SDP wants RTP, and its first G.711 law; asserts it is plain RTP/AVP."""
    parsed = parse_sdp(sdp)
    audio = parsed.media[0]
    assert audio.proto == "RTP/AVP", f"the desk phone got {audio.proto} SDP"
    connection = parsed.stream_connection(0)
    assert connection is not None
    codec = PCMA if audio.formats[0] == "8" else PCMU
    return (connection.address, audio.port), codec


async def record(track: object, into: list[int]) -> None:
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    with contextlib.suppress(MediaStreamError):
        while True:
            frame = await track.recv()  # type: ignore[attr-defined]
            for mono in resampler.resample(frame):
                pcm = array("h")
                pcm.frombytes(bytes(mono.planes[0])[: 2 * mono.samples])
                into.extend(pcm)


# -- the browser's SIP over WebSocket ------------------------------------------------------------


class Browser(WsDevice):
    """A browser's SIP stack on one WebSocket connection (the WebSocket transport tests'
    device), with a longer wait for final responses: ICE and DTLS come first."""

    async def final_response(self, call_id: str, method: str | None = None,
                             timeout: float = 8.0) -> SipResponse:
        return await super().final_response(call_id, method, timeout)


@pytest.fixture
async def browser(switch: SwitchProcess) -> AsyncIterator[Browser]:
    host, port = switch.address("ws")
    async with aiohttp.ClientSession() as session:
        device = Browser(session, f"ws://{host}:{port}/", WEB)
        await device.connect()
        try:
            response = await device.register()
            assert response.status == 200, response.start_line
            yield device
            await device.register(expires=0)
        finally:
            await device.close()


@pytest.fixture
async def phone_rtp() -> AsyncIterator[PhoneRtp]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(PhoneRtp, local_addr=(LOOPBACK_V4, 0))
    try:
        yield protocol
    finally:
        transport.close()


@pytest.fixture
async def desk(switch: SwitchProcess, phone_rtp: PhoneRtp) -> AsyncIterator[SipUA]:
    async with SipUA(DESK.extension, DESK.password, switch.address("udp")) as phone:
        phone.rtp_port = phone_rtp.port  # the SDP it offers/answers names our tone socket
        response = await phone.register()
        assert response is not None and response.status == 200
        yield phone


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- tests ---------------------------------------------------------------------------------------


async def test_browser_calls_desk_phone_audio_both_ways(
    switch: SwitchProcess, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp
) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    heard_by_browser: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        pc.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp.encode()
        assert b"UDP/TLS/RTP/SAVPF" in offer and b"a=fingerprint:" in offer

        call_id, tag = secrets.token_hex(8), secrets.token_hex(4)
        target = f"sip:{DESK.extension}@{LOOPBACK_V4}"
        to = f"<{target}>"
        first = browser.request("INVITE", target, call_id=call_id, from_tag=tag, to=to,
                                body=offer)  # fmt: skip
        await browser.send(first)
        challenge = await browser.final_response(call_id, "INVITE")
        assert challenge.status == 407, challenge.start_line
        await browser.send(browser.request(
            "ACK", target, call_id=call_id, from_tag=tag, to=challenge.header("To") or to,
            cseq=first.cseq.seq, branch=first.top_via.params["branch"],
        ))  # fmt: skip
        retry = browser.request(
            "INVITE",
            target,
            call_id=call_id,
            from_tag=tag,
            to=to,
            body=offer,
            extra=[browser.credentials(first, challenge)],
        )
        await browser.send(retry)
        final = await browser.final_response(call_id, "INVITE")
        assert final.status == 200, final.start_line
        answer = final.body.decode()
        assert "UDP/TLS/RTP/SAVPF" in answer and "a=fingerprint:" in answer
        assert "a=ice-ufrag:" in answer and "opus" not in answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        to_header, contact = final.header("To"), final.contacts[0]
        assert to_header is not None and not isinstance(contact, str)
        await browser.send(
            browser.request(
                "ACK",
                str(contact.uri),
                call_id=call_id,
                from_tag=tag,
                to=to_header,
                cseq=retry.cseq.seq,
            )
        )

        assert len(desk.incoming_calls) == 1
        desk_call = desk.incoming_calls[0]
        assert desk_call.invite is not None
        assert b"SAVPF" not in desk_call.invite.body and b"fingerprint" not in desk_call.invite.body
        rtp_to, phone_rtp.codec = rtp_target(desk_call.invite.body)
        tasks.append(asyncio.create_task(phone_rtp.send_tone(rtp_to)))
        remote = pc.getTransceivers()[0].receiver.track
        tasks.append(asyncio.create_task(record(remote, heard_by_browser)))

        assert await wait_until(lambda: has_tone(phone_rtp.decoded, 1000.0)), "phone: no 1 kHz"
        assert await wait_until(lambda: has_tone(heard_by_browser, 440.0)), "browser: no 440 Hz"
        assert not has_tone(phone_rtp.decoded, 440.0)  # no echo of its own tone
        assert pc.connectionState == "connected"

        bye = browser.request("BYE", str(contact.uri), call_id=call_id, from_tag=tag,
                              to=to_header)  # fmt: skip
        await browser.send(bye)
        assert (await browser.final_response(call_id, "BYE")).status == 200
        assert await desk_call.wait_request("BYE", 5) is not None
        # the bridge is gone: the phone stops receiving audio
        await asyncio.sleep(0.3)
        count = len(phone_rtp.received)
        await asyncio.sleep(0.3)
        assert len(phone_rtp.received) == count
    finally:
        await _cancel(tasks)
        await pc.close()


async def test_desk_phone_calls_browser_audio_both_ways(
    switch: SwitchProcess, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp
) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    heard_by_browser: list[int] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        call = await desk.invite(WEB.extension, wait="sent")
        invite = await browser.next_request("INVITE")
        offer = invite.body.decode()
        # the switch offers WebRTC to a device registered over WebSocket
        assert "UDP/TLS/RTP/SAVPF" in offer and "a=fingerprint:" in offer
        assert "a=candidate:" in offer
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        transceiver = pc.getTransceivers()[0]
        transceiver.sender.replaceTrack(ToneTrack(1000.0))
        transceiver.direction = "sendrecv"
        await pc.setLocalDescription(await pc.createAnswer())
        ok = make_response(invite, 200, "OK", to_tag="browsertag", headers=[
            ("Contact", browser.contact), ("Content-Type", "application/sdp"),
        ])  # fmt: skip
        ok.body = pc.localDescription.sdp.encode()
        await browser.send(ok)
        final = await call.wait_final(8)
        assert final is not None and final.status == 200
        assert await browser.next_request("ACK") is not None
        assert b"SAVPF" not in final.body and b"fingerprint" not in final.body
        rtp_to, phone_rtp.codec = rtp_target(final.body)

        tasks.append(asyncio.create_task(phone_rtp.send_tone(rtp_to)))
        tasks.append(asyncio.create_task(record(transceiver.receiver.track, heard_by_browser)))
        assert await wait_until(lambda: has_tone(phone_rtp.decoded, 1000.0)), "phone: no 1 kHz"
        assert await wait_until(lambda: has_tone(heard_by_browser, 440.0)), "browser: no 440 Hz"
        assert pc.connectionState == "connected"

        bye_response = await call.bye()
        bye = await browser.next_request("BYE")
        await browser.send(make_response(bye, 200, "OK"))
        assert bye_response is not None and bye_response.status == 200
    finally:
        await _cancel(tasks)
        await pc.close()


async def test_desk_phone_to_desk_phone_is_still_plain_relay(
    switch: SwitchProcess, desk: SipUA
) -> None:
    # a plain call keeps the relay: the SDP the callee gets is the relay's, not a bridge's
    async with SipUA(OTHER.extension, OTHER.password, switch.address("udp")) as other:
        response = await other.register()
        assert response is not None and response.status == 200
        call = await other.invite(DESK.extension, wait="final")
        assert call.status == 200
        desk_call = desk.incoming_calls[-1]
        assert desk_call.invite is not None
        body = desk_call.invite.body
        assert b"RTP/AVP 0 8 101" in body and b"SAVPF" not in body
        port = parse_sdp(body).media[0].port
        assert RELAY_PORT_MIN <= port <= RELAY_PORT_MIN + 19
        await call.bye()


async def test_hybrid_backend_in_process_rules_and_bad_input() -> None:
    """The backend alone: plain calls go to the relay, WebRTC ones to a bridge; bad input
    is a clear error; start/close scope the ICE host-address limit."""
    relay = RtpRelay(LOOPBACK_V4, port_range=(RELAY_PORT_MIN + 6000, RELAY_PORT_MIN + 6019))
    backend = HybridMediaBackend(relay)
    patched = aioice.ice.get_host_addresses
    await backend.start()
    assert aioice.ice.get_host_addresses(True, False) == [LOOPBACK_V4]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        plain = offer_sdp(LOOPBACK_V4, 40010)
        assert not is_webrtc_sdp(plain) and not is_webrtc_sdp(b"garbage")
        relayed = await backend.offer("plain-call", "a1", plain)
        assert b"RTP/AVP" in relayed and await relay.query("plain-call") is not None
        with pytest.raises(ValueError, match="hint"):
            await backend.offer("other", "a1", plain, hint="carrier-pigeon")

        pc.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
        await pc.setLocalDescription(await pc.createOffer())
        webrtc = pc.localDescription.sdp.encode()
        assert is_webrtc_sdp(webrtc)
        onward = await backend.offer("web-call", "browser", webrtc)
        assert b"m=audio" in onward and b"RTP/AVP 0 8 101" in onward
        assert backend.session_count == 2 and await relay.query("web-call") is None
        with pytest.raises(MediaError) as refused:  # a re-offer before the bridge is answered
            await backend.offer("web-call", "browser", webrtc)
        assert refused.value.status == 491
        reply = await backend.answer("web-call", "browser", "phone", offer_sdp(LOOPBACK_V4, 40012))
        assert b"UDP/TLS/RTP/SAVPF" in reply and b"a=fingerprint:" in reply
        # the 200 after a 183: the same answer for the browser again
        again = await backend.answer("web-call", "browser", "phone", offer_sdp(LOOPBACK_V4, 40012))
        assert again == reply
        stats = await backend.delete("web-call")
        assert stats is not None and await backend.delete("web-call") is None
        assert "web-call" not in backend.bridged_calls
    finally:
        await pc.close()
        await backend.close()
    assert aioice.ice.get_host_addresses is patched  # the test's own patch is back
    assert relay.session_count == 0 and relay.ports.in_use == 0


# -- re-offers, DTMF and a lost browser on a bridged call ------------------------------------------


class BridgedCall:
    """A browser → desk phone call through the switch, tones flowing both ways."""

    def __init__(self, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp) -> None:
        self.browser, self.desk, self.phone_rtp = browser, desk, phone_rtp
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.heard: list[int] = []
        self.rtp_in = 0  # RTP packets that reached the browser
        self.tasks: list[asyncio.Task[None]] = []
        self.call_id, self.tag = secrets.token_hex(8), secrets.token_hex(4)
        self.to_header = ""
        self.contact_uri = ""
        self.port = 0  # the switch's RTP port facing the desk phone

    async def start(self) -> None:
        self.pc.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        target = f"sip:{DESK.extension}@{LOOPBACK_V4}"
        to = f"<{target}>"
        offer = self.pc.localDescription.sdp.encode()
        first = self.browser.request("INVITE", target, call_id=self.call_id, from_tag=self.tag,
                                     to=to, body=offer)  # fmt: skip
        await self.browser.send(first)
        challenge = await self.browser.final_response(self.call_id, "INVITE")
        assert challenge.status == 407, challenge.start_line
        await self.browser.send(self.browser.request(
            "ACK", target, call_id=self.call_id, from_tag=self.tag,
            to=challenge.header("To") or to, cseq=first.cseq.seq,
            branch=first.top_via.params["branch"],
        ))  # fmt: skip
        retry = self.browser.request("INVITE", target, call_id=self.call_id, from_tag=self.tag,
                                     to=to, body=offer,
                                     extra=[self.browser.credentials(first, challenge)])  # fmt: skip
        await self.browser.send(retry)
        final = await self.browser.final_response(self.call_id, "INVITE")
        assert final.status == 200, final.start_line
        await self.pc.setRemoteDescription(RTCSessionDescription(final.body.decode(), "answer"))
        contact = final.contacts[0]
        assert final.header("To") is not None and not isinstance(contact, str)
        self.to_header, self.contact_uri = final.header("To") or "", str(contact.uri)
        await self.browser.send(self.request("ACK", cseq=retry.cseq.seq))
        self.desk_call = self.desk.incoming_calls[-1]
        assert self.desk_call.invite is not None
        rtp_to, self.phone_rtp.codec = rtp_target(self.desk_call.invite.body)
        self.port = rtp_to[1]
        dtls = self.pc.getTransceivers()[0].receiver.transport
        receive = dtls._handle_rtp_data

        async def counted(data: bytes, arrival_time_ms: int) -> None:
            self.rtp_in += 1
            await receive(data, arrival_time_ms=arrival_time_ms)

        dtls._handle_rtp_data = counted  # type: ignore[method-assign]
        self.tasks.append(asyncio.create_task(self.phone_rtp.send_tone(rtp_to)))
        remote = self.pc.getTransceivers()[0].receiver.track
        self.tasks.append(asyncio.create_task(record(remote, self.heard)))
        assert await wait_until(lambda: has_tone(self.phone_rtp.decoded, 1000.0)), "no 1 kHz"
        assert await wait_until(lambda: has_tone(self.heard, 440.0)), "browser: no 440 Hz"

    def request(self, method: str, cseq: int | None = None, body: bytes = b"") -> SipRequest:
        return self.browser.request(method, self.contact_uri, call_id=self.call_id,
                                    from_tag=self.tag, to=self.to_header, cseq=cseq,
                                    body=body)  # fmt: skip

    async def close(self) -> None:
        await _cancel(self.tasks)
        await self.pc.close()


async def grows(read: Callable[[], int], seconds: float = 0.3) -> bool:
    before = read()
    await asyncio.sleep(seconds)
    return read() > before


async def settles(read: Callable[[], int], timeout: float = DEADLINE_S) -> bool:
    """``read()`` stops growing (for 0.3 s) within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if not await grows(read):
            return True
    return False


def sdp_value(sdp: bytes | str, name: str) -> str | None:
    parsed = parse_sdp(sdp.encode() if isinstance(sdp, str) else sdp)
    return parsed.media[0].attribute(name) or parsed.session_attribute(name)


async def test_hold_and_resume_from_either_side(
    switch: SwitchProcess, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp
) -> None:
    call = BridgedCall(browser, desk, phone_rtp)
    try:
        await call.start()
        ufrag = sdp_value(call.pc.remoteDescription.sdp, "ice-ufrag")
        fingerprint = sdp_value(call.pc.remoteDescription.sdp, "fingerprint")

        # the desk phone holds (a=sendonly), then resumes: the browser gets a WebRTC
        # re-INVITE on the same ICE/DTLS session and answers it
        for version, direction, answered in ((2, "sendonly", "recvonly"), (3, "sendrecv", "sendrecv")):
            reinvite = asyncio.create_task(call.desk_call.reinvite(
                offer_sdp(LOOPBACK_V4, phone_rtp.port, version=version, direction=direction)
            ))  # fmt: skip
            invite = await browser.next_request("INVITE")
            offer = invite.body.decode()
            assert "UDP/TLS/RTP/SAVPF" in offer and sdp_value(offer, "ice-ufrag") == ufrag
            assert sdp_value(offer, "fingerprint") == fingerprint
            assert parse_sdp(invite.body).stream_direction(0) == direction
            await call.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await call.pc.setLocalDescription(await call.pc.createAnswer())
            ok = make_response(invite, 200, "OK", headers=[
                ("Contact", browser.contact), ("Content-Type", "application/sdp"),
            ], body=call.pc.localDescription.sdp.encode())  # fmt: skip
            await browser.send(ok)
            response = await reinvite
            assert response is not None and response.status == 200, response
            answer = parse_sdp(response.body)
            assert answer.media[0].proto == "RTP/AVP" and answer.media[0].port == call.port
            assert answer.stream_direction(0) == answered
            if direction == "sendonly":
                assert await settles(lambda: len(phone_rtp.received)), "audio to a held phone"
                assert await grows(lambda: call.rtp_in), "its music on hold must go on"
        count = len(phone_rtp.decoded)
        assert await wait_until(lambda: len(phone_rtp.decoded) > count + 1600)
        assert has_tone(phone_rtp.decoded, 1000.0), "no 1 kHz after the phone resumed"

        # the browser holds (as JsSIP does: a re-INVITE with a=sendonly), then resumes
        transceiver = call.pc.getTransceivers()[0]
        for direction, answered in (("sendonly", "recvonly"), ("sendrecv", "sendrecv")):
            transceiver.direction = direction
            await call.pc.setLocalDescription(await call.pc.createOffer())
            request = call.request("INVITE", body=call.pc.localDescription.sdp.encode())
            await browser.send(request)
            final = await browser.final_response(call.call_id, "INVITE")
            assert final.status == 200, final.start_line
            await browser.send(call.request("ACK", cseq=request.cseq.seq))
            assert sdp_value(final.body, "ice-ufrag") == ufrag
            assert parse_sdp(final.body).stream_direction(0) == answered
            await call.pc.setRemoteDescription(RTCSessionDescription(final.body.decode(), "answer"))
            desk_offer = [r for r in call.desk_call.received if r.method == "INVITE"][-1]
            assert b"SAVPF" not in desk_offer.body
            assert parse_sdp(desk_offer.body).media[0].port == call.port
            assert parse_sdp(desk_offer.body).stream_direction(0) == direction
            if direction == "sendonly":
                assert await settles(lambda: call.rtp_in), "audio to the browser holding"
                assert await grows(lambda: len(phone_rtp.received)), "its own audio must go on"
        count = len(call.heard)
        assert await wait_until(lambda: len(call.heard) > count + 1600)
        assert has_tone(call.heard, 440.0), "no 440 Hz after the browser resumed"

        await browser.send(call.request("BYE"))
        assert (await browser.final_response(call.call_id, "BYE")).status == 200
    finally:
        await call.close()


async def test_dtmf_between_browser_and_desk_phone(
    switch: SwitchProcess, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp
) -> None:
    call = BridgedCall(browser, desk, phone_rtp)
    try:
        await call.start()
        # the softphone page's DTMF: SIP INFO, passed to the desk phone as is
        info = call.request("INFO")
        info.headers.append(("Content-Type", "application/dtmf-relay"))
        info.body = b"Signal=7\r\nDuration=160\r\n"
        await browser.send(info)
        assert (await browser.final_response(call.call_id, "INFO")).status == 200
        got = await call.desk_call.wait_request("INFO", 5)
        assert got is not None and got.body == info.body
        assert got.header("Content-Type") == "application/dtmf-relay"

        # the desk phone's RFC 4733 "5": this browser negotiated no telephone-event, so it
        # gets SIP INFO (application/dtmf-relay) from the switch
        assert phone_rtp.transport is not None
        rtp_to = (LOOPBACK_V4, call.port)
        for seq, flags in ((1, 10), (2, 10), (3, 0x8A), (4, 0x8A), (5, 0x8A)):
            header = struct.pack("!BBHII", 0x80, 101, 60000 + seq, 123456, 0xD35C)
            phone_rtp.transport.sendto(header + struct.pack("!BBH", 5, flags, 160 * seq), rtp_to)
        to_browser = await browser.next_request("INFO")
        assert to_browser.header("Content-Type") == "application/dtmf-relay"
        assert b"Signal=5" in to_browser.body
        await browser.send(make_response(to_browser, 200, "OK"))

        await browser.send(call.request("BYE"))
        assert (await browser.final_response(call.call_id, "BYE")).status == 200
    finally:
        await call.close()


async def test_lost_browser_connection_hangs_up_both_legs(
    switch: SwitchProcess, browser: Browser, desk: SipUA, phone_rtp: PhoneRtp
) -> None:
    call = BridgedCall(browser, desk, phone_rtp)
    try:
        await call.start()
        await call.pc.close()  # the tab is gone: DTLS closed, no BYE from the browser
        bye = await call.desk_call.wait_request("BYE", 8)
        assert bye is not None, "the desk phone was not hung up"
        assert "408" in (bye.header("Reason") or "")
        to_browser = await browser.next_request("BYE", 5)
        await browser.send(make_response(to_browser, 200, "OK"))
    finally:
        await call.close()

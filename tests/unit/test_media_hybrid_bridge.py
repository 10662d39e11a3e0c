"""WebRTC-bridged calls in the hybrid media backend: re-offers (hold and resume from either
leg), the media timeout, telephone-events (RFC 4733) both ways, and the advertised ICE
address.

In process on loopback: the "browser" is an aiortc peer sending a 1 kHz tone (SIP is not
involved: the test plays the B2BUA, calling ``offer``/``answer`` as switch/calls.py does
for an INVITE and for an in-dialog re-INVITE); the "desk phone" is a UDP socket sending
G.711 of a 440 Hz tone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aioice.ice
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from test_webrtc_bridge import (
    Phone,
    browser_peer,
    has_tone,
    phone_socket,
    record,
    wait_until,
)

from media.announcement import PCMU
from media.backend import MediaError, SdpError
from media.hybrid import HybridMediaBackend
from media.relay import RtpRelay
from media.sdp import parse_sdp
from media.webrtc import ToneTrack, WebRtcBridge

PORT_MIN = 47000 + 20 * (os.getpid() % 100)
BROWSER, PHONE = "browser-tag", "phone-tag"
TE = 101


@pytest.fixture(autouse=True)
def _loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """ICE host candidates on 127.0.0.1 only: no traffic leaves loopback."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def with_telephone_event(sdp: str, pt: int = TE) -> str:
    """A browser's offer as Chrome makes it: telephone-event/8000 among the audio formats."""
    lines = sdp.split("\r\n")
    for index, line in enumerate(lines):
        if line.startswith("m=audio "):
            lines[index] = f"{line} {pt}"
            lines.insert(index + 1, f"a=rtpmap:{pt} telephone-event/8000")
            break
    return "\r\n".join(lines)


def direction_of(sdp: bytes | str) -> str:
    data = sdp.encode() if isinstance(sdp, str) else sdp
    return parse_sdp(data).stream_direction(0)


def attribute(sdp: str, name: str) -> str | None:
    parsed = parse_sdp(sdp.encode())
    return parsed.media[0].attribute(name) or parsed.session_attribute(name)


@dataclass
class BrowserEnd:
    """The test's browser: its peer connection, what it hears, its telephone-events."""

    pc: RTCPeerConnection
    heard: list[int] = field(default_factory=list)
    rtp_in: int = 0
    events: list[bytes] = field(default_factory=list)  # RTP packets of PT 101 received

    def hook(self) -> None:
        """Count the RTP the browser receives and keep telephone-event packets."""
        dtls = self.pc.getTransceivers()[0].receiver.transport
        receive = dtls._handle_rtp_data

        async def handle(data: bytes, arrival_time_ms: int) -> None:
            self.rtp_in += 1
            if data[1] & 0x7F == TE:
                self.events.append(data)
                return
            await receive(data, arrival_time_ms=arrival_time_ms)

        dtls._handle_rtp_data = handle  # type: ignore[method-assign]

    async def send_event(self, event: int, seq: int, timestamp: int, end: bool, dur: int) -> None:
        """An RTCDTMFSender packet: telephone-event RTP through the browser's SRTP (on an
        SSRC of its own here: aiortc's sender owns the audio SSRC's sequence numbers)."""
        sender = self.pc.getTransceivers()[0].sender
        header = struct.pack("!BBHII", 0x80, TE, seq, timestamp, 0x5EED)
        payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, dur)
        await sender.transport._send_rtp(header + payload)


@contextlib.asynccontextmanager
async def bridged_call(
    browser_te: bool = True, media_timeout: float | None = None
) -> AsyncIterator[tuple[HybridMediaBackend, WebRtcBridge, BrowserEnd, Phone]]:
    """Browser calls phone through the hybrid backend; both send their tone."""
    relay = RtpRelay("127.0.0.1", port_range=(PORT_MIN, PORT_MIN + 19), media_timeout=media_timeout)
    backend = HybridMediaBackend(relay, limit_ice_hosts=False, connection_grace=0.0)
    await backend.start()
    browser = BrowserEnd(browser_peer())
    tasks: list[asyncio.Task[None]] = []
    async with phone_socket(PCMU) as phone:
        try:
            browser.pc.addTransceiver(ToneTrack(1000.0), direction="sendrecv")
            await browser.pc.setLocalDescription(await browser.pc.createOffer())
            offer = browser.pc.localDescription.sdp
            if browser_te:
                offer = with_telephone_event(offer)
            onward = await backend.offer("call", BROWSER, offer.encode())
            bridge = backend.bridged_calls["call"]
            assert bridge is not None
            answer = await backend.answer(
                "call", BROWSER, PHONE, phone.sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n")
            )
            await browser.pc.setRemoteDescription(RTCSessionDescription(answer.decode(), "answer"))
            browser.hook()
            phone.target = ("127.0.0.1", parse_sdp(onward).media[0].port)
            tasks.append(asyncio.create_task(phone.send_tone()))
            remote = browser.pc.getTransceivers()[0].receiver.track
            tasks.append(asyncio.create_task(record(remote, browser.heard)))
            assert await wait_until(lambda: has_tone(phone.decoded, 1000.0)), "phone: no 1 kHz"
            assert await wait_until(lambda: has_tone(browser.heard, 440.0)), "browser: no 440"
            yield backend, bridge, browser, phone
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await browser.pc.close()
            await backend.close()


async def flowing(counter: object, attribute_name: str, seconds: float = 0.3) -> bool:
    """Whether the list or counter grows over ``seconds``."""

    def size() -> int:
        value = getattr(counter, attribute_name)
        return value if isinstance(value, int) else len(value)

    before = size()
    await asyncio.sleep(seconds)
    return size() > before


async def stopped(counter: object, attribute_name: str, timeout: float = 3.0) -> bool:
    """Whether the list or counter stops growing (for 0.3 s) within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if not await flowing(counter, attribute_name):
            return True
    return False


async def phone_reoffer(
    backend: HybridMediaBackend, browser: BrowserEnd, phone: Phone, direction: str, version: int
) -> tuple[str, bytes]:
    """The phone's re-INVITE through the backend and the browser's answer."""
    sdp = (
        phone.sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n")
        .replace(b"a=sendrecv", f"a={direction}".encode())
        .replace(b"phone 7 7", f"phone 7 {version}".encode())
    )
    webrtc_offer = (await backend.offer("call", PHONE, sdp)).decode()
    await browser.pc.setRemoteDescription(RTCSessionDescription(webrtc_offer, "offer"))
    await browser.pc.setLocalDescription(await browser.pc.createAnswer())
    plain = await backend.answer("call", PHONE, BROWSER, browser.pc.localDescription.sdp.encode())
    return webrtc_offer, plain


async def test_phone_holds_and_resumes() -> None:
    async with bridged_call() as (backend, bridge, browser, phone):
        first_ufrag = attribute(browser.pc.remoteDescription.sdp, "ice-ufrag")
        fingerprint = attribute(browser.pc.remoteDescription.sdp, "fingerprint")
        for direction, answered, version in (
            ("sendonly", "recvonly", 2),
            ("inactive", "inactive", 3),
        ):
            webrtc_offer, plain = await phone_reoffer(backend, browser, phone, direction, version)
            # the browser's re-offer keeps ICE and DTLS; it follows the phone's direction
            assert attribute(webrtc_offer, "ice-ufrag") == first_ufrag
            assert attribute(webrtc_offer, "fingerprint") == fingerprint
            assert direction_of(webrtc_offer) == direction
            assert "telephone-event/8000" in webrtc_offer
            # the phone's answer: same port, RFC 3264 §6.1 direction, plain RTP
            parsed = parse_sdp(plain)
            assert parsed.media[0].proto == "RTP/AVP" and direction_of(plain) == answered
            assert phone.target is not None and parsed.media[0].port == phone.target[1]
            assert parsed.origin.session_version >= 2
            assert bridge.on_hold and bridge.state == "active"
            assert await stopped(phone, "received"), "the bridge still sends to a held phone"
            if direction == "sendonly":  # its music on hold still reaches the browser
                assert await flowing(browser, "rtp_in")
            else:
                assert await stopped(browser, "rtp_in")
        webrtc_offer, plain = await phone_reoffer(backend, browser, phone, "sendrecv", 4)
        assert direction_of(webrtc_offer) == "sendrecv" and direction_of(plain) == "sendrecv"
        assert not bridge.on_hold
        count = len(phone.decoded)
        assert await wait_until(lambda: len(phone.decoded) > count + 1600)
        assert await wait_until(lambda: has_tone(phone.decoded, 1000.0)), "no 1 kHz after resume"
        assert await flowing(browser, "rtp_in")


async def test_browser_holds_and_resumes_and_ice_restart_is_refused() -> None:
    async with bridged_call() as (backend, bridge, browser, phone):
        ufrag = attribute(browser.pc.remoteDescription.sdp, "ice-ufrag")
        port = phone.target[1] if phone.target else 0
        transceiver = browser.pc.getTransceivers()[0]
        for direction, version in (("sendonly", 2), ("inactive", 3), ("sendrecv", 4)):
            transceiver.direction = direction
            await browser.pc.setLocalDescription(await browser.pc.createOffer())
            plain_offer = await backend.offer(
                "call", BROWSER, browser.pc.localDescription.sdp.encode()
            )
            parsed = parse_sdp(plain_offer)
            assert parsed.media[0].proto == "RTP/AVP" and parsed.media[0].port == port
            assert direction_of(plain_offer) == direction
            assert parsed.origin.session_version == version
            answered = {"sendonly": "recvonly"}.get(direction, direction)
            phone_answer = phone.sdp("0 101", "a=rtpmap:101 telephone-event/8000\r\n")
            phone_answer = phone_answer.replace(b"a=sendrecv", f"a={answered}".encode())
            reply = (await backend.answer("call", BROWSER, PHONE, phone_answer)).decode()
            assert attribute(reply, "ice-ufrag") == ufrag
            assert direction_of(reply) == answered
            await browser.pc.setRemoteDescription(RTCSessionDescription(reply, "answer"))
            if direction == "sendonly":
                # the browser holds: nothing more to it, its own audio still to the phone
                assert await stopped(browser, "rtp_in"), "the bridge still sends to the browser"
                assert await flowing(phone, "received")
                assert bridge.on_hold
            elif direction == "inactive":
                assert await stopped(browser, "rtp_in") and await stopped(phone, "received")
        assert not bridge.on_hold
        assert await flowing(browser, "rtp_in"), "no audio to the browser after resume"
        count = len(browser.heard)
        assert await wait_until(lambda: len(browser.heard) > count + 1600)
        assert has_tone(browser.heard, 440.0)

        # an ICE restart (new credentials) cannot be done by aiortc: refused, call unchanged
        restart = re.sub(
            r"a=ice-ufrag:\S+", "a=ice-ufrag:restart1", browser.pc.localDescription.sdp
        )
        with pytest.raises(SdpError, match="ICE restart"):
            await backend.offer("call", BROWSER, restart.encode())
        assert bridge.state == "active"


async def test_refused_reoffers_leave_the_call_as_it_was() -> None:
    async with bridged_call() as (backend, bridge, browser, phone):
        hold = phone.sdp("0").replace(b"a=sendrecv", b"a=sendonly")
        await backend.offer("call", PHONE, hold)  # the browser answers 488: never answered
        assert bridge.state == "phone-reoffered"
        await backend.offer_rejected("call", PHONE)
        assert bridge.state == "active" and not bridge.on_hold
        assert await flowing(phone, "received"), "audio to the phone stopped after a refusal"
        # and a new re-offer from the browser goes through (aiortc is stable again)
        await browser.pc.setLocalDescription(await browser.pc.createOffer())
        await backend.offer("call", BROWSER, browser.pc.localDescription.sdp.encode())
        assert bridge.state == "browser-reoffered"
        await backend.offer_rejected("call", BROWSER)
        assert bridge.state == "active"
        with pytest.raises(MediaError):
            await backend.offer("call", "stranger", hold)


async def test_media_timeout_watches_bridged_calls() -> None:
    fired: list[str] = []
    async with bridged_call(media_timeout=30.0) as (backend, bridge, browser, phone):
        backend.on_timeout = fired.append
        clock = backend.relay.clock
        assert backend.check_timeouts(clock() + 5) == []  # RTP flows
        # silent phone for 30 s: reported once
        assert backend.check_timeouts(clock() + 31) == ["call"] and fired == ["call"]
        assert backend.check_timeouts(clock() + 62) == []
        # a renegotiation (hold) re-arms it, and no timeout while on hold
        await phone_reoffer(backend, browser, phone, "inactive", 2)
        assert bridge.on_hold and backend.check_timeouts(clock() + 100) == []
        await phone_reoffer(backend, browser, phone, "sendrecv", 3)
        assert backend.check_timeouts(clock() + 100) == ["call"]
        # the browser's ICE/DTLS connection going away is reported (even when on hold)
        fired.clear()
        backend._calls["call"].timed_out = False
        await phone_reoffer(backend, browser, phone, "inactive", 4)
        await browser.pc.close()
        assert await wait_until(lambda: bridge.browser_lost, 5.0)
        assert await wait_until(lambda: fired == ["call"], 3.0), "no report of the lost browser"


async def test_telephone_events_both_ways() -> None:
    async with bridged_call() as (backend, bridge, browser, phone):
        assert bridge.browser_telephone_event_pt == TE
        assert phone.transport is not None and phone.target is not None
        # phone → browser: "5" as RFC 4733 inside the browser's SRTP stream
        for index, (end, duration) in enumerate(((0, 160), (0, 480), (1, 800), (1, 800))):
            header = struct.pack("!BBHII", 0x80, TE, 9000 + index, 48000, 0xCAFE)
            flags = (0x80 if end else 0) | 10
            phone.transport.sendto(header + struct.pack("!BBH", 5, flags, duration), phone.target)
            await asyncio.sleep(0.02)
        assert await wait_until(lambda: sum(1 for p in browser.events if p[13] & 0x80) >= 3, 3)
        events = browser.events
        offset = 12 + 4 * (events[0][0] & 0x0F)
        if events[0][0] & 0x10:
            offset += 4 + 4 * int.from_bytes(events[0][offset + 2 : offset + 4], "big")
        assert {p[offset] for p in events} == {5}
        assert events[0][1] & 0x80  # marker on the event's first packet
        assert len({p[4:8] for p in events}) == 1  # one timestamp for the event
        seqs = [int.from_bytes(p[2:4], "big") for p in events]
        assert seqs == sorted(seqs)
        assert bridge.dtmf_from_phone == ["5"]
        assert await wait_until(lambda: has_tone(browser.heard, 440.0)), "audio did not come back"

        # browser → phone: RTCDTMFSender's "9" as RFC 4733 in the phone's payload type
        before = len(phone.received)
        for index, (end, duration) in enumerate(((0, 160), (0, 320), (1, 640), (1, 640), (1, 640))):
            await browser.send_event(9, 500 + index, 777_000, bool(end), duration)
            await asyncio.sleep(0.02)
        assert await wait_until(
            lambda: sum(1 for p in phone.received[before:] if p[1] & 0x7F == TE) >= 5, 3
        )
        to_phone = [p for p in phone.received[before:] if p[1] & 0x7F == TE]
        assert {p[12] for p in to_phone} == {9} and to_phone[0][1] & 0x80
        assert len({p[4:8] for p in to_phone}) == 1
        assert sum(1 for p in to_phone if p[13] & 0x80) == 3
        assert bridge.dtmf_from_browser == ["9"]
        count = len(phone.decoded)
        assert await wait_until(lambda: len(phone.decoded) > count + 800), "audio not back"


async def test_phone_digit_goes_as_info_when_browser_takes_no_telephone_event() -> None:
    infos: list[tuple[str, str, str, int]] = []
    async with bridged_call(browser_te=False) as (backend, bridge, browser, phone):
        backend.on_dtmf_info = lambda *args: infos.append(args)
        assert bridge.browser_telephone_event_pt is None
        assert "telephone-event" not in browser.pc.remoteDescription.sdp
        assert phone.transport is not None and phone.target is not None
        for index in range(3):
            header = struct.pack("!BBHII", 0x80, TE, 100 + index, 4000, 0xCAFE)
            phone.transport.sendto(header + struct.pack("!BBH", 11, 0x8A, 160), phone.target)
        assert await wait_until(lambda: bool(infos), 2.0)
        assert infos == [("call", BROWSER, "#", 160)] and browser.events == []


async def test_advertised_host_is_the_browser_candidate_address() -> None:
    bridge = WebRtcBridge("nat", host="127.0.0.1", advertise_host="192.0.2.10")
    try:
        async with phone_socket(PCMU) as phone:
            webrtc_offer, plain = await bridge.offer_to_browser(phone.sdp("0"))
        candidates = [line for line in webrtc_offer.splitlines() if line.startswith("a=candidate:")]
        assert candidates and all(" 192.0.2.10 " in c for c in candidates)
        assert "127.0.0.1" not in webrtc_offer
        assert "c=IN IP4 192.0.2.10" in webrtc_offer and b"c=IN IP4 192.0.2.10" in plain
        # the port is the one aioice bound on the bind address
        gathered = bridge._pc.getTransceivers()[0].receiver.transport.transport  # type: ignore[union-attr]
        ports = {c.port for c in gathered.iceGatherer.getLocalCandidates()}
        assert {int(c.split()[5]) for c in candidates} == ports
    finally:
        await bridge.close()

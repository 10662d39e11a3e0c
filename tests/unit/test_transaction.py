"""RFC 3261 §17 transaction layer (with RFC 6026 Accepted), driven by injected time."""

from __future__ import annotations

import pytest

from sip.message import SipRequest, SipResponse, make_response
from sip.parser import parse_message
from sip.timers import TimerQueue, TimerSettings
from sip.transaction import (
    InvalidMessage,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    RequestReceived,
    ResponseReceived,
    SendMessage,
    TransactionLayer,
    TransactionState,
    TransactionStateError,
    TransactionTerminated,
    TransactionTimedOut,
    TransportFailed,
    new_branch,
)

PEER = ("192.0.2.10", 5060)  # an opaque flow / destination object
SETTINGS = TimerSettings()
MAX_TIMER_STEPS = 200


# -- builders ------------------------------------------------------------------------------


def build_request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bK-inv-1",
    sent_by: str = "192.0.2.10:5060",
    transport: str = "UDP",
    uri: str = "sip:bob@example.com",
    call_id: str = "call-1@192.0.2.10",
    from_tag: str | None = "from-1",
    to_tag: str | None = None,
    cseq: int = 1,
    cseq_method: str | None = None,
    routes: tuple[str, ...] = (),
    via_count: int = 1,
) -> SipRequest:
    """A request as it would arrive from the wire (serialised and parsed back)."""
    via = f"SIP/2.0/{transport} {sent_by}"
    if branch is not None:
        via += f";branch={branch}"
    headers = [("Via", via)]
    for i in range(1, via_count):
        headers.append(("Via", f"SIP/2.0/UDP proxy{i}.example.net;branch=z9hG4bK-up-{i}"))
    headers.append(("Max-Forwards", "70"))
    for route in routes:
        headers.append(("Route", route))
    from_value = "Alice <sip:alice@example.com>"
    if from_tag is not None:
        from_value += f";tag={from_tag}"
    to_value = "Bob <sip:bob@example.com>"
    if to_tag is not None:
        to_value += f";tag={to_tag}"
    headers += [
        ("From", from_value),
        ("To", to_value),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {cseq_method or method}"),
        ("Contact", "<sip:alice@192.0.2.10:5060>"),
    ]
    return wire(SipRequest(method, uri, headers))


def wire(message: SipRequest | SipResponse) -> SipRequest | SipResponse:
    return parse_message(message.to_bytes())


def response_to(request: SipRequest, status: int, to_tag: str | None = "to-1") -> SipResponse:
    return make_response(request, status, to_tag=to_tag if status > 100 else None)


def ack_for(invite: SipRequest, response: SipResponse, *, branch: str | None = None) -> SipRequest:
    """An ACK as a UAC builds it: same branch for a non-2xx, a new one for a 2xx."""
    top = invite.top_via
    assert top is not None
    return build_request(
        "ACK",
        branch=branch if branch is not None else top.branch,
        sent_by=top.sent_by,
        uri=invite.uri,
        call_id=invite.call_id,
        from_tag=invite.from_.tag,
        to_tag=response.to.tag,
        cseq=invite.cseq.seq,
    )


def of_type(events: list, kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def sent(events: list) -> list:
    return [event.message for event in events if isinstance(event, SendMessage)]


def run_timers(layer: TransactionLayer, until: float) -> list[tuple[float, object]]:
    """Fire every timer up to `until`; return (time, event) pairs."""
    out: list[tuple[float, object]] = []
    for _ in range(MAX_TIMER_STEPS):
        deadline = layer.next_deadline()
        if deadline is None or deadline > until:
            return out
        out.extend((deadline, event) for event in layer.on_timer(deadline))
    raise AssertionError("timers did not settle")


def send_times(timeline: list[tuple[float, object]]) -> list[float]:
    return [t for t, event in timeline if isinstance(event, SendMessage)]


def assert_empty(layer: TransactionLayer) -> None:
    assert len(layer) == 0
    assert layer.next_deadline() is None
    stats = layer.stats()
    assert stats["timers"] == 0
    assert stats["client_invite"] == stats["client_non_invite"] == 0
    assert stats["server_invite"] == stats["server_non_invite"] == 0


# -- timers ----------------------------------------------------------------------------------


def test_timer_settings_derive_rfc3261_table_4_values() -> None:
    s = TimerSettings()
    assert (s.timer_a, s.timer_e, s.timer_g) == (0.5, 0.5, 0.5)
    assert s.timer_b == s.timer_f == s.timer_h == s.timer_l == s.timer_m == 32.0
    assert s.timer_d(reliable=False) == 32.0 and s.timer_d(reliable=True) == 0.0
    assert s.timer_i(reliable=False) == 5.0 and s.timer_i(reliable=True) == 0.0
    assert s.timer_j(reliable=False) == 32.0 and s.timer_j(reliable=True) == 0.0
    assert s.timer_k(reliable=False) == 5.0 and s.timer_k(reliable=True) == 0.0
    fast = TimerSettings(t1=0.1, t2=1.0, t4=2.0)
    assert fast.timer_b == pytest.approx(6.4) and fast.timer_k(False) == 2.0
    with pytest.raises(ValueError):
        TimerSettings(t1=0)


def test_timer_queue_orders_by_deadline_then_schedule_order() -> None:
    queue = TimerQueue()
    queue.schedule(2.0, "tx1", "B")
    queue.schedule(1.0, "tx2", "A")
    queue.schedule(1.0, "tx3", "E")
    assert queue.next_deadline() == 1.0
    assert queue.pop_due(0.99) == []
    assert queue.pop_due(1.0) == [("tx2", "A"), ("tx3", "E")]
    assert queue.next_deadline() == 2.0
    assert queue.pop_due(5.0) == [("tx1", "B")]
    assert queue.next_deadline() is None and len(queue) == 0


def test_timer_queue_cancellation_is_lazy_and_bounded() -> None:
    queue = TimerQueue()
    first = queue.schedule(1.0, "tx", "A")
    queue.schedule(3.0, "tx", "B")
    queue.cancel(first)
    queue.cancel(first)  # twice is harmless
    assert len(queue) == 1
    assert queue.next_deadline() == 3.0
    handles = [queue.schedule(10.0 + i, "tx", "X") for i in range(1000)]
    for handle in handles:
        queue.cancel(handle)
    assert len(queue) == 1
    assert len(queue._heap) < 200  # cancelled entries were compacted away
    assert queue.pop_due(100.0) == [("tx", "B")]
    assert len(queue) == 0


# -- INVITE client ----------------------------------------------------------------------------


def test_invite_client_udp_retransmits_on_timer_a_doubling_and_times_out_on_b() -> None:
    layer = TransactionLayer()
    invite = build_request("INVITE", branch=new_branch())
    tx, events = layer.send_request(invite, PEER, reliable=False, now=0.0)
    assert isinstance(tx, InviteClientTransaction) and tx.state is TransactionState.CALLING
    assert sent(events) == [invite] and events[0].flow == PEER
    timeline = run_timers(layer, until=100.0)
    assert send_times(timeline) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(e.message is invite for _, e in timeline if isinstance(e, SendMessage))
    timeouts = [(t, e) for t, e in timeline if isinstance(e, TransactionTimedOut)]
    assert [(t, e.timer, e.transaction) for t, e in timeouts] == [(32.0, "B", tx)]
    assert isinstance(timeline[-1][1], TransactionTerminated) and tx.terminated
    assert_empty(layer)


def test_invite_client_reliable_sends_once_and_times_out_on_b() -> None:
    layer = TransactionLayer()
    tx, events = layer.send_request(build_request(), PEER, reliable=True, now=10.0)
    assert len(sent(events)) == 1
    assert layer.next_deadline() == 42.0
    timeline = run_timers(layer, until=100.0)
    assert send_times(timeline) == []
    assert [type(e) for _, e in timeline] == [TransactionTimedOut, TransactionTerminated]
    assert_empty(layer)


def test_invite_client_provisional_stops_retransmissions_and_timer_b() -> None:
    layer = TransactionLayer()
    invite = build_request()
    tx, _ = layer.send_request(invite, PEER, reliable=False, now=0.0)
    events = layer.receive_response(wire(response_to(invite, 180)), now=0.2)
    assert [type(e) for e in events] == [ResponseReceived]
    assert events[0].transaction is tx and events[0].response.status == 180
    assert tx.state is TransactionState.PROCEEDING
    assert layer.next_deadline() is None  # neither A nor B pending in Proceeding
    assert run_timers(layer, until=1000.0) == []
    assert len(layer) == 1


def test_invite_client_generates_ack_for_486_and_absorbs_retransmissions() -> None:
    layer = TransactionLayer()
    routes = ("<sip:proxy1.example.net;lr>", "<sip:proxy2.example.net;lr>")
    invite = build_request(routes=routes, via_count=2, cseq=7)
    tx, _ = layer.send_request(invite, PEER, reliable=False, now=0.0)
    busy = wire(response_to(invite, 486, to_tag="busy-tag"))
    events = layer.receive_response(busy, now=1.0)
    acks = sent(events)
    assert len(acks) == 1 and events[0].flow == PEER
    ack = acks[0]
    assert ack.method == "ACK" and ack.uri == invite.uri
    assert ack.call_id == invite.call_id
    assert ack.header("From") == invite.header("From")
    assert (ack.cseq.seq, ack.cseq.method) == (7, "ACK")
    assert ack.header_values("Via") == invite.header_values("Via")[:1]
    assert ack.header_lines("Route") == list(routes)
    assert ack.to.tag == "busy-tag"
    assert ack.header("Contact") is None and ack.body == b""
    assert parse_message(ack.to_bytes()).method == "ACK"  # well-formed on the wire
    assert of_type(events, ResponseReceived)[0].response.status == 486
    assert tx.state is TransactionState.COMPLETED
    # The retransmitted 486 is answered with the same ACK and not given to the TU.
    again = layer.receive_response(wire(busy), now=2.0)
    assert sent(again) == [ack] and of_type(again, ResponseReceived) == []
    # Timer D (32 s over UDP) then ends the transaction.
    assert layer.next_deadline() == 33.0
    timeline = run_timers(layer, until=100.0)
    assert [(t, type(e)) for t, e in timeline] == [(33.0, TransactionTerminated)]
    assert_empty(layer)


def test_invite_client_reliable_timer_d_is_zero() -> None:
    layer = TransactionLayer()
    invite = build_request(transport="TCP")
    tx, _ = layer.send_request(invite, PEER, reliable=True, now=0.0)
    events = layer.receive_response(wire(response_to(invite, 603)), now=1.0)
    assert [type(e) for e in events] == [SendMessage, ResponseReceived, TransactionTerminated]
    assert sent(events)[0].method == "ACK"
    assert_empty(layer)


def test_invite_client_2xx_enters_accepted_and_delivers_every_2xx_until_timer_m() -> None:
    layer = TransactionLayer()
    invite = build_request()
    tx, _ = layer.send_request(invite, PEER, reliable=False, now=0.0)
    ok = wire(response_to(invite, 200, to_tag="fork-a"))
    events = layer.receive_response(ok, now=0.1)
    assert [type(e) for e in events] == [ResponseReceived]
    assert sent(events) == []  # the TU, not the transaction, ACKs a 2xx
    assert tx.state is TransactionState.ACCEPTED
    other_fork = wire(response_to(invite, 200, to_tag="fork-b"))
    for response in (wire(ok), other_fork):
        events = layer.receive_response(response, now=1.0)
        assert [(type(e), e.response.to.tag) for e in events] == [
            (ResponseReceived, response.to.tag)
        ]
    assert layer.receive_response(wire(response_to(invite, 486)), now=2.0) == []
    assert layer.next_deadline() == pytest.approx(32.1)  # Timer M
    timeline = run_timers(layer, until=100.0)
    assert [type(e) for _, e in timeline] == [TransactionTerminated]
    assert_empty(layer)


def test_invite_client_2xx_plain_rfc3261_terminates_and_passes_late_2xx_to_tu() -> None:
    layer = TransactionLayer(rfc6026=False)
    invite = build_request()
    tx, _ = layer.send_request(invite, PEER, reliable=False, now=0.0)
    ok = wire(response_to(invite, 200))
    events = layer.receive_response(ok, now=0.1)
    assert [type(e) for e in events] == [ResponseReceived, TransactionTerminated]
    assert_empty(layer)
    late = layer.receive_response(wire(ok), now=0.6)
    assert [(type(e), e.transaction) for e in late] == [(ResponseReceived, None)]


# -- non-INVITE client --------------------------------------------------------------------------


def test_non_invite_client_timer_e_doubles_capped_at_t2_then_timer_f() -> None:
    layer = TransactionLayer()
    options = build_request("OPTIONS", branch=new_branch())
    tx, events = layer.send_request(options, PEER, reliable=False, now=0.0)
    assert isinstance(tx, NonInviteClientTransaction) and tx.state is TransactionState.TRYING
    timeline = run_timers(layer, until=100.0)
    expected = [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert send_times(timeline) == expected
    assert [(t, e.timer) for t, e in timeline if isinstance(e, TransactionTimedOut)] == [
        (32.0, "F")
    ]
    assert tx.terminated
    assert_empty(layer)


def test_non_invite_client_in_proceeding_retransmits_every_t2() -> None:
    layer = TransactionLayer()
    register = build_request("REGISTER")
    tx, _ = layer.send_request(register, PEER, reliable=False, now=0.0)
    events = layer.receive_response(wire(response_to(register, 100)), now=0.2)
    assert [type(e) for e in events] == [ResponseReceived]
    assert tx.state is TransactionState.PROCEEDING
    timeline = run_timers(layer, until=14.0)
    assert send_times(timeline) == [0.5, 4.5, 8.5, 12.5]


def test_non_invite_client_completed_absorbs_retransmissions_until_timer_k() -> None:
    layer = TransactionLayer()
    bye = build_request("BYE", to_tag="to-1", cseq=2)
    tx, _ = layer.send_request(bye, PEER, reliable=False, now=0.0)
    ok = wire(response_to(bye, 200))
    events = layer.receive_response(ok, now=0.7)
    assert [type(e) for e in events] == [ResponseReceived]
    assert tx.state is TransactionState.COMPLETED and tx.last_response is ok
    assert layer.receive_response(wire(ok), now=1.0) == []
    assert layer.next_deadline() == pytest.approx(5.7)  # Timer K = T4
    timeline = run_timers(layer, until=100.0)
    assert send_times(timeline) == []  # no more retransmissions after the final response
    assert [type(e) for _, e in timeline] == [TransactionTerminated]
    assert_empty(layer)


def test_non_invite_client_reliable_has_no_timer_e_and_zero_timer_k() -> None:
    layer = TransactionLayer()
    options = build_request("OPTIONS", transport="TLS")
    tx, _ = layer.send_request(options, PEER, reliable=True, now=0.0)
    assert layer.next_deadline() == 32.0  # only Timer F
    events = layer.receive_response(wire(response_to(options, 200)), now=0.1)
    assert [type(e) for e in events] == [ResponseReceived, TransactionTerminated]
    assert_empty(layer)


def test_client_responses_match_on_branch_and_cseq_method() -> None:
    layer = TransactionLayer()
    invite = build_request("INVITE", branch="z9hG4bK-shared")
    cancel = build_request("CANCEL", branch="z9hG4bK-shared")
    invite_tx, _ = layer.send_request(invite, PEER, reliable=False, now=0.0)
    cancel_tx, _ = layer.send_request(cancel, PEER, reliable=False, now=0.1)
    events = layer.receive_response(wire(response_to(cancel, 200)), now=0.2)
    assert [e.transaction for e in of_type(events, ResponseReceived)] == [cancel_tx]
    assert invite_tx.state is TransactionState.CALLING
    events = layer.receive_response(wire(response_to(invite, 487)), now=0.3)
    assert [e.transaction for e in of_type(events, ResponseReceived)] == [invite_tx]


def test_stray_responses_are_dropped_without_events() -> None:
    layer = TransactionLayer()
    invite = build_request(branch="z9hG4bK-known")
    layer.send_request(invite, PEER, reliable=False, now=0.0)
    unknown = wire(response_to(build_request(branch="z9hG4bK-unknown"), 200))
    wrong_method = wire(response_to(build_request("OPTIONS", branch="z9hG4bK-known"), 200))
    assert layer.receive_response(unknown, now=0.1) == []
    assert layer.receive_response(wrong_method, now=0.1) == []
    assert layer.stats()["stray_responses"] == 2
    assert layer.client_transactions[0].state is TransactionState.CALLING


def test_send_request_refuses_ack_and_missing_branch() -> None:
    layer = TransactionLayer()
    with pytest.raises(ValueError):
        layer.send_request(build_request("ACK"), PEER, reliable=False, now=0.0)
    with pytest.raises(ValueError):
        layer.send_request(build_request(branch=None), PEER, reliable=False, now=0.0)
    layer.send_request(build_request(), PEER, reliable=False, now=0.0)
    with pytest.raises(ValueError):
        layer.send_request(build_request(), PEER, reliable=False, now=0.0)
    assert new_branch().startswith("z9hG4bK") and new_branch() != new_branch()


# -- INVITE server ---------------------------------------------------------------------------------


def test_invite_server_new_request_goes_to_tu_and_retransmissions_are_absorbed() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request()
    events = layer.receive_request(invite, "flow-1", reliable=False, now=0.0)
    assert [type(e) for e in events] == [RequestReceived]
    tx = events[0].transaction
    assert isinstance(tx, InviteServerTransaction) and tx.request is invite
    assert tx.state is TransactionState.PROCEEDING and tx.flow == "flow-1"
    # Before any response: absorbed, nothing sent.
    assert layer.receive_request(build_request(), "flow-1", reliable=False, now=0.5) == []
    ringing = response_to(invite, 180)
    assert sent(layer.send_response(tx, ringing, now=0.6)) == [ringing]
    # In Proceeding, a retransmitted INVITE re-sends the last provisional.
    events = layer.receive_request(build_request(), "flow-1", reliable=False, now=1.5)
    assert events == [SendMessage(ringing, "flow-1")]
    assert len(layer) == 1


def test_invite_server_sends_100_trying_when_tu_is_silent_for_200ms() -> None:
    layer = TransactionLayer()
    invite = build_request()
    events = layer.receive_request(invite, PEER, reliable=False, now=0.0)
    tx = events[0].transaction
    assert sent(events) == []
    assert layer.next_deadline() == pytest.approx(0.2)
    events = layer.on_timer(0.2)
    trying = sent(events)
    assert [r.status for r in trying] == [100]
    assert trying[0].to.tag is None and trying[0].call_id == invite.call_id
    assert tx.last_response is trying[0]
    # A retransmission before the 200 ms are up gets the 100 at once, and only once.
    third = build_request(branch="z9hG4bK-inv-3", call_id="call-3")
    tx3 = layer.receive_request(third, PEER, reliable=False, now=0.5)[0].transaction
    events = layer.receive_request(build_request(branch="z9hG4bK-inv-3", call_id="call-3"),
                                   PEER, reliable=False, now=0.6)  # fmt: skip
    assert [(type(e), e.message.status) for e in events] == [(SendMessage, 100)]
    assert tx3.last_response is events[0].message
    assert sent(layer.on_timer(0.7)) == []
    # A TU answering within 200 ms cancels the automatic 100.
    second = build_request(branch="z9hG4bK-inv-2", call_id="call-2")
    tx2 = layer.receive_request(second, PEER, reliable=False, now=1.0)[0].transaction
    layer.send_response(tx2, response_to(second, 180), now=1.1)
    assert sent(layer.on_timer(1.2)) == []


def test_invite_server_final_response_retransmits_on_timer_g_until_timer_h() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request()
    tx = layer.receive_request(invite, PEER, reliable=False, now=0.0)[0].transaction
    busy = response_to(invite, 486)
    assert sent(layer.send_response(tx, busy, now=0.0)) == [busy]
    assert tx.state is TransactionState.COMPLETED
    retransmitted = layer.receive_request(build_request(), PEER, reliable=False, now=0.25)
    assert retransmitted == [SendMessage(busy, PEER)]
    timeline = run_timers(layer, until=100.0)
    expected_g = [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert send_times(timeline) == expected_g
    assert all(e.message is busy for _, e in timeline if isinstance(e, SendMessage))
    tail = [(t, type(e)) for t, e in timeline if not isinstance(e, SendMessage)]
    assert tail == [(32.0, TransactionTimedOut), (32.0, TransactionTerminated)]
    assert of_type([e for _, e in timeline], TransactionTimedOut)[0].timer == "H"
    assert_empty(layer)


def test_invite_server_ack_for_non_2xx_is_absorbed_and_timer_i_ends_it() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request()
    tx = layer.receive_request(invite, PEER, reliable=False, now=0.0)[0].transaction
    busy = response_to(invite, 486)
    layer.send_response(tx, busy, now=0.1)
    ack = ack_for(invite, busy)
    assert ack.top_via.branch == invite.top_via.branch
    assert layer.receive_request(ack, PEER, reliable=False, now=0.3) == []
    assert tx.state is TransactionState.CONFIRMED
    # Confirmed absorbs ACK retransmissions; G no longer fires.
    assert layer.receive_request(wire(ack), PEER, reliable=False, now=1.0) == []
    assert layer.next_deadline() == pytest.approx(5.3)  # Timer I = T4
    timeline = run_timers(layer, until=100.0)
    assert [type(e) for _, e in timeline] == [TransactionTerminated]
    assert_empty(layer)


def test_invite_server_reliable_skips_timer_g_and_timer_i_is_zero() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request(transport="TCP")
    tx = layer.receive_request(invite, PEER, reliable=True, now=0.0)[0].transaction
    busy = response_to(invite, 480)
    layer.send_response(tx, busy, now=0.0)
    assert layer.next_deadline() == 32.0  # Timer H only
    events = layer.receive_request(ack_for(invite, busy), PEER, reliable=True, now=0.1)
    assert [type(e) for e in events] == [TransactionTerminated]
    assert_empty(layer)


def test_invite_server_2xx_accepted_absorbs_invites_and_passes_ack_to_tu() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request()
    tx = layer.receive_request(invite, PEER, reliable=False, now=0.0)[0].transaction
    ok = response_to(invite, 200)
    assert sent(layer.send_response(tx, ok, now=0.1)) == [ok]
    assert tx.state is TransactionState.ACCEPTED
    # INVITE retransmissions are absorbed: no TU event, no 2xx re-sent by the transaction.
    assert layer.receive_request(build_request(), PEER, reliable=False, now=0.6) == []
    # The TU's own 2xx retransmission goes out.
    assert sent(layer.send_response(tx, ok, now=0.6)) == [ok]
    with pytest.raises(TransactionStateError):
        layer.send_response(tx, response_to(invite, 486), now=0.7)
    # The ACK of a 2xx has its own branch and reaches the TU without a transaction.
    ack = ack_for(invite, ok, branch="z9hG4bK-ack-2xx")
    events = layer.receive_request(ack, PEER, reliable=False, now=0.8)
    assert [(type(e), e.transaction, e.request) for e in events] == [(RequestReceived, None, ack)]
    # Even an ACK reusing the INVITE branch goes to the TU in Accepted.
    same_branch_ack = ack_for(invite, ok)
    events = layer.receive_request(same_branch_ack, PEER, reliable=False, now=0.9)
    assert [(type(e), e.transaction) for e in events] == [(RequestReceived, None)]
    timeline = run_timers(layer, until=100.0)
    assert [(t, type(e)) for t, e in timeline] == [(pytest.approx(32.1), TransactionTerminated)]
    assert_empty(layer)
    # After the end, the TU may still retransmit its 2xx through the layer.
    assert sent(layer.send_response(tx, ok, now=40.0)) == [ok]
    assert layer.send_response(tx, response_to(invite, 486), now=40.0) == []


def test_invite_server_2xx_plain_rfc3261_terminates_at_once() -> None:
    layer = TransactionLayer(rfc6026=False, invite_trying_delay=None)
    invite = build_request()
    tx = layer.receive_request(invite, PEER, reliable=False, now=0.0)[0].transaction
    events = layer.send_response(tx, response_to(invite, 200), now=0.1)
    assert [type(e) for e in events] == [SendMessage, TransactionTerminated]
    assert_empty(layer)
    # A retransmitted INVITE now is a new request for the TU (RFC 3261 behaviour).
    events = layer.receive_request(build_request(), PEER, reliable=False, now=0.5)
    assert [type(e) for e in events] == [RequestReceived]


def test_invite_server_immediate_100_trying_when_delay_is_zero() -> None:
    layer = TransactionLayer(invite_trying_delay=0)
    events = layer.receive_request(build_request(), PEER, reliable=True, now=0.0)
    assert [type(e) for e in events] == [RequestReceived, SendMessage]
    assert events[1].message.status == 100 and layer.next_deadline() is None


def test_stray_ack_goes_to_tu_without_transaction() -> None:
    layer = TransactionLayer()
    ack = build_request("ACK", branch="z9hG4bK-nothing", to_tag="x")
    events = layer.receive_request(ack, PEER, reliable=False, now=0.0)
    assert [(type(e), e.transaction) for e in events] == [(RequestReceived, None)]
    assert len(layer) == 0


# -- non-INVITE server ----------------------------------------------------------------------------


def test_non_invite_server_absorbs_retransmissions_and_ends_on_timer_j() -> None:
    layer = TransactionLayer()
    options = build_request("OPTIONS", branch="z9hG4bK-opt-1")
    events = layer.receive_request(options, PEER, reliable=False, now=0.0)
    tx = events[0].transaction
    assert isinstance(tx, NonInviteServerTransaction) and tx.state is TransactionState.TRYING
    # Trying: a retransmission is absorbed silently.
    again = build_request("OPTIONS", branch="z9hG4bK-opt-1")
    assert layer.receive_request(again, PEER, reliable=False, now=0.5) == []
    trying = response_to(options, 100)
    layer.send_response(tx, trying, now=0.6)
    assert tx.state is TransactionState.PROCEEDING
    assert layer.receive_request(again, PEER, reliable=False, now=1.5) == [
        SendMessage(trying, PEER)
    ]
    ok = response_to(options, 200)
    layer.send_response(tx, ok, now=2.0)
    assert tx.state is TransactionState.COMPLETED
    assert layer.receive_request(again, PEER, reliable=False, now=3.5) == [SendMessage(ok, PEER)]
    with pytest.raises(TransactionStateError):
        layer.send_response(tx, response_to(options, 500), now=3.6)
    assert layer.next_deadline() == 34.0  # Timer J = 64*T1
    timeline = run_timers(layer, until=100.0)
    assert [(t, type(e)) for t, e in timeline] == [(34.0, TransactionTerminated)]
    assert_empty(layer)


def test_non_invite_server_reliable_timer_j_is_zero() -> None:
    layer = TransactionLayer()
    register = build_request("REGISTER", transport="TCP")
    tx = layer.receive_request(register, PEER, reliable=True, now=0.0)[0].transaction
    events = layer.send_response(tx, response_to(register, 200), now=0.1)
    assert [type(e) for e in events] == [SendMessage, TransactionTerminated]
    assert_empty(layer)


def test_stateless_final_response_ends_a_non_invite_server_transaction_at_once() -> None:
    """RFC 3261 §26.3.2.4: a challenge sent statelessly keeps nothing for Timer J; a
    retransmission then starts a new transaction (the TU answers it again)."""
    layer = TransactionLayer()
    register = build_request("REGISTER", branch="z9hG4bK-reg-1")
    tx = layer.receive_request(register, PEER, reliable=False, now=0.0)[0].transaction
    challenge = response_to(register, 401)
    events = layer.send_response(tx, challenge, now=0.1, stateless=True)
    assert [type(e) for e in events] == [SendMessage, TransactionTerminated]
    assert tx.state is TransactionState.TERMINATED
    assert_empty(layer)
    again = layer.receive_request(build_request("REGISTER", branch="z9hG4bK-reg-1"), PEER,
                                  reliable=False, now=0.5)
    assert [type(e) for e in again] == [RequestReceived]
    # an INVITE transaction ignores the flag: its non-2xx final still waits for the ACK
    invite = build_request("INVITE", branch="z9hG4bK-inv-1")
    itx = layer.receive_request(invite, PEER, reliable=False, now=1.0)[0].transaction
    layer.send_response(itx, response_to(invite, 407), now=1.1, stateless=True)
    assert itx.state is TransactionState.COMPLETED


def test_same_branch_different_sent_by_is_a_different_transaction() -> None:
    layer = TransactionLayer()
    a = build_request("OPTIONS", branch="z9hG4bK-same", sent_by="192.0.2.10:5060")
    b = build_request("OPTIONS", branch="z9hG4bK-same", sent_by="192.0.2.99:5060")
    assert (
        len(of_type(layer.receive_request(a, PEER, reliable=False, now=0.0), RequestReceived)) == 1
    )
    assert (
        len(of_type(layer.receive_request(b, PEER, reliable=False, now=0.0), RequestReceived)) == 1
    )
    assert layer.stats()["server_non_invite"] == 2


# -- CANCEL -------------------------------------------------------------------------------------------


def test_cancel_is_its_own_transaction_matched_to_its_invite() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request()
    invite_tx = layer.receive_request(invite, PEER, reliable=False, now=0.0)[0].transaction
    cancel = build_request("CANCEL")
    assert layer.find_invite_for_cancel(cancel) is invite_tx
    events = layer.receive_request(cancel, PEER, reliable=False, now=1.0)
    assert [type(e) for e in events] == [RequestReceived]
    cancel_tx = events[0].transaction
    assert isinstance(cancel_tx, NonInviteServerTransaction) and cancel_tx is not invite_tx
    assert events[0].matched_invite is invite_tx
    assert layer.stats()["server_invite"] == 1 and layer.stats()["server_non_invite"] == 1
    # TU: 200 to the CANCEL, 487 to the INVITE; the ACK of the 487 is absorbed.
    layer.send_response(cancel_tx, response_to(cancel, 200), now=1.0)
    terminated = response_to(invite, 487)
    layer.send_response(invite_tx, terminated, now=1.0)
    assert layer.receive_request(ack_for(invite, terminated), PEER, reliable=False, now=1.1) == []
    run_timers(layer, until=100.0)
    assert_empty(layer)


def test_cancel_matching_nothing_has_no_invite() -> None:
    layer = TransactionLayer()
    layer.receive_request(build_request(), PEER, reliable=False, now=0.0)
    cancel = build_request("CANCEL", branch="z9hG4bK-other")
    assert layer.find_invite_for_cancel(cancel) is None
    events = layer.receive_request(cancel, PEER, reliable=False, now=0.1)
    assert events[0].transaction is not None and events[0].matched_invite is None


# -- RFC 2543 fallback -------------------------------------------------------------------------------


def test_rfc2543_invite_without_cookie_matches_retransmissions_and_its_ack() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    invite = build_request(branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com")
    events = layer.receive_request(invite, PEER, reliable=False, now=0.0)
    tx = events[0].transaction
    assert isinstance(tx, InviteServerTransaction)
    busy = response_to(invite, 486, to_tag="uas-tag")
    layer.send_response(tx, busy, now=0.1)
    retransmission = build_request(
        branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com"
    )
    assert layer.receive_request(retransmission, PEER, reliable=False, now=0.5) == [
        SendMessage(busy, PEER)
    ]
    # Another CSeq or another top Via is another transaction.
    other_cseq = build_request(branch=None, from_tag=None, cseq=57, call_id="inv2543@example.com")
    assert of_type(
        layer.receive_request(other_cseq, PEER, reliable=False, now=0.6), RequestReceived
    )
    other_via = build_request(
        branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com", sent_by="198.51.100.1"
    )
    assert of_type(layer.receive_request(other_via, PEER, reliable=False, now=0.6), RequestReceived)
    assert layer.stats()["server_invite"] == 3
    # An ACK whose To tag is not the response's matches nothing and goes to the TU.
    wrong_ack = build_request(
        "ACK", branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com", to_tag="nope"
    )
    events = layer.receive_request(wrong_ack, PEER, reliable=False, now=0.7)
    assert [(type(e), e.transaction) for e in events] == [(RequestReceived, None)]
    assert tx.state is TransactionState.COMPLETED
    # The ACK with the response's To tag is absorbed by the INVITE transaction.
    ack = build_request(
        "ACK", branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com", to_tag="uas-tag"
    )
    assert layer.receive_request(ack, PEER, reliable=False, now=0.8) == []
    assert tx.state is TransactionState.CONFIRMED
    # A CANCEL of the RFC 2543 INVITE is found by the same fields.
    cancel = build_request(
        "CANCEL", branch=None, from_tag=None, cseq=56, call_id="inv2543@example.com"
    )
    assert layer.find_invite_for_cancel(cancel) is tx


def test_rfc2543_reinvite_ack_matches_when_invite_carried_the_to_tag() -> None:
    layer = TransactionLayer(invite_trying_delay=None)
    reinvite = build_request(branch=None, to_tag="dialog-tag", cseq=3)
    tx = layer.receive_request(reinvite, PEER, reliable=False, now=0.0)[0].transaction
    layer.send_response(tx, response_to(reinvite, 491, to_tag="dialog-tag"), now=0.1)
    ack = build_request("ACK", branch=None, to_tag="dialog-tag", cseq=3)
    assert layer.receive_request(ack, PEER, reliable=False, now=0.2) == []
    assert tx.state is TransactionState.CONFIRMED


def test_rfc4475_badbranch_is_matched_with_the_rfc2543_rules() -> None:
    layer = TransactionLayer()
    raw = (
        b"OPTIONS sip:user@example.com SIP/2.0\r\n"
        b"To: sip:user@example.com\r\n"
        b"From: sip:caller@example.org;tag=33242\r\n"
        b"Max-Forwards: 3\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK\r\n"
        b"Accept: application/sdp\r\n"
        b"Call-ID: badbranch.sadonfo23i420jv0as0derf3j3n\r\n"
        b"CSeq: 8 OPTIONS\r\n"
        b"l: 0\r\n\r\n"
    )
    first = parse_message(raw)
    assert not first.top_via.is_rfc3261_branch
    tx = layer.receive_request(first, PEER, reliable=False, now=0.0)[0].transaction
    assert tx.key[0] == "rfc2543"
    ok = response_to(first, 200)
    layer.send_response(tx, ok, now=0.1)
    assert layer.receive_request(parse_message(raw), PEER, reliable=False, now=0.5) == [
        SendMessage(ok, PEER)
    ]
    # Same bare "z9hG4bK" branch but another Call-ID: not the same transaction.
    other = parse_message(raw.replace(b"badbranch.sadonfo", b"other.sadonfo"))
    events = layer.receive_request(other, PEER, reliable=False, now=0.6)
    assert of_type(events, RequestReceived) and events[0].transaction is not tx
    assert layer.stats()["server_non_invite"] == 2


# -- failures, bad input, memory -------------------------------------------------------------------------


def test_transport_error_fails_and_terminates_the_transaction() -> None:
    layer = TransactionLayer()
    tx, _ = layer.send_request(build_request(), PEER, reliable=True, now=0.0)
    events = layer.transport_error(tx, now=0.1)
    assert [type(e) for e in events] == [TransportFailed, TransactionTerminated]
    assert events[0].transaction is tx and tx.terminated
    assert layer.transport_error(tx, now=0.2) == []
    server_tx = layer.receive_request(build_request("MESSAGE"), PEER, reliable=True, now=0.3)[
        0
    ].transaction
    assert [type(e) for e in layer.transport_error(server_tx, now=0.4)] == [
        TransportFailed,
        TransactionTerminated,
    ]
    assert_empty(layer)


def test_messages_that_cannot_be_matched_become_invalid_message_events() -> None:
    layer = TransactionLayer()
    no_via = SipRequest(
        "OPTIONS",
        "sip:a@example.com",
        [("From", "<sip:b@example.com>;tag=1"), ("CSeq", "1 OPTIONS")],
    )
    events = layer.receive_request(no_via, PEER, reliable=False, now=0.0)
    assert [type(e) for e in events] == [InvalidMessage] and "Via" in events[0].reason
    bad_cseq = SipRequest(
        "OPTIONS",
        "sip:a@example.com",
        [("Via", "SIP/2.0/UDP 192.0.2.1"), ("From", "<sip:b@example.com>;tag=1"),
         ("To", "<sip:a@example.com>"), ("Call-ID", "x"), ("CSeq", "one OPTIONS")],
    )  # fmt: skip
    assert [type(e) for e in layer.receive_request(bad_cseq, PEER, reliable=False, now=0.0)] == [
        InvalidMessage
    ]
    bad_via_response = SipResponse(200, None, [("Via", "garbage"), ("CSeq", "1 INVITE")])
    assert [type(e) for e in layer.receive_response(bad_via_response, now=0.0)] == [InvalidMessage]
    assert layer.stats()["invalid_messages"] == 3
    assert len(layer) == 0


def test_tables_are_empty_after_many_transactions_complete() -> None:
    layer = TransactionLayer()
    now = 0.0
    for i in range(300):
        invite = build_request(branch=f"z9hG4bK-s-{i}", call_id=f"s-{i}")
        tx = layer.receive_request(invite, PEER, reliable=False, now=now)[0].transaction
        final = response_to(invite, 200 if i % 2 else 404)
        layer.send_response(tx, final, now=now)
        if i % 3 == 0 and final.status == 404:
            layer.receive_request(ack_for(invite, final), PEER, reliable=False, now=now)
        client_tx, _ = layer.send_request(
            build_request("OPTIONS", branch=f"z9hG4bK-c-{i}"), PEER, reliable=False, now=now
        )
        if i % 2:
            layer.receive_response(wire(response_to(client_tx.request, 200)), now=now)
    assert layer.stats()["server_invite"] == 300 and layer.stats()["client_non_invite"] == 300
    stats = layer.stats()
    assert len(layer) == sum(stats[k] for k in ("server_invite", "client_non_invite")) == 600
    assert stats["client_invite"] == stats["server_non_invite"] == 0
    run_timers(layer, until=1000.0)
    assert_empty(layer)
    assert len(layer.timer_queue._heap) == 0


def test_tu_data_slot_is_free_for_the_tu() -> None:
    layer = TransactionLayer()
    tx, _ = layer.send_request(build_request(), PEER, reliable=False, now=0.0)
    assert tx.tu_data is None
    tx.tu_data = {"leg": "B"}
    assert layer.client_transactions[0].tu_data == {"leg": "B"}
    assert tx.destination == PEER == tx.flow and tx.reliable is False
    assert tx.method == "INVITE" and tx.key == ("z9hG4bK-inv-1", "INVITE")

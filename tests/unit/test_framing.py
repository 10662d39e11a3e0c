"""StreamFramer: splitting a TCP/TLS byte stream into SIP messages."""

from __future__ import annotations

import time

from sip.transport.framing import (
    FRAMING_BAD,
    FRAMING_OVERSIZE,
    KEEPALIVE,
    FramingError,
    KeepAlive,
    StreamFramer,
)


def sip_request(
    body: bytes = b"", *, length_header: str | None = None, call_id: str = "a1"
) -> bytes:
    if length_header is None:
        length_header = f"Content-Length: {len(body)}"
    return (
        b"OPTIONS sip:alice@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP 192.0.2.1:5060;branch=z9hG4bK776asdhds\r\n"
        b"From: <sip:bob@example.com>;tag=1928301774\r\n"
        b"To: <sip:alice@example.com>\r\n"
        b"Call-ID: " + call_id.encode() + b"\r\n"
        b"CSeq: 1 OPTIONS\r\n" + length_header.encode() + b"\r\n\r\n" + body
    )


SDP_BODY = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"


def feed_in_pieces(framer: StreamFramer, data: bytes, piece: int) -> list[object]:
    framed: list[object] = []
    for start in range(0, len(data), piece):
        framed.extend(framer.feed(data[start : start + piece]))
    return framed


def test_message_fed_byte_by_byte_is_framed_once_and_exactly() -> None:
    message = sip_request(SDP_BODY)
    framer = StreamFramer()
    framed = feed_in_pieces(framer, message, 1)
    assert framed == [message]
    assert framer.buffered == 0


def test_every_chunk_boundary_of_two_messages_frames_both() -> None:
    first = sip_request(SDP_BODY, call_id="first")
    second = sip_request(b"", call_id="second")
    stream = first + second
    for split in range(1, len(stream)):
        framer = StreamFramer()
        framed = framer.feed(stream[:split]) + framer.feed(stream[split:])
        assert framed == [first, second], f"split at {split}"


def test_two_messages_in_one_chunk() -> None:
    first = sip_request(b"hello", call_id="one")
    second = sip_request(b"world!", call_id="two")
    assert StreamFramer().feed(first + second) == [first, second]


def test_partial_body_waits_for_the_rest() -> None:
    message = sip_request(SDP_BODY)
    framer = StreamFramer()
    assert framer.feed(message[:-5]) == []
    assert framer.feed(message[-5:]) == [message]


def test_body_containing_blank_line_is_not_split() -> None:
    body = b"first part\r\n\r\nINVITE sip:x SIP/2.0\r\n\r\nend"
    message = sip_request(body)
    trailing = sip_request(b"", call_id="next")
    assert feed_in_pieces(StreamFramer(), message + trailing, 7) == [message, trailing]


def test_compact_and_case_insensitive_content_length_with_spaces_around_colon() -> None:
    body = b"12345"
    for header in ("l: 5", "L:5", "l \t:\t 5 ", "CONTENT-LENGTH  :   5", "content-length:005"):
        message = sip_request(body, length_header=header)
        assert StreamFramer().feed(message) == [message], header


def test_content_length_zero_frames_header_only_message() -> None:
    message = sip_request(b"")
    framer = StreamFramer()
    assert framer.feed(message + b"INV") == [message]
    assert framer.buffered == 3


def test_folded_continuation_line_is_not_mistaken_for_content_length() -> None:
    message = (
        b"OPTIONS sip:alice@example.com SIP/2.0\r\n"
        b"Subject: long\r\n"
        b" l: 99\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    assert StreamFramer().feed(message) == [message]


def test_lf_only_line_endings_are_framed() -> None:
    message = b"OPTIONS sip:a@example.com SIP/2.0\nCall-ID: x\nContent-Length: 3\n\nabc"
    assert StreamFramer().feed(message + message) == [message, message]


def test_leading_crlf_before_message_is_skipped_without_keepalive() -> None:
    message = sip_request(b"")
    assert StreamFramer().feed(b"\r\n" + message) == [message]


def test_double_crlf_ping_between_messages_yields_keepalive() -> None:
    message = sip_request(b"x")
    framer = StreamFramer()
    framed = framer.feed(message + b"\r\n\r\n" + message)
    assert framed == [message, KEEPALIVE, message]
    assert isinstance(framed[1], KeepAlive)


def test_ping_split_across_chunks_and_repeated() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [KEEPALIVE]
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == [KEEPALIVE, KEEPALIVE]


def test_missing_content_length_is_a_framing_error() -> None:
    message = (
        b"OPTIONS sip:alice@example.com SIP/2.0\r\nCall-ID: nolength\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    framed = StreamFramer().feed(message)
    assert len(framed) == 1
    error = framed[0]
    assert isinstance(error, FramingError)
    assert error.kind == FRAMING_BAD
    assert "missing Content-Length" in error.reason


def assert_bad_length(header: str, reason_fragment: str) -> None:
    framer = StreamFramer()
    framed = framer.feed(sip_request(b"abc", length_header=header))
    assert len(framed) == 1, header
    error = framed[0]
    assert isinstance(error, FramingError), header
    assert error.kind == FRAMING_BAD, header
    assert reason_fragment in error.reason, (header, error.reason)
    assert framer.failed


def test_negative_content_length_is_rejected() -> None:
    assert_bad_length("Content-Length: -3", "negative")


def test_non_numeric_content_length_is_rejected() -> None:
    assert_bad_length("Content-Length: three", "non-numeric")
    assert_bad_length("l: 3x", "non-numeric")
    assert_bad_length("Content-Length:", "empty")


def test_conflicting_duplicate_content_length_is_rejected() -> None:
    assert_bad_length("Content-Length: 3\r\nl: 4", "conflicting")


def test_identical_duplicate_content_length_is_accepted() -> None:
    message = sip_request(b"abc", length_header="Content-Length: 3\r\nl: 003")
    assert StreamFramer().feed(message) == [message]


def test_declared_body_over_limit_is_oversize() -> None:
    framer = StreamFramer(max_message_size=1000)
    framed = framer.feed(sip_request(b"", length_header="Content-Length: 5000"))
    assert len(framed) == 1
    assert isinstance(framed[0], FramingError)
    assert framed[0].kind == FRAMING_OVERSIZE


def test_absurd_content_length_is_oversize_not_a_crash() -> None:
    framed = StreamFramer().feed(sip_request(b"", length_header="Content-Length: " + "9" * 5000))
    assert len(framed) == 1
    assert isinstance(framed[0], FramingError)
    assert framed[0].kind == FRAMING_OVERSIZE


def test_header_section_over_limit_without_end_is_oversize() -> None:
    framer = StreamFramer(max_message_size=1000)
    framed: list[object] = []
    header_line = b"X-Filler: " + b"a" * 90 + b"\r\n"
    framed += framer.feed(b"OPTIONS sip:a@example.com SIP/2.0\r\n")
    for _ in range(20):
        framed += framer.feed(header_line)
        if framed:
            break
    assert len(framed) == 1
    assert isinstance(framed[0], FramingError)
    assert framed[0].kind == FRAMING_OVERSIZE
    assert framer.buffered == 0


def test_message_exactly_at_limit_is_accepted() -> None:
    message = sip_request(b"z" * 100)
    assert StreamFramer(max_message_size=len(message)).feed(message) == [message]
    rejected = StreamFramer(max_message_size=len(message) - 1).feed(message)
    assert isinstance(rejected[0], FramingError)


def test_framer_stays_dead_after_an_error() -> None:
    framer = StreamFramer()
    first = framer.feed(sip_request(b"abc", length_header="Content-Length: -1"))
    assert isinstance(first[0], FramingError)
    assert framer.feed(sip_request(b"")) == []
    assert framer.feed(b"\r\n\r\n") == []


def test_messages_before_an_error_in_the_same_chunk_are_delivered() -> None:
    good = sip_request(b"ok")
    bad = sip_request(b"", length_header="Content-Length: nope")
    framed = StreamFramer().feed(good + bad + good)
    assert framed[0] == good
    assert isinstance(framed[1], FramingError)
    assert len(framed) == 2


def test_large_header_section_byte_by_byte_is_linear_time() -> None:
    # Re-scanning the whole buffer on every byte would take minutes here.
    size = 256 * 1024
    filler = b"X-Filler: " + b"b" * 1000 + b"\r\n"
    header = b"OPTIONS sip:a@example.com SIP/2.0\r\n" + filler * (size // len(filler))
    message = header + b"Content-Length: 0\r\n\r\n"
    framer = StreamFramer(max_message_size=len(message))
    framed: list[object] = []
    started = time.perf_counter()
    for index in range(len(message)):
        framed += framer.feed(message[index : index + 1])
    elapsed = time.perf_counter() - started
    assert framed == [message]
    assert elapsed < 5.0, f"framing {len(message)} single bytes took {elapsed:.2f} s"


def test_many_messages_in_one_chunk_is_linear_time() -> None:
    # Scanning the rest of the chunk once per message would take tens of seconds here.
    message = sip_request(SDP_BODY)
    count = 20000
    started = time.perf_counter()
    framed = StreamFramer().feed(message * count)
    elapsed = time.perf_counter() - started
    assert len(framed) == count and framed[0] == message and framed[-1] == message
    assert elapsed < 5.0, f"framing {count} messages from one chunk took {elapsed:.2f} s"

"""Bencode as used by rtpengine's ng protocol: round trips, canonical output, strict input."""

from __future__ import annotations

import pytest

from media.bencode import MAX_DEPTH, BencodeError, decode, encode


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"i0e"),
        (42, b"i42e"),
        (-7, b"i-7e"),
        (2**70, b"i1180591620717411303424e"),
        (b"", b"0:"),
        (b"spam", b"4:spam"),
        ("héllo", b"6:h\xc3\xa9llo"),
        ([], b"le"),
        ([1, b"a", [2]], b"li1e1:ali2eee"),
        ({}, b"de"),
        ({"b": 1, "a": b"x"}, b"d1:a1:x1:bi1ee"),
    ],
)
def test_encode_writes_canonical_bencode(value: object, wire: bytes) -> None:
    assert encode(value) == wire


def test_encode_sorts_keys_by_their_bytes_not_by_insertion() -> None:
    wire = encode({"to-tag": b"t", "call-id": b"c", "ICE": b"remove", "command": b"offer"})
    assert wire == b"d3:ICE6:remove7:call-id1:c7:command5:offer6:to-tag1:te"


def test_round_trip_of_an_ng_offer_shaped_message() -> None:
    message = {
        "command": b"offer",
        "call-id": b"abc@host",
        "from-tag": b"ft",
        "replace": [b"origin", b"session-connection"],
        "sdp": b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n",
        "nested": {"n": [0, -1, {"deep": b"\x00\xff"}]},
    }
    assert decode(encode(message)) == message


def test_decode_returns_str_keys_and_bytes_values() -> None:
    assert decode(b"d6:result4:ponge") == {"result": b"pong"}


def test_decode_accepts_unsorted_keys_as_rtpengine_writes_them() -> None:
    assert decode(b"d3:sdp1:x6:result2:oke") == {"result": b"ok", "sdp": b"x"}


def test_decode_can_insist_on_sorted_keys() -> None:
    with pytest.raises(BencodeError, match="out of order"):
        decode(b"d3:sdp1:x6:result2:oke", require_sorted_keys=True)
    assert decode(b"d6:result2:ok3:sdp1:xe", require_sorted_keys=True) == {
        "result": b"ok",
        "sdp": b"x",
    }


def test_strings_may_contain_any_bytes_including_separators() -> None:
    assert decode(b"5:a:e d") == b"a:e d"


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        (b"", "end of data"),
        (b"i42", "unterminated integer"),
        (b"ie", "malformed integer"),
        (b"i-e", "malformed integer"),
        (b"i4x2e", "malformed integer"),
        (b"i042e", "non-canonical"),
        (b"i-0e", "non-canonical"),
        (b"i+5e", "malformed integer"),
        (b"5:abc", "runs past the end"),
        (b"05:abcde", "malformed string length"),
        (b"3abc", "without ':'"),
        (b"-1:a", "unexpected byte"),
        (b"li1e", "unterminated"),
        (b"d1:a", "end of data"),
        (b"d1:ai1e", "unterminated"),
        (b"di1ei2ee", "key is not a string"),
        (b"d1:ai1e1:ai2ee", "duplicate"),
        (b"d1:\xffi1ee", "not UTF-8"),
        (b"i1ei2e", "trailing data"),
        (b"x", "unexpected byte"),
    ],
)
def test_decode_rejects_malformed_input_with_its_own_error(wire: bytes, complaint: str) -> None:
    with pytest.raises(BencodeError, match=complaint):
        decode(wire)


def test_bencode_error_is_a_value_error() -> None:
    assert issubclass(BencodeError, ValueError)


def test_decode_bounds_nesting_instead_of_overflowing_the_stack() -> None:
    deep_ok = b"l" * MAX_DEPTH + b"e" * MAX_DEPTH
    assert decode(deep_ok) is not None
    too_deep = b"l" * 100_000 + b"e" * 100_000
    with pytest.raises(BencodeError, match="nesting"):
        decode(too_deep)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(BencodeError):
        decode("i1e")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [True, 1.5, None, {1: b"x"}, object(), {b"a": 1, "a": 2}])
def test_encode_rejects_values_bencode_cannot_carry(value: object) -> None:
    with pytest.raises(BencodeError):
        encode(value)

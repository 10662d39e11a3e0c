"""Bencode, the serialisation of rtpengine's ng control protocol.

Four types: integers (``i42e``), byte strings (``4:spam``), lists (``l...e``) and
dictionaries (``d...e``, keys are byte strings, written in sorted order).

Encoding accepts ``int``, ``str`` (written as UTF-8), ``bytes``/``bytearray``, ``list``/
``tuple`` and ``dict`` with ``str`` or ``bytes`` keys; keys are written sorted by their
bytes. Decoding returns ``int``, ``bytes``, ``list`` and ``dict`` with ``str`` keys (keys
must be UTF-8). Decoding is strict about syntax (no leading zeros, no ``-0``, no trailing
data, no duplicate keys, bounded nesting) but by default accepts keys in any order,
because rtpengine itself writes them unsorted; pass ``require_sorted_keys=True`` to
insist on canonical order. Every problem is a :class:`BencodeError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

BValue: TypeAlias = "int | bytes | list[BValue] | dict[str, BValue]"
"""A decoded value."""

MAX_DEPTH = 64
"""Deepest nesting of lists and dictionaries accepted by :func:`decode`."""

_DIGITS = frozenset(b"0123456789")


class BencodeError(ValueError):
    """Input that cannot be encoded, or bytes that are not valid bencode."""


def encode(value: object) -> bytes:
    """Bencode ``value``; raises :class:`BencodeError` for unsupported types."""
    out: list[bytes] = []
    _encode_into(value, out, 0)
    return b"".join(out)


def _encode_into(value: object, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BencodeError(f"nesting deeper than {MAX_DEPTH}")
    if isinstance(value, bool):
        raise BencodeError("booleans have no bencode form; use 0/1 or a string")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(b"%d:%s" % (len(raw), raw))
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out.append(b"%d:%s" % (len(raw), raw))
    elif isinstance(value, Mapping):
        items: dict[bytes, object] = {}
        for key, item in value.items():
            if isinstance(key, str):
                raw_key = key.encode("utf-8")
            elif isinstance(key, bytes):
                raw_key = key
            else:
                raise BencodeError(f"dictionary key must be str or bytes, not {type(key).__name__}")
            if raw_key in items:
                raise BencodeError(f"duplicate dictionary key {raw_key!r}")
            items[raw_key] = item
        out.append(b"d")
        for raw_key in sorted(items):
            out.append(b"%d:%s" % (len(raw_key), raw_key))
            _encode_into(items[raw_key], out, depth + 1)
        out.append(b"e")
    elif isinstance(value, Sequence):
        out.append(b"l")
        for item in value:
            _encode_into(item, out, depth + 1)
        out.append(b"e")
    else:
        raise BencodeError(f"cannot bencode a {type(value).__name__}")


def decode(data: bytes, *, require_sorted_keys: bool = False) -> BValue:
    """Decode one complete bencoded value; raises :class:`BencodeError` on any defect."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BencodeError(f"can only decode bytes, not {type(data).__name__}")
    decoder = _Decoder(bytes(data), require_sorted_keys)
    value = decoder.value(0)
    if decoder.pos != len(decoder.data):
        raise BencodeError(f"trailing data at offset {decoder.pos}")
    return value


class _Decoder:
    __slots__ = ("data", "pos", "require_sorted_keys")

    def __init__(self, data: bytes, require_sorted_keys: bool) -> None:
        self.data = data
        self.pos = 0
        self.require_sorted_keys = require_sorted_keys

    def value(self, depth: int) -> BValue:
        if depth > MAX_DEPTH:
            raise BencodeError(f"nesting deeper than {MAX_DEPTH}")
        if self.pos >= len(self.data):
            raise BencodeError(f"unexpected end of data at offset {self.pos}")
        lead = self.data[self.pos]
        if lead == ord("i"):
            return self.integer()
        if lead in _DIGITS:
            return self.string()
        if lead == ord("l"):
            self.pos += 1
            items: list[BValue] = []
            while self.peek() != ord("e"):
                items.append(self.value(depth + 1))
            self.pos += 1
            return items
        if lead == ord("d"):
            return self.dictionary(depth)
        raise BencodeError(f"unexpected byte {bytes([lead])!r} at offset {self.pos}")

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise BencodeError("unterminated list or dictionary")
        return self.data[self.pos]

    def integer(self) -> int:
        start = self.pos + 1
        end = self.data.find(b"e", start)
        if end < 0:
            raise BencodeError(f"unterminated integer at offset {self.pos}")
        text = self.data[start:end]
        digits = text[1:] if text.startswith(b"-") else text
        if not digits or not all(c in _DIGITS for c in digits):
            raise BencodeError(f"malformed integer {text!r} at offset {self.pos}")
        if (digits.startswith(b"0") and len(digits) > 1) or text == b"-0":
            raise BencodeError(f"non-canonical integer {text!r} at offset {self.pos}")
        self.pos = end + 1
        return int(text)

    def string(self) -> bytes:
        colon = self.data.find(b":", self.pos)
        if colon < 0:
            raise BencodeError(f"string length without ':' at offset {self.pos}")
        length_text = self.data[self.pos : colon]
        if not all(c in _DIGITS for c in length_text) or (
            length_text.startswith(b"0") and len(length_text) > 1
        ):
            raise BencodeError(f"malformed string length {length_text!r} at offset {self.pos}")
        length = int(length_text)
        start = colon + 1
        if start + length > len(self.data):
            raise BencodeError(f"string of {length} bytes at offset {self.pos} runs past the end")
        self.pos = start + length
        return self.data[start : self.pos]

    def dictionary(self, depth: int) -> dict[str, BValue]:
        self.pos += 1
        result: dict[str, BValue] = {}
        previous: bytes | None = None
        while self.peek() != ord("e"):
            if self.data[self.pos] not in _DIGITS:
                raise BencodeError(f"dictionary key is not a string at offset {self.pos}")
            key_offset = self.pos
            raw_key = self.string()
            if self.require_sorted_keys and previous is not None and raw_key <= previous:
                raise BencodeError(f"dictionary key {raw_key!r} out of order at {key_offset}")
            previous = raw_key
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise BencodeError(f"dictionary key at offset {key_offset} is not UTF-8") from None
            if key in result:
                raise BencodeError(f"duplicate dictionary key {key!r} at offset {key_offset}")
            result[key] = self.value(depth + 1)
        self.pos += 1
        return result

"""TFRecord files of `tf.train.Example`, read and written without TensorFlow.

Framing per record: uint64 length, uint32 masked CRC-32C of the length, payload, uint32 masked
CRC-32C of the payload (little endian).  The payload is a protobuf `Example`:
features(1) -> map<string, Feature>(1); Feature = bytes_list(1) | float_list(2) | int64_list(3),
each a repeated field 1 (floats and ints may be packed).
"""
from __future__ import annotations

import struct
from typing import Iterator

import google_crc32c

_KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


class TFRecordError(ValueError):
    pass


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_records(data: bytes) -> Iterator[tuple[int, bytes | None, str]]:
    """(offset, payload, reason) per record; payload None and a reason for a corrupt one.

    A bad payload CRC loses only that record.  A truncated file or a bad length CRC loses the
    framing, so the rest of the file becomes one reject at that offset.
    """
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            yield pos, None, "truncated TFRecord header"
            return
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if _masked_crc(data[pos:pos + 8]) != length_crc:
            yield pos, None, "bad TFRecord length CRC (framing lost; rest of file skipped)"
            return
        end = pos + 12 + length + 4
        if end > len(data):
            yield pos, None, "truncated TFRecord"
            return
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", data, end - 4)
        if _masked_crc(payload) != payload_crc:
            yield pos, None, "bad TFRecord data CRC"
        else:
            yield pos, payload, ""
        pos = end


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise TFRecordError("truncated varint")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise TFRecordError("length-delimited field runs past the message")
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > len(buf):
                raise TFRecordError(f"{size}-byte field runs past the message")
            value, i = buf[i:i + size], i + size
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _values(kind: str, body: bytes) -> list:
    """The values of one list; a value in a wire type its kind cannot have is corruption."""
    out: list = []
    for number, wire, value in _fields(body):
        if number != 1:
            continue
        if kind == "bytes_list" and wire == 2:
            out.append(bytes(value))
        elif kind == "float_list" and wire in (2, 5):  # packed, or one fixed32
            if len(value) % 4:
                raise TFRecordError(f"float_list of {len(value)} bytes is not a whole number of 4-byte floats")
            out.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif kind == "int64_list" and wire == 0:
            out.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif kind == "int64_list" and wire == 2:  # packed varints
            j = 0
            while j < len(value):
                v, j = _varint(value, j)
                out.append(v - (1 << 64) if v >= 1 << 63 else v)
        else:
            raise TFRecordError(f"{kind} value in protobuf wire type {wire}")
    return out


def _messages(buf: bytes, number: int) -> list[bytes]:
    """The values of length-delimited field `number` (nested messages, strings)."""
    out = []
    for n, wire, value in _fields(buf):
        if n == number:
            if wire != 2:
                raise TFRecordError(f"field {n} in protobuf wire type {wire}, not length-delimited")
            out.append(value)
    return out


def parse_example(payload: bytes) -> dict[str, tuple[str, list]]:
    """{feature name: (kind, values)}; kind is bytes_list, float_list or int64_list.

    Any payload that is not a well-formed Example raises TFRecordError (or UnicodeDecodeError
    for a name), so readers can reject the record instead of failing the task.
    """
    features: dict[str, tuple[str, list]] = {}
    for features_msg in _messages(payload, 1):
        for entry in _messages(features_msg, 1):
            names, feature = _messages(entry, 1), _messages(entry, 2)
            name = names[-1].decode("utf-8") if names else ""  # protobuf: the last value wins
            kind, body = "bytes_list", b""
            for n, wire, v in _fields(feature[-1] if feature else b""):
                if n in _KINDS and wire != 2:
                    raise TFRecordError(f"feature '{name}': {_KINDS[n]} in protobuf wire type {wire}")
                kind, body = _KINDS.get(n, f"field {n}"), v
            features[name] = (kind, _values(kind, body) if kind in _KINDS.values() else [])
    return features


# -- writing (tests, fixtures, exports) --------------------------------------------------------

def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def encode_example(features: dict[str, list]) -> bytes:
    """An Example from {name: [bytes|str ...] | [int ...] | [float ...]}."""
    entries = b""
    for name, values in features.items():
        if values and isinstance(values[0], float):
            feature = _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
        elif values and isinstance(values[0], int):
            feature = _field(3, _field(1, b"".join(_encode_varint(v) for v in values)))
        else:
            items = b"".join(_field(1, v.encode("utf-8") if isinstance(v, str) else v) for v in values)
            feature = _field(1, items)
        entries += _field(1, _field(1, name.encode("utf-8")) + _field(2, feature))
    return _field(1, entries)


def frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", _masked_crc(length)) + payload
            + struct.pack("<I", _masked_crc(payload)))

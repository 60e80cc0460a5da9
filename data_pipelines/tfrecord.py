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
            yield pos, None, f"truncated TFRecord header ({len(data) - pos} bytes left)"
            return
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if _masked_crc(data[pos:pos + 8]) != length_crc:
            yield pos, None, "bad TFRecord length CRC (framing lost; rest of file skipped)"
            return
        end = pos + 12 + length + 4
        if end > len(data):
            yield pos, None, f"truncated TFRecord (needs {length} payload bytes)"
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
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _values(kind: str, body: bytes) -> list:
    out: list = []
    for number, wire, value in _fields(body):
        if number != 1:
            continue
        if kind == "bytes_list":
            out.append(bytes(value))
        elif kind == "float_list":
            out.extend(struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else struct.unpack("<f", value))
        elif wire == 2:  # packed int64s
            j = 0
            while j < len(value):
                v, j = _varint(value, j)
                out.append(v - (1 << 64) if v >= 1 << 63 else v)
        else:
            out.append(value - (1 << 64) if value >= 1 << 63 else value)
    return out


def parse_example(payload: bytes) -> dict[str, tuple[str, list]]:
    """{feature name: (kind, values)}; kind is bytes_list, float_list or int64_list."""
    features: dict[str, tuple[str, list]] = {}
    for number, _, features_msg in _fields(payload):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features_msg):
            if entry_number != 1:
                continue
            parts = {n: v for n, _, v in _fields(entry)}
            name = bytes(parts.get(1, b"")).decode("utf-8")
            kind, body = "bytes_list", b""
            for n, _, v in _fields(parts.get(2, b"")):
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

"""An Arrow unit's columns read straight from its IPC stream, each zstd buffer through this thread's reused context.

pyarrow decompresses every buffer of a stream with a one-shot ``ZSTD_decompress``, which sets up a fresh
decompression context per buffer. A unit has ``2 + 3 · columns`` buffers (13 for RS-KD), and on the benchmark VM a
2048-position unit took 0.24 ms to read that way, where its frames decompress in 0.10 ms through one reused context
(docs/benchmarks.md, "Arrow units read through one zstd context"). This module reads the one layout the container writes — the schema message, one record
batch of non-null columns (``seq_id uint64``, then ``binary`` columns), the end-of-stream marker — as the Arrow
columnar format specifies it (``Message.fbs``, ``Schema.fbs``; "Compression" in the IPC format), from the messages'
flatbuffers:

- an encapsulated message is ``0xFFFFFFFF``, its metadata length (int32), the ``Message`` flatbuffer, then its body;
- the schema message must be byte for byte the one the container writes for the store's spec;
- a ``RecordBatch`` lists one ``FieldNode`` (length, null count) per column and ``(offset, length)`` per buffer in
  the body; with body compression each buffer is its uncompressed length (int64, little-endian; ``-1``: stored as
  it is) and a zstd frame.

Whatever else a stream holds — another codec, more batches, nulls, other columns, bounds that do not add up — is
not read here: :func:`unit_columns` returns None and the container reads the stream with pyarrow, which gives the
same columns or the error it always gave. The tests compare both reads on every shape the writer makes.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from .zstd_context import decompressor

__all__ = ["unit_columns"]

CONTINUATION = b"\xff\xff\xff\xff"
RECORD_BATCH = 3  # MessageHeader.RecordBatch
ZSTD = 1  # CompressionType.ZSTD (LZ4_FRAME = 0 is the default of an absent codec field)


class _Other(Exception):
    """The stream is not the layout read here (the caller reads it with pyarrow)."""


def unit_columns(data: bytes | memoryview, schema_message: bytes, names: list[str],
                 ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """``(seq_ids uint64[R], {name: (values uint8, offsets int64[R + 1])})`` of a unit's IPC stream whose schema
    message is ``schema_message`` (``pa.Schema.serialize()``: ``seq_id`` then the binary columns ``names``), or None
    where the stream is anything else."""
    view = memoryview(data).cast("B")
    if bytes(view[:len(schema_message)]) != schema_message:
        return None
    try:
        metadata, body, end = _message(view, len(schema_message))
        if _message_end(view, end):
            return _columns(view, metadata, body, names)
    except (_Other, struct.error, zstandard.ZstdError, ValueError):
        pass
    return None


def _message(view: memoryview, at: int) -> tuple[int, memoryview, int]:
    """The record batch message at ``at``: ``(where its RecordBatch table is, its body, where the next message
    starts)``."""
    if bytes(view[at:at + 4]) != CONTINUATION:
        raise _Other
    size = _u(view, "<i", at + 4)
    flat = at + 8
    message = _root(view, flat)
    if _scalar(view, message, 1, "<B", 0) != RECORD_BATCH:
        raise _Other
    body_start, body_length = flat + size, _scalar(view, message, 3, "<q", 0)
    if size < 0 or body_length < 0 or body_start + body_length > len(view):
        raise _Other
    return _offset(view, message, 2), view[body_start:body_start + body_length], body_start + body_length


def _message_end(view: memoryview, at: int) -> bool:
    """Whether the stream ends at ``at``: the end-of-stream marker (or nothing), not a second batch."""
    rest = bytes(view[at:at + 8])
    return rest in (b"", CONTINUATION, CONTINUATION + b"\0\0\0\0") and len(view) - at <= 8


def _columns(view: memoryview, batch: int, body: memoryview,
             names: list[str]) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rows = _scalar(view, batch, 0, "<q", 0)
    nodes, buffers = _structs(view, batch, 1), _structs(view, batch, 2)
    if len(nodes) != 1 + len(names) or len(buffers) != 2 + 3 * len(names):
        raise _Other
    if any(node != (rows, 0) for node in nodes):  # every column as long as the batch, no nulls
        raise _Other
    zstd = _compression(view, batch)
    raw = [_buffer(body, offset, length, zstd) for offset, length in buffers]
    seq_ids = np.frombuffer(raw[1], dtype="<u8")
    if seq_ids.size != rows:
        raise _Other
    columns = {}
    for i, name in enumerate(names):
        offsets = np.frombuffer(raw[3 + 3 * i], dtype="<i4")
        values = np.frombuffer(raw[4 + 3 * i], dtype=np.uint8)
        if offsets.size != rows + 1 or (rows and (offsets[0] < 0 or offsets[-1] > values.size
                                                  or np.any(offsets[1:] < offsets[:-1]))):
            raise _Other
        columns[name] = (values, offsets.astype(np.int64))
    return seq_ids.astype(np.uint64, copy=False), columns


def _compression(view: memoryview, batch: int) -> bool:
    """Whether the body's buffers are compressed (zstd); another codec is not read here."""
    table = _offset(view, batch, 3, required=False)
    if table is None:
        return False
    if _scalar(view, table, 0, "<b", 0) != ZSTD or _scalar(view, table, 1, "<b", 0) != 0:  # codec, method BUFFER
        raise _Other
    return True


def _buffer(body: memoryview, offset: int, length: int, zstd: bool) -> bytes | memoryview:
    if offset < 0 or length < 0 or offset + length > len(body):
        raise _Other
    region = body[offset:offset + length]
    if not zstd or length == 0:
        return region
    if length < 8:
        raise _Other
    size = _u(region, "<q", 0)
    if size == -1:
        return region[8:]
    frame = region[8:]
    if size < 0 or zstandard.frame_content_size(frame) not in (size, -1):  # -1: a frame that does not record it
        raise _Other  # (a damaged length is not allocated here)
    out = decompressor().decompress(frame, max_output_size=size)
    if len(out) != size:
        raise _Other
    return out


# -- flatbuffers: a table is found through its vtable (an int32 back-offset); fields by slot number ---------------

def _u(view: memoryview, fmt: str, at: int) -> int:
    if at < 0:
        raise _Other
    return struct.unpack_from(fmt, view, at)[0]


def _root(view: memoryview, flat: int) -> int:
    return flat + _u(view, "<I", flat)


def _slot(view: memoryview, table: int, slot: int) -> int | None:
    """The absolute position of field ``slot`` of ``table``, None where the field is absent."""
    vtable = table - _u(view, "<i", table)
    if 4 + 2 * slot + 2 > _u(view, "<H", vtable):
        return None
    field = _u(view, "<H", vtable + 4 + 2 * slot)
    return table + field if field else None


def _scalar(view: memoryview, table: int, slot: int, fmt: str, default: int) -> int:
    at = _slot(view, table, slot)
    return default if at is None else _u(view, fmt, at)


def _offset(view: memoryview, table: int, slot: int, required: bool = True) -> int | None:
    at = _slot(view, table, slot)
    if at is None:
        if required:
            raise _Other
        return None
    return at + _u(view, "<I", at)


def _structs(view: memoryview, table: int, slot: int) -> list[tuple[int, int]]:
    """A vector of 16-byte structs of two int64 (``FieldNode``, ``Buffer``)."""
    at = _offset(view, table, slot)
    count = _u(view, "<I", at)
    if at + 4 + 16 * count > len(view):
        raise _Other
    return [tuple(pair) for pair in np.frombuffer(view, dtype="<i8", count=2 * count, offset=at + 4)
            .reshape(count, 2).tolist()]

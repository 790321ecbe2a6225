"""A unit's Zarr shards read and written on the calling thread: the ``sharding_indexed`` layout put together and
taken apart here, each inner chunk (de)compressed by the numcodecs codec zarr's own codec calls (zstd reads through
a reused context; blosc writes stay with zarr, see :func:`writes`).

zarr-python runs a shard through its asyncio pipeline and hands every inner chunk's (de)compression to a thread
(``asyncio.to_thread``): with one row per inner chunk that is ~110 thread round trips per unit, and a unit read
~40 ms, 15–20× the Arrow container's (docs/benchmarks.md, "Zarr units read without zarr's pipeline"). The bytes
are what the store's metadata (:mod:`~logitcache.store.containers.zarr`) promises, the same bytes zarr writes
(the tests compare every object), and nothing else is accepted:

- a shard is its inner chunks' bytes, then the index: per inner chunk ``(offset, nbytes)`` as little-endian
  uint64 (``2**64 - 1`` twice: an empty chunk, read as the array's fill value), then the crc32c of the index
  (little-endian uint32), the Zarr v3 sharding codec with ``index_location = "end"``;
- an inner chunk is its compressor's frame (``zstd`` or ``blosc`` lz4; none) around, for a byte column, one
  row's ``vlen-bytes`` item (numcodecs ``VLenBytes``: item count 1, the length, the bytes), for ``seq_id`` the
  shard's ids (``bytes``, little-endian).

The tests read and write every unit both ways, through zarr and through this module, and compare.
"""

from __future__ import annotations

import functools

import google_crc32c
import numpy as np
import zstandard
from numcodecs import Blosc, Zstd

from ...errors import CorruptShardError
from .zstd_context import decompressor

__all__ = ["byte_rows", "byte_rows_shard", "inner_chunks", "seq_ids", "seq_ids_shard", "writes"]

MISSING = 2**64 - 1  # an index entry's offset and size for a chunk that was not written
_NUMCODECS = {"zstd": Zstd(), "lz4": Blosc()}  # spec.compression -> the inner chunks' codec, as zarr decodes them
_VLEN_ONE = (1).to_bytes(4, "little")  # a vlen-bytes chunk's item count: one row


def inner_chunks(data: bytes | memoryview, chunks: int, where: str) -> list[memoryview | None]:
    """The ``chunks`` inner chunks of one shard (None: empty), their index checked (size, crc32c, bounds).
    ``where`` names the shard in the errors."""
    data = memoryview(data).cast("B")
    index_size = 16 * chunks + 4
    if len(data) < index_size:
        raise CorruptShardError(f"{where} holds {len(data)} bytes; its shard index alone takes {index_size}")
    body, index, crc = len(data) - index_size, data[-index_size:-4], data[-4:]
    if google_crc32c.value(bytes(index)) != int.from_bytes(crc, "little"):
        raise CorruptShardError(f"{where}: its shard index fails its crc32c checksum")
    out: list[memoryview | None] = []
    for i, (offset, nbytes) in enumerate(np.frombuffer(index, dtype="<u8").reshape(chunks, 2).tolist()):
        if offset == nbytes == MISSING:
            out.append(None)
        elif offset + nbytes > body:
            raise CorruptShardError(f"{where}: inner chunk {i} spans bytes {offset}..{offset + nbytes}; the chunks "
                                    f"end at byte {body}")
        else:
            out.append(data[offset:offset + nbytes])
    return out


def _decompressed(chunk: memoryview, compression: str, where: str, i: int) -> bytes | memoryview:
    """An inner chunk's bytes. zstd frames go through this thread's reused decompression context (numcodecs makes one
    per call, which costs ~4x the decompression of a row's frame); a frame that does not record its size, which
    zstandard's one-shot call refuses, goes to numcodecs as zarr would."""
    if compression == "none":
        return chunk
    if compression == "zstd":
        try:
            return decompressor().decompress(chunk)
        except zstandard.ZstdError:
            pass  # numcodecs decodes a frame without its size, and words the error on a damaged one
    try:
        return _NUMCODECS[compression].decode(chunk)
    except (RuntimeError, ValueError) as exc:  # numcodecs' errors on a damaged frame
        raise CorruptShardError(f"{where}: inner chunk {i} does not decompress ({compression}: {exc})") from None


def _vlen_item(raw: bytes | memoryview, where: str, i: int) -> bytes:
    """The one item of a ``vlen-bytes`` chunk: uint32 item count (1), uint32 length, the bytes (little-endian)."""
    raw = memoryview(raw).cast("B")
    count = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else -1
    size = int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else -1
    if count != 1 or 8 + size != len(raw):
        raise CorruptShardError(f"{where}: inner chunk {i} is not one vlen-bytes item ({len(raw)} bytes, "
                                f"header {bytes(raw[:8]).hex()}: 1 item of {len(raw) - 8} bytes expected)")
    return bytes(raw[8:])


def byte_rows(data: bytes | memoryview, rows: int, chunks: int, compression: str, where: str) -> list[bytes]:
    """The first ``rows`` rows of a byte column's shard of ``chunks`` one-row inner chunks (empty: ``b""``)."""
    return [b"" if chunk is None else _vlen_item(_decompressed(chunk, compression, where, i), where, i)
            for i, chunk in enumerate(inner_chunks(data, chunks, where)[:rows])]


def seq_ids(data: bytes | memoryview, rows: int, shard_rows: int, compression: str, where: str) -> np.ndarray:
    """``uint64[rows]``: the first ``rows`` ids of the ``seq_id`` shard (one inner chunk of ``shard_rows``)."""
    rows = min(rows, shard_rows)  # a record claiming more rows than a shard holds is refused by the caller
    (chunk,) = inner_chunks(data, 1, where)
    if chunk is None:
        return np.zeros(rows, dtype=np.uint64)  # the array's fill value
    raw = _decompressed(chunk, compression, where, 0)
    if len(raw) != 8 * shard_rows:
        raise CorruptShardError(f"{where}: its ids take {len(raw)} bytes; {8 * shard_rows} expected "
                                f"({shard_rows} uint64)")
    return np.frombuffer(raw, dtype="<u8", count=rows).astype(np.uint64)


def writes(compression: str) -> bool:
    """Whether :func:`byte_rows_shard` and :func:`seq_ids_shard` write this compression's shards (zstd, none): zarr's
    blosc codec tunes its parameters to each array's dtype, so blosc shards are left to zarr to write."""
    return compression in ("zstd", "none")


@functools.lru_cache(maxsize=None)
def _zstd(level: int) -> Zstd:
    return Zstd(level=level, checksum=False)  # what zarr's ZstdCodec(level) builds (its checksum defaults to False)


def _compressed(raw: bytes, compression: str, level: int) -> bytes:
    """An inner chunk's bytes as zarr's codec writes them: numcodecs ``Zstd(level, checksum=False)``, or raw."""
    return raw if compression == "none" else _zstd(level).encode(raw)


def _shard(chunks: list[bytes | None]) -> bytes:
    """Inner chunks (None: not written) in order, then the index and its crc32c (zarr's ``_encode_shard_dict``)."""
    index = np.full((len(chunks), 2), MISSING, dtype="<u8")
    start = 0
    for i, chunk in enumerate(chunks):
        if chunk:
            index[i] = start, len(chunk)
            start += len(chunk)
    table = index.tobytes()
    return b"".join(c for c in chunks if c) + table + np.uint32(google_crc32c.value(table)).astype("<u4").tobytes()


def byte_rows_shard(rows: list[bytes], chunks: int, compression: str, level: int) -> bytes:
    """A byte column's shard of ``chunks`` one-row inner chunks holding ``rows`` (the rest not written)."""
    encoded = [_compressed(_VLEN_ONE + len(row).to_bytes(4, "little") + row, compression, level) for row in rows]
    return _shard(encoded + [None] * (chunks - len(rows)))


def seq_ids_shard(ids: np.ndarray, shard_rows: int, compression: str, level: int) -> bytes:
    """The ``seq_id`` shard: one inner chunk of ``shard_rows`` little-endian uint64, 0 (the fill value) past ``ids``."""
    raw = np.zeros(shard_rows, dtype="<u8")
    raw[:len(ids)] = ids
    return _shard([_compressed(raw.tobytes(), compression, level)])

"""``logitcache convert``: re-encode a finished store into another format or encoding, one unit at a time.

Memory stays constant (one unit decoded at a time); the destination is written through the same
exactly-once commit path as a capture, so an interrupted conversion resumes. The layout (a ``documents``
store's train masks, a generated store's finish reasons) and the realized-token log-probabilities are kept. Afterwards every sequence of the two stores
is compared: equal for lossless targets, and within the documented error of the destination's logprob codec otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .writer import encode_unit
from ..errors import ConfigError, StoreError
from .encoding import Encoding, q8_bound
from .finish import finish_code, row_finish
from .fs import StoreFS
from .manifest import Manifest, ManifestHeader, StoreSection
from .commit import begin_store, commit_unit, finalize_store, read_manifest
from .lock import StoreLock
from .reader import decode_rows, iter_sequences, read_unit
from .spec import spec_from_manifest
from .containers import get_container
from ..targets import SparseTargets


@dataclass(frozen=True)
class ConvertSummary:
    source: str
    destination: str
    units: int
    sequences: int
    source_bytes: int
    destination_bytes: int
    max_prob_error: float


def _token_order(fs: StoreFS, vocab_size: int) -> tuple[int, ...]:
    """The rank-delta order from the store's own tokens (streamed), for sources that have none."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _, tokens, _ in iter_sequences(fs):
        counts += np.bincount(tokens.astype(np.int64), minlength=vocab_size)[:vocab_size]
    seen = np.flatnonzero(counts)
    return tuple(seen[np.lexsort((seen, -counts[seen]))].tolist())


def destination_header(src_fs: StoreFS, manifest: Manifest, *, format: str | None, ids: str | None,
                       logprob_dtype: str | None, compression: str | None,
                       compression_level: int | None, entropy: str | None = None) -> ManifestHeader:
    """The source's header with the store re-encoded as asked (``None`` keeps the source's setting)."""
    header = manifest.header
    src_enc = header.store.encoding
    new_ids = src_enc.ids if ids in (None, "auto") else ids
    order = src_enc.order
    if new_ids == "rank-delta" and not order:
        order = _token_order(src_fs, src_enc.vocab_size)
    enc = Encoding(ids=new_ids, logprobs=logprob_dtype or src_enc.logprobs, vocab_size=src_enc.vocab_size,
                   order=order if new_ids == "rank-delta" else (), entropy=entropy or src_enc.entropy,
                   label_logprobs=src_enc.label_logprobs,  # kept: only the teacher could add them
                   sample_totals=src_enc.sample_totals)
    if src_enc.logprobs != "float32" and enc.logprobs != src_enc.logprobs:
        raise ConfigError(f"the source stores {src_enc.logprobs} logprobs; converting them to {enc.logprobs} "
                          "would compound two lossy steps. Convert from a float32 store instead.")
    store = StoreSection(format=format or header.store.format, compression=compression or header.store.compression,
                         compression_level=compression_level or header.store.compression_level, encoding=enc)
    given = {"format": format, "ids": ids, "logprob_dtype": logprob_dtype, "compression": compression,
             "compression_level": compression_level, "entropy": entropy}
    return header.converted(store, {k: v for k, v in given.items() if v is not None})


def convert(src: str, dst: str, *, format: str | None = None, ids: str | None = None,
            logprob_dtype: str | None = None, compression: str | None = None, compression_level: int | None = None,
            entropy: str | None = None, overwrite: bool = False) -> ConvertSummary:
    """Re-encode the finished store ``src`` into ``dst``; resumable; verified equal afterwards."""
    src_fs, dst_fs = StoreFS(src), StoreFS(dst)
    if src_fs.url == dst_fs.url:
        raise ConfigError(f"source and destination are the same store ({src}); choose another destination")
    manifest = read_manifest(src_fs)
    records = manifest.shards
    if not manifest.complete:
        raise StoreError(f"store {src} is incomplete ({len(records)} of {manifest.header.plan.shards} units); "
                         "resume its capture first, then convert")
    src_spec = spec_from_manifest(manifest.header)
    header = destination_header(src_fs, manifest, format=format, ids=ids, logprob_dtype=logprob_dtype,
                                compression=compression, compression_level=compression_level, entropy=entropy)
    spec = spec_from_manifest(header)
    with StoreLock(dst_fs):
        done = {r.index: r for r in begin_store(dst_fs, header, get_container(spec.format).static_objects(spec),
                                                overwrite=overwrite)}
        out = list(done.values())
        for record in records:
            if record.index in done:
                continue
            unit = read_unit(src_fs, src_spec, record)
            rows = list(decode_rows(src_spec, unit, with_mask=True))
            finish = [finish_code(*row_finish(unit.row(r))) for r in range(len(unit))] if spec.generated else None
            new_record, objects = encode_unit(spec, record.index, [r[0] for r in rows], [r[1] for r in rows],
                                              [r[3] for r in rows], [r[2] for r in rows] if spec.masked else None,
                                              finish)
            commit_unit(dst_fs, new_record, objects)
            out.append(new_record)
        final = finalize_store(dst_fs, header, out)
    error = compare_stores(src_fs, dst_fs, spec.encoding)
    dst_bytes = sum(r.bytes for r in final.shards)
    return ConvertSummary(src_fs.url, dst_fs.url, len(records), sum(r.sequences for r in records),
                          sum(r.bytes for r in records), dst_bytes, error)


def compare_stores(a: StoreFS, b: StoreFS, b_encoding: Encoding) -> float:
    """Raise StoreError at the first sequence where ``b`` differs from ``a`` beyond ``b``'s codec error;
    returns the largest probability error seen."""
    worst = 0.0
    for (sa, ta, ma, xa), (sb, tb, mb, xb) in zip(iter_sequences(a, with_mask=True), iter_sequences(b, with_mask=True),
                                                  strict=True):
        if sa != sb or not np.array_equal(ta, tb):
            raise StoreError(f"converted store differs at sequence {sa}: seq ids or tokens differ")
        if (ma is None) != (mb is None) or (ma is not None and not np.array_equal(ma, mb)):
            raise StoreError(f"converted store differs at sequence {sa}: train masks differ")
        worst = max(worst, _compare_targets(sa, xa, xb, b_encoding))
    return worst


def _compare_targets(seq_id: int, a: SparseTargets, b: SparseTargets, b_encoding: Encoding) -> float:
    logprobs = b_encoding.logprobs
    if a.tail_mass is not None:  # exact, or within float16 rounding (half an ulp: relative 2^-11)
        half_ulp = (torch.clamp(a.tail_mass.double().abs() * 2.0 ** -11, min=2.0 ** -25)
                    if b_encoding.tail_dtype == "<f2" else torch.zeros_like(a.tail_mass, dtype=torch.float64))
        if bool(((a.tail_mass.double() - b.tail_mass.double()).abs() > half_ulp).any()):
            raise StoreError(f"converted store differs at sequence {seq_id} in tail_mass")
    for name in ("sample_lengths", "sample_ids", "sample_counts", "sample_weights", "label_logprobs",
                 "sample_totals"):  # lossless
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            raise StoreError(f"converted store differs at sequence {seq_id} in {name}")
    if a.head_ids is None:
        return 0.0
    order_a = torch.argsort(a.head_ids.long(), dim=1)
    order_b = torch.argsort(b.head_ids.long(), dim=1)
    ids_a, ids_b = a.head_ids.gather(1, order_a), b.head_ids.gather(1, order_b)
    if not torch.equal(ids_a, ids_b):
        raise StoreError(f"converted store differs at sequence {seq_id} in head_ids")
    pa_, pb = a.head_logprobs.gather(1, order_a).double().exp(), b.head_logprobs.gather(1, order_b).double().exp()
    err = (pa_ - pb).abs()
    lp_a = a.head_logprobs.gather(1, order_a).double()
    bound = {"float32": torch.zeros_like(pa_), "float16": pa_ * torch.expm1(lp_a.abs() * 2.0 ** -11),
             "q8": torch.from_numpy(np.asarray(q8_bound(pa_.numpy())))}[logprobs]
    if bool((err > bound + 1e-12).any()):
        raise StoreError(f"converted store differs at sequence {seq_id}: head probability error "
                         f"{float(err.max()):.3g} exceeds the {logprobs} bound")
    return float(err.max()) if err.numel() else 0.0

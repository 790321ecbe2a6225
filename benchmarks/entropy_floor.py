"""How far the v2 encoding is from the entropy of what it stores (storage targets of issue #4).

For a captured store (lossless; ``topk`` or ``sample``; for ``hybrid`` only its sample part is
modelled) this prints, in bytes per position:

- each encoded column after zstd-9 and zstd-19, as the Arrow container compresses them (per unit);
- empirical entropies of the same symbols: an ideal order-0 coder per stream (what zstd's Huffman
  stage approaches), and conditional entropies that only an adaptive context-model coder (rANS or
  arithmetic coding with contexts) could realise:

  * id gaps: ``H(gamma symbol)`` + mantissa bits (the mantissas are ~uniform, so raw bits are their
    entropy);
  * sample counts: ``H(count)``, ``H(count | position length, gap symbol)``;
  * q8 head codes: ``H(q)``, ``H(q | position's smallest code, gap symbol)`` + the smallest codes.

Entropies are measured on the data they describe (no model cost), so they are optimistic floors.

    python benchmarks/entropy_floor.py cache/sample-50 cache/topk-64
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from numcodecs import Zstd

from logitcache.store import read_manifest
from logitcache.store.bits import bit_length
from logitcache.store.encoding import Q8_LEVELS, Encoding, encode_row
from logitcache.store.reader import iter_sequences
from logitcache.store.spec import spec_from_manifest


def entropy(*streams: np.ndarray) -> float:
    """Empirical joint entropy in bits per symbol of equally long integer streams."""
    key = np.zeros(streams[0].size, dtype=np.int64)
    for s in streams:
        key = key * (int(s.max()) + 1) + s
    _, counts = np.unique(key, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional(x: np.ndarray, *given: np.ndarray) -> float:
    return entropy(x, *given) - entropy(*given)


def entries(enc: Encoding, rows) -> dict[str, np.ndarray]:
    """Per stored (non-label) entry, in encoder order: gap, value (count−1 or q8 code) and contexts."""
    out = defaultdict(list)
    for _, tokens, t in rows:
        labels = tokens[1:].astype(np.int64)
        if t.head_ids is not None and t.sample_ids is None:
            ids = t.head_ids.numpy().astype(np.int64)
            q = np.clip(np.rint(Q8_LEVELS * np.exp(0.5 * t.head_logprobs.double().numpy())), 0, Q8_LEVELS)
            q = q.astype(np.int64)
            ctx = np.repeat(q.min(1), ids.shape[1])  # the position's smallest code (stored once per position)
            out["qmin"].append(q.min(1))
            seg = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
            ids, value = ids.reshape(-1), q.reshape(-1)
        else:
            lengths = t.sample_lengths.numpy().astype(np.int64)
            ids = t.sample_ids.numpy().astype(np.int64)
            seg = np.repeat(np.arange(lengths.size), lengths)
            value, ctx = t.sample_counts.numpy().astype(np.int64) - 1, np.minimum(lengths, 255)[seg]
        keep = ids != labels[seg]
        ranks, seg, value, ctx = enc._rank[ids[keep]], seg[keep], value[keep], ctx[keep]
        order = np.argsort(seg * enc.vocab_size + ranks, kind="stable")
        ranks, seg, value, ctx = ranks[order], seg[order], value[order], ctx[order]
        gaps = ranks.copy()
        same = np.r_[False, seg[1:] == seg[:-1]]
        gaps[same] = ranks[same] - ranks[np.flatnonzero(same) - 1]
        for name, a in (("gap", gaps), ("value", value), ("ctx", ctx)):
            out[name].append(a)
    return {k: np.concatenate(v) for k, v in out.items()}


def report(path: str) -> None:
    manifest = read_manifest(path)
    spec = spec_from_manifest(manifest)
    enc = spec.encoding
    rows = list(iter_sequences(path))
    positions = sum(r[2].num_positions for r in rows)
    per = spec.sequences_per_shard
    q8 = Encoding(ids=enc.ids, logprobs="q8", vocab_size=enc.vocab_size, order=enc.order)
    columns = defaultdict(list)
    for _, tokens, t in rows:
        for name, blob in encode_row(q8 if spec.has_head else enc, tokens, t).columns.items():
            columns[name].append(blob)

    def zstd(parts: list[bytes], level: int) -> float:
        return sum(len(Zstd(level=level).encode(b"".join(parts[i:i + per]))) for i in range(0, len(parts), per))

    print(f"\n{path}: {manifest['method']} {manifest['params']}, {positions} positions"
          + (" (head written as q8)" if spec.has_head else ""))
    total9 = total19 = 0.0
    for name, parts in columns.items():
        z9, z19 = zstd(parts, 9) / positions, zstd(parts, 19) / positions
        total9, total19 = total9 + z9, total19 + z19
        print(f"  {name:15s} zstd-9 {z9:7.2f}   zstd-19 {z19:7.2f}")
    print(f"  {'all columns':15s} zstd-9 {total9:7.2f}   zstd-19 {total19:7.2f}")
    e = entries(enc, rows)
    f = e["gap"].size / 8 / positions  # bits per entry -> bytes per position
    sym = bit_length(e["gap"])
    ids0 = (entropy(sym) + np.maximum(sym - 1, 0).mean()) * f
    value0 = entropy(e["value"]) * f
    value_ctx = conditional(e["value"], e["ctx"], sym) * f
    print(f"  ids, order-0 floor (H(gamma symbol) + mantissa bits)      {ids0:7.2f}")
    what = "q8 codes" if "qmin" in e else "counts"
    print(f"  {what}, order-0 floor                                  {value0:7.2f}")
    extra = 0.0
    if "qmin" in e:
        extra = entropy(e["qmin"]) * e["qmin"].size / 8 / positions
    print(f"  {what} given (position context, gap symbol) + context {value_ctx + extra:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="lossless stores captured with logitcache")
    for path in ap.parse_args().stores:
        report(path)


if __name__ == "__main__":
    main()

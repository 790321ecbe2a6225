"""How far the v2 encoding is from the entropy of what it stores (storage targets of issue #4).

For a captured store (lossless, rank-delta ids; ``topk`` or ``sample``, and for ``hybrid`` its
head) this prints, in bytes per position:

- each encoded column after zstd-9 and zstd-19, as the Arrow container compresses them (per unit);
- empirical entropies of the same symbols: an ideal order-0 coder per stream (what zstd's Huffman
  stage approaches), and conditional entropies that only an adaptive context-model coder (rANS or
  arithmetic coding with contexts) could realise:

  * id gaps: ``H(gamma symbol)`` + mantissa bits (the mantissas are ~uniform, so raw bits are their
    entropy);
  * sample counts: ``H(count)``, ``H(count | position length, gap symbol)``;
  * q8 head codes: ``H(q)``, ``H(q | position's smallest code, gap symbol)`` + the smallest codes.

Entropies are measured on the data they describe (no model cost), so they are optimistic floors.
Then what the ``ans`` entropy stage (``--entropy ans``) spends per stream on the same rows: the
cost of each symbol under its unit's fitted table, plus the tables themselves.

    python benchmarks/entropy_floor.py cache/sample-50 cache/topk-64
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

import numpy as np
from numcodecs import Zstd

from logitcache.store import read_manifest
from logitcache.store.bits import bit_length, unpack_gamma_split
from logitcache.store.encoding import Encoding, _count_dtype, encode_row
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


def entries(columns: dict[str, list[bytes]], k: int, num_samples: int) -> dict[str, np.ndarray]:
    """Per stored non-label entry, from the encoder's own columns (so exactly what is written):
    ``gap`` (decoded gamma stream), ``value`` (q8 code or count−1) and ``ctx`` (the position's
    smallest code, or its number of distinct ids), plus ``qmin`` per position for a head."""
    out = defaultdict(list)
    head = "head_ids" in columns
    prefix = "head" if head else "sample"
    for r in range(len(columns["tokens"])):
        col = {name: np.frombuffer(parts[r], np.uint8) for name, parts in columns.items()}
        positions = col["tokens"].size // 4 - 1
        flags = np.unpackbits(col[f"{prefix}_label"])[:positions].astype(bool)
        if head:
            rest = k - flags.astype(np.int64)
            q = col["head_logprobs"].astype(np.int64).reshape(positions, k)  # label's code first if flagged
            value = q[np.arange(k) >= flags[:, None]]
            ctx = np.repeat(q.min(1), rest)
            out["qmin"].append(q.min(1))
        else:
            rest = col["sample_lengths"].view(_count_dtype(num_samples)).astype(np.int64)
            value = col["sample_counts"].view(_count_dtype(num_samples)).astype(np.int64)
            ctx = np.repeat(rest + flags, rest)
        symbols = col[f"{prefix}_ids"]
        gaps = unpack_gamma_split(symbols, col[f"{prefix}_id_bits"], symbols.size)
        for name, a in (("gap", gaps), ("value", value), ("ctx", ctx)):
            out[name].append(a)
    return {name: np.concatenate(v) for name, v in out.items()}


def report(path: str) -> None:
    header = read_manifest(path).header
    spec = spec_from_manifest(header)
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

    print(f"\n{path}: {header.method} {header.params}, {positions} positions"
          + (" (head written as q8)" if spec.has_head else ""))
    total9 = total19 = 0.0
    for name, parts in columns.items():
        z9, z19 = zstd(parts, 9) / positions, zstd(parts, 19) / positions
        total9, total19 = total9 + z9, total19 + z19
        print(f"  {name:15s} zstd-9 {z9:7.2f}   zstd-19 {z19:7.2f}")
    print(f"  {'all columns':15s} zstd-9 {total9:7.2f}   zstd-19 {total19:7.2f}")
    if enc.ids != "rank-delta":
        raise SystemExit(f"{path}: ids are {enc.ids!r}; the gap analysis needs a rank-delta store")
    e = entries(columns, spec.k, spec.num_samples)
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
    ans_spec = dataclasses.replace(spec, encoding=dataclasses.replace(
        q8 if spec.has_head else enc, entropy="ans"))
    for name, (coded, tables) in ans_costs(ans_spec, columns, per).items():
        print(f"  ans stage: {name:15s} {coded / positions:7.2f}   its tables {tables / positions:5.2f}")


def ans_costs(spec, columns: dict[str, list[bytes]], per: int) -> dict[str, tuple[float, float]]:
    """Bytes per stream under the ``ans`` stage's fitted tables (ideal rANS cost), and table bytes."""
    from logitcache.store.entropy import fit_unit
    from logitcache.store.rans import M, pack_tables

    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    names = list(columns)
    count = len(columns[names[0]])
    for start in range(0, count, per):
        rows = [{n: columns[n][i] for n in names} for i in range(start, min(start + per, count))]
        segments, tables = fit_unit(spec, rows)
        for name, sym, ctx in segments:
            out[name][0] += float(-np.log2(tables[name].freq[ctx, sym] / M).sum() / 8)
        for name, table in tables.items():
            out[name][1] += len(pack_tables([table]))
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="lossless stores captured with logitcache")
    for path in ap.parse_args().stores:
        report(path)


if __name__ == "__main__":
    main()

"""Compact, versioned row encodings shared by every store backend (docs/format.md, "Encoding").

A row (one sequence of ``T`` positions) becomes a few byte columns; backends only store bytes.
Lossless unless ``logprobs="float16"`` or ``"q8"`` is chosen (opt-in; the error is measured and
recorded). Ideas, each measured on real SmolLM2 targets in benchmarks/storage.py:

- **Masked rows** (the ``documents`` layout): a ``train_mask`` column (one bit per position) and
  targets only at the positions it marks, so a row of ``L`` tokens holds ``mask.sum()`` positions.
- **Label first.** The store holds the tokens anyway, so when the next token (the label) is among
  a position's entries, one flag bit replaces its id, and for samples its count is implied
  (counts sum to ``N``). Other entries follow in the id codec's order.
- **Ids** (``ids``): ``"rank-delta"`` (default) maps ids to ranks by corpus frequency (the order
  is stored once in the manifest; ids the corpus never used follow by id), sorts each position's
  ranks and writes the gaps with a gamma code (:mod:`logitcache.store.bits`); ``"packed"`` writes
  each id in ``bit_length(V - 1)`` bits (17 for vocabularies up to 131072, wider beyond). Ids
  ``>= V`` are refused, never truncated.
- **Counts** as ``count - 1`` in one byte while ``N <= 256`` (else two): bytes, not bits, so the
  entropy coder sees whole symbols (measured: 6-bit packing is ~3x larger after zstd).
- **Log-probabilities** (``logprobs``): ``float32``; ``float16``; or ``q8``, one byte per entry
  holding ``q = round(255 * sqrt(p))`` (decoded ``p = (q / 255)^2``, and ``(0.25 / 255)^2`` for
  ``q = 0`` so no stored logprob is −inf). The error is absolute in probability, which is what a
  KD gradient ``p_student − t`` sees: ``|Δp| <= sqrt(p) / 255 + 1 / 510^2`` per entry, so at most
  ``sqrt(k) / 255 + k / 510^2`` summed over a head of ``k`` (Cauchy–Schwarz). Small probabilities
  get few distinct codes, which the entropy coder exploits.
- Float streams (float32/float16 logprobs, tail mass, importance weights) are stored as byte
  planes (BYTE_STREAM_SPLIT), which zstd compresses far better than interleaved floats.
- **Entropy stage** (``entropy``): ``"zstd"`` leaves every column to the container's zstd
  (encoding version 2); ``"ans"`` (version 3) codes a unit's gap lengths, counts, lengths and q8
  codes with context-modelled rANS (:mod:`logitcache.store.entropy`), and stores ``tail_mass``
  as float16 when the logprobs are lossy (its error joins the recorded ``max_prob_error``).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..choices import ENTROPY_CODECS, ID_CODECS, LOGPROB_DTYPES
from ..errors import ConfigError, CorruptShardError, TargetsError
from ..targets import SparseTargets
from .bits import gamma_split, pack_fixed
from .finish import finish_column
from .streams import HeadStreams, RowStreams, SampleStreams, check_id_range
from .planes import LABEL_COLUMN, encode_labels, split as _split, unsplit as _unsplit, view as _view
from .totals import TOTALS_COLUMN, checked_totals, count_dtype as _count_dtype, misplaced_sums

ENCODING_VERSIONS = {"zstd": 2, "ans": 3}  # the encoding version each entropy stage writes
LABELS_VERSION = 4  # what either stage writes when rows carry label_logprob (older readers then refuse the store)
TOTALS_VERSION = 5  # what an adaptive-budget store writes (rows carry sample_totals; label_logprob or not)
# what a capture with ids="auto" uses: the smaller for every method on SmolLM2 (benchmarks/storage.py)
DEFAULT_ID_CODEC = "rank-delta"
LOGPROB_CODECS = LOGPROB_DTYPES
Q8_LEVELS = 255
Q8_ZERO = (0.25 / Q8_LEVELS) ** 2  # decoded probability of code 0


def q8_bound(p: np.ndarray | float) -> np.ndarray | float:
    """The documented per-entry bound on ``|Δp|`` of the ``q8`` codec."""
    return np.sqrt(p) / Q8_LEVELS + 1.0 / (2 * Q8_LEVELS) ** 2


@dataclass(frozen=True)
class Encoding:
    """How rows are encoded: id and logprob codecs, the vocabulary size and the rank order."""

    ids: str = "rank-delta"
    logprobs: str = "float32"
    vocab_size: int = 0
    order: tuple[int, ...] = ()  # ids by descending corpus frequency (rank-delta only)
    entropy: str = "zstd"
    label_logprobs: bool = False  # rows carry label_logprob: the exact log-probability of each label
    sample_totals: bool = False  # rows carry sample_totals: each position's own number of draws (adaptive budget)
    _rank: np.ndarray = field(default=None, repr=False, compare=False)
    _unrank: np.ndarray = field(default=None, repr=False, compare=False)
    _order_text: str | None = field(default=None, init=False, repr=False, compare=False)  # see order_text()

    def __post_init__(self) -> None:
        if self.ids not in ID_CODECS:
            raise ConfigError(f"id encoding must be one of {', '.join(ID_CODECS)}; found {self.ids!r}")
        if self.logprobs not in LOGPROB_CODECS:
            raise ConfigError(f"logprob encoding must be one of {', '.join(LOGPROB_CODECS)}; found {self.logprobs!r}")
        if self.entropy not in ENTROPY_CODECS:
            raise ConfigError(f"entropy stage must be one of {', '.join(ENTROPY_CODECS)}; found {self.entropy!r}")
        if self.ids == "rank-delta":
            unrank = np.asarray(self.order, dtype=np.int64)
            seen = np.zeros(self.vocab_size, dtype=bool)
            seen[unrank] = True
            unrank = np.concatenate([unrank, np.flatnonzero(~seen)])
            rank = np.empty(self.vocab_size, dtype=np.int64)
            rank[unrank] = np.arange(self.vocab_size)
            object.__setattr__(self, "_rank", rank)
            object.__setattr__(self, "_unrank", unrank)

    @property
    def lossless(self) -> bool:
        return self.logprobs == "float32"

    @property
    def tail_dtype(self) -> str:
        """float32, or float16 for lossy logprobs under the ``ans`` stage (version 3)."""
        return "<f2" if self.entropy == "ans" and not self.lossless else "<f4"

    @property
    def id_width(self) -> int:
        return max(1, (self.vocab_size - 1).bit_length())

    def order_text(self) -> str:
        """``order`` as the manifest's ``vocab_order`` holds it (base64 of the zlib-9 of its ``<u4`` bytes), kept
        as it was read, or as first written. Another zlib build (zlib-ng, another version) writes other, equally
        valid bytes for the same order, and the header digest that binds every unit covers this text: a store
        re-serialised with the reader's own zlib would not match its units."""
        if self._order_text is None:
            blob = np.asarray(self.order, dtype="<u4").tobytes()
            object.__setattr__(self, "_order_text", base64.b64encode(zlib.compress(blob, 9)).decode())
        return self._order_text

    def to_manifest(self) -> dict[str, Any]:
        out = {"version": _version(self.entropy, self.label_logprobs, self.sample_totals), "ids": self.ids,
               "logprobs": self.logprobs, "vocab_size": self.vocab_size,
               "vocab_order": self.order_text() if self.ids == "rank-delta" else None}
        out = out if self.entropy == "zstd" else {**out, "entropy": self.entropy}
        out = {**out, "label_logprobs": True} if self.label_logprobs else out
        return {**out, TOTALS_COLUMN: True} if self.sample_totals else out

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> Encoding:
        entropy, labels = d.get("entropy", "zstd"), d.get("label_logprobs", False) is True
        totals = d.get(TOTALS_COLUMN, False) is True
        if entropy not in ENCODING_VERSIONS or d.get("version") != _version(entropy, labels, totals):
            raise CorruptShardError(f"store encoding version {d.get('version')!r} (entropy {entropy!r}, label_logprobs "
                                    f"{labels}, sample_totals {totals}); this logitcache reads version 2 (zstd), 3 "
                                    f"(ans) and {LABELS_VERSION} (either, with label_logprobs), and {TOTALS_VERSION} "
                                    "(any of those, with sample_totals). Upgrade logitcache or recapture.")
        order: tuple[int, ...] = ()
        if d["ids"] == "rank-delta":
            order = tuple(np.frombuffer(zlib.decompress(base64.b64decode(d["vocab_order"])), dtype="<u4").tolist())
        enc = cls(ids=d["ids"], logprobs=d["logprobs"], vocab_size=int(d["vocab_size"]), order=order, entropy=entropy,
                  label_logprobs=labels, sample_totals=totals)
        if d["ids"] == "rank-delta":
            object.__setattr__(enc, "_order_text", d["vocab_order"])  # the text read, not this machine's zlib's
        return enc


def _version(entropy: str, labels: bool, totals: bool) -> int:
    """The encoding version rows of these options are written as (older readers refuse newer columns)."""
    return TOTALS_VERSION if totals else LABELS_VERSION if labels else ENCODING_VERSIONS[entropy]


def corpus_order(tokens: np.ndarray, vocab_size: int) -> tuple[int, ...]:
    """Ids that occur in ``tokens``, by descending count, ties by id: the rank-delta order."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    seen = np.flatnonzero(counts)
    return tuple(seen[np.lexsort((seen, -counts[seen]))].tolist())


# ---------------------------------------------------------------- ids

def _encode_ids(enc: Encoding, ids: np.ndarray, seg: np.ndarray) -> tuple[bytes, bytes, np.ndarray]:
    """Ids of several positions (``seg`` = position of each, non-decreasing) →
    (symbol bytes, packed bits, order used). ``packed`` has no symbols."""
    check_id_range((int(ids.min()), int(ids.max())) if ids.size else None, enc.vocab_size)
    if enc.ids == "packed":
        order = _by_position_then(seg, ids, enc.vocab_size)
        return b"", pack_fixed(ids[order], enc.id_width), order
    ranks = enc._rank[ids]
    order = _by_position_then(seg, ranks, enc.vocab_size)
    r, s = ranks[order], seg[order]
    gaps = r.copy()
    same = np.zeros(s.size, dtype=bool)  # the entry follows one of its own position
    same[1:] = s[1:] == s[:-1]
    gaps[same] = r[same] - r[np.flatnonzero(same) - 1]
    symbols, bits = gamma_split(gaps)
    return symbols, bits, order


def _by_position_then(seg: np.ndarray, key: np.ndarray, size: int) -> np.ndarray:
    """The order sorting entries by position, then by ``key`` (in ``[0, size)``): what
    ``np.lexsort((key, seg))`` gives, ~7x faster as one stable sort of a combined int64 key."""
    return np.argsort(seg.astype(np.int64) * size + key, kind="stable")


# ---------------------------------------------------------------- logprobs

def _encode_logprobs(enc: Encoding, lp: np.ndarray) -> tuple[bytes, float, float]:
    """(blob, max |Δ logp| over entries with p >= 1e-3, max |Δ p| over all entries)."""
    lp = lp.astype(np.float32)
    if enc.logprobs == "float32":
        return _split(lp, "<f4"), 0.0, 0.0
    if enc.logprobs == "float16":
        stored = np.frombuffer(_split(lp.astype("<f2"), "<f2"), np.uint8)
    else:
        stored = np.clip(np.rint(Q8_LEVELS * np.exp(0.5 * lp.astype(np.float64))), 0, Q8_LEVELS).astype(np.uint8)
    back = _decode_logprobs(enc, np.frombuffer(stored.tobytes(), np.uint8), lp.size).astype(np.float64)
    p, p_back = np.exp(lp.astype(np.float64)), np.exp(back)
    big = p >= 1e-3
    lp_err = float(np.abs(back[big] - lp[big]).max()) if big.any() else 0.0
    p_err = float(np.abs(p_back - p).max()) if lp.size else 0.0
    return stored.tobytes(), lp_err, p_err


def _decode_logprobs(enc: Encoding, data: np.ndarray, count: int) -> np.ndarray:
    if enc.logprobs == "float32":
        return _unsplit(data, "<f4", count).astype(np.float32)
    if enc.logprobs == "float16":
        return _unsplit(data, "<f2", count).astype(np.float32)
    return Q8_LOGPROBS[_view(data, "u1", count)]


def _q8_logprobs() -> np.ndarray:
    """The log-probability of each q8 code (float32[256]): ``log((q / 255)^2)``, code 0 ``log(Q8_ZERO)``."""
    q = np.arange(Q8_LEVELS + 1, dtype=np.float64)
    return np.log(np.where(q > 0, (q / Q8_LEVELS) ** 2, Q8_ZERO)).astype(np.float32)


Q8_LOGPROBS = _q8_logprobs()  # decoding a code is one lookup


# ---------------------------------------------------------------- rows

@dataclass
class EncodedRow:
    columns: dict[str, bytes]
    logprob_error: float = 0.0  # max |Δ logp| over entries with p >= 1e-3
    prob_error: float = 0.0  # max |Δ p| over all entries


def row_columns(method: str, weighted: bool, masked: bool = False, generated: bool = False,
                labels: bool = False, totals: bool = False) -> list[str]:
    """Byte columns of a row for ``method`` (after ``seq_id``) as :func:`encode_row` writes them;
    ``masked`` rows (the ``documents`` layout) carry ``train_mask`` after ``tokens``, ``generated``
    rows (teacher-generated responses) a ``finish_reason`` after that, with ``totals``
    (``Encoding.sample_totals``) ``sample_totals`` follows ``sample_counts``, and with ``labels``
    (``Encoding.label_logprobs``) ``label_logprob`` comes last."""
    cols = ["tokens", "train_mask"] if masked else ["tokens"]
    cols += ["finish_reason"] if generated else []
    if method in ("topk", "hybrid", "full"):
        cols += ["head_label", "head_ids", "head_id_bits", "head_logprobs", "tail_mass"]
    if method in ("sample", "hybrid"):
        cols += ["sample_lengths", "sample_label", "sample_ids", "sample_id_bits", "sample_counts"]
        cols += [TOTALS_COLUMN] if totals else []
        if weighted:
            cols.append("sample_weights")
    return cols + ([LABEL_COLUMN] if labels else [])


def row_labels(tokens: np.ndarray, t: SparseTargets, mask: np.ndarray | None) -> np.ndarray:
    """The labels of a row's target positions (``tokens[1:]``, or those ``mask`` marks), checked against
    the targets' positions (TargetsError)."""
    labels = np.asarray(tokens, dtype=np.int64)[1:]
    if mask is not None:
        labels = labels[_checked_mask(mask, labels.size + 1)]
    if t.num_positions != labels.size:
        found = (f"the window has {labels.size} (tokens[1:]). Expected one target row per label position"
                 if mask is None else f"the train mask marks {labels.size} of the row's {len(tokens) - 1}. "
                 "Expected compact targets: one target row per trained position, in position order")
        raise TargetsError(f"targets cover {t.num_positions} positions; {found}.")
    return labels


def row_streams(enc: Encoding, labels: np.ndarray, t: SparseTargets) -> RowStreams:
    """The reference (numpy, one row) computation of :class:`RowStreams`."""
    head = sample = None
    num_positions = labels.size
    if t.head_ids is not None:
        ids = t.head_ids.numpy().astype(np.int64)
        lp = t.head_logprobs.float().numpy()
        k = ids.shape[1]
        is_label = ids == labels[:, None]
        flags = is_label.any(1)
        seg = np.repeat(np.arange(num_positions), k).reshape(num_positions, k)
        rest = ~is_label
        symbols, bits, order = _encode_ids(enc, ids[rest], seg[rest])
        lp_stream = np.concatenate([lp[is_label], lp[rest][order]])  # labels' in position order, then the rest
        lp_order = np.argsort(np.concatenate([np.flatnonzero(flags) * 2, seg[rest][order] * 2 + 1]), kind="stable")
        head = HeadStreams(flags, symbols, bits, lp_stream[lp_order])
    if t.sample_ids is not None:
        lengths = t.sample_lengths.numpy().astype(np.int64)
        ids = t.sample_ids.numpy().astype(np.int64)
        counts = t.sample_counts.numpy().astype(np.int64)
        seg = np.repeat(np.arange(num_positions), lengths)
        is_label = ids == labels[seg]
        flags = np.zeros(num_positions, dtype=bool)
        flags[seg[is_label]] = True
        rest = ~is_label
        symbols, bits, order = _encode_ids(enc, ids[rest], seg[rest])
        weights = None
        if t.sample_weights is not None:
            w = t.sample_weights.numpy().astype("<f4")
            w_order = np.argsort(np.concatenate([seg[is_label] * 2, seg[rest][order] * 2 + 1]), kind="stable")
            weights = np.concatenate([w[is_label], w[rest][order]])[w_order]
        sample = SampleStreams(flags, symbols, bits, counts[rest][order], weights)
    return RowStreams(head, sample)


def encode_row(enc: Encoding, tokens: np.ndarray, t: SparseTargets, mask: np.ndarray | None = None,
               finish: int | None = None, streams: RowStreams | None = None) -> EncodedRow:
    """Encode one sequence: ``tokens`` int[L] (labels are ``tokens[1:]``) and its targets, one per
    position; or, with ``mask`` bool[L - 1] (a masked row), targets only at the positions it marks
    (compact, in position order; their labels are ``tokens[1:][mask]``). ``finish``: a generated row's
    finish code (:mod:`logitcache.store.finish`). ``streams``: this row's :class:`RowStreams` when already
    computed (by :mod:`logitcache.store.encode_device`), else :func:`row_streams` computes them."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out = EncodedRow({"tokens": tokens.astype("<i4").tobytes()})
    labels = row_labels(tokens, t, mask)
    if mask is not None:
        out.columns["train_mask"] = np.packbits(mask).tobytes()
    if finish is not None:
        out.columns["finish_reason"] = finish_column(finish)
    totals = None if t.sample_ids is None else _checked_sample_totals(enc, t)
    streams = row_streams(enc, labels, t) if streams is None else streams
    if streams.head is not None:
        _head_columns(enc, t, streams.head, out)
    if streams.sample is not None:
        _sample_columns(enc, t, totals, streams.sample, out)
    out.columns.update(encode_labels(t, enc.label_logprobs))
    return out


def _head_columns(enc: Encoding, t: SparseTargets, s: HeadStreams, out: EncodedRow) -> None:
    lp_blob, out.logprob_error, out.prob_error = _encode_logprobs(enc, s.logprobs)
    out.columns.update(head_label=np.packbits(s.flags).tobytes(), head_ids=s.symbols, head_id_bits=s.bits,
                       head_logprobs=lp_blob, tail_mass=_split(t.tail_mass.numpy(), enc.tail_dtype))
    if enc.tail_dtype != "<f4":
        tail = t.tail_mass.double().numpy()
        out.prob_error = max(out.prob_error, float(np.abs(tail.astype(enc.tail_dtype) - tail).max(initial=0.0)))


def _checked_sample_totals(enc: Encoding, t: SparseTargets) -> np.ndarray | int:
    """Each position's draws (:func:`checked_totals`), after checking that its counts sum to them."""
    totals = checked_totals(enc.sample_totals, t)
    sums, wrong = misplaced_sums(t.sample_counts.numpy(), t.sample_lengths.numpy().astype(np.int64), totals)
    if wrong.size:
        bad = int(wrong[0])
        raise TargetsError(f"sample counts must sum to N={int(np.broadcast_to(totals, sums.shape)[bad])} at every "
                           f"sampled position; found {int(sums[bad])} at position {bad}")
    return totals


def _sample_columns(enc: Encoding, t: SparseTargets, totals: np.ndarray | int, s: SampleStreams,
                    out: EncodedRow) -> None:
    lengths = t.sample_lengths.numpy().astype(np.int64)
    dtype = _count_dtype(t.num_samples)
    if enc.sample_totals:
        out.columns[TOTALS_COLUMN] = totals.astype(dtype).tobytes()
    out.columns.update(sample_lengths=(lengths - s.flags).astype(dtype).tobytes(),
                       sample_label=np.packbits(s.flags).tobytes(), sample_ids=s.symbols, sample_id_bits=s.bits,
                       sample_counts=(s.counts - 1).astype(dtype).tobytes())
    if s.weights is not None:
        out.columns["sample_weights"] = _split(s.weights, "<f4")


def _checked_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """``mask`` as bool[length - 1], or a TargetsError saying what it is instead."""
    if length < 2:
        raise TargetsError(f"a masked row has {length} token(s); expected at least 2 (one position to train)")
    found = np.asarray(mask)
    if found.dtype != np.bool_ or found.shape != (length - 1,):
        raise TargetsError(f"a train mask is {found.dtype}{list(found.shape)}; the row has {length} tokens, so "
                           f"expected bool[{length - 1}] (one flag per position, tokens[1:]).")
    return found

"""Teacher-token dataset items → student-token batches with targets in the student's vocabulary.

:class:`CrossTokenizerTransform` takes the items :class:`~logitcache.train.dataset.CacheDataset` and
:class:`~logitcache.train.dataset.CacheView` yield (teacher tokens, labels, optional ``loss_mask``, full or
compact ``targets``), rebuilds the text from the teacher tokens' bytes, re-tokenizes it with the student
tokenizer, aligns the two (:func:`logitcache.train.align.align`) and gives every student position

* ``labels`` (cross-entropy): the student's next token, ``-100`` unless every teacher token of its group is a
  trained label (and the group holds no partial character);
* a KD target (``kd_mask``) when its next token is one whole group with a single student token:
  - **1:1** (one teacher token): the stored estimate at the teacher position with the same context,
    each teacher id moved to the student id with the same bytes (:mod:`logitcache.train.vocab_map`);
  - **many teacher : one student**: the chain rule. With the group's teacher tokens ``v_1..v_r`` (``v_1``
    predicted at teacher position ``p``), ``Π = Π_{k≥2} t(v_k | …)`` from the exact realized-token
    log-probabilities at positions ``p+1..p+r−1``: the mass of ``v_1`` at ``p`` splits into ``·Π`` on the
    student's token and ``·(1 − Π)`` on ``v_1``'s student id; the other entries move as for 1:1. A store
    captured with ``--label-logprobs`` (``targets.label_logprobs``) has them at every position, whatever the
    method, and also gives ``v_1``'s exact mass ``t_p(v_1)`` (in place of its estimate). Without them only an
    exact head holds them (where the label is in it); a position whose realized tokens are not all there
    (RS-KD; top-k or hybrid with a label outside the head) is left out of KD and counted as
    ``many_to_one_skipped``.
  Teacher entries without a student id with their bytes go, sorted by probability, to the ULD term
  (``uld_probs``). One : many and many : many groups get no KD target (counted).

Use it explicitly: ``CacheDataset(path, tokenizer_fingerprint=tokenizer_fingerprints(teacher_tokenizer))``
checks the store's tokenizer, and ``DataLoader(ds, batch_size=B, collate_fn=transform.collate)`` batches in
the student's tokens (docs/cross_tokenizer.md). :meth:`CrossTokenizerTransform.for_store` builds one from
tokenizer paths, finding the teacher's tokenizer through the store's manifest (``logitcache train
--student-tokenizer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, LogitCacheError, StoreError
from ..models.tokenizers import tokenizer_fingerprints
from ..store.commit import read_manifest
from ..store.fs import StoreFS
from ..targets import SparseTargets
from .align import align, encode_student, token_bytes_table
from .collate import item_layout
from .vocab_map import VocabMap, vocab_map

__all__ = ["GROUP_KINDS", "CrossTokenizerTransform", "XTokStats", "evaluate_cross_tokenizer", "load_tokenizer"]

IGNORE_INDEX = -100
GROUP_KINDS = ("one_to_one", "many_to_one", "many_to_one_skipped", "one_to_many", "many_to_many", "untrained")


@dataclass
class XTokStats:
    """Student positions by the kind of group their next token is in, and the stored teacher mass at KD
    positions: ``exact_mass`` moved to student ids, ``stored_mass`` in all."""

    positions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUP_KINDS, 0))
    exact_mass: float = 0.0
    stored_mass: float = 0.0

    def add(self, other: XTokStats) -> None:
        for kind, n in other.positions.items():
            self.positions[kind] += n
        self.exact_mass += other.exact_mass
        self.stored_mass += other.stored_mass


@dataclass(frozen=True)
class StudentItem:
    """One sequence in the student's tokens: ``T`` positions, ragged targets flat with per-position lengths."""

    input_ids: torch.Tensor  # int64[T]
    labels: torch.Tensor  # int64[T]
    kd_mask: torch.Tensor  # bool[T]
    exact_lengths: np.ndarray  # int64[T]
    exact_ids: np.ndarray  # int64[E], ascending within a position
    exact_probs: np.ndarray  # float64[E]
    uld_lengths: np.ndarray  # int64[T]
    uld_probs: np.ndarray  # float64[F], descending within a position
    stats: XTokStats


def realized_logprobs(targets: SparseTargets, positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``float64[length]`` the exact stored log-probability of each position's next token: the store's
    ``label_logprobs`` where it keeps them; else from the head (topk, hybrid, full) where the label is in it,
    NaN elsewhere (RS-KD has no exact value)."""
    out = np.full(labels.size, np.nan)
    if targets.label_logprobs is not None:
        out[positions] = targets.label_logprobs.numpy()
        return out
    if not targets.has_head or positions.size == 0:
        return out
    head, logp = targets.head_ids.numpy(), targets.head_logprobs.numpy().astype(np.float64)
    hit = head == labels[positions][:, None]
    found = hit.any(1)
    out[positions[found]] = logp[found, hit[found].argmax(1)]
    return out


def _segment_sums(values: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``Σ values[start:stop]`` per pair (NaN if any value in the range is NaN)."""
    sums = np.concatenate([[0.0], np.cumsum(np.nan_to_num(values, nan=0.0))])
    nans = np.concatenate([[0], np.cumsum(np.isnan(values))])
    return np.where(nans[stop] - nans[start] > 0, np.nan, sums[stop] - sums[start])


def _entries(targets: SparseTargets, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(owner, teacher ids, probs)``: the stored estimate entries of each stored row in ``rows``, flat."""
    offsets, ids, probs = (x.numpy() for x in targets.estimate())
    counts = offsets[rows + 1] - offsets[rows]
    owner = np.repeat(np.arange(rows.size), counts)
    index = np.repeat(offsets[rows] - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    return owner, ids[index].astype(np.int64), probs[index].astype(np.float64)


class CrossTokenizerTransform:
    """Items in the teacher's tokens → batches in the student's (module docstring).

    ``store``: a store path whose tokenizer fingerprint must equal the teacher tokenizer's (checked once).
    ``pad_id``: the student's padding id (default its ``pad_token_id``, else 0).
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, *, store: str | None = None, pad_id: int | None = None,
                 cache: bool = True) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher_bytes = token_bytes_table(teacher_tokenizer)
        self.student_bytes = token_bytes_table(student_tokenizer)
        self.map: VocabMap = vocab_map(teacher_tokenizer, student_tokenizer, cache=cache)
        self.pad_id = pad_id if pad_id is not None else (student_tokenizer.pad_token_id or 0)
        self.teacher_fingerprints = tokenizer_fingerprints(teacher_tokenizer)  # every form a store may record
        self.teacher_fingerprint = self.teacher_fingerprints[0]
        if store is not None:
            self.check_store(store)

    @classmethod
    def for_store(cls, store: str, student_tokenizer: str, teacher_tokenizer: str | None = None
                  ) -> CrossTokenizerTransform:
        """The transform from ``store``'s teacher tokenizer to the one at ``student_tokenizer`` (a tokenizer
        directory or ``tokenizer.json``, :func:`load_tokenizer`). The teacher's is ``teacher_tokenizer`` when
        given, else the tokenizer of the teacher the store's manifest names (a local directory or an embedded
        teacher); either must have the store's fingerprint."""
        student = load_tokenizer(student_tokenizer, "student tokenizer")
        teacher = (load_tokenizer(teacher_tokenizer, "teacher tokenizer") if teacher_tokenizer is not None
                   else _manifest_teacher_tokenizer(store))
        return cls(teacher, student, store=store)

    def check_store(self, path: str) -> None:
        """:class:`StoreError` unless the store at ``path`` was captured with this transform's teacher tokenizer."""
        found = read_manifest(StoreFS(path)).header.tokenizer.fingerprint
        if found not in self.teacher_fingerprints:
            raise StoreError(f"tokenizer mismatch: the store {path} was captured with tokenizer fingerprint {found}; "
                             f"the teacher tokenizer given to CrossTokenizerTransform has {self.teacher_fingerprint}. "
                             "Pass the tokenizer the store was captured with as teacher_tokenizer.")

    def __call__(self, item: dict[str, Any], where: str | None = None) -> StudentItem:
        where = where or f"seq_id {item.get('seq_id')!r}"
        layout = item_layout(item, where, IGNORE_INDEX)
        labels = layout.labels.numpy()
        tokens = layout.input_ids.numpy()
        tokens = np.append(tokens, labels[-1]) if labels[-1] != IGNORE_INDEX else tokens
        trained = np.zeros(tokens.size, dtype=bool)  # token k is a trained label (k ≥ 1)
        trained[1:] = labels[: tokens.size - 1] != IGNORE_INDEX
        ends = np.cumsum(self.teacher_bytes.lengths(tokens, where))
        student = encode_student(self.student_tokenizer, self.student_bytes, self.teacher_bytes.join(tokens), where)
        spans = student.span_ends()
        pseudo = np.ones(spans.size, dtype=bool)
        pseudo[student.first: student.first + student.ids.size] = False
        al = align(ends, spans)
        usable = (np.bincount(al.teacher_group, weights=(~trained).astype(float), minlength=al.num_groups) == 0) & (
            np.bincount(al.student_group, weights=pseudo.astype(float), minlength=al.num_groups) == 0)
        groups = al.student_group[student.first: student.first + student.ids.size][1:]  # of each next token
        return self._targets(item["targets"], layout.positions.numpy(), tokens, labels, student.ids, al, usable,
                             groups)

    def _targets(self, targets: SparseTargets, positions: np.ndarray, tokens: np.ndarray, labels: np.ndarray,
                 student_ids: np.ndarray, al, usable: np.ndarray, groups: np.ndarray) -> StudentItem:
        ce = usable[groups]
        single = al.student_count[groups] == 1
        many_t = al.teacher_count[groups] > 1
        first = al.teacher_first[groups]  # teacher token index of each group's first token
        realized = realized_logprobs(targets, positions, labels)
        log_rest = _segment_sums(realized, first, first + al.teacher_count[groups] - 1)
        merged = ce & single & many_t
        kd = ce & single & (~many_t | ~np.isnan(log_rest))
        stats = XTokStats({"one_to_one": int((kd & ~many_t).sum()), "many_to_one": int((kd & many_t).sum()),
                           "many_to_one_skipped": int((merged & ~kd).sum()),
                           "one_to_many": int((ce & ~single & ~many_t).sum()),
                           "many_to_many": int((ce & ~single & many_t).sum()), "untrained": int((~ce).sum())})
        q = np.nonzero(kd)[0]
        row_of = np.full(labels.size, -1, dtype=np.int64)
        row_of[positions] = np.arange(positions.size)
        exact_first = None if targets.label_logprobs is None else np.exp(realized[first[q] - 1])
        owner, tid, prob, split = _first_token_entries(*_entries(targets, row_of[first[q] - 1]), many_t[q],
                                                       tokens[first[q]], exact_first)
        chain = np.where(many_t[q], np.exp(np.nan_to_num(log_rest[q])), 1.0)
        extra_owner, extra_prob = owner[split], prob[split] * chain[owner[split]]
        prob[split] *= 1.0 - chain[owner[split]]
        sid = self.map.lookup(tid)
        exact = sid >= 0
        e_owner = np.concatenate([owner[exact], extra_owner])
        e_sid = np.concatenate([sid[exact], student_ids[q + 1][extra_owner]])
        e_prob = np.concatenate([prob[exact], extra_prob])
        keys, inverse = np.unique(e_owner * len(self.student_bytes) + e_sid, return_inverse=True)
        stats.exact_mass, stats.stored_mass = float(e_prob.sum()), float(prob.sum() + extra_prob.sum())
        u_order = np.lexsort((-prob[~exact], owner[~exact]))
        return StudentItem(
            input_ids=torch.from_numpy(student_ids[:-1].copy()),
            labels=torch.from_numpy(np.where(ce, student_ids[1:], IGNORE_INDEX)),
            kd_mask=torch.from_numpy(kd),
            exact_lengths=_per_position(q, keys // len(self.student_bytes), kd.size),
            exact_ids=keys % len(self.student_bytes),
            exact_probs=np.bincount(inverse, weights=e_prob, minlength=keys.size),
            uld_lengths=_per_position(q, owner[~exact], kd.size),
            uld_probs=prob[~exact][u_order],
            stats=stats,
        )

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Student-token batch of teacher-token items (keys in docs/cross_tokenizer.md, "Batch")."""
        converted = [self(item, f"item {i} (seq_id {item.get('seq_id')!r})") for i, item in enumerate(items)]
        return collate_student(converted, pad_id=self.pad_id, student_matched=self.map.student_matched)


def _first_token_entries(owner: np.ndarray, tid: np.ndarray, prob: np.ndarray, merged: np.ndarray,
                         first_ids: np.ndarray, exact: np.ndarray | None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(owner, ids, probs, split)``: the entries, with ``split`` marking at each ``merged`` row the entry of
    the group's first teacher token ``first_ids[row]``, the one the chain rule splits. With ``exact`` (its exact
    probability per row, from the store's label log-probabilities) that entry is ``exact[row]`` at every merged
    row, in place of the stored estimate (which RS-KD may lack): still unbiased, with no variance."""
    split = merged[owner] & (tid == first_ids[owner])
    if exact is None:
        return owner, tid, prob, split
    rows, keep = np.flatnonzero(merged), ~split
    return (np.concatenate([owner[keep], rows]), np.concatenate([tid[keep], first_ids[rows]]),
            np.concatenate([prob[keep], exact[rows]]), np.concatenate([split[keep], np.ones(rows.size, bool)]))


def _per_position(q: np.ndarray, owners: np.ndarray, size: int) -> np.ndarray:
    lengths = np.zeros(size, dtype=np.int64)
    lengths[q] = np.bincount(owners, minlength=q.size)
    return lengths


def _dense(lengths: list[np.ndarray], values: list[np.ndarray], shape: tuple[int, int], dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [B, T, U], mask [B, T, U])`` of ragged per-position values, item ``b`` position ``t`` at ``[b, t]``."""
    counts = np.concatenate([np.pad(n, (0, shape[1] - n.size)) for n in lengths])
    u = int(counts.max()) if counts.size else 0
    flat = np.concatenate(values) if values else np.zeros(0)
    index = np.repeat(np.arange(counts.size) * u - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    out = torch.zeros(counts.size * u, dtype=dtype)
    out[torch.from_numpy(index)] = torch.from_numpy(flat).to(dtype)
    mask = torch.zeros(counts.size * u, dtype=torch.bool)
    mask[torch.from_numpy(index)] = True
    return out.view(*shape, u), mask.view(*shape, u)


def collate_student(items: list[StudentItem], *, pad_id: int, student_matched: np.ndarray) -> dict[str, Any]:
    """Right-padded ``[B, T]`` batch of :class:`StudentItem` s with dense ``[B, T, U]`` targets."""
    b, t = len(items), max(int(it.input_ids.numel()) for it in items)
    batch = {"input_ids": torch.full((b, t), pad_id, dtype=torch.int64),
             "labels": torch.full((b, t), IGNORE_INDEX, dtype=torch.int64),
             "attention_mask": torch.zeros((b, t), dtype=torch.int64), "kd_mask": torch.zeros((b, t), dtype=torch.bool)}
    for row, it in enumerate(items):
        n = int(it.input_ids.numel())
        batch["input_ids"][row, :n], batch["labels"][row, :n] = it.input_ids, it.labels
        batch["attention_mask"][row, :n], batch["kd_mask"][row, :n] = 1, it.kd_mask
    ids, mask = _dense([it.exact_lengths for it in items], [it.exact_ids for it in items], (b, t), torch.int64)
    probs, _ = _dense([it.exact_lengths for it in items], [it.exact_probs for it in items], (b, t), torch.float32)
    uld, uld_mask = _dense([it.uld_lengths for it in items], [it.uld_probs for it in items], (b, t), torch.float32)
    stats = XTokStats()
    for it in items:
        stats.add(it.stats)
    return {**batch, "target_ids": ids, "target_probs": probs, "target_mask": mask, "uld_probs": uld,
            "uld_mask": uld_mask, "student_matched": torch.from_numpy(student_matched), "xtok_stats": stats}


@torch.no_grad()
def evaluate_cross_tokenizer(model, store: str, transform: CrossTokenizerTransform, *, batch_size: int = 8,
                             device: str = "cpu") -> dict[str, float]:
    """Means over a whole store in the student's tokens: ``ce`` (per labelled student position), ``kl`` (the
    exact-match KL) and ``uld`` (per KD position, ``kd_tokens`` of them), from
    :func:`~logitcache.train.losses_xtok.cross_tokenizer_terms`."""
    from torch.utils.data import DataLoader

    from .dataset import CacheView
    from .losses_xtok import cross_tokenizer_terms

    view = CacheView(store, tokenizer_fingerprint=transform.teacher_fingerprints)
    was_training = model.training
    model.eval()
    sums, tokens, kd_tokens = {"ce": 0.0, "kl": 0.0, "uld": 0.0}, 0, 0
    for batch in DataLoader(view, batch_size=batch_size, collate_fn=transform.collate):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        terms = cross_tokenizer_terms(logits, batch)
        n, k = int((batch["labels"] != IGNORE_INDEX).sum()), int(batch["kd_mask"].sum())
        sums["ce"] += float(terms.ce) * n
        sums["kl"] += float(terms.exact) * k
        sums["uld"] += float(terms.uld) * k
        tokens, kd_tokens = tokens + n, kd_tokens + k
    model.train(was_training)
    return {"ce": sums["ce"] / max(tokens, 1), "kl": sums["kl"] / max(kd_tokens, 1),
            "uld": sums["uld"] / max(kd_tokens, 1), "tokens": tokens, "kd_tokens": kd_tokens}


def load_tokenizer(path: str, what: str = "tokenizer"):
    """The fast tokenizer at ``path``: a directory ``AutoTokenizer`` reads, or a ``tokenizer.json`` file (then
    without special-token roles: padding is id 0). :class:`ConfigError` naming ``what`` if neither loads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where, expected = Path(path).expanduser(), "a tokenizer directory (tokenizer.json, tokenizer_config.json) or a " \
        "tokenizer.json file"
    if not where.exists():
        raise ConfigError(f"{what} {path}: not found; expected {expected}")
    try:
        if where.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(where))
        return AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # the tokenizers package raises a bare Exception for a file it cannot parse
        raise ConfigError(f"{what} {path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          f"expected {expected}") from exc


def _manifest_teacher_tokenizer(store: str):
    """The tokenizer of the teacher ``store``'s manifest names, or :class:`ConfigError` saying to pass one."""
    from ..models.embedded import resolve_teacher_path

    header = read_manifest(StoreFS(store)).header
    name = header.teacher.get("name")
    hint = ("pass the tokenizer the store was captured with: --teacher-tokenizer PATH (TrainConfig.teacher_tokenizer, "
            "CrossTokenizerTransform.for_store(..., teacher_tokenizer=PATH))")
    try:
        tokenizer = load_tokenizer(str(resolve_teacher_path(str(name))), "teacher tokenizer")
    except (LogitCacheError, OSError, ValueError) as exc:
        raise ConfigError(f"store {store}: the teacher its manifest names ({name!r}) has no tokenizer here ({exc}); "
                          f"{hint}") from exc
    forms = tokenizer_fingerprints(tokenizer)
    if header.tokenizer.fingerprint not in forms:
        raise ConfigError(f"store {store}: the tokenizer of the teacher its manifest names ({name!r}) has fingerprint "
                          f"{forms[0]}, the store {header.tokenizer.fingerprint}; {hint}")
    return tokenizer

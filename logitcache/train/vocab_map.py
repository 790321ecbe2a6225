"""The vocabulary map of a tokenizer pair: teacher id → student id where the token bytes are equal.

Computed once per pair and cached under ``$LOGITCACHE_HOME/vocab_maps/`` (:func:`logitcache.models.home.
logitcache_home`), keyed by both tokenizer fingerprints and both byte tables' kinds. Several teacher ids
with the same bytes map to the same student id; among several student ids with the same bytes the lowest
is the image. :func:`mass_coverage` says how much of the stored teacher probability maps exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.home import logitcache_home
from ..models.tokenizers import tokenizer_fingerprint
from ..targets import SparseTargets
from .align import TokenBytes, token_bytes_table

__all__ = ["VocabMap", "mass_coverage", "vocab_map"]

_VERSION = 1  # bump when token_bytes_table or the matching rule changes: old cache files are then not read


@dataclass(frozen=True)
class VocabMap:
    """``teacher_to_student int64[V_t]`` (−1: no student token has those bytes) and ``student_matched
    bool[V_s]`` (student ids that are the image of some teacher id)."""

    teacher_to_student: np.ndarray
    student_matched: np.ndarray

    @property
    def coverage(self) -> float:
        """Share of the teacher vocabulary that maps exactly."""
        return float((self.teacher_to_student >= 0).mean()) if self.teacher_to_student.size else 0.0

    def lookup(self, teacher_ids: np.ndarray) -> np.ndarray:
        """``int64[n]`` student id of each teacher id (−1 for none, or for an id beyond the vocabulary)."""
        ids = np.asarray(teacher_ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.teacher_to_student.size)
        return np.where(inside, self.teacher_to_student[np.where(inside, ids, 0)], -1)


def match_tables(teacher: TokenBytes, student: TokenBytes) -> VocabMap:
    """The :class:`VocabMap` of two byte tables (no cache)."""
    by_bytes: dict[bytes, int] = {}
    for sid, piece in enumerate(student.table):
        if piece is not None and piece not in by_bytes:
            by_bytes[piece] = sid
    mapping = np.fromiter((by_bytes.get(p, -1) if p is not None else -1 for p in teacher.table), dtype=np.int64,
                          count=len(teacher))
    matched = np.zeros(len(student), dtype=bool)
    matched[mapping[mapping >= 0]] = True
    return VocabMap(mapping, matched)


def _cache_path(teacher_tokenizer, student_tokenizer, teacher: TokenBytes, student: TokenBytes) -> Path:
    key = "\n".join([str(_VERSION), tokenizer_fingerprint(teacher_tokenizer), teacher.kind,
                     tokenizer_fingerprint(student_tokenizer), student.kind])
    return logitcache_home() / "vocab_maps" / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"


def vocab_map(teacher_tokenizer, student_tokenizer, *, cache: bool = True) -> VocabMap:
    """The :class:`VocabMap` of a tokenizer pair, read from the per-user cache when it holds it."""
    teacher, student = token_bytes_table(teacher_tokenizer), token_bytes_table(student_tokenizer)
    path = _cache_path(teacher_tokenizer, student_tokenizer, teacher, student) if cache else None
    saved = _read_cached(path, len(teacher), len(student)) if path is not None else None
    if saved is not None:
        return saved
    result = match_tables(teacher, student)
    if path is not None:
        _write_cached(path, result)
    return result


def _read_cached(path: Path, teacher_size: int, student_size: int) -> VocabMap | None:
    """The cached map at ``path``, or None when there is none or it cannot be the pair's (damaged, other shapes):
    the cache only saves the matching, which is then done again."""
    try:
        with np.load(path) as saved:
            mapping, matched = saved["teacher_to_student"], saved["student_matched"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if mapping.shape != (teacher_size,) or matched.shape != (student_size,) or mapping.dtype.kind not in "iu":
        return None
    if mapping.size and not -1 <= int(mapping.min()) <= int(mapping.max()) < student_size:
        return None
    return VocabMap(mapping.astype(np.int64), matched.astype(bool))


def _write_cached(path: Path, result: VocabMap) -> None:
    """Best effort, as the weights-hash cache: an unwritable or full ``$LOGITCACHE_HOME`` costs a re-match next time."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, teacher_to_student=result.teacher_to_student, student_matched=result.student_matched)
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def mass_coverage(targets: SparseTargets, mapping: VocabMap) -> tuple[float, float]:
    """``(mapped, stored)``: mean over positions of the stored estimate's mass on teacher ids that map
    exactly, and of the whole stored estimate (below 1 for top-k: the tail is not stored)."""
    offsets, ids, probs = targets.estimate()
    positions = max(targets.num_positions, 1)
    mapped = probs[torch.from_numpy(mapping.lookup(ids.numpy()) >= 0)]
    return float(mapped.double().sum()) / positions, float(probs.double().sum()) / positions

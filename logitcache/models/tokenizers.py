"""What identifies a tokenizer for the store: the fingerprint a capture records and a student must match."""

from __future__ import annotations

import hashlib
import json

# special_tokens_map keys that hold a list of extra special tokens, not one role: transformers 4.x lists its
# additional_special_tokens there, 5.x lists none of them (its extra_special_tokens stay out of the map)
_LIST_KEYS = ("additional_special_tokens", "extra_special_tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of the vocabulary (sorted token→id pairs, added tokens included), the special token of each
    role (bos, eos, unk, pad, …) and the sorted set of all special tokens.

    Identical vocabularies give identical fingerprints; changing, adding or renumbering any entry,
    or changing a special token, changes it. Merges and normalizers are not covered: the
    fingerprint answers "do ids mean the same tokens", which is what a student reading targets needs.
    The same under transformers 4.x and 5.x (the extra special tokens count through the set of all special
    tokens only, not through ``special_tokens_map``, which lists them in 4.x and not in 5.x).
    """
    return tokenizer_fingerprints(tokenizer)[0]


def tokenizer_fingerprints(tokenizer) -> tuple[str, ...]:
    """Every form a store may record for this tokenizer: :func:`tokenizer_fingerprint`, then, for a tokenizer
    with additional special tokens, the form logitcache recorded under transformers 4.x until 2026-12 (their
    list inside the special tokens' map). Pass these to ``CacheDataset(tokenizer_fingerprint=...)`` to accept a
    store captured that way."""
    vocab = sorted(tokenizer.get_vocab().items())
    mapping = getattr(tokenizer, "special_tokens_map", None) or {}
    roles = {k: v for k, v in sorted(mapping.items()) if k not in _LIST_KEYS}
    all_special = sorted(getattr(tokenizer, "all_special_tokens", None) or [])
    forms = [_digest(vocab, roles, all_special)]
    extra = _additional_special_tokens(tokenizer)
    if extra:
        forms.append(_digest(vocab, dict(sorted({**roles, "additional_special_tokens": extra}.items())), all_special))
    return tuple(forms)


def _additional_special_tokens(tokenizer) -> list[str]:
    """The list transformers 4.x calls ``additional_special_tokens`` (5.x: ``extra_special_tokens`` as a list)."""
    for name in _LIST_KEYS:
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)) and value:
            return [str(t) for t in value]
    return []


def _digest(vocab: list, special: dict, all_special: list) -> str:
    payload = json.dumps({"vocab": vocab, "special_tokens": special, "all_special_tokens": all_special},
                         ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

"""What identifies a tokenizer for the store: the fingerprint a capture records and a student must match."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of the vocabulary (sorted token→id pairs, added tokens included) and special tokens.

    Identical vocabularies give identical fingerprints; changing, adding or renumbering any entry,
    or changing a special token, changes it. Merges and normalizers are not covered: the
    fingerprint answers "do ids mean the same tokens", which is what a student reading targets needs.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = dict(sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items()))
    all_special = sorted(getattr(tokenizer, "all_special_tokens", None) or [])
    payload = json.dumps(
        {"vocab": vocab, "special_tokens": special, "all_special_tokens": all_special},
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

"""What a manifest promises about every shard: method, head size, encoding and container."""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import Encoding, row_columns
from .manifest import HEADER_DIGEST, ManifestHeader, generation_settings
from .totals import adaptive_cap


@dataclass(frozen=True)
class ShardSpec:
    """Fixes a shard's logical schema (method, k, N, weights) and its physical form (encoding, container)."""

    method: str
    encoding: Encoding
    k: int = 0
    num_samples: int = 0
    weighted: bool = False
    masked: bool = False  # rows carry a train_mask and compact targets (the "documents" layout)
    generated: bool = False  # rows carry a finish_reason (teacher-generated responses: corpus.layout.generate)
    format: str = "arrow"
    compression: str = "zstd"
    compression_level: int = 9
    sequences_per_shard: int = 16
    num_sequences: int = 0
    header_sha256: str = ""  # the store header digest unit records are bound to ("": none, e.g. a bare spec)

    @property
    def has_head(self) -> bool:
        return self.method in ("topk", "hybrid", "full")

    @property
    def has_samples(self) -> bool:
        return self.method in ("sample", "hybrid")

    @property
    def max_samples(self) -> int:
        """The most draws one position holds: N, or with per-position budgets (``encoding.sample_totals``) the cap."""
        return adaptive_cap(self.num_samples) if self.encoding.sample_totals else self.num_samples

    def columns(self) -> list[str]:
        """The byte columns a container stores per row (after ``seq_id``): the row encoding's, and
        with the ``ans`` stage the unit's ``entropy`` column in place of the columns it codes."""
        cols = row_columns(self.method, self.weighted, self.masked, self.generated, self.encoding.label_logprobs,
                           self.encoding.sample_totals)
        if self.encoding.entropy == "ans":
            from .entropy import COLUMN, coded_columns

            coded = set(coded_columns(self))
            cols = [c for c in cols if c not in coded] + [COLUMN]
        return cols


def spec_from_manifest(header: ManifestHeader) -> ShardSpec:
    """The shard spec a manifest header promises (a read manifest's ``header``, or a capture's)."""
    store = header.store
    return ShardSpec(
        method=header.method,
        encoding=store.encoding,
        k=header.head_size,
        num_samples=header.num_samples,
        weighted=header.weighted,
        masked=header.masked,
        generated=generation_settings(header) is not None,
        format=store.format,
        compression=store.compression,
        compression_level=store.compression_level,
        sequences_per_shard=header.plan.sequences_per_shard,
        num_sequences=header.plan.sequences,
        header_sha256=header.to_dict()[HEADER_DIGEST],
    )

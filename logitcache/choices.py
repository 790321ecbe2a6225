"""One list per option: the values config, the CLI, the store and the train CLI accept.

Each list is defined here once and imported wherever the option is validated or offered, so a new
value is added in one place. Module of plain constants: imports nothing, imported by every stage.
"""

from __future__ import annotations

METHODS = ("topk", "sample", "hybrid", "full")  # sparsifiers
DTYPES = ("bfloat16", "float16", "float32")  # teacher and student compute dtypes
BACKENDS = ("hf", "vllm")  # teacher engines
FORMATS = ("arrow", "zarr")  # store containers
ID_CODECS = ("rank-delta", "packed")  # how a row's ids are coded
ID_CHOICES = ("auto", *ID_CODECS)  # what config and CLI accept ("auto" = the default codec)
LOGPROB_DTYPES = ("float32", "float16", "q8")  # how head logprobs are stored (q8 is lossy)
ENTROPY_CODECS = ("zstd", "ans")  # the entropy stage after the row codecs
COMPRESSIONS = ("zstd", "lz4", "none")  # container compression
LOSS_KINDS = ("auto", "sparse", "topk_renorm", "ghost", "reverse")  # KD loss estimators
LOSS_IMPLS = ("plain", "compiled")  # the student side of the loss: eager torch, or torch.compile (losses_fused)
ON_CORRUPT = ("raise", "skip")  # what the dataset does with a damaged shard
TRAIN_ON = ("assistant", "last-assistant", "all")  # which tokens of a chat conversation train
LAYOUTS = ("auto", "packed", "documents")  # how a corpus becomes sequences (auto: documents for chat, else packed)
LONG_SEQUENCES = ("truncate", "split", "skip")  # what the documents layout does with a sequence over seq_len
ALLOCATIONS = ("fixed", "variance")  # sparsify.allocation: how a sequence's draws are spread over its positions

__all__ = ["ALLOCATIONS", "BACKENDS", "COMPRESSIONS", "DTYPES", "ENTROPY_CODECS", "FORMATS", "ID_CHOICES", "ID_CODECS",
           "LAYOUTS", "LOGPROB_DTYPES", "LONG_SEQUENCES", "LOSS_IMPLS", "LOSS_KINDS", "METHODS", "ON_CORRUPT", "TRAIN_ON"]

"""Flip one random bit of a store's manifest.json, many times (seeded): is each flip detected by
`verify`, and if not, does the dataset still yield exactly the original targets?

    PYTHONPATH=. python benchmarks/manifest_bitflips.py --trials 300

Prints one line: trials, detected, undetected-but-harmless, undetected-and-wrong (must be 0).
Uses the tiny offline teacher; takes about a minute on one CPU.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from logitcache.capture import capture
from logitcache.capture.config import CaptureConfig
from logitcache.train.dataset import CacheDataset
from logitcache.errors import LogitCacheError
from logitcache.store import verify_store
from logitcache.testing.tiny import make_tiny_teacher


def snapshot(items) -> list:
    return [(i["seq_id"], i["input_ids"].tolist(), i["labels"].tolist(), i["targets"].head_ids.tolist(),
             i["targets"].head_logprobs.tolist(), i["targets"].sample_ids.tolist(),
             i["targets"].sample_counts.tolist(), i["targets"].num_samples) for i in items]


def flip_one_bit(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "store"
        capture(CaptureConfig().with_overrides({
            "teacher.model": make_tiny_teacher(root / "teacher"), "teacher.dtype": "float32",
            "corpus.seq_len": 16, "corpus.max_tokens": 16 * 12, "store.path": str(src),
            "store.sequences_per_shard": 3, "sparsify.method": "hybrid", "sparsify.k": 4,
            "sparsify.samples": 10}), progress=False)
        reference = snapshot(CacheDataset(src))
        detected = harmless = wrong = 0
        for trial in range(args.trials):
            copy = root / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(src, copy)
            flip_one_bit(copy / "manifest.json", random.Random(args.seed + trial))
            try:
                ok = verify_store(copy).ok
            except LogitCacheError:
                ok = False
            if not ok:
                detected += 1
            elif snapshot(CacheDataset(copy)) == reference:
                harmless += 1
            else:
                wrong += 1
    print(f"trials {args.trials}: detected {detected}, undetected-but-harmless {harmless}, "
          f"undetected-and-wrong {wrong}")


if __name__ == "__main__":
    main()

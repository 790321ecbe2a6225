"""The student study's own machinery (benchmarks/students_study.py, benchmarks/kd_common.py): the verdict that
says which methods separate, the CSV reader that merges invocations, and the teacher-body disk cache every
capture and the online full-KD reference of the study go through."""

from __future__ import annotations

import csv
import importlib
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """``students_study`` and ``kd_common`` imported from benchmarks/ (dropped from sys.modules afterwards)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("students_study"), importlib.import_module("kd_common")
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").parent == BENCHMARKS:
                del sys.modules[name]


def _rows(kl: dict[str, list[float]], budget: str = "~50 B") -> list[dict]:
    online = ("CE only", "full KD (online)")
    return [{"method": m, "budget": "—" if m in online else budget, "kl": v, "seed": s}
            for m, values in kl.items() for s, v in enumerate(values)]


def test_separability_against_a_hand_computed_verdict(bench):
    study, _ = bench
    kl = {"CE only": [5.8, 5.81, 5.79], "full KD (online)": [5.30, 5.31, 5.29],
          "top-12 renorm": [5.40, 5.41, 5.39], "RS-KD N=170": [5.29, 5.30, 5.31]}
    pairs = {p[1]: p for p in study.separability(_rows(kl), "kl")}
    # full KD is compared with every cached method of the budget, and those with each other; CE only is not paired
    assert set(pairs) == {"full KD (online) − top-12 renorm", "full KD (online) − RS-KD N=170",
                          "top-12 renorm − RS-KD N=170"}
    for name, (a, b) in {"full KD (online) − top-12 renorm": ("full KD (online)", "top-12 renorm"),
                         "full KD (online) − RS-KD N=170": ("full KD (online)", "RS-KD N=170"),
                         "top-12 renorm − RS-KD N=170": ("top-12 renorm", "RS-KD N=170")}.items():
        diff = sum(kl[a]) / 3 - sum(kl[b]) / 3
        sd = max(np.std(kl[a], ddof=1), np.std(kl[b], ddof=1))
        budget, _, shown_diff, shown_2sd, verdict, shown_2sd_paired, paired_verdict = pairs[name]
        assert budget == "~50 B"
        assert float(shown_diff) == pytest.approx(diff, abs=1e-4) and float(shown_2sd) == pytest.approx(2 * sd, abs=1e-4)
        assert verdict == ("separable" if abs(diff) >= 2 * sd else "not separable at this budget")
        per_seed = np.subtract(kl[a], kl[b])
        assert float(shown_2sd_paired) == pytest.approx(2 * np.std(per_seed, ddof=1), abs=1e-4)
        assert paired_verdict == ("separable" if abs(per_seed.mean()) >= 2 * np.std(per_seed, ddof=1)
                                  else "not separable at this budget")
    assert pairs["full KD (online) − top-12 renorm"][4] == "separable"
    assert pairs["full KD (online) − RS-KD N=170"][4] == "not separable at this budget"


def test_paired_verdict_sees_a_shift_the_seed_spread_hides(bench):
    study, _ = bench
    # seeds move both methods together by ±0.1; method b is 0.03 worse in every seed
    kl = {"full KD (online)": [5.0, 5.1, 5.2], "b": [5.03, 5.13, 5.23 + 1e-3]}
    (row,) = study.separability(_rows(kl), "kl")
    assert row[4] == "not separable at this budget" and row[6] == "separable"
    assert float(row[5]) == pytest.approx(2 * np.std([0.03, 0.03, 0.031], ddof=1), abs=1e-4)


def test_separability_uses_the_larger_sd_and_one_budget_at_a_time(bench):
    study, _ = bench
    # a difference of 0.05: separable against the tight method's sd alone, not against the noisy one's
    kl = {"full KD (online)": [5.0, 5.0 + 1e-3, 5.0 - 1e-3], "noisy": [5.05, 5.10, 5.00]}
    (row,) = study.separability(_rows(kl), "kl")
    assert float(row[3]) == pytest.approx(2 * statistics.stdev(kl["noisy"]), abs=1e-4)
    assert row[4] == "not separable at this budget"
    two = _rows({"full KD (online)": [5.0, 5.0], "a": [5.2, 5.2]}, "~25 B") + _rows({"b": [5.1, 5.1]}, "~100 B")
    pairs = study.separability(two, "kl")
    assert [(p[0], p[1]) for p in pairs] == [("~25 B", "full KD (online) − a"), ("~100 B", "full KD (online) − b")]


def test_read_rows_keeps_the_last_row_per_budget_method_and_seed(bench, tmp_path):
    study, _ = bench
    numeric = ("bytes_per_position", "ids_per_position", "ce", "kl", "top1_agreement", "accuracy", "ece",
               "ece_vs_teacher", "gap_closed_ce", "gap_closed_kl", "teacher_ce", "teacher_ece", "wall_s")
    path = tmp_path / "study.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["budget", "method", "seed", "epochs", *numeric])
        w.writeheader()
        # a pilot of other settings (epochs 1) is left out; of one setting, the last row per seed wins
        for kl, seed, epochs in ((5.9, 2, 1), (5.5, 0, 3), (5.4, 1, 3), (5.3, 0, 3)):
            w.writerow({"budget": "~50 B", "method": "RS-KD N=170", "seed": seed, "epochs": epochs,
                        **dict.fromkeys(numeric, 1.0), "kl": kl})
    rows = study.read_rows(path)
    assert sorted((r["seed"], r["kl"]) for r in rows) == [(0, 5.3), (1, 5.4)]
    (tmp_path / "empty.csv").write_text("budget,method,seed\n")
    with pytest.raises(SystemExit, match="holds no rows"):
        study.read_rows(tmp_path / "empty.csv")


def _shards(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and "lock" not in p.name}


def test_body_cache_captures_the_same_bytes_and_runs_the_body_once(bench, tiny_teacher, tmp_path):
    """A capture through the cached teacher writes the shards a plain capture writes; a second teacher on the same
    cache directory (a later run) reads every window from disk and never runs the body."""
    from logitcache.capture import capture
    from logitcache.capture.teachers import load_teacher

    _, kd = bench
    config = make_config(tiny_teacher, tmp_path / "plain", method="hybrid")
    capture(config, progress=False)

    calls = []

    def cached():
        teacher = kd.CachedBodyTeacher(load_teacher(config.teacher), tmp_path / "body", keep_logits=True)
        body = teacher.inner.body
        teacher.inner.body = lambda **kw: calls.append(kw["input_ids"].shape[0]) or body(**kw)
        return teacher

    first = cached()
    capture(config.with_overrides({"store.path": str(tmp_path / "first")}), progress=False, teacher=first)
    assert sum(calls) == 10 and len(list((tmp_path / "body").glob("*.pt"))) == 10  # ten windows, each once
    assert _shards(tmp_path / "first") == _shards(tmp_path / "plain") != {}

    calls.clear()
    second = cached()
    capture(config.with_overrides({"store.path": str(tmp_path / "second")}), progress=False, teacher=second)
    assert calls == [] and _shards(tmp_path / "second") == _shards(tmp_path / "plain")

    ids = torch.randint(0, 300, (2, 17))
    other = ids.clone()
    other[1, 3] = (other[1, 3] + 1) % 300  # another window: another key, computed
    assert torch.equal(second.hidden(ids), second.hidden(ids)) and calls == [2]
    second.hidden(other)
    assert calls == [2, 1]


def test_every_cached_run_has_one_family_and_methods_select_by_it(bench):
    study, _ = bench
    for budget in study.BUDGETS.values():
        runs = study.budget_runs(budget)
        assert sorted(study.family(r) for r in runs) == sorted(study.FAMILIES)  # one run per family
        chosen = study.budget_runs(budget, ("topk", "rs"))
        assert [r.name for r in chosen] == [f"top-{budget.topk} renorm", f"RS-KD N={budget.samples}"]
        assert set(study.store_configs(budget, ("ghost",))) == {f"topk{budget.topk}"}


def test_a_store_of_other_windows_is_not_reused(bench, tiny_teacher, tmp_path):
    """A store under --work captured for another number of training windows (or seq_len, corpus) is refused by
    name, not silently trained on; the path carries the windows, so a new setting captures its own."""
    import argparse

    from logitcache.capture.teachers import load_teacher

    study, _ = bench
    config = make_config(tiny_teacher, tmp_path / "unused")
    teacher = load_teacher(config.teacher)
    args = argparse.Namespace(work=tmp_path, corpus=config.corpus.source, seq_len=config.corpus.seq_len,
                              train_windows=4)
    sparsify = config.sparsify
    path = study.capture_store(teacher, "rs", sparsify, 0, args)
    assert path.name == f"rs-4x{args.seq_len}-seed0" and study.capture_store(teacher, "rs", sparsify, 0, args) == path
    assert study.capture_store(teacher, "rs", sparsify, 0, argparse.Namespace(**{**vars(args), "train_windows": 3})) \
        != path
    shutil.copytree(path, path.parent / f"rs-5x{args.seq_len}-seed0")  # a 4-window store where 5 are expected
    with pytest.raises(SystemExit, match="holds 4 windows .* expected 5"):
        study.capture_store(teacher, "rs", sparsify, 0, argparse.Namespace(**{**vars(args), "train_windows": 5}))

"""The benchmarks as one harness: every CSV under benchmarks/results/ has one row shape, the one its
script writes; the row writer refuses a row or a file of another shape; and every script's default
CSV lands under benchmarks/results/, whatever the working directory."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pytest

from helpers import benchmarks_importable

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULTS = BENCHMARKS / "results"
# the scripts that append rows to a CSV; each owns results/<name>.csv and results/<name>_<variant>.csv
CSV_SCRIPTS = ("adaptive_budget", "capture_speed", "chat_layout", "entropy_speed", "estimators", "loader_speed",
               "loss_speed", "packed_loading", "sparsify_speed", "storage", "students", "students_study", "vllm_speed",
               "xtok_label_logprobs", "xtok_train")
RESULT_FILES = sorted(RESULTS.glob("*.csv"))


@pytest.fixture(scope="module")
def importable():
    with benchmarks_importable():
        yield


@pytest.fixture(scope="module")
def scripts(importable):
    return {name: importlib.import_module(name) for name in CSV_SCRIPTS}


@pytest.fixture(scope="module")
def common(importable):
    return importlib.import_module("common")


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        header, *rows = csv.reader(f)
    return header, rows


def test_results_hold_csv_files():
    assert RESULT_FILES, f"no CSV files under {RESULTS}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_every_row_matches_its_header(path):
    header, rows = read_rows(path)
    assert len(set(header)) == len(header), f"{path.name}: repeated columns in {header}"
    bad = [(line, len(row)) for line, row in enumerate(rows, start=2) if len(row) != len(header)]
    assert not bad, f"{path.name}: header has {len(header)} columns; (line, cells) of rows that do not: {bad}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_header_is_the_schema_of_its_script(path, scripts):
    # the longest script name the file is named by: students_study_long.csv is students_study's, not students'
    names = [name for name in CSV_SCRIPTS if path.stem == name or path.stem.startswith(name + "_")]
    owners = [name for name in names if len(name) == max(map(len, names), default=0)]
    assert len(owners) == 1, f"{path.name}: expected one script that writes it, found {owners}"
    header, _ = read_rows(path)
    assert tuple(header) == scripts[owners[0]].COLUMNS


def test_every_script_with_a_csv_is_listed():
    writers = {p.stem for p in BENCHMARKS.glob("*.py") if "csv_argument(ap, " in p.read_text()}
    assert writers == set(CSV_SCRIPTS)


@pytest.mark.parametrize("name", CSV_SCRIPTS)
def test_default_csv_is_under_results_from_any_directory(name, scripts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = scripts[name].parser().parse_args([]).csv
    assert path.is_absolute() and path.parent == RESULTS and path.name == f"{name}.csv"


def test_writer_appends_rows_under_one_header(common, tmp_path):
    path = tmp_path / "out" / "speed.csv"
    out = common.ResultsFile(path, ("case", "seconds"))
    out.append([{"case": "a", "seconds": 1.5}])
    common.ResultsFile(path, ("case", "seconds")).append([{"seconds": 2, "case": "b"}])
    assert read_rows(path) == (["case", "seconds"], [["a", "1.5"], ["b", "2"]])


@pytest.mark.parametrize("row, words", [({"case": "a"}, "missing ['seconds']"),
                                        ({"case": "a", "seconds": 1, "extra": 0}, "unexpected ['extra']")])
def test_writer_refuses_a_row_of_another_shape(common, tmp_path, row, words):
    path = tmp_path / "speed.csv"
    with pytest.raises(ValueError, match=r"speed\.csv: row 0 has columns") as err:
        common.ResultsFile(path, ("case", "seconds")).append([row])
    assert words in str(err.value)
    assert not path.exists()


def test_writer_refuses_a_file_with_another_header(common, tmp_path):
    path = tmp_path / "speed.csv"
    before = b"case,seconds\r\na,1\r\n"
    path.write_bytes(before)
    with pytest.raises(ValueError) as err:
        common.ResultsFile(path, ("case", "seconds", "commit"))
    message = str(err.value)
    for words in (str(path), "['case', 'seconds']", "['case', 'seconds', 'commit']", "missing ['commit']",
                  "Write to a new file"):
        assert words in message
    assert path.read_bytes() == before


def test_every_script_is_in_the_readme_table():
    """benchmarks/README.md's table names every script (the shared modules are described below it)."""
    text = (BENCHMARKS / "README.md").read_text()
    listed = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    scripts = {p.name for p in BENCHMARKS.glob("*.py")} - {"common.py", "kd_common.py"}
    assert scripts - listed == set(), f"scripts missing from benchmarks/README.md: {sorted(scripts - listed)}"
    assert listed - scripts == set(), f"benchmarks/README.md lists scripts that do not exist: {sorted(listed - scripts)}"

"""What README.md and docs/*.md point at exists: every relative link (and its #anchor), every project
path (``logitcache/…``, ``tests/…::test_name``, ``benchmarks/…``, a bare ``name.py`` or ``NAME.md``), and
every ``logitcache.x.y`` module or attribute (imported, as a reader would)."""

from __future__ import annotations

import fnmatch
import importlib
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./:~$-])([\w.-]+(?:/[\w.*-]+)+/?)(?:::(\w+))?")
BARE_FILE = re.compile(r"(?<![\w./-])([\w-]+\.(?:py|md))(?![\w/])")
MODULE = re.compile(r"(?<![\w.])logitcache(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"from (logitcache[\w.]*) import ([\w, ]+)")
HEADING = re.compile(r"^#+\s+(.*)$", re.M)


def ignored_names() -> list[str]:
    """Directory patterns of .gitignore (``/cache/``, ``*.egg-info/``): not project files."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return [line.strip("/") for line in lines if line and not line.startswith("#")] + [".*"]


def project_files() -> list[Path]:
    skip = ignored_names()
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, pattern) for pattern in skip)]
        found += [Path(folder, name).relative_to(ROOT) for name in files]
    return found


FILES = project_files()
# top-level folders holding code or docs: a path under one is a project path (`cache/x`, `runs/y` are not)
TOPS = {p.parts[0] for p in FILES if len(p.parts) > 1 and p.suffix in (".py", ".md")}
NAMES = {p.name for p in FILES}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(doc.read_text())}


def link_problems(doc: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(text):
        if re.match(r"\w+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"link to {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"link to {target}: {file.name} has no heading with anchor #{anchor}")
    return problems


def project_matches(path: str) -> list[Path]:
    """The file or folder ``path`` names: itself, a glob's matches, or the files a script writes from a
    name prefix (``--png docs/img/students`` writes ``students_gap.png``, ...)."""
    if (ROOT / path).exists():
        return [ROOT / path]
    return sorted(ROOT.glob(path if "*" in path else path + "_*"))


def path_problems(text: str) -> list[str]:
    problems = []
    for path, name in PATH.findall(text):
        path = path.rstrip(".")
        if path.split("/")[0] in TOPS:
            matches = project_matches(path)
            if not matches:
                problems.append(f"{path} does not exist")
            elif name and not re.search(rf"^\s*(def|class) {name}\b", matches[0].read_text(), re.M):
                problems.append(f"{path} defines no {name}")
        elif path.endswith(".py") and not any(str(p).endswith("/" + path) for p in FILES):
            problems.append(f"no project file is {path}")
    problems += [f"no project file is named {name}" for name in BARE_FILE.findall(text) if name not in NAMES]
    return problems


def resolve(dotted: str) -> None:
    """Import the longest importable prefix of ``dotted``, then the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as error:
            if not error.name or not dotted.startswith(error.name):
                raise
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return


def module_problems(text: str) -> list[str]:
    names = set(MODULE.findall(text))
    for module, imported in FROM_IMPORT.findall(text):
        names |= {f"{module}.{name.strip()}" for name in imported.split(",") if name.strip()}
    problems = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            problems.append(f"{name} does not resolve: {error}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_the_docs_point_at_exists(doc: Path):
    text = doc.read_text()
    prose = LINK.sub("]", text)  # link targets are checked (relative to the doc) by link_problems
    problems = link_problems(doc, text) + path_problems(prose) + module_problems(text)
    assert not problems, f"{doc.relative_to(ROOT)} points at what is not there; fix the text: {problems}"


def test_the_checks_catch_stale_references(tmp_path):
    doc = tmp_path / "x.md"
    text = ("[a](missing.md) [b](#nowhere) see RESEARCH.md, `benchmarks/fault_matrix.py`, "
            "`tests/unit/test_capture.py::test_that_is_not_there`, `teachers/nothing.py`, "
            "`logitcache.dataset.CacheDataset`, `from logitcache.store import no_such_name`\n# Title\n")
    doc.write_text(text)
    assert len(link_problems(doc, text)) == 2
    assert path_problems(LINK.sub("]", text)) == [
        "benchmarks/fault_matrix.py does not exist", "tests/unit/test_capture.py defines no test_that_is_not_there",
        "no project file is teachers/nothing.py", "no project file is named RESEARCH.md"]
    assert [p.split(" ")[0] for p in module_problems(text)] == [
        "logitcache.dataset.CacheDataset", "logitcache.store.no_such_name"]

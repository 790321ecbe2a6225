"""The test suite's own layout: no test file imports another test file (what several files share lives
in tests/helpers.py or logitcache/testing/), and every test under tests/integration is marked
``integration`` by tests/conftest.py, so ``-m "not integration"`` runs none of them; a test marked
``gpu`` runs where CUDA is and is skipped elsewhere."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def is_test_file(name: str) -> bool:
    return name.startswith("test_") or name == "conftest"


def imported_names(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, last dotted part) of every module an import statement names, nested imports included:
    ``import a.b`` gives ``b``, ``from .a import b`` gives ``a`` and ``b`` (``b`` may be a module)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name.rsplit(".", 1)[-1]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.append((node.lineno, node.module.rsplit(".", 1)[-1]))
            if node.level or not node.module:  # ``from . import x``: x may be a sibling file
                names += [(node.lineno, alias.name) for alias in node.names]
    return names


def imports_of_test_files(root: Path) -> list[str]:
    """``path:line imports test_x`` for each import of a test file by any file under ``root``."""
    files = sorted(root.rglob("*.py"))
    test_modules = {p.stem for p in files if is_test_file(p.stem)}
    found = []
    for path in files:
        for line, name in imported_names(ast.parse(path.read_text(), str(path))):
            if name in test_modules:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_no_test_file_imports_another():
    found = imports_of_test_files(TESTS)
    assert not found, ("test files import other test files; move what they share into tests/helpers.py "
                       f"and import it from there: {found}")


def test_the_import_check_sees_every_form(tmp_path):
    (tmp_path / "unit").mkdir()
    (tmp_path / "unit" / "test_a.py").write_text("X = 1\n")
    (tmp_path / "helpers.py").write_text("import os\n")
    (tmp_path / "unit" / "test_b.py").write_text(
        "from helpers import os\nfrom test_a import X\nimport test_a\nfrom . import test_a\n"
        "def f():\n    from .test_a import X\n")
    assert imports_of_test_files(tmp_path) == [f"unit/test_b.py:{n} imports test_a" for n in (2, 3, 4, 6)]


def run_pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args],
                          capture_output=True, text=True, cwd=TESTS.parent)


def test_integration_folder_is_marked_integration():
    result = run_pytest("--collect-only", "-m", "not integration", "tests/integration")
    assert result.returncode == 5, result.stdout + result.stderr  # 5: no test selected, and none failed to import
    deselected = re.search(r"\((\d+) deselected\)", result.stdout)
    assert deselected and int(deselected.group(1)) > 0, result.stdout


def test_gpu_tests_run_only_with_cuda():
    import torch

    result = run_pytest("-rs", "-m", "gpu", "tests/unit/test_teacher_hf.py")
    if torch.cuda.is_available():
        assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout
    else:
        assert "1 skipped" in result.stdout and "marked gpu: needs CUDA" in result.stdout, result.stdout

"""The repository stands alone and stays clean: ruff passes, no file names notes outside the repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files():
    for folder in ("mlpmemory", "tests", "benchmarks", "recipes", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".sh", ".toml"):
                yield path
    yield from (ROOT / name for name in ("README.md", "pyproject.toml", "setup.sh"))


def test_no_reference_to_notes_outside_the_repository():
    outside = ("METHOD" + ".md", "DATA" + ".md", "../" + "shared")  # split so this file does not match itself
    hits = [f"{p.relative_to(ROOT)}: {word}" for p in _tracked_text_files() for word in outside
            if word in p.read_text(encoding="utf-8")]
    assert not hits, hits


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    res = subprocess.run([ruff, "check", "mlpmemory", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:]

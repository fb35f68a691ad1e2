"""The code stays clean by the project's own configuration (pyproject.toml): ruff on the package, tests, benchmarks
and examples; mypy on the package."""
import shutil
import subprocess
import sys

import pytest
from helpers.paths import REPO


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or pytest.fail("ruff is not installed (pip install -e '.[test]')")
    done = run(ruff, "check", "gavel", "tests", "benchmarks", "examples")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_finds_nothing():
    done = run(sys.executable, "-m", "mypy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout

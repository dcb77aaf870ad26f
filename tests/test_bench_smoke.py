"""Every benchmark still runs (``python -m bench NAME --smoke``), so none can rot.

Smoke runs prove the benchmark works end to end against PostgreSQL; the
numbers of a few iterations mean nothing and are not checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import BENCHMARKS

BASE_DIR = Path(__file__).resolve().parent.parent


def run_bench(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_in_smoke_mode(name, test_database_url):
    result = run_bench(name, "--smoke", database_url=test_database_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"== {name} (smoke) ==" in result.stdout


def test_connect_benchmark_prints_both_sides_and_the_ratio(test_database_url):
    result = run_bench("connect", "--smoke", database_url=test_database_url)
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert {"raw psycopg", "lockngen", "ratio ours/raw"} <= rows.keys()
    assert "10 iterations each" in result.stdout
    assert "median ratio" in result.stdout


def test_unknown_benchmark_is_refused_with_the_choices(test_database_url):
    result = run_bench("no-such-bench", database_url=test_database_url)
    assert result.returncode == 2
    assert "connect" in result.stderr

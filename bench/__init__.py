"""Benchmarks that print side-by-side ratios (SPEC §9); not tests.

Run ``python -m bench [NAME ...] [--smoke]``. Every module in this package
that defines ``run(*, smoke: bool) -> bool`` is a benchmark named after the
module; its docstring's first line is its description. ``run`` prints its own
table and returns whether the targets were met (``--smoke``: a few
iterations, only proving that the benchmark still works).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence


def setup_django() -> None:
    """Configure Django from the environment exactly as the service does."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")
    import django

    django.setup()


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 500 samples is the 5th slowest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "p99": percentile(samples, 99),
        "mean": statistics.fmean(samples),
        "min": min(samples),
    }

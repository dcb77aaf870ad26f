"""Benchmarks that print side-by-side ratios (SPEC §9); not tests.

Run ``python -m bench [NAME ...] [--smoke]``. ``BENCHMARKS`` is the
registry: a name, a description and the ``module:function`` that runs it,
imported only when it runs (nothing here sets Django up on import). The
function takes ``smoke``, prints its own table and returns whether the
targets were met (``--smoke``: a few iterations, only proving that the
benchmark still works).
"""

from __future__ import annotations

import importlib
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    target: str  # "module:function", the function taking ``smoke``

    def run(self, *, smoke: bool) -> bool:
        module, function = self.target.split(":")
        run: Callable[..., bool] = getattr(importlib.import_module(module), function)
        return run(smoke=smoke)


BENCHMARKS = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark(
            "claims",
            "claims: 1-8 workers, batches, 100 keys, latency, caps vs the bare view",
            "bench.claims:run",
        ),
        Benchmark(
            "connect",
            "new connection + SELECT 1: our backend vs raw psycopg.connect",
            "bench.connect:run",
        ),
        Benchmark(
            "modes",
            "the read path with persistent connections, the pool, none",
            "bench.modes:run",
        ),
        Benchmark(
            "read",
            "GET /api/v1/generations/{id} vs a bare Django view",
            "bench.paths:read",
        ),
        Benchmark(
            "scale",
            "1,000,000 generations; first page vs 10,000 rows deep; plans",
            "bench.scale:run",
        ),
        Benchmark(
            "webhooks",
            "complete -> receiver latency at 50/s, backlog, complete's cost",
            "bench.webhooks:run",
        ),
        Benchmark(
            "write",
            "POST /api/v1/generations vs a bare Django view",
            "bench.paths:write",
        ),
    )
}


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

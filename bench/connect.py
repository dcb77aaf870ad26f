"""New connection + SELECT 1: our backend vs raw psycopg.connect (SPEC §9).

Each iteration of "ours" builds a fresh Django ``DatabaseWrapper`` from the
service's own ``DATABASES["default"]`` (health checks, retries, startup
options and all), connects, runs ``SELECT 1`` through a Django cursor and
closes. "raw" is ``psycopg.connect`` to the same server with the same
libpq parameters (host, port, user, password, dbname, sslmode), ``SELECT 1``,
close. The two alternate (A B A B ...) so drift on the machine hits both.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from bench import summary

ITERATIONS = 500
SMOKE_ITERATIONS = 10
WARMUP = 20
MEDIAN_RATIO_TARGET = 1.3
P99_CEILING_MS = 100.0
ALIAS = "bench_connect"


def raw_params(settings_dict: dict[str, Any]) -> dict[str, Any]:
    options = settings_dict["OPTIONS"]
    params = {
        "host": settings_dict["HOST"],
        "port": settings_dict["PORT"],
        "user": settings_dict["USER"],
        "password": settings_dict["PASSWORD"],
        "dbname": settings_dict["NAME"],
        "sslmode": options.get("sslmode"),
        "connect_timeout": options.get("connect_timeout"),
    }
    return {key: value for key, value in params.items() if value not in ("", None)}


def make_ours(settings_dict: dict[str, Any]) -> Callable[[], None]:
    from django.db.utils import load_backend

    wrapper_class = load_backend(settings_dict["ENGINE"]).DatabaseWrapper

    def ours() -> None:
        wrapper = wrapper_class(copy.deepcopy(settings_dict), ALIAS)
        wrapper.ensure_connection()
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        wrapper.close()

    return ours


def make_raw(settings_dict: dict[str, Any]) -> Callable[[], None]:
    import psycopg

    params = raw_params(settings_dict)

    def raw() -> None:
        connection = psycopg.connect(**params)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        connection.close()

    return raw


def measure(
    cases: dict[str, Callable[[], None]], iterations: int
) -> dict[str, list[float]]:
    """Milliseconds per call of each case, interleaved A B A B."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(iterations):
        for name, case in cases.items():
            started = time.perf_counter()
            case()
            samples[name].append((time.perf_counter() - started) * 1000)
    return samples


def run(*, smoke: bool = False) -> bool:
    from django.db import connections

    settings_dict = connections.settings["default"]
    if settings_dict["ENGINE"] != "lockngen.db":
        raise SystemExit("bench connect needs DATABASE_URL to point at PostgreSQL")
    settings_dict = copy.deepcopy(settings_dict)
    if settings_dict["OPTIONS"].get("pool"):
        # A pool would measure a checkout, not connection establishment.
        del settings_dict["OPTIONS"]["pool"]
        settings_dict["CONN_MAX_AGE"] = 0

    cases = {
        "raw psycopg": make_raw(settings_dict),
        "lockngen": make_ours(settings_dict),
    }
    iterations = SMOKE_ITERATIONS if smoke else ITERATIONS
    measure(cases, 2 if smoke else WARMUP)  # imports, first-connection checks
    samples = measure(cases, iterations)

    stats = {name: summary(values) for name, values in samples.items()}
    raw, ours = stats["raw psycopg"], stats["lockngen"]
    ratio = {key: ours[key] / raw[key] for key in raw}
    print(
        f"new connection + SELECT 1, {iterations} iterations each, interleaved; "
        f"{settings_dict['HOST'] or 'localhost'}:{settings_dict['PORT'] or 5432}"
    )
    print(f"{'':16}{'median ms':>11}{'p99 ms':>10}{'mean ms':>10}{'min ms':>10}")
    for name, row in stats.items():
        print(
            f"{name:16}{row['median']:11.3f}{row['p99']:10.3f}"
            f"{row['mean']:10.3f}{row['min']:10.3f}"
        )
    print(
        f"{'ratio ours/raw':16}{ratio['median']:11.2f}{ratio['p99']:10.2f}"
        f"{ratio['mean']:10.2f}{ratio['min']:10.2f}"
    )
    median_ok = ratio["median"] <= MEDIAN_RATIO_TARGET
    p99_ok = ours["p99"] <= P99_CEILING_MS
    print(
        f"median ratio {ratio['median']:.2f} (target <= {MEDIAN_RATIO_TARGET}): "
        f"{'met' if median_ok else 'MISSED'}; "
        f"p99 {ours['p99']:.1f} ms (ceiling {P99_CEILING_MS:.0f} ms): "
        f"{'met' if p99_ok else 'MISSED'}"
    )
    return median_ok and p99_ok

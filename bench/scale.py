"""Scale: 1,000,000 generations; first page vs 10,000 rows deep; plans (SPEC §9).

A scratch database gets 10,000 API keys and 1,000,000 generations from one
``INSERT … SELECT generate_series`` (created_at spread 30 s apart over a
year; 1% queued, 1% running with live leases, the rest terminal; 0.2%
soft-deleted); then ``VACUUM ANALYZE``. Two heavy keys:

- the big key: every 5th row, 200,000 spread over the whole year;
- the quiet key: 100,000 rows, all in the oldest eighth of the year (a
  heavy client that went quiet): its newest row is older than 800,000 others.

Latency: the big key's first page and a page 10,000 rows deep (its cursor
reached by following ``next`` links), and the quiet key's first page, through
``GET /api/v1/generations`` under gunicorn, alternated, one request at a
time, the same ``page_size``. Target: deep p50 ≤ 1.2 × first-page p50
(keyset pagination); the quiet key's first page should cost what the big
key's does.

Plans: the SQL the API itself issues — captured with
``CaptureQueriesContext`` around in-process requests (list pages with the key
lookup by ``key_hash``; the claim's one statement, in a transaction rolled
back) — run again under ``EXPLAIN (ANALYZE, BUFFERS)``; each must scan the
indexes made for it.
"""

from __future__ import annotations

import http.client
import statistics
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from bench import percentile, server

ROWS = 1_000_000
KEYS = 10_000
DEPTH = 10_000
SAMPLES = 200
SMOKE_ROWS = 2_000
SMOKE_SAMPLES = 20
PAGE_SIZE = 20
WALK_PAGE_SIZE = 100
RATIO_TARGET = 1.2
BIG_KEY_SHARE = 5  # every 5th row belongs to the big key: 200,000 of 1,000,000
QUIET_KEY_SPAN = 8  # the quiet key: 4 of 5 rows in the oldest eighth (100,000)
SERIES_BUDGET_SECONDS = 15  # a slow series stops early (at least 5 samples)

KEYS_SQL = """
INSERT INTO api_keys
    (id, name, key_hash, key_prefix, is_admin, rate_limit, created_at, is_deleted)
SELECT gen_random_uuid(), 'bench key ' || i,
       encode(sha256(convert_to('bench-key-' || i, 'UTF8')), 'hex'),
       'lk_' || lpad(i::text, 8, '0'), false, 100, now(), false
FROM generate_series(1, %(keys)s) AS i
"""

# i % 100: 0 queued, 1 running (lease 5 min ahead), 2 failed, 3 cancelled,
# else completed. Every timestamp satisfies the table's CHECK constraints.
ROWS_SQL = """
WITH others AS (
    SELECT array_agg(id ORDER BY id) AS ids, count(*) AS n
    FROM api_keys WHERE id NOT IN (%(big)s, %(quiet)s, %(admin)s)
)
INSERT INTO generations
    (id, name, prompt, model, width, height, steps, guidance, seed, status,
     created_at, updated_at, started_at, completed_at, duration_ms,
     lease_expires_at, attempts, output_path, api_key_id, is_deleted, deleted_at)
SELECT gen_random_uuid(), 'gen ' || i,
       'benchmark prompt number ' || i || ', a lighthouse at dusk',
       'sdxl', 1024, 1024, 20, 7.5, i,
       CASE i %% 100 WHEN 0 THEN 0 WHEN 1 THEN 1 WHEN 2 THEN 3 WHEN 3 THEN 4
            ELSE 2 END,
       t.created,
       CASE WHEN i %% 100 <> 0 THEN t.created + interval '10 seconds' END,
       CASE WHEN i %% 100 NOT IN (0, 3) THEN t.created + interval '1 second' END,
       CASE WHEN i %% 100 NOT IN (0, 1) THEN t.created + interval '10 seconds' END,
       CASE WHEN i %% 100 NOT IN (0, 1, 3) THEN 9000 END,
       CASE WHEN i %% 100 = 1 THEN now() + interval '5 minutes' END,
       CASE WHEN i %% 100 IN (0, 3) THEN 0 ELSE 1 END,
       CASE WHEN i %% 100 > 3 THEN 'outputs/' || i || '.png' END,
       CASE WHEN i %% %(share)s = 0 THEN %(big)s
            WHEN i <= %(rows)s / %(span)s THEN %(quiet)s
            ELSE others.ids[1 + i %% others.n] END,
       i %% 500 = 7,
       CASE WHEN i %% 500 = 7 THEN t.created + interval '1 day' END
FROM others,
     generate_series(1, %(rows)s) AS i,
     LATERAL (SELECT now() - (%(rows)s - i) * interval '30 seconds' AS created) AS t
"""

# Which captured statement is which, and the indexes it must use.
PLANS = {
    "list, big key, first page": ("generations_key_list_idx",),
    "list, big key, deep page": ("generations_key_list_idx",),
    "list, quiet key, first page": ("generations_key_list_idx",),
    "key lookup (key_hash)": ("api_keys_key_hash",),
    # Keys in turn, then the chosen key's oldest job (generations.claims).
    "claim": ("key_queues_turn_idx", "generations_lane_head_idx"),
}


def populate(*, rows: int, keys: int, big: Any, quiet: Any, admin: Any) -> float:
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:  # autocommit: VACUUM needs no transaction
        # The service's statement_timeout (30 s) is for requests, not for
        # loading a million rows on a busy machine.
        cursor.execute("SET statement_timeout = 0")
        cursor.execute(KEYS_SQL, {"keys": keys})
        cursor.execute(
            ROWS_SQL,
            {
                "rows": rows,
                "big": big,
                "quiet": quiet,
                "admin": admin,
                "share": BIG_KEY_SHARE,
                "span": QUIET_KEY_SPAN,
            },
        )
        cursor.execute("VACUUM ANALYZE generations")
        cursor.execute("VACUUM ANALYZE api_keys")
    return time.perf_counter() - started


def local_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def with_page_size(path: str, page_size: int) -> str:
    parts = urlsplit(path)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "page_size"]
    query.append(("page_size", str(page_size)))
    return f"{parts.path}?{urlencode(query)}"


class Client:
    """One keep-alive connection, one request at a time."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
        self.headers = {**server.PROXY_HEADERS, **headers}

    def get(self, path: str) -> tuple[float, dict[str, Any]]:
        import json

        started = time.perf_counter()
        self.connection.request("GET", path, headers=self.headers)
        response = self.connection.getresponse()
        body = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
        return elapsed, json.loads(body)

    def close(self) -> None:
        self.connection.close()


def deep_page(client: Client, depth: int) -> str:
    """The path of the page starting ``depth`` rows down, by following ``next``."""
    path = f"/api/v1/generations?page_size={WALK_PAGE_SIZE}"
    for _ in range(depth // WALK_PAGE_SIZE):
        _, page = client.get(path)
        if not page.get("next"):
            raise RuntimeError(f"fewer than {depth} rows for the key")
        path = local_path(page["next"])
    return with_page_size(path, PAGE_SIZE)


def explain(sql: str) -> list[str]:
    from django.db import connection, transaction

    # FOR UPDATE takes row locks when analysed: never keep them.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        lines = [row[0] for row in cursor.fetchall()]
        transaction.set_rollback(True)
    return lines


def key_lines(plan: list[str]) -> list[str]:
    keep = ("->", "Index Cond", "Filter:", "Buffers", "Execution Time")
    out = [plan[0]]
    out += [line for line in plan[1:] if any(mark in line for mark in keep)]
    return out


def capture(
    first: str, deep: str, raw_key: str, quiet_raw: str, admin_raw: str
) -> dict[str, str]:
    """The SQL the API issues for a list page, a key lookup and a claim."""
    from django.db import connection, transaction
    from django.test import Client as TestClient
    from django.test.utils import CaptureQueriesContext, override_settings

    def queries(method: str, path: str, key: str, status: set[int]) -> list[str]:
        client = TestClient(HTTP_X_API_KEY=key, HTTP_X_FORWARDED_PROTO="https")
        body = (
            {"data": "{}", "content_type": "application/json"}
            if method == "post"
            else {}
        )
        with CaptureQueriesContext(connection) as captured:
            response = getattr(client, method)(path, **body)
        if response.status_code not in status:
            raise RuntimeError(f"{method} {path}: {response.status_code}")
        return [query["sql"] for query in captured.captured_queries]

    def pick(sqls: list[str], *needles: str) -> str:
        for sql in sqls:
            if all(needle in sql for needle in needles):
                return sql
        raise RuntimeError(f"no captured query has {needles}: {sqls}")

    found: dict[str, str] = {}
    with override_settings(ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="lockngen.urls"):
        first_sqls = queries("get", first, raw_key, {200})
        deep_sqls = queries("get", deep, raw_key, {200})
        quiet_sqls = queries("get", first, quiet_raw, {200})
        with transaction.atomic():
            claim_sqls = queries("post", "/api/v1/generations/claim", admin_raw, {200})
            transaction.set_rollback(True)
    names = list(PLANS)
    found[names[0]] = pick(first_sqls, 'FROM "generations"', "ORDER BY")
    found[names[1]] = pick(deep_sqls, 'FROM "generations"', "ORDER BY")
    found[names[2]] = pick(quiet_sqls, 'FROM "generations"', "ORDER BY")
    found[names[3]] = pick(first_sqls, 'FROM "api_keys"', '"key_hash"')
    found[names[4]] = pick(claim_sqls, "SKIP LOCKED", "generation_key_queues")
    return found


def uses_index(plan: list[str], indexes: tuple[str, ...]) -> bool:
    text = "\n".join(plan)
    return (
        all(f" using {index}" in text.lower() for index in indexes)
        and "Seq Scan on generations" not in text
        and "Seq Scan on api_keys" not in text
    )


def sample(
    series: dict[str, tuple[Client, str]], samples: int
) -> dict[str, list[float]]:
    """Alternate the series, one request at a time; ms per request."""
    timings: dict[str, list[float]] = {name: [] for name in series}
    spent = dict.fromkeys(series, 0.0)
    for _ in range(max(3, samples // 10)):  # warm caches and workers
        for client, path in series.values():
            client.get(path)
    for _ in range(samples):
        for name, (client, path) in series.items():
            if spent[name] > SERIES_BUDGET_SECONDS * 1000 and len(timings[name]) >= 5:
                continue
            elapsed, page = client.get(path)
            if len(page["results"]) != PAGE_SIZE:
                raise RuntimeError(f"{name}: short page")
            timings[name].append(elapsed)
            spent[name] += elapsed
    return timings


def run(*, smoke: bool = False) -> bool:
    from apikeys.services import api_key_create

    load_at_start = server.machine()
    rows = SMOKE_ROWS if smoke else ROWS
    keys = 1_000 if smoke else KEYS
    samples = SMOKE_SAMPLES if smoke else SAMPLES
    big_rows = rows // BIG_KEY_SHARE
    quiet_rows = rows // QUIET_KEY_SPAN - big_rows // QUIET_KEY_SPAN
    depth = min(DEPTH, big_rows // 2 // WALK_PAGE_SIZE * WALK_PAGE_SIZE)
    with server.scratch_database() as url:
        big, big_raw = api_key_create(name="bench big key", rate_limit=0)
        quiet, quiet_raw = api_key_create(name="bench quiet key", rate_limit=0)
        admin, admin_raw = api_key_create(
            name="bench worker", is_admin=True, rate_limit=0
        )
        seconds = populate(
            rows=rows, keys=keys, big=big.pk, quiet=quiet.pk, admin=admin.pk
        )
        print(
            f"dataset: {rows:,} generations (big key {big_rows:,} spread over the "
            f"year, quiet key {quiet_rows:,} all in its oldest eighth), "
            f"{keys + 3:,} keys; INSERT … SELECT generate_series + VACUUM ANALYZE "
            f"in {seconds:.1f} s"
        )
        first = f"/api/v1/generations?page_size={PAGE_SIZE}"
        with server.gunicorn(url) as srv:
            client = Client(srv.port, {"X-API-Key": big_raw})
            quiet_client = Client(srv.port, {"X-API-Key": quiet_raw})
            try:
                deep = deep_page(client, depth)
                series = {
                    "big key, first page": (client, first),
                    f"big key, {depth:,} rows deep": (client, deep),
                    "quiet key, first page": (quiet_client, first),
                }
                timings = sample(series, samples)
            finally:
                client.close()
                quiet_client.close()
        plans = {
            name: explain(sql)
            for name, sql in capture(first, deep, big_raw, quiet_raw, admin_raw).items()
        }

    stats = {
        name: (statistics.median(values), percentile(values, 99), len(values))
        for name, values in timings.items()
    }
    names = list(series)
    ratio = stats[names[1]][0] / stats[names[0]][0]
    quiet_ratio = stats[names[2]][0] / stats[names[0]][0]
    print(
        f"GET /api/v1/generations?page_size={PAGE_SIZE} through gunicorn, one "
        f"request at a time, series alternated (up to {samples} samples each)"
    )
    print(f"{'page':32}{'p50 ms':>9}{'p99 ms':>9}{'samples':>9}")
    for name, (p50, p99, count) in stats.items():
        print(f"{name:32}{p50:9.2f}{p99:9.2f}{count:9d}")
    print(f"{'ratio deep/first (big key)':32}{ratio:9.2f}")
    print(f"{'ratio quiet/big first page':32}{quiet_ratio:9.2f}")

    indexed = True
    for name, plan in plans.items():
        ok = uses_index(plan, PLANS[name])
        indexed = indexed and ok
        wanted = " and ".join(PLANS[name])
        verdict = f"uses {wanted}" if ok else f"does NOT use {wanted}"
        print(f"-- {name}: {verdict}")
        for line in key_lines(plan):
            print(f"   {line}")
    met = ratio <= RATIO_TARGET and indexed
    print(
        f"deep/first p50 {ratio:.2f} (target <= {RATIO_TARGET}); quiet/big first "
        f"page {quiet_ratio:.2f}; planned indexes: "
        f"{'all used' if indexed else 'NOT all used'}: {'met' if met else 'MISSED'}"
    )
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return met

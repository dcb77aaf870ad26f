"""Claims: 1, 2, 4, 8 workers draining the queue over HTTP (SPEC §9).

For each worker count a scratch database gets N queued jobs (one
``INSERT … SELECT generate_series``, created_at 1 ms apart), then that many
threads — each with its own keep-alive connection and its own admin worker
key (``rate_limit=0``) — call ``POST /api/v1/generations/claim`` through
gunicorn (``gunicorn.conf.py``, production settings) until it answers 204.
Reported: claims/s, and the proof that every job was claimed exactly once:
no id received twice, every job received, every row ``running`` with
``attempts = 1`` and a lease token of its own (the one its claim answered
with), none left queued.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from bench import server

WORKERS = (1, 2, 4, 8)
# 10,000 per run would take ~7 minutes at the ~100 claims/s this 2-core
# machine manages (docs/PERFORMANCE.md, "Claims"): make bench stays < 10 min.
JOBS = 3_000
SMOKE_JOBS = 200
DEADLINE_SECONDS = 120  # per worker count: a stuck run ends, and fails
CLAIM = "/api/v1/generations/claim"

QUEUE_SQL = """
INSERT INTO generations (id, prompt, status, created_at, attempts, is_deleted)
SELECT gen_random_uuid(), 'queued job ' || i, 0,
       now() - (%(jobs)s - i) * interval '1 millisecond', 0, false
FROM generate_series(1, %(jobs)s) AS i
"""

CHECK_SQL = """
SELECT count(*),
       count(DISTINCT lease_token) FILTER (
           WHERE status = 1 AND attempts = 1 AND started_at IS NOT NULL
                 AND lease_expires_at > now()),
       count(*) FILTER (WHERE status = 0)
FROM generations
"""


def refill(jobs: int) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        # With their webhook deliveries (a foreign key to generations).
        cursor.execute("TRUNCATE generations, webhook_deliveries")
        cursor.execute(QUEUE_SQL, {"jobs": jobs})
        cursor.execute("ANALYZE generations")


def drain(port: int, raw_keys: list[str]) -> tuple[float, list[list[str]], int]:
    """Every worker claims until 204; returns (seconds, ids per worker, errors)."""
    received: list[list[str]] = [[] for _ in raw_keys]
    errors = [0] * len(raw_keys)
    start = threading.Barrier(len(raw_keys) + 1)
    deadline = time.monotonic() + DEADLINE_SECONDS

    def worker(index: int) -> None:
        headers = {**server.PROXY_HEADERS, "X-API-Key": raw_keys[index]}
        connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
        start.wait()
        try:
            while time.monotonic() < deadline:
                connection.request("POST", CLAIM, headers=headers)
                response = connection.getresponse()
                body = response.read()
                if response.status == 204:
                    return
                if response.status != 200:
                    errors[index] += 1
                    continue
                job = json.loads(body)
                received[index].append(f"{job['id']} {job['lease_token']}")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=worker, args=(index,), daemon=True)
        for index in range(len(raw_keys))
    ]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(DEADLINE_SECONDS + 30)
    return time.perf_counter() - started, received, sum(errors)


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    from apikeys.services import api_key_create

    load_at_start = server.machine()
    jobs = SMOKE_JOBS if smoke else JOBS
    rows = []
    with server.scratch_database() as url:
        raw_keys = [
            api_key_create(name=f"bench worker {n}", is_admin=True, rate_limit=0)[1]
            for n in range(max(WORKERS))
        ]
        with server.gunicorn(url) as srv:
            refill(50)  # warm up the worker processes and their connections
            drain(srv.port, raw_keys[:2])
            for workers in WORKERS:
                refill(jobs)
                seconds, received, errors = drain(srv.port, raw_keys[:workers])
                claims = [job for batch in received for job in batch]
                ids = [claim.split()[0] for claim in claims]
                with connection.cursor() as cursor:
                    cursor.execute(CHECK_SQL)
                    total, running_once, queued = cursor.fetchone()
                rows.append(
                    {
                        "workers": workers,
                        "seconds": seconds,
                        "claims": len(ids),
                        "duplicates": len(ids) - len(set(ids)),
                        "tokens": len({claim.split()[1] for claim in claims}),
                        "running_once": running_once,
                        "queued": queued,
                        "errors": errors,
                        "total": total,
                        "spread": sorted(len(batch) for batch in received),
                    }
                )
            describe = srv.describe()
    print(
        f"POST {CLAIM} until 204, {jobs:,} queued jobs per run; {describe}; "
        "workers are threads with one keep-alive connection and one admin key each"
    )
    print(
        f"{'workers':>7}{'claims':>8}{'seconds':>9}{'claims/s':>10}{'dupes':>7}"
        f"{'running, own token':>21}{'queued':>8}{'errors':>8}  per worker"
    )
    met = True
    for row in rows:
        exact = (
            row["claims"] == jobs
            and row["duplicates"] == 0
            and row["tokens"] == jobs
            and row["running_once"] == jobs == row["total"]
            and row["queued"] == 0
            and row["errors"] == 0
        )
        met = met and exact
        print(
            f"{row['workers']:>7}{row['claims']:>8}{row['seconds']:>9.2f}"
            f"{row['claims'] / row['seconds']:>10.0f}{row['duplicates']:>7}"
            f"{row['running_once']:>21}{row['queued']:>8}{row['errors']:>8}  "
            f"{row['spread'][0]}..{row['spread'][-1]}"
        )
    print(
        f"every job claimed exactly once at {', '.join(map(str, WORKERS))} workers: "
        f"{'met' if met else 'MISSED'}"
    )
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return met

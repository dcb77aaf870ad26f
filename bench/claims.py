"""Claims v2 (SPEC §9): throughput against the bare view, fairness, latency, caps.

One scratch database, one gunicorn (``gunicorn.conf.py``, production
settings, the layout ``bench read`` uses), and in the same run:

- the **bare Django view** of ``bench read`` (``/bench/generations/{id}``)
  at 8 connections: the baseline every ratio is taken against;
- **single claims** (``max=1``) at 1, 2, 4 and 8 workers, jobs spread over
  100 keys (claims/s);
- the same at 8 workers with every job on **one key** (100 keys ÷ one key);
- **batch claims** (``max=10``) at 8 workers (jobs/s);
- claim **latency** p50, one client claiming one job at a time, at 1,000
  queued jobs over 1,000 keys and at 100,000 over 1,000 keys, the two
  alternated claim by claim;
- a **capped** run: 10 of 50 keys with ``max_running=2``, 8 workers that
  claim batches and complete every job, a poller that counts running jobs
  per key all along: caps never exceeded, and every job completed once.

Load: wrk, the same client, threads (2) and connections as the read
benchmark, for the bare view and every claims row; each row's wrk threads
write every job id and lease token they receive to a file. Rows alternate
with the bare view round by round (``ROUNDS`` × ``DURATION`` s), each round
on a fresh queue (one ``TRUNCATE``, one ``INSERT … SELECT
generate_series``: the triggers keep ``generation_key_queues`` right), large
enough never to run dry (a 204 marks the round invalid). After every round:
no job received twice, every job received is ``running`` with
``attempts = 1`` and the lease token its claim answered with, no other job
is running (but the at most one claim per connection whose answer wrk cut
off when its run ended), and no key runs more than its ``max_running``.
Each row also gets the server's CPU per claim (gunicorn workers plus the
PostgreSQL backends, as in ``bench read``), steadier than req/s on a shared
machine. The two latency queues live in two scratch databases, one gunicorn
each, so they can be sampled claim by claim in turn.

``python -m bench.claims NAME=DIR NAME=DIR`` (``compare()``) runs single and
batch claims on one gunicorn per checkout against one database: a
before/after of the claim's code with everything else equal.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, percentile, server

CLAIM = "/api/v1/generations/claim"
WORKERS = (1, 2, 4, 8)
CONNECTIONS = 8  # the bare view's and the ratio rows' concurrency
BATCH = 10
MODELS = ("sdxl", "flux-dev", "sd15", "sd3")
SPREAD_KEYS = 100  # keys sharing the queue in the throughput rows
LATENCY_KEYS = 1_000
LATENCY_QUEUES = (1_000, 100_000)
WORKER_NAME = "bench"
WARM_UP_CLAIMS = 20  # latency: untimed claims on each side first
HELD_BY = "bench busy"  # claimed_by of hold_leases' jobs
RUNNING = 1_000  # the large latency queue: jobs held running besides it
REFILL_EVERY = 100  # latency: claims from the small queue between refills

# Targets (SPEC §9).
SINGLE_TARGET = 0.5  # claims/s at 8 workers / bare req/s
BATCH_TARGET = 3.0  # jobs/s at 8 workers, max=10 / bare req/s
KEYS_TARGET = 0.8  # claims/s, 100 keys / one key
LATENCY_TARGET = 1.5  # p50 at 100,000 queued / p50 at 1,000


@dataclass(frozen=True)
class Schedule:
    rounds: int
    duration: int  # seconds per wrk run
    single_jobs: int  # queued per single-claim round: more than a round takes
    batch_jobs: int
    latency_samples: int  # per queue size
    latency_queues: tuple[int, int]
    latency_keys: int
    capped_jobs_per_key: int


FULL = Schedule(
    rounds=3,
    duration=2,
    single_jobs=6_000,
    batch_jobs=24_000,
    latency_samples=300,
    latency_queues=LATENCY_QUEUES,
    latency_keys=LATENCY_KEYS,
    capped_jobs_per_key=20,
)
SMOKE = Schedule(
    rounds=1,
    duration=1,
    single_jobs=2_000,
    batch_jobs=4_000,
    latency_samples=20,
    latency_queues=(100, 1_000),
    latency_keys=100,
    capped_jobs_per_key=3,
)

BARE_ID = "00000000-0000-0000-0000-00000000b0a1"
# The row the bare view reads: the sample generation, cancelled (never
# claimable), put back after every TRUNCATE.
BARE_SQL = """
INSERT INTO generations (id, name, prompt, negative_prompt, width, height, steps,
                         guidance, seed, status, created_at, attempts, is_deleted)
VALUES (%(id)s, %(name)s, %(prompt)s, %(negative_prompt)s, %(width)s,
        %(height)s, %(steps)s, %(guidance)s, %(seed)s, 4, now(), 0, false)
"""

# Job i belongs to key i mod len(keys) and to model (i / len(keys)) mod
# len(models); created 1 ms apart, oldest first.
QUEUE_SQL = """
INSERT INTO generations (id, prompt, model, api_key_id, status, created_at,
                         attempts, is_deleted)
SELECT gen_random_uuid(), 'queued job ' || i,
       (%(models)s::varchar[])[(i / cardinality(%(keys)s::uuid[]))
                               %% cardinality(%(models)s::varchar[]) + 1],
       (%(keys)s::uuid[])[i %% cardinality(%(keys)s::uuid[]) + 1],
       0, now() - (%(jobs)s - i) * interval '1 millisecond', 0, false
FROM generate_series(0, %(jobs)s - 1) AS i
"""

# Keys running more jobs than their cap, from the jobs themselves (the
# truth) and from the counters the claim reads.
OVER_CAP_SQL = """
SELECT (SELECT count(*) FROM (
            SELECT g.api_key_id FROM generations g
            JOIN api_keys k ON k.id = g.api_key_id
            WHERE g.status = 1 AND k.max_running IS NOT NULL
            GROUP BY g.api_key_id, k.max_running
            HAVING count(*) > k.max_running) AS over),
       (SELECT count(*) FROM generation_key_queues WHERE running > max_running)
"""


def ensure_wrk(smoke: bool) -> str:
    wrk = load.ensure_wrk(install=not smoke)
    if not wrk:
        raise SystemExit("bench claims needs wrk (apt-get install -y wrk)")
    return wrk


def make_keys(count: int, prefix: str) -> list[str]:
    from apikeys.services import api_key_create

    # One INFO line per key would bury the table.
    logging.getLogger("apikeys.services").setLevel(logging.WARNING)
    return [
        str(api_key_create(name=f"{prefix} {n}", rate_limit=0)[0].pk)
        for n in range(count)
    ]


def make_workers(count: int) -> list[str]:
    """Worker keys (``is_worker``), unlimited (``rate_limit=0``): the raw keys."""
    from apikeys.services import api_key_create

    logging.getLogger("apikeys.services").setLevel(logging.WARNING)
    made = [
        api_key_create(name=f"bench worker {n}", is_worker=True, rate_limit=0)
        for n in range(count)
    ]
    return [raw for _, raw in made]


def refill(jobs: int, keys: list[str]) -> None:
    """A fresh queue: ``jobs`` queued jobs over ``keys``, plus the bare row."""
    from django.db import connection

    with connection.cursor() as cursor:
        # With their webhook deliveries (a foreign key to generations).
        cursor.execute("TRUNCATE generations, webhook_deliveries")
        cursor.execute(BARE_SQL, {**server.SAMPLE_GENERATION, "id": BARE_ID})
        cursor.execute(QUEUE_SQL, {"jobs": jobs, "keys": keys, "models": list(MODELS)})
        cursor.execute("ANALYZE generations, generation_key_queues")


@dataclass
class Audit:
    """What one round's claims received, held against the database."""

    received: int = 0
    duplicates: int = 0
    mismatched: int = 0  # received but not running with that token, attempts 1
    # Running but never received: claims whose answer was still on the wire
    # when wrk stopped at the end of its run (it drops in-flight requests).
    # At most one claim per connection; more would be a job handed out
    # without an answer.
    stray: int = 0
    stray_bound: int = 0
    over_cap: int = 0
    # Running jobs whose claimed_by is not the worker name the claim sent
    # (SPEC §5 keeps it); reported, not part of exactly-once.
    unnamed: int = 0
    empty: int = 0  # 204s: the queue ran dry (the round is not a fair rate)

    @property
    def exact(self) -> bool:
        return not (
            self.duplicates
            or self.mismatched
            or self.over_cap
            or self.stray > self.stray_bound
        )

    def add(self, other: Audit) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def audit(
    claims: list[tuple[str, str]], *, empty: int = 0, in_flight: int = 0
) -> Audit:
    """``claims``: (id, lease token) as received, against the running rows
    (but ``hold_leases``')."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id::text, lease_token::text, attempts, "
            "lease_expires_at > now(), claimed_by FROM generations "
            "WHERE status = 1 AND claimed_by IS DISTINCT FROM %s",
            [HELD_BY],
        )
        found = cursor.fetchall()
        running = {row[0]: row[1:4] for row in found}
        unnamed = sum(1 for row in found if row[4] != WORKER_NAME)
        cursor.execute(OVER_CAP_SQL)
        over_jobs, over_counters = cursor.fetchone()
    tokens = dict(claims)
    return Audit(
        received=len(claims),
        duplicates=len(claims) - len(tokens),
        mismatched=sum(
            1 for job, token in tokens.items() if running.get(job) != (token, 1, True)
        ),
        stray=len(running.keys() - tokens.keys()),
        over_cap=over_jobs + over_counters,
        empty=empty,
        stray_bound=in_flight,
        unnamed=unnamed,
    )


CLAIM_LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("out_path", OUT .. threads)
  thread:set("api_key", KEYS[(threads - 1) %% #KEYS + 1])
end
function init(args)
  wrk.headers["X-API-Key"] = api_key
  out = io.open(out_path, "w")
  out:setvbuf("line")
end
function response(status, headers, body)
  if status == 200 then
    local claims = {}
    for job, token in body:gmatch('"id":"([%%x%%-]+)".-"lease_token":"([%%x%%-]+)"') do
      claims[#claims + 1] = job .. " " .. token
    end
    out:write(table.concat(claims, "\\n"), "\\n")
  elseif status == 204 then
    out:write("-\\n")
  else
    out:write("!" .. status .. "\\n")
  end
end
"""


@dataclass(frozen=True)
class ClaimRun:
    result: load.LoadResult
    claims: list[tuple[str, str]]
    empty: int
    failed: int

    @property
    def jobs_per_second(self) -> float:
        return len(self.claims) / self.result.seconds

    @property
    def claims_per_second(self) -> float:
        return (self.result.requests - self.empty) / self.result.seconds


def lua_list(values: list[str]) -> str:
    return "{" + ", ".join(json.dumps(value) for value in values) + "}"


def wrk_claims(
    wrk: str,
    port: int,
    raw_keys: list[str],
    *,
    connections: int,
    batch: int,
    seconds: int,
) -> ClaimRun:
    """wrk claiming for ``seconds``, as ``bench read`` loads the bare view."""
    body = json.dumps({"max": batch, "worker": WORKER_NAME})
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as directory:
        out = f"{directory}/thread"
        script = Path(directory) / "claim.lua"
        headers = {**server.PROXY_HEADERS, "Content-Type": "application/json"}
        lines = [
            f"OUT = {json.dumps(out)}",
            f"KEYS = {lua_list(raw_keys)}",
            'wrk.method = "POST"',
            f"wrk.body = {json.dumps(body)}",
            *(
                f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}"
                for k, v in headers.items()
            ),
            CLAIM_LUA % {},
            load.DONE_LUA,
        ]
        script.write_text("\n".join(lines))
        completed = subprocess.run(
            [
                wrk,
                f"--threads={min(2, connections)}",
                f"--connections={connections}",
                f"--duration={seconds}s",
                f"--timeout={load.WRK_TIMEOUT}",
                f"--script={script}",
                f"http://{server.HOST}:{port}{CLAIM}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        result = load.parse_wrk(completed)
        claims: list[tuple[str, str]] = []
        empty = failed = 0
        for path in Path(directory).glob("thread*"):
            for line in path.read_text().splitlines():
                if line == "-":
                    empty += 1
                elif line.startswith("!"):
                    failed += 1
                elif line:
                    job, token = line.split()
                    claims.append((job, token))
    return ClaimRun(result, claims, empty, failed)


@dataclass
class Row:
    """One claims row over every round: its rates and its audit."""

    label: str
    unit: str  # "claims/s" or "jobs/s"
    rates: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    audit: Audit = field(default_factory=Audit)
    failed: int = 0
    cpu_seconds: float = 0.0  # server side: gunicorn workers + backends
    units: int = 0  # claims or jobs, whichever ``unit`` counts

    def record(self, run: ClaimRun, checked: Audit, cpu_seconds: float = 0.0) -> None:
        jobs = self.unit == "jobs/s"
        rate = run.jobs_per_second if jobs else run.claims_per_second
        self.rates.append(rate)
        self.cpu_seconds += cpu_seconds
        self.units += len(run.claims) if jobs else run.result.requests - run.empty
        self.p50_ms.append(run.result.p50_ms)
        self.audit.add(checked)
        self.failed += run.failed + run.result.errors

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_ms(self) -> float:
        """Server CPU per claim (per job for jobs/s)."""
        return self.cpu_seconds * 1000 / self.units if self.units else 0.0


def claim_once(
    connection: http.client.HTTPConnection, raw_key: str
) -> tuple[int, bytes]:
    connection.request(
        "POST",
        CLAIM,
        body=json.dumps({"max": 1, "worker": WORKER_NAME}),
        headers={
            **server.PROXY_HEADERS,
            "Content-Type": "application/json",
            "X-API-Key": raw_key,
        },
    )
    response = connection.getresponse()
    return response.status, response.read()


@contextlib.contextmanager
def pointed_at(name: str) -> Iterator[None]:
    """This process's Django ``default`` connection on database ``name``
    for a while (the two latency queues live in two scratch databases)."""
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    previous = settings_dict["NAME"]
    connections.close_all()
    settings_dict["NAME"] = name
    try:
        yield
    finally:
        connections.close_all()
        settings_dict["NAME"] = previous


@dataclass
class Side:
    """One queue of the latency comparison: its server, key and samples."""

    port: int
    raw_key: str
    times: list[float] = field(default_factory=list)
    claims: list[tuple[str, str]] = field(default_factory=list)
    empty: int = 0
    connection: http.client.HTTPConnection | None = None

    def claim(self, *, timed: bool) -> None:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(
                server.HOST, self.port, timeout=30
            )
        started = time.perf_counter()
        status, body = claim_once(self.connection, self.raw_key)
        if timed:
            self.times.append((time.perf_counter() - started) * 1000)
        if status == 204:
            self.empty += 1
        elif status != 200:
            raise RuntimeError(f"claim answered {status}: {body[:300]!r}")
        else:
            self.claims += [
                (job["id"], job["lease_token"]) for job in json.loads(body)["jobs"]
            ]

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def latency_pair(small: Side, large: Side, samples: int, refill_small: Any) -> Audit:
    """Sequential single claims, one client, alternating between the two
    queues claim by claim (which goes first alternates too), so a burst of
    other work on the machine hits both alike. The small queue is refilled
    every ``REFILL_EVERY`` claims, so it stays between 90% and 100% full;
    the large one loses 0.3% at most. Returns the small side's audit."""
    checked = Audit()
    for _ in range(WARM_UP_CLAIMS):  # connections, threads and keys warmed up
        small.claim(timed=False)
        large.claim(timed=False)
    for sample in range(samples):
        if sample and sample % REFILL_EVERY == 0:
            checked.add(audit(small.claims, empty=small.empty))
            small.claims, small.empty = [], 0
            refill_small()
        for side in (small, large) if sample % 2 else (large, small):
            side.claim(timed=True)
    checked.add(audit(small.claims, empty=small.empty))
    small.close()
    large.close()
    return checked


def hold_leases(count: int) -> None:
    """``count`` jobs running with live leases (workers at work), so the
    expired-lease sweeps are planned against a realistic running set."""
    from django.db import connection

    from generations.claims import MAX_BATCH, generation_claim

    while count > 0:
        count -= len(generation_claim(max_jobs=min(MAX_BATCH, count), worker=HELD_BY))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE generations, generation_key_queues")


def explain(*, routed: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one single claim on a fresh queue,
    rolled back."""
    from django.conf import settings
    from django.db import connection, transaction

    from generations.claims import claim_statement

    sql, params = claim_statement(
        max_jobs=1,
        models=[MODELS[1]] if routed else None,
        worker=WORKER_NAME,
        max_attempts=settings.MAX_ATTEMPTS,
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        transaction.set_rollback(True)
    return plan


class CapPoller(threading.Thread):
    """Counts keys over their cap every few ms while the capped run drains."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.polls = 0
        self.over = 0
        self.busiest = 0  # the most jobs one capped key ran at once

    def run(self) -> None:
        from django.db import connection

        try:
            while not self.stop.is_set():
                with connection.cursor() as cursor:
                    cursor.execute(OVER_CAP_SQL)
                    over_jobs, over_counters = cursor.fetchone()
                    cursor.execute(
                        "SELECT COALESCE(max(running), 0) FROM generation_key_queues "
                        "WHERE max_running IS NOT NULL"
                    )
                    busiest = cursor.fetchone()[0]
                self.polls += 1
                self.over += over_jobs + over_counters
                self.busiest = max(self.busiest, busiest)
                time.sleep(0.005)
        finally:
            connection.close()


def capped_run(port: int, raw_keys: list[str], jobs_per_key: int) -> dict[str, Any]:
    """8 workers claim batches of 5 and complete each job, over 50 keys of
    which 10 are capped at 2, until every job is done."""
    from django.db import connection

    from apikeys.models import ApiKey

    owners = make_keys(50, "bench capped owner")
    capped = owners[:10]
    ApiKey.objects.filter(pk__in=capped).update(max_running=2)
    total = 50 * jobs_per_key
    refill(total, owners)
    done: list[tuple[str, str]] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + 120
    finished = threading.Event()

    def worker(index: int) -> None:
        headers = {
            **server.PROXY_HEADERS,
            "Content-Type": "application/json",
            "X-API-Key": raw_keys[index],
        }
        http_connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
        try:
            while not finished.is_set() and time.monotonic() < deadline:
                http_connection.request(
                    "POST", CLAIM, body=json.dumps({"max": 5}), headers=headers
                )
                response = http_connection.getresponse()
                body = response.read()
                if response.status == 204:
                    time.sleep(0.01)  # capped keys wait for a free slot
                    continue
                if response.status != 200:
                    with lock:
                        errors[0] += 1
                    continue
                for job in json.loads(body)["jobs"]:
                    http_connection.request(
                        "POST",
                        f"/api/v1/generations/{job['id']}/complete",
                        body=json.dumps(
                            {
                                "lease_token": job["lease_token"],
                                "output_path": f"/out/{job['id']}.png",
                            }
                        ),
                        headers=headers,
                    )
                    completed = http_connection.getresponse()
                    completed.read()
                    with lock:
                        if completed.status == 200:
                            done.append((job["id"], job["lease_token"]))
                        else:
                            errors[0] += 1
                        if len(done) >= total:
                            finished.set()
        finally:
            http_connection.close()

    poller = CapPoller()
    poller.start()
    started = time.perf_counter()
    try:
        load.run_threads(worker, len(raw_keys))
    finally:
        poller.stop.set()
        poller.join()
    seconds = time.perf_counter() - started
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE status = 2 AND attempts = 1), "
            "count(*) FILTER (WHERE status <> 2) - 1 FROM generations"
        )
        completed_once, left = cursor.fetchone()
    ids = [job for job, _ in done]
    return {
        "jobs": total,
        "seconds": seconds,
        "completed": len(done),
        "duplicates": len(ids) - len(set(ids)),
        "completed_once": completed_once,
        "left": left,
        "errors": errors[0],
        "polls": poller.polls,
        "over": poller.over,
        "busiest": poller.busiest,
        "exact": (
            len(done) == total == completed_once
            and len(ids) == len(set(ids))
            and left == 0
            and errors[0] == 0
            and poller.over == 0
        ),
    }


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    load_at_start = server.machine()
    plan = SMOKE if smoke else FULL
    wrk = ensure_wrk(smoke)
    small_jobs, large_jobs = plan.latency_queues
    with server.scratch_database() as url:
        main = connection.settings_dict["NAME"]
        # The large latency queue lives in a database of its own, so the
        # two queue sizes can be sampled claim by claim.
        with server.scratch_database() as large_url:
            large = connection.settings_dict["NAME"]
            large_worker = make_workers(1)[0]
            refill(large_jobs + RUNNING, make_keys(plan.latency_keys, "bench owner"))
            hold_leases(RUNNING)
            # The plans of one claim on the large queue, both variants.
            plans = {routed: explain(routed=routed) for routed in (False, True)}
            with pointed_at(main):
                rows = measure(plan, wrk, url, large_url, large_worker)
            with pointed_at(large):
                rows.large_audit = audit(rows.large.claims, empty=rows.large.empty)
    return report(plan, rows, plans, load_at_start)


@dataclass
class Results:
    describe: str
    bare_rates: list[float]
    singles: dict[int, Row]
    one: Row
    batch: Row
    small: Side
    large: Side
    small_audit: Audit
    capped: dict[str, Any]
    bare_cpu: Row
    large_audit: Audit = field(default_factory=Audit)


def measure(
    plan: Schedule, wrk: str, url: str, large_url: str, large_worker: str
) -> Results:
    from django.db import connection

    raw_workers = make_workers(CONNECTIONS)
    spread = make_keys(SPREAD_KEYS, "bench owner")
    bare = load.Target(f"/bench/generations/{BARE_ID}", headers=server.PROXY_HEADERS)
    singles = {
        w: Row(f"max=1, {w} worker(s), {SPREAD_KEYS} keys", "claims/s") for w in WORKERS
    }
    one = Row(f"max=1, {CONNECTIONS} workers, one key", "claims/s")
    batch = Row(f"max={BATCH}, {CONNECTIONS} workers, {SPREAD_KEYS} keys", "jobs/s")
    bare_rates: list[float] = []
    bare_cpu = Row("bare", "req/s")
    database = connection.settings_dict["NAME"]
    with server.gunicorn(url) as srv:

        def cpu() -> float:
            return server.server_cpu_seconds([srv], database)

        refill(plan.single_jobs, spread)
        server.expect(srv.port, "GET", bare.path, 200, headers=bare.headers)
        # Warm up every worker process, thread and connection.
        load.load(
            srv.port,
            bare.path,
            headers=bare.headers,
            connections=CONNECTIONS,
            duration=1,
        )
        wrk_claims(
            wrk, srv.port, raw_workers, connections=CONNECTIONS, batch=1, seconds=1
        )
        sides: list[tuple[Row, int, int, list[str], int]] = [
            *((singles[w], w, 1, spread, plan.single_jobs) for w in WORKERS),
            (one, CONNECTIONS, 1, spread[:1], plan.single_jobs),
            (batch, CONNECTIONS, BATCH, spread, plan.batch_jobs),
        ]
        for _ in range(plan.rounds):
            refill(plan.single_jobs, spread)
            before = cpu()
            result = load.load(
                srv.port,
                bare.path,
                headers=bare.headers,
                connections=CONNECTIONS,
                duration=plan.duration,
            )
            bare_cpu.cpu_seconds += cpu() - before
            bare_cpu.units += result.requests
            bare_rates.append(result.rps)
            for row, workers, size, keys, jobs in sides:
                refill(jobs, keys)
                before = cpu()
                claimed = wrk_claims(
                    wrk,
                    srv.port,
                    raw_workers,
                    connections=workers,
                    batch=size,
                    seconds=plan.duration,
                )
                spent = cpu() - before
                checked = audit(
                    claimed.claims, empty=claimed.empty, in_flight=workers * size
                )
                row.record(claimed, checked, spent)
        # Latency: the small queue here, the large one on its own server.
        small_keys = spread + make_keys(plan.latency_keys - SPREAD_KEYS, "bench owner")
        small_jobs = plan.latency_queues[0]
        refill(small_jobs, small_keys)
        with server.gunicorn(large_url) as large_srv:
            small = Side(srv.port, raw_workers[0])
            large = Side(large_srv.port, large_worker)
            small_audit = latency_pair(
                small,
                large,
                plan.latency_samples,
                lambda: refill(small_jobs, small_keys),
            )
        capped = capped_run(srv.port, raw_workers, plan.capped_jobs_per_key)
        describe = srv.describe()
    return Results(
        describe,
        bare_rates,
        singles,
        one,
        batch,
        small,
        large,
        small_audit,
        capped,
        bare_cpu,
    )


def ratios(sides: list[float], baseline: list[float]) -> float:
    """Median over rounds of side / baseline of the same round."""
    return statistics.median(a / b for a, b in zip(sides, baseline, strict=True))


def report(
    plan: Schedule,
    results: Results,
    plans: dict[bool, str],
    load_at_start: str,
) -> bool:
    describe, bare_rates = results.describe, results.bare_rates
    singles, one, batch = results.singles, results.one, results.batch
    capped = results.capped
    latencies = {
        plan.latency_queues[0]: results.small.times,
        plan.latency_queues[1]: results.large.times,
    }
    latency_audit = Audit()
    latency_audit.add(results.small_audit)
    latency_audit.add(results.large_audit)
    print(
        f"POST {CLAIM}, wrk on 127.0.0.1 ({plan.rounds} round(s) x {plan.duration} s "
        f"per row, rows alternated with the bare view, a fresh queue per round); "
        f"{describe}; worker keys with rate_limit=0"
    )
    bare = statistics.median(bare_rates)
    print(
        f"{'row':<34}{'rate':>9}  {'unit':<9}{'p50 ms':>8}{'/ bare':>8}"
        f"{'received':>10}{'dupes':>7}{'wrong':>7}{'cut':>7}{'204s':>6}{'errors':>8}"
        f"{'CPU ms':>8}{'CPU ratio':>10}"
    )
    bare_cpu = results.bare_cpu.cpu_ms
    print(
        f"{'bare Django view, 8 connections':<34}{bare:>9.0f}  {'req/s':<9}"
        f"{'':>8}{'':>8}{'':>10}{'':>7}{'':>7}{'':>7}{'':>6}{'':>8}{bare_cpu:>8.2f}"
    )
    rows = [*singles.values(), one, batch]
    for row in rows:
        checked = row.audit
        print(
            f"{row.label:<34}{row.rate:>9.0f}  {row.unit:<9}"
            f"{statistics.median(row.p50_ms):>8.2f}"
            f"{ratios(row.rates, bare_rates):>8.2f}"
            f"{checked.received:>10}{checked.duplicates:>7}{checked.mismatched:>7}"
            f"{checked.stray:>7}{checked.empty:>6}{row.failed:>8}"
            f"{row.cpu_ms:>8.2f}{bare_cpu / row.cpu_ms if row.cpu_ms else 0:>10.2f}"
        )
    small, large = plan.latency_queues
    p50 = {size: statistics.median(times) for size, times in latencies.items()}
    p99 = {size: percentile(times, 99) for size, times in latencies.items()}
    for size in plan.latency_queues:
        print(
            f"latency, one client, max=1, {size:,} queued over {plan.latency_keys:,} "
            "keys (alternated claim by claim with the other size): "
            f"p50 {p50[size]:.2f} ms, p99 {p99[size]:.2f} ms "
            f"({len(latencies[size])} samples)"
        )
    print(
        f"capped run: {capped['jobs']} jobs over 50 keys (10 with max_running=2), "
        f"8 workers claiming max=5 and completing each job: {capped['seconds']:.1f} s, "
        f"{capped['completed']} completed ({capped['completed_once']} completed with "
        f"attempts=1, {capped['duplicates']} twice, {capped['left']} left), "
        f"{capped['polls']} polls of running per key: {capped['over']} over a cap, "
        f"busiest capped key {capped['busiest']} running; errors {capped['errors']}"
    )
    single = ratios(singles[CONNECTIONS].rates, bare_rates)
    batched = ratios(batch.rates, bare_rates)
    spread = ratios(singles[CONNECTIONS].rates, one.rates)
    slower = p50[large] / p50[small]
    every = [row.audit for row in rows] + [latency_audit]
    exact = all(a.exact for a in every) and capped["exact"]
    dry = sum(a.empty for a in every)
    clean = all(row.failed == 0 for row in rows) and dry == 0
    targets = [
        (
            f"single claims at 8 workers / bare view req/s >= {SINGLE_TARGET}",
            single,
            single >= SINGLE_TARGET,
        ),
        (
            f"batch max={BATCH} jobs/s at 8 workers / bare req/s >= {BATCH_TARGET}",
            batched,
            batched >= BATCH_TARGET,
        ),
        (
            f"{SPREAD_KEYS} keys / one key claims/s at 8 workers >= {KEYS_TARGET}",
            spread,
            spread >= KEYS_TARGET,
        ),
        (
            f"p50 at {large:,} / at {small:,} queued <= {LATENCY_TARGET}",
            slower,
            slower <= LATENCY_TARGET,
        ),
    ]
    for text, value, met in targets:
        print(f"{text}: {value:.2f} {verdict(met)}")
    print(f"caps never exceeded and no job claimed twice in any run: {verdict(exact)}")
    unnamed = sum(a.unnamed for a in every)
    print(
        f"claimed_by kept as the claim's worker name: "
        f"{verdict(unnamed == 0)} ({unnamed} running job(s) without it)"
    )
    if not clean:
        print(f"MISSED: {dry} empty answer(s) (a queue ran dry) or errors in a row")
    for routed, text in plans.items():
        print(
            f"plan of one claim at {large:,} queued jobs over "
            f"{plan.latency_keys:,} keys, {RUNNING:,} running, "
            f"{'models=[' + repr(MODELS[1]) + ']' if routed else 'any model'}:"
        )
        print(text)
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return exact and clean and all(met for _, _, met in targets)


def compare(checkouts: dict[str, Path], *, rounds: int = 5, seconds: int = 2) -> None:
    """Single (max=1) and batch (max=10) claims at 8 workers on one
    gunicorn per checkout, one database, against the first one's bare view;
    alternated round by round, each claims run on a fresh queue.
    ``python -m bench.claims NAME=DIR NAME=DIR``: a before/after of the
    claim's code with everything else equal."""
    from django.db import connection

    wrk = ensure_wrk(False)
    with server.scratch_database() as url, contextlib.ExitStack() as stack:
        database = connection.settings_dict["NAME"]
        raw_workers = make_workers(CONNECTIONS)
        spread = make_keys(SPREAD_KEYS, "bench owner")
        servers = {
            name: stack.enter_context(server.gunicorn(url, cwd=directory))
            for name, directory in checkouts.items()
        }
        everyone = list(servers.values())
        first = everyone[0]
        bare = load.Target(
            f"/bench/generations/{BARE_ID}", headers=server.PROXY_HEADERS
        )
        bare_row = Row("bare Django view", "req/s")
        rows = {
            (name, size): Row(
                f"{name}, max={size}", "jobs/s" if size > 1 else "claims/s"
            )
            for name in servers
            for size in (1, BATCH)
        }
        refill(plan_jobs(BATCH), spread)
        for srv in everyone:  # warm up
            wrk_claims(
                wrk, srv.port, raw_workers, connections=CONNECTIONS, batch=1, seconds=1
            )
        load.load(
            first.port,
            bare.path,
            headers=bare.headers,
            connections=CONNECTIONS,
            duration=1,
        )
        for _ in range(rounds):
            before = server.server_cpu_seconds(everyone, database)
            result = load.load(
                first.port,
                bare.path,
                headers=bare.headers,
                connections=CONNECTIONS,
                duration=seconds,
            )
            bare_row.rates.append(result.rps)
            bare_row.cpu_seconds += (
                server.server_cpu_seconds(everyone, database) - before
            )
            bare_row.units += result.requests
            for (name, size), row in rows.items():
                refill(plan_jobs(size), spread)
                before = server.server_cpu_seconds(everyone, database)
                claimed = wrk_claims(
                    wrk,
                    servers[name].port,
                    raw_workers,
                    connections=CONNECTIONS,
                    batch=size,
                    seconds=seconds,
                )
                spent = server.server_cpu_seconds(everyone, database) - before
                checked = audit(
                    claimed.claims, empty=claimed.empty, in_flight=CONNECTIONS * size
                )
                row.record(claimed, checked, spent)
    print(
        f"claims at {CONNECTIONS} workers, one gunicorn per checkout, one database, "
        f"{rounds} round(s) x {seconds} s, alternated; ratio = median over rounds "
        "of rate / the bare view's req/s (first checkout); CPU = gunicorn "
        "workers + PostgreSQL backends per claim (per job for jobs/s)"
    )
    print(
        f"{'side':<24}{'rate':>9}  {'unit':<9}{'/ bare':>8}{'CPU ms':>8}"
        f"{'CPU ratio':>10}  exact"
    )
    print(
        f"{'bare Django view':<24}{bare_row.rate:>9.0f}  {'req/s':<9}{'':>8}"
        f"{bare_row.cpu_ms:>8.2f}"
    )
    for row in rows.values():
        print(
            f"{row.label:<24}{row.rate:>9.0f}  {row.unit:<9}"
            f"{ratios(row.rates, bare_row.rates):>8.2f}{row.cpu_ms:>8.2f}"
            f"{bare_row.cpu_ms / row.cpu_ms:>10.2f}  "
            f"{verdict(row.audit.exact and row.audit.empty == 0 and not row.failed)}"
        )
    print(f"machine: {server.machine()}")


def plan_jobs(size: int) -> int:
    return FULL.batch_jobs if size > 1 else FULL.single_jobs


if __name__ == "__main__":
    import sys

    import bench

    bench.setup_django()
    compare(
        {
            name: Path(directory).resolve()
            for name, directory in (arg.split("=", 1) for arg in sys.argv[1:])
        }
    )

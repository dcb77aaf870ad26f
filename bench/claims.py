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
  queued jobs over 1,000 keys and at 100,000 over 1,000 keys;
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
is running, and no key runs more than its ``max_running``.
"""

from __future__ import annotations

import http.client
import json
import logging
import statistics
import subprocess
import tempfile
import threading
import time
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
    latency_samples: int  # per latency round (two rounds per queue size)
    latency_queues: tuple[int, int]
    latency_keys: int
    capped_jobs_per_key: int


FULL = Schedule(
    rounds=3,
    duration=2,
    single_jobs=6_000,
    batch_jobs=24_000,
    latency_samples=150,
    latency_queues=LATENCY_QUEUES,
    latency_keys=LATENCY_KEYS,
    capped_jobs_per_key=20,
)
SMOKE = Schedule(
    rounds=1,
    duration=1,
    single_jobs=2_000,
    batch_jobs=4_000,
    latency_samples=10,
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
    """Worker keys, unlimited (``rate_limit=0``): the raw keys.

    Admin as well as ``is_worker``: on this branch the claim, heartbeat and
    complete endpoints still take only admin keys (``IsAdminKey``).
    """
    from apikeys.models import ApiKey
    from apikeys.services import api_key_create

    logging.getLogger("apikeys.services").setLevel(logging.WARNING)
    made = [
        api_key_create(name=f"bench worker {n}", is_admin=True, rate_limit=0)
        for n in range(count)
    ]
    ApiKey.objects.filter(pk__in=[key.pk for key, _ in made]).update(is_worker=True)
    return [raw for _, raw in made]


def refill(jobs: int, keys: list[str]) -> None:
    """A fresh queue: ``jobs`` queued jobs over ``keys``, plus the bare row."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE generations")
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
    """``claims``: (id, lease token) as received, against the running rows."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id::text, lease_token::text, attempts, "
            "lease_expires_at > now() FROM generations WHERE status = 1"
        )
        running = {row[0]: row[1:] for row in cursor.fetchall()}
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
        result = parse_wrk(completed)
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


def parse_wrk(completed: subprocess.CompletedProcess[str]) -> load.LoadResult:
    for line in completed.stdout.splitlines():
        if line.startswith(load.RESULT_MARK):
            data = json.loads(line[len(load.RESULT_MARK) :])
            return load.LoadResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=data["errors"] + data["status_errors"],
                client="wrk",
            )
    raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr}")


@dataclass
class Row:
    """One claims row over every round: its rates and its audit."""

    label: str
    unit: str  # "claims/s" or "jobs/s"
    rates: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    audit: Audit = field(default_factory=Audit)
    failed: int = 0

    def record(self, run: ClaimRun, checked: Audit) -> None:
        rate = run.jobs_per_second if self.unit == "jobs/s" else run.claims_per_second
        self.rates.append(rate)
        self.p50_ms.append(run.result.p50_ms)
        self.audit.add(checked)
        self.failed += run.failed + run.result.errors

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


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


def latency_round(port: int, raw_key: str, samples: int) -> tuple[list[float], Audit]:
    """``samples`` sequential single claims from one client: ms each."""
    connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
    times: list[float] = []
    claims: list[tuple[str, str]] = []
    empty = 0
    try:
        for sample in range(samples + 1):  # the first warms the connection up
            started = time.perf_counter()
            status, body = claim_once(connection, raw_key)
            if sample:
                times.append((time.perf_counter() - started) * 1000)
            if status == 204:
                empty += 1
                continue
            if status != 200:
                raise RuntimeError(f"claim answered {status}: {body[:300]!r}")
            claims += [
                (job["id"], job["lease_token"]) for job in json.loads(body)["jobs"]
            ]
    finally:
        connection.close()
    return times, audit(claims, empty=empty)


def explain(*, routed: bool) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of one single claim on a fresh queue,
    rolled back."""
    from django.conf import settings
    from django.db import connection, transaction

    from generations.claims import CLAIM_ANY_MODEL, CLAIM_SOME_MODELS

    sql = CLAIM_SOME_MODELS if routed else CLAIM_ANY_MODEL
    params = {
        "n": 1,
        "models": [MODELS[1]] if routed else None,
        "worker": WORKER_NAME,
        "lease": settings.LEASE_SECONDS,
        "max_attempts": settings.MAX_ATTEMPTS,
    }
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

    load_at_start = server.machine()
    plan = SMOKE if smoke else FULL
    wrk = ensure_wrk(smoke)
    with server.scratch_database() as url:
        raw_workers = make_workers(CONNECTIONS)
        spread = make_keys(SPREAD_KEYS, "bench owner")
        one_key = spread[:1]
        bare = load.Target(
            f"/bench/generations/{BARE_ID}", headers=server.PROXY_HEADERS
        )
        singles = {
            w: Row(f"max=1, {w} worker(s), {SPREAD_KEYS} keys", "claims/s")
            for w in WORKERS
        }
        one = Row(f"max=1, {CONNECTIONS} workers, one key", "claims/s")
        batch = Row(f"max={BATCH}, {CONNECTIONS} workers, {SPREAD_KEYS} keys", "jobs/s")
        bare_rates: list[float] = []
        with server.gunicorn(url) as srv:
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
                (one, CONNECTIONS, 1, one_key, plan.single_jobs),
                (batch, CONNECTIONS, BATCH, spread, plan.batch_jobs),
            ]
            for _ in range(plan.rounds):
                refill(plan.single_jobs, spread)
                result = load.load(
                    srv.port,
                    bare.path,
                    headers=bare.headers,
                    connections=CONNECTIONS,
                    duration=plan.duration,
                )
                bare_rates.append(result.rps)
                for row, workers, size, keys, jobs in sides:
                    refill(jobs, keys)
                    claimed = wrk_claims(
                        wrk,
                        srv.port,
                        raw_workers,
                        connections=workers,
                        batch=size,
                        seconds=plan.duration,
                    )
                    checked = audit(
                        claimed.claims,
                        empty=claimed.empty,
                        in_flight=workers * size,
                    )
                    row.record(claimed, checked)
            # Latency: 1,000 vs 100,000 queued over 1,000 keys, alternated.
            latency_keys = spread + make_keys(
                plan.latency_keys - SPREAD_KEYS, "bench owner"
            )
            latencies: dict[int, list[float]] = {
                size: [] for size in plan.latency_queues
            }
            latency_audit = Audit()
            for _ in range(2):
                for size in plan.latency_queues:
                    refill(size, latency_keys)
                    times, checked = latency_round(
                        srv.port, raw_workers[0], plan.latency_samples
                    )
                    latencies[size] += times
                    latency_audit.add(checked)
            # The plans of one claim at the large queue, both variants.
            refill(plan.latency_queues[1], latency_keys)
            plans = {routed: explain(routed=routed) for routed in (False, True)}
            capped = capped_run(srv.port, raw_workers, plan.capped_jobs_per_key)
            describe = srv.describe()
    return report(
        plan,
        describe,
        bare_rates,
        singles,
        one,
        batch,
        latencies,
        latency_audit,
        plans,
        capped,
        load_at_start,
    )


def ratios(sides: list[float], baseline: list[float]) -> float:
    """Median over rounds of side / baseline of the same round."""
    return statistics.median(a / b for a, b in zip(sides, baseline, strict=True))


def report(
    plan: Schedule,
    describe: str,
    bare_rates: list[float],
    singles: dict[int, Row],
    one: Row,
    batch: Row,
    latencies: dict[int, list[float]],
    latency_audit: Audit,
    plans: dict[bool, str],
    capped: dict[str, Any],
    load_at_start: str,
) -> bool:
    print(
        f"POST {CLAIM}, wrk on 127.0.0.1 ({plan.rounds} round(s) x {plan.duration} s "
        f"per row, rows alternated with the bare view, a fresh queue per round); "
        f"{describe}; worker keys with rate_limit=0"
    )
    bare = statistics.median(bare_rates)
    print(
        f"{'row':<34}{'rate':>9}  {'unit':<9}{'p50 ms':>8}{'/ bare':>8}"
        f"{'received':>10}{'dupes':>7}{'wrong':>7}{'cut':>7}{'204s':>6}{'errors':>8}"
    )
    print(f"{'bare Django view, 8 connections':<34}{bare:>9.0f}  {'req/s':<9}")
    rows = [*singles.values(), one, batch]
    for row in rows:
        checked = row.audit
        print(
            f"{row.label:<34}{row.rate:>9.0f}  {row.unit:<9}"
            f"{statistics.median(row.p50_ms):>8.2f}"
            f"{ratios(row.rates, bare_rates):>8.2f}"
            f"{checked.received:>10}{checked.duplicates:>7}{checked.mismatched:>7}"
            f"{checked.stray:>7}{checked.empty:>6}{row.failed:>8}"
        )
    small, large = plan.latency_queues
    p50 = {size: statistics.median(times) for size, times in latencies.items()}
    p99 = {size: percentile(times, 99) for size, times in latencies.items()}
    for size in plan.latency_queues:
        print(
            f"latency, one client, max=1, {size:,} queued over {plan.latency_keys:,} "
            f"keys: p50 {p50[size]:.2f} ms, p99 {p99[size]:.2f} ms "
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
    if not clean:
        print(f"MISSED: {dry} empty answer(s) (a queue ran dry) or errors in a row")
    for routed, text in plans.items():
        print(
            f"plan of one claim at {large:,} queued jobs over "
            f"{plan.latency_keys:,} keys, "
            f"{'models=[' + repr(MODELS[1]) + ']' if routed else 'any model'}:"
        )
        print(text)
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return exact and clean and all(met for _, _, met in targets)

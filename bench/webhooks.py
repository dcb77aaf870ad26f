"""Webhooks (SPEC §9): from the 200 of ``complete`` to the receiver, and its cost.

One scratch database, one gunicorn (``gunicorn.conf.py``, production
settings, ``WEBHOOK_ALLOW_PRIVATE=1``), one delivery worker
(``manage.py deliver_webhooks``, LISTEN/NOTIFY) and a receiver on 127.0.0.1
(``tests.receiver``, a thread of this process, so its arrival times and the
client's are on one monotonic clock). The receiver is plain ``http`` on
loopback: the worker runs with ``LOCKNGEN_ENV=development`` (``DEBUG=0``),
the only setting through which production would refuse an ``http`` target
(``require_https``); gunicorn, which takes the measured requests, is in
production settings.

Jobs are queued with one ``INSERT … SELECT generate_series`` (owned by a
client key, ``webhook`` = the receiver, ``webhook_events_filter`` =
``completed``, so the claims announce nothing) and pre-claimed by a worker
key in batches (``POST /api/v1/generations/claim {"max": 50}``), so every
measured request is a ``complete``.

- Latency: ``complete`` at a steady 50/s, paced open loop (request ``i`` is
  sent at ``t0 + i/50`` whatever the earlier ones did, by up to 8 keep-alive
  connections); per job, the receiver's arrival minus the moment the
  complete's 200 was read. p50, p99, max.
- Backlog: the oldest pending delivery's age (``webhook_deliveries``,
  ``state = 'pending'``, database clock), sampled every 100 ms during that
  run; the max.
- Throughput: ``complete`` req/s of jobs with a webhook vs jobs without, 8
  keep-alive connections in a closed loop, a fixed number of jobs per round,
  rounds alternated (without, with, with, without, …); each round waits for
  the deliveries of the one before to finish, so neither side pays for the
  other's. Ratio = median over round pairs of with / without. The target
  (SPEC §9, ≥ 0.85) is read on the request path: the rounds with the
  delivery worker paused (SIGSTOP for the round; it delivers once
  resumed, and every delivery is checked). On this machine the worker,
  its backends and the API share two cores, so with the worker running the
  ratio is bounded by the delivery's CPU (≈ 5 ms per delivery against ≈ 4
  ms per complete), not by what a webhook adds to ``complete``; compose
  runs it as its own service (``webhooks``). Both are printed. CPU per
  complete, from a round's start until its deliveries are done: the request
  path (gunicorn's workers and their PostgreSQL backends) and the delivery
  (the worker's process, and its backends, told apart by their
  ``application_name``).
- Correctness: every delivery's signature verified (``standardwebhooks``,
  the owner key's secret); every completed job with a webhook has exactly
  one ``generation.completed`` delivery, ``delivered``, whose ``webhook-id``
  arrived at least once (duplicates counted and reported).

``BENCH_WORKER_ARGS`` (e.g. ``--concurrency 20``) is passed to the delivery
worker, to try its options; unset, it runs with its defaults, as deployed.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bench import percentile, server

RATE = 50  # completions per second (SPEC §9)
SECONDS, SMOKE_SECONDS = 20, 3
PACED_CONNECTIONS = 8  # enough for 50/s unless a complete takes > 160 ms
CONNECTIONS = 8  # the throughput side's closed loop
# Per round; a paused round must end well within the worker's 30 s
# heartbeat timeout (--stalled-after), or its fetched jobs would be retried.
ROUND_JOBS, SMOKE_ROUND_JOBS = 600, 100
ROUNDS, SMOKE_ROUNDS = 5, 1
CLAIM_BATCH = 50
# The jobs' owners, round robin. Each complete also updates its owner's row
# of generation_key_queues (a trigger): with one owner, concurrent completes
# queue on that one row lock, held to the commit, and the benchmark would
# measure that (docs/PERFORMANCE.md, "Webhooks").
OWNERS = 8
SAMPLE_EVERY = 0.1  # seconds between backlog samples
SETTLE_SECONDS = 120  # the deliveries of a phase must all finish by then
WORKER_START_SECONDS = 30

P50_TARGET, P99_TARGET, BACKLOG_TARGET, RATIO_TARGET = 0.050, 1.0, 2.0, 0.85

CLAIM = "/api/v1/generations/claim"
COMPLETE = "/api/v1/generations/{}/complete"
WITH, WITHOUT = "with a webhook", "without"
PAUSED = "with, worker paused"  # the request path's cost alone
SIDES = (WITHOUT, WITH, PAUSED)
WORKER_APPLICATION = "bench webhooks delivery worker"
SHORT = {WITH: "W", WITHOUT: "-", PAUSED: "P"}

QUEUE_SQL = """
INSERT INTO generations (id, prompt, status, created_at, attempts, is_deleted,
                         api_key_id, webhook, webhook_events_filter)
SELECT gen_random_uuid(), 'webhook bench ' || i, 0,
       now() - (%(jobs)s - i) * interval '1 millisecond', 0, false,
       (%(owners)s::uuid[])[1 + i %% %(count)s], %(webhook)s, 'completed'
FROM generate_series(1, %(jobs)s) AS i
"""
OLDEST_PENDING_SQL = (
    "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 "
    "FROM webhook_deliveries WHERE state = 'pending'"
)
DELIVERIES_SQL = """
SELECT d.id::text, d.generation_id::text, d.event, d.state, g.api_key_id::text
FROM webhook_deliveries d JOIN generations g ON g.id = d.generation_id
"""


@dataclass
class Phase:
    """What the receiver got for one batch of completed jobs."""

    jobs: dict[str, float] = field(default_factory=dict)  # id -> 200 read at
    latencies: list[float] = field(default_factory=list)
    deliveries: int = 0
    delivered: int = 0
    missing: int = 0  # completed jobs without exactly one delivered delivery
    duplicates: int = 0  # extra arrivals of a webhook-id already received
    unsigned: int = 0  # arrivals whose signature did not verify
    stray: int = 0  # arrivals for no job of this phase


def with_application_name(url: str, name: str) -> str:
    """``url`` whose connections carry ``application_name`` = ``name``."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query), ("application_name", name)])
    return urlunsplit(parts._replace(query=query))


class Worker:
    """``manage.py deliver_webhooks`` as deployed (LISTEN/NOTIFY, its default
    concurrency), on the scratch database; stopped with SIGTERM.

    Its connections (procrastinate's and Django's) carry their own
    ``application_name``, so their backends' CPU is counted as the
    delivery's, not as the request path's."""

    def __init__(self, url: str, log_path: Path):
        from tests.serving import process_env

        self.log_path = log_path
        self.env = process_env(
            DATABASE_URL=with_application_name(url, WORKER_APPLICATION),
            LOCKNGEN_ENV="development",
            DEBUG="0",
            WEBHOOK_ALLOW_PRIVATE="1",
            LOG_LEVEL="WARNING",
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own manage.py
                [
                    sys.executable,
                    "manage.py",
                    "deliver_webhooks",
                    *os.environ.get("BENCH_WORKER_ARGS", "").split(),
                ],
                cwd=server.BASE_DIR,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


class Backlog:
    """The oldest pending delivery's age, sampled in a thread on its own
    connection (database clock)."""

    def __init__(self, url: str):
        self.url = url
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                (age,) = conn.execute(OLDEST_PENDING_SQL).fetchone()
                self.samples.append(age)
                self._stop.wait(SAMPLE_EVERY)

    def __enter__(self) -> Backlog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)


def execute(sql: str, params: dict[str, object] | None = None) -> list[tuple]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def queue(jobs: int, *, owners: list[str], webhook: str | None) -> None:
    """A fresh queue of ``jobs`` jobs (the previous phase's rows truncated)."""
    execute("TRUNCATE generations, webhook_deliveries")
    execute(
        QUEUE_SQL,
        {"jobs": jobs, "owners": owners, "count": len(owners), "webhook": webhook},
    )
    execute("ANALYZE generations")


def post(
    connection: http.client.HTTPConnection, path: str, headers: dict, body: dict
) -> tuple[int, bytes]:
    connection.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def claim_all(port: int, headers: dict[str, str], jobs: int) -> list[tuple[str, str]]:
    """Every queued job, claimed in batches: ``[(id, lease_token), …]``."""
    leased: list[tuple[str, str]] = []
    connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
    try:
        while True:
            status, body = post(connection, CLAIM, headers, {"max": CLAIM_BATCH})
            if status == 204:
                break
            if status != 200:
                raise RuntimeError(f"claim answered {status}: {body[:300]!r}")
            leased += [
                (job["id"], job["lease_token"]) for job in json.loads(body)["jobs"]
            ]
    finally:
        connection.close()
    if len(leased) != jobs:
        raise RuntimeError(f"claimed {len(leased)} of {jobs} jobs")
    return leased


def complete_body(token: str) -> dict[str, str]:
    return {"lease_token": token, "output_path": "outputs/bench.png"}


def paced(
    port: int, headers: dict[str, str], leased: list[tuple[str, str]], rate: float
) -> tuple[dict[str, float], list[float], int]:
    """``complete`` each job at ``t0 + i/rate`` (open loop).

    Returns when each job's 200 was read (monotonic), how late each request
    left (seconds after its slot) and the errors.
    """
    done: dict[str, float] = {}
    late: list[float] = []
    errors = [0]
    counter = itertools.count()  # next() is atomic: each slot is taken once
    start = time.monotonic() + 0.2

    def sender() -> None:
        connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
        try:
            while (i := next(counter)) < len(leased):
                due = start + i / rate
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                late.append(time.monotonic() - due)
                job_id, token = leased[i]
                status, _ = post(
                    connection, COMPLETE.format(job_id), headers, complete_body(token)
                )
                if status == 200:
                    done[job_id] = time.monotonic()
                else:
                    errors[0] += 1
        finally:
            connection.close()

    threads = [
        threading.Thread(target=sender, daemon=True) for _ in range(PACED_CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done, late, errors[0]


def closed_loop(
    port: int, headers: dict[str, str], leased: list[tuple[str, str]]
) -> tuple[float, int]:
    """``complete`` every job over ``CONNECTIONS`` connections as fast as they
    answer; ``(req/s, errors)``."""
    pending = list(reversed(leased))
    errors = [0]
    barrier = threading.Barrier(CONNECTIONS + 1)

    def worker() -> None:
        connection = http.client.HTTPConnection(server.HOST, port, timeout=30)
        barrier.wait()
        try:
            while True:
                try:
                    job_id, token = pending.pop()  # atomic on a list
                except IndexError:
                    return
                status, _ = post(
                    connection, COMPLETE.format(job_id), headers, complete_body(token)
                )
                if status != 200:
                    errors[0] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return len(leased) / (time.perf_counter() - started), errors[0]


def cpu_seconds(
    srv: server.Server, worker: Worker, database: str
) -> tuple[float, float, float]:
    """CPU so far of the request path (gunicorn's workers and their
    backends), of the delivery worker's process and of its backends (the
    receiver's, in this process, is not counted)."""
    return (
        server.server_cpu_seconds(
            [srv], database, except_application=WORKER_APPLICATION
        ),
        server.process_cpu_seconds(worker.process.pid),
        server.backend_cpu_seconds(database, WORKER_APPLICATION),
    )


def settle(
    phase: Phase, receiver: object, since: int, secrets: dict[str, str]
) -> Phase:
    """Wait for the phase's deliveries to finish, then check them against what
    the receiver got after its ``since``-th request (``secrets``: each owner
    key's signing secret)."""
    import standardwebhooks

    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        ((pending,),) = execute(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'"
        )
        if not pending and len(receiver.received) - since >= len(phase.jobs):
            break
        time.sleep(0.1)
    time.sleep(0.3)  # a duplicate in flight has its chance to arrive
    rows = execute(DELIVERIES_SQL)
    by_job: dict[str, list[tuple]] = {}
    for row in rows:
        by_job.setdefault(row[1], []).append(row)
    phase.deliveries = len(rows)
    phase.delivered = sum(row[3] == "delivered" for row in rows)
    owner_of = {row[0]: row[4] for row in rows}  # webhook-id -> owner key
    verifiers = {
        key: standardwebhooks.Webhook(secret) for key, secret in secrets.items()
    }
    first: dict[str, float] = {}  # webhook-id -> first arrival
    for received in list(receiver.received)[since:]:
        webhook_id = received.headers["webhook-id"]
        verifier = verifiers.get(owner_of.get(webhook_id, ""))
        try:
            if verifier is None:
                raise standardwebhooks.WebhookVerificationError("no such delivery")
            event = verifier.verify(received.body, dict(received.headers))
        except standardwebhooks.WebhookVerificationError:
            phase.unsigned += 1
            continue
        if webhook_id in first:
            phase.duplicates += 1
            continue
        first[webhook_id] = received.arrived
        job_id = event["data"]["id"]
        if job_id not in phase.jobs or event["type"] != "generation.completed":
            phase.stray += 1
            continue
        phase.latencies.append(received.arrived - phase.jobs[job_id])
    for job_id in phase.jobs:
        ok = by_job.get(job_id, [])
        if not (
            len(ok) == 1
            and ok[0][2] == "generation.completed"
            and ok[0][3] == "delivered"
            and ok[0][0] in first
        ):
            phase.missing += 1
    return phase


@contextlib.contextmanager
def delivery_worker(url: str) -> Iterator[Worker]:
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as directory:
        worker = Worker(url, Path(directory) / "worker.log").start()
        try:
            deadline = time.monotonic() + WORKER_START_SECONDS
            # It registers itself (procrastinate's heartbeat row) once it runs;
            # its log is at WARNING, so it says nothing at start.
            while not execute("SELECT 1 FROM procrastinate_workers"):
                if worker.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the delivery worker did not start:\n{worker.log()}"
                    )
                time.sleep(0.05)
            yield worker
        finally:
            worker.stop()
            tail = worker.log().strip().splitlines()[-5:]
            if any("Traceback" in line or "ERROR" in line for line in tail):
                print("delivery worker log (tail):\n  " + "\n  ".join(tail))


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    from apikeys.services import api_key_create
    from tests.receiver import Receiver
    from webhooks.services import webhook_secret_get

    load_at_start = server.machine()
    seconds = SMOKE_SECONDS if smoke else SECONDS
    round_jobs = SMOKE_ROUND_JOBS if smoke else ROUND_JOBS
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    receiver = Receiver().start()
    try:
        with server.scratch_database() as url:
            owners = [
                api_key_create(name=f"bench webhooks owner {n}", rate_limit=0)[0]
                for n in range(OWNERS)
            ]
            secret = {
                str(owner.pk): webhook_secret_get(api_key=owner).current
                for owner in owners
            }
            owner_ids = list(secret)
            _, worker_raw = api_key_create(
                name="bench webhooks worker", is_worker=True, rate_limit=0
            )
            headers = {
                **server.PROXY_HEADERS,
                "Content-Type": "application/json",
                "X-API-Key": worker_raw,
            }
            with (
                server.gunicorn(url, WEBHOOK_ALLOW_PRIVATE="1") as srv,
                delivery_worker(url) as worker,
            ):
                port = srv.port

                def phase_of(webhook: str | None, jobs: int, measure) -> tuple:
                    queue(jobs, owners=owner_ids, webhook=webhook)
                    leased = claim_all(port, headers, jobs)
                    since = len(receiver.received)
                    return measure(leased), since, leased

                # Warm-up: both kinds of complete, the worker's first deliveries.
                for webhook in (receiver.url, None):
                    (done, _, _), since, _ = phase_of(
                        webhook, 50, lambda leased: paced(port, headers, leased, 100)
                    )
                    if webhook:
                        settle(Phase(jobs=done), receiver, since, secret)

                # Latency and backlog at a steady RATE.
                with Backlog(url) as backlog:
                    (done, late, paced_errors), since, _ = phase_of(
                        receiver.url,
                        RATE * seconds,
                        lambda leased: paced(port, headers, leased, RATE),
                    )
                    latency = settle(Phase(jobs=done), receiver, since, secret)
                # Throughput with and without, alternated.
                database = connection.settings_dict["NAME"]
                rps: dict[str, list[float]] = {side: [] for side in SIDES}
                cpu: dict[str, list[tuple[float, ...]]] = {side: [] for side in SIDES}
                throughput_errors = 0
                checks: list[Phase] = [latency]
                order = [
                    side
                    for n in range(rounds)
                    for side in (SIDES if n % 2 == 0 else SIDES[::-1])
                ]
                for side in order:
                    webhook = None if side == WITHOUT else receiver.url
                    queue(round_jobs, owners=owner_ids, webhook=webhook)
                    leased = claim_all(port, headers, round_jobs)
                    since = len(receiver.received)
                    used = cpu_seconds(srv, worker, database)
                    if side == PAUSED:
                        worker.process.send_signal(signal.SIGSTOP)
                    try:
                        rate, errors = closed_loop(port, headers, leased)
                    finally:
                        if side == PAUSED:
                            worker.process.send_signal(signal.SIGCONT)
                    if webhook:
                        jobs = dict.fromkeys((job for job, _ in leased), 0.0)
                        checks.append(settle(Phase(jobs=jobs), receiver, since, secret))
                    # Everything a complete cost, its delivery included.
                    after = cpu_seconds(srv, worker, database)
                    cpu[side].append(
                        tuple(
                            (b - a) / round_jobs * 1000
                            for a, b in zip(used, after, strict=True)
                        )
                    )
                    rps[side].append(rate)
                    throughput_errors += errors
                describe = srv.describe()
                worker_args = " ".join(worker.process.args[1:])
    finally:
        receiver.stop()

    errors = paced_errors + throughput_errors
    ratios = {
        side: [a / b for a, b in zip(rps[side], rps[WITHOUT], strict=True)]
        for side in (WITH, PAUSED)
    }
    ratio = statistics.median(ratios[PAUSED])  # the request path (see above)
    p50 = percentile(latency.latencies, 50) if latency.latencies else float("inf")
    p99 = percentile(latency.latencies, 99) if latency.latencies else float("inf")
    worst = max(latency.latencies, default=float("inf"))
    missing = sum(check.missing for check in checks)
    duplicates = sum(check.duplicates for check in checks)
    unsigned = sum(check.unsigned for check in checks)
    stray = sum(check.stray for check in checks)
    deliveries = sum(check.deliveries for check in checks)
    exact = missing == unsigned == stray == errors == 0

    print(
        f"{describe}; delivery worker: {worker_args} (procrastinate, "
        "LISTEN/NOTIFY); receiver: http.server thread on 127.0.0.1"
    )
    print(
        f"latency: {len(done)} completes at {RATE}/s for {seconds} s (paced, "
        f"{PACED_CONNECTIONS} connections, jobs of {OWNERS} owner keys; "
        f"sent late by p99 "
        f"{percentile(late, 99) * 1000:.0f} ms, max {max(late) * 1000:.0f} ms)"
    )
    print(
        f"  complete's 200 -> receiver: p50 {p50 * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms "
        f"({len(latency.latencies)} deliveries)"
    )
    print(
        f"  oldest pending delivery: max {backlog.worst:.2f} s over "
        f"{len(backlog.samples)} samples every {SAMPLE_EVERY * 1000:.0f} ms"
    )
    print(
        f"throughput: {round_jobs} completes per round, {CONNECTIONS} keep-alive "
        f"connections, closed loop, rounds {' '.join(SHORT[side] for side in order)}"
    )
    for side in SIDES:
        versus = (
            f"; / without: {', '.join(f'{r:.2f}' for r in ratios[side])}, "
            f"median {statistics.median(ratios[side]):.2f}"
            if side in ratios
            else ""
        )
        print(
            f"  {side:>19}: {', '.join(f'{r:.0f}' for r in rps[side])} req/s; "
            f"CPU ms/complete: request path "
            f"{statistics.median(c[0] for c in cpu[side]):.1f} + delivery: worker "
            f"{statistics.median(c[1] for c in cpu[side]):.1f}, its backends "
            f"{statistics.median(c[2] for c in cpu[side]):.1f}"
            f"{versus}"
        )
    print(
        f"deliveries checked: {deliveries} (every one signed, "
        f"standardwebhooks); missing {missing}, duplicates {duplicates}, "
        f"bad signature {unsigned}, stray {stray}, request errors {errors}"
    )
    results = [
        (f"p50 <= {P50_TARGET * 1000:.0f} ms", p50 <= P50_TARGET),
        (f"p99 <= {P99_TARGET:.0f} s", p99 <= P99_TARGET),
        (f"oldest pending <= {BACKLOG_TARGET:.0f} s", backlog.worst <= BACKLOG_TARGET),
        (
            f"complete with / without >= {RATIO_TARGET} (request path: worker "
            f"paused; with the worker on the same cores "
            f"{statistics.median(ratios[WITH]):.2f})",
            ratio >= RATIO_TARGET,
        ),
        ("every completed job delivered, signed, no errors", exact),
    ]
    for label, ok in results:
        print(f"  {label}: {'met' if ok else 'MISSED'}")
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return all(ok for _, ok in results)

"""Fault injection against a real gunicorn and a real PostgreSQL.

- The database restarts under a write load (a throwaway cluster, stopped in
  fast mode): clients get 503 JSON while it is down, never a 500 or a hang;
  the same gunicorn workers serve again once it is back; every 201 is in the
  table; no job is handed out twice. With persistent connections and with
  the psycopg pool.
- A statement held up past ``statement_timeout`` is cancelled by the server:
  a 503 JSON, and the same worker serves the next request.
- A worker that claims a job and dies: the job is claimed again once its
  lease expires and finished by another worker.

``wait_for_db`` against a cluster that starts late is covered in
tests/test_connect_retry.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus

import psycopg
import pytest

from tests.liveserver import (
    LiveApi,
    Reply,
    create_key,
    live_api,
    migrate,
)
from tests.serving import scratch_database, url_for

PASSWORD = "fault-pw-N0t-In-Any-Log"
OUTAGE_S = 4
CLIENT_TIMEOUT_S = 15  # well below the test timeout, above the worst 503 path
RECOVERY_DEADLINE_S = 40
CREATORS = 3


def url_with_password(url: str) -> str:
    """Trust authentication ignores it; the logs must never show it."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == HTTPStatus.SERVICE_UNAVAILABLE, reply.body
    assert reply.is_json, reply.headers
    assert reply.json()["code"] == "database_unavailable"
    assert int(reply.headers["Retry-After"]) > 0


# --- The database restarts under load -------------------------------------------


@dataclass
class Outcome:
    started: float
    finished: float
    reply: Reply | None = None
    error: str | None = None
    sent_name: str | None = None


class Load:
    """A few creating threads and one claiming thread, bounded in rate."""

    def __init__(self, api: LiveApi) -> None:
        self.api = api
        self.stop = threading.Event()
        self.creates: list[Outcome] = []
        self.claims: list[Outcome] = []
        self.threads = [
            threading.Thread(target=self._create, args=(n,)) for n in range(CREATORS)
        ]
        self.threads.append(threading.Thread(target=self._claim))

    def _timed(self, method: str, path: str, body=None) -> Outcome:
        started = time.monotonic()
        try:
            reply = self.api.call(method, path, body, timeout=CLIENT_TIMEOUT_S)
            return Outcome(started, time.monotonic(), reply=reply)
        except Exception as exc:  # a timeout or a dropped connection: recorded
            return Outcome(started, time.monotonic(), error=repr(exc))

    def _create(self, thread: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            name = f"load-{thread}-{n}"
            outcome = self._timed("POST", "generations", {"prompt": "p", "name": name})
            outcome.sent_name = name
            self.creates.append(outcome)
            time.sleep(0.02)

    def _claim(self) -> None:
        while not self.stop.is_set():
            self.claims.append(self._timed("POST", "generations/claim"))
            time.sleep(0.1)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)

    def timeline(self, origin: float) -> str:
        """For failure messages: start, end (s after ``origin``) and outcome."""
        outcomes = sorted(self.creates + self.claims, key=lambda o: o.started)
        return "\n".join(
            f"{o.started - origin:+.2f} {o.finished - origin:+.2f} "
            f"{o.reply.status if o.reply else o.error}"
            for o in outcomes
        )

    def created_after(self, moment: float) -> int:
        return sum(
            1
            for o in list(self.creates)
            if o.started > moment and o.reply and o.reply.status == HTTPStatus.CREATED
        )

    def claimed_after(self, moment: float) -> int:
        return sum(
            1
            for o in list(self.claims)
            if o.started > moment and o.reply and o.reply.status == HTTPStatus.OK
        )


def wait_until(condition, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def cluster_database(pg_cluster) -> Iterator[str]:
    """A migrated database on the throwaway cluster; its URL."""
    with scratch_database("faults", server=pg_cluster.url()) as name:
        url = pg_cluster.url(name)
        migrate(url)
        try:
            yield url
        finally:
            pg_cluster.start()  # a failed test may have left it stopped


@pytest.mark.postgres_cluster
@pytest.mark.parametrize("pool", ["0", "1"], ids=["persistent", "pool"])
def test_database_restart_under_load_is_503_then_serves_again(
    pg_cluster, cluster_database, pool, tmp_path
):
    key = create_key(cluster_database, "fault worker", admin=True)
    with live_api(
        url_with_password(cluster_database),
        log_path=tmp_path / "gunicorn.log",
        key=key,
        WEB_CONCURRENCY="2",
        GUNICORN_THREADS="2",
        DB_POOL=pool,
        DB_POOL_TIMEOUT="1",  # a pool waits this long, then 503
        DB_CONNECT_TIMEOUT="2",
        DB_CONNECT_RETRIES="2",
    ) as api:
        workers = api.worker_pids()
        with Load(api) as load:
            wait_until(
                lambda: load.created_after(0) >= 5 and load.claimed_after(0) >= 2,
                RECOVERY_DEADLINE_S,
                "the first creates and claims",
            )
            pg_cluster.stop("fast")
            down = time.monotonic()
            time.sleep(OUTAGE_S)
            restarting = time.monotonic()
            pg_cluster.start()
            up = time.monotonic()
            wait_until(
                lambda: load.created_after(up) >= 5 and load.claimed_after(up) >= 2,
                RECOVERY_DEADLINE_S,
                "the service to answer again after the restart",
            )
        log = api.log()
        assert api.worker_pids() == workers, "a worker died or was restarted"
        assert api.server.process.poll() is None

    assert [o.error for o in load.creates + load.claims if o.error] == []
    for outcome in load.creates:
        assert outcome.reply.status in (
            HTTPStatus.CREATED,
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
    for outcome in load.claims:
        assert outcome.reply.status in (
            HTTPStatus.OK,
            HTTPStatus.NO_CONTENT,
            HTTPStatus.SERVICE_UNAVAILABLE,
        )
    refused = [o.reply for o in load.creates + load.claims if o.reply.status == 503]
    during = [o for o in load.creates if down < o.started and o.finished < restarting]
    timeline = load.timeline(down)
    assert during, f"no response came while the database was down:\n{timeline}"
    assert all(o.reply.status == 503 for o in during), timeline
    for reply in refused:
        assert_unavailable(reply)

    acknowledged = {
        o.reply.json()["id"]: o.sent_name
        for o in load.creates
        if o.reply.status == HTTPStatus.CREATED
    }
    claimed = [
        job["id"]
        for o in load.claims
        if o.reply.status == 200
        for job in o.reply.json()["jobs"]
    ]
    with psycopg.connect(cluster_database) as conn:
        stored = dict(conn.execute("SELECT id::text, name FROM generations").fetchall())
        attempts = dict(
            conn.execute(
                "SELECT id::text, attempts FROM generations WHERE status = 1"
            ).fetchall()
        )
    assert {id_: stored.get(id_) for id_ in acknowledged} == acknowledged
    assert len(claimed) == len(set(claimed)), "a job was handed out twice"
    assert {id_: attempts.get(id_) for id_ in claimed} == dict.fromkeys(claimed, 1)
    assert PASSWORD not in log


# --- statement_timeout and a dying worker (one server on a scratch database) ---


@pytest.fixture(scope="module")
def timeout_db() -> Iterator[str]:
    with scratch_database("faults") as name:
        migrate(url_for(name))
        yield name


@pytest.fixture(scope="module")
def impatient_api(timeout_db, tmp_path_factory) -> Iterator[LiveApi]:
    """One worker, a 300 ms statement timeout and 1 s leases."""
    url = url_for(timeout_db)
    key = create_key(url, "timeout worker", admin=True)
    log = tmp_path_factory.mktemp("impatient") / "gunicorn.log"
    with live_api(
        url,
        log_path=log,
        key=key,
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="2",
        DB_STATEMENT_TIMEOUT_MS="300",
        LEASE_SECONDS="1",
    ) as api:
        yield api


@pytest.fixture
def empty_queue(timeout_db) -> None:
    """Earlier tests' jobs out of the way (soft-deleted: claims skip them)."""
    with psycopg.connect(url_for(timeout_db), autocommit=True) as conn:
        conn.execute(
            "UPDATE generations SET is_deleted = true, deleted_at = now()"
            " WHERE NOT is_deleted"
        )


def waiting_backends(database: str) -> int:
    """The service's statements waiting for a lock right now."""
    with psycopg.connect(url_for(database), autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE NOT l.granted AND a.datname = %s AND a.application_name = %s",
            [database, "lockngen"],
        ).fetchone()[0]


def test_statement_past_the_timeout_is_cancelled_and_the_worker_survives(
    impatient_api, timeout_db
):
    api = impatient_api
    created = api.call("POST", "generations", {"prompt": "locked out"})
    assert created.status == HTTPStatus.CREATED
    generation = created.json()["id"]
    workers = api.worker_pids()
    assert len(workers) == 1

    with psycopg.connect(url_for(timeout_db)) as locker:
        locker.execute("LOCK TABLE generations IN ACCESS EXCLUSIVE MODE")
        for method, path, body in [
            ("GET", f"generations/{generation}", None),
            ("GET", "generations", None),
            ("POST", "generations", {"prompt": "while locked"}),
            ("POST", f"generations/{generation}/cancel", None),
        ]:
            started = time.monotonic()
            reply = api.call(method, path, body, timeout=10)
            assert_unavailable(reply)
            # Cancelled by the server, not abandoned by the client.
            assert waiting_backends(timeout_db) == 0
            assert time.monotonic() - started < 10
        locker.rollback()

    after = api.call("GET", f"generations/{generation}")
    assert after.status == HTTPStatus.OK
    assert after.json()["status"] == "queued"  # the cancel was rolled back
    assert api.worker_pids() == workers
    assert "canceling statement due to statement timeout" in api.log()
    with psycopg.connect(url_for(timeout_db)) as conn:
        names = conn.execute("SELECT prompt FROM generations").fetchall()
    assert ("while locked",) not in names


DYING_WORKER = """
import http.client, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=15)
conn.request("POST", "/api/v1/generations/claim", headers={
    "Authorization": "Bearer " + sys.argv[2], "X-Forwarded-Proto": "https"})
reply = conn.getresponse()
print(reply.status, reply.read().decode(), flush=True)
time.sleep(120)  # "rendering" until it is killed, never a heartbeat
"""


def test_job_of_a_worker_that_died_is_claimed_again_after_its_lease(
    impatient_api, empty_queue, timeout_db
):
    api = impatient_api
    job = api.call("POST", "generations", {"prompt": "orphaned"}).json()["id"]
    worker = subprocess.Popen(
        [sys.executable, "-c", DYING_WORKER, str(api.server.port), api.key],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        status, _, body = worker.stdout.readline().partition(" ")
    finally:
        worker.kill()
        worker.wait(timeout=10)
    assert status == "200", body
    (first,) = json.loads(body)["jobs"]
    assert (first["id"], first["status"], first["attempts"]) == (job, "running", 1)

    deadline = time.monotonic() + 15
    while True:
        claim = api.call("POST", "generations/claim")
        if claim.status == HTTPStatus.OK:
            break
        assert claim.status == HTTPStatus.NO_CONTENT, claim.body
        assert time.monotonic() < deadline, "the orphaned job was never re-claimed"
        time.sleep(0.2)
    (second,) = claim.json()["jobs"]
    assert (second["id"], second["status"], second["attempts"]) == (job, "running", 2)
    assert second["started_at"] > first["started_at"]

    # Had the first worker only stalled, its token would now be refused.
    stale = api.call(
        "POST",
        f"generations/{job}/complete",
        {"lease_token": first["lease_token"], "output_path": "stale.png"},
    )
    assert (stale.status, stale.json()["code"]) == (HTTPStatus.CONFLICT, "lease_lost")
    done = api.call(
        "POST",
        f"generations/{job}/complete",
        {"lease_token": second["lease_token"], "output_path": "o.png"},
    )
    assert done.status == HTTPStatus.OK, done.body
    assert (done.json()["status"], done.json()["attempts"]) == ("completed", 2)
    time.sleep(1.2)  # past the old lease: nothing left to claim
    assert api.call("POST", "generations/claim").status == HTTPStatus.NO_CONTENT


# --- Keep-alive clients whose request body the application never read ---------


def post_and_keep_open(port: int, path: str, body: bytes) -> socket.socket:
    """POST on a keep-alive connection, read the whole response, stay connected."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-Proto: https\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    assert not response.will_close  # kept alive, as a pooling client keeps it
    return sock


def test_unread_request_bodies_on_idle_keep_alive_connections_do_not_block_workers(
    impatient_api,
):
    """gunicorn's gthread worker, kept-alive connections and a body the view
    refused before reading it (benoitc/gunicorn#3301): each such connection
    must not pin a worker thread while its client sits idle."""
    api = impatient_api
    threads = int(api.server.env["GUNICORN_THREADS"])
    body = b'{"output_path": "' + b"x" * 9000 + b'"}'  # past gunicorn's 8 KiB read
    idle = [
        post_and_keep_open(api.server.port, "/api/v1/keys/me", body)  # 401 unread
        for _ in range(threads)
    ]
    try:
        reply = api.call("GET", "keys/me", timeout=5)
        assert reply.status == HTTPStatus.OK
    finally:
        for sock in idle:
            sock.close()

"""The delivery worker (``manage.py deliver_webhooks``) as a real process
against a real receiver on 127.0.0.1 (SPEC §10): at least once, retries on
the schedule, 410, exhaustion, redelivery, rollback, SIGKILL mid-request.

These tests commit for real (``transaction=True``): the worker is another
process and sees only committed rows.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from django.db import connection, transaction

from generations.api import generation_json
from tests.factories import claim_one, make_api_key, make_generation
from tests.liveserver import live_api, migrate
from tests.receiver import HANG, Receiver
from tests.serving import BASE_DIR, VENV_BIN, manage, process_env, scratch_database
from tests.webhooks import emit as emitted
from tests.webhooks import job_of, payload, verifies
from webhooks import services, wake
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db(transaction=True)

WAIT_S = 30.0  # upper bound on anything a test waits for; never a measurement
# After a PostgreSQL restart the worker reconnects with backoff and the
# deliveries resume on their schedule: a loaded CI machine once needed more
# than WAIT_S for all ten (still a bound, not a measurement).
RESTART_WAIT_S = 90.0


class Worker:
    def __init__(self, url: str, log_path: Path, schedule: str, stalled_after: float):
        self.log_path = log_path
        self.env = process_env(
            DATABASE_URL=url,
            LOCKNGEN_ENV="development",
            WEBHOOK_ALLOW_PRIVATE="1",
            WEBHOOK_RETRY_SCHEDULE=schedule,
            WEBHOOK_TIMEOUT="5",
            LOG_LEVEL="DEBUG",
        )
        self.stalled_after = stalled_after
        self.process: subprocess.Popen | None = None

    def start(self) -> Worker:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603
            [
                str(VENV_BIN / "python"),
                "manage.py",
                "deliver_webhooks",
                "--stalled-after",
                str(self.stalled_after),
                "--poll-interval",
                "0.2",
            ],
            cwd=BASE_DIR,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + WAIT_S
        while "Starting worker on queues webhooks" not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(WAIT_S)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(WAIT_S)


@pytest.fixture
def clean_queue(test_database_url):
    """procrastinate's tables are not Django-managed: the flush between
    transactional tests leaves them, so each test starts them empty."""
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE procrastinate_jobs, procrastinate_events, "
            "procrastinate_periodic_defers, procrastinate_workers CASCADE"
        )
    return test_database_url


@pytest.fixture
def start_worker(clean_queue, tmp_path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(schedule: str = "0.2,0.2", stalled_after: float = 30.0) -> Worker:
        worker = Worker(
            clean_queue, tmp_path / "worker.log", schedule, stalled_after
        ).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*statuses: int) -> Receiver:
        receiver = Receiver(statuses or (200,)).start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def key():
    api_key, _ = make_api_key(name="hooks", rate_limit=0)
    return api_key


def emit(generation, url: str, event: str = "generation.completed") -> WebhookDelivery:
    return emitted(generation, event, url=url)


def settled(row: WebhookDelivery, state: str) -> WebhookDelivery:
    """The row once it reaches ``state`` and its job is finished."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        row.refresh_from_db()
        if row.state == state and not open_jobs():
            return row
        time.sleep(0.05)
    raise AssertionError(f"delivery {row.pk} is {row.state}, not {state}")


def open_jobs() -> int:
    """Delivery jobs still to run or running."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM procrastinate_jobs "
            "WHERE queue_name = 'webhooks' AND status IN ('todo', 'doing')"
        )
        return cursor.fetchone()[0]


def test_a_committed_delivery_wakes_the_listening_worker(clean_queue, key):
    """The notification procrastinate's worker wakes on, on both channels it
    may LISTEN on, once the transition has committed."""
    with psycopg.connect(clean_queue, autocommit=True) as listener:
        listener.execute('LISTEN "procrastinate_queue_v1#webhooks"')
        listener.execute("LISTEN procrastinate_any_queue_v1")
        row = emit(make_generation(api_key=key), "http://x.invalid/")
        notices = list(listener.notifies(timeout=WAIT_S, stop_after=2))
    job_id = job_of(row)
    assert sorted(notice.channel for notice in notices) == [
        "procrastinate_any_queue_v1",
        "procrastinate_queue_v1#webhooks",
    ]
    assert [json.loads(notice.payload) for notice in notices] == [
        {"type": "job_inserted", "job_id": job_id}
    ] * 2


def drain(listener: psycopg.Connection, timeout: float) -> list[str]:
    return [notice.payload for notice in listener.notifies(timeout=timeout)]


@pytest.fixture
def slow_waker(monkeypatch) -> Iterator[wake.Waker]:
    """A waker that sends at most one notification every two seconds (the
    deployed one: every 20 ms), so a test's burst of commits is one burst."""
    waker = wake.Waker(interval=2.0)
    monkeypatch.setattr(wake, "waker", waker)
    yield waker
    waker.stop()


def test_a_burst_of_commits_is_one_wake_up_after_the_last(clean_queue, key, slow_waker):
    """A commit after a quiet spell is told at once; the commits that follow
    within the interval, in one notification once it is over, naming the
    last job; a transaction that rolls back wakes nobody."""
    generations = [make_generation(api_key=key) for _ in range(10)]
    with psycopg.connect(clean_queue, autocommit=True) as listener:
        listener.execute('LISTEN "procrastinate_queue_v1#webhooks"')
        first = emit(generations[0], "http://x.invalid/")
        (told,) = listener.notifies(timeout=WAIT_S, stop_after=1)
        # The waker now pauses for its interval (2 s): these land in it.
        rows = [emit(generation, "http://x.invalid/") for generation in generations[1:]]
        burst = drain(listener, slow_waker.interval + 1.0)

        with transaction.atomic():
            emit(generations[0], "http://x.invalid/", "generation.start")
            transaction.set_rollback(True)
        after_rollback = drain(listener, slow_waker.interval + 0.5)

    assert json.loads(told.payload) == {"type": "job_inserted", "job_id": job_of(first)}
    assert [json.loads(payload) for payload in burst] == [
        {"type": "job_inserted", "job_id": job_of(rows[-1])}
    ]
    assert after_rollback == []
    assert open_jobs() == 10


def test_one_commit_of_many_jobs_is_one_wake_up(clean_queue, key):
    generations = [make_generation(api_key=key) for _ in range(3)]
    with psycopg.connect(clean_queue, autocommit=True) as listener:
        listener.execute('LISTEN "procrastinate_queue_v1#webhooks"')
        with transaction.atomic():
            for generation in generations:
                emit(generation, "http://x.invalid/")
        notices = drain(listener, 1.0)
    assert len(notices) == 1
    assert open_jobs() == 3


def test_the_waker_outlives_its_lost_connection(clean_queue, key):
    """A waker whose connection was cut (a database restart, a proxy's idle
    timeout) wakes the workers on a new one next time."""
    with psycopg.connect(clean_queue, autocommit=True) as listener:
        listener.execute('LISTEN "procrastinate_queue_v1#webhooks"')
        emit(make_generation(api_key=key), "http://x.invalid/")
        assert len(drain(listener, 2.0)) == 1
        (cut,) = listener.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND query LIKE '%%pg_notify(%%'",
        ).fetchone()
        assert cut == 1  # the waker's own backend, idle after its notification
        row = emit(make_generation(api_key=key), "http://x.invalid/")
        notices = list(listener.notifies(timeout=WAIT_S, stop_after=1))
    assert [json.loads(notice.payload) for notice in notices] == [
        {"type": "job_inserted", "job_id": job_of(row)}
    ]


def test_a_complete_served_by_gunicorn_wakes_the_workers(clean_queue, key, tmp_path):
    """gunicorn's workers are forked: each starts a waker of its own (nothing
    but the waker notifies, so without it no notification comes at all)."""
    _, worker_key = make_api_key(name="gpu", is_worker=True, rate_limit=0)
    # Only the completion is announced: the claim (in this process) notifies
    # nothing that the listener could mistake for gunicorn's.
    make_generation(
        api_key=key, webhook="http://x.invalid/", webhook_events_filter=["completed"]
    )
    job = claim_one(max_jobs=1, worker="gpu-1")
    with (
        psycopg.connect(clean_queue, autocommit=True) as listener,
        live_api(clean_queue, log_path=tmp_path / "gunicorn.log") as api,
    ):
        listener.execute('LISTEN "procrastinate_queue_v1#webhooks"')
        reply = api.call(
            "POST",
            f"generations/{job.pk}/complete",
            {"lease_token": str(job.lease_token), "output_path": "outputs/a.png"},
            key=worker_key,
        )
        assert reply.status == 200, reply.body
        notices = list(listener.notifies(timeout=WAIT_S, stop_after=1))
    (delivery,) = WebhookDelivery.objects.filter(generation_id=job.pk)
    assert [json.loads(notice.payload) for notice in notices] == [
        {"type": "job_inserted", "job_id": job_of(delivery)}
    ]


def test_no_trigger_notifies_inside_the_transaction_that_defers_a_job():
    """procrastinate's insert trigger would make every transition that carries
    a webhook commit single file (migration webhooks 0002): a procrastinate
    upgrade that brings one back must be looked at."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 'procrastinate_jobs'::regclass"
            " AND NOT t.tgisinternal AND t.tgenabled <> 'D'"
            " AND t.tgtype & 4 = 4"  # fires on INSERT
            " AND p.prosrc LIKE '%%pg_notify%%'"
        )
        assert cursor.fetchall() == []
        cursor.execute(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = %s",
            ["procrastinate_jobs_notify_queue_job_inserted_v1"],
        )
        assert cursor.fetchall() == [("D",)]


def test_start_and_completed_arrive_signed_with_the_owners_view(
    key, start_worker, receivers
):
    receiver = receivers()
    services.webhook_secret_get(api_key=key)
    secret = services.webhook_secret_rotate(api_key=key)
    worker = start_worker()
    generation = make_generation(api_key=key, name="dusk")

    start = emit(generation, receiver.url, "generation.start")
    completed = emit(generation, receiver.url, "generation.completed")

    got = receiver.wait_for(2, WAIT_S)
    settled(start, "delivered"), settled(completed, "delivered")
    by_id = {r.headers["webhook-id"]: r for r in got}
    assert set(by_id) == {str(start.pk), str(completed.pk)}
    assert payload(by_id[str(start.pk)])["type"] == "generation.start"
    assert payload(by_id[str(completed.pk)])["type"] == "generation.completed"
    for received in got:
        assert verifies(secret.current, received)
        assert verifies(secret.previous, received)
        assert payload(received)["data"] == generation_json(generation)
    worker.stop()
    log = worker.log()
    assert "webhooks.deliver" in log  # the worker did log the deliveries
    for value in (secret.current, secret.previous):
        assert value.removeprefix("whsec_") not in log


def test_500_500_200_is_three_attempts_with_one_webhook_id(
    key, start_worker, receivers
):
    receiver = receivers(500, 500, 200)
    worker = start_worker(schedule="0.2,0.2")
    row = emit(make_generation(api_key=key), receiver.url)

    row = settled(row, "delivered")
    # A scheduled retry is one log line, not a traceback.
    assert worker.log().count("to retry") == 2
    assert "Traceback" not in worker.log()

    got = receiver.wait_for(3)
    assert len(got) == 3
    assert {r.headers["webhook-id"] for r in got} == {str(row.pk)}
    assert len({r.body for r in got}) == 1
    assert (row.attempts, row.last_status) == (3, "200")


def test_a_receiver_that_is_down_gets_the_next_scheduled_attempt(
    key, start_worker, receivers
):
    receiver = receivers()
    receiver.stop()  # down: its port refuses connections
    start_worker(schedule="1.5,30")
    row = emit(make_generation(api_key=key), receiver.url)
    deadline = time.monotonic() + WAIT_S
    while row.attempts < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        row.refresh_from_db()
    assert row.state == "pending" and row.last_status.startswith("connection")

    receiver.start()
    row = settled(row, "delivered")

    assert row.attempts == 2
    (got,) = receiver.wait_for(1)
    assert got.headers["webhook-id"] == str(row.pk)


def test_410_is_one_attempt_and_gone(key, start_worker, receivers):
    receiver = receivers(410, 200)
    start_worker()
    row = settled(emit(make_generation(api_key=key), receiver.url), "gone")
    assert row.attempts == 1
    assert len(receiver.received) == 1


def test_an_exhausted_schedule_fails_and_redeliver_makes_one_more_attempt(
    key, start_worker, receivers
):
    receiver = receivers(500, 500, 500, 200)
    start_worker(schedule="0.1,0.1")
    row = settled(emit(make_generation(api_key=key), receiver.url), "failed")
    assert (row.attempts, row.last_status) == (3, "500")
    assert len(receiver.received) == 3

    services.delivery_redeliver(delivery=row)
    row = settled(row, "delivered")

    assert row.attempts == 4
    got = receiver.wait_for(4)
    assert len(got) == 4
    assert {r.headers["webhook-id"] for r in got} == {str(row.pk)}


def test_a_transition_that_rolls_back_sends_nothing(key, start_worker, receivers):
    receiver = receivers()
    start_worker()
    rolled_back = make_generation(api_key=key, name="rolled back")

    class Rollback(Exception):
        pass

    with contextlib.suppress(Rollback), transaction.atomic():
        emit(rolled_back, receiver.url)
        raise Rollback
    # A committed event afterwards: once it has arrived, the worker has had
    # every chance to send the other one too.
    sentinel = settled(emit(make_generation(api_key=key), receiver.url), "delivered")

    got = receiver.wait_for(1)
    assert [r.headers["webhook-id"] for r in got] == [str(sentinel.pk)]
    assert WebhookDelivery.objects.count() == 1


def test_a_worker_killed_mid_request_is_delivered_after_a_restart(
    key, start_worker, receivers
):
    receiver = receivers(HANG, 200)
    first = start_worker(stalled_after=1.0)
    row = emit(make_generation(api_key=key), receiver.url)
    (held,) = receiver.wait_for(1)

    first.kill()  # SIGKILL with the request in flight: nothing recorded
    receiver.release()
    row.refresh_from_db()
    assert (row.state, row.attempts) == ("pending", 0)

    start_worker(stalled_after=1.0)
    row = settled(row, "delivered")

    retried = receiver.wait_for(2)[1]
    assert retried.headers["webhook-id"] == held.headers["webhook-id"] == str(row.pk)
    assert retried.body == held.body
    assert row.attempts == 1


def test_events_committed_while_no_worker_runs_are_delivered_when_one_starts(
    key, start_worker, receivers
):
    receiver = receivers()
    rows = [emit(make_generation(api_key=key), receiver.url) for _ in range(5)]

    start_worker()

    for row in rows:
        settled(row, "delivered")
    got = receiver.wait_for(5)
    assert sorted(r.headers["webhook-id"] for r in got) == sorted(
        str(r.pk) for r in rows
    )


def test_deliver_webhooks_refuses_to_start_on_the_sqlite_fallback():
    env = process_env(DATABASE_URL=None, LOCKNGEN_ENV="development")
    result = subprocess.run(  # noqa: S603
        [str(VENV_BIN / "python"), "manage.py", "deliver_webhooks"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


# --- PostgreSQL restarted with deliveries pending (a throwaway cluster) --------

EMIT_ON_CLUSTER = """
from tests.factories import make_api_key, make_generation
from tests.webhooks import emit
key, _ = make_api_key(name="restart", rate_limit=0)
for _ in range({count}):
    print(emit(make_generation(api_key=key), url="{url}").pk)
"""


def cluster_rows(url: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            (str(pk), state, attempts)
            for pk, state, attempts in conn.execute(
                "SELECT id, state, attempts FROM webhook_deliveries"
            )
        ]


@pytest.mark.postgres_cluster
def test_deliveries_pending_across_a_postgres_restart_are_all_delivered(
    pg_cluster, receivers, tmp_path
):
    count = 10
    receiver = receivers()
    receiver.stop()  # down: every first attempt fails and is rescheduled
    with scratch_database("webhooks", server=pg_cluster.url()) as name:
        url = pg_cluster.url(name)
        try:
            migrate(url)
            worker = Worker(url, tmp_path / "worker.log", "0.5," * 40 + "0.5", 30)
            worker.start()
            done = manage(
                "shell",
                "-c",
                EMIT_ON_CLUSTER.format(count=count, url=receiver.url),
                env=worker.env,
            )
            assert done.returncode == 0, done.stderr
            emitted = set(done.stdout.split()[-count:])
            wait_until(
                lambda: all(a >= 1 for _, _, a in cluster_rows(url)),
                "every delivery's first (failed) attempt",
            )

            pg_cluster.stop("fast")
            time.sleep(1)  # an outage, not a measurement
            pg_cluster.start()
            receiver.start()

            try:
                wait_until(
                    lambda: {s for _, s, _ in cluster_rows(url)} == {"delivered"},
                    "every delivery to arrive after the restart",
                    timeout=RESTART_WAIT_S,
                )
            except AssertionError as exc:
                rows = cluster_rows(url)
                raise AssertionError(f"{exc}: {rows}\n{worker.log()[-4000:]}") from None
            assert {pk for pk, _, _ in cluster_rows(url)} == emitted
            ids = {r.headers["webhook-id"] for r in receiver.wait_for(count)}
            assert ids == emitted
            assert worker.process.poll() is None, worker.log()
            worker.stop()
        finally:
            pg_cluster.start()


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except psycopg.OperationalError:
            pass  # the cluster is restarting
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("database", "code"), [("postgres", 0), ("sqlite", 1)], ids=["postgres", "sqlite"]
)
def test_deliver_webhooks_check_says_whether_webhooks_can_run(
    test_database_url, database, code
):
    url = test_database_url if database == "postgres" else None
    env = process_env(DATABASE_URL=url, LOCKNGEN_ENV="development")
    done = manage("deliver_webhooks", "--check", env=env)
    assert done.returncode == code, done.stderr

"""docker/entrypoint.sh, run on the host against the local PostgreSQL.

Development migrates, seeds the dev key and serves through gunicorn with
gunicorn.conf.py; production never migrates, and /health/ready holds traffic
(503) until an operator has run ``manage.py migrate``.
"""

from __future__ import annotations

import json
import subprocess
from http import HTTPStatus

import psycopg

from apikeys.keys import DEFAULT_DEV_API_KEY, hash_key
from tests.serving import (
    BASE_DIR,
    Server,
    closed_port,
    manage,
    process_env,
    scratch_database,
    url_for,
)

ENTRYPOINT = BASE_DIR / "docker" / "entrypoint.sh"
REDIS_URL = "redis://127.0.0.1:6379/15"
PRODUCTION = {
    "LOCKNGEN_ENV": "production",
    "SECRET_KEY": "a-production-secret-key-for-tests-only-0123456789abcdef",
    "ALLOWED_HOSTS": "api.lockngen.test",
    "REDIS_URL": REDIS_URL,
}


def run_entrypoint(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ENTRYPOINT), *command],
        cwd="/",  # the script finds the project itself
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def query(database: str, sql: str, *params: object) -> object:
    with psycopg.connect(url_for(database)) as conn:
        return conn.execute(sql, params).fetchone()[0]


def dev_keys(database: str) -> int:
    sql = "SELECT count(*) FROM api_keys WHERE key_hash = %s"
    return query(database, sql, hash_key(DEFAULT_DEV_API_KEY))


def test_development_start_migrates_seeds_and_serves_through_gunicorn(tmp_path):
    with scratch_database() as name:
        env = process_env(
            LOCKNGEN_ENV="development", DATABASE_URL=url_for(name), REDIS_URL=REDIS_URL
        )
        server = Server(env, command=[str(ENTRYPOINT)], log_path=tmp_path / "log")
        try:
            server.start(wait=False)  # no arguments: gunicorn by default
            ready = server.wait_for_status("/health/ready", HTTPStatus.OK)
            traced = server.get("/health/ready", X_Request_ID="ops-entrypoint-42")
        finally:
            server.stop()
        migrations = query(name, "SELECT count(*) FROM django_migrations")
        seeded = dev_keys(name)
        # A restart applies nothing and seeds a key that went missing (by
        # seed_dev_key: the data migration is long applied).
        with psycopg.connect(url_for(name), autocommit=True) as conn:
            conn.execute("DELETE FROM api_keys")
        restart = run_entrypoint("true", env=env)
        reseeded = dev_keys(name)
    log = server.log()
    assert json.loads(ready.body)["status"] == "healthy"
    assert migrations > 0
    assert seeded == 1
    assert f"Listening at: http://127.0.0.1:{server.port}" in log  # gunicorn.conf.py
    # gthread minus its blocking close on the event loop (issue 9)
    assert "Using worker: lockngen.gunicorn_worker.ThreadWorker" in log
    assert '"GET /health/ready HTTP/1.1" 200' in log  # access log on stdout
    assert traced.headers["X-Request-ID"] == "ops-entrypoint-42"
    assert "request_id=ops-entrypoint-42" in log  # correlates with app logs
    assert restart.returncode == 0, restart.stderr
    assert "No migrations to apply." in restart.stdout
    assert reseeded == 1


def test_production_start_never_migrates_and_is_not_ready_until_migrated(tmp_path):
    with scratch_database() as name:
        env = process_env(DATABASE_URL=url_for(name), **PRODUCTION)
        server = Server(env, command=[str(ENTRYPOINT)], log_path=tmp_path / "log")
        try:
            server.start()  # serving: /health/live answers
            before = server.get("/health/ready")
            schema = query(name, "SELECT to_regclass('django_migrations')::text")
            migrated = manage("migrate", "--noinput", env=env)  # the operator
            after = server.get("/health/ready")
        finally:
            server.stop()
        seeded = query(name, "SELECT count(*) FROM api_keys")
    assert before.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert json.loads(before.body)["migrations"] == "pending"
    assert schema is None  # the entrypoint applied nothing
    assert migrated.returncode == 0, migrated.stderr
    assert after.status == HTTPStatus.OK
    assert json.loads(after.body)["status"] == "healthy"
    assert seeded == 0  # production seeds no development key


def test_entrypoint_gives_up_when_the_database_never_answers():
    password = "pw-N3ver-Printed"
    done = run_entrypoint(
        "echo",
        "started",
        env=process_env(
            DATABASE_URL=f"postgres://lockn:{password}@127.0.0.1:{closed_port()}/x",
            WAIT_FOR_DB_TIMEOUT="1",
            DB_CONNECT_RETRIES="0",
        ),
    )
    assert done.returncode != 0
    assert "started" not in done.stdout
    assert "did not answer" in done.stderr
    assert password not in done.stdout + done.stderr


def test_entrypoint_execs_the_given_command_with_its_exit_status():
    done = run_entrypoint(
        "sh",
        "-c",
        'echo "running $LOCKNGEN_ENV"; exit 7',
        env=process_env(DATABASE_URL=url_for("postgres"), **PRODUCTION),
    )
    assert done.returncode == 7
    assert "running production" in done.stdout
    assert "migrat" not in done.stdout.lower()  # production applies nothing


def test_a_replica_with_migrate_on_start_off_never_migrates():
    with scratch_database() as name:
        env = process_env(
            LOCKNGEN_ENV="development",
            MIGRATE_ON_START="0",
            DATABASE_URL=url_for(name),
            REDIS_URL=REDIS_URL,
        )
        result = run_entrypoint("true", env=env)
        tables = query(name, "SELECT count(*) FROM pg_tables WHERE schemaname='public'")
    assert result.returncode == 0, result.stderr
    assert tables == 0

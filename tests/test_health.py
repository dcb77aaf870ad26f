"""Health endpoints (SPEC §6) served by real gunicorn processes (gunicorn.conf.py).

Each scenario is a server of its own: PostgreSQL + Redis (healthy), the
psycopg pool, the SQLite fallback (degraded), an unreachable database and a
fresh database with every migration pending (unhealthy), and production
settings probed with a foreign Host over plain HTTP.
"""

from __future__ import annotations

import json
import subprocess
import time
from http import HTTPStatus

import psycopg
import pytest

from tests.serving import (
    BASE_DIR,
    VENV_BIN,
    Server,
    admin_connection,
    build_context,
    closed_port,
    connection_count,
    manage,
    process_env,
    scratch_database,
    serving,
    url_for,
)

PASSWORD = "pw-Sh0uld-N3ver-Leak"
REDIS_URL = "redis://127.0.0.1:6379/15"
APP_NAME = "ops_health_probe"
PROD_HOST = "api.lockngen.test"
FOREIGN_HOST = "10.1.2.3:8000"
THREADS = 2
PROBES = 50


def body(response) -> dict:
    return json.loads(response.body)


@pytest.fixture(scope="module")
def test_database():
    """A scratch database migrated by ``manage.py migrate``, shared by the module."""
    with scratch_database() as name:
        done = manage(
            "migrate", "--noinput", env=process_env(DATABASE_URL=url_for(name))
        )
        assert done.returncode == 0, done.stderr
        yield name


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    """A copy of the build context, collectstatic'ed like the Dockerfile does."""
    app = build_context(tmp_path_factory.mktemp("context"))
    done = manage(
        "collectstatic",
        "--noinput",
        cwd=app,
        env=process_env(
            LOCKNGEN_ENV="production",
            SECRET_KEY="collectstatic-only",
            ALLOWED_HOSTS="localhost",
            DATABASE_URL="postgres://build@localhost:5432/build",
        ),
    )
    assert done.returncode == 0, done.stderr
    return app


@pytest.fixture(scope="module")
def healthy(test_database, tmp_path_factory):
    env = process_env(
        DATABASE_URL=url_for(
            test_database, password=PASSWORD, application_name=APP_NAME
        ),
        REDIS_URL=REDIS_URL,
        GUNICORN_THREADS=str(THREADS),
    )
    log = tmp_path_factory.mktemp("healthy") / "server.log"
    with serving(env, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    env = process_env(
        DATABASE_URL=f"postgres://lockn:{PASSWORD}@127.0.0.1:{closed_port()}/lockngen",
        REDIS_URL=REDIS_URL,
        DB_CONNECT_RETRIES="0",
    )
    log = tmp_path_factory.mktemp("unreachable") / "server.log"
    with serving(env, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def production(test_database, context, tmp_path_factory):
    env = process_env(
        LOCKNGEN_ENV="production",
        SECRET_KEY="a-production-secret-key-for-tests-only-0123456789abcdef",
        ALLOWED_HOSTS=PROD_HOST,
        DATABASE_URL=url_for(test_database, password=PASSWORD),
        REDIS_URL=REDIS_URL,
    )
    log = tmp_path_factory.mktemp("production") / "server.log"
    with serving(env, log_path=log, cwd=context) as server:
        yield server


# --- healthy ------------------------------------------------------------------


def test_live_and_ready_are_healthy_on_postgres_with_redis(healthy):
    live, ready = healthy.get("/health/live"), healthy.get("/health/ready")
    assert (live.status, body(live)) == (HTTPStatus.OK, {"status": "healthy"})
    assert ready.status == HTTPStatus.OK
    assert body(ready) == {"status": "healthy", "database": "ok", "migrations": "ok"}
    assert "no-store" in ready.headers["Cache-Control"]


def test_full_report_is_healthy_with_every_check_ok_and_queue_gauges(healthy):
    response = healthy.get("/health/?format=json")
    report = body(response)
    assert response.status == HTTPStatus.OK
    assert report["status"] == "healthy"
    assert set(report["checks"].values()) == {"OK"}
    checks = " ".join(report["checks"])
    for name in (
        "Database",
        "Migrations",
        "RateLimitCache",
        "QueueGauges",
        "DatabaseBackend",
    ):
        assert name in checks
    assert "ConnectionPool" not in checks  # DB_POOL is off
    assert set(report["metrics"]["queue"]) == {
        "queued",
        "oldest_queued_age_seconds",
        "running",
        "expired_leases",
        "queued_per_model",
        "oldest_queued_age_seconds_per_model",
        "keys_at_cap",
    }


@pytest.mark.parametrize(
    ("query", "accept", "marker"),
    [
        ("", "text/html", 'data-state="healthy"'),
        ("?format=text", "*/*", "status: healthy"),
        ("?format=openmetrics", "*/*", 'lockngen_health_state="healthy"} 1'),
    ],
    ids=["html", "text", "openmetrics"],
)
def test_every_report_format_carries_the_state(healthy, query, accept, marker):
    response = healthy.get(f"/health/{query}", Accept=accept)
    assert response.status == HTTPStatus.OK
    assert marker in response.body


def test_openmetrics_publishes_the_queue_gauges(healthy):
    text = healthy.get("/health/?format=openmetrics").body
    for gauge in (
        "lockngen_queue_queued",
        "lockngen_queue_oldest_queued_age_seconds",
        "lockngen_queue_running",
        "lockngen_queue_expired_leases",
        "lockngen_queue_keys_at_cap",
    ):
        assert f"# TYPE {gauge} gauge" in text
        assert f"\n{gauge} " in text
    for gauge in (  # labelled by model; no series while nothing is queued
        "lockngen_queue_queued_per_model",
        "lockngen_queue_oldest_queued_age_seconds_per_model",
    ):
        assert f"# TYPE {gauge} gauge" in text
    assert text.endswith("# EOF\n")


def test_probes_leave_no_connection_behind(healthy, test_database):
    for _ in range(PROBES):
        assert healthy.get("/health/?format=json").status == HTTPStatus.OK
        assert healthy.get("/health/ready").status == HTTPStatus.OK
    # Only the request threads' own persistent connections (CONN_MAX_AGE)
    # remain; a check that left its connection behind would add one per probe.
    assert connection_count(test_database, APP_NAME) <= THREADS


def sessions_opened(database: str) -> int:
    """Sessions ever opened on ``database`` (PostgreSQL's cumulative counter)."""
    with admin_connection() as conn:
        return conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", [database]
        ).fetchone()[0]


def test_report_probes_open_no_sessions_of_their_own(healthy, test_database):
    """Each /health/ used to open 3 fresh sessions (SPEC §12)."""
    before = sessions_opened(test_database)
    for _ in range(PROBES):
        assert healthy.get("/health/?format=json").status == HTTPStatus.OK
    time.sleep(0.5)  # a closed session's statistics are flushed as it exits
    # At most the request threads' own persistent connections, if not open yet.
    assert sessions_opened(test_database) - before <= THREADS


def test_pool_stats_are_reported_and_the_pool_closes_on_exit(test_database, tmp_path):
    app_name = "ops_health_pool"
    env = process_env(
        DATABASE_URL=url_for(test_database, application_name=app_name),
        REDIS_URL=REDIS_URL,
        DB_POOL="1",
        GUNICORN_THREADS=str(THREADS),
    )
    server = Server(env, log_path=tmp_path / "server.log")
    try:
        server.start()
        for _ in range(PROBES):
            assert server.get("/health/?format=json").status == HTTPStatus.OK
        report = body(server.get("/health/?format=json"))
        assert connection_count(test_database, app_name) <= THREADS
        metrics = server.get("/health/?format=openmetrics").body
    finally:
        server.stop()
    assert report["status"] == "healthy"
    assert report["checks"]["ConnectionPool(alias='default')"] == "OK"
    pool = report["metrics"]["db_pool"]
    assert pool["max"] == THREADS  # DB_POOL_MAX_SIZE defaults to GUNICORN_THREADS
    assert pool["requests_waiting"] == 0
    assert 0 <= pool["available"] <= pool["size"] <= pool["max"]
    assert "\nlockngen_db_pool_size " in metrics
    assert "closed the database connection pool" in server.log()


# --- degraded -------------------------------------------------------------------


def test_sqlite_fallback_is_degraded_but_serving(context, tmp_path):
    env = process_env(REDIS_URL=REDIS_URL)  # no DATABASE_URL: the fallback
    migrated = manage("migrate", "--noinput", env=env, cwd=context)
    assert migrated.returncode == 0, migrated.stderr
    with serving(env, log_path=tmp_path / "server.log", cwd=context) as server:
        live = server.get("/health/live")
        ready = server.get("/health/ready")
        report = server.get("/health/?format=json")
        html = server.get("/health/", Accept="text/html")
        metrics = server.get("/health/?format=openmetrics")
    assert (live.status, body(live)["status"]) == (HTTPStatus.OK, "degraded")
    assert (ready.status, body(ready)["status"]) == (HTTPStatus.OK, "degraded")
    assert "DATABASE_URL" in " ".join(body(ready)["warnings"])
    assert (report.status, body(report)["status"]) == (HTTPStatus.OK, "degraded")
    assert body(report)["checks"]["DatabaseBackend()"].startswith("Warning: SQLite")
    assert html.status == HTTPStatus.OK
    assert 'data-state="degraded"' in html.body
    assert 'lockngen_health_state{lockngen_health_state="degraded"} 1' in metrics.body
    assert "django_health_check_overall_status 1" in metrics.body


def test_local_memory_rate_limits_are_degraded(test_database, tmp_path):
    env = process_env(DATABASE_URL=url_for(test_database))  # no REDIS_URL
    with serving(env, log_path=tmp_path / "server.log") as server:
        ready = server.get("/health/ready")
        report = server.get("/health/?format=json")
    assert (ready.status, body(ready)["status"]) == (HTTPStatus.OK, "degraded")
    assert (report.status, body(report)["status"]) == (HTTPStatus.OK, "degraded")
    assert "REDIS_URL" in body(report)["checks"]["RateLimitCache()"]


# --- unhealthy --------------------------------------------------------------------


def test_unreachable_database_is_unhealthy_but_alive(unreachable):
    live = unreachable.get("/health/live")
    ready = unreachable.get("/health/ready")
    assert live.status == HTTPStatus.OK
    assert ready.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert ready.headers["Retry-After"]
    assert body(ready) == {
        "status": "unhealthy",
        "database": "unavailable",
        "migrations": "unknown",
    }


@pytest.mark.parametrize(
    ("query", "accept", "status", "marker"),
    [
        ("?format=json", "*/*", HTTPStatus.SERVICE_UNAVAILABLE, '"unhealthy"'),
        ("", "text/html", HTTPStatus.SERVICE_UNAVAILABLE, 'data-state="unhealthy"'),
        ("?format=text", "*/*", HTTPStatus.SERVICE_UNAVAILABLE, "status: unhealthy"),
        # Prometheus drops every gauge of a non-200 scrape: the state is inside.
        (
            "?format=openmetrics",
            "*/*",
            HTTPStatus.OK,
            'lockngen_health_state{lockngen_health_state="unhealthy"} 1',
        ),
    ],
    ids=["json", "html", "text", "openmetrics"],
)
def test_unreachable_database_makes_the_report_unhealthy(
    unreachable, query, accept, status, marker
):
    response = unreachable.get(f"/health/{query}", Accept=accept)
    assert response.status == status
    assert marker in response.body


def test_pending_migrations_on_a_fresh_database_are_unhealthy(tmp_path):
    with scratch_database() as name:
        env = process_env(DATABASE_URL=url_for(name), REDIS_URL=REDIS_URL)
        with serving(env, log_path=tmp_path / "server.log") as server:
            live = server.get("/health/live")
            ready = server.get("/health/ready")
            report = server.get("/health/?format=json")
    assert live.status == HTTPStatus.OK
    assert ready.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert body(ready) == {
        "status": "unhealthy",
        "database": "ok",
        "migrations": "pending",
    }
    checks = body(report)["checks"]
    assert report.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert body(report)["status"] == "unhealthy"
    assert checks["Database(alias='default')"] == "OK"
    assert "migration(s) pending" in checks["Migrations(alias='default')"]
    assert checks["QueueGauges(alias='default')"].startswith("Unavailable")


def test_ready_remembers_once_no_migration_was_pending(tmp_path):
    with scratch_database() as name:
        env = process_env(DATABASE_URL=url_for(name), REDIS_URL=REDIS_URL)
        with serving(env, log_path=tmp_path / "server.log") as server:
            before = server.get("/health/ready")
            migrated = manage("migrate", "--noinput", env=env)
            after = server.get("/health/ready")
            with psycopg.connect(url_for(name), autocommit=True) as conn:
                # The newest one: history stays consistent (nothing applied
                # after a migration that is not).
                forgotten = conn.execute(
                    "DELETE FROM django_migrations WHERE id = (SELECT max(id)"
                    " FROM django_migrations WHERE app = 'apikeys') RETURNING name"
                ).fetchone()[0]
            remembered = server.get("/health/ready")
            report = server.get("/health/?format=json")
    assert before.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert migrated.returncode == 0, migrated.stderr
    assert after.status == HTTPStatus.OK
    # Migrations are only ever applied: once seen, ready stops reading the graph.
    assert remembered.status == HTTPStatus.OK
    # The full report looks every time.
    assert report.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert f"apikeys.{forgotten}" in report.body


# --- production: probes with any Host over plain HTTP ----------------------------


@pytest.mark.parametrize(
    "path", ["/health/live", "/health/live/", "/health/ready", "/health/ready/"]
)
def test_probes_answer_any_host_over_plain_http_in_production(production, path):
    response = production.get(path, Host=FOREIGN_HOST)
    assert response.status == HTTPStatus.OK
    assert body(response)["status"] == "healthy"


def test_production_report_keeps_host_validation_and_https(production):
    foreign = production.get("/health/", Host=FOREIGN_HOST)
    plain = production.get("/health/", Host=PROD_HOST)
    behind_proxy = production.get(
        "/health/?format=json", Host=PROD_HOST, X_Forwarded_Proto="https"
    )
    assert foreign.status == HTTPStatus.BAD_REQUEST
    assert plain.status == HTTPStatus.MOVED_PERMANENTLY
    assert plain.headers["Location"] == f"https://{PROD_HOST}/health/"
    assert behind_proxy.status == HTTPStatus.OK
    assert body(behind_proxy)["status"] == "healthy"
    assert "max-age" in behind_proxy.headers["Strict-Transport-Security"]


@pytest.mark.parametrize(
    "asset",
    [
        "/static/admin/css/base.css",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
    ],
    ids=["admin", "swagger"],
)
def test_whitenoise_serves_collected_static_files_in_production(production, asset):
    response = production.get(asset, Host=PROD_HOST, X_Forwarded_Proto="https")
    assert response.status == HTTPStatus.OK
    assert response.body


# --- no secrets ---------------------------------------------------------------------

SECRET_PROBES = [
    ("/health/live", {}),
    ("/health/ready", {}),
    ("/health/?format=json", {}),
    ("/health/?format=text", {}),
    ("/health/?format=openmetrics", {}),
    ("/health/?format=atom", {}),
    ("/health/", {"Accept": "text/html"}),
]


@pytest.mark.parametrize("scenario", ["healthy", "unreachable", "production"])
def test_no_password_connection_string_or_traceback_in_health_output(request, scenario):
    server = request.getfixturevalue(scenario)
    headers = (
        {"Host": PROD_HOST, "X-Forwarded-Proto": "https"}
        if scenario == "production"
        else {}
    )
    for path, extra in SECRET_PROBES:
        response = server.request("GET", path, headers=headers | extra)
        assert response.status in {HTTPStatus.OK, HTTPStatus.SERVICE_UNAVAILABLE}
        text = response.body + str(response.headers)
        for secret in (PASSWORD, "postgres://", "Traceback", 'File "'):
            assert secret not in text, (scenario, path, secret)
    assert PASSWORD not in server.log()


# --- the container's probe script ----------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "path", "code"),
    [
        ("production", "/health/live", 0),
        ("production", "/health/ready", 0),
        ("unreachable", "/health/live", 0),
        ("unreachable", "/health/ready", 1),
    ],
)
def test_docker_healthcheck_script_exits_0_only_on_200(request, scenario, path, code):
    server = request.getfixturevalue(scenario)
    done = subprocess.run(
        [str(VENV_BIN / "python"), str(BASE_DIR / "docker" / "healthcheck.py"), path],
        env=process_env(PORT=str(server.port)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == code, done.stderr

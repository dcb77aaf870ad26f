"""Configuration: the environment → settings, including production refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lockngen.database import database_config, redact_url
from lockngen.env import ConfigError

BASE_DIR = Path(__file__).resolve().parent.parent
URL = "postgres://lockn:s3cr3t-pw@db.example:6543/lockngen"


def config(**env: str) -> dict:
    return database_config(env, production=False, base_dir=BASE_DIR)


@pytest.mark.sqlite_smoke
def test_database_url_becomes_our_postgres_backend():
    db = config(DATABASE_URL=URL)
    assert db["ENGINE"] == "lockngen.db"
    assert (db["NAME"], db["HOST"], db["PORT"]) == ("lockngen", "db.example", 6543)
    assert (db["USER"], db["PASSWORD"]) == ("lockn", "s3cr3t-pw")
    assert db["CONN_MAX_AGE"] == 300
    assert db["CONN_HEALTH_CHECKS"] is True
    assert db["CONNECT_RETRIES"] == 3
    assert db["OPTIONS"] == {
        "connect_timeout": 5,
        "sslmode": "prefer",
        "application_name": "lockngen",
        "options": "-c statement_timeout=30000",
        "prepare_threshold": 0,  # psycopg's, which Django turns off by default
    }
    assert db["FALLBACK"] is False


@pytest.mark.sqlite_smoke
def test_every_database_knob_is_read_from_the_environment():
    db = config(
        DATABASE_URL=URL,
        DB_CONN_MAX_AGE="60",
        DB_CONNECT_TIMEOUT="2",
        DB_STATEMENT_TIMEOUT_MS="1500",
        DB_CONNECT_RETRIES="5",
        DB_SSLMODE="require",
    )
    assert db["CONN_MAX_AGE"] == 60
    assert db["CONNECT_RETRIES"] == 5
    assert db["OPTIONS"]["connect_timeout"] == 2
    assert db["OPTIONS"]["sslmode"] == "require"
    assert db["OPTIONS"]["options"] == "-c statement_timeout=1500"


@pytest.mark.sqlite_smoke
def test_pool_mode_uses_django_native_pool_without_persistent_connections():
    db = config(DATABASE_URL=URL, DB_POOL="1", GUNICORN_THREADS="8")
    assert db["OPTIONS"]["pool"] == {
        "min_size": 1,
        "max_size": 8,
        "max_lifetime": 300,
        "timeout": 10,
    }
    assert db["CONN_MAX_AGE"] == 0
    # Without health checks Django's pool hands out connections a restart broke.
    assert db["CONN_HEALTH_CHECKS"] is True
    assert db["CONNECT_RETRIES"] == 0
    assert db["OPTIONS"]["prepare_threshold"] == 0  # pooled connections persist


@pytest.mark.sqlite_smoke
def test_connections_closed_after_each_request_prepare_nothing():
    # Preparing is a round trip of its own, repaid only from a second run on
    # the same connection.
    db = config(DATABASE_URL=URL, DB_CONN_MAX_AGE="0")
    assert "prepare_threshold" not in db["OPTIONS"]


@pytest.mark.sqlite_smoke
def test_pool_bounds_come_from_the_environment():
    db = config(
        DATABASE_URL=URL,
        DB_POOL="true",
        DB_POOL_MIN_SIZE="2",
        DB_POOL_MAX_SIZE="6",
        DB_POOL_MAX_LIFETIME="120",
        DB_POOL_TIMEOUT="3",
    )
    assert db["OPTIONS"]["pool"] == {
        "min_size": 2,
        "max_size": 6,
        "max_lifetime": 120,
        "timeout": 3,
    }


@pytest.mark.sqlite_smoke
def test_pgbouncer_mode_sends_no_startup_options_and_no_server_side_cursors():
    db = config(DATABASE_URL=URL, DB_PGBOUNCER="1")
    assert "options" not in db["OPTIONS"]
    assert db["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert db["OPTIONS"]["application_name"] == "lockngen"
    # Django then turns psycopg's prepared statements off: a statement
    # prepared on one server connection is unknown on the next.
    assert "prepare_threshold" not in db["OPTIONS"]


@pytest.mark.sqlite_smoke
def test_without_database_url_development_falls_back_to_sqlite(tmp_path):
    db = database_config({}, production=False, base_dir=tmp_path)
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert db["NAME"] == str(tmp_path / "var" / "lockngen.sqlite3")
    assert db["FALLBACK"] is True
    assert not (tmp_path / "var").exists()  # a pure function: start-up makes it


@pytest.mark.sqlite_smoke
def test_without_database_url_production_refuses():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        database_config({}, production=True, base_dir=BASE_DIR)


@pytest.mark.sqlite_smoke
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        pytest.param("DB_CONN_MAX_AGE", "soon", id="not-an-integer"),
        pytest.param("DB_CONNECT_TIMEOUT", "0", id="below-minimum"),
        pytest.param("DB_POOL", "maybe", id="not-a-boolean"),
        pytest.param("GUNICORN_TIMEOUT", "20", id="worst-case-above-gunicorn-timeout"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(variable, value):
    with pytest.raises(ConfigError, match=variable):
        config(DATABASE_URL=URL, **{variable: value})


@pytest.mark.sqlite_smoke
def test_a_pool_whose_minimum_exceeds_its_maximum_is_refused():
    with pytest.raises(ConfigError, match="DB_POOL_MIN_SIZE"):
        config(
            DATABASE_URL=URL, DB_POOL="1", DB_POOL_MIN_SIZE="9", DB_POOL_MAX_SIZE="4"
        )


@pytest.mark.sqlite_smoke
def test_configuration_errors_never_echo_the_password():
    with pytest.raises(ConfigError) as excinfo:
        config(DATABASE_URL="postgres://lockn:s3cr3t-pw@db:notaport/lockngen")
    assert "s3cr3t-pw" not in str(excinfo.value)
    assert redact_url(URL) == "postgres://lockn@db.example:6543/lockngen"


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {"DATABASE_URL", "SECRET_KEY", "ALLOWED_HOSTS", "DEBUG", "LOCKNGEN_ENV"}
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


PRODUCTION = {
    "LOCKNGEN_ENV": "production",
    "DATABASE_URL": URL,
    "SECRET_KEY": "x" * 60,
    "ALLOWED_HOSTS": "api.example.com",
}


@pytest.mark.sqlite_smoke
@pytest.mark.parametrize("missing", ["DATABASE_URL", "SECRET_KEY", "ALLOWED_HOSTS"])
def test_production_refuses_to_start_without_required_settings(missing):
    env = {key: value for key, value in PRODUCTION.items() if key != missing}
    result = run_manage("check", **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert missing in lines[0]
    assert "Traceback" not in result.stderr
    assert "s3cr3t-pw" not in result.stderr


@pytest.mark.sqlite_smoke
def test_production_never_runs_with_debug_and_sits_behind_a_tls_proxy():
    code = (
        "from django.conf import settings as s;"
        "print(s.DEBUG, s.SECURE_PROXY_SSL_HEADER, s.SECURE_SSL_REDIRECT,"
        " s.SECURE_HSTS_SECONDS > 0)"
    )
    result = run_manage("shell", "-v", "0", "-c", code, DEBUG="1", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "False",
        "('HTTP_X_FORWARDED_PROTO',",
        "'https')",
        "True",
        "True",
    ]


@pytest.mark.sqlite_smoke
def test_unknown_environment_name_is_refused():
    result = run_manage("check", LOCKNGEN_ENV="staging")
    assert result.returncode != 0
    assert "LOCKNGEN_ENV" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.sqlite_smoke
def test_debug_error_reports_hide_connection_urls(rf):
    from django.views.debug import get_exception_reporter_filter

    request = rf.get("/")
    request.META["DATABASE_URL"] = URL
    request.META["REDIS_URL"] = "redis://:hunter2@cache:6379/0"
    meta = get_exception_reporter_filter(request).get_safe_request_meta(request)
    assert "s3cr3t-pw" not in str(meta)
    assert "hunter2" not in str(meta)
    assert meta["DATABASE_URL"] == "********************"


@pytest.mark.sqlite_smoke
def test_a_malformed_dev_key_stops_start_up_with_one_line_that_hides_it():
    result = run_manage("check", LOCKNGEN_DEV_API_KEY="lk_short_s3cr3t-value")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "LOCKNGEN_DEV_API_KEY" in lines[0]
    assert "s3cr3t-value" not in result.stderr


@pytest.mark.sqlite_smoke
def test_test_only_apps_are_never_installed_in_production():
    code = (
        "from django.conf import settings as s;"
        "print('tests.migration_app' in s.INSTALLED_APPS)"
    )
    extra = {"LOCKNGEN_EXTRA_APPS": "tests.migration_app"}
    production = run_manage("shell", "-v", "0", "-c", code, **PRODUCTION, **extra)
    development = run_manage("shell", "-v", "0", "-c", code, **extra)
    assert (production.stdout.strip(), development.stdout.strip()) == ("False", "True")


def test_importing_settings_needs_no_app_and_writes_nothing(tmp_path):
    # The core package alone, as its own BASE_DIR: an import of an app
    # module fails, a directory made by the import shows.
    shutil.copytree(
        BASE_DIR / "lockngen",
        tmp_path / "lockngen",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-c", "import lockngen.settings"],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lockngen"]

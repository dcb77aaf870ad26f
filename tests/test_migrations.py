"""Migrations on fresh databases, and the DBA script of ``migration_script``.

Every test works on databases of its own (``schema_mig_<random>``, dropped at
the end of the module) and runs ``manage.py`` in subprocesses, as operators do.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from apikeys.keys import DEFAULT_DEV_API_KEY, hash_key
from tests.serving import scratch_database, url_for

BASE_DIR = Path(__file__).resolve().parent.parent
TEST_APP = {"LOCKNGEN_EXTRA_APPS": "tests.migration_app"}
PRODUCTION = {
    "LOCKNGEN_ENV": "production",
    "SECRET_KEY": "production-secret-for-migration-tests-" + "x" * 20,
    "ALLOWED_HOSTS": "localhost",
}
NOTHING_TO_APPLY = "No migrations to apply."
SKIPPED = "is already applied; skipped"


class PgServer:
    """Scratch databases on the suite's PostgreSQL server, dropped together."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def create(self, *, template: str | None = None) -> str:
        name = self.stack.enter_context(
            scratch_database("schema_mig", template=template)
        )
        return url_for(name)


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "lockngen.db":
        pytest.fail("migration tests need DATABASE_URL to point at PostgreSQL")
    with contextlib.ExitStack() as stack:
        yield PgServer(stack)


def manage(
    url: str, *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in {"LOCKNGEN_EXTRA_APPS", "LOCKNGEN_ENV", "LOCKNGEN_DEV_API_KEY"}
    }
    environ |= {"DATABASE_URL": url, **(env or {})}
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def psql(url: str, script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(script)],
        capture_output=True,
        text=True,
        timeout=180,
    )


def schema_dump(url: str) -> str:
    result = subprocess.run(
        ["pg_dump", "--schema-only", "--no-owner", "--no-privileges", "-d", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=180,
    )
    # \restrict / \unrestrict carry a random key per dump (pg_dump >= 15.14).
    return "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def query(url: str, statement: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(statement).fetchall()


def tables(url: str) -> set[str]:
    rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {name for (name,) in rows}


@pytest.fixture(scope="module")
def latest(server: PgServer) -> str:
    """A database built by ``migrate`` (the reference schema)."""
    url = server.create()
    manage(url, "migrate")
    return url


@pytest.fixture(scope="module")
def latest_with_test_app(server: PgServer) -> str:
    url = server.create()
    manage(url, "migrate", env=TEST_APP)
    return url


# --- manage.py migrate --------------------------------------------------------


def test_migrate_zero_latest_zero_in_development_seeds_one_dev_key(server):
    url = server.create()

    first = manage(url, "migrate")
    assert "Applying apikeys.0002_seed_dev_key... OK" in first.stdout
    assert query(url, "SELECT key_hash, is_admin, rate_limit FROM api_keys") == [
        (hash_key(DEFAULT_DEV_API_KEY), True, 0)
    ]
    assert NOTHING_TO_APPLY in manage(url, "migrate").stdout
    manage(url, "seed_dev_key")
    manage(url, "seed_dev_key")
    assert query(url, "SELECT count(*) FROM api_keys") == [(1,)]
    history = manage(url, "showmigrations", "apikeys", "generations").stdout
    assert "[X] 0002_seed_dev_key" in history
    assert "[X] 0001_initial" in history

    manage(url, "migrate", "apikeys", "zero")
    assert {"api_keys", "generations"}.isdisjoint(tables(url))
    assert query(
        url,
        "SELECT count(*) FROM django_migrations "
        "WHERE app IN ('apikeys', 'generations')",
    ) == [(0,)]

    manage(url, "migrate")
    assert query(url, "SELECT count(*) FROM api_keys") == [(1,)]


def test_migrate_zero_latest_zero_in_production_seeds_nothing(server):
    url = server.create()

    first = manage(url, "migrate", env=PRODUCTION)
    assert "Applying apikeys.0002_seed_dev_key... OK" in first.stdout
    assert query(url, "SELECT count(*) FROM api_keys") == [(0,)]
    assert NOTHING_TO_APPLY in manage(url, "migrate", env=PRODUCTION).stdout
    refused = manage(url, "seed_dev_key", env=PRODUCTION, ok=False)
    assert refused.returncode == 1
    assert "production" in refused.stderr
    assert query(url, "SELECT count(*) FROM api_keys") == [(0,)]

    manage(url, "migrate", "apikeys", "zero", env=PRODUCTION)
    assert {"api_keys", "generations"}.isdisjoint(tables(url))


def test_reversing_the_seed_keeps_a_dev_key_that_owns_generations(server, latest):
    url = server.create(template=latest.rsplit("/", 1)[1])
    query_id = "SELECT id FROM api_keys"
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO generations (id, prompt, api_key_id) "
            "SELECT gen_random_uuid(), 'a fox', id FROM api_keys"
        )
    before = query(url, query_id)

    manage(url, "migrate", "apikeys", "0001")
    manage(url, "migrate")

    assert query(url, query_id) == before


# --- manage.py migration_script ------------------------------------------------


def test_migration_script_is_empty_for_an_up_to_date_database(server, latest):
    url = server.create(template=latest.rsplit("/", 1)[1])

    script = manage(url, "migration_script").stdout

    assert "Nothing to apply" in script
    assert "BEGIN;" not in script


@pytest.mark.parametrize(
    ("start", "env", "pending"),
    [
        pytest.param("empty", {}, None, id="empty-database"),
        pytest.param("empty", TEST_APP, None, id="empty-database-with-test-app"),
        pytest.param(
            "test-app-at-0001",
            TEST_APP,
            ["migration_app.0002_rework", "migration_app.0003_index_on_a_big_table"],
            id="test-app-at-0001-drops-renames-and-indexes",
        ),
    ],
)
def test_migration_script_applied_twice_equals_migrate(
    server, latest, latest_with_test_app, tmp_path, start, env, pending
):
    reference = latest_with_test_app if env else latest
    if start == "empty":
        url = server.create()
    else:
        url = server.create(template=reference.rsplit("/", 1)[1])
        manage(url, "migrate", "migration_app", "0001", env=env)
    schema_before = schema_dump(url)

    script = manage(url, "migration_script", env=env).stdout
    (path := tmp_path / "script.sql").write_text(script)

    assert schema_dump(url) == schema_before  # rehearsed elsewhere
    # Each migration's header, "-- app.0001_name" (procrastinate's SQL carries
    # comment lines of its own, URLs among them).
    scripted = [
        line.removeprefix("-- ")
        for line in script.splitlines()
        if re.fullmatch(r"-- \w+\.\d{4}_\w+", line)
    ]
    if pending is not None:
        assert scripted == pending
    assert script.count("BEGIN;") == len(scripted) + 1  # + django_migrations
    assert script.count("INSERT INTO django_migrations") >= len(scripted)

    first = psql(url, path)
    assert first.returncode == 0, first.stderr
    assert SKIPPED not in first.stderr
    second = psql(url, path)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count(SKIPPED) == len(scripted)

    assert NOTHING_TO_APPLY in manage(url, "migrate", env=env).stdout
    assert schema_dump(url) == schema_dump(reference)


def test_migration_script_records_data_migrations_without_running_them(server):
    url = server.create()

    script = manage(url, "migration_script").stdout

    seed = script[script.index("-- apikeys.0002_seed_dev_key") :]
    seed = seed[: seed.index("COMMIT;")]
    assert "cannot be written" in seed
    assert "THIS OPERATION CANNOT BE WRITTEN AS SQL" in seed
    assert "EXECUTE" not in seed
    assert "'apikeys', '0002_seed_dev_key'" in seed


# --- migration_script never touches the target ---------------------------------

SCRATCH_LINE = re.compile(r"scratch database (lockngen_migration_script_[0-9a-f]+)")
WAITING_ON_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'lockngen migration_script' AND wait_event_type = 'Lock'"
)


def scratch_names(stderr: str) -> set[str]:
    """The scratch databases a ``migration_script -v 2`` run says it used."""
    return set(SCRATCH_LINE.findall(stderr))


def still_there(url: str, names: set[str]) -> set[str]:
    rows = query(url, "SELECT datname FROM pg_database")
    return names & {name for (name,) in rows}


@pytest.fixture
def widgets_at_0001(server, latest_with_test_app) -> str:
    """A database whose test app is at 0001 (0002 and 0003 pending)."""
    url = server.create(template=latest_with_test_app.rsplit("/", 1)[1])
    manage(url, "migrate", "migration_app", "0001", env=TEST_APP)
    return url


def test_migration_script_never_blocks_writes_to_a_big_table(widgets_at_0001):
    url = widgets_at_0001
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO migration_app_shelf (code) VALUES ('a')")
        conn.execute(
            "INSERT INTO migration_app_widget (sku, label, size, shelf_id) "
            "SELECT 'w' || n, 'widget', n, (SELECT id FROM migration_app_shelf) "
            "FROM generate_series(1, 200000) AS n"
        )
    schema_before = schema_dump(url)
    writer = psycopg.connect(url)
    try:
        # An INSERT whose transaction stays open for the whole run: its lock
        # conflicts with every ALTER TABLE and CREATE INDEX of 0002 and 0003,
        # so a rehearsal on the target would wait and time out.
        writer.execute(
            "INSERT INTO migration_app_widget (sku, label, size, shelf_id) "
            "SELECT 'late', 'late', 1, id FROM migration_app_shelf"
        )

        result = manage(
            url, "migration_script", "-v", "2", "--lock-timeout", "2000", env=TEST_APP
        )

        writer.commit()
    finally:
        writer.close()
    assert 'CREATE INDEX "widget_sku_size_idx"' in result.stdout
    assert query(url, "SELECT count(*) FROM migration_app_widget") == [(200001,)]
    assert schema_dump(url) == schema_before
    used = scratch_names(result.stderr)
    assert len(used) == 1, result.stderr
    assert not still_there(url, used)


def test_migration_script_drops_its_scratch_database_when_a_migration_fails(
    widgets_at_0001,
):
    url = widgets_at_0001
    with psycopg.connect(url) as conn:  # 0002 alters "label", now gone
        conn.execute("ALTER TABLE migration_app_widget RENAME label TO caption")

    result = manage(url, "migration_script", "-v", "2", env=TEST_APP, ok=False)

    assert result.returncode == 1
    assert "migration_app.0002_rework fails on this database" in result.stderr
    assert "Traceback" not in result.stderr
    used = scratch_names(result.stderr)
    assert len(used) == 1, result.stderr
    assert not still_there(url, used)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_interrupted_migration_script_drops_its_scratch_database(
    widgets_at_0001, signum
):
    url = widgets_at_0001
    environ = {
        key: value for key, value in os.environ.items() if key != "LOCKNGEN_ENV"
    } | {"DATABASE_URL": url, **TEST_APP}
    locker = psycopg.connect(url)
    try:
        # pg_dump waits behind this lock, with the scratch database made.
        locker.execute("LOCK TABLE migration_app_widget IN ACCESS EXCLUSIVE MODE")
        process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "migration_script",
                "-v",
                "2",
                "--lock-timeout",
                "60000",
            ],
            cwd=BASE_DIR,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while query(url, WAITING_ON_A_LOCK) != [(1,)]:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "pg_dump never waited"
                time.sleep(0.1)
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
            process.wait()
    finally:
        locker.close()

    assert process.returncode == 1, stderr
    assert "interrupted; the scratch database was dropped" in stderr
    used = scratch_names(stderr)
    assert len(used) == 1, stderr
    assert not still_there(url, used)

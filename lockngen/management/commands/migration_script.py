"""Print the SQL of the migrations not yet applied, as one script for a DBA.

Each pending migration becomes its own transaction whose body is a ``DO``
block: it locks ``django_migrations``, skips itself if it is recorded there,
otherwise runs its statements and records itself. The script is plain SQL
(``psql -v ON_ERROR_STOP=1 -f script.sql``) and safe to run twice.

Why a rehearsal, and why not on the target: Django's schema editor asks the
live database for the names of the constraints and indexes it alters or
drops. A migration that drops what an earlier *pending* migration creates
would find nothing in the live schema, so each migration's SQL is collected
while the previous ones are really executed. Executing them on the target,
even in a transaction rolled back at the end, would build its indexes and
rewrite its tables under locks just to print SQL. So the target is only
read: its schema (no data) is copied with ``pg_dump --schema-only`` into a
scratch database, the migrations are rehearsed there, and the scratch
database is dropped whatever happens (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.migration import Migration
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ProjectState

RECORDER_TABLE = MigrationRecorder.Migration._meta.db_table
CANNOT_BE_SQL = "-- THIS OPERATION CANNOT BE WRITTEN AS SQL"
SCRATCH_PREFIX = "lockngen_migration_script_"
CLIENT_TIMEOUT = 600  # s; pg_dump / psql of a schema, never of data


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def dollar_quote(text: str, tag: str) -> str:
    """``text`` as a dollar-quoted literal whose tag does not occur in it."""
    candidate, n = f"${tag}$", 0
    while candidate in text:
        n += 1
        candidate = f"${tag}{n}$"
    return f"{candidate}{text}{candidate}"


def is_recorded(app: str, name: str) -> str:
    """SQL condition: ``django_migrations`` records ``app.name``."""
    # Printed, never executed here; literal() escapes the values.
    return (
        f"EXISTS (SELECT 1 FROM {RECORDER_TABLE} "  # noqa: S608
        f"WHERE app = {literal(app)} AND name = {literal(name)})"
    )


def libpq_env(settings_dict: dict[str, Any], name: str) -> dict[str, str]:
    """Environment for pg_dump / psql reaching database ``name``.

    Credentials go through the environment, never the command line (which
    ``ps`` shows to every user of the machine).
    """
    options = settings_dict.get("OPTIONS") or {}
    values = {
        "PGHOST": settings_dict.get("HOST"),
        "PGPORT": settings_dict.get("PORT"),
        "PGUSER": settings_dict.get("USER"),
        "PGPASSWORD": settings_dict.get("PASSWORD"),
        "PGDATABASE": name,
        "PGSSLMODE": options.get("sslmode"),
        "PGCONNECT_TIMEOUT": options.get("connect_timeout"),
        "PGAPPNAME": "lockngen migration_script",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({key: str(value) for key, value in values.items() if value})
    return env


def run_client(args: list[str], env: dict[str, str], stdin: str | None = None) -> str:
    """Run a PostgreSQL client tool; its first error line becomes a CommandError."""
    try:
        result = subprocess.run(  # noqa: S603 - fixed argument lists, no shell
            args,
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
    except FileNotFoundError:
        raise CommandError(
            f"{args[0]} not found: migration_script needs the PostgreSQL client "
            "tools (pg_dump, psql) of the server's major version or newer"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise CommandError(f"{args[0]} failed: {lines[0] if lines else 'no output'}")
    return result.stdout


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so ``finally`` blocks still run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def scratch_copy(
    connection: BaseDatabaseWrapper,
    *,
    lock_timeout_ms: int,
    log: Callable[[str], None] = lambda message: None,
) -> Iterator[BaseDatabaseWrapper]:
    """A connection to a new database holding the target's schema and no data.

    The database is created on the target's server, filled from
    ``pg_dump --schema-only`` of the target, and dropped on the way out,
    whatever happened. ``pg_dump`` takes only ACCESS SHARE locks on the
    target (concurrent reads and writes go on) and gives up after
    ``lock_timeout_ms`` behind a DBA's exclusive lock.
    """
    name = SCRATCH_PREFIX + secrets.token_hex(6)
    quoted = connection.ops.quote_name(name)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {quoted} TEMPLATE template0")
    except DatabaseError as exc:
        raise CommandError(
            "migration_script rehearses on a scratch copy of the schema and "
            f"needs the CREATEDB privilege: {str(exc).strip().splitlines()[0]}"
        ) from None
    log(f"rehearsing on the scratch database {name}")
    scratch = None
    try:
        settings_dict = connection.settings_dict
        schema = run_client(
            [
                "pg_dump",
                "--schema-only",
                "--no-owner",
                "--no-privileges",
                f"--lock-wait-timeout={lock_timeout_ms}",
            ],
            libpq_env(settings_dict, settings_dict["NAME"]),
        )
        run_client(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"],
            libpq_env(settings_dict, name),
            stdin=schema,
        )
        options = {
            key: value
            for key, value in (settings_dict.get("OPTIONS") or {}).items()
            if key != "pool"  # one short-lived connection; no pool of its own
        }
        scratch = type(connection)(
            {**settings_dict, "NAME": name, "OPTIONS": options}, connection.alias
        )
        # Under the target's alias, so routers and the schema editor treat the
        # copy exactly as they would treat the target.
        connections[connection.alias] = scratch
        yield scratch
    finally:
        if scratch is not None:
            connections[connection.alias] = connection
            scratch.close()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
            log(f"dropped the scratch database {name}")
        except DatabaseError as exc:  # never mask what is propagating
            sys.stderr.write(
                f"could not drop the scratch database {name}; drop it by hand: "
                f"{str(exc).strip().splitlines()[0]}\n"
            )


class Command(BaseCommand):
    help = (
        "Print one SQL script applying the migrations not yet applied to the "
        "target database: one guarded transaction per migration, safe to run "
        "twice (psql -v ON_ERROR_STOP=1 -f script.sql)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--database",
            default=DEFAULT_DB_ALIAS,
            help="the database whose pending migrations are scripted",
        )
        parser.add_argument(
            "--lock-timeout",
            type=int,
            default=5000,
            metavar="MS",
            help="give up when reading the target's schema waits for a lock (ms)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        connection = connections[options["database"]]
        if connection.vendor != "postgresql":
            raise CommandError("migration_script supports PostgreSQL only")
        executor = MigrationExecutor(connection)
        executor.loader.check_consistent_history(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        database = connection.settings_dict["NAME"]

        lines = [
            f"-- Migrations not yet applied to database {database!r}.",
            "-- Generated against its live schema: regenerate it after any",
            "-- change to that database. Apply with:",
            "--   psql -v ON_ERROR_STOP=1 -f <this file>",
            "-- Each migration is one transaction that skips itself if",
            f"-- {RECORDER_TABLE} already records it, so the script is safe to",
            "-- run twice.",
        ]
        if not plan:
            lines.append("-- Nothing to apply: the database is up to date.")
            self.stdout.write("\n".join(lines))
            return
        for migration, backwards in plan:
            if backwards:  # pragma: no cover - forward plans only
                raise CommandError(f"cannot script the reversal of {migration}")
            if not migration.atomic:
                raise CommandError(
                    f"{migration.app_label}.{migration.name} is not atomic "
                    "(atomic = False) and cannot be scripted as one transaction; "
                    "apply it with manage.py migrate"
                )
        lines += ["", *self._recorder_table(connection)]
        graph = executor.loader.graph
        applied = [
            key for key in executor.loader.applied_migrations if key in graph.nodes
        ]
        state = executor.loader.project_state(applied, at_end=True)
        try:
            # No transaction on the copy: it is dropped anyway.
            with (
                terminate_as_interrupt(),
                scratch_copy(
                    connection,
                    lock_timeout_ms=options["lock_timeout"],
                    log=self._progress(options["verbosity"]),
                ) as scratch,
            ):
                for migration, _ in plan:
                    statements, state = self._rehearse(scratch, migration, state)
                    lines += ["", *self._guarded(migration, statements)]
        except KeyboardInterrupt:
            raise CommandError(
                "interrupted; the scratch database was dropped"
            ) from None
        self.stdout.write("\n".join(lines))

    def _progress(self, verbosity: int) -> Callable[[str], None]:
        """Progress lines on stderr with ``-v 2`` (stdout is the script)."""
        if verbosity < 2:
            return lambda message: None
        return self.stderr.write

    def _recorder_table(self, connection: Any) -> list[str]:
        """``django_migrations`` exactly as ``migrate`` creates it, if missing."""
        with connection.schema_editor(collect_sql=True, atomic=False) as editor:
            editor.create_model(MigrationRecorder.Migration)
        create, *rest = editor.collected_sql
        if rest or not create.startswith("CREATE TABLE "):
            raise CommandError(f"unexpected {RECORDER_TABLE} DDL: {create!r}")
        return [
            f"-- The history table {RECORDER_TABLE}, as manage.py migrate makes it.",
            "BEGIN;",
            "CREATE TABLE IF NOT EXISTS " + create.removeprefix("CREATE TABLE "),
            "COMMIT;",
        ]

    def _rehearse(
        self, connection: Any, migration: Migration, state: ProjectState
    ) -> tuple[list[str], ProjectState]:
        """Collect ``migration``'s SQL and run it on the scratch copy.

        Running each statement as it is collected keeps the copy's schema
        (which the schema editor introspects for names) as migrate would leave
        the target's.
        """

        class RehearsingEditor(connection.SchemaEditorClass):
            def execute(self, sql: Any, params: Any = ()) -> None:
                start = len(self.collected_sql)
                super().execute(sql, params)
                for statement in self.collected_sql[start:]:
                    with self.connection.cursor() as cursor:
                        cursor.execute(statement)

        label = f"{migration.app_label}.{migration.name}"
        state.apps  # noqa: B018 - render once (cached), as the executor does
        try:
            with RehearsingEditor(connection, collect_sql=True, atomic=False) as editor:
                state = migration.apply(state, editor, collect_sql=True)
        except (DatabaseError, ValueError) as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CommandError(f"{label} fails on this database: {message}") from None
        return editor.collected_sql, state

    def _guarded(self, migration: Migration, statements: list[str]) -> list[str]:
        """One transaction: lock the history, skip if recorded, run, record."""
        app, name = migration.app_label, migration.name
        label = f"{app}.{name}"
        recorded = [(app, name)]
        if migration.replaces:
            # Like migrate: a squashed migration records what it replaces too.
            recorded = [*migration.replaces, (app, name)]
        skipped_python = CANNOT_BE_SQL in statements
        body = [
            "BEGIN",
            f"  IF {is_recorded(app, name)} THEN",
            f"    RAISE NOTICE '% is already applied; skipped', {literal(label)};",
            "    RETURN;",
            "  END IF;",
        ]
        for statement in statements:
            if statement.startswith("--"):
                body.append("  " + statement)
            else:
                body.append(f"  EXECUTE {dollar_quote(statement.rstrip(';'), 'sql')};")
        for rec_app, rec_name in recorded:
            body.append(
                f"  INSERT INTO {RECORDER_TABLE} (app, name, applied)"
                f" SELECT {literal(rec_app)}, {literal(rec_name)}, now()"
                f" WHERE NOT {is_recorded(rec_app, rec_name)};"
            )
        body.append("END")
        header = [f"-- {label}"]
        if skipped_python:
            header += [
                "-- Contains a data migration (RunPython) that cannot be written",
                "-- as SQL: it is recorded as applied without running it.",
            ]
        return [
            *header,
            "BEGIN;",
            f"LOCK TABLE {RECORDER_TABLE} IN SHARE ROW EXCLUSIVE MODE;",
            "DO " + dollar_quote("\n" + "\n".join(body) + "\n", "migration") + ";",
            "COMMIT;",
        ]

"""Print the SQL of the migrations not yet applied, as one script for a DBA.

Each pending migration becomes its own transaction whose body is a ``DO``
block: it locks ``django_migrations``, skips itself if it is recorded there,
otherwise runs its statements and records itself. The script is plain SQL
(``psql -v ON_ERROR_STOP=1 -f script.sql``) and safe to run twice.

Why a rehearsal: Django's schema editor asks the live database for the names
of the constraints and indexes it alters or drops. A migration that drops
what an earlier *pending* migration creates would find nothing in the live
schema, so each migration's SQL is collected while the previous ones are
really executed inside one transaction on the target database, which is
rolled back at the end. Nothing is committed; the DDL holds its locks only
for the duration of the rehearsal (bounded by ``--lock-timeout``).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.migration import Migration
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ProjectState

RECORDER_TABLE = MigrationRecorder.Migration._meta.db_table
CANNOT_BE_SQL = "-- THIS OPERATION CANNOT BE WRITTEN AS SQL"


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
            help="give up the rehearsal when a table lock waits longer (ms)",
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
        state = executor._create_project_state(with_applied_migrations=True)
        with transaction.atomic(using=connection.alias):
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{options['lock_timeout']}ms"],
                )
            for migration, _ in plan:
                statements, state = self._rehearse(connection, migration, state)
                lines += ["", *self._guarded(migration, statements)]
            transaction.set_rollback(True, using=connection.alias)
        self.stdout.write("\n".join(lines))

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
        """Collect ``migration``'s SQL and run it inside the open transaction.

        Running each statement as it is collected keeps the live schema (which
        the schema editor introspects for names) as migrate would leave it.
        """

        class RehearsingEditor(connection.SchemaEditorClass):  # type: ignore[name-defined]
            def execute(self, sql: Any, params: Any = ()) -> None:
                start = len(self.collected_sql)
                super().execute(sql, params)
                for statement in self.collected_sql[start:]:
                    with self.connection.cursor() as cursor:
                        cursor.execute(statement)

        label = f"{migration.app_label}.{migration.name}"
        if "apps" not in state.__dict__:
            state.apps  # noqa: B018 - render once, as the executor does
        try:
            with RehearsingEditor(connection, collect_sql=True, atomic=True) as editor:
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

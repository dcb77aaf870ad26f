"""``manage.py wait_for_db``: block until the database answers (entrypoints, CI)."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)


def database_address(alias: str = "default") -> str:
    """``host:port`` (or the SQLite file) of a database, never its password."""
    settings_dict = connections[alias].settings_dict
    if settings_dict["ENGINE"].endswith("sqlite3"):
        return str(settings_dict["NAME"])
    host = settings_dict.get("HOST") or "localhost"
    port = settings_dict.get("PORT") or 5432
    return f"{host}:{port}"


def ping(alias: str = "default") -> None:
    """Open a fresh connection, run ``SELECT 1`` and close it again."""
    with connections[alias].temporary_connection() as cursor:
        cursor.execute("SELECT 1")


class Command(BaseCommand):
    help = "Wait until the database accepts connections; exit 1 after --timeout."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="seconds to keep trying (default 60)",
        )
        parser.add_argument("--database", default="default")

    def handle(self, *args: Any, timeout: float, database: str, **options: Any) -> None:
        started = time.monotonic()
        # This loop is the retry policy here; the backend's own retries would
        # only add noise to the log.
        connections[database].settings_dict["CONNECT_RETRIES"] = 0
        retrying = Retrying(
            retry=retry_if_exception_type(DatabaseError),
            stop=stop_after_delay(max(timeout, 0)),
            wait=wait_exponential(multiplier=0.2, max=2.0),
        )
        try:
            retrying(ping, database)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            reason = str(last).strip().splitlines()[0] if last else "no answer"
            raise CommandError(
                f"database at {database_address(database)} did not answer within "
                f"{timeout:g}s: {reason}",
                returncode=1,
            ) from None
        self.stdout.write(
            f"database at {database_address(database)} is up "
            f"({time.monotonic() - started:.1f}s)"
        )

"""Django's PostgreSQL backend, plus bounded retries when opening a connection.

Retries happen only where a *new* connection is opened, never around queries:
a statement inside a transaction is never silently re-run. With the pool on,
psycopg_pool has its own reconnect loop and its ``getconn`` timeout is already
a wait, so the pool path is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from django.db.backends.postgresql import base
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from lockngen.database import connect_retry_delay

logger = logging.getLogger(__name__)

# libpq's wording for a server that is not accepting connections *yet*.
TRANSIENT_MESSAGES = (
    "connection refused",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
)
CANNOT_CONNECT_NOW = "57P03"


def is_transient_connect_error(exc: BaseException) -> bool:
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if getattr(exc, "sqlstate", None) == CANNOT_CONNECT_NOW:
        return True
    message = str(exc).lower()
    return any(text in message for text in TRANSIENT_MESSAGES)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    # The libpq message names host and port, never the password.
    logger.warning(
        "database connection attempt %d failed (%s); retrying in %.2fs",
        state.attempt_number,
        str(exc).strip().splitlines()[0] if exc else "unknown error",
        state.next_action.sleep if state.next_action else 0.0,
    )


def _connect_wait(state: RetryCallState) -> float:
    return connect_retry_delay(state.attempt_number)


class DatabaseWrapper(base.DatabaseWrapper):
    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        timezone_name = self.timezone_name
        if timezone_name and not self.settings_dict.get("PGBOUNCER"):
            # In the startup packet the server reports it back, so Django's
            # _configure_timezone() skips its SET TIME ZONE round trip on every
            # new connection (~15% of connection setup). PgBouncer refuses
            # startup options: there Django still SETs it (or the role has it).
            zone = timezone_name.replace(" ", "\\ ")
            params["options"] = (
                f"{params.get('options', '')} -c TimeZone={zone}".lstrip()
            )
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        retries = self.settings_dict.get("CONNECT_RETRIES", 0)
        if self.pool or not retries:
            return super().get_new_connection(conn_params)
        retrying = Retrying(
            retry=retry_if_exception(is_transient_connect_error),
            stop=stop_after_attempt(1 + retries),
            wait=_connect_wait,
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(super().get_new_connection, conn_params)

"""Fixed SQL strings for the hot paths: one row read or written (built with
``Model.from_db``), and statements run as server-side prepared statements.

For the hot paths: the two lookups every API read makes (the key by its
hash, the generation by its id) and the create endpoint's INSERT. Django
compiles a queryset or an INSERT to SQL each time it runs, which costs more
than the statement itself (docs/PERFORMANCE.md, "Read path", "Write path").
A fixed string skips the compiler; ``from_db`` is the public hook the ORM
itself builds instances with. Hand-written because no library does this for
Django; PostgreSQL only (callers keep the ORM for the SQLite development
fallback).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Field, Model, signals

M = TypeVar("M", bound=Model)
# Django's own logger of executed statements (DEBUG).
query_logger = logging.getLogger("django.db.backends")


@functools.cache
def _select(model: type[Model], where: str) -> tuple[str, tuple[str, ...]]:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    fields = model._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    table = quote(model._meta.db_table)
    # ``where`` is a constant of the caller's; values only ever go as parameters.
    sql = f"SELECT {columns} FROM {table} WHERE {where} LIMIT 1"  # noqa: S608
    return sql, tuple(field.attname for field in fields)


def fetch_one(model: type[M], where: str, params: Sequence[Any]) -> M | None:
    """A row of ``model``'s table matching ``where`` (a constant), or None.

    For lookups that match at most one row (no ORDER BY); a prepared
    statement (``fetch_all_prepared``). Every concrete
    column is read, so the instance is what the ORM returns (no deferred
    fields). The values are psycopg's, which are what the ORM returns on
    PostgreSQL for these models' field types (uuid, text, integer, real,
    boolean, timestamptz): no converters run.
    """
    sql, attnames = _select(model, where)
    rows = fetch_all_prepared(sql, params)
    return model.from_db(DEFAULT_DB_ALIAS, attnames, rows[0]) if rows else None


@functools.cache
def _insert(model: type[Model]) -> tuple[str, tuple[Field, ...], tuple[str, ...]]:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    every = model._meta.concrete_fields
    # A column with only a database default (``created_at``) is left to it.
    sent = tuple(f for f in every if f.has_default() or not f.has_db_default())
    columns = ", ".join(quote(field.column) for field in sent)
    placeholders = ", ".join(["%s"] * len(sent))
    returning = ", ".join(quote(field.column) for field in every)
    table = quote(model._meta.db_table)
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"  # noqa: S608
        f" RETURNING {returning}"
    )
    return sql, sent, tuple(field.attname for field in every)


def insert_one(instance: M) -> M:
    """Insert the unsaved ``instance``; the row as stored, a new instance.

    What ``instance.save(force_insert=True)`` does for a model without
    parents: each value through its field's ``pre_save`` and
    ``get_db_prep_save``, and a failed statement marks the transaction for
    rollback. A model with save signals goes through ``save`` so no
    receiver is skipped. Raises ``IntegrityError`` as ``save`` does.
    """
    model = type(instance)
    if signals.pre_save.has_listeners(model) or signals.post_save.has_listeners(model):
        instance.save(force_insert=True)
        return instance
    sql, fields, attnames = _insert(model)
    connection = connections[DEFAULT_DB_ALIAS]
    params = [
        field.get_db_prep_save(field.pre_save(instance, True), connection)
        for field in fields
    ]
    with (
        transaction.mark_for_rollback_on_error(connection.alias),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return model.from_db(connection.alias, attnames, row)


def fetch_all_prepared(sql: str, params: dict[str, Any] | Sequence[Any]) -> list[tuple]:
    """Every row of ``sql`` (a constant), run as a prepared statement.

    Django's psycopg cursors bind parameters on the client, so the server
    parses and plans a statement on every call; for the statements every
    request or every worker runs (the key lookup, the read, the claim) that
    is a good part of their cost. psycopg's own cursor binds on the server,
    and with the connection's ``prepare_threshold`` at 0 (``lockngen.database``;
    Django turns psycopg's prepared statements off by default for the sake of
    poolers) psycopg prepares a statement on its first run on a connection
    and then only executes it, from its per-connection cache. Django's own
    cursors still bind on the client and never prepare. Behind PgBouncer
    (``DB_PGBOUNCER``) prepared statements stay off: a statement prepared on
    one server connection is unknown on the next.

    The cursor is wrapped as Django wraps its own (what ``connection.cursor()``
    does, with its public parts): the persistent connection's health check,
    Django's error wrapping and ``execute_wrapper``s. Django's query log
    cannot read a prepared execution's SQL back from psycopg, so the
    statement is logged here, composed with its parameters as Django logs
    server-bound statements: query budgets count these statements too.
    """
    connection = connections[DEFAULT_DB_ALIAS]
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    with connection.wrap_database_errors:
        raw = psycopg.Cursor(connection.connection)
    started = time.monotonic()
    try:
        with (
            transaction.mark_for_rollback_on_error(connection.alias),
            connection.make_cursor(raw) as cursor,
        ):
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        if connection.queries_logged:
            _log_query(connection, sql, params, time.monotonic() - started)


def _log_query(connection: Any, sql: str, params: Any, duration: float) -> None:
    """What Django's debug cursor records for a statement (``connection.queries``)."""
    composed = connection.ops.compose_sql(sql, params)
    connection.queries_log.append({"sql": composed, "time": f"{duration:.3f}"})
    query_logger.debug(
        "(%.3f) %s; args=%s; alias=%s",
        duration,
        composed,
        params,
        connection.alias,
        extra={"duration": duration, "sql": composed, "params": params},
    )

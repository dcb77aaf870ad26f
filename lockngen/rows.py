"""Fixed SQL strings for the hot paths: one row read or written (built with
``Model.from_db``), and statements run as server-side prepared statements.

For the hot paths: the two lookups every API read makes (the key by its
hash, the generation by its id) and the create endpoint's INSERT. Django
compiles a queryset or an INSERT to SQL each time it runs, which costs more
than the statement itself (docs/PERFORMANCE.md, "Read path", "Write path").
A fixed string skips the compiler (the INSERT: one string per set of
columns sent, built once), and as a prepared statement the server skips
parsing and planning it too; ``from_db`` is the public hook the ORM itself
builds instances with. Hand-written because no library does this for
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
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    NotSupportedError,
    connections,
    transaction,
)
from django.db.models import Field, Model, signals
from django.utils.asyncio import async_unsafe

M = TypeVar("M", bound=Model)
# Django's own logger of executed statements (DEBUG).
query_logger = logging.getLogger("django.db.backends")
logger = logging.getLogger(__name__)
# PostgreSQL's refusal to run a prepared statement whose result columns
# changed type since it was prepared (SQLSTATE 0A000).
FEATURE_NOT_SUPPORTED = "0A000"
STALE_PLAN = "cached plan must not change result type"


@functools.cache
def columns(model: type[Model]) -> str:
    """Every concrete column of ``model``, quoted, in field order: what a
    fixed statement reads or returns for ``from_row``."""
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    return ", ".join(quote(field.column) for field in model._meta.concrete_fields)


@functools.cache
def _attnames(model: type[Model]) -> tuple[str, ...]:
    return tuple(field.attname for field in model._meta.concrete_fields)


def from_row(model: type[M], row: Sequence[Any]) -> M:
    """An instance of ``model`` from a row of its ``columns``, as the ORM
    builds one (``Model.from_db``)."""
    return model.from_db(DEFAULT_DB_ALIAS, _attnames(model), row)


@functools.cache
def _select(model: type[Model], where: str) -> str:
    table = connections[DEFAULT_DB_ALIAS].ops.quote_name(model._meta.db_table)
    # ``where`` is a constant of the caller's; values only ever go as parameters.
    return f"SELECT {columns(model)} FROM {table} WHERE {where} LIMIT 1"  # noqa: S608


def fetch_one(model: type[M], where: str, params: Sequence[Any]) -> M | None:
    """A row of ``model``'s table matching ``where`` (a constant), or None.

    For lookups that match at most one row (no ORDER BY); a prepared
    statement (``fetch_all_prepared``). Every concrete
    column is read, so the instance is what the ORM returns (no deferred
    fields). The values are psycopg's, which are what the ORM returns on
    PostgreSQL for these models' field types (uuid, text, integer, real,
    boolean, timestamptz): no converters run.
    """
    rows = fetch_all_prepared(_select(model, where), params)
    return from_row(model, rows[0]) if rows else None


# What ``_defaults`` says of a column: its value must be sent (``_SEND``), or
# it is left to the database whatever the instance holds (``_OMIT``).
_SEND = object()
_OMIT = object()


@functools.cache
def _defaults(model: type[Model]) -> tuple[tuple[Field, Any], ...]:
    """Every concrete field with what its column holds when the INSERT leaves
    it out, if that is a known value.

    A field with only a database default (``created_at``) is always left to
    it (``_OMIT``), as ``save()`` does. A field with a Python default and a
    plain ``db_default`` gets the ``db_default`` (the column's DEFAULT,
    which ``makemigrations --check`` keeps equal to it); a nullable field
    with no database default gets NULL; any other must be sent.
    """
    defaults = []
    for field in model._meta.concrete_fields:
        if field.has_db_default():
            if not field.has_default():
                filled = _OMIT
            elif hasattr(field.db_default, "resolve_expression"):
                filled = _SEND  # computed by the database (``Now()``)
            else:
                filled = field.db_default
        else:
            filled = None if field.null else _SEND
        defaults.append((field, filled))
    return tuple(defaults)


def _left_out(value: Any, filled: Any) -> bool:
    """Whether leaving the column out stores what sending ``value`` stores.

    Only for the same type and an equal value, so ``0`` never stands for
    ``False`` nor ``7.5`` for ``Decimal("7.5")``: anything else is sent,
    which is always right.
    """
    if filled is _OMIT:
        return True
    if filled is _SEND:
        return False
    return value is filled or (type(value) is type(filled) and value == filled)


@functools.lru_cache(maxsize=256)
def _insert(model: type[Model], sent: tuple[Field, ...]) -> str:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    names = ", ".join(quote(field.column) for field in sent)
    placeholders = ", ".join(["%s"] * len(sent))
    values = f"({names}) VALUES ({placeholders})" if sent else "DEFAULT VALUES"
    table = quote(model._meta.db_table)
    return f"INSERT INTO {table} {values} RETURNING {columns(model)}"  # noqa: S608


def insert_one(instance: M) -> M:
    """Insert the unsaved ``instance``; the row as stored, a new instance.

    What ``instance.save(force_insert=True)`` does for a model without
    parents: each value through its field's ``pre_save`` and
    ``get_db_prep_save``, and a failed statement marks the transaction for
    rollback. A model with save signals goes through ``save`` so no
    receiver is skipped. Raises ``IntegrityError`` as ``save`` does.

    Only the columns whose value differs from what the database would fill
    in are sent (a create sets eight to a dozen of ``generations``' 31
    columns): the stored row is the same, and each value left out is one
    conversion and one bound parameter fewer. The row comes back whole
    (``RETURNING`` every column). A prepared statement
    (``fetch_all_prepared``), one per set of columns sent.
    """
    model = type(instance)
    if signals.pre_save.has_listeners(model) or signals.post_save.has_listeners(model):
        instance.save(force_insert=True)
        return instance
    fields: list[Field] = []
    values: list[Any] = []
    for field, filled in _defaults(model):
        value = field.pre_save(instance, True)
        if not _left_out(value, filled):
            fields.append(field)
            values.append(value)
    sql = _insert(model, tuple(fields))
    connection = connections[DEFAULT_DB_ALIAS]
    params = [
        field.get_db_prep_save(value, connection)
        for field, value in zip(fields, values, strict=True)
    ]
    (row,) = fetch_all_prepared(sql, params)
    return from_row(model, row)


@async_unsafe
def fetch_all_prepared(sql: str, params: dict[str, Any] | Sequence[Any]) -> list[tuple]:
    """Every row of ``sql`` (a constant), run as a prepared statement.

    Django's psycopg cursors bind parameters on the client, so the server
    parses and plans a statement on every call; for the statements every
    request or every worker runs (the key lookup, the read, the create's
    INSERT, the claim, the webhook outbox) that is a good part of their
    cost. psycopg's own cursor binds on the server, and with the
    connection's ``prepare_threshold`` at 0 (``lockngen.database``, for
    persistent connections; Django turns psycopg's prepared statements off by
    default for the sake of poolers) psycopg prepares a statement on its
    first run on a connection and then only executes it, from its
    per-connection cache. Django's own cursors still bind on the client and
    never prepare. Behind PgBouncer (``DB_PGBOUNCER``) prepared statements
    stay off: a statement prepared on one server connection is unknown on
    the next.

    Parameters are bound on the server: psycopg types a Python ``int`` by
    its size (int2 … numeric), so write the cast (``%s::bigint``) where that
    matters; ``str`` and ``None`` go untyped and take the column's type.

    The cursor is wrapped as Django wraps its own (what ``connection.cursor()``
    does, with its public parts): the persistent connection's health check,
    Django's error wrapping and ``execute_wrapper``s. Django's query log
    cannot read a prepared execution's SQL back from psycopg, so the
    statement is logged here, composed with its parameters as Django logs
    server-bound statements: query budgets count these statements too.

    A migration that changes the type of a column a prepared statement
    returns makes PostgreSQL refuse to run it ("cached plan must not change
    result type") until it is prepared again. Outside a transaction the
    connection is closed and the statement run once more on a new one (with
    a fresh cache); inside one the error stands, and the rollback makes
    psycopg forget its statements.
    """
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        return _execute_prepared(connection, sql, params)
    except NotSupportedError as exc:
        if connection.in_atomic_block or not _stale_plan(exc):
            raise
        logger.warning("prepared statement outdated by a schema change; reconnecting")
        connection.close()
        return _execute_prepared(connection, sql, params)


def _stale_plan(exc: Exception) -> bool:
    cause = exc.__cause__
    return getattr(
        cause, "sqlstate", None
    ) == FEATURE_NOT_SUPPORTED and STALE_PLAN in str(cause)


def _execute_prepared(connection: Any, sql: str, params: Any) -> list[tuple]:
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
    try:
        composed = connection.ops.compose_sql(sql, params)
    except DatabaseError:  # a dead connection cannot compose: log the template
        composed = sql
    connection.queries_log.append({"sql": composed, "time": f"{duration:.3f}"})
    query_logger.debug(
        "(%.3f) %s; args=%s; alias=%s",
        duration,
        composed,
        params,
        connection.alias,
        extra={"duration": duration, "sql": composed, "params": params},
    )

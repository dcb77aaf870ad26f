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
from collections.abc import Sequence
from typing import Any, TypeVar

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Field, Model, signals

M = TypeVar("M", bound=Model)


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

    For lookups that match at most one row (no ORDER BY). Every concrete
    column is read, so the instance is what the ORM returns (no deferred
    fields). The values are psycopg's, which are what the ORM returns on
    PostgreSQL for these models' field types (uuid, text, integer, real,
    boolean, timestamptz): no converters run.
    """
    sql, attnames = _select(model, where)
    connection = connections[DEFAULT_DB_ALIAS]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else model.from_db(connection.alias, attnames, row)


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
    parses and plans a statement on every call; for a long statement run
    thousands of times a second (the claim) that is most of its cost.
    psycopg's own cursor binds on the server and, with ``prepare=True``,
    prepares the statement on its first run on a connection and then only
    executes it (psycopg keeps the per-connection cache). It runs on
    Django's connection, so in the caller's transaction, with Django's
    error wrapping. Prepared statements are on unless ``DB_PGBOUNCER`` is
    set (``lockngen.database``: the connection's ``prepare_threshold``):
    behind transaction pooling a statement prepared on one server
    connection is unknown on the next, and this runs unprepared.
    """
    connection = connections[DEFAULT_DB_ALIAS]
    connection.ensure_connection()
    with (
        transaction.mark_for_rollback_on_error(connection.alias),
        connection.wrap_database_errors,
        psycopg.Cursor(connection.connection) as cursor,
    ):
        cursor.execute(sql, params, prepare=True)
        return cursor.fetchall()

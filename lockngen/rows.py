"""One model instance from a fixed SQL string, built with ``Model.from_db``.

For the two lookups every API read makes (the key by its hash, the
generation by its id): Django compiles a queryset to SQL each time it runs,
which costs more than the index scan itself (docs/PERFORMANCE.md, "Read
path"). A fixed string skips the compiler; ``from_db`` is the public hook the
ORM itself builds instances with. Hand-written because no library does this
for Django; PostgreSQL only (callers keep their queryset for the SQLite
development fallback).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model

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

"""Hot one-row lookups, and the create path's INSERT, compiled to SQL once,
not on every request.

Django compiles a queryset to SQL each time it runs; for the two lookups every
API read makes (the key by its hash, the generation by its id) compiling costs
more than the database round trip (docs/PERFORMANCE.md, "Read path"). A
``PreparedQuery`` builds its queryset once with example values, keeps the SQL,
and runs it again with the real values. The queryset stays the one definition
of the query (managers, soft delete, ``for_key``); only compiling is skipped.

``PreparedInsert`` does the same for ``instance.save(force_insert=True)``
(docs/PERFORMANCE.md, "Write path").

PostgreSQL only: on the SQLite development fallback it simply runs the
queryset (or ``save``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Model, QuerySet, signals
from django.db.models.expressions import DatabaseDefault
from django.db.models.sql import InsertQuery

M = TypeVar("M", bound=Model)


@dataclass(frozen=True)
class _Plan:
    sql: str
    slots: tuple[tuple[str | None, Any], ...]  # (value name | None, constant)
    fields: tuple[str, ...]
    compiler: Any
    converters: dict[int, Any]


class PreparedQuery(Generic[M]):
    """``build(**values)`` → a queryset matching at most one row.

    ``examples`` give a stand-in for each value, of the right type and unique
    among the query's parameters (a model instance stands for its pk).
    """

    def __init__(self, build: Callable[..., QuerySet[M]], **examples: Any) -> None:
        self.build = build
        self.examples = examples
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()

    def first(self, **values: Any) -> M | None:
        connection = connections[DEFAULT_DB_ALIAS]
        if connection.vendor != "postgresql":
            return self.build(**values).order_by().first()
        plan = self._plans.get(connection.alias) or self._compile(connection)
        params = [
            constant if name is None else _param(values[name])
            for name, constant in plan.slots
        ]
        with connection.cursor() as cursor:
            cursor.execute(plan.sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        if plan.converters:
            row = next(iter(plan.compiler.apply_converters([row], plan.converters)))
        return plan.compiler.query.model.from_db(connection.alias, plan.fields, row)

    def _compile(self, connection: Any) -> _Plan:
        queryset = self.build(**self.examples).order_by()[:1]
        compiler = queryset.query.get_compiler(connection=connection)
        sql, params = compiler.as_sql()
        stand_ins = {name: _param(value) for name, value in self.examples.items()}
        slots = []
        for param in params:
            names = [
                name
                for name, stand_in in stand_ins.items()
                if type(param) is type(stand_in) and param == stand_in
            ]
            if len(names) > 1:
                raise ValueError(f"ambiguous example values {names} in {sql}")
            slots.append((names[0], None) if names else (None, param))
        columns = [column for column, _, _ in compiler.select]
        plan = _Plan(
            sql=sql,
            slots=tuple(slots),
            fields=tuple(column.target.attname for column in columns),
            compiler=compiler,
            converters=compiler.get_converters(columns),
        )
        with self._lock:
            self._plans[connection.alias] = plan
        return plan


def _param(value: Any) -> Any:
    return value.pk if isinstance(value, Model) else value


@dataclass(frozen=True)
class _InsertPlan:
    sql: str
    returning: tuple[Any, ...]  # the columns the database fills in (db_default)
    converters: dict[int, Any]
    compiler: Any


class PreparedInsert(Generic[M]):
    """``instance.save(force_insert=True)`` with the INSERT compiled once.

    Django builds and compiles an ``InsertQuery`` of every column on each
    save (≈ a sixth of the create endpoint's CPU). The SQL depends only on
    which columns are left to their ``db_default``, so it is compiled by
    Django's own compiler the first time each such combination is seen and
    reused with the row's values as parameters. ``RETURNING`` names only the
    columns the database filled in (Django also returns every ``db_default``
    column whose value was sent, only to set it back unchanged).

    Anything this does not cover falls back to ``save``: another database,
    ``pre_save``/``post_save`` receivers, a model with parents or an
    auto-increment key, or a value that is an expression other than
    ``DatabaseDefault``.
    """

    def __init__(self, model: type[M]) -> None:
        self.model = model
        self._plans: dict[tuple[str, tuple[bool, ...]], _InsertPlan] = {}
        self._lock = threading.Lock()

    def insert(self, instance: M) -> None:
        connection = connections[DEFAULT_DB_ALIAS]
        meta = self.model._meta
        if (
            connection.vendor != "postgresql"
            or meta.parents
            or meta.auto_field is not None
            or signals.pre_save.has_listeners(self.model)
            or signals.post_save.has_listeners(self.model)
        ):
            instance.save(force_insert=True)
            return
        instance._prepare_related_fields_for_save(operation_name="save")
        values = [
            field.pre_save(instance, True) for field in meta.local_concrete_fields
        ]
        defaults = tuple(isinstance(value, DatabaseDefault) for value in values)
        if any(
            hasattr(value, "resolve_expression") and not is_default
            for value, is_default in zip(values, defaults, strict=True)
        ):
            instance.save(force_insert=True)
            return
        plan = self._plans.get((connection.alias, defaults)) or self._compile(
            connection, instance, defaults
        )
        params = [
            field.get_db_prep_save(value, connection)
            for field, value, is_default in zip(
                meta.local_concrete_fields, values, defaults, strict=True
            )
            if not is_default
        ]
        # What save_base does around the INSERT (no signals: checked above).
        with (
            transaction.mark_for_rollback_on_error(connection.alias),
            connection.cursor() as cursor,
        ):
            cursor.execute(plan.sql, params)
            row = cursor.fetchone() if plan.returning else None
        if row is not None:
            if plan.converters:
                row = next(iter(plan.compiler.apply_converters([row], plan.converters)))
            for field, value in zip(plan.returning, row, strict=True):
                setattr(instance, field.attname, value)
        instance._state.db = connection.alias
        instance._state.adding = False

    def _compile(
        self, connection: Any, instance: M, defaults: tuple[bool, ...]
    ) -> _InsertPlan:
        meta = self.model._meta
        fields = meta.local_concrete_fields
        returning = tuple(
            field
            for field, is_default in zip(fields, defaults, strict=True)
            if is_default
        )
        query = InsertQuery(self.model)
        query.insert_values(fields, [instance])
        compiler = query.get_compiler(connection=connection)
        compiler.returning_fields = list(returning)
        [(sql, params)] = compiler.as_sql()
        if len(params) != len(fields) - len(returning):
            # A column with a custom placeholder: insert() could not fill it.
            raise ValueError(f"unexpected parameters in {sql}")
        columns = [field.get_col(meta.db_table) for field in returning]
        plan = _InsertPlan(
            sql=sql,
            returning=returning,
            converters=compiler.get_converters(columns),
            compiler=compiler,
        )
        with self._lock:
            self._plans[(connection.alias, defaults)] = plan
        return plan

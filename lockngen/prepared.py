"""Hot one-row lookups compiled to SQL once, not on every request.

Django compiles a queryset to SQL each time it runs; for the two lookups every
API read makes (the key by its hash, the generation by its id) compiling costs
more than the database round trip (docs/PERFORMANCE.md, "Read path"). A
``PreparedQuery`` builds its queryset once with example values, keeps the SQL,
and runs it again with the real values. The queryset stays the one definition
of the query (managers, soft delete, ``for_key``); only compiling is skipped.

PostgreSQL only: on the SQLite development fallback it simply runs the
queryset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model, QuerySet

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

"""Keyset pagination on ``(created_at, id)``, newest first, and its cursor."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connections
from django.db.models import CharField, F, QuerySet, Value
from django.db.models.fields.tuple_lookups import (
    Tuple,
    TupleGreaterThan,
    TupleLessThan,
)
from rest_framework import exceptions
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param


@dataclass(frozen=True)
class Cursor:
    """A position between rows, newest first on ``(created_at, id)``."""

    forward: bool  # True: rows older than the position; False: newer
    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{'n' if self.forward else 'p'}|{self.created_at.isoformat()}|{self.id}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            padded = value + "=" * (-len(value) % 4)
            raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
            direction, created_at, pk = raw.split("|")
            if direction not in {"n", "p"}:
                raise ValueError(direction)
            timestamp = datetime.fromisoformat(created_at)
            if timestamp.tzinfo is None:
                raise ValueError(created_at)
            # Normalised here so an instant outside datetime's range (year 1
            # at +01:00) is a bad cursor, not an OverflowError later.
            timestamp = timestamp.astimezone(UTC)
            return cls(direction == "n", timestamp, uuid.UUID(pk))
        except (ValueError, OverflowError, binascii.Error, UnicodeError):
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]}) from None


class KeysetPagination(BasePagination):
    """Newest first, paged by a row-value comparison on ``(created_at, id)``.

    ``WHERE (created_at, id) < (%s, %s) ORDER BY created_at DESC, id DESC
    LIMIT n + 1`` is an index range scan (``generations_key_list_idx``): a
    page 10,000 rows deep costs what the first costs, and ties on
    ``created_at`` are never skipped or repeated. One query per page; a bad
    cursor or page size is a 400 (DRF's CursorPagination pages with OFFSET on
    ties and answers a garbage cursor with 404).
    """

    default_page_size = 20
    max_page_size = 100

    def paginate(
        self,
        queryset: QuerySet,
        request: Request,
        to_json: Callable[[Any], dict[str, Any]],
    ) -> Response:
        page_size = self._page_size(request.query_params.get("page_size"))
        raw_cursor = request.query_params.get("cursor")
        cursor = Cursor.decode(raw_cursor) if raw_cursor is not None else None
        forward = cursor is None or cursor.forward
        if cursor is not None:
            row_value = Tuple(F("created_at"), F("id"))
            position = (_comparable(cursor.created_at, queryset.db), cursor.id)
            queryset = queryset.filter(
                TupleLessThan(row_value, position)
                if forward
                else TupleGreaterThan(row_value, position)
            )
        ordering = ("-created_at", "-id") if forward else ("created_at", "id")
        rows = list(queryset.order_by(*ordering)[: page_size + 1])
        more = len(rows) > page_size
        del rows[page_size:]
        if not forward:
            rows.reverse()
        has_next = more if forward else bool(rows)
        has_previous = (cursor is not None and bool(rows)) if forward else more
        return Response(
            {
                "next": _link(request, rows[-1], True) if has_next else None,
                "previous": _link(request, rows[0], False) if has_previous else None,
                "results": [to_json(row) for row in rows],
            }
        )

    def _page_size(self, raw: str | None) -> int:
        if raw is None:
            return self.default_page_size
        if not (
            raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.max_page_size
        ):
            raise exceptions.ValidationError(
                {"page_size": [f"Must be an integer from 1 to {self.max_page_size}."]}
            )
        return int(raw)

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        link = {"type": "string", "format": "uri", "nullable": True}
        return {
            "type": "object",
            "required": ["next", "previous", "results"],
            "properties": {"next": link, "previous": link, "results": schema},
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": "cursor",
                "in": "query",
                "required": False,
                "description": "Opaque position from a previous page's next/previous.",
                "schema": {"type": "string"},
            },
            {
                "name": "page_size",
                "in": "query",
                "required": False,
                "description": "Rows per page.",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.max_page_size,
                    "default": self.default_page_size,
                },
            },
        ]


def _comparable(timestamp: datetime, alias: str) -> Any:
    """The timestamp as the database compares it.

    SQLite (the development fallback) keeps timestamps as text, and ``Now()``
    writes milliseconds ("… 10:00:00.123") where a Python value is written with
    microseconds ("… 10:00:00.123000"): equal instants would compare unequal.
    """
    if connections[alias].vendor != "sqlite":
        return timestamp
    text = timestamp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return Value(f"{text}.{timestamp.microsecond // 1000:03d}", CharField())


def _link(request: Request, row: Any, forward: bool) -> str:
    token = Cursor(forward, row.created_at, row.id).encode()
    return replace_query_param(request.build_absolute_uri(), "cursor", token)


def paginate(view: Any, queryset: QuerySet, to_json: Any) -> Response:
    return view.pagination_class().paginate(queryset, view.request, to_json)

"""Generation reads, and the one rule of which generations a key may see."""

from __future__ import annotations

import uuid

from django.db import connection
from django.db.models import Func, QuerySet, UUIDField, Value

from apikeys.models import ApiKey
from generations.models import Generation, Status
from lockngen.rows import fetch_one


def generation_visible(*, api_key: ApiKey) -> QuerySet[Generation]:
    """What a key may see: its own generations; an admin key sees every one.

    The key id is written ``(SELECT <key id>)`` so a list uses its index.
    Compared with a literal key id, PostgreSQL plans a page of a heavy key
    (one in its most-common-values statistics) as a backwards walk of the
    seed ``created_at`` index that filters out everyone else's rows: cheap
    while the key's rows are spread over time, 160 ms a page once they are all
    older than other keys' (``python -m bench scale``, the quiet key: 875,000
    rows filtered). Compared with ``(SELECT <key id>)`` the same value is a
    parameter the planner cannot see: it assumes an average key and walks
    ``generations_key_list_idx``, which is right for every key
    (docs/PERFORMANCE.md, "Scale").
    """
    if api_key.is_admin:
        return Generation.objects.all()
    key_id = Func(
        Value(api_key.pk, output_field=UUIDField()),
        template="(SELECT %(expressions)s)",
        output_field=UUIDField(),
    )
    return Generation.objects.filter(api_key_id=key_id)


def generation_list(
    *, api_key: ApiKey, status: Status | None = None, model: str | None = None
) -> QuerySet[Generation]:
    """The generations a key may see, optionally of one status and model."""
    queryset = generation_visible(api_key=api_key)
    if status is not None:
        queryset = queryset.filter(status=status)
    if model is not None:
        queryset = queryset.filter(model=model)
    return queryset


# ``generation_visible`` for one id, spelled in SQL for the read path's one
# query (lockngen.rows says why); tests/test_selectors.py holds both
# spellings to the same answers.
BY_ID = "id = %s AND NOT is_deleted"
OWNED_BY = " AND api_key_id = %s"


def generation_get(*, api_key: ApiKey, pk: uuid.UUID) -> Generation | None:
    """The generation with this id if the key may see it, else None."""
    if connection.vendor != "postgresql":
        return generation_visible(api_key=api_key).filter(pk=pk).first()
    if api_key.is_admin:
        return fetch_one(Generation, BY_ID, [pk])
    return fetch_one(Generation, BY_ID + OWNED_BY, [pk, api_key.pk])

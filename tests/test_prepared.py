"""PreparedQuery: a precompiled lookup must answer exactly as its queryset."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apikeys.models import ApiKey
from generations.models import Generation
from lockngen.prepared import PreparedQuery
from tests.factories import make_api_key, make_generation

VISIBLE = PreparedQuery(
    lambda api_key, pk: Generation.objects.for_key(api_key).filter(pk=pk),
    api_key=ApiKey(pk=uuid.UUID(int=1), is_admin=False),
    pk=uuid.UUID(int=2),
)


def fields(generation: Generation | None) -> dict | None:
    if generation is None:
        return None
    return {f.attname: getattr(generation, f.attname) for f in Generation._meta.fields}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case", ["own", "someone-elses", "deleted", "missing"], ids=str
)
def test_prepared_lookup_returns_what_the_queryset_returns(case):
    owner, _ = make_api_key(name="owner")
    other, _ = make_api_key(name="other")
    generation = make_generation(api_key=other if case == "someone-elses" else owner)
    generation.refresh_from_db()
    if case == "deleted":
        generation.delete()
    pk = uuid.uuid4() if case == "missing" else generation.pk

    expected = Generation.objects.for_key(owner).filter(pk=pk).first()
    got = VISIBLE.first(api_key=owner, pk=pk)

    assert fields(got) == fields(expected)
    assert (got is None) == (case != "own")
    if got is not None:
        assert got.created_at.tzinfo is not None  # converters applied
        assert got._state.adding is False


@pytest.mark.django_db
def test_prepared_lookup_is_one_query_with_the_real_values():
    owner, _ = make_api_key(name="owner")
    first, second = make_generation(api_key=owner), make_generation(api_key=owner)
    assert VISIBLE.first(api_key=owner, pk=first.pk).pk == first.pk  # compiles
    with CaptureQueriesContext(connection) as queries:
        assert VISIBLE.first(api_key=owner, pk=second.pk).pk == second.pk
    assert len(queries) == 1


@pytest.mark.django_db
def test_ambiguous_example_values_are_refused():
    ambiguous = PreparedQuery(
        lambda a, b: ApiKey.objects.filter(name=a, key_prefix=b), a="x", b="x"
    )
    with pytest.raises(ValueError, match="ambiguous"):
        ambiguous.first(a="one", b="two")

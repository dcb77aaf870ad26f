"""The hot lookups' SQL spellings answer exactly as the querysets that define
the rules (``ApiKey.active_condition``, ``generation_visible``)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from apikeys.keys import hash_key
from apikeys.models import ApiKey
from apikeys.selectors import api_key_active_by_hash
from apikeys.services import api_key_revoke
from generations.models import Generation
from generations.selectors import generation_get, generation_visible
from tests.factories import make_api_key, make_generation


def columns(instance: object | None) -> dict | None:
    if instance is None:
        return None
    return {f.attname: getattr(instance, f.attname) for f in instance._meta.fields}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case",
    ["active", "expires-later", "expired", "revoked", "deleted", "unknown"],
    ids=str,
)
def test_key_lookup_by_hash_answers_as_active_condition(case):
    expiry = {
        "expires-later": timedelta(hours=1),
        "expired": timedelta(seconds=-1),
    }.get(case)
    api_key, raw_key = make_api_key(
        name=case, **({"expires_in": expiry} if expiry else {})
    )
    if case == "revoked":
        api_key_revoke(api_key=api_key)
    if case == "deleted":
        api_key.delete()
    key_hash = hash_key(raw_key) if case != "unknown" else "0" * 64

    expected = (
        ApiKey.all_objects.filter(key_hash=key_hash)
        .filter(ApiKey.active_condition(Now()))
        .first()
    )
    got = api_key_active_by_hash(key_hash=key_hash)

    assert columns(got) == columns(expected)
    assert (got is not None) == (case in {"active", "expires-later"})
    if got is not None:
        assert got.created_at.tzinfo is not None
        assert got.loaded_revoked_at is None  # built by ApiKey.from_db


@pytest.mark.django_db
@pytest.mark.parametrize("admin", [False, True], ids=["own-key", "admin-key"])
@pytest.mark.parametrize(
    "case", ["own", "someone-elses", "deleted", "missing"], ids=str
)
def test_generation_by_id_answers_as_generation_visible(case, admin):
    caller, _ = make_api_key(name="caller", is_admin=admin)
    other, _ = make_api_key(name="other")
    generation = make_generation(api_key=other if case == "someone-elses" else caller)
    if case == "deleted":
        generation.delete()
    pk = uuid.uuid4() if case == "missing" else generation.pk

    expected = generation_visible(api_key=caller).filter(pk=pk).first()
    got = generation_get(api_key=caller, pk=pk)

    assert columns(got) == columns(expected)
    visible = case == "own" or (admin and case == "someone-elses")
    assert (got is not None) == visible
    if got is not None:
        assert isinstance(got, Generation)
        assert got.created_at.tzinfo is not None


@pytest.mark.django_db
def test_each_hot_lookup_is_one_query():
    api_key, raw_key = make_api_key(name="reader")
    generation = make_generation(api_key=api_key)
    with CaptureQueriesContext(connection) as queries:
        assert api_key_active_by_hash(key_hash=hash_key(raw_key)) == api_key
        assert generation_get(api_key=api_key, pk=generation.pk) == generation
    assert len(queries) == 2

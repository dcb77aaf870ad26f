"""``lockngen.rows.insert_one`` stores what ``save(force_insert=True)`` stores."""

from __future__ import annotations

import uuid

import pytest
from django.db import IntegrityError, transaction
from django.db.models import signals

from generations.models import Generation
from lockngen.rows import insert_one
from tests.factories import make_api_key

SENT = {"prompt": "a lighthouse", "guidance": 7.55, "seed": 3, "width": 512}


def stored(pk: uuid.UUID) -> dict:
    row = Generation.all_objects.values().get(pk=pk)
    return {k: v for k, v in row.items() if k not in {"id", "created_at"}}


@pytest.mark.django_db
def test_insert_one_stores_the_row_save_stores():
    api_key, _ = make_api_key()
    by_save = Generation(api_key=api_key, **SENT)
    by_save.save(force_insert=True)

    inserted = insert_one(Generation(api_key=api_key, **SENT))

    assert stored(inserted.pk) == stored(by_save.pk)
    # The instance is the stored row, database defaults included.
    assert inserted.created_at is not None and inserted.created_at.tzinfo
    assert {
        f.attname: getattr(inserted, f.attname) for f in Generation._meta.fields
    } == {
        f.attname: getattr(Generation.all_objects.get(pk=inserted.pk), f.attname)
        for f in Generation._meta.fields
    }


@pytest.mark.django_db
def test_a_refused_insert_raises_and_the_transaction_goes_on():
    api_key, _ = make_api_key()
    first = insert_one(Generation(api_key=api_key, idempotency_key="k", **SENT))
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_one(Generation(api_key=api_key, idempotency_key="k", **SENT))
    assert Generation.objects.filter(api_key=api_key).get() == first


@pytest.mark.django_db
def test_save_signal_receivers_are_not_skipped():
    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance.prompt)

    signals.post_save.connect(receiver, sender=Generation)
    try:
        insert_one(Generation(**SENT))
    finally:
        signals.post_save.disconnect(receiver, sender=Generation)
    assert seen == [SENT["prompt"]]

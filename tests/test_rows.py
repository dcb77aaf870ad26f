"""``lockngen.rows.insert_one`` stores what ``save(force_insert=True)`` stores."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from django.db import IntegrityError, NotSupportedError, connection, transaction
from django.db.models import signals
from django.test.utils import CaptureQueriesContext

from generations.models import Generation
from lockngen.rows import fetch_all_prepared, insert_one
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


def inserted_columns(sql: str) -> set[str]:
    """The columns an ``INSERT INTO t (a, b) VALUES …`` names."""
    names = sql.split("(", 1)[1].split(")", 1)[0]
    return {name.strip().strip('"') for name in names.split(",")}


# Values equal to the model's defaults, and the same defaults in another type.
AS_DEFAULTS = {"name": "", "model": "sdxl", "width": 1024, "guidance": 7.5}
OTHER_TYPES = {"width": 1024.0, "is_deleted": 0, "status": 0.0}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "values", [AS_DEFAULTS, OTHER_TYPES], ids=["defaults", "defaults-in-other-types"]
)
def test_insert_one_stores_what_save_stores_for_default_values(values):
    api_key, _ = make_api_key()
    sent = {"prompt": "a lighthouse"} | values
    by_save = Generation(api_key=api_key, **sent)
    by_save.save(force_insert=True)

    inserted = insert_one(Generation(api_key=api_key, **sent))

    assert stored(inserted.pk) == stored(by_save.pk)


@pytest.mark.django_db
def test_insert_one_leaves_columns_at_their_default_to_the_database():
    api_key, _ = make_api_key()
    with CaptureQueriesContext(connection) as queries:
        insert_one(
            Generation(api_key=api_key, prompt="p", **AS_DEFAULTS | {"width": 512})
        )
        insert_one(Generation(api_key=api_key, prompt="p", **OTHER_TYPES))
    defaults, other_types = (inserted_columns(q["sql"]) for q in queries)

    # Only what the database cannot fill in the same way goes in the INSERT.
    assert defaults == {"id", "prompt", "width", "api_key_id"}
    # Equal but of another type: sent (it is never wrong to send a value).
    assert {"width", "is_deleted", "status"} <= other_types


def prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [statement for (statement,) in cursor.fetchall()]


@pytest.mark.django_db
def test_the_insert_is_a_prepared_statement_and_is_logged():
    api_key, _ = make_api_key()
    with CaptureQueriesContext(connection) as queries:
        insert_one(Generation(api_key=api_key, **SENT))

    assert any(s.startswith('INSERT INTO "generations"') for s in prepared_statements())
    # Logged with its values, so query budgets count it.
    (logged,) = (q["sql"] for q in queries)
    assert logged.startswith('INSERT INTO "generations"') and "a lighthouse" in logged


# --- A migration that changes a returned column's type -------------------------

PROBE = "SELECT label FROM prepared_probe WHERE id = %s"


@pytest.fixture
def probe_table(test_database_url):
    """A table of its own, altered from another session as a deploy's
    migration would alter one of ours."""
    with psycopg.connect(test_database_url, autocommit=True) as other:
        other.execute("CREATE TABLE prepared_probe (id integer, label varchar(10))")
        other.execute("INSERT INTO prepared_probe VALUES (1, 'first')")
        yield other
        other.execute("DROP TABLE prepared_probe")


@pytest.mark.django_db(transaction=True)
def test_a_statement_outdated_by_a_migration_is_prepared_again(probe_table):
    assert fetch_all_prepared(PROBE, [1]) == [("first",)]  # prepared now
    probe_table.execute("ALTER TABLE prepared_probe ALTER COLUMN label TYPE text")

    assert fetch_all_prepared(PROBE, [1]) == [("first",)]
    assert fetch_all_prepared(PROBE, [1]) == [("first",)]


@pytest.mark.django_db(transaction=True)
def test_inside_a_transaction_the_outdated_statement_fails_once(probe_table):
    assert fetch_all_prepared(PROBE, [1]) == [("first",)]
    probe_table.execute("ALTER TABLE prepared_probe ALTER COLUMN label TYPE text")

    with pytest.raises(NotSupportedError), transaction.atomic():
        fetch_all_prepared(PROBE, [1])

    assert fetch_all_prepared(PROBE, [1]) == [("first",)]  # the rollback forgot it

"""Soft delete: hidden by default, one UPDATE, restorable, purgeable."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from apikeys.keys import generate_key, hash_key, key_prefix
from apikeys.models import ApiKey
from generations.models import Generation, Status
from tests.factories import make_api_key, make_generation

pytestmark = pytest.mark.django_db


def statements(context: CaptureQueriesContext, verb: str) -> list[str]:
    return [q["sql"] for q in context.captured_queries if q["sql"].startswith(verb)]


@pytest.mark.parametrize("model", ["generation", "api_key"])
def test_instance_delete_is_one_update_and_hides_the_row(model):
    obj = make_generation() if model == "generation" else make_api_key()[0]
    manager = type(obj)

    with CaptureQueriesContext(connection) as ctx:
        count, per_model = obj.delete()

    assert (count, per_model) == (1, {type(obj)._meta.label: 1})
    assert len(statements(ctx, "UPDATE")) == 1
    assert statements(ctx, "DELETE") == []
    assert obj.is_deleted
    assert obj.deleted_at is not None
    assert not manager.objects.filter(pk=obj.pk).exists()
    assert manager.all_objects.get(pk=obj.pk).is_deleted


def test_deleting_a_deleted_row_again_keeps_its_first_deleted_at():
    generation = make_generation()
    generation.delete()
    first = generation.deleted_at

    assert generation.delete()[0] == 0
    assert Generation.all_objects.get(pk=generation.pk).deleted_at == first


def test_queryset_delete_soft_deletes_in_one_update():
    kept = make_generation(name="kept")
    for _ in range(3):
        make_generation(name="doomed")

    with CaptureQueriesContext(connection) as queries:
        count, _ = Generation.objects.filter(name="doomed").delete()

    statements = [
        q["sql"].split(" ", 1)[0]
        for q in queries.captured_queries
        if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))
    ]
    # One UPDATE; before it, the lock of the live jobs with a webhook, whose
    # generation.completed the delete writes in the same transaction.
    assert statements == ["SELECT", "UPDATE"]

    assert count == 3
    assert list(Generation.objects.all()) == [kept]
    assert Generation.all_objects.count() == 4
    assert (
        Generation.all_objects.filter(is_deleted=True, deleted_at__isnull=False).count()
        == 3
    )


def test_restore_brings_a_row_back_on_instance_and_queryset():
    one, two = make_generation(), make_generation()
    Generation.objects.all().delete()

    one.restore()
    assert not one.is_deleted
    assert Generation.objects.filter(pk=one.pk).exists()

    assert Generation.all_objects.filter(pk=two.pk).restore() == 1
    restored = Generation.objects.get(pk=two.pk)
    assert (restored.is_deleted, restored.deleted_at) == (False, None)


def test_hard_delete_removes_the_row():
    generation = make_generation()
    generation.delete()

    Generation.all_objects.get(pk=generation.pk).hard_delete()

    assert not Generation.all_objects.filter(pk=generation.pk).exists()


def test_queryset_hard_delete_removes_rows():
    make_generation(), make_generation()

    count, _ = Generation.all_objects.all().hard_delete()

    assert count == 2
    assert Generation.all_objects.count() == 0


def test_a_key_that_owns_generations_cannot_be_hard_deleted_even_if_they_are_deleted():
    api_key, _ = make_api_key()
    make_generation(api_key=api_key).delete()

    with pytest.raises(ProtectedError):
        api_key.hard_delete()


def test_objects_hides_and_all_objects_shows_deleted_rows():
    alive, dead = make_generation(), make_generation()
    dead.delete()

    assert set(Generation.objects.all()) == {alive}
    assert set(Generation.all_objects.all()) == {alive, dead}
    with pytest.raises(Generation.DoesNotExist):
        Generation.objects.get(pk=dead.pk)


def test_reverse_relations_hide_deleted_rows(django_assert_num_queries):
    api_key, _ = make_api_key()
    alive = make_generation(api_key=api_key)
    make_generation(api_key=api_key).delete()

    assert list(api_key.generations.all()) == [alive]
    assert api_key.generations.count() == 1
    fetched = ApiKey.objects.prefetch_related("generations").get(pk=api_key.pk)
    with django_assert_num_queries(0):
        assert list(fetched.generations.all()) == [alive]


def test_a_deleted_key_is_still_reachable_from_its_generations():
    api_key, _ = make_api_key()
    generation = make_generation(api_key=api_key)
    api_key.delete()

    assert Generation.objects.get(pk=generation.pk).api_key == api_key


def test_update_through_objects_leaves_deleted_rows_alone():
    alive, dead = make_generation(), make_generation()
    dead.delete()

    assert Generation.objects.update(name="renamed") == 1
    assert Generation.all_objects.get(pk=dead.pk).name == ""
    assert Generation.objects.get(pk=alive.pk).name == "renamed"

    assert Generation.all_objects.update(name="everyone") == 2


def test_key_hash_and_prefix_stay_unique_across_deleted_keys():
    raw_key = generate_key()
    ApiKey.objects.create(
        name="first", key_hash=hash_key(raw_key), key_prefix=key_prefix(raw_key)
    ).delete()

    with pytest.raises(IntegrityError, match="key_hash"), transaction.atomic():
        ApiKey.objects.create(
            name="again", key_hash=hash_key(raw_key), key_prefix="lk_00000000"
        )
    with pytest.raises(IntegrityError, match="key_prefix"), transaction.atomic():
        ApiKey.objects.create(
            name="again",
            key_hash=hash_key(generate_key()),
            key_prefix=key_prefix(raw_key),
        )


# --- manage.py purge_deleted ----------------------------------------------------


def deleted_days_ago(queryset, days: int) -> None:
    queryset.update(is_deleted=True, deleted_at=Now() - timedelta(days=days))


def test_purge_deleted_removes_only_rows_deleted_long_enough_ago():
    old, recent, alive = make_generation(), make_generation(), make_generation()
    deleted_days_ago(Generation.all_objects.filter(pk=old.pk), 31)
    deleted_days_ago(Generation.all_objects.filter(pk=recent.pk), 29)

    call_command("purge_deleted", "--older-than-days", "30")

    assert set(Generation.all_objects.values_list("pk", flat=True)) == {
        recent.pk,
        alive.pk,
    }


def test_purge_deleted_works_in_batches():
    for _ in range(5):
        make_generation()
    deleted_days_ago(Generation.all_objects.all(), 10)

    with CaptureQueriesContext(connection) as ctx:
        call_command("purge_deleted", "--older-than-days", "1", "--batch-size", "2")

    assert Generation.all_objects.count() == 0
    assert len(statements(ctx, 'DELETE FROM "generations"')) == 3


def test_purge_deleted_removes_generations_before_keys_and_keeps_referenced_keys():
    lonely, _ = make_api_key(name="lonely")
    owner, _ = make_api_key(name="owner")
    still_owner, _ = make_api_key(name="still owner")
    make_generation(api_key=owner)
    make_generation(api_key=still_owner)  # alive: keeps its key
    mine = ApiKey.all_objects.filter(pk__in=[lonely.pk, owner.pk, still_owner.pk])
    deleted_days_ago(mine, 10)
    deleted_days_ago(Generation.all_objects.filter(api_key=owner), 10)

    call_command("purge_deleted", "--older-than-days", "7")

    assert list(mine.values_list("name", flat=True)) == ["still owner"]
    assert Generation.all_objects.get().api_key == still_owner


def test_purge_deleted_ignores_alive_rows_and_reports_counts(capsys):
    generation = make_generation()
    api_key, _ = make_api_key()

    call_command("purge_deleted", "--older-than-days", "0")

    assert "Purged 0 generation(s) and 0 API key(s)" in capsys.readouterr().out
    assert Generation.objects.filter(pk=generation.pk).exists()
    assert ApiKey.objects.filter(pk=api_key.pk).exists()


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="missing-days"),
        pytest.param(["--older-than-days", "-1"], id="negative-days"),
        pytest.param(["--older-than-days", "1", "--batch-size", "0"], id="zero-batch"),
    ],
)
def test_purge_deleted_refuses_bad_arguments(args):
    with pytest.raises(CommandError):
        call_command("purge_deleted", *args)


# --- deleting a live generation cancels it, whatever path (SPEC §3, §11) ----------


def claimed_job(**fields):
    from tests.factories import claim_one

    generation = make_generation(**fields)
    claimed = claim_one()
    assert claimed.pk == generation.pk
    return claimed


def test_queryset_delete_of_a_running_job_cancels_it_in_one_update():
    job = claimed_job()

    with CaptureQueriesContext(connection) as ctx:
        count, _ = Generation.objects.filter(status=Status.RUNNING).delete()

    assert count == 1
    assert len(statements(ctx, "UPDATE")) == 1
    stored = Generation.all_objects.get(pk=job.pk)
    assert (stored.is_deleted, stored.status) == (True, Status.CANCELLED)
    assert stored.lease_expires_at is None
    assert stored.lease_token == job.lease_token  # its holder's, kept
    assert stored.completed_at == stored.deleted_at == stored.updated_at
    assert stored.duration_ms is not None


def test_instance_delete_of_a_running_job_cancels_it():
    job = Generation.objects.get(pk=claimed_job().pk)

    job.delete()

    assert (job.is_deleted, job.status) == (True, Status.CANCELLED)
    stored = Generation.all_objects.get(pk=job.pk)
    assert (stored.is_deleted, stored.status) == (True, Status.CANCELLED)


def test_queryset_delete_cancels_live_jobs_and_leaves_finished_ones_alone():
    running = claimed_job(prompt="running")
    queued = make_generation(prompt="queued")
    done = make_generation(prompt="done")
    Generation.objects.filter(pk=done.pk).transition(Status.CANCELLED)
    done_before = Generation.objects.values().get(pk=done.pk)

    Generation.objects.filter(pk__in=[running.pk, queued.pk, done.pk]).delete()

    stored = {g.pk: g for g in Generation.all_objects.all()}
    assert stored[running.pk].status == stored[queued.pk].status == Status.CANCELLED
    assert stored[queued.pk].duration_ms is None  # it never started
    after = Generation.all_objects.values().get(pk=done.pk)
    assert after["is_deleted"]
    assert {
        k: v for k, v in after.items() if k not in ("is_deleted", "deleted_at")
    } == {k: v for k, v in done_before.items() if k not in ("is_deleted", "deleted_at")}

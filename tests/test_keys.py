"""API keys: format, entropy, hashing, show-once, revocation, expiry, auth."""

from __future__ import annotations

import hashlib
import math
import string
from datetime import datetime, timedelta

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.db.models import BooleanField, DateTimeField, ExpressionWrapper, Value
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apikeys.keys import (
    DEFAULT_DEV_API_KEY,
    KEY_PATTERN,
    PREFIX_LENGTH,
    generate_key,
    hash_key,
    is_valid_format,
    key_prefix,
)
from apikeys.models import ApiKey
from apikeys.services import (
    api_key_authenticate,
    api_key_create,
    api_key_revoke,
    api_key_seed_dev,
)
from tests.factories import make_api_key

URL_SAFE = set(string.ascii_letters + string.digits + "-_")
ALPHANUMERIC = set(string.ascii_letters + string.digits)


# --- the raw key (no database) --------------------------------------------------


def test_generated_key_has_the_documented_format():
    raw_key = generate_key()
    mark, public, secret = raw_key[:3], raw_key[3:11], raw_key[12:]

    assert KEY_PATTERN.match(raw_key)
    assert (mark, raw_key[11]) == ("lk_", "_")
    assert set(public) <= ALPHANUMERIC
    assert set(secret) <= URL_SAFE
    assert key_prefix(raw_key) == raw_key[:PREFIX_LENGTH] == mark + public


def test_generated_keys_carry_at_least_128_random_bits_and_never_repeat():
    keys = [generate_key() for _ in range(2000)]
    secrets_ = [key[12:] for key in keys]

    assert min(len(secret) for secret in secrets_) * math.log2(64) >= 128
    assert len(set(keys)) == len(keys)
    assert len({key_prefix(key) for key in keys}) == len(keys)
    # Every URL-safe character turns up: the secret uses the whole alphabet.
    assert set("".join(secrets_)) == URL_SAFE


@pytest.mark.parametrize(
    "raw_key",
    [
        pytest.param("", id="empty"),
        pytest.param("lk_abcdefgh_" + "a" * 31, id="secret-too-short"),
        pytest.param("xx_abcdefgh_" + "a" * 43, id="wrong-mark"),
        pytest.param("lk_abcdefg_" + "a" * 43, id="public-part-too-short"),
        pytest.param("lk_abc-efgh_" + "a" * 43, id="public-part-not-alphanumeric"),
        pytest.param("lk_abcdefgh_" + "a" * 42 + "\x00", id="nul-byte"),
        pytest.param("lk_abcdefgh_" + "a" * 42 + "=", id="not-url-safe"),
        pytest.param("lk_abcdefgh_" + "a" * 300, id="too-long"),
    ],
)
def test_malformed_keys_are_recognised(raw_key):
    assert not is_valid_format(raw_key)


def test_hash_is_sha256_hex():
    raw_key = generate_key()

    assert hash_key(raw_key) == hashlib.sha256(raw_key.encode()).hexdigest()
    assert len(hash_key(raw_key)) == 64


# --- stored keys ----------------------------------------------------------------


@pytest.mark.django_db
def test_only_the_hash_and_prefix_are_stored_and_the_raw_key_is_shown_once():
    api_key, raw_key = api_key_create(name="worker", is_admin=True, rate_limit=0)

    assert api_key.key_hash == hash_key(raw_key)
    assert api_key.key_prefix == key_prefix(raw_key)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT row_to_json(api_keys)::text FROM api_keys WHERE id = %s",
            [api_key.pk],
        )
        stored = cursor.fetchone()[0]
    assert raw_key not in stored
    assert raw_key[12:] not in stored
    reloaded = ApiKey.objects.get(pk=api_key.pk)
    assert raw_key not in repr(vars(reloaded))
    assert raw_key not in str(reloaded)


@pytest.mark.django_db
def test_prefixes_are_unique_in_the_database():
    api_key, _ = make_api_key()

    with pytest.raises(IntegrityError, match="key_prefix"), transaction.atomic():
        ApiKey.objects.create(
            name="clash",
            key_hash=hash_key(generate_key()),
            key_prefix=api_key.key_prefix,
        )


@pytest.mark.django_db
def test_revocation_is_one_way():
    api_key, _ = make_api_key()

    revoked = api_key_revoke(api_key=api_key)
    first = revoked.revoked_at
    assert first is not None
    assert api_key_revoke(api_key=api_key).revoked_at == first  # idempotent

    revoked.revoked_at = None
    with pytest.raises(ValidationError):
        revoked.full_clean()
    with pytest.raises(ValidationError):
        revoked.save()
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at == first


# --- authentication ---------------------------------------------------------------


@pytest.mark.django_db
def test_an_active_key_authenticates():
    api_key, raw_key = make_api_key()

    assert api_key_authenticate(raw_key) == api_key


@pytest.mark.django_db
@pytest.mark.parametrize(
    "state", ["revoked", "expired", "deleted", "unknown", "malformed"]
)
def test_authentication_refuses(state):
    api_key, raw_key = make_api_key()
    if state == "revoked":
        api_key_revoke(api_key=api_key)
    elif state == "expired":
        ApiKey.objects.filter(pk=api_key.pk).update(
            expires_at=Now() - timedelta(seconds=1)
        )
    elif state == "deleted":
        api_key.delete()
    elif state == "unknown":
        raw_key = generate_key()
    else:
        raw_key = raw_key[:-40]

    assert api_key_authenticate(raw_key) is None


@pytest.mark.django_db
def test_the_default_dev_key_works_in_development_only(settings):
    settings.PRODUCTION = False
    dev_key = api_key_seed_dev(raw_key=DEFAULT_DEV_API_KEY)
    assert api_key_authenticate(DEFAULT_DEV_API_KEY) == dev_key

    settings.PRODUCTION = True

    assert api_key_authenticate(DEFAULT_DEV_API_KEY) is None


def updates(context: CaptureQueriesContext) -> int:
    return sum(q["sql"].startswith("UPDATE") for q in context.captured_queries)


@pytest.mark.django_db
def test_last_used_at_is_written_at_most_once_a_minute(django_assert_num_queries):
    api_key, raw_key = make_api_key()

    with CaptureQueriesContext(connection) as first:
        api_key_authenticate(raw_key)
    assert updates(first) == 1
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at is not None

    with django_assert_num_queries(1):  # the lookup only, no write
        api_key_authenticate(raw_key)

    ApiKey.objects.filter(pk=api_key.pk).update(
        last_used_at=timezone.now() - timedelta(minutes=2)
    )
    with CaptureQueriesContext(connection) as later:
        api_key_authenticate(raw_key)
    assert updates(later) == 1


# --- seeding ------------------------------------------------------------------------


@pytest.mark.django_db
def test_seed_dev_key_twice_leaves_one_key(settings):
    settings.PRODUCTION = False
    settings.LOCKNGEN_DEV_API_KEY = DEFAULT_DEV_API_KEY

    call_command("seed_dev_key")
    call_command("seed_dev_key")

    keys = ApiKey.all_objects.filter(key_hash=hash_key(DEFAULT_DEV_API_KEY))
    assert keys.count() == 1
    assert keys.get().is_admin


@pytest.mark.django_db
def test_seed_dev_key_does_nothing_in_production(settings):
    settings.PRODUCTION = True
    ApiKey.all_objects.filter(key_hash=hash_key(DEFAULT_DEV_API_KEY)).hard_delete()

    with pytest.raises(CommandError):
        call_command("seed_dev_key")
    assert api_key_seed_dev() is None
    assert not ApiKey.all_objects.filter(
        key_hash=hash_key(DEFAULT_DEV_API_KEY)
    ).exists()


@pytest.mark.django_db
def test_active_condition_agrees_with_is_active():
    from datetime import timedelta

    from django.utils import timezone

    from apikeys.models import ApiKey
    from apikeys.services import api_key_revoke
    from tests.factories import make_api_key

    active, _ = make_api_key(name="active")
    future, _ = make_api_key(
        name="future", expires_at=timezone.now() + timedelta(days=1)
    )
    expired, _ = make_api_key(
        name="expired", expires_at=timezone.now() - timedelta(seconds=1)
    )
    revoked, _ = make_api_key(name="revoked")
    api_key_revoke(api_key=revoked)
    deleted, _ = make_api_key(name="deleted")
    deleted.delete()

    ours = ApiKey.all_objects.filter(
        name__in=["active", "future", "expired", "revoked", "deleted"]
    )
    by_query = set(
        ours.filter(ApiKey.active_condition()).values_list("name", flat=True)
    )
    by_property = {key.name for key in ours if key.is_active}
    assert by_query == by_property == {"active", "future"}


# --- one clock: the database's (SPEC §11) ---------------------------------------

SKEW = timedelta(hours=1)


def database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]


@pytest.fixture
def app_clock_behind():
    """The app server's clock an hour behind the database's (skewed hosts)."""
    with time_machine.travel(timezone.now() - SKEW, tick=True):
        yield


@pytest.mark.django_db
def test_key_timestamps_come_from_the_database_clock(app_clock_behind):
    api_key, raw_key = make_api_key()
    assert api_key_authenticate(raw_key) is not None
    api_key_revoke(api_key=api_key)

    stored = ApiKey.objects.get(pk=api_key.pk)
    now = database_now()
    for name in ("created_at", "last_used_at", "revoked_at"):
        # within the hour of skew: the database's now, not the app's
        assert now - SKEW / 2 < getattr(stored, name) <= now, name
    assert now - SKEW / 2 < api_key.created_at <= now


@pytest.mark.django_db
def test_expires_in_days_counts_from_the_database_clock(app_clock_behind):
    api_key, _ = api_key_create(name="k", expires_in=timedelta(days=1))

    assert api_key.expires_at - database_now() > timedelta(days=1) - SKEW / 2


@pytest.mark.django_db
def test_a_key_expired_on_the_database_clock_is_inactive_everywhere(app_clock_behind):
    api_key, raw_key = make_api_key()
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=Now() - timedelta(minutes=1))
    api_key = ApiKey.objects.get(pk=api_key.pk)

    assert api_key.is_active is False
    assert not ApiKey.objects.filter(ApiKey.active_condition(), pk=api_key.pk).exists()
    assert ApiKey.objects.with_is_active().get(pk=api_key.pk).is_active is False
    assert api_key_authenticate(raw_key) is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("offset", "active"),
    [
        (timedelta(microseconds=-1), True),
        (timedelta(0), False),
        (timedelta(microseconds=1), False),
    ],
    ids=["just-before", "at-expiry", "just-after"],
)
def test_is_active_and_active_condition_agree_at_the_exact_expiry_boundary(
    offset, active
):
    api_key, _ = make_api_key()
    expires_at = database_now()
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=expires_at)
    at = Value(expires_at + offset, output_field=DateTimeField())

    in_sql = ApiKey.objects.filter(ApiKey.active_condition(now=at), pk=api_key.pk)
    annotated = ApiKey.objects.annotate(
        is_active_now=ExpressionWrapper(
            ApiKey.active_condition(now=at), output_field=BooleanField()
        )
    ).get(pk=api_key.pk)

    assert in_sql.exists() is active
    assert annotated.is_active is active  # the property reads the same rule


# --- revoking is one-way, without a query per save ------------------------------


@pytest.mark.django_db
def test_saving_a_loaded_key_costs_no_extra_select(django_assert_num_queries):
    api_key, _ = make_api_key()
    api_key = ApiKey.objects.get(pk=api_key.pk)
    api_key.name = "renamed"

    with django_assert_num_queries(1):  # the UPDATE, no SELECT for the guard
        api_key.save()

    assert ApiKey.objects.get(pk=api_key.pk).name == "renamed"


@pytest.mark.django_db
@pytest.mark.parametrize("how", ["loaded", "refreshed", "revoked-in-memory"])
def test_a_revoked_key_can_never_be_saved_unrevoked(how):
    api_key, _ = make_api_key()
    if how == "loaded":
        api_key_revoke(api_key=api_key)
        api_key = ApiKey.objects.get(pk=api_key.pk)
    elif how == "refreshed":
        api_key_revoke(api_key=api_key)  # refreshes this very instance
    else:
        api_key = ApiKey.objects.get(pk=api_key.pk)
        api_key.revoked_at = database_now()
        api_key.save()
    api_key.revoked_at = None

    with pytest.raises(ValidationError):
        api_key.save()

    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is not None


# --- roles ----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_with_both_roles_is_refused_before_the_database(
    django_assert_num_queries,
):
    keys = ApiKey.all_objects.count()

    with django_assert_num_queries(0), pytest.raises(ValidationError) as refused:
        api_key_create(name="both", is_admin=True, is_worker=True)

    assert refused.value.message_dict == {
        "is_worker": ["A key is an admin key or a worker key, not both."]
    }
    assert ApiKey.all_objects.count() == keys


@pytest.mark.django_db
def test_saving_a_key_into_both_roles_is_refused():
    api_key, _ = make_api_key(name="ops", is_admin=True)
    api_key.is_worker = True

    with pytest.raises(ValidationError):
        api_key.save()

    assert ApiKey.objects.get(pk=api_key.pk).is_worker is False


@pytest.mark.django_db
def test_the_database_refuses_both_roles_whatever_writes_them():
    api_key, _ = make_api_key(name="ops", is_admin=True)

    with pytest.raises(IntegrityError, match="api_keys_one_role"), transaction.atomic():
        ApiKey.objects.filter(pk=api_key.pk).update(is_worker=True)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("is_worker", "rate_limit"), [(True, 0), (False, 100)], ids=["worker", "client"]
)
def test_the_rate_limit_left_out_is_the_roles_default(is_worker, rate_limit):
    api_key, _ = api_key_create(name="k", is_worker=is_worker)

    assert api_key.rate_limit == rate_limit
    assert ApiKey.objects.get(pk=api_key.pk).rate_limit == rate_limit

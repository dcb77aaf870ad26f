"""SPEC §5, keys: admin key management and GET /keys/me."""

from __future__ import annotations

from datetime import timedelta
from http import HTTPStatus

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from apikeys.keys import hash_key
from apikeys.models import ApiKey
from tests.factories import make_api_key

KEY_FIELDS = {
    "id",
    "name",
    "prefix",
    "is_admin",
    "is_worker",
    "rate_limit",
    "max_running",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "is_active",
}


def test_create_returns_the_raw_key_once_and_it_works(admin_api, api_as):
    expires = (timezone.now() + timedelta(days=7)).replace(microsecond=0)
    response = admin_api.post(
        "keys",
        {
            "name": "render farm",
            "is_admin": True,
            "rate_limit": 0,
            "expires_at": expires.isoformat(),
        },
    )

    assert response.status_code == HTTPStatus.CREATED
    body = response.json()
    assert set(body) == KEY_FIELDS | {"key"}
    assert response["Location"] == f"http://testserver/api/v1/keys/{body['id']}"
    assert body["prefix"] == body["key"][:11]
    assert (body["name"], body["is_admin"], body["rate_limit"]) == (
        "render farm",
        True,
        0,
    )
    assert body["expires_at"] == expires.isoformat().replace("+00:00", "Z")
    assert body["is_active"] is True
    stored = ApiKey.objects.get(pk=body["id"])
    assert stored.key_hash == hash_key(body["key"])
    assert api_as(body["key"]).get("keys/me").json()["id"] == body["id"]


def test_create_defaults(admin_api):
    body = admin_api.post("keys", {"name": "client"}).json()
    assert (body["is_admin"], body["rate_limit"], body["expires_at"]) == (
        False,
        100,
        None,
    )


def test_list_and_retrieve_never_show_a_hash_or_raw_key(admin_api, admin_key):
    created = admin_api.post("keys", {"name": "secret"}).json()

    listed = admin_api.get("keys").json()
    one = admin_api.get(f"keys/{created['id']}").json()

    assert {k["id"] for k in listed["results"]} >= {created["id"], str(admin_key[0].pk)}
    for shown in [*listed["results"], one]:
        assert set(shown) == KEY_FIELDS
        text = str(shown)
        assert created["key"] not in text
        assert hash_key(created["key"]) not in text
    assert listed["results"][0]["id"] == created["id"]  # newest first


def test_keys_page_with_a_cursor(admin_api):
    for i in range(5):
        make_api_key(name=f"k{i}")
    first = admin_api.get("keys?page_size=2").json()
    second = admin_api.get(first["next"]).json()

    assert len(first["results"]) == len(second["results"]) == 2
    assert not {k["id"] for k in first["results"]} & {
        k["id"] for k in second["results"]
    }


def test_revoke_is_immediate_and_idempotent(admin_api, api_as):
    target, raw = make_api_key(name="leaked")
    assert api_as(raw).get("keys/me").status_code == HTTPStatus.OK

    response = admin_api.post(f"keys/{target.pk}/revoke")

    assert response.status_code == HTTPStatus.OK
    revoked_at = response.json()["revoked_at"]
    assert revoked_at is not None
    assert response.json()["is_active"] is False
    assert api_as(raw).get("keys/me").status_code == HTTPStatus.UNAUTHORIZED
    again = admin_api.post(f"keys/{target.pk}/revoke/")
    assert again.json()["revoked_at"] == revoked_at


def test_delete_is_soft_and_stops_the_key(admin_api, api_as):
    target, raw = make_api_key(name="old")

    response = admin_api.delete(f"keys/{target.pk}")

    assert response.status_code == HTTPStatus.NO_CONTENT
    assert ApiKey.all_objects.get(pk=target.pk).is_deleted
    assert admin_api.get(f"keys/{target.pk}").status_code == HTTPStatus.NOT_FOUND
    assert admin_api.delete(f"keys/{target.pk}").status_code == HTTPStatus.NOT_FOUND
    assert api_as(raw).get("keys/me").status_code == HTTPStatus.UNAUTHORIZED


def test_me_is_the_calling_key(owner_api, owner_key):
    for path in ("keys/me", "keys/me/"):
        body = owner_api.get(path).json()
        assert set(body) == KEY_FIELDS
        assert body["id"] == str(owner_key[0].pk)
        assert body["last_used_at"] is not None


def test_unknown_key_id_is_404(admin_api):
    assert admin_api.get("keys/00000000-0000-0000-0000-000000000000").status_code == 404


def test_expires_at_must_be_in_the_future_of_the_database_clock(admin_api):
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        database_now = cursor.fetchone()[0]
    past = database_now - timedelta(minutes=30)

    # The app server's clock an hour behind: by it, ``past`` is still ahead.
    with time_machine.travel(database_now - timedelta(hours=1), tick=True):
        response = admin_api.post(
            "keys", {"name": "late", "expires_at": past.isoformat()}
        )

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert response.json() == {"expires_at": ["Must be in the future."]}
    assert not ApiKey.objects.filter(name="late").exists()


# --- roles and max_running ------------------------------------------------------

# SPEC §5, Key JSON, in order.
KEY_JSON_ORDER = [
    "id",
    "name",
    "prefix",
    "is_admin",
    "is_worker",
    "rate_limit",
    "max_running",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
    "is_active",
]


def test_key_json_has_the_spec_order(admin_api, admin_key):
    created = admin_api.post("keys", {"name": "ordered"}).json()

    assert list(created) == [*KEY_JSON_ORDER, "key"]
    assert list(admin_api.get(f"keys/{created['id']}").json()) == KEY_JSON_ORDER
    assert list(admin_api.get("keys/me").json()) == KEY_JSON_ORDER


def test_create_a_worker_key_unlimited_by_default(admin_api, api_as):
    response = admin_api.post("keys", {"name": "gpu-box-1", "is_worker": True})

    assert response.status_code == HTTPStatus.CREATED
    body = response.json()
    assert (body["is_worker"], body["is_admin"]) == (True, False)
    assert (body["rate_limit"], body["max_running"]) == (0, None)
    stored = ApiKey.objects.get(pk=body["id"])
    assert (stored.is_worker, stored.rate_limit) == (True, 0)
    worker = api_as(body["key"])
    assert worker.get("keys/me").json()["is_worker"] is True
    assert worker.get("generations").status_code == HTTPStatus.FORBIDDEN


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"is_worker": True, "rate_limit": 30}, (True, 30, None), id="worker-limited"
        ),
        pytest.param({"max_running": 2}, (False, 100, 2), id="client-capped"),
        pytest.param({"max_running": 1}, (False, 100, 1), id="cap-1"),
        pytest.param(
            {"max_running": 2147483647}, (False, 100, 2147483647), id="cap-int-max"
        ),
        pytest.param({"max_running": None}, (False, 100, None), id="no-cap"),
        pytest.param(
            {"is_admin": True, "max_running": 5}, (False, 100, 5), id="admin-capped"
        ),
    ],
)
def test_create_with_roles_rate_limit_and_max_running(admin_api, fields, expected):
    body = admin_api.post("keys", {"name": "k", **fields}).json()

    assert (body["is_worker"], body["rate_limit"], body["max_running"]) == expected
    stored = ApiKey.objects.get(pk=body["id"])
    assert (stored.is_worker, stored.rate_limit, stored.max_running) == expected


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param(
            {"is_admin": True, "is_worker": True}, "is_worker", id="two-roles"
        ),
        pytest.param({"max_running": 0}, "max_running", id="cap-0"),
        pytest.param({"max_running": -1}, "max_running", id="cap-negative"),
        pytest.param({"max_running": 2147483648}, "max_running", id="cap-over-int"),
        pytest.param({"max_running": "2"}, "max_running", id="cap-string"),
        pytest.param({"max_running": 2.0}, "max_running", id="cap-float"),
        pytest.param({"max_running": True}, "max_running", id="cap-bool"),
        pytest.param({"is_worker": "true"}, "is_worker", id="worker-string"),
        pytest.param({"is_worker": 1}, "is_worker", id="worker-int"),
        pytest.param({"is_worker": None}, "is_worker", id="worker-null"),
    ],
)
def test_bad_roles_or_caps_are_400_and_create_nothing(admin_api, fields, field):
    keys = ApiKey.all_objects.count()

    response = admin_api.post("keys", {"name": "bad", **fields})

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert set(response.json()) == {field}, response.json()
    assert ApiKey.all_objects.count() == keys


def test_two_roles_are_refused_with_a_message_naming_the_rule(admin_api):
    response = admin_api.post(
        "keys", {"name": "both", "is_admin": True, "is_worker": True}
    )

    assert response.json() == {
        "is_worker": ["A key is an admin key or a worker key, not both."]
    }

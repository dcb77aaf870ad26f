"""API-key authentication over HTTP: both headers, every way a key can be bad."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from apikeys.keys import DEFAULT_DEV_API_KEY, generate_key
from apikeys.models import ApiKey
from apikeys.services import api_key_revoke, api_key_seed_dev


def assert_401(response) -> None:
    assert response.status_code == HTTPStatus.UNAUTHORIZED
    assert response["Content-Type"] == "application/json"
    assert response["WWW-Authenticate"] == 'Bearer realm="lockngen"'
    assert set(response.json()) == {"detail"}
    assert "X-RateLimit-Limit" not in response


@pytest.mark.sqlite_smoke
@pytest.mark.parametrize(
    "header",
    [
        lambda raw: {"Authorization": f"Bearer {raw}"},
        lambda raw: {"Authorization": f"bearer   {raw} "},
        lambda raw: {"X-API-Key": raw},
        lambda raw: {"X-Api-Key": raw},
    ],
    ids=["bearer", "bearer-lowercase-spaces", "x-api-key", "x-api-key-any-case"],
)
def test_either_header_authenticates(api_as, owner_key, header):
    response = api_as(None).get("keys/me", headers=header(owner_key[1]))
    assert response.status_code == HTTPStatus.OK
    assert response.json()["id"] == str(owner_key[0].pk)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Token lk_abcdefgh_" + "x" * 40},
        {"X-API-Key": ""},
        {"X-API-Key": "not-a-key"},
        {"X-API-Key": generate_key()},  # well-formed, unknown
        {"X-API-Key": "lk_abcdefgh_" + "x" * 300},  # too long
        {"X-API-Key": "lk_abcdefgh_" + "\u00e9" * 40},
    ],
    ids=[
        "missing",
        "bearer-without-key",
        "bearer-blank",
        "basic",
        "token-scheme",
        "x-api-key-empty",
        "malformed",
        "unknown",
        "too-long",
        "non-ascii",
    ],
)
def test_missing_or_unknown_keys_are_401(api_as, headers):
    assert_401(api_as(None).get("generations", headers=headers))


def test_revoked_key_is_rejected_on_its_next_request(api_as, owner_key):
    api = api_as(owner_key[1])
    assert api.get("generations").status_code == HTTPStatus.OK

    api_key_revoke(api_key=owner_key[0])

    assert_401(api.get("generations"))


def test_wrong_key_with_a_known_prefix_is_rejected(api_as, owner_key):
    forged = owner_key[1][:12] + "A" * 43
    assert_401(api_as(forged).get("keys/me"))


def test_bearer_wins_over_x_api_key(api_as, owner_key, other_key):
    response = api_as(owner_key[1]).get("keys/me", headers={"X-API-Key": other_key[1]})
    assert response.json()["id"] == str(owner_key[0].pk)


def test_the_development_key_works_in_development(api_as):
    api_key_seed_dev()
    response = api_as(DEFAULT_DEV_API_KEY).get("keys/me")
    assert response.status_code == HTTPStatus.OK
    assert response.json()["prefix"] == "lk_devkey00"


def test_the_development_key_is_refused_in_production(api_as, settings):
    api_key_seed_dev()
    settings.PRODUCTION = True
    assert_401(api_as(DEFAULT_DEV_API_KEY).get("keys/me"))


def test_unauthenticated_request_touches_no_data(api_as, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert_401(api_as(None).get("generations"))


def test_last_used_at_is_written_once_a_minute_not_per_request(api_as, owner_key):
    api = api_as(owner_key[1])
    api.get("keys/me")
    first = ApiKey.objects.get(pk=owner_key[0].pk).last_used_at
    assert first is not None

    api.get("keys/me")

    assert ApiKey.objects.get(pk=owner_key[0].pk).last_used_at == first

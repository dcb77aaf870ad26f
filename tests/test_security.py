"""Security checks: deploy checks, the development key, secrets in logs, admin
access, admin-only endpoints, and hostile strings in URLs.

The production-level checks run a real gunicorn in production mode (behind
the TLS proxy it expects); the rest use Django's test client in-process.
"""

from __future__ import annotations

import itertools
import json
import logging
from http import HTTPStatus
from urllib.parse import quote, urlencode

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apikeys.keys import DEFAULT_DEV_API_KEY, hash_key, key_prefix
from apikeys.models import ApiKey
from generations.models import Generation
from tests.factories import claim_one, make_api_key, make_generation
from tests.liveserver import (
    PRODUCTION,
    create_key,
    environment,
    live_api,
    migrate,
)
from tests.serving import manage, scratch_database, url_for

PASSWORD = "sec-pw-Never-2-Be-Logged"


# --- manage.py check --deploy ------------------------------------------------------


def test_check_deploy_passes_in_production_configuration():
    done = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env=environment(url_for("postgres", password=PASSWORD)),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    assert "WARN" not in done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr


# --- A production server ------------------------------------------------------------


@pytest.fixture(scope="module")
def production_db():
    """A scratch database migrated the way operators do it in production."""
    with scratch_database("security") as name:
        migrate(url_for(name), **PRODUCTION)
        yield name


@pytest.fixture(scope="module")
def production_api(production_db, tmp_path_factory):
    """gunicorn in production, logging everything it can (DEBUG, both logs)."""
    url = url_for(production_db)
    admin = create_key(url, "security admin", admin=True)
    log = tmp_path_factory.mktemp("security") / "gunicorn.log"
    with live_api(
        url_for(production_db, password=PASSWORD),
        log_path=log,
        key=admin,
        LOG_LEVEL="DEBUG",
        GUNICORN_LOG_LEVEL="debug",
    ) as api:
        yield api


def key_rows(database: str, raw_key: str) -> int:
    with psycopg.connect(url_for(database)) as conn:
        return conn.execute(
            "SELECT count(*) FROM api_keys WHERE key_hash = %s", [hash_key(raw_key)]
        ).fetchone()[0]


@pytest.mark.parametrize(
    "header", ["Authorization", "X-API-Key"], ids=["bearer", "x-api-key"]
)
def test_documented_dev_key_is_not_seeded_and_refused_in_production_even_if_present(
    production_api, production_db, header
):
    api = production_api
    bearer = header == "Authorization"
    as_dev = (
        {header: f"Bearer {DEFAULT_DEV_API_KEY}"}
        if bearer
        else {header: DEFAULT_DEV_API_KEY}
    )
    assert key_rows(production_db, DEFAULT_DEV_API_KEY) == 0  # migrate seeded none
    assert api.call("GET", "keys/me").status == HTTPStatus.OK  # a real key works

    with psycopg.connect(url_for(production_db), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, is_admin,"
            " rate_limit, created_at, is_deleted)"
            " VALUES (gen_random_uuid(), 'smuggled dev key', %s, %s, true, 0,"
            " now(), false)",
            [hash_key(DEFAULT_DEV_API_KEY), key_prefix(DEFAULT_DEV_API_KEY)],
        )
        try:
            for method, path in [
                ("GET", "keys/me"),
                ("GET", "keys"),
                ("GET", "generations"),
                ("POST", "generations/claim"),
            ]:
                reply = api.call(method, path, key="", headers=as_dev)
                assert reply.status == HTTPStatus.UNAUTHORIZED, (path, reply.body)
                assert reply.is_json
        finally:
            conn.execute(
                "DELETE FROM api_keys WHERE key_hash = %s",
                [hash_key(DEFAULT_DEV_API_KEY)],
            )


def secrets_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [what for what, value in secrets.items() if value in text]


def key_session(call) -> dict[str, str]:
    """Create, use, mistype, revoke and delete a key through ``call``.

    ``call(method, path, body=None, key=None, headers=None)`` returns
    ``(status, json_body)``; ``key`` defaults to the admin key, ``""`` sends
    no Authorization header. Returns every secret the session handled.
    """
    status, created = call("POST", "keys", {"name": "session key", "rate_limit": 0})
    assert status == HTTPStatus.CREATED, created
    raw = created["key"]
    mistyped = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    assert call("GET", "keys/me", key=raw)[0] == HTTPStatus.OK
    assert (
        call(
            "POST", "generations", {"prompt": "p"}, key="", headers={"X-API-Key": raw}
        )[0]
        == HTTPStatus.CREATED
    )
    assert call("GET", "keys/me", key=mistyped)[0] == HTTPStatus.UNAUTHORIZED
    assert call("GET", "keys/me", key=raw + "x" * 300)[0] == HTTPStatus.UNAUTHORIZED
    assert call("POST", f"keys/{created['id']}/revoke")[0] == HTTPStatus.OK
    assert call("GET", "keys/me", key=raw)[0] == HTTPStatus.UNAUTHORIZED
    assert call("DELETE", f"keys/{created['id']}")[0] == HTTPStatus.NO_CONTENT
    assert call("GET", "keys/me", key=raw)[0] == HTTPStatus.UNAUTHORIZED
    return {
        "created key": raw,
        "created key's secret part": raw[len(key_prefix(raw)) + 1 :],
        "mistyped key": mistyped,
    }


def test_raw_keys_and_the_database_password_never_reach_the_server_logs(
    production_api,
):
    api = production_api

    def call(method, path, body=None, key=None, headers=None):
        reply = api.call(method, path, body, key=key, headers=headers)
        return reply.status, reply.json() if reply.body else None

    secrets = key_session(call)
    secrets |= {"admin key": api.key, "database password": PASSWORD}
    log = api.log()

    assert "POST /api/v1/keys" in log  # the log is really captured
    assert secrets_in(log, secrets) == []


@pytest.mark.django_db
def test_raw_keys_never_reach_python_logging_even_at_debug(caplog, settings):
    settings.DEBUG = True  # django.db.backends logs every statement with its params
    _, admin = make_api_key(name="admin", is_admin=True, rate_limit=0)
    client = Client()

    def call(method, path, body=None, key=None, headers=None):
        raw = admin if key is None else key  # "": no Authorization header
        all_headers = {"Authorization": f"Bearer {raw}"} if raw else {}
        all_headers.update(headers or {})
        response = client.generic(
            method,
            f"/api/v1/{path}",
            json.dumps(body) if body is not None else b"",
            content_type="application/json",
            headers=all_headers,
        )
        return response.status_code, response.json() if response.content else None

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    secrets = key_session(call) | {"admin key": admin}
    logged = "\n".join(
        f"{record.getMessage()} {record.args!r} {record.__dict__!r}"
        for record in caplog.records
    )

    assert "api_keys" in logged  # SQL was captured
    assert secrets_in(logged, secrets) == []


# --- Admin site ---------------------------------------------------------------------

ADMIN_PAGES = [
    "/admin/",
    "/admin/apikeys/apikey/",
    "/admin/apikeys/apikey/add/",
    "/admin/generations/generation/",
]


@pytest.fixture
def admin_key_raw(db) -> str:
    return make_api_key(name="worker", is_admin=True, rate_limit=0)[1]


@pytest.mark.django_db
@pytest.mark.parametrize("page", ADMIN_PAGES)
@pytest.mark.parametrize(
    "credentials",
    ["none", "x-api-key", "bearer", "non-staff-user"],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_admin_needs_a_staff_login_and_api_keys_do_not_grant_it(
    admin_key_raw, page, credentials, method
):
    client = Client()
    headers = {}
    if credentials == "x-api-key":
        headers = {"X-API-Key": admin_key_raw}
    elif credentials == "bearer":
        headers = {"Authorization": f"Bearer {admin_key_raw}"}
    elif credentials == "non-staff-user":
        user = get_user_model().objects.create_user("plain")
        client.force_login(user)
    keys_before = ApiKey.all_objects.count()

    response = client.generic(method, page, headers=headers)

    assert response.status_code == HTTPStatus.FOUND
    assert response["Location"].startswith("/admin/login/")
    assert ApiKey.all_objects.count() == keys_before


@pytest.mark.django_db
def test_a_staff_login_does_open_the_admin():
    """The control for the test above: the pages exist and open for staff."""
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", password=None))
    for page in ADMIN_PAGES:
        assert client.get(page).status_code == HTTPStatus.OK, page


# --- Admin-only endpoints with a non-admin key ------------------------------------

ADMIN_ENDPOINTS = [
    "keys",
    "keys/{key}",
    "keys/{key}/revoke",
    "generations/claim",
    "generations/{generation}/heartbeat",
    "generations/{generation}/complete",
    "generations/{generation}/fail",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def world() -> tuple:
    """Everything an admin endpoint could change."""
    return (
        sorted(
            ApiKey.all_objects.values_list(
                "id", "is_deleted", "revoked_at", "is_admin", "name"
            )
        ),
        sorted(
            Generation.all_objects.values_list(
                "id", "status", "attempts", "is_deleted", "output_path"
            )
        ),
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "endpoint"), list(itertools.product(METHODS, ADMIN_ENDPOINTS))
)
def test_a_non_admin_key_cannot_reach_admin_endpoints_by_any_method(
    method, endpoint, admin_key_raw
):
    admin = ApiKey.objects.get(key_hash=hash_key(admin_key_raw))
    client_key, raw = make_api_key(name="client", rate_limit=0)
    generation = make_generation(api_key=client_key)
    assert claim_one().pk == generation.pk  # running: could complete
    path = endpoint.format(key=admin.pk, generation=generation.pk)
    before = world()

    for suffix in ("", "/"):
        response = Client().generic(
            method,
            f"/api/v1/{path}{suffix}",
            b'{"output_path": "x", "error_message": "x", "name": "x"}',
            content_type="application/json",
            headers={"Authorization": f"Bearer {raw}"},
        )
        assert response.status_code in (
            HTTPStatus.FORBIDDEN,
            HTTPStatus.METHOD_NOT_ALLOWED,
        ), (suffix, response.status_code, response.content)
        assert response["Content-Type"].startswith("application/json")

    assert world() == before


# --- Hostile strings in query parameters and path segments -----------------------

HOSTILE = [
    "' OR '1'='1",
    "1; DROP TABLE generations; --",
    "1' UNION SELECT key_hash FROM api_keys --",
    "\x00",
    "abc\x00def",
    "%00",
    "../../../../etc/passwd",
    "..",
    "..\\..\\windows\\win.ini",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "$(reboot)",
]
HOSTILE_IDS = [
    "sql-or",
    "sql-drop",
    "sql-union",
    "nul",
    "nul-inside",
    "percent-00",
    "traversal",
    "dotdot",
    "backslashes",
    "encoded-traversal",
    "shell",
]

QUERY_PARAMETERS = [
    ("generations", "status"),
    ("generations", "model"),
    ("generations", "cursor"),
    ("generations", "page_size"),
    ("keys", "cursor"),
    ("keys", "page_size"),
]
PATH_SEGMENTS = [
    ("GET", "generations/{}"),
    ("PATCH", "generations/{}"),
    ("DELETE", "generations/{}"),
    ("POST", "generations/{}/cancel"),
    ("POST", "generations/{}/heartbeat"),
    ("POST", "generations/{}/complete"),
    ("POST", "generations/{}/fail"),
    ("GET", "keys/{}"),
    ("DELETE", "keys/{}"),
    ("POST", "keys/{}/revoke"),
]


@pytest.fixture
def populated(admin_key_raw):
    """A few rows in every state, so a working injection would show."""
    owner, _ = make_api_key(name="owner", rate_limit=0)
    for n in range(3):
        make_generation(api_key=owner, name=f"g{n}")
    return admin_key_raw


def hostile_call(raw_key: str, method: str, url: str):
    return Client().generic(
        method,
        url,
        b'{"name": "x", "output_path": "x"}',
        content_type="application/json",
        headers={"Authorization": f"Bearer {raw_key}"},
    )


@pytest.mark.django_db
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
@pytest.mark.parametrize(
    ("resource", "parameter"), QUERY_PARAMETERS, ids=lambda p: str(p)
)
def test_hostile_query_parameters_are_refused_and_change_nothing(
    populated, resource, parameter, value
):
    before = world()

    response = hostile_call(
        populated, "GET", f"/api/v1/{resource}?{urlencode({parameter: value})}"
    )

    assert response["Content-Type"].startswith("application/json")
    if parameter == "model" and "\x00" not in value:
        # Free text compared as a bound parameter: a valid filter matching nothing.
        assert response.status_code == HTTPStatus.OK
        assert response.json()["results"] == []
    else:
        assert response.status_code == HTTPStatus.BAD_REQUEST, response.content
    assert world() == before


@pytest.mark.django_db
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
@pytest.mark.parametrize(
    ("method", "template"), PATH_SEGMENTS, ids=lambda p: str(p).replace("/", ".")
)
def test_hostile_path_segments_are_4xx_and_change_nothing(
    populated, method, template, value
):
    before = world()

    for segment in (quote(value, safe=""), value):  # percent-encoded and as is
        url = "/api/v1/" + template.format(segment)
        response = hostile_call(populated, method, url)

        assert 400 <= response.status_code < 500, (url, response.content)
        assert response["Content-Type"].startswith("application/json")
    assert world() == before

"""SPEC §5, roles: client, worker and admin keys, and who may call what.

The walk over the URL conf is what keeps a new endpoint from being forgotten:
every ``/api/v1/`` route and method is tried with a worker key, which must
get 403 everywhere but the worker endpoints and ``GET /keys/me``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from http import HTTPStatus

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from apikeys.models import ApiKey
from apikeys.permissions import AnyKey
from generations.models import Generation, Status
from lockngen.http.views import ApiViewSet
from tests.conftest import ApiClient
from tests.factories import make_api_key, make_generation

API_PREFIX = "api/v1/"
# (URL name, method) a worker key may call; every other route is 403 to it.
WORKER_ROUTES = {
    ("generation-claim", "post"),
    ("generation-heartbeat", "post"),
    ("generation-complete", "post"),
    ("generation-fail", "post"),
    ("apikey-me", "get"),
    ("apikey-me", "head"),
}
# The 403 codes of apikeys.permissions a worker key meets.
NOT_FOR_WORKERS = {"client_or_admin_key_required", "admin_key_required"}


def _walk(resolver: URLResolver, prefix: str) -> Iterator[tuple[str, URLPattern]]:
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern).removeprefix("^")
        if isinstance(entry, URLResolver):
            yield from _walk(entry, route)
        else:
            yield route, entry


def view_methods(entry: URLPattern) -> list[str]:
    """The HTTP methods the route's view answers (not 405)."""
    view = entry.callback
    actions = getattr(view, "actions", None)
    if actions is not None:  # a viewset route: its method → action map
        methods = set(actions)
        if "get" in methods:
            methods.add("head")  # DRF answers HEAD with the GET action
        return sorted(methods)
    return sorted(
        m for m in view.cls.http_method_names if m != "options" and hasattr(view.cls, m)
    )


def api_routes() -> list[tuple[str, str, str]]:
    """``(URL name, method, path)`` of every ``/api/v1/`` route in the URL conf,
    path parameters filled with fresh valid-looking UUIDs (so the permission
    decides, not a 400 for a malformed id or a 404 for a missing row)."""
    found = []
    for route, entry in _walk(get_resolver(), ""):
        if not route.startswith(API_PREFIX):
            continue
        view_class = getattr(entry.callback, "cls", None)
        assert view_class is not None and issubclass(view_class, APIView), (
            f"{route} is not a DRF view, so no permission class guards it"
        )
        assert entry.name, f"{route} has no URL name"
        params = {name: str(uuid.uuid4()) for name in entry.pattern.regex.groupindex}
        path = reverse(entry.name, kwargs=params)
        found += [(entry.name, method, path) for method in view_methods(entry)]
    return found


ROUTES = api_routes()


def test_the_walk_finds_every_endpoint_of_the_table():
    """The control for the walk: it sees the routes SPEC §5 lists."""
    names = {(name, method) for name, method, _ in ROUTES}

    assert names >= WORKER_ROUTES
    assert names >= {
        ("generation-list", "get"),
        ("generation-list", "post"),
        ("generation-detail", "get"),
        ("generation-detail", "patch"),
        ("generation-detail", "delete"),
        ("generation-cancel", "post"),
        ("apikey-list", "get"),
        ("apikey-list", "post"),
        ("apikey-detail", "get"),
        ("apikey-detail", "delete"),
        ("apikey-revoke", "post"),
    }


def counted(queries) -> list[str]:
    savepoint = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")
    return [q["sql"] for q in queries if not q["sql"].upper().startswith(savepoint)]


def world() -> tuple:
    """Every row a refused request could have changed."""
    return (
        sorted(ApiKey.all_objects.values_list("id", "is_deleted", "revoked_at")),
        sorted(
            Generation.all_objects.values_list("id", "status", "attempts", "is_deleted")
        ),
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "method", "path"),
    [route for route in ROUTES if route[:2] not in WORKER_ROUTES],
    ids=[f"{m.upper()} {n}" for n, m, _ in ROUTES if (n, m) not in WORKER_ROUTES],
)
def test_a_worker_key_is_refused_on_every_other_endpoint(
    name, method, path, worker_api, owner_key
):
    make_generation(api_key=owner_key[0])  # something a leaked key could read
    worker_api.get("keys/me")  # last_used_at written: the next requests skip it
    before = world()
    body = {} if method in {"post", "patch", "put"} else None

    with CaptureQueriesContext(connection) as queries:
        response = worker_api.request(method.upper(), path, body)

    assert response.status_code == HTTPStatus.FORBIDDEN, response.content
    assert response["Content-Type"] == "application/json"
    if method != "head":
        assert response.json()["code"] in NOT_FOR_WORKERS, response.json()
    # The permission ran before any row was looked up, and cost no query of
    # its own: the key's lookup is the only statement.
    assert len(counted(queries)) == 1, counted(queries)
    assert world() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "method", "path"),
    [route for route in ROUTES if route[:2] in WORKER_ROUTES],
    ids=[f"{m.upper()} {n}" for n, m, _ in ROUTES if (n, m) in WORKER_ROUTES],
)
def test_a_worker_key_passes_the_permission_of_the_worker_endpoints(
    name, method, path, worker_api
):
    """The control: the same request reaches these views (a missing job is
    404, a missing token 400, an empty queue 204: never 403)."""
    response = worker_api.request(
        method.upper(), path, {} if method == "post" else None
    )

    assert response.status_code != HTTPStatus.FORBIDDEN, response.content
    assert response.status_code < HTTPStatus.INTERNAL_SERVER_ERROR, response.content


# --- the worker loop with a worker key, end to end ---------------------------------


def running_job() -> tuple[str, str]:
    """The id and lease token of the running job, read from the database (the
    claim's answer changes shape in SPEC v2; only its status is tested here)."""
    job = Generation.objects.get(status=Status.RUNNING)
    return str(job.pk), str(job.lease_token)


def test_a_worker_key_claims_heartbeats_completes_and_fails(worker_api, owner_key):
    done = make_generation(api_key=owner_key[0])
    failed = make_generation(api_key=owner_key[0])

    assert worker_api.post("generations/claim").status_code == HTTPStatus.OK
    job, token = running_job()
    assert job == str(done.pk)  # the oldest first
    heartbeat = worker_api.post(f"generations/{job}/heartbeat", {"lease_token": token})
    assert heartbeat.status_code == HTTPStatus.OK
    completed = worker_api.post(
        f"generations/{job}/complete", {"lease_token": token, "output_path": "o.png"}
    )
    assert completed.status_code == HTTPStatus.OK

    assert worker_api.post("generations/claim").status_code == HTTPStatus.OK
    job, token = running_job()
    assert job == str(failed.pk)
    response = worker_api.post(
        f"generations/{job}/fail", {"lease_token": token, "error_message": "oom"}
    )
    assert response.status_code == HTTPStatus.OK

    assert worker_api.post("generations/claim").status_code == HTTPStatus.NO_CONTENT
    assert Generation.objects.get(pk=done.pk).status == Status.COMPLETED
    assert Generation.objects.get(pk=failed.pk).status == Status.FAILED


def test_a_worker_key_reads_itself(worker_api, worker_key):
    body = worker_api.get("keys/me").json()

    assert body["id"] == str(worker_key[0].pk)
    assert (body["is_worker"], body["is_admin"]) == (True, False)


@pytest.mark.parametrize(
    "path", ["generations/claim", "generations/{id}/heartbeat", "generations/{id}/fail"]
)
def test_a_client_key_cannot_claim_or_report(path, owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    Generation.objects.filter(pk=generation.pk).transition(
        Status.RUNNING, lease_seconds=60
    )
    _, token = running_job()
    make_generation(api_key=owner_key[0])  # something to claim

    response = owner_api.post(path.format(id=generation.pk), {"lease_token": token})

    assert response.status_code == HTTPStatus.FORBIDDEN
    assert response.json() == {
        "detail": "This endpoint needs a worker or admin key.",
        "code": "worker_or_admin_key_required",
    }
    assert Generation.objects.filter(status=Status.RUNNING).count() == 1


# --- least privilege by default ----------------------------------------------------


class TomorrowsViewSet(ApiViewSet):
    """An endpoint added without thinking about roles, plus one action that
    opens itself to every key."""

    permission_classes_by_action = {"opened": (AnyKey,)}

    def list(self, request: Request) -> Response:
        return Response({"prompts": []})

    @action(detail=False, methods=["post"])
    def opened(self, request: Request) -> Response:
        return Response({})


def call(actions: dict[str, str], method: str, raw_key: str) -> Response:
    request = getattr(APIRequestFactory(), method)(
        "/", HTTP_AUTHORIZATION=f"Bearer {raw_key}"
    )
    return TomorrowsViewSet.as_view(actions)(request)


@pytest.mark.django_db
def test_a_new_endpoint_is_closed_to_worker_keys_unless_it_opts_in():
    _, worker = make_api_key(name="w", is_worker=True, rate_limit=0)
    _, client = make_api_key(name="c", rate_limit=0)

    assert call({"get": "list"}, "get", worker).status_code == HTTPStatus.FORBIDDEN
    assert call({"get": "list"}, "get", client).status_code == HTTPStatus.OK
    assert call({"post": "opened"}, "post", worker).status_code == HTTPStatus.OK


@pytest.mark.django_db
def test_no_key_is_401_not_403_on_every_endpoint():
    for name, method, path in ROUTES:
        response = ApiClient(Client(), None).request(method.upper(), path)
        assert response.status_code == HTTPStatus.UNAUTHORIZED, (name, method)

"""SPEC §5, generations: every row of the endpoint table, as clients and workers."""

from __future__ import annotations

import uuid
from datetime import timedelta
from http import HTTPStatus

import pytest
from django.db import connection
from django.db.models import Subquery
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from generations.models import Generation, Status
from generations.services import FieldNotEditable, generation_update
from lockngen.http.pagination import Cursor
from tests.factories import make_generation

GENERATION_FIELDS = {
    "id",
    "name",
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "status",
    "prompt_id",
    "output_path",
    "thumbnail_path",
    "error_message",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "duration_ms",
    "attempts",
    "lease_expires_at",
    "webhook",
    "webhook_events_filter",
}


def counted(queries) -> list[str]:
    """The statements that count against the budget.

    Savepoint statements are not: they are the test's wrapping transaction
    turning the service's ``atomic()`` into a savepoint (in production it is
    a real BEGIN/COMMIT, which Django does not log as queries either).
    """
    savepoint = ("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")
    return [q["sql"] for q in queries if not q["sql"].upper().startswith(savepoint)]


# --- POST /generations ---------------------------------------------------------


@pytest.mark.sqlite_smoke
def test_create_queues_a_generation_with_location_and_defaults(owner_api, owner_key):
    response = owner_api.post("generations", {"prompt": "a red fox"})

    assert response.status_code == HTTPStatus.CREATED
    body = response.json()
    assert set(body) == GENERATION_FIELDS
    assert response["Location"] == f"http://testserver/api/v1/generations/{body['id']}"
    assert body | {"id": None, "created_at": None} == {
        "id": None,
        "name": "",
        "prompt": "a red fox",
        "negative_prompt": None,
        "model": "sdxl",
        "width": 1024,
        "height": 1024,
        "steps": 20,
        "guidance": 7.5,
        "seed": None,
        "status": "queued",
        "prompt_id": None,
        "output_path": None,
        "thumbnail_path": None,
        "error_message": None,
        "created_at": None,
        "updated_at": None,
        "started_at": None,
        "completed_at": None,
        "duration_ms": None,
        "attempts": 0,
        "lease_expires_at": None,
        "webhook": None,
        "webhook_events_filter": ["start", "completed"],
    }
    stored = Generation.objects.get(pk=body["id"])
    assert stored.api_key == owner_key[0]
    assert body["created_at"].endswith("Z")


def test_create_stores_every_field_and_returns_guidance_rounded(owner_api):
    fields = {
        "name": "fox",
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "model": "sdxl-turbo",
        "width": 512,
        "height": 768,
        "steps": 30,
        "guidance": 7.55,  # real: reads back as 7.550000190734863
        "seed": 2**63 - 1,
    }
    created = owner_api.post("generations", fields).json()

    read = owner_api.get(f"generations/{created['id']}").json()
    assert {name: read[name] for name in fields} == fields
    with connection.cursor() as cursor:  # it really is a single-precision real
        cursor.execute(
            "SELECT guidance::float8 FROM generations WHERE id = %s", [created["id"]]
        )
        assert cursor.fetchone()[0] != 7.55


@pytest.mark.parametrize("path", ["generations", "generations/"], ids=["bare", "slash"])
def test_create_answers_with_and_without_trailing_slash(owner_api, path):
    response = owner_api.post(path, {"prompt": "p"})
    assert response.status_code == HTTPStatus.CREATED


@pytest.mark.sqlite_smoke
def test_idempotent_repeat_returns_the_original_with_200(owner_api):
    key = {"Idempotency-Key": "order-42"}
    first = owner_api.post("generations", {"prompt": "p"}, headers=key)
    again = owner_api.post("generations", {"prompt": "p"}, headers=key)

    assert first.status_code == HTTPStatus.CREATED
    assert again.status_code == HTTPStatus.OK
    assert again.json() == first.json()
    assert Generation.objects.count() == 1


def test_an_idempotency_key_reused_with_another_body_is_422_and_creates_nothing(
    owner_api,
):
    key = {"Idempotency-Key": "order-43"}
    cat = owner_api.post("generations", {"prompt": "a cat"}, headers=key)

    dog = owner_api.post("generations", {"prompt": "a dog"}, headers=key)

    assert cat.status_code == HTTPStatus.CREATED
    assert dog.status_code == HTTPStatus.UNPROCESSABLE_ENTITY
    assert dog.json()["code"] == "idempotency_key_reused"
    assert list(Generation.objects.values_list("prompt", flat=True)) == ["a cat"]


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({"prompt": "p"}, {"prompt": "p", "model": "sdxl", "width": 1024}),
        ({"prompt": "p", "guidance": 7.5}, {"prompt": "p", "guidance": 7.50}),
        ({"prompt": "p", "name": "fox"}, {"prompt": "p", "name": "  fox "}),
        ({"prompt": "p", "seed": None}, {"prompt": "p"}),
        ({"steps": 30, "prompt": "p"}, {"prompt": "p", "steps": 30}),
    ],
    ids=["omitted-equals-default", "same-number", "trimmed", "null", "key-order"],
)
def test_requests_equal_after_validation_are_the_same_idempotent_request(
    owner_api, first, again
):
    key = {"Idempotency-Key": "same-job"}
    created = owner_api.post("generations", first, headers=key)

    repeat = owner_api.post("generations", again, headers=key)

    assert (created.status_code, repeat.status_code) == (201, 200)
    assert repeat.json() == created.json()


@pytest.mark.parametrize(
    "change",
    [{"steps": 21}, {"name": "other"}, {"seed": 0}, {"guidance": 7.51}],
    ids=["steps", "name", "seed", "guidance"],
)
def test_any_field_that_differs_makes_another_request(owner_api, change):
    key = {"Idempotency-Key": "differs"}
    owner_api.post("generations", {"prompt": "p"}, headers=key)

    response = owner_api.post("generations", {"prompt": "p", **change}, headers=key)

    assert response.status_code == HTTPStatus.UNPROCESSABLE_ENTITY
    assert Generation.objects.count() == 1


def test_the_fingerprint_covers_every_field_of_the_create_request(owner_api):
    from generations.api import GenerationCreateSerializer
    from generations.models import REQUEST_FIELDS

    assert set(GenerationCreateSerializer().fields) == set(REQUEST_FIELDS)
    owner_api.post("generations", {"prompt": "p"}, headers={"Idempotency-Key": "k"})
    owner_api.post("generations", {"prompt": "p"})
    fingerprints = dict(
        Generation.objects.values_list("idempotency_key", "request_fingerprint")
    )
    assert len(fingerprints["k"]) == 64 and int(fingerprints["k"], 16) >= 0
    assert fingerprints[None] is None  # only kept with an Idempotency-Key


def test_idempotency_keys_are_per_api_key(owner_api, other_api):
    key = {"Idempotency-Key": "same"}
    mine = owner_api.post("generations", {"prompt": "p"}, headers=key)
    theirs = other_api.post("generations", {"prompt": "p"}, headers=key)

    assert (mine.status_code, theirs.status_code) == (HTTPStatus.CREATED,) * 2
    assert mine.json()["id"] != theirs.json()["id"]


@pytest.mark.sqlite_smoke
def test_idempotency_key_of_a_deleted_generation_is_a_conflict(owner_api):
    key = {"Idempotency-Key": "gone"}
    first = owner_api.post("generations", {"prompt": "p"}, headers=key).json()
    owner_api.delete(f"generations/{first['id']}")

    again = owner_api.post("generations", {"prompt": "p"}, headers=key)

    assert again.status_code == HTTPStatus.CONFLICT
    assert again.json()["code"] == "idempotency_key_reused"


# --- GET /generations ------------------------------------------------------------


def test_list_shows_own_generations_newest_first(owner_api, owner_key, other_key):
    mine = [make_generation(api_key=owner_key[0], prompt=f"p{i}") for i in range(3)]
    make_generation(api_key=other_key[0])

    body = owner_api.get("generations").json()

    assert [g["id"] for g in body["results"]] == [str(g.id) for g in reversed(mine)]
    assert body["next"] is None
    assert body["previous"] is None


@pytest.mark.sqlite_smoke
def test_admin_lists_every_generation(admin_api, owner_key, other_key):
    make_generation(api_key=owner_key[0])
    make_generation(api_key=other_key[0])
    make_generation(api_key=None)

    assert len(admin_api.get("generations").json()["results"]) == 3


def same_timestamp_rows(api_key, count: int) -> list[Generation]:
    """``count`` generations sharing one ``created_at`` (ties on the first key)."""
    rows = [make_generation(api_key=api_key, prompt=f"p{i}") for i in range(count)]
    # Copied in SQL, so the stored value keeps the database's own format.
    first = Generation.objects.filter(pk=rows[0].pk).values("created_at")[:1]
    Generation.objects.filter(pk__in=[r.pk for r in rows]).update(
        created_at=Subquery(first)
    )
    return rows


@pytest.mark.sqlite_smoke
def test_pages_walk_forward_and_back_without_gaps_or_repeats(owner_api, owner_key):
    rows = same_timestamp_rows(owner_key[0], 25)
    rows += [make_generation(api_key=owner_key[0]) for _ in range(20)]
    expected = [
        str(g.pk)
        for g in sorted(
            Generation.objects.filter(pk__in=[r.pk for r in rows]),
            key=lambda g: (g.created_at, g.id),
            reverse=True,
        )
    ]

    seen, pages, url = [], [], "generations?page_size=10&model=sdxl"
    while url:
        page = owner_api.get(url).json()
        pages.append(page)
        seen += [g["id"] for g in page["results"]]
        url = page["next"]

    assert seen == expected
    assert [len(p["results"]) for p in pages] == [10, 10, 10, 10, 5]
    assert pages[0]["next"].startswith("http://testserver/api/v1/generations?")
    assert "page_size=10" in pages[0]["next"]
    back = owner_api.get(pages[3]["previous"]).json()
    assert back["results"] == pages[2]["results"]
    first = owner_api.get(pages[1]["previous"]).json()
    assert first["results"] == pages[0]["results"]
    assert first["previous"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=queued", {"queued"}),
        ("status=cancelled", {"cancelled"}),
        ("model=flux", {"flux"}),
        ("status=queued&model=flux", {"queued flux"}),
    ],
    ids=["status", "other-status", "model", "both"],
)
def test_list_filters_by_status_name_and_model(owner_api, owner_key, query, expected):
    from generations.services import generation_cancel

    make_generation(api_key=owner_key[0], model="sdxl")
    make_generation(api_key=owner_key[0], model="flux")
    generation_cancel(generation=make_generation(api_key=owner_key[0], model="sdxl"))

    results = owner_api.get(f"generations?{query}").json()["results"]

    if "status=" in query and "model=" in query:
        assert {f"{g['status']} {g['model']}" for g in results} == expected
    elif "status=" in query:
        assert {g["status"] for g in results} == expected
    else:
        assert {g["model"] for g in results} == expected


@pytest.fixture
def deep_history(owner_key, other_key):
    """10,500 generations of the owner interleaved with as many of another key."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO generations (id, prompt, api_key_id, created_at) "
            "SELECT gen_random_uuid(), 'p', CASE WHEN i %% 2 = 0 THEN %s ELSE %s END,"
            " now() - i * interval '1 ms' FROM generate_series(1, 21000) AS i",
            [owner_key[0].pk, other_key[0].pk],
        )
        cursor.execute("ANALYZE generations")
    deep = Generation.objects.filter(api_key=owner_key[0]).order_by(
        "-created_at", "-id"
    )[10000]
    return Cursor(True, deep.created_at, deep.id).encode()


def list_plan(api, url: str) -> str:
    """EXPLAIN ANALYZE of the one query the list endpoint ran for ``url``."""
    with CaptureQueriesContext(connection) as queries:
        assert api.get(url).status_code == HTTPStatus.OK
    select = [q for q in counted(queries) if 'FROM "generations"' in q]
    assert len(select) == 1
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + select[0])
        return "\n".join(row[0] for row in cursor.fetchall())


def buffers(plan: str) -> int:
    line = next(x for x in plan.splitlines() if "Buffers:" in x)
    return sum(int(part.split("=")[1]) for part in line.split() if "=" in part)


def test_a_page_10000_rows_deep_costs_what_the_first_costs(owner_api, deep_history):
    first = list_plan(owner_api, "generations")
    deep = list_plan(owner_api, f"generations?cursor={deep_history}")

    for plan in (first, deep):
        assert "Index Scan" in plan
        assert "Seq Scan" not in plan
        assert not any(
            line.strip().startswith("->  Sort") for line in plan.splitlines()
        )
    assert buffers(deep) <= 2 * buffers(first) + 4, (first, deep)


def test_the_row_value_comparison_is_a_range_condition_of_the_key_index(
    owner_api, deep_history
):
    # Inside the test's transaction: the planner may prefer the seed index on
    # created_at for a key this dense; without it, the shape of the query must
    # let generations_key_list_idx do the whole job (no filter, no sort).
    with connection.cursor() as cursor:
        cursor.execute('DROP INDEX "generations_created_at_892fb5b0"')

    plan = list_plan(owner_api, f"generations?cursor={deep_history}")

    assert "Index Scan using generations_key_list_idx" in plan
    index_cond = next(line for line in plan.splitlines() if "Index Cond" in line)
    assert "ROW(created_at, id) < ROW(" in index_cond
    assert "Filter" not in plan
    assert "Sort" not in plan


# --- GET /generations/{id} ------------------------------------------------------


@pytest.mark.sqlite_smoke
def test_owner_reads_a_generation(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0], prompt="mine")
    response = owner_api.get(f"generations/{generation.pk}/")
    assert response.status_code == HTTPStatus.OK
    assert response.json()["prompt"] == "mine"


@pytest.mark.sqlite_smoke
def test_another_keys_generation_is_not_found(other_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    response = other_api.get(f"generations/{generation.pk}")
    assert response.status_code == HTTPStatus.NOT_FOUND
    assert response.json() == {"detail": "Not found."}


def test_deleted_generation_is_not_found(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    generation.delete()
    assert owner_api.get(f"generations/{generation.pk}").status_code == 404


def test_unknown_id_is_not_found(owner_api):
    assert owner_api.get(f"generations/{uuid.uuid4()}").status_code == 404


# --- PATCH /generations/{id} ------------------------------------------------------


def test_owner_renames_a_generation(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    response = owner_api.patch(f"generations/{generation.pk}", {"name": "new"})

    assert response.status_code == HTTPStatus.OK
    assert response.json()["name"] == "new"
    assert response.json()["updated_at"] is not None
    assert Generation.objects.get(pk=generation.pk).name == "new"


def test_owner_may_not_set_prompt_id(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    response = owner_api.patch(
        f"generations/{generation.pk}", {"name": "n", "prompt_id": "comfy-1"}
    )

    assert response.status_code == HTTPStatus.FORBIDDEN
    assert Generation.objects.get(pk=generation.pk).name == ""


def test_admin_sets_name_and_prompt_id(admin_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    response = admin_api.patch(
        f"generations/{generation.pk}", {"name": "n", "prompt_id": "comfy-1"}
    )

    assert response.status_code == HTTPStatus.OK
    assert (response.json()["name"], response.json()["prompt_id"]) == ("n", "comfy-1")


@pytest.mark.parametrize(
    ("by_admin", "fields"),
    [
        (False, {"name": "n", "prompt_id": "comfy-1"}),
        (True, {"prompt": "something else"}),
        (True, {"status": Status.COMPLETED}),
    ],
    ids=["owner-prompt_id", "admin-prompt", "admin-status"],
)
def test_the_update_service_refuses_what_the_caller_may_not_change(
    owner_key, by_admin, fields
):
    generation = make_generation(api_key=owner_key[0])
    before = Generation.objects.values().get(pk=generation.pk)

    with pytest.raises(FieldNotEditable):
        generation_update(generation=generation, by_admin=by_admin, **fields)

    assert Generation.objects.values().get(pk=generation.pk) == before


# --- DELETE /generations/{id} -----------------------------------------------------


def test_delete_is_soft_and_hides_the_generation(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])

    response = owner_api.delete(f"generations/{generation.pk}")

    assert response.status_code == HTTPStatus.NO_CONTENT
    assert response.content == b""
    stored = Generation.all_objects.get(pk=generation.pk)
    assert stored.is_deleted
    assert stored.deleted_at is not None
    assert owner_api.delete(f"generations/{generation.pk}").status_code == 404
    assert owner_api.get("generations").json()["results"] == []


def test_deleting_a_running_job_cancels_it_so_its_worker_stops(
    owner_api, owner_key, admin_api
):
    generation = make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()
    assert claimed["id"] == str(generation.pk)

    assert owner_api.delete(f"generations/{generation.pk}").status_code == 204

    stored = Generation.all_objects.get(pk=generation.pk)
    assert (stored.is_deleted, stored.status) == (True, Status.CANCELLED)
    assert stored.lease_expires_at is None
    assert str(stored.lease_token) == claimed["lease_token"]  # its holder's, kept
    heartbeat = admin_api.post(f"generations/{generation.pk}/heartbeat", lease(claimed))
    assert heartbeat.status_code == HTTPStatus.NOT_FOUND


def test_deleting_a_finished_job_keeps_its_status(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    owner_api.post(f"generations/{generation.pk}/cancel")
    cancelled_at = Generation.objects.get(pk=generation.pk).completed_at

    assert owner_api.delete(f"generations/{generation.pk}").status_code == 204

    stored = Generation.all_objects.get(pk=generation.pk)
    assert (stored.status, stored.completed_at) == (Status.CANCELLED, cancelled_at)


# --- POST /generations/{id}/cancel -----------------------------------------------


def test_cancel_a_queued_generation(owner_api, owner_key):
    generation = make_generation(api_key=owner_key[0])
    response = owner_api.post(f"generations/{generation.pk}/cancel")

    assert response.status_code == HTTPStatus.OK
    assert response.json()["status"] == "cancelled"
    assert response.json()["completed_at"] is not None


def test_cancelling_a_terminal_generation_is_a_conflict_naming_the_status(
    owner_api, owner_key
):
    generation = make_generation(api_key=owner_key[0])
    owner_api.post(f"generations/{generation.pk}/cancel")

    response = owner_api.post(f"generations/{generation.pk}/cancel/")

    assert response.status_code == HTTPStatus.CONFLICT
    assert response.json() == {
        "detail": "Cannot cancel a generation that is cancelled.",
        "code": "invalid_transition",
        "status": "cancelled",
    }


# --- Workers: claim, heartbeat, complete, fail -----------------------------------


def lease(claimed: dict, **body) -> dict:
    """A worker request body: the claim's fencing token, plus ``body``."""
    return {"lease_token": claimed["lease_token"], **body}


def test_claim_hands_out_the_oldest_queued_job(admin_api, owner_key):
    oldest = make_generation(api_key=owner_key[0], prompt="first")
    make_generation(api_key=owner_key[0], prompt="second")

    response = admin_api.post("generations/claim")

    assert response.status_code == HTTPStatus.OK
    (body,) = response.json()["jobs"]
    assert body["id"] == str(oldest.pk)
    assert body["status"] == "running"
    assert body["attempts"] == 1
    assert body["started_at"] is not None
    assert body["lease_expires_at"] > body["started_at"]
    assert set(body) == GENERATION_FIELDS | {"claimed_by", "lease_token"}
    assert str(uuid.UUID(body["lease_token"])) == body["lease_token"]
    assert Generation.objects.get(pk=oldest.pk).lease_token == uuid.UUID(
        body["lease_token"]
    )


def test_claim_with_nothing_queued_is_204(admin_api):
    response = admin_api.post("generations/claim/")
    assert response.status_code == HTTPStatus.NO_CONTENT
    assert response.content == b""


def test_heartbeat_extends_the_lease(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()
    Generation.objects.filter(pk=claimed["id"]).update(lease_expires_at=Now())

    response = admin_api.post(f"generations/{claimed['id']}/heartbeat", lease(claimed))

    assert response.status_code == HTTPStatus.OK
    assert response.json()["status"] == "running"
    assert response.json()["lease_token"] == claimed["lease_token"]
    expires = Generation.objects.get(pk=claimed["id"]).lease_expires_at
    assert expires > Generation.objects.get(pk=claimed["id"]).started_at + timedelta(
        seconds=1
    )


def test_heartbeat_tells_the_worker_its_job_was_cancelled(
    admin_api, owner_api, owner_key
):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()
    owner_api.post(f"generations/{claimed['id']}/cancel")

    response = admin_api.post(f"generations/{claimed['id']}/heartbeat", lease(claimed))

    assert response.status_code == HTTPStatus.OK
    assert response.json()["status"] == "cancelled"
    # The holder's own token: it was never in another answer than the claim's.
    assert response.json()["lease_token"] == claimed["lease_token"]

    stranger = admin_api.post(
        f"generations/{claimed['id']}/heartbeat", {"lease_token": str(uuid.uuid4())}
    )
    assert stranger.status_code == HTTPStatus.CONFLICT
    assert stranger.json()["code"] == "lease_lost"
    assert "prompt" not in stranger.json()


@pytest.mark.parametrize("verb", ["heartbeat", "complete", "fail"])
def test_a_token_for_a_job_never_claimed_is_lease_lost(admin_api, owner_key, verb):
    generation = make_generation(api_key=owner_key[0])
    response = admin_api.post(
        f"generations/{generation.pk}/{verb}",
        {"lease_token": str(uuid.uuid4()), "output_path": "o"}
        if verb == "complete"
        else {"lease_token": str(uuid.uuid4())},
    )
    assert response.status_code == HTTPStatus.CONFLICT
    assert response.json()["code"] == "lease_lost"
    assert Generation.objects.get(pk=generation.pk).status == Status.QUEUED


def test_complete_records_the_outputs_and_the_duration(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()

    response = admin_api.post(
        f"generations/{claimed['id']}/complete",
        lease(
            claimed,
            output_path="out/1.png",
            thumbnail_path="t/1.png",
            prompt_id="c-9",
        ),
    )

    assert response.status_code == HTTPStatus.OK
    body = response.json()
    assert body["status"] == "completed"
    assert (body["output_path"], body["thumbnail_path"], body["prompt_id"]) == (
        "out/1.png",
        "t/1.png",
        "c-9",
    )
    assert body["completed_at"] is not None
    assert body["duration_ms"] >= 0
    assert body["lease_expires_at"] is None
    assert "lease_token" not in body
    assert Generation.objects.get(pk=claimed["id"]).lease_token is None


def test_complete_needs_an_output_path(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()

    response = admin_api.post(f"generations/{claimed['id']}/complete", lease(claimed))

    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert "output_path" in response.json()
    assert Generation.objects.get(pk=claimed["id"]).status == Status.RUNNING


@pytest.mark.parametrize("verb", ["complete", "fail"])
def test_finishing_a_job_cancelled_meanwhile_is_an_invalid_transition(
    admin_api, owner_api, owner_key, verb
):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()
    owner_api.post(f"generations/{claimed['id']}/cancel")
    before = Generation.objects.values().get(pk=claimed["id"])

    response = admin_api.post(
        f"generations/{claimed['id']}/{verb}",
        lease(claimed, output_path="x") if verb == "complete" else lease(claimed),
    )

    assert response.status_code == HTTPStatus.CONFLICT
    assert response.json()["code"] == "invalid_transition"
    assert response.json()["status"] == "cancelled"
    assert Generation.objects.values().get(pk=claimed["id"]) == before


def test_fail_records_the_error(admin_api, owner_key):
    make_generation(api_key=owner_key[0])
    claimed = admin_api.claim_one()

    response = admin_api.post(
        f"generations/{claimed['id']}/fail",
        lease(claimed, error_message="CUDA out of memory"),
    )

    assert response.status_code == HTTPStatus.OK
    assert response.json()["status"] == "failed"
    assert response.json()["error_message"] == "CUDA out of memory"


# --- Permissions: none / other / owner / worker / admin × endpoint --------------

CALLERS = ("none", "other", "owner", "worker", "admin")
ENDPOINTS = {
    # name: (method, path template, body, expected per caller)
    "create": ("POST", "generations", {"prompt": "p"}, (401, 201, 201, 403, 201)),
    "list": ("GET", "generations", None, (401, 200, 200, 403, 200)),
    "retrieve": ("GET", "generations/{id}", None, (401, 404, 200, 403, 200)),
    "patch-name": (
        "PATCH",
        "generations/{id}",
        {"name": "n"},
        (401, 404, 200, 403, 200),
    ),
    "patch-prompt-id": (
        "PATCH",
        "generations/{id}",
        {"prompt_id": "c"},
        (401, 404, 403, 403, 200),
    ),
    "delete": ("DELETE", "generations/{id}", None, (401, 404, 204, 403, 204)),
    "cancel": ("POST", "generations/{id}/cancel", None, (401, 404, 200, 403, 200)),
    "claim": ("POST", "generations/claim", None, (401, 403, 403, 200, 200)),
    "heartbeat": (
        "POST",
        "generations/{running}/heartbeat",
        {"lease_token": "{token}"},
        (401, 403, 403, 200, 200),
    ),
    "complete": (
        "POST",
        "generations/{running}/complete",
        {"lease_token": "{token}", "output_path": "o.png"},
        (401, 403, 403, 200, 200),
    ),
    "fail": (
        "POST",
        "generations/{running}/fail",
        {"lease_token": "{token}"},
        (401, 403, 403, 200, 200),
    ),
    "keys-list": ("GET", "keys", None, (401, 403, 403, 403, 200)),
    "keys-create": ("POST", "keys", {"name": "k"}, (401, 403, 403, 403, 201)),
    "keys-retrieve": ("GET", "keys/{key}", None, (401, 403, 403, 403, 200)),
    "keys-revoke": ("POST", "keys/{key}/revoke", None, (401, 403, 403, 403, 200)),
    "keys-delete": ("DELETE", "keys/{key}", None, (401, 403, 403, 403, 204)),
    "keys-me": ("GET", "keys/me", None, (401, 200, 200, 200, 200)),
}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_permissions(
    endpoint, caller, api_as, owner_key, other_key, worker_key, admin_key
):
    from tests.factories import make_api_key

    method, template, body, expected = ENDPOINTS[endpoint]
    generation = make_generation(api_key=owner_key[0])
    running = make_generation(api_key=owner_key[0])
    Generation.objects.filter(pk=running.pk).transition(
        Status.RUNNING, lease_seconds=60
    )
    target_key, _ = make_api_key(name="target")
    raw = {
        "none": None,
        "other": other_key[1],
        "owner": owner_key[1],
        "worker": worker_key[1],
        "admin": admin_key[1],
    }[caller]
    path = template.format(id=generation.pk, running=running.pk, key=target_key.pk)
    token = str(Generation.objects.get(pk=running.pk).lease_token)
    if body:
        body = {name: value.replace("{token}", token) for name, value in body.items()}

    response = api_as(raw).request(method, path, body)

    assert response.status_code == expected[CALLERS.index(caller)], response.content
    if response.status_code == HTTPStatus.UNAUTHORIZED:
        assert response["WWW-Authenticate"] == 'Bearer realm="lockngen"'
    if response.content:
        assert response["Content-Type"] == "application/json"


# --- Query budget (SPEC §9; SAVEPOINT/RELEASE not counted) -----------------------


@pytest.fixture
def warm_owner(owner_api):
    """The key's ``last_used_at`` was just written: requests now skip that write."""
    owner_api.get("keys/me")
    return owner_api


def test_retrieve_costs_two_queries(warm_owner, owner_key):
    generation = make_generation(api_key=owner_key[0])
    with CaptureQueriesContext(connection) as queries:
        assert warm_owner.get(f"generations/{generation.pk}").status_code == 200
    assert len(counted(queries)) <= 2, counted(queries)


def test_list_costs_two_queries(warm_owner, owner_key):
    for _ in range(3):
        make_generation(api_key=owner_key[0])
    first = warm_owner.get("generations?page_size=2").json()
    with CaptureQueriesContext(connection) as queries:
        assert warm_owner.get(first["next"] + "&status=queued").status_code == 200
    assert len(counted(queries)) <= 2, counted(queries)


@pytest.mark.parametrize("idempotency", [False, True], ids=["plain", "idempotent"])
def test_create_costs_at_most_three_queries(warm_owner, idempotency):
    headers = {"Idempotency-Key": "budget"} if idempotency else {}
    for expected in (HTTPStatus.CREATED, HTTPStatus.OK if idempotency else 201):
        with CaptureQueriesContext(connection) as queries:
            response = warm_owner.post("generations", {"prompt": "p"}, headers=headers)
        assert response.status_code == expected
        assert len(counted(queries)) <= 3, counted(queries)


def test_read_path_writes_nothing(warm_owner, owner_key):
    generation = make_generation(api_key=owner_key[0])
    with CaptureQueriesContext(connection) as queries:
        warm_owner.get(f"generations/{generation.pk}")
    assert all(q.lstrip().upper().startswith("SELECT") for q in counted(queries))

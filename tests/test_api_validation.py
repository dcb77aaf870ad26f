"""Bad input of any kind is a 400 with DRF-shaped errors and writes nothing."""

from __future__ import annotations

import base64
import json
from http import HTTPStatus

import pytest

from apikeys.models import ApiKey
from generations.models import Generation
from tests.factories import make_generation

GOOD = {"prompt": "a lighthouse"}


def with_(**fields):
    return json.dumps(GOOD | fields)


def crafted_cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# (id, method, path, body, headers, field the error names)
CASES = [
    # create: wrong JSON types
    ("width-string", "POST", "generations", with_(width="abc"), {}, "width"),
    ("width-numeric-string", "POST", "generations", with_(width="1024"), {}, "width"),
    ("width-bool", "POST", "generations", with_(width=True), {}, "width"),
    ("width-float", "POST", "generations", with_(width=512.5), {}, "width"),
    ("width-integral-float", "POST", "generations", with_(width=1024.0), {}, "width"),
    ("steps-null", "POST", "generations", with_(steps=None), {}, "steps"),
    ("seed-float", "POST", "generations", with_(seed=1.5), {}, "seed"),
    ("guidance-string", "POST", "generations", with_(guidance="7"), {}, "guidance"),
    ("guidance-bool", "POST", "generations", with_(guidance=True), {}, "guidance"),
    ("prompt-number", "POST", "generations", json.dumps({"prompt": 5}), {}, "prompt"),
    ("prompt-object", "POST", "generations", json.dumps({"prompt": {}}), {}, "prompt"),
    ("name-list", "POST", "generations", with_(name=["x"]), {}, "name"),
    # create: out of range
    ("width-too-small", "POST", "generations", with_(width=56), {}, "width"),
    ("width-too-big", "POST", "generations", with_(width=4104), {}, "width"),
    ("width-not-multiple-of-8", "POST", "generations", with_(width=100), {}, "width"),
    ("height-zero", "POST", "generations", with_(height=0), {}, "height"),
    ("steps-zero", "POST", "generations", with_(steps=0), {}, "steps"),
    ("steps-151", "POST", "generations", with_(steps=151), {}, "steps"),
    ("guidance-negative", "POST", "generations", with_(guidance=-0.5), {}, "guidance"),
    ("guidance-30.01", "POST", "generations", with_(guidance=30.01), {}, "guidance"),
    (
        "guidance-3-decimals",
        "POST",
        "generations",
        with_(guidance=7.555),
        {},
        "guidance",
    ),
    ("guidance-tiny", "POST", "generations", with_(guidance=1e-7), {}, "guidance"),
    ("seed-negative", "POST", "generations", with_(seed=-1), {}, "seed"),
    ("seed-above-bigint", "POST", "generations", with_(seed=2**63), {}, "seed"),
    ("seed-huge", "POST", "generations", with_(seed=10**40), {}, "seed"),
    # create: strings
    ("prompt-missing", "POST", "generations", json.dumps({"name": "n"}), {}, "prompt"),
    ("prompt-empty", "POST", "generations", json.dumps({"prompt": ""}), {}, "prompt"),
    ("prompt-blank", "POST", "generations", json.dumps({"prompt": "  "}), {}, "prompt"),
    ("prompt-null", "POST", "generations", json.dumps({"prompt": None}), {}, "prompt"),
    ("prompt-4001", "POST", "generations", with_(prompt="x" * 4001), {}, "prompt"),
    (
        "negative-4001",
        "POST",
        "generations",
        with_(negative_prompt="x" * 4001),
        {},
        "negative_prompt",
    ),
    ("name-256", "POST", "generations", with_(name="x" * 256), {}, "name"),
    ("model-101", "POST", "generations", with_(model="m" * 101), {}, "model"),
    ("model-empty", "POST", "generations", with_(model=""), {}, "model"),
    ("prompt-nul", "POST", "generations", with_(prompt="a\u0000b"), {}, "prompt"),
    ("name-nul", "POST", "generations", with_(name="\u0000"), {}, "name"),
    ("unknown-field", "POST", "generations", with_(colour="red"), {}, "colour"),
    (
        "unknown-nul-field",
        "POST",
        "generations",
        with_(**{"a\u0000": 1}),
        {},
        "a\u0000",
    ),
    # create: the body itself
    ("body-list", "POST", "generations", "[]", {}, "non_field_errors"),
    ("body-string", "POST", "generations", '"prompt"', {}, "non_field_errors"),
    ("body-null", "POST", "generations", "null", {}, "non_field_errors"),
    ("json-malformed", "POST", "generations", '{"prompt": ', {}, "detail"),
    ("json-trailing-comma", "POST", "generations", '{"prompt": "p",}', {}, "detail"),
    (
        "json-nan",
        "POST",
        "generations",
        '{"prompt": "p", "guidance": NaN}',
        {},
        "detail",
    ),
    ("json-not-utf8", "POST", "generations", b'{"prompt": "\xff\xfe"}', {}, "detail"),
    ("json-raw-nul", "POST", "generations", b'{"prompt": "a\x00b"}', {}, "detail"),
    ("empty-body", "POST", "generations", b"", {}, "prompt"),
    # create: the Idempotency-Key header
    (
        "idempotency-101",
        "POST",
        "generations",
        with_(),
        {"Idempotency-Key": "k" * 101},
        "Idempotency-Key",
    ),
    (
        "idempotency-empty",
        "POST",
        "generations",
        with_(),
        {"Idempotency-Key": ""},
        "Idempotency-Key",
    ),
    (
        "idempotency-control",
        "POST",
        "generations",
        with_(),
        {"Idempotency-Key": "a\tb"},
        "Idempotency-Key",
    ),
    # list: query parameters
    ("status-unknown", "GET", "generations?status=done", None, {}, "status"),
    ("status-number", "GET", "generations?status=0", None, {}, "status"),
    ("status-nul", "GET", "generations?status=%00", None, {}, "status"),
    ("model-nul", "GET", "generations?model=sd%00xl", None, {}, "model"),
    ("model-too-long", "GET", "generations?model=" + "m" * 101, None, {}, "model"),
    ("cursor-garbage", "GET", "generations?cursor=garbage!", None, {}, "cursor"),
    ("cursor-nul", "GET", "generations?cursor=%00", None, {}, "cursor"),
    (
        "cursor-bad-date",
        "GET",
        "generations?cursor=" + crafted_cursor("n|yesterday|" + "0" * 32),
        None,
        {},
        "cursor",
    ),
    (
        "cursor-naive-date",
        "GET",
        "generations?cursor=" + crafted_cursor("n|2026-01-01T00:00:00|" + "0" * 32),
        None,
        {},
        "cursor",
    ),
    (
        "cursor-date-out-of-range",
        "GET",
        "generations?cursor="
        + crafted_cursor("n|0001-01-01T00:00:00+01:00|" + "0" * 32),
        None,
        {},
        "cursor",
    ),
    (
        "cursor-bad-id",
        "GET",
        "generations?cursor=" + crafted_cursor("n|2026-01-01T00:00:00+00:00|x"),
        None,
        {},
        "cursor",
    ),
    (
        "cursor-bad-direction",
        "GET",
        "generations?cursor="
        + crafted_cursor("x|2026-01-01T00:00:00+00:00|" + "0" * 32),
        None,
        {},
        "cursor",
    ),
    ("page-size-0", "GET", "generations?page_size=0", None, {}, "page_size"),
    ("page-size-101", "GET", "generations?page_size=101", None, {}, "page_size"),
    ("page-size-text", "GET", "generations?page_size=ten", None, {}, "page_size"),
    ("page-size-negative", "GET", "generations?page_size=-1", None, {}, "page_size"),
    (
        "page-size-unicode-digit",
        "GET",
        "generations?page_size=%D9%A3",
        None,
        {},
        "page_size",
    ),
    # ids in the path
    ("id-not-uuid", "GET", "generations/not-a-uuid", None, {}, "id"),
    ("id-nul", "GET", "generations/%00", None, {}, "id"),
    (
        "id-nul-in-uuid",
        "DELETE",
        "generations/0000%000-0000-0000-0000-000000000000",
        None,
        {},
        "id",
    ),
    ("cancel-id-not-uuid", "POST", "generations/123/cancel", None, {}, "id"),
    ("key-id-not-uuid", "GET", "keys/123", None, {}, "id"),
    # patch, complete, fail
    (
        "patch-name-256",
        "PATCH",
        "generations/{id}",
        json.dumps({"name": "n" * 256}),
        {},
        "name",
    ),
    (
        "patch-name-number",
        "PATCH",
        "generations/{id}",
        json.dumps({"name": 1}),
        {},
        "name",
    ),
    (
        "patch-prompt-id-101",
        "PATCH",
        "generations/{id}",
        json.dumps({"prompt_id": "p" * 101}),
        {},
        "prompt_id",
    ),
    (
        "patch-read-only-field",
        "PATCH",
        "generations/{id}",
        json.dumps({"status": "completed"}),
        {},
        "status",
    ),
    (
        "complete-missing-output",
        "POST",
        "generations/{running}/complete",
        "{}",
        {},
        "output_path",
    ),
    (
        "complete-null-output",
        "POST",
        "generations/{running}/complete",
        json.dumps({"output_path": None}),
        {},
        "output_path",
    ),
    (
        "complete-output-501",
        "POST",
        "generations/{running}/complete",
        json.dumps({"output_path": "o" * 501}),
        {},
        "output_path",
    ),
    (
        "fail-error-2001",
        "POST",
        "generations/{running}/fail",
        json.dumps({"error_message": "e" * 2001}),
        {},
        "error_message",
    ),
    (
        "heartbeat-no-token",
        "POST",
        "generations/{running}/heartbeat",
        "{}",
        {},
        "lease_token",
    ),
    (
        "complete-token-not-a-uuid",
        "POST",
        "generations/{running}/complete",
        json.dumps({"lease_token": "lease-1", "output_path": "o.png"}),
        {},
        "lease_token",
    ),
    (
        "fail-token-a-number",
        "POST",
        "generations/{running}/fail",
        json.dumps({"lease_token": 7}),
        {},
        "lease_token",
    ),
    # keys
    ("key-name-missing", "POST", "keys", "{}", {}, "name"),
    ("key-name-blank", "POST", "keys", json.dumps({"name": ""}), {}, "name"),
    (
        "key-admin-string",
        "POST",
        "keys",
        json.dumps({"name": "k", "is_admin": "true"}),
        {},
        "is_admin",
    ),
    (
        "key-rate-negative",
        "POST",
        "keys",
        json.dumps({"name": "k", "rate_limit": -1}),
        {},
        "rate_limit",
    ),
    (
        "key-rate-above-int",
        "POST",
        "keys",
        json.dumps({"name": "k", "rate_limit": 2**31}),
        {},
        "rate_limit",
    ),
    (
        "key-expires-garbage",
        "POST",
        "keys",
        json.dumps({"name": "k", "expires_at": "soon"}),
        {},
        "expires_at",
    ),
    (
        "key-expires-past",
        "POST",
        "keys",
        json.dumps({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}),
        {},
        "expires_at",
    ),
]


def row_counts() -> tuple[int, int]:
    return Generation.all_objects.count(), ApiKey.all_objects.count()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "field"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_is_400_and_writes_nothing(
    admin_api, admin_key, method, path, body, headers, field
):
    from generations.models import Status

    queued = make_generation(api_key=admin_key[0])
    running = make_generation(api_key=admin_key[0])
    Generation.objects.filter(pk=running.pk).transition(
        Status.RUNNING, lease_seconds=60
    )
    if "{running}" in path and field != "lease_token":
        # The holder's real token: the named field is the only thing wrong.
        token = Generation.objects.get(pk=running.pk).lease_token
        body = json.dumps({**json.loads(body), "lease_token": str(token)})
    snapshot = list(Generation.all_objects.order_by("id").values())
    before = row_counts()

    response = admin_api.request(
        method, path.format(id=queued.pk, running=running.pk), body, headers=headers
    )

    assert response.status_code == HTTPStatus.BAD_REQUEST, response.content
    assert response["Content-Type"] == "application/json"
    errors = response.json()
    assert field in errors, errors
    assert isinstance(errors[field], list | str)
    assert row_counts() == before
    assert list(Generation.all_objects.order_by("id").values()) == snapshot


def test_form_bodies_are_415(owner_api):
    response = owner_api.post(
        "generations", "prompt=p", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert response["Content-Type"] == "application/json"
    assert Generation.all_objects.count() == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 64),
        ("width", 4096),
        ("steps", 1),
        ("steps", 150),
        ("guidance", 0),
        ("guidance", 30),
        ("guidance", 12.25),
        ("seed", 0),
        ("seed", 2**63 - 1),
        ("prompt", "x" * 4000),
        ("negative_prompt", None),
        ("seed", None),
    ],
    ids=lambda value: str(value)[:12],
)
def test_values_at_the_limits_are_accepted(owner_api, field, value):
    response = owner_api.post("generations", GOOD | {field: value})
    assert response.status_code == HTTPStatus.CREATED, response.content
    assert response.json()[field] == value

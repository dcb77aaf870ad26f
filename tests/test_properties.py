"""Properties (hypothesis) of input validation and of the status machine.

Validation goes through the real HTTP stack (Django's test client, real
PostgreSQL): whatever ``POST /api/v1/generations`` accepts is stored and reads
back equal to what was sent, and whatever it refuses writes nothing. The
status machine is driven through the services with random sequences of
actions (create, claim, heartbeat, complete, fail, cancel, delete, lease
expiry, and a stalled worker's heartbeat / complete with an earlier claim's
lease token) and compared after every step with a small model of SPEC §3.

Examples are bounded and derandomized: the same run every time, a few
seconds in all.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from http import HTTPStatus
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apikeys.models import ApiKey
from generations.models import TRANSITIONS, Generation, InvalidTransition, Status
from generations.services import (
    LeaseLost,
    generation_cancel,
    generation_complete,
    generation_create,
    generation_fail,
    generation_heartbeat,
)
from tests.factories import claim_one, make_api_key

pytestmark = pytest.mark.django_db

PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SEED_MAX = 2**63 - 1
MISSING = object()


class RolledBack(Exception):
    """Raised to undo one example's writes (the test's transaction stays)."""


# --- Validation: POST /api/v1/generations ----------------------------------------

JUNK_STRINGS = ["", "   ", "\t\n", "a\x00b", "\x00", "bad \ud800 surrogate"]
JUNK_NUMBERS = [
    True,
    False,
    "12",
    "7.5",
    [],
    {},
    1e400,  # JSON's 1e400 is inf in Python
    10**400,
    -(10**400),
    2**63,
    -1,
    0.1 + 0.2,
]


def text(max_size: int) -> st.SearchStrategy[str]:
    # Any code point but surrogates (JSON cannot carry them as UTF-8 either).
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=max_size)


def junk(*extra: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from([*JUNK_STRINGS, *JUNK_NUMBERS, None, *extra])


def two_decimals() -> st.SearchStrategy[float]:
    return st.integers(0, 3000).map(lambda cents: cents / 100)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(text(300), junk("x" * 256, " " + "y" * 255 + " ")),
    "prompt": st.one_of(text(50), junk("p" * 4000, "p" * 4001, " " * 5 + "p" * 4000)),
    "negative_prompt": st.one_of(text(50), junk("n" * 4001)),
    "model": st.one_of(text(110), junk("m" * 100, "m" * 101)),
    "width": st.one_of(st.integers(0, 5000), junk(64, 4096, 4104, 1024.0)),
    "height": st.one_of(st.integers(0, 5000), junk(63, 8, 4088)),
    "steps": st.one_of(st.integers(-2, 160), junk(1, 150, 151, 0)),
    "guidance": st.one_of(
        two_decimals(),
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.integers(-5, 40),
        junk(30, 30.0, 30.01, 7.555, 1e-5, -0.0),
    ),
    "seed": st.one_of(
        st.integers(-(2**64), 2**64),
        junk(0, SEED_MAX, SEED_MAX + 1, 2**31),
    ),
}

create_bodies = st.fixed_dictionaries(
    {},
    optional={name: strategy for name, strategy in FIELDS.items()},
)


def is_text(value: Any, *, low: int, high: int) -> bool:
    """DRF's CharField as configured: trimmed, no NUL, no surrogates."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        return False
    return low <= len(value.strip()) <= high


def is_int(value: Any, low: int, high: int, *, multiple: int = 1) -> bool:
    return type(value) is int and low <= value <= high and value % multiple == 0


def is_guidance(value: Any) -> bool:
    if type(value) not in (int, float):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    if not (math.isfinite(number) and 0 <= number <= 30):
        return False
    exponent = Decimal(repr(number)).as_tuple().exponent
    return isinstance(exponent, int) and exponent >= -2


def field_is_valid(name: str, value: Any) -> bool:
    """The contract (SPEC §3/§5), written independently of the serializers."""
    match name:
        case "name":
            return is_text(value, low=0, high=255)
        case "prompt":
            return is_text(value, low=1, high=4000)
        case "negative_prompt":
            return value is None or is_text(value, low=0, high=4000)
        case "model":
            return is_text(value, low=1, high=100)
        case "width" | "height":
            return is_int(value, 64, 4096, multiple=8)
        case "steps":
            return is_int(value, 1, 150)
        case "guidance":
            return is_guidance(value)
        case "seed":
            return value is None or is_int(value, 0, SEED_MAX)
    raise AssertionError(name)


def expected_value(name: str, value: Any) -> Any:
    """What reads back: strings trimmed (DRF), guidance rounded to 2 decimals."""
    if isinstance(value, str):
        return value.strip()
    if name == "guidance":
        return round(float(value), 2)
    return value


DEFAULTS = {
    "name": "",
    "negative_prompt": None,
    "model": "sdxl",
    "width": 1024,
    "height": 1024,
    "steps": 20,
    "guidance": 7.5,
    "seed": None,
}


def table_counts() -> tuple[int, int]:
    return Generation.all_objects.count(), ApiKey.all_objects.count()


@pytest.fixture
def client_key():
    _, raw = make_api_key(name="property client", rate_limit=0)
    return raw


@PROPERTY_SETTINGS
@given(body=create_bodies)
def test_create_stores_what_it_accepts_and_writes_nothing_when_it_refuses(
    client_key, body
):
    client = Client(headers={"Authorization": f"Bearer {client_key}"})
    valid = "prompt" in body and all(
        field_is_valid(name, value) for name, value in body.items()
    )
    before = table_counts()

    response = client.post(
        "/api/v1/generations", json.dumps(body), content_type="application/json"
    )

    assert response["Content-Type"].startswith("application/json")
    if not valid:
        assert response.status_code == HTTPStatus.BAD_REQUEST, response.content
        assert table_counts() == before
        return
    assert response.status_code == HTTPStatus.CREATED, response.content
    created = response.json()
    read_back = client.get(f"/api/v1/generations/{created['id']}").json()
    stored = Generation.objects.get(pk=created["id"])
    assert read_back == created
    assert table_counts() == (before[0] + 1, before[1])
    for name in FIELDS:
        value = body.get(name, MISSING)
        if value is MISSING:
            expected = DEFAULTS.get(name)
        else:
            expected = expected_value(name, value)
        assert read_back[name] == expected, name
        in_db = getattr(stored, name)
        if name == "guidance":  # real: 7.55 is 7.550000190734863 in the table
            assert math.isclose(in_db, expected, abs_tol=1e-5)
        else:
            assert in_db == expected, name
    assert read_back["status"] == "queued"
    assert read_back["attempts"] == 0


EDGE_VALUES = [
    *JUNK_STRINGS,
    *JUNK_NUMBERS,
    None,
    "x" * 4001,
    0,
    8,
    64,
    4096,
    4104,
    30,
    30.01,
    7.555,
    -0.0,
    SEED_MAX,
    SEED_MAX + 1,
]


def test_every_edge_value_in_every_field_is_stored_or_refused_cleanly(client_key):
    """The sweep behind the property: each edge value alone in each field."""
    client = Client(headers={"X-API-Key": client_key})
    wrong = []
    for name in FIELDS:
        for value in EDGE_VALUES:
            body = {"prompt": "a fox", name: value}
            expected = (
                HTTPStatus.CREATED
                if field_is_valid(name, value)
                else HTTPStatus.BAD_REQUEST
            )
            before = table_counts()
            response = client.post(
                "/api/v1/generations", json.dumps(body), content_type="application/json"
            )
            written = table_counts()[0] - before[0]
            if (response.status_code, written) != (expected, expected == 201):
                wrong.append((name, value, response.status_code, written))
    assert wrong == []


# --- Status machine: random action sequences through the services -------------

MAX_ATTEMPTS = 2
JOBS = 4  # actions address jobs by index modulo the jobs created so far


@dataclass
class Job:
    """What SPEC §3 says one generation must look like now."""

    pk: Any
    status: Status = Status.QUEUED
    attempts: int = 0
    expired_order: int | None = None  # set while its lease is in the past
    deleted: bool = False
    frozen: dict[str, Any] | None = None  # the row when it became terminal
    tokens: list[Any] = field(default_factory=list)  # one per claim, newest last
    kept: Any = None  # the holder's token a cancel of the running job kept

    def token(self, *, stale: bool) -> Any:
        """The newest claim's lease token, or (stale) one an earlier claim had."""
        if stale:
            return self.tokens[-2] if len(self.tokens) > 1 else uuid.uuid4()
        return self.tokens[-1] if self.tokens else uuid.uuid4()


@dataclass
class Model:
    jobs: list[Job] = field(default_factory=list)
    expiries: int = 0

    def job(self, index: int) -> Job | None:
        return self.jobs[index % len(self.jobs)] if self.jobs else None

    def claim(self) -> tuple[Job | None, list[Job]]:
        """The job claim_next must hand out, and those it must fail first."""
        failed: list[Job] = []
        expired = sorted(
            (
                job
                for job in self.jobs
                if job.status == Status.RUNNING
                and job.expired_order is not None
                and not job.deleted
            ),
            key=lambda job: job.expired_order,
        )
        for job in expired:
            if job.attempts >= MAX_ATTEMPTS:
                failed.append(job)
                continue
            return job, failed
        queued = [j for j in self.jobs if j.status == Status.QUEUED and not j.deleted]
        return (queued[0] if queued else None), failed


def rows(model: Model) -> dict[Any, dict[str, Any]]:
    pks = [job.pk for job in model.jobs]
    return {r["id"]: r for r in Generation.all_objects.filter(pk__in=pks).values()}


actions = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "create",
                "claim",
                "heartbeat",
                "complete",
                "fail",
                "cancel",
                "expire",
                "delete",
                "stale-heartbeat",
                "stale-complete",
            ]
        ),
        st.integers(0, JOBS - 1),
    ),
    min_size=1,
    max_size=30,
)


# The worker services take the job's id and a lease token: the newest claim's
# (what its current holder sends) or, for "stale-…", an earlier claim's.
SERVICES: dict[str, tuple[Any, Status]] = {
    "heartbeat": (
        lambda g, token: generation_heartbeat(pk=g.pk, lease_token=token),
        Status.RUNNING,
    ),
    "complete": (
        lambda g, token: generation_complete(
            pk=g.pk, lease_token=token, output_path=f"out/{g.pk}.png"
        ),
        Status.COMPLETED,
    ),
    "fail": (
        lambda g, token: generation_fail(
            pk=g.pk, lease_token=token, error_message="boom"
        ),
        Status.FAILED,
    ),
    "cancel": (lambda g, token: generation_cancel(generation=g), Status.CANCELLED),
}
SERVICES["stale-heartbeat"] = SERVICES["heartbeat"]
SERVICES["stale-complete"] = SERVICES["complete"]


def apply(model: Model, action: str, index: int) -> None:
    """Run one action against the database and the model."""
    if action == "create":
        generation, _ = generation_create(api_key=None, prompt=f"job {index}")
        model.jobs.append(Job(pk=generation.pk))
        return
    if action == "claim":
        expected, expected_failures = model.claim()
        claimed = claim_one(max_attempts=MAX_ATTEMPTS)
        assert (claimed and claimed.pk) == (expected and expected.pk)
        for job in expected_failures:
            job.status, job.expired_order = Status.FAILED, None
        if expected is not None:
            expected.status = Status.RUNNING
            expected.attempts += 1
            expected.expired_order = None
            expected.tokens.append(claimed.lease_token)
        return
    job = model.job(index)
    if job is None:
        return
    if action == "expire":
        # Time passes for this job's lease (ordered: later expiries sort last).
        model.expiries += 1
        Generation.all_objects.filter(pk=job.pk, status=Status.RUNNING).update(
            lease_expires_at=Now()
            - timedelta(days=1)
            + timedelta(seconds=model.expiries)
        )
        if job.status == Status.RUNNING:
            job.expired_order = model.expiries
        return
    if action == "delete":
        # Deleting a live job stops it (SPEC §11): queued or running → cancelled.
        Generation.objects.filter(pk=job.pk).delete()
        if not job.deleted and job.status in (Status.QUEUED, Status.RUNNING):
            if job.status == Status.RUNNING:
                job.kept = job.tokens[-1]
            job.status, job.expired_order = Status.CANCELLED, None
        job.deleted = True
        return

    generation = Generation.all_objects.get(pk=job.pk)
    call, target = SERVICES[action]
    stale = action.startswith("stale-")
    token = job.token(stale=stale)
    if job.deleted:
        with pytest.raises(Generation.DoesNotExist):
            call(generation, token)
        return
    if action == "cancel":
        refusal = None if target in TRANSITIONS[job.status] else InvalidTransition
    elif job.status == Status.QUEUED or (job.status == Status.RUNNING and stale):
        refusal = LeaseLost  # no lease, or not the current one: fenced off
    elif job.status == Status.RUNNING:
        refusal = None
    elif job.status == Status.CANCELLED and target == Status.RUNNING:
        # A cancelled job is handed back to the holder the cancel found, so
        # it stops; anyone else is fenced off.
        refusal = None if job.kept is not None and token == job.kept else LeaseLost
    else:
        refusal = InvalidTransition
    if refusal is not None:
        with pytest.raises(refusal):
            call(generation, token)
        return
    result = call(generation, token)
    if target == Status.RUNNING:
        if job.status == Status.RUNNING:
            job.expired_order = None
        assert result.status == job.status
        return
    if target == Status.CANCELLED and job.status == Status.RUNNING:
        job.kept = job.tokens[-1]
    job.status, job.expired_order = target, None
    assert result.status == target


def check(model: Model, previous: dict[Any, dict[str, Any]]) -> dict[Any, Any]:
    """Every row against the model, SPEC §3's transitions and its invariants."""
    now = rows(model)
    for job in model.jobs:
        current = now[job.pk]
        before = previous.get(job.pk)
        status = Status(current["status"])
        assert status == job.status, (job, current)
        assert current["attempts"] == job.attempts
        assert 0 <= current["attempts"] <= MAX_ATTEMPTS
        assert current["is_deleted"] == job.deleted
        if before is not None:
            old = Status(before["status"])
            assert (
                status == old
                or status in TRANSITIONS[old]
                or (old == status == Status.RUNNING)
            ), f"{old.label} -> {status.label}"
            assert current["attempts"] >= before["attempts"]
        if status == Status.QUEUED:
            assert current["started_at"] is None
            assert current["lease_expires_at"] is None
            assert current["completed_at"] is None
        elif status == Status.RUNNING:
            assert current["started_at"] is not None
            assert current["lease_expires_at"] is not None
            assert current["completed_at"] is None
            assert current["attempts"] >= 1
            assert current["lease_token"] == job.tokens[-1]
        if status == Status.CANCELLED:
            assert current["lease_token"] == job.kept
        elif status != Status.RUNNING:
            assert current["lease_token"] is None
        else:
            assert current["lease_expires_at"] is None
            assert current["completed_at"] >= current["created_at"]
            assert (current["duration_ms"] is None) == (current["started_at"] is None)
            if status == Status.COMPLETED:
                assert current["output_path"] == f"out/{job.pk}.png"
            snapshot = {
                k: v
                for k, v in current.items()
                if k not in ("is_deleted", "deleted_at")
            }
            if job.frozen is None:
                job.frozen = snapshot
            assert snapshot == job.frozen, "a terminal generation changed"
        if job.deleted and before is not None and before["is_deleted"]:
            assert current == before, "a deleted generation changed"
    return now


@PROPERTY_SETTINGS
@given(steps=actions)
def test_random_action_sequences_keep_every_generation_in_a_legal_state(
    settings, steps
):
    settings.LEASE_SECONDS = 300
    settings.MAX_ATTEMPTS = MAX_ATTEMPTS
    model = Model()
    try:
        with transaction.atomic():
            previous: dict[Any, dict[str, Any]] = {}
            for action, index in steps:
                apply(model, action, index)
                previous = check(model, previous)
            raise RolledBack
    except RolledBack:
        pass


def test_every_check_constraint_of_the_table_is_validated():
    """The property above relies on the database refusing bad rows."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname, convalidated FROM pg_constraint"
            " WHERE conrelid = 'generations'::regclass AND contype = 'c'"
        )
        constraints = dict(cursor.fetchall())
    assert len(constraints) >= 12
    assert all(constraints.values()), constraints

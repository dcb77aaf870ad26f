"""A Python client generated from the served OpenAPI schema runs the worker loop.

openapi-python-client (pinned in requirements-dev.txt) turns a live gunicorn
server's ``/api/schema?format=json`` into a package in a temporary directory;
the tests import it and drive the whole loop through it, as a worker fleet
would: a client key queues jobs, an admin key claims them with ``max``,
``models`` and ``worker``, heartbeats with each ``lease_token`` and completes
or fails them. A schema the generator cannot use — the claim's 204 without a
body, error bodies, optional or nullable fields — fails here. Generating
takes a few seconds, so it happens once for the module (``live_client``
marker: ``-m "not live_client"`` leaves it out while iterating).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest

from tests.liveserver import (
    CLIENT_TIMEOUT_S,
    PROXY_HEADERS,
    LiveApi,
    create_key,
    live_api,
    migrate,
)
from tests.serving import COMMAND_DEADLINE_S, VENV_BIN, scratch_database, url_for

pytestmark = pytest.mark.live_client

PACKAGE = "lockngen_generated_client"
OPERATIONS = (
    "generations_create",
    "generations_retrieve",
    "generations_claim_create",
    "generations_heartbeat_create",
    "generations_complete_create",
    "generations_fail_create",
)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    with scratch_database("client") as name:
        url = url_for(name)
        migrate(url)
        yield url


@pytest.fixture(scope="module")
def served(database_url, tmp_path_factory) -> Iterator[LiveApi]:
    log = tmp_path_factory.mktemp("client-server") / "gunicorn.log"
    with live_api(database_url, log_path=log) as api:
        yield api


@pytest.fixture(scope="module")
def generated(served, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The package generated from the served schema: ``.client``, ``.models``
    and one module per operation used here (``.generations_claim_create`` …)."""
    workdir = tmp_path_factory.mktemp("generated-client")
    reply = served.call("GET", "/api/schema?format=json", key="")
    assert reply.status == HTTPStatus.OK, reply.body
    schema = workdir / "schema.json"
    schema.write_bytes(reply.body)
    config = workdir / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run: nothing to fix
    done = subprocess.run(
        [
            str(VENV_BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(schema),
            "--output-path",
            str(workdir / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # The generator skips what it cannot express and says so with a warning.
    assert "Warning" not in output, output
    sys.path.insert(0, str(workdir))
    try:
        operations = {
            name: importlib.import_module(f"{PACKAGE}.api.generations.{name}")
            for name in OPERATIONS
        }
        yield SimpleNamespace(
            client=importlib.import_module(f"{PACKAGE}.client"),
            models=importlib.import_module(f"{PACKAGE}.models"),
            types=importlib.import_module(f"{PACKAGE}.types"),
            **operations,
        )
    finally:
        sys.path.remove(str(workdir))
        for module in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[module]


def client_for(generated: SimpleNamespace, served: LiveApi, key: str) -> Any:
    # An undocumented status raises instead of parsing to None. A copy of the
    # headers: the client writes its Authorization header into the dict given.
    return generated.client.AuthenticatedClient(
        base_url=f"http://127.0.0.1:{served.server.port}",
        token=key,
        headers=dict(PROXY_HEADERS),
        timeout=httpx.Timeout(CLIENT_TIMEOUT_S),
        raise_on_unexpected_status=True,
    )


@pytest.fixture(scope="module")
def owner(generated, served, database_url):
    """A client key's generated client (it queues and reads jobs)."""
    return client_for(generated, served, create_key(database_url, "owner"))


@pytest.fixture(scope="module")
def worker(generated, served, database_url):
    """A worker's generated client: an admin key (admin keys claim too)."""
    return client_for(generated, served, create_key(database_url, "worker", admin=True))


def queue(generated, owner, prompt: str, model: str):
    """A new job through the generated client, as the client key."""
    body = generated.models.GenerationCreateRequest(prompt=prompt, model=model)
    response = generated.generations_create.sync_detailed(client=owner, body=body)
    assert response.status_code == HTTPStatus.CREATED, response.content
    job = response.parsed
    assert isinstance(job, generated.models.Generation)
    assert job.status == generated.models.StatusEnum.QUEUED
    # Only worker and admin keys see claimed_by: left out, not null.
    assert isinstance(job.claimed_by, generated.types.Unset)
    return job


def claim(generated, worker, /, **fields):
    """``POST generations/claim``; the generator names ``max`` ``max_``."""
    body = generated.models.ClaimRequest(**fields)
    return generated.generations_claim_create.sync_detailed(client=worker, body=body)


def claimed_jobs(generated, worker, /, **fields) -> list:
    response = claim(generated, worker, **fields)
    assert response.status_code == HTTPStatus.OK, response.content
    assert isinstance(response.parsed, generated.models.Claimed)
    return response.parsed.jobs


def heartbeat(generated, worker, job):
    body = generated.models.LeaseRequest(lease_token=job.lease_token)
    return generated.generations_heartbeat_create.sync_detailed(
        job.id, client=worker, body=body
    )


def complete(generated, worker, job, lease_token: uuid.UUID | None = None):
    body = generated.models.GenerationCompleteRequest(
        lease_token=lease_token or job.lease_token,
        output_path=f"outputs/{job.id}.png",
        thumbnail_path=f"thumbs/{job.id}.png",
    )
    return generated.generations_complete_create.sync_detailed(
        job.id, client=worker, body=body
    )


def test_claim_heartbeat_complete_through_the_generated_client(
    generated, owner, worker
):
    first = queue(generated, owner, "a lighthouse at dusk", "sdxl")
    second = queue(generated, owner, "a red fox in snow", "sdxl")

    jobs = claimed_jobs(generated, worker, max_=4, models=["sdxl"], worker="gpu-box-7")

    # Fewer than max: that is all there was.
    assert [job.id for job in jobs] == [first.id, second.id]
    for job in jobs:
        assert job.status == generated.models.StatusEnum.RUNNING
        assert job.claimed_by == "gpu-box-7"
        assert isinstance(job.lease_token, uuid.UUID)
        assert job.attempts == 1
        assert job.lease_expires_at > job.started_at

    for job in jobs:
        beat = heartbeat(generated, worker, job)
        assert beat.status_code == HTTPStatus.OK, beat.content
        assert isinstance(beat.parsed, generated.models.LeasedGeneration)
        assert beat.parsed.lease_token == job.lease_token
        assert beat.parsed.lease_expires_at >= job.lease_expires_at

        done = complete(generated, worker, job)
        assert done.status_code == HTTPStatus.OK, done.content
        assert done.parsed.status == generated.models.StatusEnum.COMPLETED
        assert done.parsed.output_path == f"outputs/{job.id}.png"
        assert done.parsed.claimed_by is None  # the lease is over

    seen = generated.generations_retrieve.sync_detailed(first.id, client=owner)
    assert seen.status_code == HTTPStatus.OK
    assert seen.parsed.status == generated.models.StatusEnum.COMPLETED
    assert seen.parsed.thumbnail_path == f"thumbs/{first.id}.png"
    assert isinstance(seen.parsed.claimed_by, generated.types.Unset)


def test_fail_through_the_generated_client_then_the_lease_is_gone(
    generated, owner, worker
):
    queued = queue(generated, owner, "this one will fail", "sd15")
    (job,) = claimed_jobs(generated, worker, max_=4, models=["sd15"], worker="box-8")
    assert job.id == queued.id

    body = generated.models.GenerationFailRequest(
        lease_token=job.lease_token, error_message="CUDA out of memory"
    )
    failed = generated.generations_fail_create.sync_detailed(
        job.id, client=worker, body=body
    )

    assert failed.status_code == HTTPStatus.OK, failed.content
    assert failed.parsed.status == generated.models.StatusEnum.FAILED
    assert failed.parsed.error_message == "CUDA out of memory"
    late = heartbeat(generated, worker, job)
    assert late.status_code == HTTPStatus.CONFLICT
    assert isinstance(late.parsed, generated.models.Conflict)
    assert late.parsed.code == "invalid_transition"
    assert late.parsed.status == "failed"


def test_an_expired_lease_is_claimed_first_and_its_old_token_is_lease_lost(
    generated, owner, worker, database_url
):
    stalled = queue(generated, owner, "the stalled worker's job", "sd3")
    newer = queue(generated, owner, "queued after it", "sd3")
    (first,) = claimed_jobs(generated, worker, models=["sd3"], worker="stalled")
    assert first.id == stalled.id
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE generations SET lease_expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            [first.id],
        )

    (again,) = claimed_jobs(generated, worker, models=["sd3"], worker="fresh")

    assert again.id == stalled.id  # before the queued one
    assert (again.claimed_by, again.attempts) == ("fresh", 2)
    assert again.lease_token != first.lease_token
    lost = complete(generated, worker, again, lease_token=first.lease_token)
    assert lost.status_code == HTTPStatus.CONFLICT
    assert lost.parsed.code == "lease_lost"
    assert complete(generated, worker, again).status_code == HTTPStatus.OK
    (last,) = claimed_jobs(generated, worker, max_=2, models=["sd3"])
    assert last.id == newer.id
    assert complete(generated, worker, last).status_code == HTTPStatus.OK


def test_claim_is_204_when_nothing_is_claimable(generated, owner, worker):
    waiting = queue(generated, owner, "for another model", "flux")

    nothing = claim(generated, worker, max_=4, models=["not-loaded-anywhere"])

    assert nothing.status_code == HTTPStatus.NO_CONTENT
    assert nothing.parsed is None
    assert nothing.content == b""
    (job,) = claimed_jobs(generated, worker, max_=4, models=["flux"])
    assert job.id == waiting.id
    assert complete(generated, worker, job).status_code == HTTPStatus.OK


def test_error_bodies_parse_through_the_generated_client(generated, owner, worker):
    too_many = claim(generated, worker, max_=51)
    assert too_many.status_code == HTTPStatus.BAD_REQUEST
    assert "max" in too_many.parsed.additional_properties

    not_a_worker = claim(generated, owner)
    assert not_a_worker.status_code == HTTPStatus.FORBIDDEN
    assert isinstance(not_a_worker.parsed, generated.models.Error)
    assert not_a_worker.parsed.detail

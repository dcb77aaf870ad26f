"""A hypothesis state machine over the v2 worker protocol (SPEC §5).

Several keys (capped and not) queue jobs of two models; several workers
claim batches (some routed by model), heartbeat, complete and fail what they
hold — sometimes with a stale token —, leases expire, owners cancel. After
every step:

- no job is changed by a token that is not its current one;
- no key ever runs more jobs than its ``max_running``;
- no job is lost or handed out twice: a claim hands out only jobs that were
  queued or whose lease had expired, and answers nothing only when nothing
  was claimable;
- routing holds, and the database's per-key counters equal the real counts.

Each example runs in a transaction that is rolled back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.db.models.functions import Now
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from apikeys.models import ApiKey
from generations.claims import generation_claim
from generations.models import Generation, InvalidTransition, Status
from generations.services import (
    LeaseLost,
    generation_cancel,
    generation_complete,
    generation_create,
    generation_fail,
    generation_heartbeat,
)
from tests.factories import make_api_key
from tests.test_claims_engine import kept_counts, true_counts

MAX_ATTEMPTS = 2
CAPS = (1, 2, None)  # one key per cap
MODELS = ("sdxl", "flux")
WORKERS = 3


@dataclass
class Job:
    pk: uuid.UUID
    key: int
    model: str
    status: Status = Status.QUEUED
    attempts: int = 0
    expired: bool = False
    tokens: list[uuid.UUID] = field(default_factory=list)
    kept: uuid.UUID | None = None  # the holder's token a cancel kept


class WorkerProtocol(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.atomic = transaction.atomic()
        self.atomic.__enter__()
        self.keys: list[ApiKey] = []
        for n, cap in enumerate(CAPS):
            key = make_api_key(name=f"client {n}")[0]
            ApiKey.objects.filter(pk=key.pk).update(max_running=cap)
            self.keys.append(key)
        self.jobs: list[Job] = []
        self.held: list[list[Job]] = [[] for _ in range(WORKERS)]

    def teardown(self) -> None:
        if hasattr(self, "atomic"):
            transaction.set_rollback(True)
            self.atomic.__exit__(None, None, None)

    # --- what the model expects ----------------------------------------------

    def running(self, key: int) -> int:
        return sum(1 for j in self.jobs if j.key == key and j.status == Status.RUNNING)

    def claimable(self, models: tuple[str, ...] | None) -> list[Job]:
        wanted = models or MODELS
        expired = [
            j
            for j in self.jobs
            if j.status == Status.RUNNING
            and j.expired
            and j.attempts < MAX_ATTEMPTS
            and j.model in wanted
        ]
        queued = [
            j
            for j in self.jobs
            if j.status == Status.QUEUED
            and j.model in wanted
            and (CAPS[j.key] is None or self.running(j.key) < CAPS[j.key])
        ]
        return expired + queued

    # --- rules ---------------------------------------------------------------

    @rule(key=st.integers(0, len(CAPS) - 1), model=st.sampled_from(MODELS))
    def create(self, key: int, model: str) -> None:
        generation, _ = generation_create(
            api_key=self.keys[key], prompt="p", model=model
        )
        self.jobs.append(Job(pk=generation.pk, key=key, model=model))

    @rule(
        worker=st.integers(0, WORKERS - 1),
        batch=st.integers(1, 4),
        models=st.sampled_from([None, ("sdxl",), ("flux",), MODELS]),
    )
    def claim(self, worker: int, batch: int, models: tuple[str, ...] | None) -> None:
        exhausted = [
            j
            for j in self.jobs
            if j.status == Status.RUNNING and j.expired and j.attempts >= MAX_ATTEMPTS
        ]
        claimable = {j.pk: j for j in self.claimable(models)}

        jobs = generation_claim(
            max_jobs=batch,
            models=list(models) if models else None,
            worker=f"w{worker}",
            max_attempts=MAX_ATTEMPTS,
        )

        for job in exhausted:
            job.status, job.expired = Status.FAILED, False
        assert len({j.pk for j in jobs}) == len(jobs), "one job handed out twice"
        assert len(jobs) <= batch
        if claimable:
            assert jobs, "nothing claimed while a job was claimable"
        for claimed in jobs:
            job = claimable.get(claimed.pk)
            assert job is not None, "handed out a job that was not claimable"
            assert claimed.model in (models or MODELS)
            for other in self.held:
                if job in other:
                    other.remove(job)  # its lease expired: that worker lost it
            job.status, job.expired = Status.RUNNING, False
            job.attempts += 1
            job.tokens.append(claimed.lease_token)
            assert claimed.claimed_by == f"w{worker}"
            self.held[worker].append(job)

    @rule(
        worker=st.integers(0, WORKERS - 1),
        index=st.integers(0, 10),
        verb=st.sampled_from(["heartbeat", "complete", "fail"]),
        stale=st.booleans(),
    )
    def report(self, worker: int, index: int, verb: str, stale: bool) -> None:
        candidates = self.held[worker] if not stale else self.jobs
        if not candidates:
            return
        job = candidates[index % len(candidates)]
        current = job.tokens[-1] if job.tokens else None
        token = uuid.uuid4() if stale or current is None else current
        if stale and len(job.tokens) > 1:
            token = job.tokens[-2]
        services = {
            "heartbeat": lambda: generation_heartbeat(pk=job.pk, lease_token=token),
            "complete": lambda: generation_complete(
                pk=job.pk, lease_token=token, output_path="o"
            ),
            "fail": lambda: generation_fail(pk=job.pk, lease_token=token),
        }
        holds = token == current and job.status == Status.RUNNING
        before = Generation.objects.values().get(pk=job.pk)
        if not holds:
            # Only the holder the cancel found is told (SPEC §5).
            cancelled_heartbeat = (
                verb == "heartbeat"
                and job.status == Status.CANCELLED
                and job.kept is not None
                and token == job.kept
            )
            if cancelled_heartbeat:
                assert services[verb]().status == Status.CANCELLED
            else:
                with pytest.raises((LeaseLost, InvalidTransition)):
                    services[verb]()
            assert Generation.objects.values().get(pk=job.pk) == before
            return
        result = services[verb]()
        if verb == "heartbeat":
            job.expired = False
            assert result.status == Status.RUNNING
            return
        job.status = Status.COMPLETED if verb == "complete" else Status.FAILED
        self.held[worker].remove(job)
        assert result.status == job.status

    @rule(index=st.integers(0, 30))
    def expire(self, index: int) -> None:
        if not self.jobs:
            return
        job = self.jobs[index % len(self.jobs)]
        if job.status != Status.RUNNING:
            return
        Generation.objects.filter(pk=job.pk).update(
            lease_expires_at=Now() - timedelta(seconds=1)
        )
        job.expired = True

    @rule(index=st.integers(0, 30))
    def cancel(self, index: int) -> None:
        if not self.jobs:
            return
        job = self.jobs[index % len(self.jobs)]
        generation = Generation.objects.get(pk=job.pk)
        if job.status not in (Status.QUEUED, Status.RUNNING):
            with pytest.raises(InvalidTransition):
                generation_cancel(generation=generation)
            return
        generation_cancel(generation=generation)
        if job.status == Status.RUNNING:
            job.kept = job.tokens[-1]
        # Its holder still holds it as far as it knows: its next heartbeat
        # is told of the cancel (its complete or fail is refused).
        job.status, job.expired = Status.CANCELLED, False

    # --- invariants ----------------------------------------------------------

    @invariant()
    def rows_match_the_model(self) -> None:
        if not hasattr(self, "jobs"):
            return
        rows = {r["id"]: r for r in Generation.objects.values()}
        assert len(rows) == len(self.jobs), "a job was lost or made up"
        for job in self.jobs:
            row = rows[job.pk]
            assert row["status"] == job.status, job
            assert row["attempts"] == job.attempts
            if job.status == Status.RUNNING:
                expected_token = job.tokens[-1]
            elif job.status == Status.CANCELLED:
                expected_token = job.kept  # its holder's, if it was running
            else:
                expected_token = None
            assert row["lease_token"] == expected_token

    @invariant()
    def no_key_runs_past_its_cap(self) -> None:
        if not hasattr(self, "jobs"):
            return
        for key, cap in enumerate(CAPS):
            if cap is not None:
                assert self.running(key) <= cap

    @invariant()
    def the_database_counts_what_there_is(self) -> None:
        if hasattr(self, "jobs"):
            assert kept_counts() == true_counts()


@pytest.mark.django_db
def test_the_worker_protocol_keeps_every_rule_under_random_steps(settings: Any):
    settings.LEASE_SECONDS = 300
    settings.MAX_ATTEMPTS = MAX_ATTEMPTS
    run_state_machine_as_test(
        WorkerProtocol,
        settings=hypothesis_settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

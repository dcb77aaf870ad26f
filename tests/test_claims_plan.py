"""The claim's plans at scale (SPEC §9): 100,000 queued jobs over 1,000 keys.

Every read of ``generations`` in both variants (any model, ``models=[…]``)
must be an index scan, and nothing may sort an unbounded set of its rows:
the only sort allowed over generations is one fed through a ``Limit`` (the
routed claim merging each model's few picked jobs). The planner's choices
are deterministic enough once the tables are ANALYZEd: each lane holds 100
of 100,000 rows, so a sequential scan is never close.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, transaction

from generations.claims import claim_sql, claim_statement, generation_claim
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db

KEYS, JOBS, RUNNING = 1_000, 100_000, 1_000
MODELS = ["sdxl", "flux-dev", "sd15", "sd3"]
INDEXES = {
    "generations_lane_head_idx",
    "generations_lane_model_idx",
    "generations_lease_idx",
    "generations_pkey",
}

QUEUE_SQL = """
INSERT INTO generations (id, prompt, model, api_key_id, status, created_at,
                         attempts, is_deleted)
SELECT gen_random_uuid(), 'queued job ' || i,
       (%(models)s::varchar[])[(i / %(keys_n)s) %% 4 + 1],
       (%(keys)s::uuid[])[i %% %(keys_n)s + 1],
       0, now() - (%(jobs)s - i) * interval '1 millisecond', 0, false
FROM generate_series(0, %(jobs)s - 1) AS i
"""


@pytest.fixture
def big_queue():
    keys = [str(make_api_key(name=f"owner {n}")[0].pk) for n in range(KEYS)]
    with connection.cursor() as cursor:
        cursor.execute(
            QUEUE_SQL, {"models": MODELS, "keys": keys, "keys_n": KEYS, "jobs": JOBS}
        )
    while sum(1 for _ in generation_claim(max_jobs=50)) == 50:  # workers at work
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM generations WHERE status = 1")
            if cursor.fetchone()[0] >= RUNNING:
                break
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE generations, generation_key_queues")


def plan_of(sql: str, models: list[str] | None, *, generic: bool) -> dict[str, Any]:
    """The claim's plan: for these values (``generic=False``), or the one
    plan a prepared claim may reuse for every value (``generic=True``)."""
    statement, params = claim_statement(
        max_jobs=1, models=models, worker="w", max_attempts=settings.MAX_ATTEMPTS
    )
    assert statement == sql
    with transaction.atomic(), connection.cursor() as cursor:
        if generic:
            text, values = numbered(sql, params)
            cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cursor.execute(f"PREPARE claim_plan AS {text}")
            try:
                arguments = ", ".join(["%s"] * len(values))
                cursor.execute(
                    f"EXPLAIN (FORMAT JSON) EXECUTE claim_plan({arguments})", values
                )
                plan = cursor.fetchone()[0][0]["Plan"]
            finally:
                cursor.execute("DEALLOCATE claim_plan")
        else:
            cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            plan = cursor.fetchone()[0][0]["Plan"]
        transaction.set_rollback(True)
    return plan


def numbered(sql: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
    """``sql`` with ``$1, $2, …`` for its named placeholders, as PREPARE takes it."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%")
    return text, [params[name] for name in names]


def nodes(node: dict[str, Any]):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def reads_generations(node: dict[str, Any]) -> bool:
    return node.get("Relation Name") == "generations" and "Scan" in node["Node Type"]


def unbounded_generations_below(node: dict[str, Any]) -> bool:
    """A scan of generations under ``node`` with no Limit in between."""
    for child in node.get("Plans", []):
        if child["Node Type"] == "Limit":
            continue
        if reads_generations(child) or unbounded_generations_below(child):
            return True
    return False


@pytest.mark.parametrize(
    ("sql", "models"),
    [
        (claim_sql(routed=False, max_jobs=1), None),
        (claim_sql(routed=True, max_jobs=1), ["flux-dev"]),
    ],
    ids=["any-model", "routed"],
)
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
def test_the_claim_reads_jobs_through_indexes_and_sorts_no_backlog(
    big_queue, sql, models, generic
):
    plan = plan_of(sql, models, generic=generic)
    scans = [node for node in nodes(plan) if reads_generations(node)]
    assert scans
    assert not [scan for scan in scans if scan["Node Type"] == "Seq Scan"], scans
    used = {
        node["Index Name"]
        for node in nodes(plan)
        if node.get("Index Name", "").startswith("generations_")
    }
    assert used <= INDEXES
    lane = "generations_lane_model_idx" if models else "generations_lane_head_idx"
    assert lane in used
    assert "generations_lease_idx" in used  # the expired-lease sweeps
    sorts = [node for node in nodes(plan) if node["Node Type"] == "Sort"]
    assert not [sort for sort in sorts if unbounded_generations_below(sort)], sorts

"""The PostgreSQL schema of SPEC §3, read back from the catalog.

CHECK constraints are exercised with raw SQL: the database itself must refuse
a bad row, whatever wrote it.
"""

from __future__ import annotations

import re

import pytest
from django.db import IntegrityError, connection, transaction

from generations.models import NO_KEY

pytestmark = pytest.mark.django_db

NULL_NOT_ALLOWED = False
NULLABLE = True

# column -> (data_type, character length, nullable, default)
GENERATION_COLUMNS = {
    "id": ("uuid", None, NULL_NOT_ALLOWED, None),
    "name": ("character varying", 255, NULL_NOT_ALLOWED, "''::character varying"),
    "prompt": ("character varying", 4000, NULL_NOT_ALLOWED, None),
    "negative_prompt": ("character varying", 4000, NULLABLE, None),
    "model": ("character varying", 100, NULL_NOT_ALLOWED, "'sdxl'::character varying"),
    "width": ("integer", None, NULL_NOT_ALLOWED, "1024"),
    "height": ("integer", None, NULL_NOT_ALLOWED, "1024"),
    "steps": ("integer", None, NULL_NOT_ALLOWED, "20"),
    "guidance": ("real", None, NULL_NOT_ALLOWED, "7.5"),
    "seed": ("bigint", None, NULLABLE, None),
    "status": ("integer", None, NULL_NOT_ALLOWED, "0"),
    "prompt_id": ("character varying", 100, NULLABLE, None),
    "output_path": ("character varying", 500, NULLABLE, None),
    "thumbnail_path": ("character varying", 500, NULLABLE, None),
    "error_message": ("character varying", 2000, NULLABLE, None),
    "created_at": (
        "timestamp with time zone",
        None,
        NULL_NOT_ALLOWED,
        "statement_timestamp()",
    ),
    "updated_at": ("timestamp with time zone", None, NULLABLE, None),
    "completed_at": ("timestamp with time zone", None, NULLABLE, None),
    "duration_ms": ("integer", None, NULLABLE, None),
    "started_at": ("timestamp with time zone", None, NULLABLE, None),
    "lease_expires_at": ("timestamp with time zone", None, NULLABLE, None),
    "attempts": ("integer", None, NULL_NOT_ALLOWED, "0"),
    "idempotency_key": ("character varying", 100, NULLABLE, None),
    "request_fingerprint": ("character", 64, NULLABLE, None),
    "lease_token": ("uuid", None, NULLABLE, None),
    "claimed_by": ("character varying", 100, NULLABLE, None),
    "webhook": ("character varying", 2000, NULLABLE, None),
    "webhook_events_filter": (
        "character varying",
        32,
        NULL_NOT_ALLOWED,
        "'start,completed'::character varying",
    ),
    "api_key_id": ("uuid", None, NULLABLE, None),
    "is_deleted": ("boolean", None, NULL_NOT_ALLOWED, "false"),
    "deleted_at": ("timestamp with time zone", None, NULLABLE, None),
}

API_KEY_COLUMNS = {
    "id": ("uuid", None, NULL_NOT_ALLOWED, None),
    "name": ("character varying", 255, NULL_NOT_ALLOWED, None),
    "key_hash": ("character", 64, NULL_NOT_ALLOWED, None),
    "key_prefix": ("character varying", 16, NULL_NOT_ALLOWED, None),
    "is_admin": ("boolean", None, NULL_NOT_ALLOWED, "false"),
    "rate_limit": ("integer", None, NULL_NOT_ALLOWED, "100"),
    "is_worker": ("boolean", None, NULL_NOT_ALLOWED, "false"),
    "max_running": ("integer", None, NULLABLE, None),
    "created_at": (
        "timestamp with time zone",
        None,
        NULL_NOT_ALLOWED,
        "statement_timestamp()",
    ),
    "last_used_at": ("timestamp with time zone", None, NULLABLE, None),
    "expires_at": ("timestamp with time zone", None, NULLABLE, None),
    "revoked_at": ("timestamp with time zone", None, NULLABLE, None),
    "is_deleted": ("boolean", None, NULL_NOT_ALLOWED, "false"),
    "deleted_at": ("timestamp with time zone", None, NULLABLE, None),
}

# (unique, "USING btree (...) [WHERE ...]") — names vary, definitions do not.
GENERATION_INDEXES = {
    (False, "btree (status)"),
    (False, "btree (created_at)"),
    (False, "btree (api_key_id, created_at DESC, id DESC) WHERE (NOT is_deleted)"),
    # The claim's walks of one key's queue (SPEC §3, §5).
    (
        False,
        f"btree (COALESCE(api_key_id, '{NO_KEY}'::uuid), created_at, id)"
        " WHERE ((NOT is_deleted) AND (status = 0))",
    ),
    (
        False,
        f"btree (COALESCE(api_key_id, '{NO_KEY}'::uuid), model, created_at, id)"
        " WHERE ((NOT is_deleted) AND (status = 0))",
    ),
    (
        False,
        "btree (lease_expires_at, id) WHERE ((NOT is_deleted) AND (status = 1))",
    ),
    (True, "btree (api_key_id, idempotency_key) WHERE (idempotency_key IS NOT NULL)"),
    (True, "btree (id)"),
}
API_KEY_INDEXES = {
    (True, "btree (id)"),
    (True, "btree (key_hash)"),
    (True, "btree (key_prefix)"),
    (False, "btree (key_prefix varchar_pattern_ops)"),
}


def columns(table: str) -> dict[str, tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, data_type, character_maximum_length, "
            "is_nullable = 'YES', column_default "
            "FROM information_schema.columns WHERE table_name = %s",
            [table],
        )
        return {name: tuple(rest) for name, *rest in cursor.fetchall()}


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param("generations", GENERATION_COLUMNS, id="generations"),
        pytest.param("api_keys", API_KEY_COLUMNS, id="api_keys"),
    ],
)
def test_every_column_has_the_spec_type_nullability_and_default(table, expected):
    actual = columns(table)

    assert set(actual) == set(expected)
    for column, spec in expected.items():
        assert actual[column] == spec, column


def indexes(table: str) -> set[tuple[bool, str]]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", [table])
        definitions = [row[0] for row in cursor.fetchall()]
    parsed = set()
    for definition in definitions:
        match = re.fullmatch(
            r"CREATE (UNIQUE )?INDEX \S+ ON \S+ USING (.*)", definition
        )
        assert match, definition
        parsed.add((bool(match[1]), match[2]))
    return parsed


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param("generations", GENERATION_INDEXES, id="generations"),
        pytest.param("api_keys", API_KEY_INDEXES, id="api_keys"),
    ],
)
def test_every_index_and_partial_index_exists(table, expected):
    assert indexes(table) == expected


def test_generations_api_key_references_api_keys():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'generations'::regclass AND contype = 'f'"
        )
        assert [row[0] for row in cursor.fetchall()] == [
            "FOREIGN KEY (api_key_id) REFERENCES api_keys(id) "
            "DEFERRABLE INITIALLY DEFERRED"
        ]


# A valid row, then one bad column at a time.
GOOD_GENERATION = {"id": "gen_random_uuid()", "prompt": "'a lighthouse'"}
GOOD_API_KEY = {
    "id": "gen_random_uuid()",
    "name": "'k'",
    "key_hash": "repeat('a', 64)",
    "key_prefix": "'lk_abcdefgh'",
    "is_admin": "true",
}

BAD_GENERATIONS = [
    ("width", "56", "generations_width_range"),
    ("width", "4104", "generations_width_range"),
    ("width", "100", "generations_width_multiple_of_8"),
    ("height", "56", "generations_height_range"),
    ("height", "4352", "generations_height_range"),
    ("height", "1020", "generations_height_multiple_of_8"),
    ("steps", "0", "generations_steps_range"),
    ("steps", "151", "generations_steps_range"),
    ("guidance", "-0.01", "generations_guidance_range"),
    ("guidance", "30.01", "generations_guidance_range"),
    ("seed", "-1", "generations_seed_range"),
    ("status", "-1", "generations_status_range"),
    ("status", "5", "generations_status_range"),
    ("prompt", "''", "generations_prompt_not_blank"),
    ("duration_ms", "-1", "generations_duration_ms_gte_0"),
    ("attempts", "-1", "generations_attempts_gte_0"),
    (
        "webhook_events_filter",
        "'completed,start'",
        "generations_webhook_events_filter_subset",
    ),
    (
        "completed_at",
        "statement_timestamp() - interval '1 second'",
        "generations_completed_after_created",
    ),
]
BAD_API_KEYS = [
    ("rate_limit", "-1", "api_keys_rate_limit_gte_0"),
    ("max_running", "0", "api_keys_max_running_gte_1"),
    ("key_prefix", "'xx_abcdefgh'", "api_keys_key_prefix_format"),
    ("is_worker", "true", "api_keys_one_role"),  # the good row is an admin key
]


def insert(table: str, row: dict[str, str]) -> None:
    # Test-owned literals only, never user input.
    statement = "INSERT INTO {} ({}) VALUES ({})".format(  # noqa: S608
        table, ", ".join(row), ", ".join(row.values())
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(statement)


@pytest.mark.parametrize(
    ("table", "good", "column", "value", "constraint"),
    [
        *[
            pytest.param(
                "generations",
                GOOD_GENERATION,
                column,
                value,
                constraint,
                id=f"generations.{column}={value}",
            )
            for column, value, constraint in BAD_GENERATIONS
        ],
        *[
            pytest.param(
                "api_keys",
                GOOD_API_KEY,
                column,
                value,
                constraint,
                id=f"api_keys.{column}={value}",
            )
            for column, value, constraint in BAD_API_KEYS
        ],
    ],
)
def test_check_constraint_refuses_a_bad_row_written_with_raw_sql(
    table, good, column, value, constraint
):
    insert(table, good)  # the same row without the bad value is fine
    # Fresh unique values, so that only the CHECK constraint can fail.
    fresh = {"key_hash": "repeat('b', 64)", "key_prefix": "'lk_bcdefghi'"}
    bad = {**good, **{k: v for k, v in fresh.items() if k in good}, column: value}

    with pytest.raises(IntegrityError, match=constraint):
        insert(table, bad)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("width", "64", id="width=64"),
        pytest.param("width", "4096", id="width=4096"),
        pytest.param("height", "64", id="height=64"),
        pytest.param("steps", "1", id="steps=1"),
        pytest.param("steps", "150", id="steps=150"),
        pytest.param("guidance", "0", id="guidance=0"),
        pytest.param("guidance", "30", id="guidance=30"),
        pytest.param("seed", "0", id="seed=0"),
        pytest.param("seed", "9223372036854775807", id="seed=bigint-max"),
        pytest.param("status", "4", id="status=4"),
        pytest.param("duration_ms", "0", id="duration_ms=0"),
    ],
)
def test_check_constraints_accept_the_boundaries(column, value):
    insert("generations", {**GOOD_GENERATION, column: value})


@pytest.mark.parametrize(
    "row",
    [
        pytest.param({"is_worker": "true", "is_admin": "false"}, id="worker"),
        pytest.param({"max_running": "1"}, id="max_running=1"),
        pytest.param({"max_running": "2147483647"}, id="max_running=int-max"),
        pytest.param({"max_running": "NULL"}, id="max_running=null"),
    ],
)
def test_api_key_check_constraints_accept_the_boundaries(row):
    insert("api_keys", {**GOOD_API_KEY, **row})

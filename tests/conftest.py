"""Shared fixtures. The suite runs against PostgreSQL (``make test``)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Let concurrent runs on one server use distinct test databases.

    ``TEST_DB_SUFFIX=foo`` makes the test database ``test_<name>_foo``.
    """
    suffix = os.environ.get("TEST_DB_SUFFIX", "").strip()
    if suffix:
        from django.conf import settings

        db = settings.DATABASES["default"]
        test = db.setdefault("TEST", {})
        base = test.get("NAME") or f"test_{db['NAME']}"
        test["NAME"] = f"{base}_{suffix}"

"""createapikey / revokeapikey: operators' key management from the shell."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apikeys.keys import hash_key, is_valid_format, key_prefix
from apikeys.models import ApiKey
from apikeys.services import api_key_authenticate
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_createapikey_prints_the_raw_key_once_on_stdout():
    out, err = run("createapikey", "render worker")

    raw_key = out.strip()
    assert is_valid_format(raw_key)
    assert raw_key not in err
    assert "shown only this once" in err
    api_key = ApiKey.objects.get(key_hash=hash_key(raw_key))
    assert (api_key.name, api_key.is_admin, api_key.rate_limit) == (
        "render worker",
        False,
        100,
    )
    assert api_key.expires_at is None
    assert api_key_authenticate(raw_key) == api_key


def test_createapikey_options():
    before = timezone.now()

    out, _ = run(
        "createapikey", "gpu", "--admin", "--rate-limit", "0", "--expires-in-days", "7"
    )

    api_key = ApiKey.objects.get(key_hash=hash_key(out.strip()))
    assert api_key.is_admin
    assert api_key.rate_limit == 0
    assert before + timedelta(days=7) <= api_key.expires_at
    assert api_key.expires_at <= timezone.now() + timedelta(days=7)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--worker"], (False, True, 0, None), id="worker-unlimited"),
        pytest.param(
            ["--worker", "--rate-limit", "600"], (False, True, 600, None), id="worker"
        ),
        pytest.param(["--max-running", "2"], (False, False, 100, 2), id="capped"),
        pytest.param(["--admin"], (True, False, 100, None), id="admin"),
    ],
)
def test_createapikey_roles_and_caps(args, expected):
    out, err = run("createapikey", "gpu", *args)

    api_key = ApiKey.objects.get(key_hash=hash_key(out.strip()))
    assert (
        api_key.is_admin,
        api_key.is_worker,
        api_key.rate_limit,
        api_key.max_running,
    ) == expected
    if api_key.is_worker:
        assert "Created worker API key" in err


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["  "], id="blank-name"),
        pytest.param(["k", "--admin", "--worker"], id="two-roles"),
        pytest.param(["k", "--max-running", "0"], id="zero-cap"),
        pytest.param(["k", "--max-running", "-2"], id="negative-cap"),
        pytest.param(["k", "--max-running", "2147483648"], id="cap-over-int"),
        pytest.param(["k", "--max-running", "two"], id="non-numeric-cap"),
        pytest.param(["k", "--rate-limit", "2147483648"], id="rate-limit-over-int"),
        pytest.param(["x" * 256], id="name-too-long"),
        pytest.param(["k", "--rate-limit", "-1"], id="negative-rate-limit"),
        pytest.param(["k", "--expires-in-days", "0"], id="zero-days"),
        pytest.param(["k", "--rate-limit", "many"], id="non-numeric"),
    ],
)
def test_createapikey_refuses_bad_input_and_creates_nothing(args):
    count = ApiKey.all_objects.count()

    with pytest.raises(CommandError):
        run("createapikey", *args)

    assert ApiKey.all_objects.count() == count


def test_revokeapikey_revokes_by_prefix_for_good():
    api_key, raw_key = make_api_key(name="leaked")

    out, _ = run("revokeapikey", key_prefix(raw_key))

    assert f"Revoked API key {api_key.key_prefix}" in out
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at is not None
    assert api_key_authenticate(raw_key) is None


def test_revokeapikey_twice_keeps_the_first_revocation():
    api_key, _ = make_api_key()
    run("revokeapikey", api_key.key_prefix)
    first = ApiKey.objects.get(pk=api_key.pk).revoked_at

    out, _ = run("revokeapikey", api_key.key_prefix)

    assert "already revoked" in out
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at == first


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("lk_00000000", id="unknown"),
        pytest.param("lk_", id="too-short"),
    ],
)
def test_revokeapikey_refuses_unknown_or_malformed_prefixes(prefix):
    with pytest.raises(CommandError):
        run("revokeapikey", prefix)

"""Every response under /api/ is JSON (DEBUG on or off); X-Request-ID everywhere."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from http import HTTPStatus
from pathlib import Path

import pytest

from apikeys.keys import generate_key
from lockngen.requestid import RequestIDLogFilter
from tests.serving import closed_port

BASE_DIR = Path(__file__).resolve().parent.parent


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert isinstance(body.get("detail"), str)
    return body


@pytest.fixture(params=[True, False], ids=["debug", "no-debug"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


@pytest.mark.parametrize(
    "path",
    ["/api/v1/nope", "/api/v1/nope/deeper/", "/api/v1", "/api/", "/api/v2/generations"],
)
def test_unknown_api_paths_are_json_404(api_as, debug, path):
    assert_json_error(api_as(None).get(path), HTTPStatus.NOT_FOUND)


@pytest.mark.parametrize("method", ["PUT", "OPTIONS", "TRACE"])
def test_unknown_method_is_json_405(owner_api, debug, method):
    response = owner_api.request(method, "generations", {"prompt": "p"})
    assert_json_error(response, HTTPStatus.METHOD_NOT_ALLOWED)
    assert set(response["Allow"].split(", ")) == {"GET", "POST", "HEAD"}


def test_non_json_body_is_json_415(owner_api, debug):
    response = owner_api.post("generations", "<x/>", content_type="application/xml")
    assert_json_error(response, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)


def test_accept_header_does_not_matter(owner_api, debug):
    response = owner_api.get("generations", headers={"Accept": "text/html"})
    assert response.status_code == HTTPStatus.OK
    assert response["Content-Type"] == "application/json"


def test_unhandled_exception_in_a_view_is_json_500(admin_api, debug, monkeypatch):
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("generations.api.generation_claim", broken)

    body = assert_json_error(admin_api.post("generations/claim"), 500)

    assert body["detail"] == "Internal server error."
    assert ("exception" in body) is debug  # details only for developers


def test_error_raised_outside_the_views_is_json_too(api_as, debug):
    response = api_as(None).get("/api/v1/generations", headers={"Host": "evil.example"})
    assert_json_error(response, HTTPStatus.BAD_REQUEST)
    assert response["X-Request-ID"]


def test_non_api_pages_are_left_alone(client, settings):
    settings.DEBUG = False
    response = client.get("/no-such-page/")
    assert response.status_code == HTTPStatus.NOT_FOUND
    assert not response["Content-Type"].startswith("application/json")


# --- Database outage ------------------------------------------------------------

OUTAGE_CHILD = textwrap.dedent(
    """
    import json, os
    import django
    django.setup()
    from django.test import Client
    from django.test.utils import setup_test_environment
    setup_test_environment()
    client = Client(raise_request_exception=False)
    key = {"X-API-Key": os.environ["RAW_KEY"]}
    out = []
    calls = [("get", "/api/v1/generations"), ("post", "/api/v1/generations"),
             ("get", "/api/v1/keys/me")]
    for method, path in calls:
        response = getattr(client, method)(
            path, {"prompt": "p"} if method == "post" else None,
            content_type="application/json", headers=key)
        out.append({"status": response.status_code, "type": response["Content-Type"],
                    "retry": response.get("Retry-After"), "body": response.json()})
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("debug_env", ["1", "0"], ids=["debug", "no-debug"])
def test_unreachable_database_is_json_503_with_retry_after(debug_env):
    result = subprocess.run(
        [sys.executable, "-c", OUTAGE_CHILD],
        cwd=BASE_DIR,
        env={
            "PATH": os.environ.get("PATH", ""),
            "DJANGO_SETTINGS_MODULE": "lockngen.settings",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{closed_port()}/lockngen",
            "DB_CONNECT_RETRIES": "0",
            "DB_CONNECT_TIMEOUT": "1",
            "DEBUG": debug_env,
            "RAW_KEY": generate_key(),
            "LOG_LEVEL": "CRITICAL",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for answer in answers:
        assert answer["status"] == HTTPStatus.SERVICE_UNAVAILABLE
        assert answer["type"] == "application/json"
        assert int(answer["retry"]) > 0
        assert answer["body"]["code"] == "database_unavailable"
        assert "password" not in json.dumps(answer["body"]).lower()


# --- X-Request-ID -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/generations", "/api/v1/nope", "/health/live", "/admin/login/"]
)
def test_every_response_gets_a_generated_request_id(client, path):
    request_id = client.get(path)["X-Request-ID"]
    assert len(request_id) == 32
    int(request_id, 16)


def test_a_sane_request_id_is_echoed(owner_api):
    sent = "req-2026/11:abc.DEF_~" + "x" * 179  # 200 visible ASCII characters
    response = owner_api.get("generations", headers={"X-Request-ID": sent})
    assert response["X-Request-ID"] == sent


@pytest.mark.parametrize(
    "sent",
    ["x" * 201, "has space", "tab\there", "caf\u00e9", "new\nline", ""],
    ids=["too-long", "space", "tab", "non-ascii", "newline", "empty"],
)
def test_an_insane_request_id_is_replaced(owner_api, sent):
    response = owner_api.get("generations", headers={"X-Request-ID": sent})
    assert response["X-Request-ID"] != sent
    assert len(response["X-Request-ID"]) == 32


def test_log_lines_of_a_request_carry_its_id(api_as, admin_key, caplog):
    caplog.handler.addFilter(RequestIDLogFilter())
    caplog.set_level(logging.INFO)
    api = api_as(admin_key[1])

    created = api.post("keys", {"name": "logged"}, headers={"X-Request-ID": "rid-1"})
    missing = api.get("nope", headers={"X-Request-ID": "rid-2"})

    assert created.status_code == HTTPStatus.CREATED
    during_view = [r for r in caplog.records if r.name == "apikeys.services"]
    assert [r.request_id for r in during_view] == ["rid-1"]
    assert missing.status_code == HTTPStatus.NOT_FOUND
    after_view = [r for r in caplog.records if r.name == "django.request"]
    assert [r.request_id for r in after_view] == ["rid-2"]
    logging.getLogger("lockngen.test").warning("outside any request")
    assert caplog.records[-1].request_id == "-"


def test_the_configured_log_format_prints_the_request_id(owner_api):
    handler = next(
        h
        for h in logging.getLogger().handlers
        if h.formatter and "%(request_id)s" in (h.formatter._fmt or "")
    )
    stream = io.StringIO()
    previous = handler.setStream(stream)
    try:
        owner_api.get("nope", headers={"X-Request-ID": "rid-in-the-log"})
    finally:
        handler.setStream(previous)

    assert "[rid-in-the-log] Not Found: /api/v1/nope" in stream.getvalue()

"""The bad requests of issue 9 against a real gunicorn (SPEC §12).

Each gets a small 4xx JSON answer, writes nothing, leaves no traceback in the
server's log, and the next normal request works. One server per mode
(production behind the TLS proxy; development with DEBUG on), shared by the
module; every request has a client timeout.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any

import psycopg
import pytest

from tests.liveserver import (
    CLIENT_TIMEOUT_S,
    PROXY_HEADERS,
    LiveApi,
    Reply,
    create_key,
    live_api,
    migrate,
)
from tests.serving import scratch_database, url_for

LIMIT = 64 * 1024
MAX_ERROR_BODY = 300
JSON = "application/json"


@pytest.fixture(scope="module", params=["production", "development"])
def server(request, tmp_path_factory) -> Iterator[tuple[LiveApi, str]]:
    production = request.param == "production"
    with scratch_database("inbound") as name:
        url = url_for(name)
        migrate(url)
        admin = create_key(url, "inbound worker", admin=True)
        log = tmp_path_factory.mktemp("inbound") / "gunicorn.log"
        extra = {} if production else {"DEBUG": "1"}
        with live_api(
            url, log_path=log, key=admin, production=production, **extra
        ) as api:
            yield api, name


@pytest.fixture(scope="module")
def jobs(server) -> dict[str, str]:
    """A queued job (PATCH target) and a running one (worker endpoints)."""
    api, _ = server
    ids = []
    for prompt in ("queued first", "queued second"):
        reply = api.call("POST", "generations", {"prompt": prompt})
        assert reply.status == HTTPStatus.CREATED, reply.body
        ids.append(reply.json()["id"])
    claimed = api.call("POST", "generations/claim")
    assert claimed.status == HTTPStatus.OK, claimed.body
    (job,) = claimed.json()["jobs"]
    running = job["id"]
    queued = next(job for job in ids if job != running)
    return {"queued": queued, "running": running}


def world(database: str) -> tuple[Any, ...]:
    """Everything a bad request could have changed (not last_used_at)."""
    with psycopg.connect(url_for(database)) as conn:
        return conn.execute(
            "SELECT (SELECT md5(string_agg(g::text, ',' ORDER BY g.id))"
            " FROM generations g), (SELECT count(*) FROM api_keys)"
        ).fetchone()


def send(
    api: LiveApi,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None,
    headers: dict[str, str],
) -> Reply:
    """A raw request; an iterable body goes out chunked (no Content-Length)."""
    all_headers = {**PROXY_HEADERS, "Authorization": f"Bearer {api.key}", **headers}
    conn = http.client.HTTPConnection(
        "127.0.0.1", api.server.port, timeout=CLIENT_TIMEOUT_S
    )
    try:
        conn.request(
            method,
            path,
            body=body,
            headers=all_headers,
            encode_chunked=body is not None and not isinstance(body, bytes),
        )
        raw = conn.getresponse()
        return Reply(raw.status, raw.headers, raw.read())
    finally:
        conn.close()


def pieces(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def many_keys(count: int) -> bytes:
    return json.dumps({"prompt": "p", **{f"k{n}": n for n in range(count)}}).encode()


SURROGATE_KEY = b'{"prompt":"x","\\ud800":1,"output_path":"o","error_message":"e"}'
SURROGATE_VALUE = b'{"prompt":"x","name":"\\udc00","output_path":"\\udc00"}'
OVERSIZED = json.dumps({"prompt": "x" * LIMIT, "output_path": "o"}).encode()

# (id, method, path, body or None, Content-Type, status)
CASES = [
    ("rot13-live", "GET", "/health/live?x=1", None, "text/plain; charset=rot13", 415),
    ("rot13-ready", "GET", "/health/ready", None, "text/plain; charset=rot13", 415),
    ("rot13-list", "GET", "/api/v1/generations?x=1", None, "x/y; charset=rot13", 415),
    ("rot13-admin", "GET", "/admin/login/", None, "text/plain; charset=rot13", 415),
    ("base64-create", "POST", "generations", b"{}", f"{JSON}; charset=base64", 415),
    ("zlib-create", "POST", "generations", b"{}", f"{JSON}; charset=zlib", 415),
    ("unknown-create", "POST", "generations", b"{}", f"{JSON}; charset=nope", 415),
    ("utf16-create", "POST", "generations", b"{}", f"{JSON}; charset=utf-16", 415),
    ("deep-create", "POST", "generations", b"[" * 1000 + b"]" * 1000, JSON, 400),
    ("deep-patch", "PATCH", "generations/{queued}", b"[" * 33 + b"]" * 33, JSON, 400),
    ("keys-65-create", "POST", "generations", many_keys(65), JSON, 400),
    ("keys-100000-create", "POST", "generations", many_keys(100_000), JSON, 413),
    ("surrogate-key-create", "POST", "generations", SURROGATE_KEY, JSON, 400),
    ("surrogate-key-patch", "PATCH", "generations/{queued}", SURROGATE_KEY, JSON, 400),
    ("surrogate-key-keys", "POST", "keys", SURROGATE_KEY, JSON, 400),
    (
        "surrogate-key-complete",
        "POST",
        "generations/{running}/complete",
        SURROGATE_KEY,
        JSON,
        400,
    ),
    ("surrogate-value-create", "POST", "generations", SURROGATE_VALUE, JSON, 400),
    (
        "surrogate-value-complete",
        "POST",
        "generations/{running}/complete",
        SURROGATE_VALUE,
        JSON,
        400,
    ),
    ("oversized-create", "POST", "generations", OVERSIZED, JSON, 413),
    ("oversized-claim", "POST", "generations/claim", OVERSIZED, JSON, 413),
    (
        "oversized-heartbeat",
        "POST",
        "generations/{running}/heartbeat",
        OVERSIZED,
        JSON,
        413,
    ),
    (
        "oversized-complete",
        "POST",
        "generations/{running}/complete",
        OVERSIZED,
        JSON,
        413,
    ),
    ("oversized-fail", "POST", "generations/{running}/fail", OVERSIZED, JSON, 413),
]


def url(path: str, jobs: dict[str, str]) -> str:
    path = path.format(**jobs)
    return path if path.startswith("/") else f"/api/v1/{path}"


def assert_still_serving(api: LiveApi) -> None:
    assert api.call("GET", "/health/live", key="").status == HTTPStatus.OK
    assert api.call("GET", "generations?page_size=1").status == HTTPStatus.OK


# Each case as sent with a Content-Length and, when it has a body, chunked.
VARIANTS = [
    pytest.param(
        *case[1:], chunked, id=f"{case[0]}-{'chunked' if chunked else 'length'}"
    )
    for case in CASES
    for chunked in ((False, True) if case[3] is not None else (False,))
]


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status", "chunked"), VARIANTS
)
def test_bad_requests_get_small_json_4xx_and_change_nothing(
    server, jobs, method, path, body, content_type, status, chunked
):
    api, database = server
    before = world(database)
    log_offset = len(api.log())

    reply = send(
        api,
        method,
        url(path, jobs),
        pieces(body) if chunked else body,
        {"Content-Type": content_type},
    )

    assert reply.status == status, reply.body[:300]
    assert reply.is_json, reply.headers
    assert isinstance(reply.json()["detail"], str)
    assert len(reply.body) < MAX_ERROR_BODY
    assert reply.headers["X-Request-ID"]
    assert world(database) == before
    assert_still_serving(api)
    new_log = api.log()[log_offset:]
    assert "Traceback" not in new_log, new_log


def test_a_chunked_patch_is_read(server, jobs):
    api, _ = server
    name = "renamed in chunks"
    body = json.dumps({"name": name}).encode()

    reply = send(
        api,
        "PATCH",
        url("generations/{queued}", jobs),
        pieces(body, 5),
        {"Content-Type": JSON},
    )

    assert reply.status == HTTPStatus.OK, reply.body
    assert reply.json()["name"] == name
    assert api.call("GET", f"generations/{jobs['queued']}").json()["name"] == name


def test_a_chunked_create_is_read(server):
    api, _ = server
    body = json.dumps({"prompt": "sent in chunks", "width": 512}).encode()

    reply = send(
        api, "POST", "/api/v1/generations", pieces(body, 7), {"Content-Type": JSON}
    )

    assert reply.status == HTTPStatus.CREATED, reply.body
    assert reply.json()["width"] == 512
    assert reply.json()["prompt"] == "sent in chunks"

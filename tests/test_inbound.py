"""What a client sends is refused cleanly, once for every endpoint (SPEC §12).

In-process: the JSON parser through Django's test client (DEBUG on and off),
the WSGI gate called as WSGI. ``tests/test_inbound_live.py`` sends the same
requests to a real gunicorn.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from rest_framework.exceptions import ParseError
from rest_framework.settings import api_settings

from apikeys.models import ApiKey
from generations.models import Generation, Status
from lockngen.http.inbound import MAX_DEPTH, MAX_KEYS, RequestGate
from tests.factories import make_generation

LIMIT = 64 * 1024
# Small enough that no error body ever echoes what the client sent in bulk.
MAX_ERROR_BODY = 300


def nested(depth: int) -> str:
    """``{"prompt": [[…]]}`` with ``depth`` containers in all."""
    inner = depth - 1
    return '{"prompt": ' + "[" * inner + "]" * inner + "}"


def with_keys(count: int) -> str:
    """An object with ``count`` keys: the prompt and unknown ones."""
    return json.dumps({"prompt": "p", **{f"k{n}": n for n in range(count - 1)}})


BAD_BODIES = {
    "deep-1000": ("[" * 1000 + "]" * 1000, HTTPStatus.BAD_REQUEST, "nested deeper"),
    "deep-33": (nested(MAX_DEPTH + 1), HTTPStatus.BAD_REQUEST, "nested deeper"),
    "keys-65": (with_keys(MAX_KEYS + 1), HTTPStatus.BAD_REQUEST, "more than 64 keys"),
    "keys-100000": (
        with_keys(100_000),
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "larger than 65536",
    ),
    "over-64k": (
        json.dumps({"prompt": "x" * LIMIT}),
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        "larger than 65536",
    ),
    "surrogate-key": (
        '{"prompt":"x","\\ud800":1}',
        HTTPStatus.BAD_REQUEST,
        "surrogate",
    ),
    "surrogate-value": ('{"prompt":"x\\udc00"}', HTTPStatus.BAD_REQUEST, "surrogate"),
    "surrogate-nested": (
        '{"prompt":"x","name":[{"a":"\\uDBFF"}]}',
        HTTPStatus.BAD_REQUEST,
        "surrogate",
    ),
    "surrogate-high-then-not-low": (
        '{"prompt":"\\ud800\\u0041"}',
        HTTPStatus.BAD_REQUEST,
        "surrogate",
    ),
}

# Every endpoint whose view reads a body ({queued} / {running}: a job in that
# state). Views that ignore their body get the size limit from the WSGI gate.
ENDPOINTS = [
    ("POST", "generations"),
    ("PATCH", "generations/{queued}"),
    ("POST", "keys"),
    ("POST", "generations/{running}/complete"),
    ("POST", "generations/{running}/fail"),
]


@pytest.fixture(params=[True, False], ids=["debug", "no-debug"])
def debug(request, settings):
    settings.DEBUG = request.param
    return request.param


@pytest.fixture
def jobs(admin_key) -> dict[str, str]:
    queued = make_generation(api_key=admin_key[0])
    running = make_generation(api_key=admin_key[0])
    Generation.objects.filter(pk=running.pk).transition(
        Status.RUNNING, lease_seconds=60
    )
    return {"queued": str(queued.pk), "running": str(running.pk)}


def world() -> tuple[list[dict[str, Any]], int]:
    return list(
        Generation.all_objects.order_by("id").values()
    ), ApiKey.all_objects.count()


def assert_refused(api, method: str, path: str, case: str) -> None:
    body, status, detail = BAD_BODIES[case]
    before = world()

    response = api.request(method, path, body)

    assert response.status_code == status, (case, response.content[:500])
    assert response["Content-Type"] == "application/json"
    assert detail in response.json()["detail"]
    assert len(response.content) < MAX_ERROR_BODY
    assert world() == before


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_are_small_json_4xx_and_write_nothing(admin_api, debug, case):
    assert_refused(admin_api, "POST", "generations", case)


# One refusal of each kind (depth, width, surrogates, size) per endpoint: the
# parser and the gate are shared, so every case above need not run everywhere.
ONE_OF_EACH_KIND = ("deep-33", "keys-65", "surrogate-value", "over-64k")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=lambda p: p)
def test_every_view_that_reads_a_body_refuses_bad_ones(
    admin_api, jobs, debug, method, path
):
    for case in ONE_OF_EACH_KIND:
        assert_refused(admin_api, method, path.format(**jobs), case)


@pytest.mark.parametrize(
    ("body", "field"),
    [(nested(MAX_DEPTH), "prompt"), (with_keys(MAX_KEYS), "k0")],
    ids=["depth-32", "keys-64"],
)
def test_bodies_at_the_limits_are_parsed_and_validated(owner_api, body, field):
    response = owner_api.post("generations", body)

    # Past the parser: the serializer names the field (a list is no prompt,
    # unknown keys are unknown), so the limits themselves are allowed.
    assert response.status_code == HTTPStatus.BAD_REQUEST
    assert field in response.json()
    assert Generation.all_objects.count() == 0


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ('"\\ud83d\\ude00 fox"', "\U0001f600 fox"),  # an escaped pair is one character
        ('"\\\\ud800"', "\\ud800"),  # an escaped backslash, then text
        (json.dumps("[{:" * 300), "[{:" * 300),  # structure inside a string
        (json.dumps("\u00e9" * 4000, ensure_ascii=False), "\u00e9" * 4000),
    ],
    ids=["surrogate-pair", "escaped-backslash", "brackets-in-string", "utf-8-4000"],
)
def test_good_bodies_near_the_rules_are_accepted(owner_api, sent, stored):
    response = owner_api.post("generations", f'{{"prompt": {sent}}}')

    assert response.status_code == HTTPStatus.CREATED, response.content[:300]
    assert Generation.objects.get().prompt == stored


def test_a_body_of_exactly_64_kib_is_read(owner_api):
    body = json.dumps({"prompt": "p", "name": ""})
    body = body[:-2] + " " * (LIMIT - len(body)) + body[-2:]
    assert len(body) == LIMIT

    response = owner_api.post("generations", body)

    assert response.status_code == HTTPStatus.CREATED, response.content[:300]


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({f"k{n}": n for n in range(4000)}).encode(),
        b"[" * 30000 + b"]" * 30000,
    ],
    ids=["4000-keys", "30000-deep"],
)
def test_refusing_a_wide_or_deep_body_builds_no_python_objects(body):
    from rest_framework.parsers import JSONParser

    assert len(body) <= LIMIT
    parser = next(
        p for p in api_settings.DEFAULT_PARSER_CLASSES if issubclass(p, JSONParser)
    )
    tracemalloc.start()
    try:
        with pytest.raises(ParseError):
            parser().parse(io.BytesIO(body), "application/json", {"encoding": "utf-8"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # The body and its decoded text; a parsed dict of 4,000 keys is ~9 times
    # the body, and 30,000 levels end in RecursionError.
    assert peak < 3 * len(body)


# --- The WSGI gate ------------------------------------------------------------------


def call(
    app: Callable[..., Iterable[bytes]], **environ: Any
) -> tuple[int, dict[str, str], bytes]:
    """One WSGI call: (status, headers, body)."""
    env: dict[str, Any] = {"QUERY_STRING": "x=1"}
    setup_testing_defaults(env)
    env.update(environ)
    env.setdefault("wsgi.input", io.BytesIO(b""))
    started: list[Any] = []
    body = b"".join(
        app(env, lambda status, headers, *_: started.append((status, headers)))
    )
    status, headers = started[0]
    return int(status.split()[0]), dict(headers), body


@pytest.fixture
def application():
    from lockngen.wsgi import application

    return application


UNUSABLE_CHARSETS = [
    "rot13",
    "base64",
    "zlib",
    "bz2_codec",
    "hex",
    "no-such-charset",
    "",
    "utf-16",
    "utf-32",
    "cp037",  # EBCDIC
    "idna",
    "punycode",
    "unicode_escape",
    "utf-7",
]


@pytest.mark.parametrize(
    "path", ["/health/live", "/api/v1/generations", "/admin/login/"]
)
@pytest.mark.parametrize("charset", UNUSABLE_CHARSETS)
def test_unusable_charsets_are_json_415_on_every_url(application, charset, path):
    status, headers, body = call(
        application,
        PATH_INFO=path,
        CONTENT_TYPE=f"text/plain; charset={charset}",
        HTTP_X_REQUEST_ID="charset-probe",
    )

    assert status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Request-ID"] == "charset-probe"
    assert "charset" in json.loads(body)["detail"]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset*=no-such-charset''utf-8",  # RFC 2231
        "application/json; charset*=utf-8''rot13",
        "application/json; x=" + "y" * 2000,
    ],
    ids=["rfc2231-unknown", "rfc2231-rot13", "overlong"],
)
def test_unparseable_content_types_are_json_415(application, content_type):
    status, headers, body = call(
        application, PATH_INFO="/health/live", CONTENT_TYPE=content_type
    )

    assert status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Request-ID"]
    assert json.loads(body)["detail"]


class Recorder:
    """A WSGI app that keeps what it was given."""

    def __init__(self) -> None:
        self.environ: dict[str, Any] | None = None
        self.body = b""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.environ = environ
        self.body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]


@pytest.mark.parametrize(
    "charset", ["utf-8", "UTF8", "us-ascii", "latin-1", "ISO-8859-1", "cp1252"]
)
def test_ascii_compatible_charsets_pass(charset):
    inner = Recorder()

    status, _, _ = call(
        RequestGate(inner), CONTENT_TYPE=f"application/json; charset={charset}"
    )

    assert status == HTTPStatus.OK
    assert inner.environ is not None


def chunked(body: bytes, *, terminated: bool = True) -> dict[str, Any]:
    """The environ of a chunked request, as a server that de-chunks makes it."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "PATCH",
        "CONTENT_TYPE": "application/json",
        "HTTP_TRANSFER_ENCODING": "chunked",
        "wsgi.input": io.BytesIO(body),
    }
    if terminated:
        environ["wsgi.input_terminated"] = True
    return environ


@pytest.mark.parametrize("size", [0, 17, LIMIT], ids=["empty", "small", "limit"])
def test_a_chunked_body_reaches_the_app_with_a_content_length(size):
    inner = Recorder()
    body = b"x" * size

    status, _, _ = call(RequestGate(inner), **chunked(body))

    assert status == HTTPStatus.OK
    assert inner.environ is not None
    assert inner.environ["CONTENT_LENGTH"] == str(size)
    assert "HTTP_TRANSFER_ENCODING" not in inner.environ
    assert inner.body == body


def test_a_chunked_body_read_in_short_pieces_arrives_whole():
    class Trickle(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            return super().read(min(size if size and size > 0 else 3, 3))

    inner = Recorder()
    body = b'{"name": "read three bytes at a time"}'

    status, _, _ = call(
        RequestGate(inner), **chunked(b"") | {"wsgi.input": Trickle(body)}
    )

    assert status == HTTPStatus.OK
    assert inner.body == body


def test_a_chunked_body_over_the_limit_is_413_and_never_reaches_the_app():
    inner = Recorder()

    status, headers, body = call(RequestGate(inner), **chunked(b"x" * (LIMIT + 1)))

    assert status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "too_large"
    assert inner.environ is None


def test_a_chunked_body_the_server_cannot_dechunk_is_411():
    inner = Recorder()

    status, headers, body = call(RequestGate(inner), **chunked(b"{}", terminated=False))

    assert status == HTTPStatus.LENGTH_REQUIRED
    assert headers["Content-Type"] == "application/json"
    assert inner.environ is None


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE"])
def test_a_content_length_over_the_limit_is_413_for_every_view(method):
    inner = Recorder()

    status, headers, body = call(
        RequestGate(inner),
        REQUEST_METHOD=method,
        PATH_INFO="/api/v1/generations/claim",
        CONTENT_TYPE="application/json",
        CONTENT_LENGTH=str(LIMIT + 1),
    )

    assert status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "too_large"
    assert inner.environ is None


def test_a_broken_chunked_stream_is_400():
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise OSError("invalid chunk size")

    inner = Recorder()
    environ = chunked(b"") | {"wsgi.input": Broken()}

    status, headers, _ = call(RequestGate(inner), **environ)

    assert status == HTTPStatus.BAD_REQUEST
    assert headers["Content-Type"] == "application/json"
    assert inner.environ is None


# --- /health/: errors are JSON too ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/health/live", {}, HTTPStatus.NOT_FOUND),
        ("DELETE", "/health/ready", {}, HTTPStatus.NOT_FOUND),
        ("GET", "/health/nope", {}, HTTPStatus.NOT_FOUND),
        (
            "GET",
            "/health/",
            {"Accept": "application/x-nope"},
            HTTPStatus.NOT_ACCEPTABLE,
        ),
    ],
    ids=["post-live", "delete-ready", "unknown", "not-acceptable"],
)
def test_errors_under_health_are_json(client, db, debug, method, path, headers, status):
    response = client.generic(method, path, headers=headers)

    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert isinstance(response.json()["detail"], str)

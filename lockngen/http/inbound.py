"""What a client may send: refused cleanly before any view can trip over it.

Two layers, each the single place for its share (SPEC §12):

- ``RequestGate`` wraps the WSGI application (``lockngen.wsgi``), because
  Django builds the request — and dies on a ``charset=rot13`` — before the
  first middleware runs. It refuses unusable ``Content-Type`` charsets (415)
  and bodies over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` (413), and turns a
  ``Transfer-Encoding: chunked`` body into an ordinary one with a
  ``Content-Length`` (or refuses it: 411 / 413), for every URL.
- ``BoundedJSONParser`` is the API's only parser: a body over
  ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is 413, nesting deeper than ``MAX_DEPTH`` or
  an object with more than ``MAX_KEYS`` keys is 400 before ``json.loads``
  builds anything, and a lone surrogate anywhere (keys included) is 400.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import IO, Any

from django.conf import settings
from django.utils.http import parse_header_parameters
from rest_framework import exceptions
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils import json as drf_json

from lockngen.requestid import HEADER as REQUEST_ID_HEADER
from lockngen.requestid import META_KEY as REQUEST_ID_META_KEY
from lockngen.requestid import is_sane, new_request_id, request_id_var

logger = logging.getLogger(__name__)

MAX_DEPTH = 32
MAX_KEYS = 64
# Longer Content-Type values are not a real client's; the stdlib's header
# parser (which Django uses) should not be handed arbitrary amounts of them.
MAX_CONTENT_TYPE_LENGTH = 1000

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[WSGIEnviron, StartResponse], Iterable[bytes]]

# --- Charsets -------------------------------------------------------------------

# Query strings, percent-encoding and JSON's structure are ASCII: a charset is
# usable only if it is a text encoding that decodes ASCII to the same
# characters and decodes any other bytes the ways Django does (strictly,
# failing with UnicodeDecodeError; or with errors="replace", not failing).
# That refuses bytes-to-bytes codecs (rot13, base64, zlib: Django dies
# building the request), names that do not exist, and text codecs that
# reinterpret ASCII or cannot replace (UTF-16/32, EBCDIC, idna and punycode
# crash Django's query-string parsing; unicode_escape would manufacture
# surrogates), while every ASCII superset (UTF-8, Latin-1, cp1252, Shift-JIS …)
# still works.
_ASCII_PROBE = bytes(b for b in range(0x20, 0x7F) if b != ord("\\")) + b"\t\r\n\\u0041"
_HIGH_PROBE = bytes(range(0x80, 0x100))


@functools.lru_cache(maxsize=256)
def is_usable_charset(name: str) -> bool:
    try:
        # bytes.decode, unlike codecs.decode, refuses non-text codecs
        # (LookupError) instead of decompressing with them.
        if _ASCII_PROBE.decode(name) != _ASCII_PROBE.decode("ascii"):
            return False
        _HIGH_PROBE.decode(name, "replace")
    except (LookupError, UnicodeError):
        return False
    try:
        _HIGH_PROBE.decode(name)
    except UnicodeDecodeError:  # a byte sequence the charset lacks: ordinary
        pass
    except UnicodeError:
        return False
    return True


def charset_refusal(content_type: str) -> str | None:
    """Why this Content-Type cannot be accepted, or None if it can."""
    if len(content_type) > MAX_CONTENT_TYPE_LENGTH:
        return "Content-Type header too long."
    try:
        _, params = parse_header_parameters(content_type)
    except ValueError:  # e.g. an RFC 2231 value naming an unknown charset
        return "Malformed Content-Type header."
    charset = params.get("charset")
    if charset is not None and not is_usable_charset(charset.strip().lower()):
        return "Unsupported charset in Content-Type; send UTF-8."
    return None


# --- The WSGI gate --------------------------------------------------------------


class RequestGate:
    """WSGI middleware in front of Django: every refusal is small JSON."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(
        self, environ: WSGIEnviron, start_response: StartResponse
    ) -> Iterable[bytes]:
        refusal = self.refusal(environ)
        if refusal is not None:
            status, detail, code = refusal
            return refuse(environ, start_response, status, detail, code)
        return self.app(environ, start_response)

    def refusal(self, environ: WSGIEnviron) -> tuple[HTTPStatus, str, str] | None:
        reason = charset_refusal(environ.get("CONTENT_TYPE", ""))
        if reason is not None:
            return HTTPStatus.UNSUPPORTED_MEDIA_TYPE, reason, "unsupported_media_type"
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return buffer_chunked_body(environ)
        # Also for views that never read their body (claim, cancel …), which
        # Django's own check (when the body is read) would never see.
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return HTTPStatus.BAD_REQUEST, "Invalid Content-Length.", "bad_request"
        if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_detail(), "too_large"
        return None


def buffer_chunked_body(
    environ: WSGIEnviron,
) -> tuple[HTTPStatus, str, str] | None:
    """Replace a chunked body by the same bytes with a Content-Length.

    Django (and DRF) read ``CONTENT_LENGTH`` bytes and treat a missing one as
    an empty body, so without this a chunked PATCH would answer 200 having
    changed nothing. The server de-chunks ``wsgi.input`` only if it says so
    (``wsgi.input_terminated``: gunicorn does; wsgiref, behind ``runserver``,
    does not) — otherwise 411. At most the body limit is read: 413 beyond it.
    """
    if not environ.get("wsgi.input_terminated"):
        return (
            HTTPStatus.LENGTH_REQUIRED,
            "Chunked request bodies are not supported here; send Content-Length.",
            "length_required",
        )
    limit: int = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    stream: IO[bytes] = environ["wsgi.input"]
    pieces: list[bytes] = []
    size = 0
    try:
        # A read may return less than asked for before the end (WSGI allows it).
        while size <= limit and (piece := stream.read(limit + 1 - size)):
            pieces.append(piece)
            size += len(piece)
    except Exception as exc:  # the server's own parse errors: bad chunk sizes …
        logger.info("unreadable chunked request body: %s", type(exc).__name__)
        return HTTPStatus.BAD_REQUEST, "Malformed chunked request body.", "bad_request"
    body = b"".join(pieces)
    if len(body) > limit:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large_detail(), "too_large"
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    del environ["HTTP_TRANSFER_ENCODING"]
    return None


def too_large_detail() -> str:
    return f"Request body larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."


def refuse(
    environ: WSGIEnviron,
    start_response: StartResponse,
    status: HTTPStatus,
    detail: str,
    code: str,
) -> list[bytes]:
    """A JSON refusal with an X-Request-ID, as RequestIDMiddleware would add."""
    sent = environ.get(REQUEST_ID_META_KEY, "")
    request_id = sent if is_sane(sent) else new_request_id()
    token = request_id_var.set(request_id)  # the log line carries it as usual
    try:
        logger.warning(
            "refused %s %s: %d %s",
            environ.get("REQUEST_METHOD", "?"),
            environ.get("PATH_INFO", "?")[:200],
            status,
            detail,
        )
    finally:
        request_id_var.reset(token)
    body = json.dumps({"detail": detail, "code": code}).encode()
    start_response(
        f"{status.value} {status.phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            (REQUEST_ID_HEADER, request_id),
        ],
    )
    return [body]


# --- The JSON parser --------------------------------------------------------------


class RequestBodyTooLarge(exceptions.APIException):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"

    def __init__(self) -> None:
        super().__init__(too_large_detail())


# A JSON string (escapes included) or one structural character. Strings are
# matched whole so brackets and colons inside them are skipped.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}:]', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_shape(text: str) -> None:
    """ParseError if ``text`` nests deeper than MAX_DEPTH or has an object
    with more than MAX_KEYS keys — without building any Python object.

    Hand-written because nothing standard bounds these: ``json`` recurses
    until RecursionError (about 1,000 levels, all of which fit in 64 KB) and
    builds every object before a hook could count its keys; orjson and
    msgspec have fixed limits near 1,000 levels. Invalid JSON may be scanned
    imprecisely here; ``json.loads`` refuses it right after anyway.
    """
    # Each level needs a bracket and each key a colon: most bodies have too
    # few of either to exceed a limit, and counting is much cheaper than a scan.
    if text.count("{") + text.count("[") <= MAX_DEPTH and text.count(":") <= MAX_KEYS:
        return
    open_keys: list[int] = []  # per open container: keys so far; -1 for arrays
    for match in _TOKENS.finditer(text):
        lexeme = match.group()
        if lexeme in ("{", "["):
            open_keys.append(0 if lexeme == "{" else -1)
            if len(open_keys) > MAX_DEPTH:
                raise exceptions.ParseError(
                    f"JSON nested deeper than {MAX_DEPTH} levels."
                )
        elif lexeme in ("}", "]"):
            if open_keys:
                open_keys.pop()
        elif lexeme == ":" and open_keys and open_keys[-1] >= 0:
            open_keys[-1] += 1
            if open_keys[-1] > MAX_KEYS:
                raise exceptions.ParseError(
                    f"JSON object with more than {MAX_KEYS} keys."
                )


def has_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a lone surrogate (a ``\\ud800``
    escape) anywhere, keys included: such strings cannot be encoded, stored
    or rendered. Recursion is bounded by ``check_shape``."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(item) for item in value)
    return False


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with the bounds above (same media type, same errors)."""

    def parse(
        self,
        stream: IO[bytes],
        media_type: str | None = None,
        parser_context: dict[str, Any] | None = None,
    ) -> Any:
        encoding = get_encoding(parser_context or {})  # refuses non-text codecs
        limit: int = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        # DRF hands over request.body, which Django already bounded by
        # Content-Length; reading one byte more keeps the bound if it ever
        # passes the raw stream instead.
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise RequestBodyTooLarge()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        check_shape(text)
        try:
            data = json.loads(
                text, parse_constant=drf_json.strict_constant if self.strict else None
            )
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        if ("\\u" in text or not text.isascii()) and has_surrogate(data):
            raise exceptions.ParseError(
                "JSON strings must not contain lone surrogates (U+D800 to U+DFFF)."
            )
        return data

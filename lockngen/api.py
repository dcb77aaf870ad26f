"""The REST API's shared HTTP layer: base view, JSON-only errors, strict input
fields, the keyset paginator and the router.

Routes are registered in ``lockngen/urls.py``; the endpoints live in
``generations/api.py`` and ``apikeys/api.py``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, InterfaceError, OperationalError, connections
from django.db.models import CharField, F, Model, QuerySet, Value
from django.db.models.fields.tuple_lookups import (
    Tuple,
    TupleGreaterThan,
    TupleLessThan,
)
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.encoding import force_str
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.fields import SkipField, empty, get_error_detail
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import BasePagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.settings import api_settings
from rest_framework.utils.field_mapping import get_field_kwargs
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback
from rest_framework.viewsets import ViewSet

from apikeys.auth import ApiKeyAuthentication, HasApiKey
from apikeys.ratelimit import RateLimited, RateLimitState, rate_limit_hit
from lockngen.inbound import RequestBodyTooLarge
from lockngen.middleware import database_unavailable_response

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("django.request")

API_PREFIX = "/api/"
# Where every error is JSON (SPEC §5, §12). The one exception: /health/'s own
# report, whose 503 "unhealthy" page is content-negotiated (HTML for humans).
JSON_ERROR_PREFIXES = (API_PREFIX, "/health/")
HEALTH_REPORT_PATH = "/health/"


# --- Routing -----------------------------------------------------------------


class OptionalSlashRouter(SimpleRouter):
    """Every route with or without its trailing slash (no 301 for POSTs).

    ``SimpleRouter(trailing_slash=...)`` only knows "/" or "", so the pattern
    is set after ``__init__``. drf-spectacular documents the paths with "/".
    """

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


# --- Keyset pagination -------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """A position between rows, newest first on ``(created_at, id)``."""

    forward: bool  # True: rows older than the position; False: newer
    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{'n' if self.forward else 'p'}|{self.created_at.isoformat()}|{self.id}"
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            padded = value + "=" * (-len(value) % 4)
            raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
            direction, created_at, pk = raw.split("|")
            if direction not in {"n", "p"}:
                raise ValueError(direction)
            timestamp = datetime.fromisoformat(created_at)
            if timestamp.tzinfo is None:
                raise ValueError(created_at)
            # Normalised here so an instant outside datetime's range (year 1
            # at +01:00) is a bad cursor, not an OverflowError later.
            timestamp = timestamp.astimezone(UTC)
            return cls(direction == "n", timestamp, uuid.UUID(pk))
        except (ValueError, OverflowError, binascii.Error, UnicodeError):
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]}) from None


class KeysetPagination(BasePagination):
    """Newest first, paged by a row-value comparison on ``(created_at, id)``.

    ``WHERE (created_at, id) < (%s, %s) ORDER BY created_at DESC, id DESC
    LIMIT n + 1`` is an index range scan (``generations_key_list_idx``): a
    page 10,000 rows deep costs what the first costs, and ties on
    ``created_at`` are never skipped or repeated. One query per page; a bad
    cursor or page size is a 400 (DRF's CursorPagination pages with OFFSET on
    ties and answers a garbage cursor with 404).
    """

    default_page_size = 20
    max_page_size = 100

    def paginate(
        self,
        queryset: QuerySet,
        request: Request,
        to_json: Callable[[Any], dict[str, Any]],
    ) -> Response:
        page_size = self._page_size(request.query_params.get("page_size"))
        raw_cursor = request.query_params.get("cursor")
        cursor = Cursor.decode(raw_cursor) if raw_cursor is not None else None
        forward = cursor is None or cursor.forward
        if cursor is not None:
            row_value = Tuple(F("created_at"), F("id"))
            position = (_comparable(cursor.created_at, queryset.db), cursor.id)
            queryset = queryset.filter(
                TupleLessThan(row_value, position)
                if forward
                else TupleGreaterThan(row_value, position)
            )
        ordering = ("-created_at", "-id") if forward else ("created_at", "id")
        rows = list(queryset.order_by(*ordering)[: page_size + 1])
        more = len(rows) > page_size
        del rows[page_size:]
        if not forward:
            rows.reverse()
        has_next = more if forward else bool(rows)
        has_previous = (cursor is not None and bool(rows)) if forward else more
        return Response(
            {
                "next": _link(request, rows[-1], True) if has_next else None,
                "previous": _link(request, rows[0], False) if has_previous else None,
                "results": [to_json(row) for row in rows],
            }
        )

    def _page_size(self, raw: str | None) -> int:
        if raw is None:
            return self.default_page_size
        if not (
            raw.isascii() and raw.isdigit() and 1 <= int(raw) <= self.max_page_size
        ):
            raise exceptions.ValidationError(
                {"page_size": [f"Must be an integer from 1 to {self.max_page_size}."]}
            )
        return int(raw)

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        link = {"type": "string", "format": "uri", "nullable": True}
        return {
            "type": "object",
            "required": ["next", "previous", "results"],
            "properties": {"next": link, "previous": link, "results": schema},
        }

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": "cursor",
                "in": "query",
                "required": False,
                "description": "Opaque position from a previous page's next/previous.",
                "schema": {"type": "string"},
            },
            {
                "name": "page_size",
                "in": "query",
                "required": False,
                "description": "Rows per page.",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.max_page_size,
                    "default": self.default_page_size,
                },
            },
        ]


def _comparable(timestamp: datetime, alias: str) -> Any:
    """The timestamp as the database compares it.

    SQLite (the development fallback) keeps timestamps as text, and ``Now()``
    writes milliseconds ("… 10:00:00.123") where a Python value is written with
    microseconds ("… 10:00:00.123000"): equal instants would compare unequal.
    """
    if connections[alias].vendor != "sqlite":
        return timestamp
    text = timestamp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return Value(f"{text}.{timestamp.microsecond // 1000:03d}", CharField())


def _link(request: Request, row: Any, forward: bool) -> str:
    token = Cursor(forward, row.created_at, row.id).encode()
    return replace_query_param(request.build_absolute_uri(), "cursor", token)


# --- Views -------------------------------------------------------------------


class JsonOnlyNegotiation(BaseContentNegotiation):
    """JSON whatever ``Accept`` says: no browsable API, no 406, no parsing."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        media_type = request.content_type.split(";", 1)[0].strip().lower()
        for parser in parsers:
            if media_type == parser.media_type:
                return parser
        return None

    def select_renderer(
        self, request: Request, renderers: list[Any], format_suffix: str | None = None
    ) -> tuple[Any, str]:
        renderer = renderers[0]
        return renderer, renderer.media_type


class ApiViewSet(ViewSet):
    """Base of every ``/api/v1`` endpoint: API-key auth, then the key's rate
    limit, then permissions; JSON in, JSON out; ``X-RateLimit-*`` headers.
    """

    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [HasApiKey]
    throttle_classes: list[Any] = []  # the per-key limit runs right after auth
    content_negotiation_class = JsonOnlyNegotiation
    metadata_class = None
    # No OPTIONS: without a metadata class DRF would list it in Allow, then 405.
    http_method_names = ["get", "post", "patch", "delete", "head"]
    pagination_class = KeysetPagination  # list actions; also documents them
    lookup_field = "id"
    # Any segment reaches the view, so a malformed id is a 400, not a 404.
    lookup_value_regex = "[^/]+"

    def perform_authentication(self, request: Request) -> None:
        api_key = request.auth  # authenticates (one query)
        if api_key is None:
            return
        # Counted before permissions, so refused requests count too.
        try:
            request._request.rate_limit = rate_limit_hit(api_key)
        except RateLimited as exc:
            request._request.rate_limit = exc.state
            raise

    def finalize_response(
        self, request: Request, response: HttpResponse, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        response = super().finalize_response(request, response, *args, **kwargs)
        state: RateLimitState | None = getattr(request._request, "rate_limit", None)
        if state is not None:
            for header, value in state.headers().items():
                response[header] = value
        return response


def parse_uuid(value: str, *, field: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise exceptions.ValidationError(
            {field: [f"{value!r} is not a valid UUID."]}
        ) from None


def get_or_404(queryset: QuerySet, pk: str) -> Any:
    """The row with this id in ``queryset`` (what the key may see), else 404."""
    try:
        return queryset.get(pk=parse_uuid(pk))
    except queryset.model.DoesNotExist:
        raise exceptions.NotFound() from None


def paginate(view: ApiViewSet, queryset: QuerySet, to_json: Any) -> Response:
    return view.pagination_class().paginate(queryset, view.request, to_json)


def iso_datetime(value: datetime | None) -> str | None:
    """ISO 8601 with ``Z`` for UTC, as DRF renders datetimes."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def created(data: dict[str, Any], request: Request, location: str) -> Response:
    return Response(
        data,
        status=HTTPStatus.CREATED,
        headers={"Location": request.build_absolute_uri(location)},
    )


# --- Strict input fields -----------------------------------------------------
# DRF coerces "12", 12.0 and true to integers and 12 to a string; a JSON API
# should refuse the wrong JSON type instead of guessing.


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if type(data) is not int:
            self.fail("invalid")
        return data


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data: Any) -> float:
        if type(data) not in (int, float):
            self.fail("invalid")
        try:
            return float(data)
        except OverflowError:  # a JSON integer beyond float's range (10**400)
            self.fail("invalid")


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictUUIDField(serializers.UUIDField):
    """A UUID only as JSON text (DRF would also take the integer 42)."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if type(data) is not bool:
            self.fail("invalid")
        return data


def model_field(
    model: type[Model],
    name: str,
    field_class: type[serializers.Field],
    *,
    extra_validators: tuple[Callable[[Any], None], ...] = (),
    **kwargs: Any,
) -> serializers.Field:
    """A DRF field carrying the model field's limits, validators and default.

    The limits are defined once, on the model (``LIMITS``, ``max_length``,
    validators, and the database's integer range); this only reads them.
    """
    db_field = model._meta.get_field(name)
    options = get_field_kwargs(name, db_field)
    options.pop("model_field", None)
    if db_field.has_default() and not callable(db_field.default):
        options["default"] = db_field.default
    options["validators"] = [*options.get("validators", ()), *extra_validators]
    options.update(kwargs)
    if options.get("required"):
        options.pop("default", None)
    return field_class(**options)


class StrictSerializer(serializers.Serializer):
    """An input shape: its fields document the request body in the schema and
    validate it through ``validated()`` (unknown fields are an error too)."""


_bound_fields: dict[type[serializers.Serializer], dict[str, serializers.Field]] = {}


def validated(
    serializer_class: type[StrictSerializer], data: Any, *, partial: bool = False
) -> dict[str, Any]:
    """``data`` checked by ``serializer_class``'s fields; else ValidationError.

    What ``Serializer(data=...).is_valid()`` does, with the fields built and
    bound once per class: a Serializer instance deep-copies every declared
    field on each request, which costs more than the validation itself on the
    write path. Fields keep no state between calls, so sharing them is safe.
    With ``partial`` (PATCH) absent fields are skipped, not defaulted.
    """
    if not isinstance(data, Mapping):
        message = serializers.Serializer.default_error_messages["invalid"]
        raise exceptions.ValidationError(
            {
                api_settings.NON_FIELD_ERRORS_KEY: [
                    message.format(datatype=type(data).__name__)
                ]
            },
            code="invalid",
        )
    fields = _bound_fields.get(serializer_class)
    if fields is None:
        fields = _bound_fields[serializer_class] = dict(serializer_class().fields)
    values: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for name, field in fields.items():
        primitive = data.get(name, empty)
        if partial and primitive is empty:
            continue
        try:
            values[name] = field.run_validation(primitive)
        except exceptions.ValidationError as exc:
            errors[name] = exc.detail
        except DjangoValidationError as exc:
            errors[name] = get_error_detail(exc)
        except SkipField:
            pass
    for key in data:
        if key not in fields:
            errors[force_str(key)] = ["Unknown field."]
    if errors:
        raise exceptions.ValidationError(errors)
    return values


# --- Schema: error bodies and headers shared by every endpoint ---------------


# Response-only shapes. Not read_only: drf-spectacular lists every read-only
# field as required, and ``code`` / ``status`` are not always there.
class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    code = serializers.CharField(required=False)


class ConflictSerializer(ErrorSerializer):
    status = serializers.CharField(required=False, help_text="The current status.")


FIELD_ERRORS_SCHEMA = {
    "type": "object",
    "description": (
        "Field name → messages; `detail` for a malformed body, "
        "`non_field_errors` for a body that is not an object."
    ),
    "additionalProperties": {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]
    },
}


def error(description: str, serializer: Any = ErrorSerializer) -> OpenApiResponse:
    return OpenApiResponse(serializer, description=description)


BAD_REQUEST = {
    HTTPStatus.BAD_REQUEST: OpenApiResponse(
        FIELD_ERRORS_SCHEMA, description="Invalid input; nothing was written."
    )
}
AUTH_ERRORS = {
    HTTPStatus.UNAUTHORIZED: error(
        "Missing, unknown, revoked, expired or deleted key."
    ),
    HTTPStatus.TOO_MANY_REQUESTS: error("Rate limit exceeded; see Retry-After."),
    HTTPStatus.SERVICE_UNAVAILABLE: error(
        "The database is unavailable; see Retry-After."
    ),
}
ADMIN_ERRORS = {**AUTH_ERRORS, HTTPStatus.FORBIDDEN: error("Needs an admin key.")}
UNSUPPORTED_MEDIA_TYPE = {
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: error(
        "The body must be application/json (UTF-8, or another charset that "
        "is a superset of ASCII)."
    )
}
RESPONSE_HEADERS = [
    OpenApiParameter(
        "X-Request-ID",
        str,
        OpenApiParameter.HEADER,
        response=True,
        description="The client's X-Request-ID if sane, else a generated one.",
    ),
    *[
        OpenApiParameter(
            name,
            int,
            OpenApiParameter.HEADER,
            response=True,
            description=f"{text} (absent for unlimited keys).",
        )
        for name, text in (
            ("X-RateLimit-Limit", "Requests per minute allowed for this key"),
            ("X-RateLimit-Remaining", "Requests left in the current minute"),
            ("X-RateLimit-Reset", "Seconds until the window resets"),
        )
    ],
    OpenApiParameter(
        "Retry-After",
        int,
        OpenApiParameter.HEADER,
        response=[HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE],
        description="Seconds to wait.",
    ),
]


def document_body_limits(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular post-processing hook: the 413 that every operation with
    a request body can answer (``lockngen.inbound`` refuses bodies over the
    limit for every endpoint at once, so it is documented at once too)."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "requestBody" not in operation:
                continue
            responses = operation["responses"]
            headers = next(iter(responses.values())).get("headers", {})
            responses.setdefault(
                str(HTTPStatus.REQUEST_ENTITY_TOO_LARGE.value),
                {
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Error"}
                        }
                    },
                    "headers": {
                        name: header
                        for name, header in headers.items()
                        if name == "X-Request-ID"
                    },
                    "description": f"Request body larger than {limit} bytes.",
                },
            )
    return result


def documented(
    summary: str, *, id_description: str | None = None, **kwargs: Any
) -> Any:
    """``extend_schema`` with the shared response headers (and an id path
    parameter when ``id_description`` is given)."""
    parameters = [*kwargs.pop("parameters", []), *RESPONSE_HEADERS]
    if id_description is not None:
        parameters.insert(
            0,
            OpenApiParameter(
                "id",
                OpenApiTypes.UUID,
                OpenApiParameter.PATH,
                description=id_description,
            ),
        )
    return extend_schema(summary=summary, parameters=parameters, **kwargs)


# --- Errors: JSON for everything under /api/ ---------------------------------


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse:
    """DRF's handler, plus: database outage → 503, bad bytes → 400, and any
    other exception → a logged 500 in JSON (also with ``DEBUG`` on).
    """
    if isinstance(exc, OperationalError | InterfaceError):
        set_rollback()
        first_line = str(exc).strip().splitlines()[0] if str(exc) else ""
        logger.error("database unavailable: %s", first_line)
        return database_unavailable_response()
    if isinstance(exc, DataError):
        # Input validation should have stopped this; never show the driver's text.
        set_rollback()
        logger.warning("database refused a value: %s", exc)
        return Response(
            {"detail": "Invalid input.", "code": "invalid"},
            status=HTTPStatus.BAD_REQUEST,
        )
    if isinstance(exc, RequestDataTooBig):  # Content-Length over the limit
        exc = RequestBodyTooLarge()
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": "Bad request."}, status=HTTPStatus.BAD_REQUEST)
    response = drf_exception_handler(exc, context)
    if response is not None:
        return response
    set_rollback()
    request = context.get("request")
    request_logger.error(
        "Internal Server Error: %s",
        getattr(request, "path", "?"),
        exc_info=exc,
        extra={"status_code": 500, "request": getattr(request, "_request", None)},
    )
    body: dict[str, Any] = {"detail": "Internal server error.", "code": "error"}
    if settings.DEBUG:
        body["exception"] = f"{type(exc).__name__}: {exc}"
    return Response(body, status=HTTPStatus.INTERNAL_SERVER_ERROR)


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Catch-all for unknown ``/api/`` paths (``handler404`` is ignored under
    ``DEBUG``)."""
    return JsonResponse({"detail": "Not found."}, status=HTTPStatus.NOT_FOUND)


class ApiErrorsAsJsonMiddleware:
    """Safety net: an error response under ``/api/`` or ``/health/`` that is
    not JSON yet (a 400 from host validation, a 403 from CSRF, a 500 raised in
    a middleware, Django's debug pages) becomes ``{"detail": …}`` with the same
    status and headers.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if (
            response.status_code >= HTTPStatus.BAD_REQUEST
            and request.path.startswith(JSON_ERROR_PREFIXES)
            and not response.get("Content-Type", "").startswith("application/json")
            and not is_health_report(request, response)
        ):
            return as_json(response)
        return response


def is_health_report(request: HttpRequest, response: HttpResponse) -> bool:
    # By path, not by resolved view: a cached report may be answered before
    # URL resolution.
    return (
        request.path_info == HEALTH_REPORT_PATH
        and response.status_code == HTTPStatus.SERVICE_UNAVAILABLE
    )


def as_json(response: HttpResponse) -> JsonResponse:
    status = response.status_code
    try:
        detail = HTTPStatus(status).phrase
    except ValueError:
        detail = "Error"
    replacement = JsonResponse({"detail": f"{detail}."}, status=status)
    for header, value in response.items():
        if header.lower() not in {"content-type", "content-length"}:
            replacement[header] = value
    return replacement

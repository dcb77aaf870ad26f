"""OpenAPI pieces shared by every endpoint: error bodies, response headers,
the 413 every body can get."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers


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
# The 403 of each role an endpoint may need (apikeys.permissions).
CLIENT_ONLY = "Worker keys may not use this endpoint: it needs a client or admin key."
CLIENT_ERRORS = {**AUTH_ERRORS, HTTPStatus.FORBIDDEN: error(CLIENT_ONLY)}
WORKER_ERRORS = {
    **AUTH_ERRORS,
    HTTPStatus.FORBIDDEN: error("Needs a worker or admin key."),
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
    a request body can answer (``lockngen.http.inbound`` refuses bodies over the
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

"""The base of every ``/api/v1`` view, and the helpers the endpoints share."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from typing import Any, ClassVar

from django.db.models import QuerySet
from django.http import HttpResponse
from rest_framework import exceptions
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle
from rest_framework.viewsets import ViewSet

from lockngen.http.pagination import KeysetPagination


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
    """Base of every ``/api/v1`` endpoint: authentication, then throttles,
    then permissions; JSON in, JSON out.

    Authentication, permission and throttle classes are ``REST_FRAMEWORK``'s
    (the one place they are configured). Throttles run right after
    authentication rather than after permissions, as DRF would, so refused
    requests count against a key's limit too; a throttle with a ``headers()``
    method adds those headers to the response (``X-RateLimit-*``).

    Roles are declared, never decided in a view's code: a view opens an
    action to another role by naming it in ``permission_classes_by_action``;
    its other actions, and methods it does not allow, keep
    ``permission_classes``. Permissions run before the handler, so a key
    without the role gets its 403 before any row is looked up.
    """

    content_negotiation_class = JsonOnlyNegotiation
    throttles: list[BaseThrottle] | None = None
    metadata_class = None
    # No OPTIONS: without a metadata class DRF would list it in Allow, then 405.
    http_method_names = ["get", "post", "patch", "delete", "head"]
    pagination_class = KeysetPagination  # list actions; also documents them
    lookup_field = "id"
    # Any segment reaches the view, so a malformed id is a 400, not a 404.
    lookup_value_regex = "[^/]+"
    permission_classes_by_action: ClassVar[
        Mapping[str, Sequence[type[BasePermission]]]
    ] = {}

    def get_permissions(self) -> list[BasePermission]:
        classes = self.permission_classes_by_action.get(
            self.action, self.permission_classes
        )
        return [permission() for permission in classes]

    def perform_authentication(self, request: Request) -> None:
        request.auth  # noqa: B018 -- authenticates (one query)
        super().check_throttles(request)

    def check_throttles(self, request: Request) -> None:
        """Done in ``perform_authentication``, before permissions."""

    def get_throttles(self) -> list[BaseThrottle]:
        # One set per request (a view instance serves one request), so
        # ``finalize_response`` reads the state the check left behind.
        if self.throttles is None:
            self.throttles = super().get_throttles()
        return self.throttles

    def finalize_response(
        self, request: Request, response: HttpResponse, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        response = super().finalize_response(request, response, *args, **kwargs)
        for throttle in self.throttles or ():
            for header, value in getattr(throttle, "headers", dict)().items():
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

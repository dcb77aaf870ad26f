"""API key management over HTTP (admin keys), plus ``GET /keys/me``.

The raw key appears in exactly one response: the one that creates it. No
response ever contains the hash.
"""

from __future__ import annotations

from datetime import datetime
from http import HTTPStatus
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import OpenApiParameter, extend_schema_view
from rest_framework import exceptions, serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error

from apikeys.models import DEFAULT_RATE_LIMIT, ApiKey
from apikeys.permissions import AnyKey, IsAdminKey
from apikeys.services import (
    api_key_create,
    api_key_delete_many,
    api_key_revoke,
    is_in_the_future,
)
from lockngen.http.fields import (
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
    model_field,
    validated,
)
from lockngen.http.pagination import paginate
from lockngen.http.schema import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    BAD_REQUEST,
    UNSUPPORTED_MEDIA_TYPE,
    documented,
    error,
)
from lockngen.http.views import (
    ApiViewSet,
    created,
    get_or_404,
    parse_uuid,
)


class ApiKeySerializer(serializers.Serializer):
    """The API shape of a key (SPEC §5): never the hash, never the raw key."""

    id = serializers.UUIDField(read_only=True)
    name = serializers.CharField(read_only=True)
    prefix = serializers.CharField(
        source="key_prefix",
        read_only=True,
        help_text="The key's first 11 characters (lk_ + 8).",
    )
    is_admin = serializers.BooleanField(read_only=True)
    is_worker = serializers.BooleanField(read_only=True)
    rate_limit = serializers.IntegerField(
        read_only=True, help_text="Requests per minute; 0 = unlimited."
    )
    max_running = serializers.IntegerField(
        read_only=True,
        allow_null=True,
        help_text="At most this many of the key's jobs run at once; null = no cap.",
    )
    created_at = serializers.DateTimeField(read_only=True)
    last_used_at = serializers.DateTimeField(read_only=True, allow_null=True)
    expires_at = serializers.DateTimeField(read_only=True, allow_null=True)
    revoked_at = serializers.DateTimeField(read_only=True, allow_null=True)
    is_active = serializers.BooleanField(read_only=True)


# One instance for every response: its fields are built once, and
# ``to_representation`` keeps no state (a page of 100 keys would otherwise
# build 100 serializers).
_KEY_SHAPE = ApiKeySerializer()


def api_key_json(api_key: ApiKey) -> dict[str, Any]:
    return dict(_KEY_SHAPE.to_representation(api_key))


class NewApiKeySerializer(ApiKeySerializer):
    key = serializers.CharField(
        read_only=True, help_text="The raw key. Shown once: store it now."
    )


def in_the_future(value: datetime | None) -> None:
    # By the database's clock, the one that decides when a key expires.
    if value is not None and not is_in_the_future(value):
        raise serializers.ValidationError("Must be in the future.")


class ApiKeyCreateSerializer(StrictSerializer):
    """A new key: a client key unless ``is_admin`` or ``is_worker`` (not both)."""

    name = model_field(ApiKey, "name", StrictCharField)
    is_admin = model_field(ApiKey, "is_admin", StrictBooleanField)
    is_worker = model_field(ApiKey, "is_worker", StrictBooleanField)
    # Left out, the service picks the role's default.
    rate_limit = model_field(
        ApiKey,
        "rate_limit",
        StrictIntegerField,
        default=serializers.empty,
        help_text=(
            "Requests per minute; 0 = unlimited. Default: 0 for a worker key, "
            f"{DEFAULT_RATE_LIMIT} for the others."
        ),
    )
    max_running = model_field(
        ApiKey,
        "max_running",
        StrictIntegerField,
        help_text=(
            "At most this many of the key's own jobs run at once; null or left "
            "out = no cap."
        ),
    )
    expires_at = model_field(
        ApiKey,
        "expires_at",
        serializers.DateTimeField,
        extra_validators=(in_the_future,),
    )


ID = "API key id."
DETAIL_ERRORS = {
    **BAD_REQUEST,
    **ADMIN_ERRORS,
    HTTPStatus.NOT_FOUND: error("No such key, or deleted."),
}


@extend_schema_view(
    list=documented(
        "List API keys, newest first",
        responses={HTTPStatus.OK: ApiKeySerializer, **BAD_REQUEST, **ADMIN_ERRORS},
    ),
    create=documented(
        "Create an API key (the raw key is returned once)",
        request=ApiKeyCreateSerializer,
        parameters=[
            OpenApiParameter(
                "Location",
                str,
                OpenApiParameter.HEADER,
                response=[HTTPStatus.CREATED],
                description="URL of the new key.",
            )
        ],
        responses={
            HTTPStatus.CREATED: NewApiKeySerializer,
            **BAD_REQUEST,
            **ADMIN_ERRORS,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    retrieve=documented(
        "Read an API key",
        id_description=ID,
        responses={HTTPStatus.OK: ApiKeySerializer, **DETAIL_ERRORS},
    ),
    destroy=documented(
        "Delete an API key (soft; it stops working at once)",
        id_description=ID,
        responses={HTTPStatus.NO_CONTENT: None, **DETAIL_ERRORS},
    ),
    revoke=documented(
        "Revoke an API key for good",
        id_description=ID,
        request=None,
        responses={HTTPStatus.OK: ApiKeySerializer, **DETAIL_ERRORS},
    ),
    me=documented(
        "The calling key (any key)",
        responses={HTTPStatus.OK: ApiKeySerializer, **AUTH_ERRORS},
    ),
)
class ApiKeyViewSet(ApiViewSet):
    """API keys (admin keys only, except ``/keys/me``)."""

    permission_classes = (IsAdminKey,)
    permission_classes_by_action = {"me": (AnyKey,)}

    def list(self, request: Request) -> Response:
        return paginate(self, ApiKey.objects.with_is_active(), api_key_json)

    def create(self, request: Request) -> Response:
        fields = validated(ApiKeyCreateSerializer, request.data)
        try:
            api_key, raw_key = api_key_create(**fields)
        except DjangoValidationError as exc:  # the model's guards (one role)
            raise exceptions.ValidationError(as_serializer_error(exc)) from None
        body = {**api_key_json(api_key), "key": raw_key}
        return created(body, request, f"/api/v1/keys/{api_key.id}")

    def retrieve(self, request: Request, id: str) -> Response:
        return Response(api_key_json(get_or_404(ApiKey.objects.with_is_active(), id)))

    def destroy(self, request: Request, id: str) -> Response:
        deleted = api_key_delete_many(queryset=ApiKey.objects.filter(pk=parse_uuid(id)))
        if not deleted:
            raise exceptions.NotFound()
        return Response(status=HTTPStatus.NO_CONTENT)

    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, id: str) -> Response:
        api_key = api_key_revoke(api_key=get_or_404(ApiKey.objects.all(), id))
        return Response(api_key_json(api_key))

    @action(detail=False, methods=["get"])
    def me(self, request: Request) -> Response:
        return Response(api_key_json(request.auth))

"""Webhooks over HTTP (SPEC §5): the calling key's signing secret, and a job's
deliveries with redelivery. Client and admin keys; a job's deliveries are
seen by its owner (and admins) only, through the generations' own visibility
rule."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema_view
from rest_framework import exceptions, serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from generations.selectors import generation_get
from lockngen.http.pagination import paginate
from lockngen.http.schema import BAD_REQUEST, CLIENT_ERRORS, documented, error
from lockngen.http.views import ApiViewSet, iso_datetime, parse_uuid
from webhooks import services
from webhooks.models import WebhookDelivery, WebhookSecret

# --- Output ------------------------------------------------------------------


def secret_json(secret: WebhookSecret) -> dict[str, Any]:
    overlap_ends = (
        secret.rotated_at + services.ROTATION_OVERLAP
        if secret.rotated_at and secret.previous
        else None
    )
    return {
        "secret": secret.current,
        "created_at": iso_datetime(secret.created_at),
        "rotated_at": iso_datetime(secret.rotated_at),
        "previous_valid_until": iso_datetime(overlap_ends),
    }


class WebhookSecretSerializer(serializers.Serializer):
    """Documents ``secret_json``."""

    secret = serializers.CharField(
        read_only=True, help_text="whsec_ + base64 of 32 random bytes."
    )
    created_at = serializers.DateTimeField(read_only=True)
    rotated_at = serializers.DateTimeField(read_only=True, allow_null=True)
    previous_valid_until = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="Until then deliveries also carry the old secret's signature.",
    )


DELIVERY_FIELDS = (
    "id",
    "event",
    "state",
    "attempts",
    "last_status",
    "last_attempt_at",
    "next_attempt_at",
    "delivered_at",
    "created_at",
)


def delivery_json(row: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "event": row.event,
        "state": row.state,
        "attempts": row.attempts,
        "last_status": row.last_status or None,
        "last_attempt_at": iso_datetime(row.last_attempt_at),
        "next_attempt_at": iso_datetime(row.next_attempt_at),
        "delivered_at": iso_datetime(row.delivered_at),
        "created_at": iso_datetime(row.created_at),
    }


class WebhookDeliverySerializer(serializers.Serializer):
    """Documents ``delivery_json``."""

    id = serializers.UUIDField(read_only=True, help_text="The webhook-id header.")
    event = serializers.ChoiceField(
        choices=["generation.start", "generation.completed"], read_only=True
    )
    state = serializers.ChoiceField(
        choices=["pending", "delivered", "failed", "gone"], read_only=True
    )
    attempts = serializers.IntegerField(read_only=True)
    last_status = serializers.CharField(
        read_only=True,
        allow_null=True,
        help_text="The last attempt's HTTP status code, or a short error.",
    )
    last_attempt_at = serializers.DateTimeField(read_only=True, allow_null=True)
    next_attempt_at = serializers.DateTimeField(read_only=True, allow_null=True)
    delivered_at = serializers.DateTimeField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)


# --- Views -------------------------------------------------------------------

NOT_FOUND = {
    HTTPStatus.NOT_FOUND: error(
        "No such generation or delivery, deleted, or not this key's."
    )
}
GENERATION_ID = OpenApiParameter(
    "generation_id",
    OpenApiTypes.UUID,
    OpenApiParameter.PATH,
    description="Generation id.",
)


@extend_schema_view(
    secret=documented(
        "The calling key's webhook signing secret (created on first use)",
        responses={HTTPStatus.OK: WebhookSecretSerializer, **CLIENT_ERRORS},
    ),
    rotate=documented(
        "Rotate the signing secret (the old one keeps signing for 24 h)",
        request=None,
        responses={HTTPStatus.OK: WebhookSecretSerializer, **CLIENT_ERRORS},
    ),
)
class WebhookSecretViewSet(ApiViewSet):
    """``/webhooks/secret`` and ``/webhooks/secret/rotate``."""

    # REST_FRAMEWORK's default permission: client and admin keys (a GPU box
    # gets no secrets and no one's deliveries).

    @action(detail=False, methods=["get"], url_path="secret")
    def secret(self, request: Request) -> Response:
        return Response(secret_json(services.webhook_secret_get(api_key=request.auth)))

    @action(detail=False, methods=["post"], url_path="secret/rotate")
    def rotate(self, request: Request) -> Response:
        secret = services.webhook_secret_rotate(api_key=request.auth)
        return Response(secret_json(secret))


@extend_schema_view(
    list=documented(
        "A generation's webhook deliveries, newest first",
        parameters=[GENERATION_ID],
        responses={
            HTTPStatus.OK: WebhookDeliverySerializer,
            **BAD_REQUEST,
            **CLIENT_ERRORS,
            **NOT_FOUND,
        },
    ),
    redeliver=documented(
        "Attempt a delivery once more now, with the same webhook-id",
        parameters=[GENERATION_ID],
        id_description="Delivery id.",
        request=None,
        responses={
            HTTPStatus.ACCEPTED: WebhookDeliverySerializer,
            **BAD_REQUEST,
            **CLIENT_ERRORS,
            **NOT_FOUND,
        },
    ),
)
class WebhookDeliveryViewSet(ApiViewSet):
    """``/generations/{generation_id}/deliveries`` and its redeliver action."""

    # REST_FRAMEWORK's default permission: client and admin keys (a GPU box
    # gets no secrets and no one's deliveries).

    def deliveries(self, generation_id: str) -> Any:
        generation = generation_get(
            api_key=self.request.auth,
            pk=parse_uuid(generation_id, field="generation_id"),
        )
        if generation is None:
            raise exceptions.NotFound()
        return WebhookDelivery.objects.filter(generation=generation)

    def list(self, request: Request, generation_id: str) -> Response:
        return paginate(self, self.deliveries(generation_id), delivery_json)

    @action(detail=True, methods=["post"])
    def redeliver(self, request: Request, generation_id: str, id: str) -> Response:
        row = self.deliveries(generation_id).filter(pk=parse_uuid(id)).first()
        if row is None:
            raise exceptions.NotFound()
        row = services.delivery_redeliver(delivery=row)
        return Response(delivery_json(row), status=HTTPStatus.ACCEPTED)

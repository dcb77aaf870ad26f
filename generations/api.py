"""Generations over HTTP: validate → service → plain-dict JSON.

Clients create, list, read, rename, cancel and delete their own jobs; workers
(worker or admin keys) claim jobs, keep their lease and report the outcome. The
output is built by ``generation_json`` from the ``OUTPUT`` table (plain
functions: the read path is the hot path); ``GenerationSerializer`` is
generated from the same table to document it in the OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from django.http.request import HttpHeaders
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema_view
from rest_framework import exceptions, serializers
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.field_mapping import ClassLookupDict

from apikeys.permissions import IsWorkerOrAdminKey
from generations.claims import MAX_BATCH, generation_claim
from generations.models import (
    LIMITS,
    WEBHOOK_EVENTS,
    Generation,
    InvalidTransition,
    Status,
    decimals_validator,
    events_filter_names,
)
from generations.selectors import generation_get, generation_list
from generations.services import (
    EDITABLE_FIELDS,
    FieldNotEditable,
    IdempotencyConflict,
    IdempotencyKeyReused,
    LeaseLost,
    generation_cancel,
    generation_complete,
    generation_create,
    generation_delete,
    generation_fail,
    generation_heartbeat,
    generation_update,
)
from lockngen.http.fields import (
    StrictCharField,
    StrictFloatField,
    StrictIntegerField,
    StrictSerializer,
    StrictUUIDField,
    model_field,
    validated,
)
from lockngen.http.pagination import paginate
from lockngen.http.schema import (
    BAD_REQUEST,
    CLIENT_ERRORS,
    CLIENT_ONLY,
    UNSUPPORTED_MEDIA_TYPE,
    WORKER_ERRORS,
    ConflictSerializer,
    documented,
    error,
)
from lockngen.http.views import (
    ApiViewSet,
    created,
    iso_datetime,
    parse_uuid,
)
from webhooks.fields import WebhookEventsFilterField, WebhookURLField

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_META_KEY = HttpHeaders.to_wsgi_name(IDEMPOTENCY_HEADER)
IDEMPOTENCY_MAX_LENGTH = Generation._meta.get_field("idempotency_key").max_length
STATUS_BY_NAME = {status.label: status for status in Status}


# --- Output ------------------------------------------------------------------


def _as_is(value: Any) -> Any:
    return value


def _status_name(value: int) -> str:
    return Status(value).label


def _guidance(value: float) -> float:
    return round(value, LIMITS["guidance"].decimals)


# The API shape of a generation (SPEC §5): every field, and how its value is
# written. ``generation_json`` writes it; the schema's ``GenerationSerializer``
# is generated from it. Plain functions, not serializer field machinery: the
# read path is the hot path.
OUTPUT: dict[str, Callable[[Any], Any]] = {
    "id": str,
    "name": _as_is,
    "prompt": _as_is,
    "negative_prompt": _as_is,
    "model": _as_is,
    "width": _as_is,
    "height": _as_is,
    "steps": _as_is,
    "guidance": _guidance,
    "seed": _as_is,
    "status": _status_name,
    "prompt_id": _as_is,
    "output_path": _as_is,
    "thumbnail_path": _as_is,
    "error_message": _as_is,
    "created_at": iso_datetime,
    "updated_at": iso_datetime,
    "started_at": iso_datetime,
    "completed_at": iso_datetime,
    "duration_ms": _as_is,
    "attempts": _as_is,
    "lease_expires_at": iso_datetime,
    "webhook": _as_is,
    "webhook_events_filter": events_filter_names,
}


# What worker and admin keys see besides (SPEC §5): which GPU box holds a job.
FLEET_OUTPUT: dict[str, Callable[[Any], Any]] = {"claimed_by": _as_is}
FLEET_HELP = "Worker and admin keys only."


def generation_json(generation: Generation, *, fleet: bool = False) -> dict[str, Any]:
    """The API shape of a generation (SPEC §5); ``fleet`` for worker and
    admin keys (``ApiKey.runs_jobs``)."""
    body = {name: write(getattr(generation, name)) for name, write in OUTPUT.items()}
    if fleet:
        body |= {
            name: write(getattr(generation, name))
            for name, write in FLEET_OUTPUT.items()
        }
    return body


def leased_json(generation: Generation) -> dict[str, Any]:
    """The generation as its lease holder sees it: with the fencing token.

    Only the claim and the holder's heartbeat answer with this; no read does.
    Only worker and admin keys hold leases, so ``claimed_by`` is in it.
    """
    token = generation.lease_token
    return generation_json(generation, fleet=True) | {
        "lease_token": None if token is None else str(token)
    }


_DRF_FIELD_FOR = ClassLookupDict(serializers.ModelSerializer.serializer_field_mapping)


def _documented(name: str, **kwargs: Any) -> serializers.Field:
    """The schema of one ``OUTPUT`` field, read from the model field."""
    if name == "status":
        return serializers.ChoiceField(choices=list(STATUS_BY_NAME), read_only=True)
    if name == "webhook_events_filter":
        return serializers.ListField(
            child=serializers.ChoiceField(choices=list(WEBHOOK_EVENTS)),
            read_only=True,
            help_text="The events the webhook gets.",
        )
    db_field = Generation._meta.get_field(name)
    return model_field(
        Generation,
        name,
        _DRF_FIELD_FOR[db_field],
        **{"read_only": True, "default": serializers.empty, **kwargs},
    )


class _GenerationShape(serializers.Serializer):
    def to_representation(self, instance: Generation) -> dict[str, Any]:
        return generation_json(instance)


GenerationSerializer = type(
    "GenerationSerializer",
    (_GenerationShape,),
    {
        "__module__": __name__,
        "__doc__": "Documents ``generation_json`` for the schema.",
        **{name: _documented(name) for name in OUTPUT},
        # Not read-only: drf-spectacular lists every read-only field as
        # required, and client keys' answers leave these out (generated
        # clients would fail to parse them).
        **{
            name: _documented(
                name,
                read_only=False,
                required=False,
                help_text=FLEET_HELP,
            )
            for name in FLEET_OUTPUT
        },
    },
)


class LeasedGenerationSerializer(GenerationSerializer):
    """Documents ``leased_json``: the claim and heartbeat answers."""

    # Always there: only worker and admin keys hold leases.
    claimed_by = _documented("claimed_by", help_text=FLEET_HELP)
    lease_token = serializers.UUIDField(
        read_only=True,
        allow_null=True,
        help_text=(
            "Proof of holding the lease: send it with heartbeat, complete and "
            "fail. A new claim of the job makes a new one; null once the job "
            "is no longer running."
        ),
    )

    def to_representation(self, instance: Generation) -> dict[str, Any]:
        return leased_json(instance)


# --- Input -------------------------------------------------------------------


def _in(name: str, field_class: type[serializers.Field], **kwargs: Any) -> Any:
    return model_field(Generation, name, field_class, **kwargs)


MULTIPLE_OF_8 = "A multiple of 8."


class GenerationCreateSerializer(StrictSerializer):
    """A new job; omitted fields take the defaults shown."""

    name = _in("name", StrictCharField)
    prompt = _in("prompt", StrictCharField)
    negative_prompt = _in("negative_prompt", StrictCharField)
    model = _in("model", StrictCharField)
    width = _in("width", StrictIntegerField, help_text=MULTIPLE_OF_8)
    height = _in("height", StrictIntegerField, help_text=MULTIPLE_OF_8)
    steps = _in("steps", StrictIntegerField)
    guidance = _in(
        "guidance",
        StrictFloatField,
        extra_validators=(decimals_validator("guidance"),),
        help_text=f"At most {LIMITS['guidance'].decimals} decimal places.",
    )
    seed = _in("seed", StrictIntegerField)
    webhook = WebhookURLField(required=False, allow_null=True)
    webhook_events_filter = WebhookEventsFilterField(required=False)


# Every editable field is text.
GenerationUpdateSerializer = type(
    "GenerationUpdateSerializer",
    (StrictSerializer,),
    {
        "__module__": __name__,
        "__doc__": "Fields to change; ``prompt_id`` needs an admin key.",
        **{
            name: _in(name, StrictCharField, help_text="Admin keys only.")
            if admin_only
            else _in(name, StrictCharField)
            for name, admin_only in EDITABLE_FIELDS.items()
        },
    },
)


MAX_CLAIM_MODELS = 20
LEASE_HELP = "The lease_token of the claim that handed out this job."


class ClaimSerializer(StrictSerializer):
    """What the worker can take; every field is optional."""

    max = StrictIntegerField(
        min_value=1,
        max_value=MAX_BATCH,
        default=1,
        help_text="Take up to this many jobs in one claim.",
    )
    models = serializers.ListField(
        child=_in("model", StrictCharField, required=True, allow_null=False),
        min_length=1,
        max_length=MAX_CLAIM_MODELS,
        required=False,
        help_text="Only jobs of these models (the ones this worker has loaded).",
    )
    # ``claimed_by`` is not editable (only the claim writes it), so its model
    # field yields a read-only DRF field: the limit is read off it instead.
    worker = StrictCharField(
        max_length=Generation._meta.get_field("claimed_by").max_length,
        required=False,
        allow_null=True,
        help_text="This worker's name, kept in claimed_by while it holds the job.",
    )


class ClaimedSerializer(serializers.Serializer):
    """The jobs now running for this worker, each with its lease token."""

    jobs = LeasedGenerationSerializer(many=True, read_only=True)


class LeaseSerializer(StrictSerializer):
    """The lease holder's proof."""

    lease_token = StrictUUIDField(help_text=LEASE_HELP)


class GenerationCompleteSerializer(StrictSerializer):
    """The worker's result."""

    lease_token = StrictUUIDField(help_text=LEASE_HELP)
    output_path = _in("output_path", StrictCharField, required=True, allow_null=False)
    thumbnail_path = _in("thumbnail_path", StrictCharField)
    prompt_id = _in("prompt_id", StrictCharField)


class GenerationFailSerializer(StrictSerializer):
    """Why the job failed."""

    lease_token = StrictUUIDField(help_text=LEASE_HELP)
    error_message = _in("error_message", StrictCharField)


class GenerationFilterSerializer(StrictSerializer):
    status = serializers.ChoiceField(choices=list(STATUS_BY_NAME), required=False)
    model = _in("model", StrictCharField, default=serializers.empty)


def idempotency_key(request: Request) -> str | None:
    # META, not ``request.headers``: that builds a dict of every header.
    value = request.META.get(IDEMPOTENCY_META_KEY)
    if value is None:
        return None
    if not 0 < len(value) <= IDEMPOTENCY_MAX_LENGTH or not all(
        " " <= ch <= "~" for ch in value
    ):
        raise exceptions.ValidationError(
            {
                IDEMPOTENCY_HEADER: [
                    f"Must be 1 to {IDEMPOTENCY_MAX_LENGTH} printable ASCII characters."
                ]
            }
        )
    return value


# --- Views -------------------------------------------------------------------

ID = "Generation id."
NOT_FOUND = {
    HTTPStatus.NOT_FOUND: error("No such generation, deleted, or not this key's.")
}
CONFLICT = {
    HTTPStatus.CONFLICT: error(
        "Not allowed in the current status (named in the body).", ConflictSerializer
    )
}
OK = {HTTPStatus.OK: GenerationSerializer}
LEASED = {HTTPStatus.OK: LeasedGenerationSerializer}
LEASE_CONFLICT = {
    HTTPStatus.CONFLICT: error(
        "`lease_lost`: the token is not this job's current lease (it expired "
        "and the job was claimed again, or it was never this job's); nothing "
        "changed. `invalid_transition`: not allowed in the current status "
        "(named in the body).",
        ConflictSerializer,
    )
}


@extend_schema_view(
    create=documented(
        "Queue a generation",
        request=GenerationCreateSerializer,
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                str,
                OpenApiParameter.HEADER,
                description=(
                    "Up to 100 printable ASCII characters; a repeat with the "
                    "same key and the same request returns the original "
                    "generation (200); with a different request it is refused "
                    "(422 `idempotency_key_reused`) and nothing is created."
                ),
            ),
            OpenApiParameter(
                "Location",
                str,
                OpenApiParameter.HEADER,
                response=[HTTPStatus.CREATED],
                description="URL of the new generation.",
            ),
        ],
        responses={
            HTTPStatus.CREATED: GenerationSerializer,
            HTTPStatus.OK: OpenApiResponse(
                GenerationSerializer, description="Idempotent repeat: the original."
            ),
            **BAD_REQUEST,
            **CLIENT_ERRORS,
            HTTPStatus.CONFLICT: error(
                "The Idempotency-Key belongs to a deleted generation."
            ),
            HTTPStatus.UNPROCESSABLE_ENTITY: error(
                "`idempotency_key_reused`: the Idempotency-Key was used for a "
                "different request; nothing was created."
            ),
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    list=documented(
        "List generations (own; admin: all), newest first",
        parameters=[
            OpenApiParameter("status", str, enum=list(STATUS_BY_NAME)),
            OpenApiParameter("model", str),
        ],
        responses={**OK, **BAD_REQUEST, **CLIENT_ERRORS},
    ),
    retrieve=documented(
        "Read a generation",
        id_description=ID,
        responses={**OK, **BAD_REQUEST, **CLIENT_ERRORS, **NOT_FOUND},
    ),
    partial_update=documented(
        "Rename (admin: also set prompt_id)",
        id_description=ID,
        request=GenerationUpdateSerializer,
        responses={
            **OK,
            **BAD_REQUEST,
            **CLIENT_ERRORS,
            HTTPStatus.FORBIDDEN: error(f"{CLIENT_ONLY} prompt_id needs an admin key."),
            **NOT_FOUND,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    destroy=documented(
        "Delete a generation (soft)",
        id_description=ID,
        responses={
            HTTPStatus.NO_CONTENT: None,
            **BAD_REQUEST,
            **CLIENT_ERRORS,
            **NOT_FOUND,
        },
    ),
    cancel=documented(
        "Cancel a queued or running generation",
        id_description=ID,
        request=None,
        responses={**OK, **BAD_REQUEST, **CLIENT_ERRORS, **NOT_FOUND, **CONFLICT},
    ),
    claim=documented(
        "Worker: claim up to `max` jobs (expired leases first, then keys in "
        "turn, least recently served first; never past a key's max_running)",
        request=ClaimSerializer,
        responses={
            HTTPStatus.OK: ClaimedSerializer,
            HTTPStatus.NO_CONTENT: OpenApiResponse(
                description="Nothing claimable now: wait a little and claim again."
            ),
            **BAD_REQUEST,
            **WORKER_ERRORS,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    heartbeat=documented(
        "Worker: extend the lease (a job cancelled meanwhile is returned to "
        "its holder as is: stop)",
        id_description=ID,
        request=LeaseSerializer,
        responses={
            **LEASED,
            **BAD_REQUEST,
            **WORKER_ERRORS,
            **NOT_FOUND,
            **LEASE_CONFLICT,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    complete=documented(
        "Worker: report success",
        id_description=ID,
        request=GenerationCompleteSerializer,
        responses={
            **OK,
            **BAD_REQUEST,
            **WORKER_ERRORS,
            **NOT_FOUND,
            **LEASE_CONFLICT,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
    fail=documented(
        "Worker: report failure",
        id_description=ID,
        request=GenerationFailSerializer,
        responses={
            **OK,
            **BAD_REQUEST,
            **WORKER_ERRORS,
            **NOT_FOUND,
            **LEASE_CONFLICT,
            **UNSUPPORTED_MEDIA_TYPE,
        },
    ),
)
class GenerationViewSet(ApiViewSet):
    """Image-generation jobs: clients queue and follow them, workers run them."""

    # The rest: REST_FRAMEWORK's default, client and admin keys.
    permission_classes_by_action = dict.fromkeys(
        ("claim", "heartbeat", "complete", "fail"), (IsWorkerOrAdminKey,)
    )

    def json(self, generation: Generation) -> dict[str, Any]:
        """The generation as the calling key may see it."""
        return generation_json(generation, fleet=self.request.auth.runs_jobs)

    def visible(self, id: str) -> Generation:
        """The generation with this id if the calling key may see it; else 404."""
        generation = generation_get(api_key=self.request.auth, pk=parse_uuid(id))
        if generation is None:
            raise exceptions.NotFound()
        return generation

    def list(self, request: Request) -> Response:
        params = request.query_params
        filters = validated(
            GenerationFilterSerializer,
            {name: params[name] for name in ("status", "model") if name in params},
        )
        queryset = generation_list(
            api_key=request.auth,
            status=STATUS_BY_NAME.get(filters.get("status")),
            model=filters.get("model"),
        )
        return paginate(self, queryset, self.json)

    def create(self, request: Request) -> Response:
        key = idempotency_key(request)
        fields = validated(GenerationCreateSerializer, request.data)
        try:
            generation, is_new = generation_create(
                api_key=request.auth, idempotency_key=key, **fields
            )
        except IdempotencyKeyReused:
            return Response(
                {
                    "detail": "This Idempotency-Key was used for a different request.",
                    "code": "idempotency_key_reused",
                },
                status=HTTPStatus.UNPROCESSABLE_ENTITY,
            )
        except IdempotencyConflict:
            return Response(
                {
                    "detail": "This Idempotency-Key belongs to a deleted generation.",
                    "code": "idempotency_key_reused",
                },
                status=HTTPStatus.CONFLICT,
            )
        body = self.json(generation)
        if not is_new:
            return Response(body, headers={"Idempotent-Replayed": "true"})
        return created(body, request, f"/api/v1/generations/{generation.id}")

    def retrieve(self, request: Request, id: str) -> Response:
        return Response(self.json(self.visible(id)))

    def partial_update(self, request: Request, id: str) -> Response:
        generation = self.visible(id)
        fields = validated(GenerationUpdateSerializer, request.data, partial=True)
        if fields:
            try:
                generation = generation_update(
                    generation=generation, by_admin=request.auth.is_admin, **fields
                )
            except FieldNotEditable as exc:  # the serializer allows no others
                raise exceptions.PermissionDenied(
                    f"Only admin keys may set {', '.join(exc.fields)}."
                ) from None
            except Generation.DoesNotExist:  # deleted by a concurrent request
                raise exceptions.NotFound() from None
        return Response(self.json(generation))

    def destroy(self, request: Request, id: str) -> Response:
        generation = self.visible(id)
        try:
            generation_delete(generation=generation)
        except Generation.DoesNotExist:  # deleted by a concurrent request
            raise exceptions.NotFound() from None
        return Response(status=HTTPStatus.NO_CONTENT)

    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, id: str) -> Response:
        return self._transition(id, "cancel", generation_cancel)

    @action(detail=False, methods=["post"])
    def claim(self, request: Request) -> Response:
        fields = validated(ClaimSerializer, request.data)
        jobs = generation_claim(
            max_jobs=fields["max"],
            models=fields.get("models"),
            worker=fields.get("worker"),
        )
        if not jobs:
            return Response(status=HTTPStatus.NO_CONTENT)
        return Response({"jobs": [leased_json(job) for job in jobs]})

    @action(detail=True, methods=["post"])
    def heartbeat(self, request: Request, id: str) -> Response:
        fields = validated(LeaseSerializer, request.data)
        return self._leased(
            id, "heartbeat", generation_heartbeat, leased_json, **fields
        )

    @action(detail=True, methods=["post"])
    def complete(self, request: Request, id: str) -> Response:
        fields = validated(GenerationCompleteSerializer, request.data)
        return self._leased(id, "complete", generation_complete, self.json, **fields)

    @action(detail=True, methods=["post"])
    def fail(self, request: Request, id: str) -> Response:
        fields = validated(GenerationFailSerializer, request.data)
        return self._leased(id, "fail", generation_fail, self.json, **fields)

    def _leased(
        self, id: str, verb: str, service: Any, to_json: Any, **fields: Any
    ) -> Response:
        """Run a fenced worker service; a refusal becomes its 404 / 409."""
        try:
            generation = service(pk=parse_uuid(id), **fields)
        except Generation.DoesNotExist:
            raise exceptions.NotFound() from None
        except LeaseLost:
            return Response(
                {
                    "detail": (
                        "This lease_token no longer holds the job: its lease "
                        "expired and it was claimed again, or it was never "
                        "this job's. Stop working on it."
                    ),
                    "code": "lease_lost",
                },
                status=HTTPStatus.CONFLICT,
            )
        except InvalidTransition as exc:
            return self._conflict(verb, exc)
        return Response(to_json(generation))

    def _conflict(self, verb: str, exc: InvalidTransition) -> Response:
        current = exc.current.label
        return Response(
            {
                "detail": f"Cannot {verb} a generation that is {current}.",
                "code": "invalid_transition",
                "status": current,
            },
            status=HTTPStatus.CONFLICT,
        )

    def _transition(self, id: str, verb: str, service: Any) -> Response:
        generation = self.visible(id)
        try:
            generation = service(generation=generation)
        except Generation.DoesNotExist:  # deleted since it was read
            raise exceptions.NotFound() from None
        except InvalidTransition as exc:
            return self._conflict(verb, exc)
        return Response(self.json(generation))

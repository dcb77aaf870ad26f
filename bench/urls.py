"""The service's urls plus the bare baselines the HTTP benchmarks compare with.

The baselines are what SPEC §9 calls "a bare Django view": no DRF, no auth,
no throttle, no validation; one ORM call and a ``JsonResponse``. They are only
ever routed by ``bench.wsgi``, never by the service.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from generations.models import Generation
from lockngen.urls import urlpatterns as service_urlpatterns

# The columns of the API's generation JSON (SPEC §5).
FIELDS = (
    "id",
    "name",
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "status",
    "prompt_id",
    "output_path",
    "thumbnail_path",
    "error_message",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "duration_ms",
    "attempts",
    "lease_expires_at",
)
CREATE_FIELDS = frozenset(
    {"name", "prompt", "negative_prompt", "model", "width", "height", "steps"}
    | {"guidance", "seed"}
)


def bare_read(request: HttpRequest, pk: UUID) -> JsonResponse:
    return JsonResponse(Generation.objects.values(*FIELDS).get(pk=pk))


@csrf_exempt
def bare_create(request: HttpRequest) -> JsonResponse:
    """Insert the row the API would insert (same fields, same key), 201."""
    data: dict[str, Any] = json.loads(request.body)
    generation = Generation.objects.create(
        api_key_id=request.GET["api_key"],
        **{name: value for name, value in data.items() if name in CREATE_FIELDS},
    )
    return JsonResponse(
        {name: getattr(generation, name) for name in FIELDS}, status=201
    )


urlpatterns = [
    path("bench/generations/<uuid:pk>", bare_read),
    path("bench/generations", bare_create),
    *service_urlpatterns,
]

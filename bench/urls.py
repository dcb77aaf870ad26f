"""The service's urls plus the bare baselines the HTTP benchmarks compare with.

The baselines are what SPEC §9 calls "a bare Django view": no DRF, no auth,
no throttle, no validation; one ORM call and a ``JsonResponse``. They are only
ever routed by ``bench.wsgi``, never by the service.

``urlpatterns`` is built on first access (PEP 562 module ``__getattr__``,
which Django's resolver goes through): ``python -m bench`` imports every
module of this package before Django is set up, to find the benchmarks.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

# The columns of the API's generation JSON (SPEC §5), spelled out here on
# purpose: the baseline must run none of the API's code (not even
# generations.api.OUTPUT), or the ratio would compare the API with part of
# itself. tests/test_api_generations.py's GENERATION_FIELDS pins the API side.
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
    from generations.models import Generation

    return JsonResponse(Generation.objects.values(*FIELDS).get(pk=pk))


@csrf_exempt
def bare_create(request: HttpRequest) -> JsonResponse:
    """Insert the row the API would insert (same fields, same key), 201."""
    from generations.models import Generation

    data: dict[str, Any] = json.loads(request.body)
    generation = Generation.objects.create(
        api_key_id=request.GET["api_key"],
        **{name: value for name, value in data.items() if name in CREATE_FIELDS},
    )
    return JsonResponse(
        {name: getattr(generation, name) for name in FIELDS}, status=201
    )


def __getattr__(name: str) -> Any:
    if name != "urlpatterns":
        raise AttributeError(name)
    from django.urls import path

    from lockngen.urls import urlpatterns as service_urlpatterns

    patterns = [
        path("bench/generations/<uuid:pk>", bare_read),
        path("bench/generations", bare_create),
        *service_urlpatterns,
    ]
    globals()["urlpatterns"] = patterns
    return patterns

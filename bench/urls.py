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

from generations.api import OUTPUT
from generations.models import REQUEST_FIELDS, Generation
from lockngen.urls import urlpatterns as service_urlpatterns

# The columns of the API's generation JSON (SPEC §5). Only the field *list*
# comes from the API: the baseline runs none of its code, or the ratio would
# compare the API with part of itself.
FIELDS = tuple(OUTPUT)


def bare_read(request: HttpRequest, pk: UUID) -> JsonResponse:
    return JsonResponse(Generation.objects.values(*FIELDS).get(pk=pk))


@csrf_exempt
def bare_create(request: HttpRequest) -> JsonResponse:
    """Insert the row the API would insert (same fields, same key), 201."""
    data: dict[str, Any] = json.loads(request.body)
    generation = Generation.objects.create(
        api_key_id=request.GET["api_key"],
        **{name: value for name, value in data.items() if name in REQUEST_FIELDS},
    )
    return JsonResponse(
        {name: getattr(generation, name) for name in FIELDS}, status=201
    )


urlpatterns = [
    path("bench/generations/<uuid:pk>", bare_read),
    path("bench/generations", bare_create),
    *service_urlpatterns,
]

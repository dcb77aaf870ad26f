from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apikeys.api import ApiKeyViewSet
from generations.api import GenerationViewSet
from lockngen.health import HealthView
from lockngen.http.errors import not_found
from lockngen.http.routers import OptionalSlashRouter
from webhooks.api import WebhookDeliveryViewSet, WebhookSecretViewSet

# /health/ (SPEC §6); /health/live and /health/ready are answered by
# lockngen.probes.HealthProbeMiddleware before routing.
# Our Database check, not the library's: it opens no session of its own.
health_checks = [
    "lockngen.health.Database",
    "lockngen.health.Migrations",
    "generations.health.QueueGauges",
    "webhooks.health.DeliveryGauges",
    "lockngen.health.DatabaseBackend",
    "lockngen.health.RateLimitCache",
]
if settings.DATABASES["default"].get("OPTIONS", {}).get("pool"):
    health_checks.append("lockngen.health.ConnectionPool")

# REST API (SPEC §5): every route with or without its trailing slash.
api_v1 = OptionalSlashRouter()
api_v1.register("generations", GenerationViewSet, basename="generation")
api_v1.register("keys", ApiKeyViewSet, basename="apikey")
api_v1.register("webhooks", WebhookSecretViewSet, basename="webhook-secret")
api_v1.register(
    r"generations/(?P<generation_id>[^/]+)/deliveries",
    WebhookDeliveryViewSet,
    basename="webhook-delivery",
)

urlpatterns = [
    path("api/v1/", include(api_v1.urls)),
    re_path(r"^api/schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(
        r"^api/docs/?$", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"
    ),
    re_path(r"^api(?:/.*)?$", not_found),  # JSON 404s, DEBUG or not
    path("admin/", admin.site.urls),
    path("health/", HealthView.as_view(checks=health_checks), name="health"),
]

from django.conf import settings
from django.contrib import admin
from django.urls import path

from lockngen.health import HealthView

# /health/ (SPEC §6); /health/live and /health/ready are answered by
# lockngen.probes.HealthProbeMiddleware before routing.
health_checks = [
    "health_check.checks.Database",
    "lockngen.health.Migrations",
    "health_check.checks.Cache",
    "lockngen.health.QueueGauges",
    "lockngen.health.DatabaseBackend",
    "lockngen.health.RateLimitCache",
]
if settings.DATABASES["default"].get("OPTIONS", {}).get("pool"):
    health_checks.append("lockngen.health.ConnectionPool")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/", HealthView.as_view(checks=health_checks), name="health"),
]

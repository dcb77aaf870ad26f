"""The generation queue's gauges, a check in django-health-check's dataclass shape."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import ClassVar

from django.db import DatabaseError
from django.db.models import Count, DurationField, ExpressionWrapper, F, Min
from django.db.models.functions import Now
from health_check.exceptions import ServiceUnavailable

from generations.models import Generation, KeyQueue, Status, expired_lease
from lockngen.health import MeasuredCheck, on_request_thread, short_reason


def age_seconds(age: timedelta | None) -> float:
    """A queue age in seconds, 0 when there is none (or the clocks disagree)."""
    return round(max(age.total_seconds(), 0.0), 3) if age else 0.0


@dataclasses.dataclass
class QueueGauges(MeasuredCheck):
    """Queue depth for dashboards and autoscalers (per model: what a GPU pool
    scales on); unhealthy only when the queue cannot be read."""

    alias: str = "default"
    metrics_prefix: ClassVar[str] = "queue"
    metrics_help: ClassVar[dict[str, str]] = {
        "queued": "Generations waiting for a worker",
        "oldest_queued_age_seconds": "Age of the oldest queued generation (0 if none)",
        "running": "Generations claimed by a worker",
        "expired_leases": "Running generations whose worker lease has expired",
        "queued_per_model": "Generations waiting for a worker, per model",
        "oldest_queued_age_seconds_per_model": (
            "Age of the oldest queued generation, per model"
        ),
        "keys_at_cap": "API keys running as many generations as their max_running",
    }
    metrics_labels: ClassVar[dict[str, str]] = {
        "queued_per_model": "model",
        "oldest_queued_age_seconds_per_model": "model",
    }

    async def run(self) -> None:
        await on_request_thread(self.check)

    def check(self) -> None:
        generations = Generation.objects.using(self.alias)
        try:
            # Three small statements, none a scan of the finished history:
            # the queued jobs grouped by model come from the queued partial
            # indexes (generations_lane_*), the running ones from the lease
            # index, the keys at their cap from generation_key_queues (one
            # row per key). Ages are taken on the database's clock, the one
            # created_at was written with (SPEC §11).
            per_model = list(
                generations.filter(status=Status.QUEUED)
                .values("model")
                .annotate(
                    queued=Count("pk"),
                    age=ExpressionWrapper(
                        Now() - Min("created_at"), output_field=DurationField()
                    ),
                )
                .order_by("model")
            )
            running = generations.filter(status=Status.RUNNING).aggregate(
                running=Count("pk"), expired=Count("pk", filter=expired_lease())
            )
            keys_at_cap = (
                KeyQueue.objects.using(self.alias)
                .filter(max_running__isnull=False, running__gte=F("max_running"))
                .count()
            )
        except DatabaseError as exc:
            raise ServiceUnavailable(
                f"cannot read the queue ({short_reason(exc)})"
            ) from exc
        ages = {row["model"]: age_seconds(row["age"]) for row in per_model}
        self.metrics = {
            "queued": sum(row["queued"] for row in per_model),
            "oldest_queued_age_seconds": max(ages.values(), default=0.0),
            "running": running["running"],
            "expired_leases": running["expired"],
            "queued_per_model": {row["model"]: row["queued"] for row in per_model},
            "oldest_queued_age_seconds_per_model": ages,
            "keys_at_cap": keys_at_cap,
        }

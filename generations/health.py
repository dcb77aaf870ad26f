"""The generation queue's gauges, a check in django-health-check's dataclass shape."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from django.db import DatabaseError
from django.db.models import Count, DurationField, ExpressionWrapper, Min, Q
from django.db.models.functions import Now
from health_check.exceptions import ServiceUnavailable

from generations.models import Generation, Status, expired_lease
from lockngen.health import MeasuredCheck, on_request_thread, short_reason


@dataclasses.dataclass
class QueueGauges(MeasuredCheck):
    """Queue depth for dashboards; unhealthy only when the queue cannot be read."""

    alias: str = "default"
    metrics_prefix: ClassVar[str] = "queue"
    metrics_help: ClassVar[dict[str, str]] = {
        "queued": "Generations waiting for a worker",
        "oldest_queued_age_seconds": "Age of the oldest queued generation (0 if none)",
        "running": "Generations claimed by a worker",
        "expired_leases": "Running generations whose worker lease has expired",
    }

    async def run(self) -> None:
        await on_request_thread(self.check)

    def check(self) -> None:
        queued = Q(status=Status.QUEUED)
        try:
            # One statement over the hot statuses only (status index), never a
            # scan of the finished history. The age is taken on the database's
            # clock, the one created_at was written with (SPEC §11).
            row = (
                Generation.objects.using(self.alias)
                .filter(status__in=[Status.QUEUED, Status.RUNNING])
                .aggregate(
                    queued=Count("pk", filter=queued),
                    oldest_age=ExpressionWrapper(
                        Now() - Min("created_at", filter=queued),
                        output_field=DurationField(),
                    ),
                    running=Count("pk", filter=Q(status=Status.RUNNING)),
                    expired=Count("pk", filter=expired_lease()),
                )
            )
        except DatabaseError as exc:
            raise ServiceUnavailable(
                f"cannot read the queue ({short_reason(exc)})"
            ) from exc
        age = row["oldest_age"].total_seconds() if row["oldest_age"] else 0.0
        self.metrics = {
            "queued": row["queued"],
            "oldest_queued_age_seconds": round(max(age, 0.0), 3),
            "running": row["running"],
            "expired_leases": row["expired"],
        }

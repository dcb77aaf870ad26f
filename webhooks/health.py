"""The webhook gauges of ``/health/`` (SPEC §10), a django-health-check check.

Degraded (a warning) on the SQLite fallback, where webhooks are unavailable,
and while deliveries are pending with no delivery worker alive; unhealthy
only when the gauges cannot be read.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from django.db import DatabaseError, connections
from health_check.exceptions import ServiceUnavailable, ServiceWarning

from lockngen.health import MeasuredCheck, on_request_thread, short_reason
from webhooks.services import UNAVAILABLE, webhooks_available

# A worker is alive while its procrastinate heartbeat is this recent: the
# default --stalled-after of deliver_webhooks (heartbeats every 10 s).
WORKER_ALIVE_SECONDS = 30

# One statement; the pending and failed counts read the partial indexes.
# statement_timestamp(), as Django's Now() on PostgreSQL: the clock the rows
# were written with.
GAUGES = f"""
SELECT
  (SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'),
  (SELECT coalesce(extract(epoch FROM statement_timestamp() - min(created_at)), 0)
     FROM webhook_deliveries WHERE state = 'pending'),
  (SELECT count(*) FROM webhook_deliveries
    WHERE state = 'failed'
      AND last_attempt_at > statement_timestamp() - interval '1 hour'),
  (SELECT count(*) FROM procrastinate_workers
    WHERE last_heartbeat
          > statement_timestamp() - interval '{WORKER_ALIVE_SECONDS} seconds')
"""  # noqa: S608 - a constant


@dataclasses.dataclass
class DeliveryGauges(MeasuredCheck):
    alias: str = "default"
    metrics_prefix: ClassVar[str] = "webhooks"
    metrics_help: ClassVar[dict[str, str]] = {
        "pending": "Webhook deliveries not yet delivered, failed or gone",
        "oldest_pending_age_seconds": "Age of the oldest pending delivery (0 if none)",
        "failed_last_hour": "Deliveries that exhausted their retries in the last hour",
        "workers_alive": "Delivery workers with a recent heartbeat",
    }

    async def run(self) -> None:
        await on_request_thread(self.check)

    def check(self) -> None:
        if not webhooks_available():
            raise ServiceWarning(f"webhooks are unavailable: {UNAVAILABLE}")
        try:
            with connections[self.alias].cursor() as cursor:
                cursor.execute(GAUGES)
                pending, age, failed, workers = cursor.fetchone()
        except DatabaseError as exc:
            raise ServiceUnavailable(
                f"cannot read the webhook deliveries ({short_reason(exc)})"
            ) from exc
        self.metrics = {
            "pending": pending,
            "oldest_pending_age_seconds": round(max(float(age), 0.0), 3),
            "failed_last_hour": failed,
            "workers_alive": workers,
        }
        if pending and not workers:
            raise ServiceWarning(
                f"{pending} webhook delivery(ies) pending and no delivery worker "
                "alive (run manage.py deliver_webhooks)"
            )

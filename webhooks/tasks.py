"""The delivery task on procrastinate (found by its Django contrib's autodiscovery).

One job run is one attempt. The next attempt is procrastinate's retry of the
same job, at the time the attempt wrote on the delivery row (the schedule and
its jitter are ``webhooks.services``'): the task raises ``RetryAt`` and our
retry strategy hands that time to procrastinate.
"""

from __future__ import annotations

from datetime import datetime

from procrastinate import BaseRetryStrategy, RetryDecision
from procrastinate.contrib.django import app
from procrastinate.jobs import Job

from webhooks import services
from webhooks.models import DeliveryState

QUEUE = "webhooks"
# An unexpected error (the database unreachable while recording, a bug) is
# retried too, so a committed event is not dropped: backoff doubling from
# 5 s to 10 min, then the job fails (its delivery stays pending and visible).
UNEXPECTED_RETRIES = 20


class RetryAt(Exception):  # noqa: N818 - a signal to the retry strategy, not an error
    def __init__(self, when: datetime) -> None:
        self.when = when
        super().__init__(f"next attempt at {when.isoformat()}")


class DeliveryRetry(BaseRetryStrategy):
    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> RetryDecision | None:
        if isinstance(exception, RetryAt):
            return RetryDecision(retry_at=exception.when)
        if job.attempts < UNEXPECTED_RETRIES:
            return RetryDecision(retry_in={"seconds": min(5 * 2**job.attempts, 600)})
        return None


@app.task(queue=QUEUE, retry=DeliveryRetry(), name="webhooks.deliver")
def deliver(delivery_id: str, redelivery: bool = False) -> None:
    result = services.delivery_attempt(delivery_id=delivery_id, redelivery=redelivery)
    if result and result.state == DeliveryState.PENDING and result.retry_at:
        raise RetryAt(result.retry_at)

"""The delivery task on procrastinate (found by its Django contrib's autodiscovery).

One job run is one attempt. The next attempt is procrastinate's retry of the
same job, at the time the attempt wrote on the delivery row (the schedule and
its jitter are ``webhooks.services``'): the task raises ``RetryAt`` and our
retry strategy hands that time to procrastinate.
"""

from __future__ import annotations

from procrastinate import BaseRetryStrategy, RetryDecision
from procrastinate.contrib.django import app
from procrastinate.jobs import Job

from webhooks import services
from webhooks.models import DeliveryState
from webhooks.retry import RetryAt
from webhooks.wake import QUEUE

# An unexpected error (the database unreachable while recording, a bug) is
# retried too, so a committed event is not dropped: every few seconds, until
# the job has run this many times in all (its delivery then stays pending,
# visible in the gauges and the admin, and can be redelivered).
UNEXPECTED_RETRY_SECONDS = 5
MAX_JOB_RUNS = 50


class DeliveryRetry(BaseRetryStrategy):
    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> RetryDecision | None:
        if isinstance(exception, RetryAt):
            return RetryDecision(retry_at=exception.when)
        if job.attempts < MAX_JOB_RUNS:
            return RetryDecision(retry_in={"seconds": UNEXPECTED_RETRY_SECONDS})
        return None


@app.task(queue=QUEUE, retry=DeliveryRetry(), name="webhooks.deliver")
def deliver(delivery_id: str, redelivery: bool = False) -> None:
    result = services.delivery_attempt(delivery_id=delivery_id, redelivery=redelivery)
    if result and result.state == DeliveryState.PENDING and result.retry_at:
        raise RetryAt(result.retry_at)

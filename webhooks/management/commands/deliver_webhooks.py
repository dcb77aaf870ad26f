"""Run the webhook delivery worker: procrastinate's worker on the delivery queue.

It connects to PostgreSQL directly (procrastinate's psycopg connector built
from the same ``DATABASES["default"]``) because it LISTENs for new jobs.
Behind PgBouncer's transaction pooling LISTEN does not work: point
``DATABASE_URL`` at PostgreSQL itself for this process, or pass
``--polling`` (new jobs are then picked up within ``--poll-interval``).

What procrastinate does not do by itself, added here: a job whose worker
died mid-attempt (SIGKILL, a lost machine) stays ``doing`` forever.
procrastinate records worker heartbeats and can list such stalled jobs; this
command hands them back to the queue every few seconds (``recover_stalled``),
so the delivery is attempted again with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from webhooks.services import UNAVAILABLE, webhooks_available

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Deliver webhooks: run procrastinate's worker on the delivery queue."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--check",
            action="store_true",
            help="Exit 0 if webhooks can run here (PostgreSQL), else 1; start nothing.",
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=10,
            help="Deliveries attempted at once (default 10).",
        )
        parser.add_argument(
            "--polling",
            action="store_true",
            help="Poll for new jobs instead of LISTEN (behind PgBouncer).",
        )
        parser.add_argument(
            "--poll-interval",
            type=float,
            default=5.0,
            help="Seconds between polls when nothing was notified (default 5).",
        )
        parser.add_argument(
            "--stalled-after",
            type=float,
            default=30.0,
            help=(
                "Seconds without a heartbeat after which another worker's "
                "jobs are taken back (default 30; heartbeats every third of it)."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not webhooks_available():
            raise CommandError(UNAVAILABLE)
        if options["check"]:
            return
        if options["concurrency"] < 1 or options["stalled_after"] <= 0:
            raise CommandError("--concurrency and --stalled-after must be positive")
        from procrastinate.contrib.django import app

        from webhooks.tasks import QUEUE

        # As procrastinate's own `manage.py procrastinate worker` does: the
        # Django connector cannot LISTEN, the worker connector can.
        with app.replace_connector(app.connector.get_worker_connector()):
            asyncio.run(run(app, queue=QUEUE, **options))


async def run(app: Any, *, queue: str, **options: Any) -> None:
    stalled_after = options["stalled_after"]
    async with app.open_async():
        recovery = asyncio.create_task(
            recover_stalled(app, queue=queue, stalled_after=stalled_after)
        )
        try:
            await app.run_worker_async(
                queues=[queue],
                concurrency=options["concurrency"],
                listen_notify=not options["polling"],
                fetch_job_polling_interval=options["poll_interval"],
                update_heartbeat_interval=stalled_after / 3,
                stalled_worker_timeout=stalled_after,
                install_signal_handlers=True,
            )
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery


async def recover_stalled(app: Any, *, queue: str, stalled_after: float) -> None:
    """Hand back to the queue the jobs of workers whose heartbeat stopped."""
    while True:
        try:
            stalled = await app.job_manager.get_stalled_jobs(
                queue=queue, seconds_since_heartbeat=stalled_after
            )
            for job in stalled:
                logger.warning("retrying delivery job %s of a stalled worker", job.id)
                await app.job_manager.retry_job(job)
        except Exception:
            # The database may be restarting: the worker reconnects, so do we.
            logger.warning("stalled-job recovery failed; trying again", exc_info=True)
        await asyncio.sleep(max(stalled_after / 3, 0.5))

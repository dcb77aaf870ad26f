"""Hard-delete soft-deleted rows older than N days, in batches.

Generations go first: ``generations.api_key`` is PROTECT, so a key can only go
once no generation (deleted or not) points at it; keys still referenced stay.
Each batch is its own short transaction, so a large purge never holds locks
for long and can be interrupted and resumed. Webhook deliveries that are
finished (delivered, failed, gone) and older than the cut-off go too, and so
do procrastinate's finished delivery jobs (webhooks.services).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, ProtectedError, QuerySet
from django.db.models.functions import Now

from apikeys.models import ApiKey
from generations.models import Generation
from lockngen.management.arguments import non_negative, positive
from webhooks.services import deliveries_prune, finished_jobs_prune

logger = logging.getLogger(__name__)


def purge(candidates: QuerySet, *, batch_size: int) -> int:
    """Hard-delete ``candidates`` batch by batch; returns how many went."""
    purged = 0
    while True:
        pks = candidates.order_by("pk").values_list("pk", flat=True)
        batch = list(pks[:batch_size])
        if not batch:
            return purged
        try:
            with transaction.atomic():
                count, _ = candidates.filter(pk__in=batch).hard_delete()
        except (IntegrityError, ProtectedError):
            # A generation began pointing at a key of this batch meanwhile.
            logger.warning("purge_deleted: a batch is referenced again; stopped")
            return purged
        if not count:  # restored meanwhile: nothing left to do
            return purged
        purged += count


class Command(BaseCommand):
    help = (
        "Hard-delete soft-deleted generations and API keys deleted more than "
        "--older-than-days days ago, in batches (keys still referenced stay), "
        "and finished webhook deliveries and delivery jobs older than that."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than-days",
            type=non_negative,
            required=True,
            metavar="N",
            help="purge rows soft-deleted more than N days ago",
        )
        parser.add_argument(
            "--batch-size",
            type=positive,
            default=1000,
            metavar="B",
            help="rows deleted per transaction (default 1000)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # The database clock decides, as it wrote deleted_at.
        age = timedelta(days=options["older_than_days"])
        cutoff = Now() - age
        batch_size = options["batch_size"]

        generations = purge(
            Generation.all_objects.filter(is_deleted=True, deleted_at__lt=cutoff),
            batch_size=batch_size,
        )
        old_keys = ApiKey.all_objects.filter(is_deleted=True, deleted_at__lt=cutoff)
        referenced = Generation.all_objects.filter(api_key=OuterRef("pk"))
        keys = purge(old_keys.filter(~Exists(referenced)), batch_size=batch_size)
        kept = old_keys.filter(Exists(referenced)).count()
        deliveries = deliveries_prune(older_than=age, batch_size=batch_size)
        finished_jobs_prune(older_than=age)

        logger.info(
            "purged %d generations, %d API keys and %d webhook deliveries",
            generations,
            keys,
            deliveries,
        )
        self.stdout.write(
            f"Purged {generations} generation(s) and {keys} API key(s) deleted "
            f"more than {options['older_than_days']} day(s) ago, and "
            f"{deliveries} finished webhook delivery(ies) older than that."
        )
        if kept:
            self.stdout.write(
                f"Kept {kept} deleted API key(s) that generations still reference."
            )

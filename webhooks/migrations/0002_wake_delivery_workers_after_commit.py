"""procrastinate's job-inserted NOTIFY moves out of the transition's transaction.

procrastinate's insert trigger NOTIFYs its workers from inside the
transaction that defers a job: for us, every transition that carries a
webhook. PostgreSQL commits notifying transactions one at a time (a lock
held through the commit's WAL flush), so those transitions would commit
single file. The trigger is disabled; ``webhooks.wake`` sends the same
notification once the transition has committed.
tests/test_webhook_worker.py checks that no trigger on procrastinate's jobs
table NOTIFYs on insert, so a procrastinate upgrade that brings one back
fails there.
"""

from django.apps import apps
from django.db import migrations

from lockngen.migration_operations import PostgreSQLOnly

TRIGGER = "procrastinate_jobs_notify_queue_job_inserted_v1"

dependencies = [("webhooks", "0001_initial")]
if apps.is_installed("procrastinate.contrib.django"):
    # Installed on PostgreSQL only (lockngen.settings): its migrations made
    # the trigger.
    dependencies.append(("procrastinate", "0041_post_retry_failed_job"))


class Migration(migrations.Migration):
    dependencies = dependencies

    operations = [
        PostgreSQLOnly(
            sql=f"ALTER TABLE procrastinate_jobs DISABLE TRIGGER {TRIGGER}",
            reverse_sql=f"ALTER TABLE procrastinate_jobs ENABLE TRIGGER {TRIGGER}",
        ),
    ]

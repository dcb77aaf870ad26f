"""A delivery keeps the job as its event saw it; the payload is rendered later.

The transition's read-back and its outbox are one statement
(``webhooks.services.emit``): it writes the job's row as ``snapshot``
(jsonb) and no payload. The first attempt renders the payload — the owner's
view of the job, ``generations.api.generation_json`` — from the snapshot and
keeps it, so every attempt sends the same bytes. Rows written before this
migration have a payload already; either column may be the one filled, never
neither.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("generations", "0004_webhook_fields"),
        ("webhooks", "0002_wake_delivery_workers_after_commit"),
    ]

    operations = [
        migrations.AddField(
            model_name="webhookdelivery",
            name="snapshot",
            field=models.JSONField(blank=True, editable=False, null=True),
        ),
        migrations.AlterField(
            model_name="webhookdelivery",
            name="payload",
            field=models.TextField(blank=True, null=True),
        ),
        migrations.AddConstraint(
            model_name="webhookdelivery",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    ("payload__isnull", False),
                    ("snapshot__isnull", False),
                    _connector="OR",
                ),
                name="webhook_deliv_has_body",
            ),
        ),
    ]

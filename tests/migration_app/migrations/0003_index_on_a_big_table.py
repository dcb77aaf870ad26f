"""An index on what may be a big table: building it takes a lock on the table.

``migration_script`` must print its SQL without building it on the target
(tests/test_migrations.py holds an INSERT open on the table meanwhile).
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("migration_app", "0002_rework")]

    operations = [
        migrations.AddIndex(
            model_name="widget",
            index=models.Index(fields=["sku", "size"], name="widget_sku_size_idx"),
        ),
    ]

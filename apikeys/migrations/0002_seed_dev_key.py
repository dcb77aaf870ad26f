"""Seed the development admin key (development only; production seeds nothing).

Calls the same idempotent function as ``manage.py seed_dev_key``. Reversing it
keeps the key: generations may point at it (PROTECT, so deleting it would fail
at commit), and re-applying finds it again; ``migrate apikeys zero`` drops the
table anyway.
"""

from django.db import migrations


def seed(apps, schema_editor):
    from apikeys.services import api_key_seed_dev

    api_key_seed_dev(model=apps.get_model("apikeys", "ApiKey"))


class Migration(migrations.Migration):
    dependencies = [("apikeys", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop, elidable=False)]

"""Seed the development admin key (development only; production seeds nothing).

Calls the same idempotent function as ``manage.py seed_dev_key``.
"""

from django.conf import settings
from django.db import migrations

from apikeys.keys import hash_key


def seed(apps, schema_editor):
    from apikeys.services import api_key_seed_dev

    api_key_seed_dev(model=apps.get_model("apikeys", "ApiKey"))


def unseed(apps, schema_editor):
    ApiKey = apps.get_model("apikeys", "ApiKey")
    ApiKey._base_manager.filter(
        key_hash=hash_key(settings.LOCKNGEN_DEV_API_KEY)
    ).delete()


class Migration(migrations.Migration):
    dependencies = [("apikeys", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed, elidable=False)]

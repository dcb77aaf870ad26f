"""Seed the development admin key (development only; production seeds nothing).

Frozen on purpose: this carries its own copy of what ``api_key_seed_dev``
(``manage.py seed_dev_key``) did when it was written, on the historical model,
so a later change to the live service cannot rewrite what this migration did.
Only the settings (the environment) are read live. Reversing it keeps the key:
generations may point at it (PROTECT, so deleting it would fail at commit),
and re-applying finds it again; ``migrate apikeys zero`` drops the table anyway.
"""

import hashlib

from django.conf import settings
from django.db import migrations

DEV_KEY_NAME = "development admin key"
DEFAULT_DEV_API_KEY = "lk_devkey00_insecure-development-key-do-not-deploy"
PREFIX_LENGTH = 11  # "lk_" + 8 alphanumerics


def seed(apps, schema_editor):
    if settings.PRODUCTION:
        return
    raw_key = settings.LOCKNGEN_DEV_API_KEY or DEFAULT_DEV_API_KEY
    key_hash = hashlib.sha256(raw_key.encode()).hexdigest()
    prefix = raw_key[:PREFIX_LENGTH]
    keys = apps.get_model("apikeys", "ApiKey").objects.using(
        schema_editor.connection.alias
    )
    if keys.filter(key_hash=key_hash).exists():
        return
    if keys.filter(key_prefix=prefix).exists():
        raise ValueError(
            f"another key already uses the prefix {prefix}; "
            "choose a LOCKNGEN_DEV_API_KEY with different first 11 characters"
        )
    keys.create(
        name=DEV_KEY_NAME,
        is_admin=True,
        rate_limit=0,
        key_hash=key_hash,
        key_prefix=prefix,
    )


class Migration(migrations.Migration):
    dependencies = [("apikeys", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop, elidable=False)]

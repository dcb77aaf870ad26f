from __future__ import annotations

import contextlib
from pathlib import Path

from django.apps import AppConfig
from django.conf import settings


class LockngenConfig(AppConfig):
    name = "lockngen"
    verbose_name = "LockN Gen"

    def ready(self) -> None:
        # The directories a development checkout writes to, made once Django
        # starts rather than as a side effect of importing settings. WhiteNoise
        # warns on every start while STATIC_ROOT is missing (before the first
        # collectstatic: the image collects at build time, development need
        # not); a read-only file system just keeps the warning.
        directories = [Path(settings.STATIC_ROOT)]
        if settings.DATABASE_FALLBACK:
            directories.append(Path(settings.DATABASES["default"]["NAME"]).parent)
        for directory in directories:
            with contextlib.suppress(OSError):
                directory.mkdir(parents=True, exist_ok=True)

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apikeys.services import api_key_seed_dev, dev_api_key


class Command(BaseCommand):
    help = "Ensure the development admin API key exists (development only)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--print",
            action="store_true",
            help="print the raw development key (it is documented, not secret)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.PRODUCTION:
            raise CommandError("seed_dev_key does nothing in production", returncode=1)
        try:
            api_key = api_key_seed_dev()
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"development admin key {api_key.key_prefix}… is ready")
        if options["print"]:
            self.stdout.write(f"  API key   {dev_api_key()}")

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apikeys.keys import PREFIX_LENGTH
from apikeys.models import ApiKey
from apikeys.services import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key for good, by its prefix (lk_ + 8 characters)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="the key's prefix, e.g. lk_AbCd1234")

    def handle(self, *args: Any, **options: Any) -> None:
        prefix = options["prefix"].strip().rstrip("…")
        if len(prefix) != PREFIX_LENGTH:
            raise CommandError(
                f"PREFIX is the first {PREFIX_LENGTH} characters of the key "
                "(lk_ + 8 letters or digits)"
            )
        api_key = ApiKey.all_objects.filter(key_prefix=prefix).first()
        if api_key is None:
            raise CommandError(f"no API key has the prefix {prefix}")
        if api_key.revoked_at is not None:
            self.stdout.write(
                f"API key {prefix}… ({api_key.name}) was already revoked at "
                f"{api_key.revoked_at.isoformat()}"
            )
            return
        api_key = api_key_revoke(api_key=api_key)
        self.stdout.write(
            f"Revoked API key {prefix}… ({api_key.name}) at "
            f"{api_key.revoked_at.isoformat()}"
        )

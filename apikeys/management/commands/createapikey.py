from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apikeys.models import DEFAULT_RATE_LIMIT, ApiKey
from apikeys.services import api_key_create
from lockngen.management.arguments import non_negative, positive

NAME_MAX_LENGTH = ApiKey._meta.get_field("name").max_length


class Command(BaseCommand):
    help = (
        "Create an API key and print the raw key once (stdout; the notes go to "
        "stderr, so KEY=$(manage.py createapikey worker --admin) works)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument(
            "--admin", action="store_true", help="admin key (workers, key management)"
        )
        parser.add_argument(
            "--rate-limit",
            type=non_negative,
            default=DEFAULT_RATE_LIMIT,
            metavar="N",
            help="requests per minute; 0 = unlimited (default %(default)s)",
        )
        parser.add_argument(
            "--expires-in-days",
            type=positive,
            default=None,
            metavar="N",
            help="the key stops working after N days (default: never)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"].strip()
        if not name or len(name) > NAME_MAX_LENGTH:
            raise CommandError(f"NAME must be 1..{NAME_MAX_LENGTH} characters")
        days = options["expires_in_days"]
        api_key, raw_key = api_key_create(
            name=name,
            is_admin=options["admin"],
            rate_limit=options["rate_limit"],
            expires_in=timedelta(days=days) if days else None,
        )
        expires = api_key.expires_at.isoformat() if api_key.expires_at else "never"
        self.stderr.write(
            f"Created {'admin ' if api_key.is_admin else ''}API key "
            f"{api_key.key_prefix}… ({api_key.name}), rate limit "
            f"{api_key.rate_limit or 'unlimited'}/min, expires {expires}.\n"
            "Store the key now: it is shown only this once."
        )
        self.stdout.write(raw_key)

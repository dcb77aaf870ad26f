from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apikeys.models import DEFAULT_RATE_LIMIT, ApiKey
from apikeys.services import api_key_create
from lockngen.management.arguments import positive

NAME_MAX_LENGTH = ApiKey._meta.get_field("name").max_length


def model_value(name: str) -> Any:
    """An argparse type: an integer the model field accepts (its validators,
    the database's integer range included), so a value the database would
    refuse is a usage error, not a traceback."""

    def parse(text: str) -> int:
        value = int(text)
        try:
            ApiKey._meta.get_field(name).run_validators(value)
        except ValidationError as exc:
            raise ValueError(text) from exc
        return value

    parse.__name__ = name  # argparse names the type in its error message
    return parse


class Command(BaseCommand):
    help = (
        "Create an API key and print the raw key once (stdout; the notes go to "
        "stderr, so KEY=$(manage.py createapikey gpu-1 --worker) works)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="who or what the key is for")
        role = parser.add_mutually_exclusive_group()
        role.add_argument(
            "--admin",
            action="store_true",
            help="admin key: every endpoint, key management included",
        )
        role.add_argument(
            "--worker",
            action="store_true",
            help="worker key: only claims and the jobs it holds (and /keys/me)",
        )
        parser.add_argument(
            "--rate-limit",
            type=model_value("rate_limit"),
            default=None,
            metavar="N",
            help=(
                "requests per minute; 0 = unlimited (default: 0 with --worker, "
                f"else {DEFAULT_RATE_LIMIT})"
            ),
        )
        parser.add_argument(
            "--max-running",
            type=model_value("max_running"),
            default=None,
            metavar="N",
            help="at most N of the key's own jobs run at once (default: no cap)",
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
        try:
            api_key, raw_key = api_key_create(
                name=name,
                is_admin=options["admin"],
                is_worker=options["worker"],
                rate_limit=options["rate_limit"],
                max_running=options["max_running"],
                expires_in=timedelta(days=days) if days else None,
            )
        except ValidationError as exc:  # the model's guards (argparse has most)
            raise CommandError("; ".join(exc.messages)) from None
        role = "admin " if api_key.is_admin else "worker " if api_key.is_worker else ""
        expires = api_key.expires_at.isoformat() if api_key.expires_at else "never"
        limit = f"{api_key.rate_limit}/min" if api_key.rate_limit else "unlimited"
        cap = f"at most {api_key.max_running}" if api_key.max_running else "no cap"
        self.stderr.write(
            f"Created {role}API key {api_key.key_prefix}… ({api_key.name}), rate "
            f"limit {limit}, running jobs {cap}, expires {expires}.\n"
            "Store the key now: it is shown only this once."
        )
        self.stdout.write(raw_key)

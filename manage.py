#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")
    from django.core.management import execute_from_command_line

    from lockngen.env import ConfigError

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as exc:
        # Operators get one line naming the variable, not a traceback wall.
        sys.exit(f"lockngen: configuration error: {exc}")


if __name__ == "__main__":
    main()

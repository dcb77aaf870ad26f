"""WSGI entry point (gunicorn serves ``lockngen.wsgi:application``)."""

import os
import sys

from django.core.wsgi import get_wsgi_application

from lockngen.env import ConfigError

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")

try:
    django_application = get_wsgi_application()
except ConfigError as exc:
    # One line for the operator instead of a traceback per worker boot.
    sys.exit(f"lockngen: configuration error: {exc}")

# After setup: the gate's parser half imports DRF, which reads the settings.
from lockngen.http.inbound import RequestGate  # noqa: E402

# Refuses what Django would fail to build a request from (charset=rot13 …).
application = RequestGate(django_application)

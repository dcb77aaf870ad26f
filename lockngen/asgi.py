"""ASGI entry point, for completeness; production serves WSGI via gunicorn."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")

application = get_asgi_application()

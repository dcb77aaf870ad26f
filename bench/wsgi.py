"""WSGI app for the HTTP benchmarks: the service plus bare baseline views.

gunicorn serves ``bench.wsgi:create_application()``: same settings, same
middleware, same gunicorn layout as ``lockngen.wsgi``; only ``ROOT_URLCONF``
differs (``bench.urls`` = ``lockngen.urls`` plus ``/bench/...``), so a
baseline and the API differ in nothing but the view. A factory rather than a
module-level ``application`` because ``python -m bench`` imports every module
of this package to find the benchmarks, and importing must not set Django up.
"""

from __future__ import annotations

import os
from typing import Any

APP = "bench.wsgi:create_application()"


def create_application() -> Any:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    settings.ROOT_URLCONF = "bench.urls"
    return get_wsgi_application()

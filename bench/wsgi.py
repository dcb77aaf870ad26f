"""WSGI app for the HTTP benchmarks: the service plus bare baseline views.

gunicorn serves ``bench.wsgi:application``: same settings, same middleware,
same gunicorn layout as ``lockngen.wsgi``; only ``ROOT_URLCONF`` differs
(``bench.urls`` = ``lockngen.urls`` plus ``/bench/...``), so a baseline and
the API differ in nothing but the view. Only gunicorn imports this module:
the benchmark registry (``bench.BENCHMARKS``) names benchmarks without
importing any of them.
"""

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lockngen.settings")
settings.ROOT_URLCONF = "bench.urls"
application = get_wsgi_application()

"""Error reports (DEBUG pages, admin e-mails) that never show a credential."""

from __future__ import annotations

import re

from django.views.debug import SafeExceptionReporterFilter


class CredentialsFilter(SafeExceptionReporterFilter):
    """Django's filter, plus URLs that embed passwords.

    Django hides names containing KEY, SECRET, PASS, TOKEN…; ``DATABASE_URL``
    and ``REDIS_URL`` match none of them, yet runserver copies the whole
    environment into ``request.META``.
    """

    hidden_settings = re.compile(
        r"API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|DATABASE_URL|REDIS_URL",
        flags=re.IGNORECASE,
    )

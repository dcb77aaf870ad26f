"""The API's router: every route with or without its trailing slash."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter


class OptionalSlashRouter(SimpleRouter):
    """Every route with or without its trailing slash (no 301 for POSTs).

    ``SimpleRouter(trailing_slash=...)`` only knows "/" or "", so the pattern
    is set after ``__init__``. drf-spectacular documents the paths with "/".
    """

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"

"""The per-key rate limit as a DRF throttle (``REST_FRAMEWORK`` names it).

The counting rule is ``rate_limit_hit``; this only adapts it to DRF's
throttle protocol and keeps the state the ``X-RateLimit-*`` headers report.
"""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from apikeys.auth import RateLimited, RateLimitState, rate_limit_hit


class ApiKeyRateThrottle(BaseThrottle):
    """The calling key's requests per minute; no key, nothing counted."""

    def __init__(self) -> None:
        self.state: RateLimitState | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        if request.auth is None:
            return True
        try:
            self.state = rate_limit_hit(request.auth)
        except RateLimited as exc:
            self.state = exc.state
            return False
        return True

    def wait(self) -> float | None:
        return None if self.state is None else self.state.reset_seconds

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` for the response (none for unlimited keys)."""
        return {} if self.state is None else self.state.headers()

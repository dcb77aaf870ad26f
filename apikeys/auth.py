"""HTTP side of API keys: authentication (the roles are ``apikeys.permissions``).

Authentication is one indexed lookup per request (``api_key_authenticate``),
with no cache, so a revoked key fails on its very next request. Failed
authentications are counted per client address (``apikeys.ratelimit``); past
``AUTH_FAILURES_PER_MINUTE`` a credential gets 429 before it is looked up, so
guessing keys costs no database query.
"""

from __future__ import annotations

import logging
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from apikeys.keys import hash_key
from apikeys.models import ApiKey
from apikeys.ratelimit import (
    auth_failure_record,
    auth_failures_check,
    failure_address,
)
from apikeys.services import api_key_authenticate

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
BEARER = "bearer"
REALM = "lockngen"


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

    Returns ``(None, api_key)``: there is no Django user behind a key, so
    ``request.auth`` is the key and ``request.user`` stays None.
    """

    def authenticate(self, request: Request) -> tuple[None, ApiKey] | None:
        raw_key = credentials(request.META)
        if raw_key is None:
            return None  # → 401 "not provided" once a permission asks for a key
        key_hash = hash_key(raw_key)
        if key_hash not in recently_authenticated:
            auth_failures_check(failure_address(request))  # 429 before the lookup
        api_key = api_key_authenticate(raw_key)
        if api_key is None:
            recently_authenticated.discard(key_hash)
            auth_failure_record(failure_address(request))
            raise exceptions.AuthenticationFailed(
                "Invalid API key: unknown, revoked, expired or deleted."
            )
        recently_authenticated.add(key_hash)
        return None, api_key

    def authenticate_header(self, request: Request) -> str:
        return f'Bearer realm="{REALM}"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents both headers as alternatives (either one authenticates)."""

    target_class = ApiKeyAuthentication
    name = ["BearerAuth", "ApiKeyAuth"]

    def get_security_requirement(self, auto_schema: Any) -> list[dict[str, list]]:
        return [{"BearerAuth": []}, {"ApiKeyAuth": []}]

    def get_security_definition(self, auto_schema: Any) -> list[dict[str, str]]:
        return [
            {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer lk_…",
            },
            {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        ]


def credentials(meta: dict[str, Any]) -> str | None:
    """The raw key from the request headers; Bearer wins over X-API-Key."""
    authorization = meta.get("HTTP_AUTHORIZATION", "")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == BEARER:
            return value.strip()
    api_key = meta.get("HTTP_X_API_KEY")
    if api_key is not None:
        return api_key.strip()
    if authorization:
        return ""  # some other scheme (Basic …): a credential we do not accept
    return None


class RecentlyAuthenticated:
    """Hashes of raw keys that authenticated in this process lately.

    Only credentials *not* in here pay the Redis read of the failure counter
    before their lookup, so a working key costs no extra round trip while a
    guessed one is refused before it reaches the database. Membership only
    skips that read: the key is still looked up, so a key revoked since fails
    (and leaves the set) on its very next request.

    A plain dict, cleared when full, rather than an LRU: losing the entries
    only costs each key one more counter read.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._hashes: dict[str, None] = {}

    def __contains__(self, key_hash: str) -> bool:
        return key_hash in self._hashes

    def add(self, key_hash: str) -> None:
        if len(self._hashes) >= self.size:
            self._hashes.clear()
        self._hashes[key_hash] = None

    def discard(self, key_hash: str) -> None:
        self._hashes.pop(key_hash, None)


recently_authenticated = RecentlyAuthenticated()

"""Who may call what: the three roles of SPEC §5 as DRF permission classes.

A **client** key (neither flag) works with its own generations; a **worker**
key (``is_worker``) may only claim jobs and report on the ones it holds, and
read ``/keys/me``; an **admin** key (``is_admin``) may do everything.

``REST_FRAMEWORK``'s default is ``IsClientOrAdminKey``, so an endpoint added
tomorrow is closed to worker keys unless it opts in; views pick another class
per action with ``permission_classes_by_action`` (``lockngen.http.views``).

The checks read the flags of ``request.auth``, the key row authentication
already loaded: no query. Without a key every class refuses, and DRF answers
401 (no authenticator succeeded) rather than 403.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apikeys.models import ApiKey


def _key(request: Request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


class AnyKey(BasePermission):
    """Any active key, whatever its role (``GET /keys/me``)."""

    def has_permission(self, request: Request, view: Any) -> bool:
        return _key(request) is not None


class IsClientOrAdminKey(BasePermission):
    """Every key but a worker key: the default of every endpoint."""

    message = "Worker keys may not use this endpoint: it needs a client or admin key."
    code = "client_or_admin_key_required"

    def has_permission(self, request: Request, view: Any) -> bool:
        key = _key(request)
        return key is not None and not key.is_worker


class IsWorkerOrAdminKey(BasePermission):
    """Worker keys and admin keys: claim, heartbeat, complete, fail."""

    message = "This endpoint needs a worker or admin key."
    code = "worker_or_admin_key_required"

    def has_permission(self, request: Request, view: Any) -> bool:
        key = _key(request)
        return key is not None and key.runs_jobs


class IsAdminKey(BasePermission):
    """Admin keys only: key management."""

    message = "This endpoint needs an admin key."
    code = "admin_key_required"

    def has_permission(self, request: Request, view: Any) -> bool:
        key = _key(request)
        return key is not None and key.is_admin

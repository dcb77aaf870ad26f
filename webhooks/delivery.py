"""One delivery attempt over HTTP: sign, check the target, POST, classify.

No ORM here: ``webhooks.services`` reads the row, calls ``attempt`` and
records the outcome. The connection goes to an address that passed the SSRF
guard: the request URL carries that IP, the ``Host`` header and the TLS
server name (SNI, and so certificate verification) carry the host name —
httpx's documented ``sni_hostname`` request extension — so nothing resolves
the name a second time between the check and the connect.
"""

from __future__ import annotations

import base64
import functools
import logging
import secrets
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from webhooks import guard

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format, not a secret
USER_AGENT = "lockngen-webhooks/1.0"
GONE = 410


def new_secret() -> str:
    """``whsec_`` + base64 of 32 random bytes (the Standard Webhooks form)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature_header(
    *, delivery_id: str, timestamp: int, body: str, secrets_: Sequence[str]
) -> str:
    """``v1,<sig>`` per secret, space-separated (two during a rotation's overlap)."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return " ".join(
        Webhook(secret).sign(msg_id=delivery_id, timestamp=moment, data=body)
        for secret in secrets_
    )


@dataclass(frozen=True)
class Outcome:
    status: str  # the HTTP code, or a short error
    delivered: bool = False
    gone: bool = False


@functools.cache
def default_tls_context() -> ssl.SSLContext:
    """httpx's own default for ``verify=True`` (the certifi bundle), built once
    per process.

    Building it parses the whole bundle: ~90 ms of CPU on the benchmark's
    machine, which, paid on every attempt, held a worker to about ten
    deliveries a second (docs/PERFORMANCE.md, "Webhooks"). One context is
    safely shared by threads and connections; the host name and the
    certificate are still checked on each connection.
    """
    return httpx.create_ssl_context(trust_env=False)


def _client(timeout: float, verify: ssl.SSLContext | bool) -> httpx.Client:
    return httpx.Client(
        timeout=timeout,
        verify=verify,
        follow_redirects=False,
        # No proxy from the environment: it would connect to the name itself.
        trust_env=False,
        # No reuse: a kept-alive connection verified for one host name could
        # carry another name that resolves to the same address.
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"user-agent": USER_AGENT},
    )


def _pinned_url(target: guard.Target, address: guard.IPAddress) -> httpx.URL:
    return httpx.URL(target.url).copy_with(host=str(address), port=target.port)


def _host_header(target: guard.Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def attempt(
    *,
    delivery_id: str,
    url: str,
    body: str,
    secrets_: Sequence[str],
    timeout: float,
    require_https: bool,
    allow_private: bool,
    resolver: guard.Resolver | None = None,
    verify: ssl.SSLContext | bool = True,
) -> Outcome:
    """Make one attempt; never raises for what the receiver or network did.

    ``verify``: httpx's (True: the certifi bundle, ``default_tls_context``);
    tests pass a context that trusts their own CA.
    """
    if verify is True:
        verify = default_tls_context()
    try:
        target = guard.resolve(
            url,
            require_https=require_https,
            allow_private=allow_private,
            **({"resolver": resolver} if resolver else {}),
        )
    except guard.UnsafeURL as exc:
        logger.warning("webhook %s not sent: %s", delivery_id, exc)
        return Outcome(status="refused by the address check")

    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "host": _host_header(target),
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(
            delivery_id=delivery_id, timestamp=timestamp, body=body, secrets_=secrets_
        ),
    }
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    last = Outcome(status="no address")
    with _client(timeout, verify) as client:
        # The first address that accepts a connection gets the request (as a
        # browser would); each of them passed the check.
        for address in target.addresses:
            request = client.build_request(
                "POST",
                _pinned_url(target, address),
                content=body.encode(),
                headers=headers,
                extensions=extensions,
            )
            try:
                # Streamed and closed unread: the receiver's body is not ours.
                response = client.send(request, stream=True)
                response.close()
            except httpx.ConnectError as exc:
                last = Outcome(status=_short_error(exc, "connection failed"))
                continue
            except httpx.TimeoutException as exc:
                return Outcome(status=_short_error(exc, "timeout"))
            except httpx.HTTPError as exc:
                return Outcome(status=_short_error(exc, "request failed"))
            code = response.status_code
            return Outcome(
                status=str(code), delivered=200 <= code < 300, gone=code == GONE
            )
    return last


def _short_error(exc: Exception, kind: str) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{kind}: {detail}"[:100] if detail else kind

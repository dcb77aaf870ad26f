"""The client's address: the one rule behind every per-address limit.

``X-Forwarded-For`` is believed only when the socket peer (``REMOTE_ADDR``)
is one of ``TRUSTED_PROXIES``; then the client is the right-most hop that is
not itself a trusted proxy (every hop to its right was appended by a proxy we
trust, every hop to its left could have been written by the client). Anyone
else is their socket peer, whatever headers they send, so a client cannot
choose the address its failures are counted under. The failed-auth limit
(``apikeys.ratelimit``) and django-axes (``AXES_CLIENT_IP_CALLABLE``) both call
:func:`client_address`.

Hand-written on :mod:`ipaddress` because django-ipware, which axes offers,
matches trusted proxies by string prefix and never looks at ``REMOTE_ADDR``:
it would believe a forged header sent straight to gunicorn.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from django.conf import settings

from lockngen.env import ConfigError

if TYPE_CHECKING:  # settings.py imports this module: keep its imports light
    from django.http import HttpRequest
    from rest_framework.request import Request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TRUSTED_PROXIES = "127.0.0.1/32,::1/128"


def parse_networks(items: Iterable[str], *, name: str) -> tuple[IPNetwork, ...]:
    """``TRUSTED_PROXIES`` entries (addresses or CIDRs) as networks."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name} must be a comma list of IP addresses or CIDRs, got {item!r}"
            ) from None
    return tuple(networks)


def _address(value: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in proxies)


def address_from_meta(
    meta: Mapping[str, Any], proxies: tuple[IPNetwork, ...]
) -> str | None:
    """None without a usable peer address (a unix socket, a synthetic request)."""
    peer = _address(str(meta.get("REMOTE_ADDR") or ""))
    if peer is None:
        return None
    if not _trusted(peer, proxies):
        return str(peer)
    client = peer
    for hop in reversed(str(meta.get("HTTP_X_FORWARDED_FOR", "")).split(",")):
        address = _address(hop)
        if address is None:
            break  # garbage can only come from the untrusted left part
        client = address
        if not _trusted(address, proxies):
            break
    return str(client)


def client_address(request: HttpRequest | Request | None) -> str | None:
    """The address per-address limits count under (see the module docstring).

    Takes Django's request or DRF's, which passes ``META`` through; axes may
    pass None (``force_login``).
    """
    if request is None:
        return None
    return address_from_meta(request.META, settings.TRUSTED_PROXIES)

"""The SSRF guard (SPEC §10): which webhook URLs we may call, and where to connect.

Pure functions with an injectable resolver. A URL is checked twice: when a
job is created (``check_url`` + ``resolve``: 400 on the webhook field) and
again before every delivery attempt, because DNS can change in between. The
attempt then connects to the address that passed the check, never to a
second resolution of the name (``webhooks.delivery``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MAX_URL_LENGTH = 2000

# getaddrinfo's shape: (host, port, family, type) → [(family, type, proto,
# canonname, sockaddr)]; tests inject one that answers what they choose.
Resolver = Callable[..., Sequence[tuple]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why (safe to show the owner)."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the addresses it resolved to, in resolver order."""

    url: str
    scheme: str
    host: str  # as written (lower-case), without brackets
    port: int
    addresses: tuple[IPAddress, ...]


def refusal(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address.
        return refusal(address.ipv4_mapped)
    for kind in (
        "unspecified",
        "loopback",
        "link_local",
        "multicast",
        "private",  # includes unique-local fc00::/7 and 10/8, 172.16/12, 192.168/16
        "reserved",
        "site_local",
    ):
        if getattr(address, f"is_{kind}", False):
            return kind.replace("_", "-")
    if not address.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT)
        return "not global"
    return None


def check_url(url: str, *, require_https: bool) -> SplitResult:
    """The URL's form: scheme, no userinfo, a host, at most 2,000 characters."""
    if not isinstance(url, str) or not url:
        raise UnsafeURL("Enter a URL.")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"Ensure this URL has at most {MAX_URL_LENGTH} characters.")
    if any(ch.isspace() or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise UnsafeURL("The URL may not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeURL("Enter a valid URL.") from None
    allowed = ("https",) if require_https else ("https", "http")
    if parts.scheme.lower() not in allowed:
        raise UnsafeURL(f"The URL must use {' or '.join(allowed)}.")
    if "@" in parts.netloc:
        raise UnsafeURL("The URL may not contain a user name or password.")
    if not parts.hostname:
        raise UnsafeURL("The URL must name a host.")
    if port == 0:
        raise UnsafeURL("Enter a valid port.")
    return parts


def resolve(
    url: str,
    *,
    require_https: bool,
    allow_private: bool,
    resolver: Resolver = socket.getaddrinfo,
) -> Target:
    """Check ``url`` and resolve its host; every address must be public.

    One private address among public ones refuses the URL: a name that
    answers both could hand the connection to either.
    """
    parts = check_url(url, require_https=require_https)
    host = parts.hostname or ""
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: tuple[IPAddress, ...] = (literal,)
    else:
        try:
            host.encode("idna")
            infos = resolver(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise UnsafeURL(f"The host {host!r} does not resolve.") from None
        seen: dict[IPAddress, None] = {}
        for info in infos:
            # sockaddr[0]; an IPv6 scope ("fe80::1%eth0") is not an address.
            text = str(info[4][0]).split("%", 1)[0]
            seen.setdefault(ipaddress.ip_address(text), None)
        addresses = tuple(seen)
        if not addresses:
            raise UnsafeURL(f"The host {host!r} does not resolve.")
    if not allow_private:
        for address in addresses:
            why = refusal(address)
            if why:
                raise UnsafeURL(
                    f"The host {host!r} resolves to a {why} address ({address}); "
                    "webhooks may only call public addresses."
                )
    return Target(url=url, scheme=scheme, host=host, port=port, addresses=addresses)

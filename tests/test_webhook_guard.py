"""The SSRF guard (SPEC §10): what a webhook URL may be, at create and at send."""

from __future__ import annotations

import socket

import pytest

from lockngen.http.fields import StrictSerializer
from webhooks import guard
from webhooks.fields import WebhookEventsFilterField, WebhookURLField


def answering(*addresses: str):
    """A resolver that answers ``addresses`` for every name."""

    def resolve(host, port, *args, **kwargs):
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port),
            )
            for a in addresses
        ]

    return resolve


def failing(host, port, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


REFUSED = {
    "loopback-v4": "127.0.0.1",
    "loopback-v4-other": "127.8.9.10",
    "loopback-v6": "::1",
    "v4-mapped-loopback": "::ffff:127.0.0.1",
    "private-10": "10.1.2.3",
    "private-172": "172.16.0.1",
    "private-192": "192.168.1.1",
    "carrier-nat": "100.64.0.1",
    "link-local-metadata": "169.254.169.254",
    "link-local-v6": "fe80::1",
    "unique-local-v6": "fd00::1",
    "multicast-v4": "224.0.0.1",
    "multicast-v6": "ff02::1",
    "unspecified-v4": "0.0.0.0",  # noqa: S104 - an address to refuse
    "unspecified-v6": "::",
    "reserved-v4": "240.0.0.1",
    "broadcast": "255.255.255.255",
    "documentation": "192.0.2.1",
}


@pytest.mark.parametrize("address", REFUSED.values(), ids=REFUSED.keys())
def test_a_name_resolving_to_a_non_global_address_is_refused(address):
    with pytest.raises(guard.UnsafeURL, match="public addresses"):
        guard.resolve(
            "https://hooks.example.com/x",
            require_https=True,
            allow_private=False,
            resolver=answering(address),
        )


@pytest.mark.parametrize("address", REFUSED.values(), ids=REFUSED.keys())
def test_a_non_global_address_literal_is_refused(address):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(guard.UnsafeURL, match="public addresses"):
        guard.resolve(
            f"https://{host}/x",
            require_https=True,
            allow_private=False,
            resolver=failing,
        )


def test_one_private_address_among_public_ones_refuses_the_name():
    with pytest.raises(guard.UnsafeURL, match="10.0.0.7"):
        guard.resolve(
            "https://hooks.example.com/x",
            require_https=True,
            allow_private=False,
            resolver=answering("93.184.215.14", "10.0.0.7"),
        )


def test_a_public_name_is_accepted_with_its_addresses():
    target = guard.resolve(
        "https://Hooks.Example.com:8443/x?y=1",
        require_https=True,
        allow_private=False,
        resolver=answering("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
    )
    assert (target.host, target.port, target.scheme) == (
        "hooks.example.com",
        8443,
        "https",
    )
    assert [str(a) for a in target.addresses] == [
        "93.184.215.14",
        "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
    ]


def test_allow_private_lets_loopback_through():
    target = guard.resolve(
        "http://localhost:9/x",
        require_https=False,
        allow_private=True,
        resolver=answering("127.0.0.1"),
    )
    assert [str(a) for a in target.addresses] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.1", "017700000001", "localhost"], ids=str
)
def test_other_spellings_of_loopback_are_refused_by_the_system_resolver(host):
    # No DNS involved: the C library reads these forms as 127.0.0.1 (and
    # /etc/hosts has localhost), and the guard judges what it resolved.
    with pytest.raises(guard.UnsafeURL, match="loopback"):
        guard.resolve(f"https://{host}/x", require_https=True, allow_private=False)


def test_a_name_that_does_not_resolve_is_refused():
    with pytest.raises(guard.UnsafeURL, match="does not resolve"):
        guard.resolve(
            "https://nowhere.invalid/",
            require_https=True,
            allow_private=False,
            resolver=failing,
        )


FORM = {
    "http-in-production": ("http://hooks.example.com/x", "must use https"),
    "ftp": ("ftp://hooks.example.com/x", "must use https"),
    "no-scheme": ("hooks.example.com/x", "must use https"),
    "userinfo": ("https://user:secret@hooks.example.com/x", "user name or password"),
    "user-only": ("https://user@hooks.example.com/x", "user name or password"),
    "no-host": ("https:///x", "must name a host"),
    "space": ("https://hooks.example.com/a b", "spaces or control"),
    "bad-port": ("https://hooks.example.com:99999/", "valid URL"),
    "too-long": ("https://hooks.example.com/" + "a" * 1975, "at most 2000"),
}


@pytest.mark.parametrize(("url", "why"), FORM.values(), ids=FORM.keys())
def test_a_badly_formed_url_is_refused_before_any_lookup(url, why):
    def must_not_resolve(*args, **kwargs):
        raise AssertionError("resolved a URL that should have been refused")

    with pytest.raises(guard.UnsafeURL, match=why):
        guard.resolve(
            url, require_https=True, allow_private=False, resolver=must_not_resolve
        )


def test_a_url_of_exactly_2000_characters_is_accepted():
    url = "https://hooks.example.com/" + "a" * (2000 - 26)
    assert len(url) == 2000
    guard.resolve(
        url,
        require_https=True,
        allow_private=False,
        resolver=answering("93.184.215.14"),
    )


def test_http_is_allowed_in_development():
    guard.resolve(
        "http://hooks.example.com/",
        require_https=False,
        allow_private=False,
        resolver=answering("93.184.215.14"),
    )


# --- The create-time field, in production settings ------------------------------


class CreateShape(StrictSerializer):
    webhook = WebhookURLField(required=False, allow_null=True)
    webhook_events_filter = WebhookEventsFilterField(required=False)


@pytest.fixture
def production(settings):
    settings.PRODUCTION = True
    settings.WEBHOOK_ALLOW_PRIVATE = False
    settings.DATABASE_FALLBACK = False
    return settings


FIELD_REFUSED = {
    "loopback-v4": "https://127.0.0.1/h",
    "loopback-v6": "https://[::1]/h",
    "private": "https://192.168.0.10/h",
    "metadata": "https://169.254.169.254/latest/meta-data/",
    "unique-local": "https://[fd12:3456::1]/h",
    "multicast": "https://224.0.0.251/h",
    "unspecified": "https://0.0.0.0/h",  # noqa: S104
    "http": "http://93.184.215.14/h",
    "userinfo": "https://u:p@93.184.215.14/h",
    "too-long": "https://93.184.215.14/" + "a" * 2000,
}


@pytest.mark.parametrize("url", FIELD_REFUSED.values(), ids=FIELD_REFUSED.keys())
def test_create_refuses_an_unsafe_webhook_on_the_webhook_field(production, url):
    shape = CreateShape(data={"webhook": url})
    assert not shape.is_valid()
    assert list(shape.errors) == ["webhook"]


def test_create_accepts_a_public_https_webhook_in_production(production):
    shape = CreateShape(data={"webhook": "https://93.184.215.14/h"})
    assert shape.is_valid(), shape.errors


@pytest.mark.sqlite_smoke
def test_on_the_sqlite_fallback_a_webhook_is_refused_naming_database_url(settings):
    settings.DATABASE_FALLBACK = True
    shape = CreateShape(data={"webhook": "http://127.0.0.1:9/h"})
    assert not shape.is_valid()
    assert "DATABASE_URL" in str(shape.errors["webhook"][0])


def test_the_events_filter_is_a_subset_of_start_and_completed():
    ok = CreateShape(data={"webhook_events_filter": ["completed", "start", "start"]})
    assert ok.is_valid(), ok.errors
    assert ok.validated_data["webhook_events_filter"] == ["start", "completed"]
    bad = CreateShape(data={"webhook_events_filter": ["finished"]})
    assert not bad.is_valid()
    assert list(bad.errors) == ["webhook_events_filter"]

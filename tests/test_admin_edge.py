"""The admin login and the admin's one-time key message at the edge (SPEC §12).

Logins go through the real login form with CSRF enforced, as a browser
sends them; the lockout is django-axes' (per client address + username).
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Iterator
from http import HTTPStatus

import pytest
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db

LOGIN = reverse("admin:login")
INDEX = reverse("admin:index")
KEY_ADD = reverse("admin:apikeys_apikey_add")
KEYS = reverse("admin:apikeys_apikey_changelist")
PASSWORD = "the-right-password-17"
STRANGER = "198.51.100.7"  # TEST-NET-2: only ever written into META
CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
RAW_KEY = re.compile(r"lk_[A-Za-z0-9]{8}_[A-Za-z0-9_-]{32,}")


@pytest.fixture
def admin_user(django_user_model, settings):
    # A fast hasher: these tests make many attempts; the rule is the same.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return django_user_model.objects.create_superuser(
        "root", "root@example.com", PASSWORD
    )


def log_in(client: Client, username: str, password: str, **meta: str):
    """GET the form (CSRF cookie and token), then POST it like a browser."""
    form = client.get(LOGIN, **meta)
    assert form.status_code == HTTPStatus.OK
    token = CSRF_FIELD.search(form.content.decode()).group(1)
    return client.post(
        LOGIN,
        {
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": token,
            "next": INDEX,
        },
        **meta,
    )


def logged_in(response) -> bool:
    return response.status_code == HTTPStatus.FOUND and response["Location"] == INDEX


def test_after_the_failures_even_the_right_password_is_locked_out(admin_user, settings):
    client = Client(enforce_csrf_checks=True)
    failures = [
        log_in(client, "root", "wrong").status_code
        for _ in range(settings.ADMIN_LOGIN_FAILURES)
    ]

    locked = log_in(client, "root", PASSWORD)

    assert settings.ADMIN_LOGIN_FAILURES == 5  # the documented default
    # The form again with its error, until the fifth failure locks out.
    assert failures == [HTTPStatus.OK] * 4 + [HTTPStatus.TOO_MANY_REQUESTS]
    assert locked.status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert not logged_in(locked)
    assert client.get(INDEX).status_code == HTTPStatus.FOUND  # back to the login


def test_the_lockout_is_per_address_and_username(admin_user, django_user_model):
    django_user_model.objects.create_superuser("other", "o@example.com", PASSWORD)
    client = Client(enforce_csrf_checks=True)
    for _ in range(5):
        log_in(client, "root", "wrong")
    assert log_in(client, "root", PASSWORD).status_code == 429

    assert logged_in(log_in(Client(enforce_csrf_checks=True), "other", PASSWORD))
    elsewhere = Client(enforce_csrf_checks=True, REMOTE_ADDR=STRANGER)
    assert logged_in(log_in(elsewhere, "root", PASSWORD))


def test_the_lockout_uses_the_client_address_rule(admin_user):
    """Behind the trusted proxy each forwarded client is its own address; a
    forged X-Forwarded-For from anyone else changes nothing."""
    proxied = Client(enforce_csrf_checks=True)  # REMOTE_ADDR 127.0.0.1: trusted
    for _ in range(5):
        log_in(proxied, "root", "wrong", HTTP_X_FORWARDED_FOR="203.0.113.1")
    locked = log_in(proxied, "root", PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.1")
    other = log_in(proxied, "root", PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.2")
    assert locked.status_code == HTTPStatus.TOO_MANY_REQUESTS
    assert logged_in(other)

    direct = Client(enforce_csrf_checks=True, REMOTE_ADDR=STRANGER)
    for hop in range(5):
        log_in(direct, "root", "wrong", HTTP_X_FORWARDED_FOR=f"203.0.113.{10 + hop}")
    forged = log_in(direct, "root", PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.99")
    assert forged.status_code == HTTPStatus.TOO_MANY_REQUESTS


# --- the one-time key message -----------------------------------------------------


def readable_forms(value: str) -> Iterator[str]:
    """A cookie value and whatever its parts decode to: Django's signed values
    are ``payload:timestamp:signature``, the payload URL-safe base64, and
    zlib-compressed when it starts with ``.``."""
    yield value
    for part in re.split(r"[:$]", value):
        compressed = part.startswith(".")
        part = part.lstrip(".")
        try:
            data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            continue
        if compressed:
            try:
                data = zlib.decompress(data)
            except zlib.error:
                continue
        yield data.decode("utf-8", errors="replace")


def test_no_cookie_carries_the_raw_key_of_an_admin_created_key(admin_client):
    added = admin_client.post(
        KEY_ADD, {"name": "ci runner", "rate_limit": "30"}, follow=False
    )
    shown = admin_client.get(added["Location"])

    raw_keys = RAW_KEY.findall(shown.content.decode())
    assert added.status_code == HTTPStatus.FOUND
    assert len(set(raw_keys)) == 1  # still shown once, on the next page
    raw_key = raw_keys[0]
    cookies = [*added.cookies.values(), *shown.cookies.values()]
    cookies += admin_client.cookies.values()
    assert "messages" not in {cookie.key for cookie in cookies if cookie.value}
    for cookie in cookies:
        for text in readable_forms(cookie.value):
            assert raw_key not in text, cookie.key
    assert raw_key not in admin_client.get(KEYS).content.decode()  # only once

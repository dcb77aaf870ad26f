"""HTTPS deliveries go to the checked address and still verify the host name.

The request's URL carries the address that passed the guard; the TLS server
name (SNI) and the certificate check carry the webhook's host name. A real
TLS receiver on 127.0.0.1 with certificates from a throwaway CA (trustme).
"""

from __future__ import annotations

import socket
import ssl

import pytest
import trustme

from tests.receiver import Receiver
from webhooks import delivery

HOST = "hooks.example.test"  # resolvable by the injected resolver only


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_receiver(ca: trustme.CA, *names: str) -> Receiver:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(context)
    return Receiver(tls=context).start()


def to_loopback(host, port, *args, **kwargs):
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def attempt(
    receiver: Receiver, verify: ssl.SSLContext | bool = True, host: str = HOST
) -> delivery.Outcome:
    return delivery.attempt(
        delivery_id="msg_tls",
        url=f"https://{host}:{receiver.port}/hooks/lockngen",
        body="{}",
        secrets_=[delivery.new_secret()],
        timeout=5,
        require_https=True,
        allow_private=True,
        resolver=to_loopback,
        verify=verify,
    )


def test_https_connects_to_the_checked_address_with_the_hosts_name_and_cert(ca):
    receiver = tls_receiver(ca, HOST)
    try:
        outcome = attempt(receiver, client_context(ca))
    finally:
        receiver.stop()
    assert outcome.delivered, outcome
    assert receiver.server_names == [HOST]
    (got,) = receiver.received
    assert got.headers["host"] == f"{HOST}:{receiver.port}"


def test_a_certificate_for_another_name_is_refused(ca):
    receiver = tls_receiver(ca, "someone-else.example.test")
    try:
        outcome = attempt(receiver, client_context(ca))
    finally:
        receiver.stop()
    assert not outcome.delivered
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.status
    assert receiver.received == []


def test_a_certificate_from_an_untrusted_ca_is_refused(ca):
    receiver = tls_receiver(trustme.CA(), HOST)
    try:
        outcome = attempt(receiver, client_context(ca))
    finally:
        receiver.stop()
    assert not outcome.delivered
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.status


def test_without_a_context_attempts_share_one_that_trusts_the_public_roots(ca):
    # Built once per process (building it parses the certifi bundle, ~90 ms),
    # and as strict as httpx's own default.
    shared = delivery.default_tls_context()
    assert delivery.default_tls_context() is shared
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
    assert shared.cert_store_stats()["x509_ca"] > 100  # the public roots
    for _ in range(2):  # a throwaway CA's certificate is not among them
        receiver = tls_receiver(ca, HOST)
        try:
            outcome = attempt(receiver)  # httpx's default: the shared context
        finally:
            receiver.stop()
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.status, outcome
        assert receiver.received == []
    assert delivery.default_tls_context() is shared

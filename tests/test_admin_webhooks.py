"""Webhook deliveries in the admin (SPEC §7): list, filters, redeliver; no secrets."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from django.urls import NoReverseMatch, reverse
from django.utils.html import escape

from tests.factories import make_api_key, make_generation
from tests.test_admin import act, listed, texts
from tests.webhooks import emit
from webhooks import services
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db

DELIVERIES = reverse("admin:webhooks_webhookdelivery_changelist")


@pytest.fixture
def key():
    return make_api_key(name="hooks", rate_limit=0)[0]


def emitted(key, event="generation.completed"):
    return emit(make_generation(api_key=key), event, url="http://127.0.0.1:9/h")


def test_deliveries_are_listed_and_filtered_by_state_and_event(admin_client, key):
    pending = emitted(key)
    failed = emitted(key, "generation.start")
    WebhookDelivery.objects.filter(pk=failed.pk).update(state="failed")

    assert listed(admin_client.get(DELIVERIES)) == {pending.pk, failed.pk}
    assert listed(admin_client.get(DELIVERIES, {"state__exact": "failed"})) == {
        failed.pk
    }
    assert listed(
        admin_client.get(DELIVERIES, {"event__exact": "generation.completed"})
    ) == {pending.pk}
    assert listed(admin_client.get(DELIVERIES, {"q": str(failed.pk)})) == {failed.pk}


def test_redeliver_action_queues_one_more_attempt(admin_client, key):
    row = emitted(key)
    WebhookDelivery.objects.filter(pk=row.pk).update(
        state="gone", attempts=1, next_attempt_at=None
    )

    response = act(admin_client, DELIVERIES, "redeliver", [row])

    assert response.status_code == HTTPStatus.OK
    assert any("one more attempt" in text for text in texts(response))
    row.refresh_from_db()
    assert row.state == "pending"


def test_a_delivery_page_is_read_only_and_cannot_be_added_or_deleted(admin_client, key):
    row = emitted(key)
    page = admin_client.get(
        reverse("admin:webhooks_webhookdelivery_change", args=[row.pk])
    )
    assert page.status_code == HTTPStatus.OK
    assert not page.context["adminform"].form.fields  # every field read-only
    # Before the first attempt: the body it will send, made from the snapshot.
    assert row.payload is None
    body = services.delivery_payload(row)
    assert '"type":"generation.completed"' in body
    assert escape(body).encode() in page.content
    assert (
        admin_client.get(reverse("admin:webhooks_webhookdelivery_add")).status_code
        == HTTPStatus.FORBIDDEN
    )
    assert (
        admin_client.get(
            reverse("admin:webhooks_webhookdelivery_delete", args=[row.pk])
        ).status_code
        == HTTPStatus.FORBIDDEN
    )


def test_signing_secrets_are_not_in_the_admin(admin_client, key):
    secret = services.webhook_secret_get(api_key=key).current
    with pytest.raises(NoReverseMatch):
        reverse("admin:webhooks_webhooksecret_changelist")
    index = admin_client.get(reverse("admin:index"))
    key_page = admin_client.get(reverse("admin:apikeys_apikey_change", args=[key.pk]))
    keys = admin_client.get(reverse("admin:apikeys_apikey_changelist"))
    for response in (index, key_page, keys):
        assert response.status_code == HTTPStatus.OK
        assert secret.encode() not in response.content

"""The Django admin for keys and generations (SPEC §7), through admin_client."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apikeys.keys import hash_key
from apikeys.models import ApiKey
from generations.admin import GenerationAdmin
from generations.models import Generation, Status
from tests.factories import claim_one, make_api_key, make_generation

pytestmark = pytest.mark.django_db

KEYS = reverse("admin:apikeys_apikey_changelist")
KEY_ADD = reverse("admin:apikeys_apikey_add")
GENERATIONS = reverse("admin:generations_generation_changelist")


def key_change(api_key: ApiKey) -> str:
    return reverse("admin:apikeys_apikey_change", args=[api_key.pk])


def generation_change(generation: Generation) -> str:
    return reverse("admin:generations_generation_change", args=[generation.pk])


def listed(response) -> set:
    assert response.status_code == HTTPStatus.OK
    return {obj.pk for obj in response.context["cl"].result_list}


def act(client, url: str, action: str, objects, **extra):
    return client.post(
        url,
        {"action": action, "_selected_action": [obj.pk for obj in objects], **extra},
        follow=True,
    )


def texts(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


# --- changelists --------------------------------------------------------------


def test_key_changelist_lists_deleted_rows_and_hides_the_hash(admin_client):
    alive, _ = make_api_key(name="alive")
    deleted, _ = make_api_key(name="deleted")
    deleted.delete()

    response = admin_client.get(KEYS)

    assert {alive.pk, deleted.pk} <= listed(response)
    assert alive.key_hash not in response.content.decode()


def test_generation_changelist_lists_deleted_rows_and_the_size(admin_client):
    alive = make_generation(prompt="alive", width=512, height=768)
    deleted = make_generation(prompt="deleted")
    deleted.delete()

    response = admin_client.get(GENERATIONS)

    assert {alive.pk, deleted.pk} == listed(response)
    assert "512×768" in response.content.decode()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("renderfarm", {"renderfarm"}, id="name"),
        pytest.param("PREFIX", {"laptop"}, id="prefix"),
    ],
)
def test_key_search_by_name_and_prefix(admin_client, query, expected):
    keys = {name: make_api_key(name=name)[0] for name in ("renderfarm", "laptop")}
    if query == "PREFIX":
        query = keys["laptop"].key_prefix

    response = admin_client.get(KEYS, {"q": query})

    assert listed(response) == {keys[name].pk for name in expected}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("lighthouse", {"first"}, id="prompt"),
        pytest.param("poster", {"second"}, id="name"),
    ],
)
def test_generation_search_by_prompt_and_name(admin_client, query, expected):
    made = {
        "first": make_generation(prompt="a lighthouse at dusk", name="cover"),
        "second": make_generation(prompt="a fox", name="poster"),
    }

    response = admin_client.get(GENERATIONS, {"q": query})

    assert listed(response) == {made[name].pk for name in expected}


def test_generation_changelist_shows_and_finds_the_worker_holding_a_job(
    admin_client,
):
    held, _ = make_generation(prompt="held"), make_generation(prompt="waiting")
    assert claim_one(worker="gpu-box-7").pk == held.pk

    response = admin_client.get(GENERATIONS, {"q": "gpu-box-7"})

    assert listed(response) == {held.pk}
    assert "gpu-box-7" in response.content.decode()


def test_key_filters_is_deleted_and_active(admin_client):
    alive, _ = make_api_key(name="alive")
    revoked, _ = make_api_key(name="revoked")
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    deleted, _ = make_api_key(name="deleted")
    deleted.delete()
    mine = {alive.pk, revoked.pk, deleted.pk}

    assert listed(admin_client.get(KEYS, {"is_deleted__exact": "1"})) & mine == {
        deleted.pk
    }
    assert listed(admin_client.get(KEYS, {"is_deleted__exact": "0"})) & mine == {
        alive.pk,
        revoked.pk,
    }
    assert listed(admin_client.get(KEYS, {"active": "yes"})) & mine == {alive.pk}
    assert listed(admin_client.get(KEYS, {"active": "no"})) & mine == {
        revoked.pk,
        deleted.pk,
    }


def test_generation_filters_status_deleted_and_date(admin_client):
    queued = make_generation()
    running = make_generation()
    claim_one()  # claims the oldest: queued
    deleted = make_generation()
    deleted.delete()

    assert listed(admin_client.get(GENERATIONS, {"status__exact": Status.RUNNING})) == {
        queued.pk
    }
    assert listed(admin_client.get(GENERATIONS, {"is_deleted__exact": "1"})) == {
        deleted.pk
    }
    year = str(running.created_at.year)
    assert listed(admin_client.get(GENERATIONS, {"created_at__year": year})) == {
        queued.pk,
        running.pk,
        deleted.pk,
    }


# --- adding a key -----------------------------------------------------------------


KEY_FORM_FIELDS = {
    "name",
    "is_admin",
    "is_worker",
    "rate_limit",
    "max_running",
    "expires_at",
}


def test_add_key_form_asks_only_name_roles_limits_and_expiry(admin_client):
    response = admin_client.get(KEY_ADD)

    assert response.status_code == HTTPStatus.OK
    assert set(response.context["adminform"].form.fields) == KEY_FORM_FIELDS


def test_adding_a_key_shows_the_raw_key_once_and_never_again(admin_client):
    response = admin_client.post(
        KEY_ADD,
        {"name": "ci runner", "is_admin": "on", "rate_limit": "30"},
        follow=True,
    )

    assert response.status_code == HTTPStatus.OK
    warnings = [
        m for m in get_messages(response.wsgi_request) if m.level_tag == "warning"
    ]
    assert len(warnings) == 1
    raw_key = next(word for word in str(warnings[0]).split() if word.startswith("lk_"))
    api_key = ApiKey.objects.get(key_hash=hash_key(raw_key))
    assert (api_key.name, api_key.is_admin, api_key.rate_limit) == (
        "ci runner",
        True,
        30,
    )
    assert raw_key in response.content.decode()  # the one time

    for url in (KEYS, key_change(api_key)):
        page = admin_client.get(url)
        assert page.status_code == HTTPStatus.OK
        assert raw_key not in page.content.decode()


def test_adding_a_worker_key_with_a_cap(admin_client):
    admin_client.post(
        KEY_ADD,
        {"name": "gpu box", "is_worker": "on", "rate_limit": "0", "max_running": "3"},
    )

    api_key = ApiKey.objects.get(name="gpu box")
    assert (api_key.is_admin, api_key.is_worker, api_key.max_running) == (
        False,
        True,
        3,
    )


@pytest.mark.parametrize(
    "form",
    [
        pytest.param({"is_admin": "on", "is_worker": "on"}, id="two-roles"),
        pytest.param({"max_running": "0"}, id="zero-cap"),
    ],
)
def test_the_add_form_refuses_two_roles_or_a_zero_cap(admin_client, form):
    keys = ApiKey.all_objects.count()

    response = admin_client.post(KEY_ADD, {"name": "bad", "rate_limit": "0", **form})

    assert response.status_code == HTTPStatus.OK  # the form again, with its errors
    errors = response.context["adminform"].form.errors
    assert errors, errors
    if "is_worker" in form:
        shown = [m for e in errors.as_data()["__all__"] for m in e.messages]
        assert shown == ["A key is an admin key or a worker key, not both."]
    assert ApiKey.all_objects.count() == keys


def test_key_change_page_shows_hash_and_timestamps_read_only(admin_client):
    api_key, _ = make_api_key()

    response = admin_client.get(key_change(api_key))

    form_fields = set(response.context["adminform"].form.fields)
    assert form_fields == KEY_FORM_FIELDS
    assert api_key.key_hash in response.content.decode()


def test_editing_a_key_cannot_unrevoke_it(admin_client):
    api_key, _ = make_api_key(name="old")
    ApiKey.objects.filter(pk=api_key.pk).update(revoked_at=timezone.now())

    admin_client.post(key_change(api_key), {"name": "new", "rate_limit": "5"})

    reloaded = ApiKey.objects.get(pk=api_key.pk)
    assert reloaded.name == "new"
    assert reloaded.revoked_at is not None


# --- actions --------------------------------------------------------------------------


def test_revoke_action(admin_client):
    first, _ = make_api_key()
    second, _ = make_api_key()

    response = act(admin_client, KEYS, "revoke", [first, second])

    assert "Revoked 2 API key(s)." in texts(response)
    assert (
        ApiKey.objects.filter(pk__in=[first.pk, second.pk], revoked_at=None).count()
        == 0
    )


@pytest.mark.parametrize("url", [KEYS, GENERATIONS], ids=["keys", "generations"])
def test_soft_delete_and_restore_actions(admin_client, url):
    make = (lambda: make_api_key()[0]) if url == KEYS else make_generation
    first, second = make(), make()
    model = type(first)

    act(admin_client, url, "soft_delete", [first, second])
    assert not model.objects.filter(pk__in=[first.pk, second.pk]).exists()
    assert model.all_objects.filter(pk__in=[first.pk, second.pk]).count() == 2

    act(admin_client, url, "restore", [first])
    assert set(model.objects.filter(pk__in=[first.pk, second.pk])) == {first}


def test_soft_delete_action_works_on_a_key_that_owns_generations(admin_client):
    api_key, _ = make_api_key()
    make_generation(api_key=api_key)

    act(admin_client, KEYS, "soft_delete", [api_key])

    assert ApiKey.all_objects.get(pk=api_key.pk).is_deleted


def test_delete_view_soft_deletes(admin_client):
    api_key, _ = make_api_key()
    make_generation(api_key=api_key)
    url = reverse("admin:apikeys_apikey_delete", args=[api_key.pk])

    confirm = admin_client.get(url)
    assert confirm.status_code == HTTPStatus.OK
    assert not confirm.context["protected"]
    admin_client.post(url, {"post": "yes"})

    assert ApiKey.all_objects.get(pk=api_key.pk).is_deleted


def test_hard_delete_asks_for_confirmation_then_deletes(admin_client):
    first, second = make_generation(), make_generation()

    confirm = act(admin_client, GENERATIONS, "hard_delete", [first, second])
    assert confirm.status_code == HTTPStatus.OK
    page = confirm.content.decode()
    assert "Delete permanently" in page
    for generation in (first, second):  # the form posts the selection back
        assert f'name="_selected_action" value="{generation.pk}"' in page
    assert Generation.all_objects.filter(pk__in=[first.pk, second.pk]).count() == 2

    done = act(admin_client, GENERATIONS, "hard_delete", [first, second], confirm="yes")

    assert "Permanently deleted 2 generations." in texts(done)
    assert not Generation.all_objects.filter(pk__in=[first.pk, second.pk]).exists()


def test_hard_delete_keeps_keys_that_generations_reference(admin_client):
    owner, _ = make_api_key()
    lonely, _ = make_api_key()
    make_generation(api_key=owner).delete()

    done = act(admin_client, KEYS, "hard_delete", [owner, lonely], confirm="yes")

    assert "Permanently deleted 1 API key." in texts(done)
    assert ApiKey.all_objects.filter(pk=owner.pk).exists()
    assert not ApiKey.all_objects.filter(pk=lonely.pk).exists()


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_user(
        username="staff", password="unused-password-123", is_staff=True
    )
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label__in=["apikeys", "generations"]
        )
    )
    client.force_login(user)
    return client


@pytest.mark.parametrize("url", [KEYS, GENERATIONS], ids=["keys", "generations"])
def test_hard_delete_is_for_superusers_only(admin_client, staff_client, url):
    generation = make_generation()

    staff_actions = dict(
        staff_client.get(url).context["action_form"].fields["action"].choices
    )
    admin_actions = dict(
        admin_client.get(url).context["action_form"].fields["action"].choices
    )

    assert "hard_delete" in admin_actions
    assert "hard_delete" not in staff_actions
    assert "soft_delete" in staff_actions
    assert "delete_selected" not in admin_actions
    act(staff_client, GENERATIONS, "hard_delete", [generation], confirm="yes")
    assert Generation.all_objects.filter(pk=generation.pk).exists()


def test_cancel_action_goes_through_the_status_machine(admin_client):
    queued = make_generation()
    done = make_generation()
    Generation.objects.filter(pk=done.pk).update(status=Status.COMPLETED)

    response = act(admin_client, GENERATIONS, "cancel", [queued, done])

    assert "Cancelled 1 generation(s)." in texts(response)
    assert Generation.objects.get(pk=queued.pk).status == Status.CANCELLED
    assert Generation.objects.get(pk=done.pk).status == Status.COMPLETED


# --- generation change page --------------------------------------------------------


def test_generation_edit_changes_only_name_and_prompt_id(admin_client):
    generation = make_generation(name="old")

    page = admin_client.get(generation_change(generation))
    assert set(page.context["adminform"].form.fields) == {"name", "prompt_id"}
    admin_client.post(
        generation_change(generation),
        {"name": "new", "prompt_id": "comfy-42", "status": Status.COMPLETED},
    )

    reloaded = Generation.objects.get(pk=generation.pk)
    assert (reloaded.name, reloaded.prompt_id) == ("new", "comfy-42")
    assert reloaded.status == Status.QUEUED
    assert reloaded.updated_at is not None


def test_generations_are_not_added_in_the_admin(admin_client):
    response = admin_client.get(reverse("admin:generations_generation_add"))

    assert response.status_code == HTTPStatus.FORBIDDEN


# --- deleting a live job stops it, through every admin path (SPEC §11) ------------


@pytest.fixture
def csrf_admin(admin_user):
    """An admin session that must send the CSRF token, as a browser does."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    return client


def csrf_post(client, page: str, url: str, data: dict):
    """GET ``page`` (which sets the CSRF cookie), then POST its token to ``url``."""
    assert client.get(page).status_code == HTTPStatus.OK
    token = client.cookies[settings.CSRF_COOKIE_NAME].value
    return client.post(url, {**data, "csrfmiddlewaretoken": token}, follow=True)


def running_job() -> Generation:
    generation = make_generation()
    claimed = claim_one()
    assert (claimed.pk, claimed.status) == (generation.pk, Status.RUNNING)
    return claimed


def assert_cancelled_and_deleted(generation: Generation) -> None:
    stored = Generation.all_objects.get(pk=generation.pk)
    assert (stored.is_deleted, stored.status) == (True, Status.CANCELLED)
    assert stored.lease_expires_at is None
    assert stored.lease_token == generation.lease_token  # its holder's, kept
    assert stored.completed_at == stored.deleted_at  # one statement, the DB clock
    assert stored.duration_ms is not None


def test_the_soft_delete_action_cancels_a_running_job(csrf_admin):
    job = running_job()
    # The list filtered on "running", as an operator would find the job.
    page = f"{GENERATIONS}?status__exact={Status.RUNNING}"

    response = csrf_post(
        csrf_admin,
        page,
        page,
        {"action": "soft_delete", "_selected_action": [job.pk]},
    )

    assert response.status_code == HTTPStatus.OK
    assert "Soft-deleted 1 generation." in texts(response)
    assert_cancelled_and_deleted(job)


def test_the_admin_delete_page_cancels_a_running_job(csrf_admin):
    job = running_job()
    url = reverse("admin:generations_generation_delete", args=[job.pk])

    response = csrf_post(csrf_admin, url, url, {"post": "yes"})

    assert response.status_code == HTTPStatus.OK
    assert_cancelled_and_deleted(job)


def test_the_admin_delete_page_refuses_a_post_without_the_csrf_token(csrf_admin):
    job = running_job()
    url = reverse("admin:generations_generation_delete", args=[job.pk])

    response = csrf_admin.post(url, {"post": "yes"})

    assert response.status_code == HTTPStatus.FORBIDDEN
    stored = Generation.all_objects.get(pk=job.pk)
    assert (stored.is_deleted, stored.status) == (False, Status.RUNNING)


def test_the_admins_delete_and_restore_through_the_services():
    from apikeys.admin import ApiKeyAdmin
    from apikeys.services import api_key_delete_many, api_key_restore_many
    from generations.services import generation_delete_many, generation_restore_many

    assert GenerationAdmin.soft_delete_rows is generation_delete_many
    assert GenerationAdmin.restore_rows is generation_restore_many
    assert ApiKeyAdmin.soft_delete_rows is api_key_delete_many
    assert ApiKeyAdmin.restore_rows is api_key_restore_many

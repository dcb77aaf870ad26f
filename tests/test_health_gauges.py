"""The v2 queue gauges (SPEC §6): per model, and keys at their cap; real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.db.models.functions import Now
from django.utils import timezone
from health_check.base import HealthCheckResult
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from apikeys.models import ApiKey
from generations.health import QueueGauges
from generations.models import Generation, Status
from lockngen.health import HealthView, State, openmetrics
from tests.factories import claim_one, make_api_key, make_generation

pytestmark = pytest.mark.django_db


def gauges() -> dict:
    check = QueueGauges()
    async_to_sync(check.run)()
    return check.metrics


def set_cap(api_key: ApiKey, cap: int | None) -> None:
    ApiKey.objects.filter(pk=api_key.pk).update(max_running=cap)


def test_queued_jobs_are_counted_per_model():
    for model in ("sdxl", "sdxl", "flux", "sd15"):
        make_generation(model=model)
    make_generation(model="sd15").delete()  # soft-deleted: not waiting
    claim_one(models=["sd15"])  # running: not waiting
    metrics = gauges()
    assert metrics["queued_per_model"] == {"flux": 1, "sdxl": 2}
    assert metrics["queued"] == 3
    assert metrics["running"] == 1


def test_the_oldest_queued_age_is_per_model_and_the_total_is_the_oldest():
    old_flux = make_generation(model="flux")
    make_generation(model="flux")
    old_sdxl = make_generation(model="sdxl")
    Generation.objects.filter(pk=old_flux.pk).update(
        created_at=Now() - timedelta(hours=2)
    )
    Generation.objects.filter(pk=old_sdxl.pk).update(
        created_at=Now() - timedelta(minutes=10)
    )
    metrics = gauges()
    ages = metrics["oldest_queued_age_seconds_per_model"]
    assert 7200 <= ages["flux"] < 7200 + 60
    assert 600 <= ages["sdxl"] < 600 + 60
    assert metrics["oldest_queued_age_seconds"] == ages["flux"]


def test_per_model_ages_are_on_the_database_clock():
    job = make_generation(model="flux")
    Generation.objects.filter(pk=job.pk).update(created_at=Now() - timedelta(hours=1))
    check = QueueGauges()
    with time_machine.travel(timezone.now() + timedelta(days=1), tick=True):
        async_to_sync(check.run)()
    assert 3600 <= check.metrics["oldest_queued_age_seconds_per_model"]["flux"] < 3660


def test_an_empty_queue_has_no_model_series_and_no_key_at_cap():
    metrics = gauges()
    assert metrics["queued_per_model"] == {}
    assert metrics["oldest_queued_age_seconds_per_model"] == {}
    assert metrics["keys_at_cap"] == 0


def test_keys_at_cap_counts_keys_running_their_max():
    full, _ = make_api_key(name="full")
    roomy, _ = make_api_key(name="roomy")
    uncapped, _ = make_api_key(name="uncapped")
    for api_key in (full, roomy, uncapped):
        make_generation(api_key=api_key)
        make_generation(api_key=api_key)
    set_cap(full, 1)
    set_cap(roomy, 3)
    while claim_one():  # full runs 1 (its cap), roomy 2 (of 3), uncapped 2
        pass
    assert Generation.objects.filter(status=Status.RUNNING).count() == 5
    assert gauges()["keys_at_cap"] == 1
    set_cap(roomy, 2)  # roomy's running jobs now fill its cap too
    assert gauges()["keys_at_cap"] == 2
    set_cap(full, None)
    assert gauges()["keys_at_cap"] == 1


def test_the_gauges_cost_three_statements(django_assert_num_queries):
    make_generation(model="flux")
    with django_assert_num_queries(3):
        QueueGauges().check()


def report_of(check: QueueGauges) -> HealthCheckResult:
    return HealthCheckResult(check=check, error=None, time_taken=0.01)


def test_openmetrics_labels_the_per_model_gauges():
    make_generation(model="flux")
    make_generation(model="flux")
    make_generation(model="sdxl")
    check = QueueGauges()
    async_to_sync(check.run)()
    text = openmetrics([report_of(check)], State.HEALTHY).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    queued = families["lockngen_queue_queued_per_model"]
    assert queued.type == "gauge"
    assert {s.labels["model"]: s.value for s in queued.samples} == {
        "flux": 2,
        "sdxl": 1,
    }
    ages = families["lockngen_queue_oldest_queued_age_seconds_per_model"]
    assert {s.labels["model"] for s in ages.samples} == {"flux", "sdxl"}
    # The totals keep their names, unlabelled.
    assert [s.value for s in families["lockngen_queue_queued"].samples] == [3]
    assert [s.labels for s in families["lockngen_queue_keys_at_cap"].samples] == [{}]


def test_the_html_report_shows_one_row_per_model():
    make_generation(model="flux")
    check = QueueGauges()
    async_to_sync(check.run)()
    view = HealthView()
    view.results = [report_of(check)]
    view.request = None
    names = dict(view.get_context_data()["metrics"])
    assert names['lockngen_queue_queued_per_model{model="flux"}'] == 1
    assert names["lockngen_queue_keys_at_cap"] == 0

"""Health: our checks in django-health-check's dataclass shape, and the report view.

django-health-check 4.x has no migrations or pool check and knows only "all OK"
(200) or "something raised" (500). SPEC §6 wants three states, so the view
below maps the library's results: a ``ServiceWarning`` makes the service
*degraded* (still 200), any other error *unhealthy* (503).

The library runs each synchronous check in a fresh executor thread per probe,
and its ``Database`` check opens a fresh session besides: three new
PostgreSQL sessions per probe. Our database checks are coroutines that run
their query on the request's own thread (``sync_to_async(thread_sensitive=
True)``), so they use that thread's connection like any view does (persistent
for ``CONN_MAX_AGE``, or the pool) and open none of their own. The view
answers from a report at most ``HEALTH_REPORT_SECONDS`` old, so a flood of
probes costs one run of the checks per interval and process (SPEC §12).

The apps own the checks of their own data (``generations.health.QueueGauges``)
and build them on ``MeasuredCheck`` / ``on_request_thread`` from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, ClassVar

from asgiref.sync import sync_to_async
from circuitbreaker import CircuitBreakerError
from django.conf import settings
from django.core.signals import setting_changed
from django.db import DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.migrations.loader import MigrationLoader
from django.dispatch import receiver
from django.http import HttpResponse, JsonResponse
from health_check.base import HealthCheck, HealthCheckResult
from health_check.exceptions import ServiceUnavailable, ServiceWarning
from health_check.views import HealthCheckView
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector
from redis import RedisError

from lockngen.counters import counters

logger = logging.getLogger(__name__)


class State(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"

    @property
    def http_status(self) -> HTTPStatus:
        if self is State.UNHEALTHY:
            return HTTPStatus.SERVICE_UNAVAILABLE
        return HTTPStatus.OK


def overall_state(results: Iterable[HealthCheckResult]) -> State:
    errors = [result.error for result in results if result.error]
    if any(not isinstance(error, ServiceWarning) for error in errors):
        return State.UNHEALTHY
    return State.DEGRADED if errors else State.HEALTHY


FALLBACK_DEGRADATION = "SQLite development fallback in use: set DATABASE_URL"
LOCAL_LIMITS_DEGRADATION = (
    "rate limits are counted per process (local memory): set REDIS_URL"
)
REDIS_DOWN_DEGRADATION = (
    "Redis is unavailable: rate limits are counted per process until it answers"
)


def local_rate_limits() -> str | None:
    """Why rate limits are counted per process right now, or None (no I/O)."""
    if not settings.REDIS_URL:
        return LOCAL_LIMITS_DEGRADATION
    if not counters().shared:
        return REDIS_DOWN_DEGRADATION  # the circuit breaker is open
    return None


def degradations() -> list[str]:
    """Configuration that works but should not be run in production (no I/O).

    The one place these conditions are read; ``/health/live`` lists them and
    the ``DatabaseBackend`` / ``RateLimitCache`` checks report them.
    """
    reasons = []
    if settings.DATABASE_FALLBACK:
        reasons.append(FALLBACK_DEGRADATION)
    if reason := local_rate_limits():
        reasons.append(reason)
    return reasons


class DropDegradedTracebacks(logging.Filter):
    """Drop the library's per-probe traceback for a check that only warns.

    A degraded setup (development) would otherwise log one traceback per
    scrape; real failures keep theirs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ServiceWarning)


async def on_request_thread(func: Callable[[], None]) -> None:
    """Run ``func`` on the request's thread, with that thread's connection.

    Under WSGI the view's event loop runs in a helper thread;
    ``thread_sensitive=True`` hands ``func`` back to the thread serving the
    request, whose connection Django opens and closes like any request's.
    """
    await sync_to_async(func, thread_sensitive=True)()


def pending_migrations(connection: BaseDatabaseWrapper) -> list[str]:
    """``app_label.name`` of every migration not recorded as applied, in order.

    Every node of the graph, not ``MigrationExecutor.migration_plan`` to the
    leaves: that plan stops at a leaf that is applied, so a missing record of
    an earlier migration (a history edited by hand) would not count.
    """
    loader = MigrationLoader(connection)
    applied = loader.applied_migrations
    pending: dict[tuple[str, str], None] = {}
    for leaf in loader.graph.leaf_nodes():
        for node in loader.graph.forwards_plan(leaf):
            if node not in applied:
                pending[node] = None
    return [f"{app_label}.{name}" for app_label, name in pending]


def short_reason(exc: BaseException) -> str:
    """The exception class only: driver messages may quote SQL or addresses."""
    return type(exc).__name__


def severity(result: HealthCheckResult) -> str:
    """``""`` (OK), ``"warning"`` (degraded) or ``"error"`` (unhealthy)."""
    if not result.error:
        return ""
    return "warning" if isinstance(result.error, ServiceWarning) else "error"


# --- Checks -------------------------------------------------------------------


@dataclasses.dataclass
class MeasuredCheck(HealthCheck):
    """A check that also reports gauges (``metrics``), set by ``run()``.

    ``metrics`` is not part of the check's repr or labels; the view publishes
    it as ``lockngen_<metrics_prefix>_<name>`` in OpenMetrics and under
    ``metrics.<metrics_prefix>`` in JSON. A gauge named in
    ``metrics_labels`` holds one value per label value (a dict), published
    as ``lockngen_<prefix>_<name>{<label>="<key>"}``.
    """

    metrics: dict[str, float | dict[str, float]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    metrics_prefix: ClassVar[str] = ""
    metrics_help: ClassVar[dict[str, str]] = {}
    metrics_labels: ClassVar[dict[str, str]] = {}

    def gauge(self, name: str) -> str:
        """The published name of the gauge ``name``."""
        return f"lockngen_{self.metrics_prefix}_{name}"

    def samples(self) -> Iterable[tuple[str, str, str, float]]:
        """``(gauge name, label name, label value, value)`` of every sample;
        label name and value are empty for an unlabelled gauge."""
        for name, value in self.metrics.items():
            gauge = self.gauge(name)
            if isinstance(value, dict):
                label = self.metrics_labels[name]
                for key, sample in sorted(value.items()):
                    yield gauge, label, key, sample
            else:
                yield gauge, "", "", value


@dataclasses.dataclass
class Database(HealthCheck):
    """``SELECT 1`` on the request thread's connection.

    Replaces ``health_check.checks.Database``, which opens (and closes) a
    session of its own on every probe.
    """

    alias: str = "default"

    async def run(self) -> None:
        await on_request_thread(self.check)

    def check(self) -> None:
        try:
            with connections[self.alias].cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except DatabaseError as exc:
            raise ServiceUnavailable(
                f"database unavailable ({short_reason(exc)})"
            ) from exc


@dataclasses.dataclass
class Migrations(HealthCheck):
    """Unhealthy while a migration is pending (django-health-check 4.x has none)."""

    alias: str = "default"

    async def run(self) -> None:
        await on_request_thread(self.check)

    def check(self) -> None:
        try:
            pending = pending_migrations(connections[self.alias])
        except DatabaseError as exc:
            raise ServiceUnavailable(
                f"cannot read the migration history ({short_reason(exc)})"
            ) from exc
        if pending:
            shown = ", ".join(pending[:3]) + (", …" if len(pending) > 3 else "")
            raise ServiceUnavailable(f"{len(pending)} migration(s) pending: {shown}")


@dataclasses.dataclass
class ConnectionPool(MeasuredCheck):
    """Django's psycopg pool of this worker process (only when ``DB_POOL=1``).

    Degraded while requests wait for a connection: the pool is saturated.
    """

    alias: str = "default"
    metrics_prefix: ClassVar[str] = "db_pool"
    metrics_help: ClassVar[dict[str, str]] = {
        "size": "Connections currently held by this process's pool",
        "available": "Idle connections in the pool",
        "max": "Upper bound of the pool (DB_POOL_MAX_SIZE)",
        "requests_waiting": "Requests waiting for a pooled connection",
        "requests_errors": "Connection requests that failed since the pool opened",
        "connections_errors": "Failed attempts to open a server connection",
    }

    async def run(self) -> None:
        pool = getattr(connections[self.alias], "pool", None)
        if pool is None:
            raise ServiceUnavailable("no connection pool configured")
        stats = pool.get_stats()  # counters that never fired are absent
        self.metrics = {
            "size": stats.get("pool_size", 0),
            "available": stats.get("pool_available", 0),
            "max": stats.get("pool_max", 0),
            "requests_waiting": stats.get("requests_waiting", 0),
            "requests_errors": stats.get("requests_errors", 0),
            "connections_errors": stats.get("connections_errors", 0),
        }
        if self.metrics["requests_waiting"]:
            raise ServiceWarning(
                f"pool saturated: {self.metrics['requests_waiting']} request(s) "
                "waiting for a connection"
            )


@dataclasses.dataclass
class DatabaseBackend(HealthCheck):
    """Degraded on the SQLite development fallback (no ``DATABASE_URL``)."""

    async def run(self) -> None:
        if settings.DATABASE_FALLBACK:
            raise ServiceWarning(FALLBACK_DEGRADATION)


@dataclasses.dataclass
class RateLimitCache(HealthCheck):
    """Degraded when rate limits are counted per process: ``REDIS_URL`` unset,
    or Redis not answering a ``PING`` (its circuit breaker open).

    Only a warning: each process still enforces every limit on its own.
    """

    def run(self) -> None:
        if reason := local_rate_limits():
            raise ServiceWarning(reason)
        try:
            counters().ping()
        except (RedisError, CircuitBreakerError) as exc:
            raise ServiceWarning(
                f"{REDIS_DOWN_DEGRADATION} ({short_reason(exc)})"
            ) from exc


# --- The report -----------------------------------------------------------------


class Report:
    """This process's last run of the checks, reused while it is fresh.

    One run at a time: probes that arrive during a run wait for it (the lock
    is taken in the probe's own event-loop thread; the run's queries happen on
    its request thread) and answer with its results.
    """

    # Longer than any check may take (the library's 5 s timeout + 1).
    LOCK_TIMEOUT_SECONDS = 10

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: list[HealthCheckResult] = []
        self._taken_at = float("-inf")

    def _fresh(self) -> list[HealthCheckResult] | None:
        age = time.monotonic() - self._taken_at
        return self._results if age < settings.HEALTH_REPORT_SECONDS else None

    async def results(
        self, checks: Callable[[], Iterable[HealthCheck]]
    ) -> list[HealthCheckResult]:
        if (fresh := self._fresh()) is not None:
            return fresh
        locked = self._lock.acquire(timeout=self.LOCK_TIMEOUT_SECONDS)
        try:
            if (fresh := self._fresh()) is not None:
                return fresh
            results = list(
                await asyncio.gather(*(check.get_result() for check in checks()))
            )
            self._results, self._taken_at = results, time.monotonic()
            return results
        finally:
            if locked:
                self._lock.release()

    def forget(self) -> None:
        self._taken_at = float("-inf")


report = Report()


@receiver(setting_changed)
def _forget_report(**kwargs: Any) -> None:
    report.forget()  # tests change what the checks would see


@dataclasses.dataclass
class Remembered:
    """A result of the remembered report, in the shape the library gathers."""

    result: HealthCheckResult

    async def get_result(self, executor: Any = None) -> HealthCheckResult:
        return self.result


class HealthView(HealthCheckView):
    """``/health/``: the library's report with an overall healthy/degraded/unhealthy.

    Degraded answers 200 and unhealthy 503 in HTML, JSON and text. OpenMetrics
    keeps the library's 200 (a failed scrape would drop every gauge) and
    carries the state as the ``lockngen_health_state`` state set. The checks
    run at most once per ``HEALTH_REPORT_SECONDS`` (``Report``); the library's
    ``get`` then renders the remembered results.
    """

    template_name = "lockngen/health.html"
    results: list[HealthCheckResult]
    remembered: list[HealthCheckResult]

    async def get(self, request: Any, *args: Any, **kwargs: Any) -> HttpResponse:
        self.remembered = await report.results(super().get_checks)
        return await super().get(request, *args, **kwargs)

    def get_checks(self) -> list[Remembered]:
        return [Remembered(result) for result in self.remembered]

    @property
    def state(self) -> State:
        return overall_state(self.results)

    def metrics(self) -> dict[str, dict[str, float | dict[str, float]]]:
        return {
            result.check.metrics_prefix: result.check.metrics
            for result in self.results
            if isinstance(result.check, MeasuredCheck) and result.check.metrics
        }

    @staticmethod
    def check_status(result: HealthCheckResult) -> str:
        return "OK" if not result.error else str(result.error)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        state = self.state
        context |= {
            "state": state.value,
            "errors": state is State.UNHEALTHY,
            "rows": [
                {"result": result, "level": severity(result)} for result in self.results
            ],
            "metrics": [
                (f'{gauge}{{{label}="{key}"}}' if label else gauge, value)
                for result in self.results
                if isinstance(result.check, MeasuredCheck)
                for gauge, label, key, value in result.check.samples()
            ],
        }
        return context

    def render_to_response(self, context: Any, **response_kwargs: Any) -> HttpResponse:
        response_kwargs["status"] = self.state.http_status
        return super().render_to_response(context, **response_kwargs)

    def render_to_response_json(self, status: int) -> JsonResponse:
        state = self.state
        return JsonResponse(
            {
                "status": state.value,
                "checks": {
                    repr(result.check): self.check_status(result)
                    for result in self.results
                },
                "metrics": self.metrics(),
            },
            status=state.http_status,
        )

    def render_to_response_text(self, status: int) -> HttpResponse:
        state = self.state
        lines = [f"status: {state.value}"] + [
            f"{result.check!r}: {self.check_status(result)}" for result in self.results
        ]
        return HttpResponse(
            "\n".join(lines) + "\n",
            content_type="text/plain; charset=utf-8",
            status=state.http_status,
        )

    def render_to_response_openmetrics(self) -> HttpResponse:
        return HttpResponse(
            openmetrics(self.results, self.state),
            content_type=openmetrics_exposition.CONTENT_TYPE_LATEST,
        )


def openmetrics(results: list[HealthCheckResult], state: State) -> bytes:
    """The library's gauges (our overall status) plus ours, built by prometheus_client.

    ``django_health_check_status`` and ``_response_time_seconds`` keep the
    library's names, help and labels (a label a check lacks is empty, which
    Prometheus reads as absent). ``django_health_check_overall_status`` is 0
    only when unhealthy, like the HTTP status: the library's counts warnings
    as failures. ``lockngen_health_state`` carries the three states.
    """
    label_names = sorted({name for result in results for name in result.check.labels})

    def label_values(result: HealthCheckResult) -> list[str]:
        return [result.check.labels.get(name, "") for name in label_names]

    status = GaugeMetricFamily(
        "django_health_check_status",
        "Health check status (1 = healthy, 0 = unhealthy)",
        labels=label_names,
    )
    response_time = GaugeMetricFamily(
        "django_health_check_response_time_seconds",
        "Health check response time in seconds",
        labels=label_names,
    )
    for result in results:
        status.add_metric(label_values(result), float(not result.error))
        response_time.add_metric(label_values(result), round(result.time_taken, 6))
    families: list[Metric] = [
        status,
        response_time,
        GaugeMetricFamily(
            "django_health_check_overall_status",
            "Overall health check status (1 = healthy or degraded, 0 = unhealthy)",
            value=float(state is not State.UNHEALTHY),
        ),
        StateSetMetricFamily(
            "lockngen_health_state",
            "Overall state: healthy, degraded (answers 200) or unhealthy (answers 503)",
            value={value.value: value is state for value in State},
        ),
    ]
    for result in results:
        check = result.check
        if isinstance(check, MeasuredCheck):
            gauges: dict[str, GaugeMetricFamily] = {}
            for name, value in check.metrics.items():
                gauge = check.gauge(name)
                help_text = check.metrics_help.get(name, name)
                if isinstance(value, dict):
                    gauges[gauge] = GaugeMetricFamily(
                        gauge, help_text, labels=[check.metrics_labels[name]]
                    )
                else:
                    gauges[gauge] = GaugeMetricFamily(gauge, help_text, value=value)
            for gauge, label, key, value in check.samples():
                if label:
                    gauges[gauge].add_metric([key], value)
            families += gauges.values()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected(families))
    return openmetrics_exposition.generate_latest(registry)


@dataclasses.dataclass(eq=False)  # the registry keys collectors by identity
class Collected(Collector):
    """Metric families computed already, as prometheus_client's registry takes them."""

    families: list[Metric]

    def collect(self) -> Iterable[Metric]:
        return self.families

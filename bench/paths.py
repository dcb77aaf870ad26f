"""The read and write paths against a bare Django view (SPEC §9): one driver.

``bench read`` is ``GET /api/v1/generations/{id}``; the bare view
``/bench/generations/{id}`` does ``Generation.objects.values(...).get(pk=...)``
→ ``JsonResponse``. ``bench write`` is ``POST /api/v1/generations`` (9 fields,
JSON); the bare view ``POST /bench/generations`` does ``json.loads`` and
``Generation.objects.create(...)`` with the same fields and the same key, then
answers 201. Neither bare view runs DRF, auth, throttle or validation; both
are routed only by ``bench.wsgi`` (the service's urls plus ``bench.urls``), so
a baseline and the API differ in nothing but the view.

``measure()`` runs one gunicorn (the project's ``gunicorn.conf.py``: gthread,
same workers and threads, production settings, Redis rate-limit cache) and
alternates four sides A B C D at each concurrency level, load from wrk on
loopback:

- bare view (the baseline);
- API with a normal key whose rate limit is huge, so the O(1) throttle (a
  Redis counter) runs on every request, as in production;
- API with an unlimited key (``rate_limit=0``: workers), no throttle;
- the throttled key's request through Debian's nginx with the shipped config
  (docker/nginx/) in front of the same gunicorn: the proxy's cost is that
  side's ratio over the direct one. SPEC §9's target is measured directly.

``compare()`` (``python -m bench.compare``) runs the same path on two or more
checkouts side by side: one gunicorn per checkout, the first one's bare view
as the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load, server
from bench.load import BARE, PROXIED, THROTTLED, UNLIMITED

BODY = json.dumps(server.SAMPLE_GENERATION).encode()
JSON_HEADERS = {**server.PROXY_HEADERS, "Content-Type": "application/json"}


@dataclass(frozen=True)
class HttpPath:
    """What one path sends: the API's request and the bare view's twin."""

    name: str
    method: str
    status: int  # what every request of the path must answer
    title: str

    @property
    def reads(self) -> bool:
        return self.method == "GET"

    def api(self, raw_key: str, row: Any, port: int | None = None) -> load.Target:
        """The API's request as ``raw_key`` (``row``: the generation to read)."""
        if self.reads:
            return load.Target(
                f"/api/v1/generations/{row.pk}",
                headers={**server.PROXY_HEADERS, "X-API-Key": raw_key},
                port=port,
            )
        return load.Target(
            "/api/v1/generations",
            method="POST",
            body=BODY,
            headers={**JSON_HEADERS, "X-API-Key": raw_key},
            port=port,
        )

    def bare(self, api_key: Any, row: Any, port: int | None = None) -> load.Target:
        """The bare view's request: the same row, or the same insert for
        ``api_key``."""
        if self.reads:
            return load.Target(
                f"/bench/generations/{row.pk}", headers=server.PROXY_HEADERS, port=port
            )
        return load.Target(
            f"/bench/generations?api_key={api_key.pk}",
            method="POST",
            body=BODY,
            headers=JSON_HEADERS,
            port=port,
        )


READ = HttpPath("read", "GET", 200, "GET one generation by id")
WRITE = HttpPath("write", "POST", 201, "POST one generation (9 fields, JSON)")
PATHS = {path.name: path for path in (READ, WRITE)}


def expect(target: load.Target, port: int, status: int) -> dict[str, str]:
    """One request of ``target`` that must answer ``status``; its headers."""
    return server.expect(
        target.port or port,
        target.method,
        target.path,
        status,
        body=target.body,
        headers=target.headers,
    )[1]


def measure(path: HttpPath, *, smoke: bool) -> bool:
    """The four sides of ``path`` on one gunicorn; whether SPEC §9 holds."""
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.models import Generation
    from generations.services import generation_create

    load_at_start = server.machine()
    wrk = load.ensure_wrk(install=not smoke)
    levels, rounds, duration = load.schedule(smoke)
    with server.scratch_database() as url:
        database = connection.settings_dict["NAME"]
        throttled, throttled_raw = api_key_create(
            name=f"bench {path.name}", rate_limit=load.HUGE_RATE_LIMIT
        )
        unlimited, unlimited_raw = api_key_create(name="bench worker", rate_limit=0)
        row = twin = None
        if path.reads:
            # Each key reads its own row (a non-admin key sees only its own);
            # the two rows are identical apart from id and owner.
            row, _ = generation_create(api_key=throttled, **server.SAMPLE_GENERATION)
            twin, _ = generation_create(api_key=unlimited, **server.SAMPLE_GENERATION)
        targets = {
            BARE: path.bare(throttled, row),
            THROTTLED: path.api(throttled_raw, row),
            UNLIMITED: path.api(unlimited_raw, twin),
        }
        with server.gunicorn(url) as srv, server.nginx(srv) as proxy_port:
            if proxy_port is not None:
                targets[PROXIED] = dataclasses.replace(
                    targets[THROTTLED], port=proxy_port
                )
            checked = {
                name: expect(target, srv.port, path.status)
                for name, target in targets.items()
            }
            if path.reads and "X-RateLimit-Remaining" not in checked[THROTTLED]:
                raise RuntimeError("the rate-limited key got no X-RateLimit headers")
            table = load.alternate(
                srv.port,
                targets,
                levels=levels,
                rounds=rounds,
                duration=duration,
                cpu=lambda: server.server_cpu_seconds([srv], database),
            )
            print(
                f"{path.title}; {srv.describe()}; load: "
                f"{'wrk' if wrk else 'Python client'} on 127.0.0.1, {rounds} round(s) "
                f"x {duration} s per cell, sides alternated; ratio = median over "
                f"rounds of API req/s / bare req/s"
            )
            ratios = load.print_table(table, baseline=BARE)
            load.print_proxy_cost(ratios)
        inserted = Generation.all_objects.count()
    errors = sum(cell.errors for cells in table.values() for cell in cells.values())
    throttled_worst = min(row_[THROTTLED] for row_ in ratios.values())
    worst = min(min(row_[THROTTLED], row_[UNLIMITED]) for row_ in ratios.values())
    met = throttled_worst >= load.RATIO_TARGET and errors == 0
    if not path.reads:
        answered = sum(
            result.requests
            for cells in table.values()
            for cell in cells.values()
            for result in cell.rounds
        )
        print(
            f"rows inserted: {inserted} (measured requests: {answered}, plus checks "
            "and warm-up)"
        )
    print(
        f"API (throttled key) / bare, worst level: {throttled_worst:.2f}; "
        f"worst of both keys: {worst:.2f} (target >= {load.RATIO_TARGET}): "
        f"{'met' if met else 'MISSED'}; errors: {errors}"
    )
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return met


def read(*, smoke: bool = False) -> bool:
    return measure(READ, smoke=smoke)


def write(*, smoke: bool = False) -> bool:
    return measure(WRITE, smoke=smoke)


def compare(
    path: HttpPath,
    checkouts: dict[str, Path],
    *,
    levels: tuple[int, ...],
    rounds: int,
    duration: int,
) -> None:
    """``path`` on each checkout (one gunicorn each) against the first
    checkout's bare view; prints the table."""
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.services import generation_create

    with server.scratch_database() as url, contextlib.ExitStack() as stack:
        database = connection.settings_dict["NAME"]
        servers: list[server.Server] = []
        api_key, raw_key = api_key_create(name="bench", rate_limit=load.HUGE_RATE_LIMIT)
        row, _ = generation_create(api_key=api_key, **server.SAMPLE_GENERATION)
        targets: dict[str, load.Target] = {}
        for name, directory in checkouts.items():
            srv = stack.enter_context(server.gunicorn(url, cwd=directory))
            servers.append(srv)
            if not targets:
                targets["bare"] = path.bare(api_key, row, port=srv.port)
            targets[name] = path.api(raw_key, row, port=srv.port)
        for target in targets.values():
            expect(target, 0, path.status)
        table = load.alternate(
            None,
            targets,
            levels=levels,
            rounds=rounds,
            duration=duration,
            cpu=lambda: server.server_cpu_seconds(servers, database),
        )
    print(
        f"{path.name} path, key rate_limit=1e9; {rounds} round(s) x "
        f"{duration} s per cell, alternated; ratio = median over rounds of "
        "req/s / the bare view's"
    )
    load.print_table(table, baseline="bare", label="checkout")
    print(f"machine: {server.machine()}")

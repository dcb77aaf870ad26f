"""Read path: GET /api/v1/generations/{id} vs a bare Django view (SPEC §9).

One gunicorn (the project's ``gunicorn.conf.py``: gthread, same workers and
threads, production settings, Redis rate-limit cache) serves ``bench.wsgi``:
the service's urls plus ``/bench/generations/{id}``, a bare view doing
``Generation.objects.values(...).get(pk=...)`` → ``JsonResponse`` with no
DRF, no auth, no throttle. Same middleware, same row shape; only the view
differs. Four sides, alternated A B C D A B C D at each concurrency level,
load from wrk on loopback:

- bare view (the baseline);
- API with a normal key whose rate limit is huge, so the O(1) throttle (a
  Redis counter) runs on every request, as in production;
- API with an unlimited key (``rate_limit=0``: workers), no throttle;
- the throttled key's request through Debian's nginx with the shipped config
  (docker/nginx/) in front of the same gunicorn: the proxy's cost is that
  side's ratio over the direct one. SPEC §9's target is measured directly.
"""

from __future__ import annotations

import dataclasses

from bench import load, server
from bench.load import BARE, PROXIED, THROTTLED, UNLIMITED


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.services import generation_create

    load_at_start = server.machine()
    wrk = load.ensure_wrk(install=not smoke)
    levels, rounds, duration = load.schedule(smoke)
    with server.scratch_database() as url:
        database = connection.settings_dict["NAME"]
        throttled, throttled_raw = api_key_create(
            name="bench reader", rate_limit=load.HUGE_RATE_LIMIT
        )
        unlimited, unlimited_raw = api_key_create(name="bench worker", rate_limit=0)
        # Each key reads its own row (a non-admin key sees only its own);
        # the two rows are identical apart from id and owner.
        row, _ = generation_create(api_key=throttled, **server.SAMPLE_GENERATION)
        twin, _ = generation_create(api_key=unlimited, **server.SAMPLE_GENERATION)
        proxy = server.PROXY_HEADERS
        targets = {
            BARE: load.Target(f"/bench/generations/{row.pk}", headers=proxy),
            THROTTLED: load.Target(
                f"/api/v1/generations/{row.pk}",
                headers={**proxy, "X-API-Key": throttled_raw},
            ),
            UNLIMITED: load.Target(
                f"/api/v1/generations/{twin.pk}",
                headers={**proxy, "X-API-Key": unlimited_raw},
            ),
        }
        with server.gunicorn(url) as srv, server.nginx(srv) as proxy_port:
            if proxy_port is not None:
                targets[PROXIED] = dataclasses.replace(
                    targets[THROTTLED], port=proxy_port
                )
            checked = {
                name: server.expect(
                    target.port or srv.port,
                    "GET",
                    target.path,
                    200,
                    headers=target.headers,
                )[1]
                for name, target in targets.items()
            }
            if "X-RateLimit-Remaining" not in checked[THROTTLED]:
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
                f"GET one generation by id; {srv.describe()}; load: "
                f"{'wrk' if wrk else 'Python client'} on 127.0.0.1, {rounds} round(s) "
                f"x {duration} s per cell, sides alternated; ratio = median over "
                f"rounds of API req/s / bare req/s"
            )
            ratios = load.print_table(table, baseline=BARE)
            load.print_proxy_cost(ratios)
    errors = sum(cell.errors for cells in table.values() for cell in cells.values())
    worst = min(min(row_[THROTTLED], row_[UNLIMITED]) for row_ in ratios.values())
    throttled_worst = min(row_[THROTTLED] for row_ in ratios.values())
    met = throttled_worst >= load.RATIO_TARGET and errors == 0
    print(
        f"API (throttled key) / bare, worst level: {throttled_worst:.2f}; "
        f"worst of both keys: {worst:.2f} (target >= {load.RATIO_TARGET}): "
        f"{'met' if met else 'MISSED'}; errors: {errors}"
    )
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return met

"""Write path: POST /api/v1/generations vs a bare Django view (SPEC §9).

Same layout as ``bench read`` (one gunicorn, ``gunicorn.conf.py``, production
settings, Redis rate-limit cache, wrk on loopback). The bare view
``POST /bench/generations`` does ``json.loads`` and
``Generation.objects.create(...)`` with the same fields and the same key,
then answers 201 ``JsonResponse``: no DRF, no auth, no validation. The API
authenticates, counts the rate limit, validates every field and inserts
through ``generation_create``. A fourth side sends the throttled key's
request through nginx (docker/nginx/, as ``bench read``). Sides alternated
A B C D at each level; SPEC §9's target is measured directly.
"""

from __future__ import annotations

import dataclasses
import json

from bench import load, server
from bench.load import BARE, PROXIED, THROTTLED, UNLIMITED


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.models import Generation

    load_at_start = server.machine()
    wrk = load.ensure_wrk(install=not smoke)
    levels, rounds, duration = load.schedule(smoke)
    body = json.dumps(server.SAMPLE_GENERATION).encode()
    with server.scratch_database() as url:
        database = connection.settings_dict["NAME"]
        throttled, throttled_raw = api_key_create(
            name="bench writer", rate_limit=load.HUGE_RATE_LIMIT
        )
        _, unlimited_raw = api_key_create(name="bench worker", rate_limit=0)
        json_headers = {**server.PROXY_HEADERS, "Content-Type": "application/json"}
        targets = {
            BARE: load.Target(
                f"/bench/generations?api_key={throttled.pk}",
                method="POST",
                body=body,
                headers=json_headers,
            ),
            THROTTLED: load.Target(
                "/api/v1/generations",
                method="POST",
                body=body,
                headers={**json_headers, "X-API-Key": throttled_raw},
            ),
            UNLIMITED: load.Target(
                "/api/v1/generations",
                method="POST",
                body=body,
                headers={**json_headers, "X-API-Key": unlimited_raw},
            ),
        }
        with server.gunicorn(url) as srv, server.nginx(srv) as proxy_port:
            if proxy_port is not None:
                targets[PROXIED] = dataclasses.replace(
                    targets[THROTTLED], port=proxy_port
                )
            for target in targets.values():
                server.expect(
                    target.port or srv.port,
                    "POST",
                    target.path,
                    201,
                    body=target.body,
                    headers=target.headers,
                )
            table = load.alternate(
                srv.port,
                targets,
                levels=levels,
                rounds=rounds,
                duration=duration,
                cpu=lambda: server.server_cpu_seconds([srv], database),
            )
            print(
                f"POST one generation (9 fields, JSON); {srv.describe()}; load: "
                f"{'wrk' if wrk else 'Python client'} on 127.0.0.1, {rounds} round(s) "
                f"x {duration} s per cell, sides alternated; ratio = median over "
                f"rounds of API req/s / bare req/s"
            )
            ratios = load.print_table(table, baseline=BARE)
            load.print_proxy_cost(ratios)
        inserted = Generation.all_objects.count()
    answered = sum(
        result.requests
        for cells in table.values()
        for cell in cells.values()
        for result in cell.rounds
    )
    errors = sum(cell.errors for cells in table.values() for cell in cells.values())
    throttled_worst = min(row[THROTTLED] for row in ratios.values())
    worst = min(min(row[THROTTLED], row[UNLIMITED]) for row in ratios.values())
    met = throttled_worst >= load.RATIO_TARGET and errors == 0
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

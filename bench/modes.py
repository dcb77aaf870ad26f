"""Connection modes: the read path with persistent connections, the pool, none.

Three gunicorns (``gunicorn.conf.py``: same workers and threads, production
settings, Redis rate-limit cache) serve the same scratch database, differing
only in the connection mode (SPEC §2):

- ``DB_CONN_MAX_AGE=300`` (the default): one persistent connection per
  thread, checked before reuse (``CONN_HEALTH_CHECKS``);
- ``DB_POOL=1``: Django's psycopg pool per process (``max_size`` =
  ``GUNICORN_THREADS``), checked on checkout;
- ``DB_CONN_MAX_AGE=0``: a new connection per request.

Each answers ``GET /api/v1/generations/{id}`` with a normal key; the servers
are alternated A B C at each concurrency level, load from wrk. Also shown:
the server connections each mode holds once the load is over.
"""

from __future__ import annotations

import contextlib
import time

from bench import load, server

SETTLE_SECONDS = 1

PERSISTENT = "DB_CONN_MAX_AGE=300 (default)"
POOL = "DB_POOL=1"
NEW_PER_REQUEST = "DB_CONN_MAX_AGE=0"
MODES = {
    PERSISTENT: ("persistent", {"DB_CONN_MAX_AGE": "300"}),
    POOL: ("pool", {"DB_POOL": "1"}),
    NEW_PER_REQUEST: ("per_request", {"DB_CONN_MAX_AGE": "0"}),
}


def held_connections(database: str) -> dict[str, int]:
    """Server connections per application_name on the scratch database."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE datname = %s GROUP BY 1",
            [database],
        )
        return dict(cursor.fetchall())


def run(*, smoke: bool = False) -> bool:
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.services import generation_create

    load_at_start = server.machine()
    wrk = load.ensure_wrk(install=not smoke)
    levels, rounds, duration = load.schedule(smoke)
    with server.scratch_database() as url, contextlib.ExitStack() as stack:
        database = connection.settings_dict["NAME"]
        api_key, raw_key = api_key_create(name="bench", rate_limit=load.HUGE_RATE_LIMIT)
        row, _ = generation_create(api_key=api_key, **server.SAMPLE_GENERATION)
        path = f"/api/v1/generations/{row.pk}"
        headers = {**server.PROXY_HEADERS, "X-API-Key": raw_key}
        targets: dict[str, load.Target] = {}
        servers: dict[str, server.Server] = {}
        for name, (tag, env) in MODES.items():
            # application_name tells the three servers' connections apart.
            srv = stack.enter_context(
                server.gunicorn(f"{url}?application_name=lockngen_{tag}", **env)
            )
            server.expect(srv.port, "GET", path, 200, headers=headers)
            servers[name] = srv
            targets[name] = load.Target(path, headers=headers, port=srv.port)
        table = load.alternate(
            None,
            targets,
            levels=levels,
            rounds=rounds,
            duration=duration,
            cpu=lambda: server.server_cpu_seconds(list(servers.values()), database),
        )
        time.sleep(SETTLE_SECONDS)  # let closed connections' backends exit
        held = held_connections(database)
        describe = servers[PERSISTENT].describe()
    print(
        f"GET one generation by id with key auth; {describe}; one server per "
        f"mode, same database; load: {'wrk' if wrk else 'Python client'}, "
        f"{rounds} round(s) x {duration} s per cell, modes alternated; "
        "ratio = median over rounds of req/s / the default's"
    )
    ratios = load.print_table(table, baseline=PERSISTENT, label="connection mode")
    print("server connections held after the load (pg_stat_activity):")
    for name, (tag, _) in MODES.items():
        print(f"  {name:32}{held.get(f'lockngen_{tag}', 0):>4}")
    summary = ", ".join(
        f"c={level}: pool {row_[POOL]:.2f}x, max_age=0 {row_[NEW_PER_REQUEST]:.2f}x"
        for level, row_ in ratios.items()
    )
    print(f"vs the default: {summary}")
    # No target in SPEC §9: this table is the evidence for the default.
    print(f"machine: {load_at_start} at start, {server.machine()} at end")
    return True

"""Two or more checkouts of the service side by side: ``python -m bench.compare``.

    python -m bench.compare read base=. patched=/tmp/lockngen-patched
    python -m bench.compare write base=. patched=/tmp/lockngen-patched

Not a benchmark of its own (no ``run``): the tool behind the before/after
tables in docs/PERFORMANCE.md. One scratch database; one gunicorn per
checkout (each with its own code, the same ``gunicorn.conf.py`` settings);
the bare view of the first checkout as the baseline; wrk alternating
bare, A, B, … at each concurrency level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import bench
from bench import load, server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("path", choices=["read", "write"])
    parser.add_argument("checkouts", nargs="+", metavar="NAME=DIR")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=1)
    args = parser.parse_args(argv)
    checkouts = dict(item.split("=", 1) for item in args.checkouts)
    levels = tuple(int(level) for level in args.levels.split(","))

    bench.setup_django()
    from django.db import connection

    from apikeys.services import api_key_create
    from generations.services import generation_create

    with server.scratch_database() as url, contextlib.ExitStack() as stack:
        database = connection.settings_dict["NAME"]
        all_servers: list[server.Server] = []
        api_key, raw_key = api_key_create(name="bench", rate_limit=load.HUGE_RATE_LIMIT)
        row, _ = generation_create(api_key=api_key, **server.SAMPLE_GENERATION)
        headers = {**server.PROXY_HEADERS, "X-API-Key": raw_key}
        body = json.dumps(server.SAMPLE_GENERATION).encode()
        json_headers = {**headers, "Content-Type": "application/json"}
        targets: dict[str, load.Target] = {}
        for name, directory in checkouts.items():
            srv = stack.enter_context(server.gunicorn(url, cwd=Path(directory)))
            all_servers.append(srv)
            if not targets:
                targets["bare"] = (
                    load.Target(
                        f"/bench/generations/{row.pk}",
                        headers=server.PROXY_HEADERS,
                        port=srv.port,
                    )
                    if args.path == "read"
                    else load.Target(
                        f"/bench/generations?api_key={api_key.pk}",
                        method="POST",
                        body=body,
                        headers=json_headers,
                        port=srv.port,
                    )
                )
            targets[name] = (
                load.Target(
                    f"/api/v1/generations/{row.pk}", headers=headers, port=srv.port
                )
                if args.path == "read"
                else load.Target(
                    "/api/v1/generations",
                    method="POST",
                    body=body,
                    headers=json_headers,
                    port=srv.port,
                )
            )
        for target in targets.values():
            server.expect(
                target.port or 0,
                target.method,
                target.path,
                200 if target.method == "GET" else 201,
                body=target.body,
                headers=target.headers,
            )
        table = load.alternate(
            None,
            targets,
            levels=levels,
            rounds=args.rounds,
            duration=args.duration,
            cpu=lambda: server.server_cpu_seconds(all_servers, database),
        )
    print(
        f"{args.path} path, key rate_limit=1e9; {args.rounds} round(s) x "
        f"{args.duration} s per cell, alternated; ratio = median over rounds of "
        "req/s / the bare view's"
    )
    load.print_table(table, baseline="bare", label="checkout")
    print(f"machine: {server.machine()}")


if __name__ == "__main__":
    main()

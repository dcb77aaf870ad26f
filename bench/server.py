"""Shared harness for the HTTP benchmarks: scratch database, gunicorn, keys.

``scratch_database()`` creates ``bench_<random>`` on the ``DATABASE_URL``
server, points this process's Django ``default`` connection at it, migrates
it, and always drops it afterwards. ``gunicorn()`` serves ``bench.wsgi`` (the
service's urls plus the bare baseline views of ``bench.urls``) with the
project's own ``gunicorn.conf.py`` on a free 127.0.0.1 port, in production
mode, and stops it (SIGTERM, then SIGKILL) on exit.

Free ports, scratch databases and the gunicorn launcher are the tests' own
(``tests.serving``): bench/ imports tests/, never the other way round, so the
suite runs without the benchmarks and both start servers the same way.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests import serving

BASE_DIR = Path(__file__).resolve().parent.parent
# Only gunicorn imports it: importing bench.wsgi sets Django up.
APP = "bench.wsgi:application"
HOST = "127.0.0.1"
# The service runs behind a TLS-terminating proxy (SPEC §2): with this header
# production settings treat the request as HTTPS and do not redirect.
PROXY_HEADERS = {"X-Forwarded-Proto": "https"}
# The generation every HTTP benchmark reads or writes (9 client fields).
SAMPLE_GENERATION = {
    "name": "bench",
    "prompt": "a lighthouse at dusk, volumetric light, 35mm",
    "negative_prompt": "blurry, lowres",
    "width": 1024,
    "height": 768,
    "steps": 30,
    "guidance": 7.5,
    "seed": 1234567890123,
}


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A migrated ``bench_<random>`` database, current for this process's Django.

    Yields its URL (for gunicorn). Created and dropped (``WITH (FORCE)``,
    whatever happened) by the tests' own helper, so no benchmark leaves data
    behind.
    """
    from django.core.management import call_command
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    if settings_dict["ENGINE"] != "lockngen.db":
        raise SystemExit("the HTTP benchmarks need DATABASE_URL to point at PostgreSQL")
    original = settings_dict["NAME"]
    with serving.scratch_database("bench") as name:
        try:
            connections.close_all()
            settings_dict["NAME"] = name
            call_command("migrate", verbosity=0, interactive=False)
            yield serving.url_for(name)
        finally:
            connections.close_all()
            settings_dict["NAME"] = original


def machine() -> str:
    """CPUs and the 1-minute load average: other work on the box skews ratios."""
    return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def redis_url() -> str | None:
    """``REDIS_URL`` if set, else the local Redis if one answers, else None."""
    configured = os.environ.get("REDIS_URL", "").strip()
    if configured:
        return configured
    try:
        with socket.create_connection((HOST, 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return f"redis://{HOST}:6379/0"
    except OSError:
        pass
    return None


class Server(serving.Server):
    """The tests' gunicorn launcher, serving gunicorn.conf.py's own layout."""

    def describe(self) -> str:
        return (
            f"gunicorn {self.env.get('WEB_CONCURRENCY', '2')} workers x "
            f"{self.env.get('GUNICORN_THREADS', '4')} gthread threads, production "
            "settings, rate-limit cache "
            f"{'Redis' if 'REDIS_URL' in self.env else 'local memory'}"
        )


def request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes, dict[str, str]]:
    """One request on a fresh connection: ``(status, body, headers)``."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request(
            method, path, body=body, headers={**PROXY_HEADERS, **(headers or {})}
        )
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def expect(
    port: int,
    method: str,
    path: str,
    status: int,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """One request that must answer ``status`` (before any load is measured)."""
    got, content, response_headers = request(
        port, method, path, body=body, headers=headers
    )
    if got != status:
        raise RuntimeError(
            f"{method} {path} answered {got}, not {status}: {content[:300]!r}"
        )
    return content, response_headers


def server_env(database_url: str, port: int, **overrides: str) -> dict[str, str]:
    """The environment gunicorn runs with: production, as deployed."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DB_", "GUNICORN_", "DJANGO_"))
        and key not in {"DEBUG", "REDIS_URL", "WEB_CONCURRENCY"}
    }
    env |= {
        "LOCKNGEN_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": HOST,
        "DATABASE_URL": database_url,
        "HOST": HOST,
        "PORT": str(port),
        "GUNICORN_LOG_LEVEL": "warning",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    redis = redis_url()
    if redis:
        env["REDIS_URL"] = redis
    # WEB_CONCURRENCY / GUNICORN_THREADS keep gunicorn.conf.py's defaults
    # (2 workers x 4 threads) unless the caller's environment sets them.
    for name in ("WEB_CONCURRENCY", "GUNICORN_THREADS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env |= overrides
    return env


@contextlib.contextmanager
def gunicorn(
    database_url: str,
    *,
    app: str = APP,
    ready_path: str = "/health/live",
    cwd: Path = BASE_DIR,
    **env_overrides: str,
) -> Iterator[Server]:
    """gunicorn with the project's ``gunicorn.conf.py``; stopped on exit.

    ``cwd`` may point at another checkout, to compare two versions of the
    code side by side against one database.
    """
    port = serving.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gunicorn-") as directory:
        server = Server(
            server_env(database_url, port, **env_overrides),
            command=[sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
            + [app],
            cwd=cwd,
            log_path=Path(directory) / "gunicorn.log",
            small=False,
            access_log=False,  # one line per request
        )
        try:
            server.start(wait=False)
            server.wait_for_status(ready_path, 200)
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def nginx(server: Server) -> Iterator[int | None]:
    """Debian's nginx with the shipped config (docker/nginx/) in front of
    ``server``; yields its port, or None (and says so) when nginx is missing.

    The same harness as the proxy tests (tests/proxy.py), so the benchmark
    measures exactly what they check. The benchmark's client is 127.0.0.1,
    which the config exempts from its per-address limits (the container's own
    loopback), so they never throttle the load.
    """
    from tests.proxy import nginx_binary, nginx_in_front

    if not nginx_binary():
        print("nginx is not installed: no 'API via nginx' side (apt-get install nginx)")
        yield None
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory,
        nginx_in_front(server.port, Path(directory)) as proxy,
    ):
        yield proxy.port


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU of one process so far (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def server_cpu_seconds(
    servers: list[Server], database: str, *, except_application: str | None = None
) -> float:
    """CPU used so far by the servers' gunicorn workers and by every other
    PostgreSQL backend on ``database`` (the benchmark's own excluded, and
    those whose ``application_name`` is ``except_application``: another
    process's, counted by ``backend_cpu_seconds``).

    Sampled around each load run it gives the server side's CPU per request,
    which other work on a shared machine does not skew the way it skews
    requests/s. Backends that exit during a run (``DB_CONN_MAX_AGE=0``)
    take their CPU with them.
    """
    pids = [pid for srv in servers for pid in worker_pids(srv)]
    pids += backend_pids(database, except_application=except_application)
    return sum(process_cpu_seconds(pid) for pid in pids)


def backend_cpu_seconds(database: str, application_name: str) -> float:
    """CPU used so far by the backends on ``database`` of one application
    (e.g. the delivery worker's, which connects as its own name)."""
    return sum(
        process_cpu_seconds(pid)
        for pid in backend_pids(database, application_name=application_name)
    )


def backend_pids(
    database: str,
    *,
    application_name: str | None = None,
    except_application: str | None = None,
) -> list[int]:
    """The PostgreSQL backends on ``database`` (the benchmark's own excluded),
    all, of one ``application_name``, or all but one."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() "
            "AND (%s::text IS NULL OR application_name = %s) "
            "AND (%s::text IS NULL OR application_name IS DISTINCT FROM %s)",
            [
                database,
                application_name,
                application_name,
                except_application,
                except_application,
            ],
        )
        return [row[0] for row in cursor.fetchall()]


def worker_pids(server: Server) -> list[int]:
    """gunicorn's worker processes (children of the arbiter), for profilers."""
    try:
        out = subprocess.run(
            ["pgrep", "-P", str(server.process.pid)],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(pid) for pid in out.split()]

"""gunicorn settings, every one from the environment (README "Configuration").

Run as ``gunicorn --config gunicorn.conf.py`` (the Docker image's default).
"""

from __future__ import annotations

import os
from typing import Any

from lockngen.env import env_bool, env_int


def _int(name: str, default: int) -> int:
    return env_int(os.environ, name, default)


wsgi_app = "lockngen.wsgi:application"

# HOST exists for tests and host-run setups; containers must listen on all
# interfaces to be reachable at all.
bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{_int('PORT', 8000)}"]  # noqa: S104
workers = _int("WEB_CONCURRENCY", 2)
worker_class = "gthread"
threads = _int("GUNICORN_THREADS", 4)
# Kept above the database's worst case (connect retries + statement_timeout),
# which lockngen.database refuses to configure otherwise: a stuck query ends
# in a 503, never in a killed worker.
timeout = _int("GUNICORN_TIMEOUT", 60)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

# Never preload: Django's psycopg pool lives in a class-level dict that fork
# would copy into every worker with its sockets (Django ticket #36957), and
# persistent connections must not be shared across processes either.
preload_app = False

# The heartbeat file on a tmpfs, so a slow container disk cannot stall workers.
SHM = "/dev/shm"  # noqa: S108 - gunicorn's own recommendation for containers
if os.path.isdir(SHM):
    worker_tmp_dir = SHM

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# The request id is the *response* header set by our middleware (echoed from
# the client's X-Request-ID or generated), so every line can be correlated.
access_log_format = (
    '%(h)s "%({x-forwarded-for}i)s" %(t)s "%(r)s" %(s)s %(b)s %(M)sms '
    '"%(a)s" request_id=%({x-request-id}o)s'
)


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Read what is left of a request body the application did not read.

    Views that refuse a request early (401, 404, 405, 413 …) never read its
    body. On a kept-alive connection gthread would then find those bytes
    waiting, hand the connection to a worker thread, discard them and block
    in recv() for a next request the idle client may never send: a few such
    clients pin every thread of a worker (benoitc/gunicorn#3301). Draining
    here, before the connection goes back to the poller, prevents that.
    """
    if resp is None or resp.should_close():
        return
    try:
        while req.body.read(65536):
            pass
    except Exception as exc:  # a client gone mid-body: nothing left to protect
        worker.log.debug("draining an unread request body failed: %s", exc)


def worker_exit(server: Any, worker: Any) -> None:
    """Close this worker's database pool so PostgreSQL sees clean disconnects."""
    if not env_bool(os.environ, "DB_POOL"):
        return
    try:
        from django.db import connections

        for alias in connections:
            close_pool = getattr(connections[alias], "close_pool", None)
            if close_pool is not None:
                close_pool()
    except Exception as exc:  # the worker is going away either way
        server.log.warning(
            "worker %s: closing the database pool failed: %s", worker.pid, exc
        )
    else:
        server.log.info("worker %s: closed the database connection pool", worker.pid)

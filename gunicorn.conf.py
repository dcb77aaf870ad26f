"""gunicorn settings, every one from the environment (README "Configuration").

Run as ``gunicorn --config gunicorn.conf.py`` (the Docker image's default).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any

from lockngen.client_address import DEFAULT_TRUSTED_PROXIES, parse_networks
from lockngen.env import env_bool, env_int, env_list


def _int(name: str, default: int) -> int:
    return env_int(os.environ, name, default)


wsgi_app = "lockngen.wsgi:application"

# HOST exists for tests and host-run setups; containers must listen on all
# interfaces to be reachable at all.
bind = [f"{os.environ.get('HOST', '0.0.0.0')}:{_int('PORT', 8000)}"]  # noqa: S104
workers = _int("WEB_CONCURRENCY", 2)
# gthread, minus a 2 s blocking close on its event loop (lockngen.gunicorn_worker).
worker_class = "lockngen.gunicorn_worker.ThreadWorker"
threads = _int("GUNICORN_THREADS", 4)
# Kept above the database's worst case (connect retries + statement_timeout),
# which lockngen.database refuses to configure otherwise: a stuck query ends
# in a 503, never in a killed worker.
timeout = _int("GUNICORN_TIMEOUT", 60)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

# gunicorn >= 27's gthread worker survives an idle-connection flood (2,000+
# sockets) that wedged 23.x at 100 % CPU (upstream #3146 / #3407): accepted
# sockets wait for their first byte in the poller, not in a thread, and it
# drains unread request bodies itself before keep-alive, with a deadline
# (benoitc/gunicorn#3301; our post_request drain hook is gone). Past
# worker_connections a worker stops accepting and the kernel backlog holds
# the rest.
worker_connections = _int("GUNICORN_WORKER_CONNECTIONS", 1000)
backlog = _int("GUNICORN_BACKLOG", 2048)
# The request line and headers our clients send are small; these are
# gunicorn's defaults except fewer header fields (nginx sends ~10).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190

# What gthread 27 still lacks: once a request's first byte has arrived a
# thread reads the rest from a blocking socket with no timeout
# (workers/gthread.py, handle(): setblocking(True)), so a client that sends
# half a header and goes silent pins that thread for good; eight such
# sockets stop a 2 x 4 server. A kernel receive/send timeout on the listening
# socket, which accepted sockets inherit, makes each such recv()/send() fail
# after CLIENT_TIMEOUT seconds and gunicorn closes the connection (5 s, like
# gthread's own wait for a first byte). It bounds silence, not a trickle, and
# N silent sockets still cost N / threads x 5 s of a worker: nginx in front
# passes only whole requests and bounds headers and bodies itself.
CLIENT_TIMEOUT_S = _int("GUNICORN_CLIENT_TIMEOUT", 5)

# X-Forwarded-Proto only from the proxies the application trusts too
# (TRUSTED_PROXIES, lockngen.settings): the same list for both.
forwarded_allow_ips = ",".join(
    str(network)
    for network in parse_networks(
        env_list(os.environ, "TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES),
        name="TRUSTED_PROXIES",
    )
)

# gunicorn >= 25 opens a control socket under $HOME by default; several
# servers on one host would fight over it and the container's home is not
# writable. Nothing here uses gunicornc.
control_socket_disable = True

# /health/live on a loopback side port, outside the worker thread pool, so a
# busy database cannot fail the liveness probe (lockngen.liveprobe). 0 = off.
LIVENESS_PORT = _int("LIVENESS_PORT", 0)

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


class QuietClientTimeouts(logging.Filter):
    """One line instead of a traceback for a connection closed by CLIENT_TIMEOUT_S.

    gthread logs every unexpected socket error with log.exception; the
    EAGAIN of an expired SO_RCVTIMEO / SO_SNDTIMEO is a slow client, not a bug.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BlockingIOError):
            record.msg = "closed a connection silent for %ss mid-request"
            record.args = (CLIENT_TIMEOUT_S,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def post_worker_init(worker: Any) -> None:
    """In each worker before it accepts: client timeouts, the log filter and
    the liveness side port."""
    timeval = struct.pack("ll", CLIENT_TIMEOUT_S, 0)
    for listener in worker.sockets:
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            listener.setsockopt(socket.SOL_SOCKET, option, timeval)
    logging.getLogger("gunicorn.error").addFilter(QuietClientTimeouts())
    if LIVENESS_PORT:
        from lockngen import liveprobe

        liveprobe.start(LIVENESS_PORT)
        worker.log.info("liveness probe on 127.0.0.1:%s", LIVENESS_PORT)


def worker_exit(server: Any, worker: Any) -> None:
    """Send the webhook wake-up still due (``webhooks.wake``), then close this
    worker's database pool so PostgreSQL sees clean disconnects."""
    try:
        from webhooks.wake import waker

        waker.stop(1.0)
    except Exception as exc:  # a wake-up lost only waits for the workers' poll
        server.log.warning(
            "worker %s: stopping the webhook waker failed: %s", worker.pid, exc
        )
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

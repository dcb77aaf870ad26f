"""``/health/live`` on a loopback side port, answered outside gunicorn's thread pool.

Every request on the service port waits for one of a worker's threads. When
all of them wait on a locked table (up to ``DB_STATEMENT_TIMEOUT_MS`` each,
and the queue behind them keeps growing under load) a liveness probe on that
port times out and an orchestrator restarts a healthy process because the
database is busy (SPEC §12). So each gunicorn worker also answers the
liveness probe on ``127.0.0.1:LIVENESS_PORT`` from one thread of its own
that never touches the database (``gunicorn.conf.py`` starts it).

Hand-written on the standard library's ``http.server`` because gunicorn has no
hook for a second, non-WSGI listener and the probe must not load anything
that could block. Every worker binds the same port with ``SO_REUSEPORT``, so
the probe reaches whichever worker the kernel picks and fails only when no
worker process is left. Loopback only: nothing outside the container reaches
it, and it serves one probe at a time with a short socket timeout, so it
cannot become a second thing to flood.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer

from lockngen.probes import LIVE_PATHS, liveness

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# A probe client that connects and stays silent must not hold the one thread.
CLIENT_TIMEOUT_S = 2.0


class LivenessHandler(BaseHTTPRequestHandler):
    timeout = CLIENT_TIMEOUT_S
    server_version = "lockngen-liveprobe"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.answer(with_body=False)

    def answer(self, *, with_body: bool) -> None:
        if self.path.partition("?")[0] in LIVE_PATHS:
            state, body = liveness()
            status = state.http_status
        else:
            status, body = HTTPStatus.NOT_FOUND, {"detail": "Not found."}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # One line per probe every few seconds is noise; errors still log.
        logger.debug("liveness probe: " + format, *args)


class LivenessServer(HTTPServer):
    allow_reuse_address = True
    allow_reuse_port = True  # one listener per gunicorn worker on the same port

    def handle_error(self, request: object, client_address: object) -> None:
        # A probe client that vanished mid-request: one line, no traceback.
        logger.info("liveness probe from %s failed to complete", client_address)


def start(port: int, host: str = HOST) -> LivenessServer:
    """Serve the liveness probe on ``host:port`` from a daemon thread."""
    server = LivenessServer((host, port), LivenessHandler)
    thread = threading.Thread(
        target=server.serve_forever, name="liveness-probe", daemon=True
    )
    thread.start()
    return server

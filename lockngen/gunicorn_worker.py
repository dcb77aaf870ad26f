"""gunicorn's gthread worker without a blocking close on its event loop.

gunicorn 27.0.1's ``ThreadWorker.finish_request`` runs on the worker's one
event-loop thread and ends every connection it does not keep alive with
``util.close_graceful``: half-close, then wait up to 2 s for the client's
FIN. A client that sends ``Connection: close`` (or a bad request) and then
neither reads nor hangs up stalls that loop for the whole 2 s: no accept, no
keep-alive dispatch, no finished request handed back. Ten such sockets kept
a worker silent for 20 s (tests/test_edge_serving.py). Here the close still
half-closes first and drains whatever request bytes already sit in the
kernel buffer (the RST that ``close_graceful`` avoids comes from unread
data), but never waits for the peer.

Hand-written because gunicorn has no setting for it; only public names of
the worker are used (``finish_request``, ``nr_conns``, ``conn.sock``).
"""

from __future__ import annotations

import contextlib
import socket
from concurrent.futures import Future
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker

# Bytes of an unread request drained before closing; past that the client is
# still streaming and an RST is what it gets.
MAX_DRAIN_BYTES = 65536


def close_without_lingering(sock: socket.socket) -> None:
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            drained = 0
            while drained < MAX_DRAIN_BYTES:
                data = sock.recv(8192)  # BlockingIOError once the buffer is empty
                if not data:
                    break
                drained += len(data)
    finally:
        with contextlib.suppress(OSError):
            sock.close()


class ThreadWorker(GunicornThreadWorker):
    def finish_request(self, conn: Any, fs: Future) -> None:
        # handle() returns False for "close this connection"; keep-alive,
        # deferral and errors keep gunicorn's own handling.
        if fs.cancelled() or fs.exception() is not None or fs.result() is not False:
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        close_without_lingering(conn.sock)

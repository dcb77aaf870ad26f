"""gunicorn's gthread worker: no blocking close on its event loop, JSON refusals.

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

Its own refusals (a request it cannot parse: bad request line, a control
character in a header, oversized headers; or an application error before the
response started) are HTML pages in gunicorn. Here they leave as
``{"detail": "<reason>"}`` with the same status, like every other error of the
service (SPEC §12: nothing a client sends produces an HTML page).

Hand-written because gunicorn has no setting for either; only public names
of the worker are used (``finish_request``, ``handle_error``, ``nr_conns``,
``conn.sock``).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from concurrent.futures import Future
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker

# Bytes of an unread request drained before closing; past that the client is
# still streaming and an RST is what it gets.
MAX_DRAIN_BYTES = 65536


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([^\r\n]*)\r\n")


class JsonErrorSocket:
    """The client socket, except that gunicorn's one error write
    (``util.write_error``: status line, headers, HTML) goes out as JSON.

    Keeps gunicorn's choice of status and reason, and nothing of its
    message, which may quote what the client sent.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        match = STATUS_LINE.match(data)
        if match is None:  # not gunicorn's error page: pass it on untouched
            self.sock.sendall(data)
            return
        status, reason = match.group(1), match.group(2)
        body = json.dumps({"detail": reason.decode("latin-1")}).encode()
        self.sock.sendall(
            b"HTTP/1.1 " + status + b" " + reason + b"\r\n"
            b"Connection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )


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

    def handle_error(
        self, req: Any, client: Any, addr: Any, exc: BaseException
    ) -> None:
        super().handle_error(req, JsonErrorSocket(client), addr, exc)

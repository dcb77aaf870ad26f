"""gunicorn's gthread worker: lingering closes off its event loop, JSON refusals.

gunicorn 27.0.1's ``ThreadWorker.finish_request`` runs on the worker's one
event-loop thread and ends every connection it does not keep alive with
``util.close_graceful``: half-close, then block up to 2 s reading until the
client's FIN. A client that sends ``Connection: close`` (or a bad request)
and then neither reads nor hangs up stalls that loop for the whole 2 s: no
accept, no keep-alive dispatch, no finished request handed back. Ten such
sockets kept a worker silent for 20 s (tests/test_edge_serving.py). Here the
lingering close (RFC 9112 section 9.6: let the client finish sending, or the
kernel's RST can destroy the answer it has not read yet, e.g. a 413 for a
body it is still sending) happens in the poller instead, as nginx's
lingering close does: half-close, then drain on each readable event, close
on EOF, after LINGER_MAX_BYTES or after LINGER_S.

Its own refusals (a request it cannot parse: bad request line, a control
character in a header, too many headers; or an application error before the
response started) are HTML pages in gunicorn. Here they leave as
``{"detail": "<reason>"}`` with the same status, like every other error of
the service (SPEC §12: nothing a client sends produces an HTML page).

Hand-written because gunicorn has no setting for either; only public names
of the worker are used (``finish_request``, ``murder_keepalived``,
``handle_error``, ``poller``, ``nr_conns``, ``conn.sock``).
"""

from __future__ import annotations

import contextlib
import json
import re
import selectors
import socket
import time
from concurrent.futures import Future
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker as GunicornThreadWorker

# A closed connection drains what the client still sends for at most this
# long and this much (gunicorn's own close waited 2 s on the loop, 64 KiB);
# past either the client gets an RST. Draining costs the loop one recv() per
# 64 KiB, like nginx's lingering close.
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024
DRAIN_CHUNK = 65536


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


class ThreadWorker(GunicornThreadWorker):
    """gthread whose closes linger in the poller, and whose refusals are JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Half-closed sockets still draining the client's request: deadline each.
        self.lingering: dict[socket.socket, float] = {}

    def finish_request(self, conn: Any, fs: Future) -> None:
        # handle() returns False for "close this connection"; keep-alive,
        # deferral and errors keep gunicorn's own handling.
        if fs.cancelled() or fs.exception() is not None or fs.result() is not False:
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        self.linger(conn.sock)

    def linger(self, sock: socket.socket) -> None:
        """Half-close, then drain from the poller until EOF, LINGER_MAX_BYTES
        or LINGER_S, then close.

        Draining sockets no longer count as connections, so their number is
        capped separately (at ``worker_connections``): past it a close is
        immediate, or clients that never hang up could exhaust descriptors.
        """
        if len(self.lingering) >= self.cfg.worker_connections:
            with contextlib.suppress(OSError):
                sock.close()
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            budget = [LINGER_MAX_BYTES]
            self.poller.register(
                sock, selectors.EVENT_READ, partial(self.drain, sock, budget)
            )
        except (OSError, ValueError, KeyError):
            with contextlib.suppress(OSError):
                sock.close()
            return
        self.lingering[sock] = time.monotonic() + LINGER_S

    def drain(self, sock: socket.socket, budget: list[int], _fileobj: Any) -> None:
        try:
            data = sock.recv(DRAIN_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        budget[0] -= len(data)
        if data and budget[0] > 0:
            return
        self.end_linger(sock)

    def end_linger(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def murder_keepalived(self, force: bool = False) -> None:
        # Called by the worker's loop every second (and with force=True on the
        # way out): expired lingering closes end here too.
        super().murder_keepalived(force)
        now = time.monotonic()
        for sock, deadline in list(self.lingering.items()):
            if force or deadline <= now:
                self.end_linger(sock)

    def handle_error(
        self, req: Any, client: Any, addr: Any, exc: BaseException
    ) -> None:
        super().handle_error(req, JsonErrorSocket(client), addr, exc)

"""A real webhook receiver on 127.0.0.1 (http.server in a thread).

It records every request (headers and raw body) and answers from a script:
``Receiver(statuses=[500, 500, 200])`` answers 500, 500, then 200 for every
later request. ``stop()`` closes the port (a receiver that is down);
``start()`` opens the same port again. Status ``HANG`` holds the request
unanswered until ``release()`` (a receiver stuck mid-request).
"""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tests.serving import free_port

HANG = 0


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    # When the body had been read (this process's monotonic clock): the
    # webhook benchmark's arrival time.
    arrived: float = field(default_factory=time.monotonic, compare=False)


class _Server(http.server.ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of deliveries (the
    # worker makes up to 10 at once, each on a new connection) overflowed it
    # and an attempt failed to connect. A real receiver's is hundreds.
    request_queue_size = 128
    daemon_threads = True


class Receiver:
    def __init__(
        self,
        statuses: Iterable[int] = (200,),
        port: int | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        self.statuses = list(statuses)
        self.tls = tls
        self.server_names: list[str | None] = []  # SNI of each TLS handshake
        self.port = port or free_port()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._released = threading.Event()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hooks/lockngen"

    def _status(self) -> int:
        with self._lock:
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def start(self) -> Receiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._status()
                with receiver._lock:
                    receiver.received.append(Received(self.path, headers, body))
                if status == HANG:
                    receiver._released.wait(60)
                    status = 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", receiver.url + "/moved")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = _Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:

            def record_sni(sock: ssl.SSLObject, name: str | None, context: object):
                self.server_names.append(name)

            self.tls.sni_callback = record_sni
            self._server.socket = self.tls.wrap_socket(
                self._server.socket, server_side=True
            )
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The first ``count`` requests, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(
            f"expected {count} webhook requests, got {len(self.received)} "
            f"in {timeout:.0f}s"
        )

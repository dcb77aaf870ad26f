"""nginx in front (docker/nginx/, SPEC §12): Debian's nginx with the shipped
config in front of a real gunicorn, the way compose's `proxy` runs it.

Attackers and burst clients connect from other loopback addresses
(127.0.0.2, 127.0.0.3) than the normal client (127.0.0.1), as separate
clients would: the proxy's limits are per address. Everything is bounded in
count and time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.liveserver import (
    PROXY_HEADERS,
    LiveApi,
    create_key,
    live_api,
    migrate,
)
from tests.proxy import Proxy, nginx_binary, nginx_in_front
from tests.serving import closed_port, scratch_database, url_for
from tests.test_edge_serving import FLOOD_SOCKETS, raise_open_file_limit

ATTACKER = "127.0.0.2"
BURSTER = "127.0.0.3"


def logged(read_log, text: str, within: float = 5.0) -> bool:
    """Whether ``text`` shows up in the log within ``within`` s (servers write
    their access line just after the response has gone out)."""
    deadline = time.monotonic() + within
    while text not in read_log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Front:
    api: LiveApi
    proxy: Proxy

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
        timeout: float = 10,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.proxy.port, timeout=timeout, source_address=(source, 0)
        )
        try:
            all_headers = {**PROXY_HEADERS, **(headers or {})}
            conn.request(method, path, body=body, headers=all_headers)
            reply = conn.getresponse()
            return reply.status, reply.headers, reply.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    """nginx in front of a deliberately small gunicorn (1 worker x 2 threads)."""
    assert nginx_binary(), "nginx is not installed: apt-get install -y nginx"
    with scratch_database("proxy") as name:
        url = url_for(name)
        migrate(url)
        key = create_key(url, "through the proxy")
        directory = tmp_path_factory.mktemp("nginx")
        with (
            live_api(
                url,
                log_path=directory / "gunicorn.log",
                key=key,
                WEB_CONCURRENCY="1",
                GUNICORN_THREADS="2",
            ) as api,
            nginx_in_front(api.server.port, directory) as proxy,
        ):
            yield Front(api, proxy)


def test_nginx_answers_its_own_health_check(front):
    status, headers, body = front.request("GET", "/nginx-health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok"}


def test_requests_reach_the_service_with_their_request_id(front):
    status, headers, _ = front.request(
        "GET",
        "/api/v1/keys/me",
        headers={
            "Authorization": f"Bearer {front.api.key}",
            "X-Request-ID": "edge-proxy-test-1",
        },
    )
    assert status == 200
    assert headers["X-Request-ID"] == "edge-proxy-test-1"
    assert logged(front.api.server.log, "request_id=edge-proxy-test-1")
    assert logged(front.proxy.log, "request_id=edge-proxy-test-1")


def test_without_a_request_id_nginx_makes_one_that_the_service_uses(front):
    status, headers, _ = front.request("GET", "/health/live")
    assert status == 200
    request_id = headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert logged(front.proxy.log, f"request_id={request_id}")
    assert logged(front.api.server.log, f"request_id={request_id}")


def test_the_service_sees_the_address_nginx_saw_not_one_the_client_wrote(front):
    marker = "edge-proxy-forwarded"
    front.request(
        "GET",
        "/health/live",
        source=ATTACKER,
        headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": marker},
    )
    assert logged(front.api.server.log, marker)
    line = next(line for line in front.api.server.log().splitlines() if marker in line)
    # gunicorn's access log: peer (nginx) then the X-Forwarded-For it received.
    assert line.startswith(f'127.0.0.1 "{ATTACKER}" '), line
    assert "203.0.113.9" not in line


def test_a_body_over_the_proxy_cap_is_refused_in_json_before_the_service(front):
    marker = "edge-proxy-too-large"
    status, headers, body = front.request(
        "POST",
        "/api/v1/generations",
        body=b'{"prompt": "' + b"x" * 300_000 + b'"}',
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {front.api.key}",
            "X-Request-ID": marker,
        },
    )
    assert status == 413
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"detail": "Request body too large."}
    assert logged(front.proxy.log, marker)  # nginx logged it; gunicorn never saw it
    assert marker not in front.api.server.log()


def test_admin_login_bursts_get_the_proxys_429(front):
    statuses = [
        front.request(
            "POST",
            "/admin/login/",
            body=b"username=admin&password=wrong",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            source=BURSTER,
        )[0]
        for _ in range(12)
    ]
    # The first six reach the service (one plus a burst of five), then 429.
    assert 429 not in statuses[:6], statuses
    assert statuses[6:] == [429] * 6, statuses
    status, headers, body = front.request(
        "POST", "/admin/login/", body=b"", source=BURSTER
    )
    assert status == 429
    assert headers["Retry-After"]
    assert json.loads(body)["detail"]
    # Rendering the form is not an attempt, and other addresses are unaffected.
    assert front.request("GET", "/admin/login/", source=BURSTER)[0] != 429
    assert front.request("POST", "/admin/login/", body=b"")[0] != 429


def test_slowloris_through_nginx_does_not_disturb_other_clients(front):
    """30 sockets trickle header bytes for 5 s: gunicorn's two threads never
    see them, and a normal client is answered every time meanwhile."""
    header = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    sockets = []
    answers: list[int | None] = []
    try:
        for _ in range(30):
            sock = socket.create_connection(
                ("127.0.0.1", front.proxy.port), timeout=5, source_address=(ATTACKER, 0)
            )
            sockets.append(sock)
        for second in range(5):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(header[second : second + 1])
            for _ in range(2):
                try:
                    answers.append(front.request("GET", "/health/live", timeout=2)[0])
                except OSError:
                    answers.append(None)
                time.sleep(0.4)
    finally:
        for sock in sockets:
            sock.close()
    assert answers == [200] * 10, answers


def test_nginx_answers_503_json_while_the_service_is_down(tmp_path):
    """Nothing listens behind it: nginx's own 502 becomes a JSON 503."""
    with nginx_in_front(closed_port(), tmp_path) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("GET", "/api/v1/keys/me", headers=PROXY_HEADERS)
            reply = conn.getresponse()
            status, headers, body = reply.status, reply.headers, reply.read()
        finally:
            conn.close()
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert headers["Retry-After"]
    assert json.loads(body) == {"detail": "Service temporarily unavailable."}


@contextlib.contextmanager
def silent_upstream() -> Iterator[int]:
    """A server that accepts connections and never answers: requests nginx
    passes to it stay in flight until the test ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in held:
            sock.close()
        listener.close()


def test_one_address_gets_at_most_twenty_requests_in_flight(tmp_path):
    request = b"GET /api/v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with silent_upstream() as upstream, nginx_in_front(upstream, tmp_path) as proxy:
        clients = []
        try:
            for _ in range(20):
                sock = socket.create_connection(
                    ("127.0.0.1", proxy.port), timeout=5, source_address=(ATTACKER, 0)
                )
                sock.sendall(request)
                clients.append(sock)
            time.sleep(0.5)  # all twenty passed on and waiting upstream
            conn = http.client.HTTPConnection(
                "127.0.0.1", proxy.port, timeout=5, source_address=(ATTACKER, 0)
            )
            conn.request("GET", "/api/v1/generations")
            refused = conn.getresponse()
            refused_body = refused.read()
            conn.close()
            # Another address is not limited by the first one's requests:
            # its request is passed on too (and waits like the others).
            other = socket.create_connection(
                ("127.0.0.1", proxy.port), timeout=1, source_address=(BURSTER, 0)
            )
            clients.append(other)
            other.sendall(request)
            with pytest.raises(TimeoutError):
                other.recv(64)
        finally:
            for sock in clients:
                sock.close()
    assert refused.status == 429
    assert json.loads(refused_body)["detail"]


def test_an_idle_connection_flood_on_nginx_does_not_disturb_other_clients(front):
    """2,100 sockets from one address opened and held: nginx holds them in its
    event loop (none has sent a request, so gunicorn never sees one) and
    other clients are answered throughout."""
    raise_open_file_limit(FLOOD_SOCKETS + 256)
    sockets = []
    try:
        for _ in range(FLOOD_SOCKETS):
            sockets.append(
                socket.create_connection(
                    ("127.0.0.1", front.proxy.port),
                    timeout=10,
                    source_address=(ATTACKER, 0),
                )
            )
        during = [front.request("GET", "/health/live", timeout=2)[0] for _ in range(5)]
    finally:
        for sock in sockets:
            sock.close()
    assert during == [200] * 5
    assert front.request("GET", "/health/live", timeout=2)[0] == 200

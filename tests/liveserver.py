"""A live API for the fault, fuzzing and security tests: gunicorn + a real database.

Builds on ``tests.serving`` (gunicorn with ``gunicorn.conf.py`` on a free
127.0.0.1 port, its own process group, killed on exit): migrates a database
with ``manage.py migrate``, makes keys with ``manage.py createapikey`` and
talks JSON to ``/api/v1`` with a client timeout on every request, so a hung
server fails a test instead of stalling the run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.serving import Server, manage, process_env

# Production as deployed: behind a TLS-terminating proxy that says so.
PRODUCTION = {
    "LOCKNGEN_ENV": "production",
    "SECRET_KEY": "live-server-secret-key-for-tests-only-" + "x" * 30,
    "ALLOWED_HOSTS": "127.0.0.1",
}
PROXY_HEADERS = {"X-Forwarded-Proto": "https"}
CLIENT_TIMEOUT_S = 20


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_json(self) -> bool:
        return self.headers.get("Content-Type", "").startswith("application/json")


def environment(database_url: str, *, production: bool = True, **env: str) -> dict:
    """The service's environment: only what the test gives it (``tests.serving``)."""
    return process_env(
        **{"DATABASE_URL": database_url, **(PRODUCTION if production else {}), **env}
    )


def migrate(database_url: str, **env: str) -> None:
    done = manage("migrate", "--noinput", env=environment(database_url, **env))
    assert done.returncode == 0, done.stderr


def create_key(database_url: str, name: str, *, admin: bool = False) -> str:
    """A new unlimited key through ``manage.py createapikey``; its raw value."""
    args = ["createapikey", name, "--rate-limit", "0", *(["--admin"] if admin else [])]
    done = manage(*args, env=environment(database_url))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class LiveApi:
    """JSON over HTTP to one gunicorn server, as one API key."""

    def __init__(self, server: Server, key: str | None = None) -> None:
        self.server = server
        self.key = key

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = CLIENT_TIMEOUT_S,
    ) -> Reply:
        """One request on a fresh connection, as ``key`` (default: this client's
        key; ``""``: none); raises on a client timeout."""
        all_headers = dict(PROXY_HEADERS)
        raw_key = self.key if key is None else key  # "": no credentials
        if raw_key:
            all_headers["Authorization"] = f"Bearer {raw_key}"
        payload = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        url = path if path.startswith("/") else f"/api/v1/{path}"
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.server.port, timeout=timeout
        )
        try:
            conn.request(method, url, body=payload, headers=all_headers)
            raw = conn.getresponse()
            return Reply(raw.status, raw.headers, raw.read())
        finally:
            conn.close()

    def worker_pids(self) -> list[int]:
        """gunicorn's workers (children of the arbiter)."""
        assert self.server.process is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.server.process.pid)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        return sorted(int(pid) for pid in out.split())

    def log(self) -> str:
        return self.server.log()


@contextlib.contextmanager
def live_api(
    database_url: str,
    *,
    log_path: Path,
    key: str | None = None,
    production: bool = True,
    **env: str,
) -> Iterator[LiveApi]:
    """gunicorn serving the API on ``database_url``; stopped on exit."""
    server = Server(
        environment(database_url, production=production, **env), log_path=log_path
    )
    try:
        server.start()
        yield LiveApi(server, key)
    finally:
        server.stop()

"""Real processes for the operations tests: gunicorn, manage.py, scratch databases.

Servers bind 127.0.0.1 on a free port, run in their own process group and are
always killed by the fixture that started them; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

BASE_DIR = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
START_DEADLINE_S = 60
STOP_DEADLINE_S = 15
COMMAND_DEADLINE_S = 180

# Everything our settings read: a subprocess gets only what a test gives it.
CONFIG_VARIABLES = (
    "LOCKNGEN_ENV",
    "DATABASE_URL",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "DEBUG",
    "REDIS_URL",
    "LOCKNGEN_DEV_API_KEY",
    "PORT",
    "LIVENESS_PORT",
    "HOST",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_TIMEOUT",
    "LEASE_SECONDS",
    "MAX_ATTEMPTS",
    "TEST_DB_SUFFIX",
    "TRUSTED_PROXIES",
    "AUTH_FAILURES_PER_MINUTE",
    "ADMIN_LOGIN_FAILURES",
)


def server_url() -> str:
    """The PostgreSQL server the suite runs against (``make test``'s default)."""
    return os.environ.get(
        "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"
    ).strip()


def url_for(
    database: str,
    *,
    user: str | None = None,
    password: str | None = None,
    port: int | None = None,
    **query: str,
) -> str:
    """``server_url()`` pointing at another database, user or port.

    With ``password`` the URL carries one (trust authentication ignores it),
    so tests can look for it in everything the service prints.
    """
    parts = urlsplit(server_url())
    user = user or parts.username or "postgres"
    netloc = f"{user}:{password}@" if password is not None else f"{user}@"
    netloc += f"{parts.hostname or '127.0.0.1'}:{port or parts.port or 5432}"
    query_string = "&".join(f"{key}={value}" for key, value in query.items())
    return urlunsplit(
        parts._replace(netloc=netloc, path=f"/{database}", query=query_string)
    )


def admin_connection(server: str | None = None) -> psycopg.Connection:
    """An autocommit connection to ``server`` (a ``postgres://…/postgres`` URL;
    default: the suite's server)."""
    return psycopg.connect(
        server or url_for("postgres"), autocommit=True, connect_timeout=10
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The one home of this helper for tests/ and bench/: the port is only a
    snapshot, so callers that can retry (PgCluster) move on if it is taken.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (connections are refused at once)."""
    return free_port()


def scratch_name(prefix: str = "ops") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def scratch_database(
    prefix: str = "ops",
    *,
    owner: str | None = None,
    template: str | None = None,
    server: str | None = None,
) -> Iterator[str]:
    """A fresh database ``<prefix>_<hex>``; yields its name, always drops it.

    Empty unless ``template`` names one to copy; on the suite's server unless
    ``server`` is another one's ``postgres://…/postgres`` URL (a PgCluster's).
    The one scratch-database helper of tests/ and bench/.
    """
    name = scratch_name(prefix)
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if owner:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    if template:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with admin_connection(server) as conn:
        conn.execute(statement)
    try:
        yield name
    finally:
        with admin_connection(server) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


@contextlib.contextmanager
def scratch_role(prefix: str = "ops") -> Iterator[str]:
    """A fresh login role ``<prefix>_<hex>`` (no password: trust auth); dropped after.

    For settings that live on a role (``ALTER ROLE … SET``) without touching
    the shared server's own roles.
    """
    name = scratch_name(prefix)
    with admin_connection() as conn:
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
    try:
        yield name
    finally:
        with admin_connection() as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def connection_count(database: str, application_name: str | None = None) -> int:
    """Client connections to ``database`` (optionally of one application_name)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    )
    params: list[str] = [database]
    if application_name is not None:
        query += " AND application_name = %s"
        params.append(application_name)
    with admin_connection() as conn:
        return conn.execute(query, params).fetchone()[0]


def process_env(**overrides: str | None) -> dict[str, str]:
    """The test environment minus our configuration, plus ``overrides``.

    ``None`` removes a variable. The venv comes first on ``PATH`` so scripts
    (the entrypoint) find its ``python`` and ``gunicorn``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in CONFIG_VARIABLES and not key.startswith(("DB_", "GUNICORN_"))
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def manage(
    *args: str, env: Mapping[str, str], cwd: Path = BASE_DIR
) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` in a subprocess (bounded in time)."""
    return subprocess.run(
        [str(VENV_BIN / "python"), "manage.py", *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=COMMAND_DEADLINE_S,
        check=False,
    )


def build_context(destination: Path) -> Path:
    """Copy the source tree as ``docker build`` sees it (``.dockerignore`` applied).

    Lets a test run collectstatic or the SQLite fallback (both write under
    ``BASE_DIR/var``) without touching the developer's ``var/``.
    """
    patterns = [
        line.strip()
        for line in (BASE_DIR / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    app = destination / "app"
    shutil.copytree(BASE_DIR, app, ignore=shutil.ignore_patterns(*patterns))
    return app


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: str


class Server:
    """A subprocess serving HTTP on ``127.0.0.1:<port>`` (gunicorn by default)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        command: list[str] | None = None,
        cwd: Path = BASE_DIR,
        log_path: Path,
        small: bool = True,
        access_log: bool = True,
    ) -> None:
        """``small``: 1 worker x 2 threads unless ``env`` says otherwise (tests);
        else gunicorn.conf.py's own layout (the benchmarks). Without
        ``access_log`` gunicorn's stdout (one line per request) is discarded
        and only its stderr is logged."""
        self.port = int(env.get("PORT") or free_port())
        self.env = {**env, "PORT": str(self.port), "HOST": "127.0.0.1"}
        if small:
            self.env.setdefault("WEB_CONCURRENCY", "1")
            self.env.setdefault("GUNICORN_THREADS", "2")
        self.access_log = access_log
        self.command = command or [
            str(VENV_BIN / "gunicorn"),
            "--config",
            "gunicorn.conf.py",
        ]
        self.cwd = cwd
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> Server:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log if self.access_log else subprocess.DEVNULL,
                stderr=subprocess.STDOUT if self.access_log else log,
                start_new_session=True,
            )
        if wait:
            self.wait_until_serving()
        return self

    def wait_until_serving(self, path: str = "/health/live") -> None:
        """Until ``path`` answers at all (any status), or fail with the log."""
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.process.returncode}:\n{self.log()}"
                )
            with contextlib.suppress(OSError):
                self.get(path)
                return
            time.sleep(0.1)
        raise AssertionError(f"server did not answer {path} in time:\n{self.log()}")

    def wait_for_status(self, path: str, status: int) -> Response:
        deadline = time.monotonic() + START_DEADLINE_S
        response = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log()}")
            with contextlib.suppress(OSError):
                response = self.get(path)
                if response.status == status:
                    return response
            time.sleep(0.2)
        raise AssertionError(
            f"{path} never answered {status} (last: {response}):\n{self.log()}"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            raw = conn.getresponse()
            return Response(raw.status, raw.headers, raw.read().decode())
        finally:
            conn.close()

    def get(self, path: str, **headers: str) -> Response:
        return self.request(
            "GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it if it lingers; returns its code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_DEADLINE_S)
        # Anything the server forked (workers) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


@contextlib.contextmanager
def serving(env: Mapping[str, str], *, log_path: Path, **kwargs) -> Iterator[Server]:
    server = Server(env, log_path=log_path, **kwargs)
    try:
        yield server.start()
    finally:
        server.stop()

"""A throwaway PostgreSQL cluster for tests that need to stop and start a server.

The machine's shared server must never be stopped, so fault-injection tests
(database down at startup, restarted under load, late to come up) get a cluster
of their own: ``initdb`` into a temporary directory, trust authentication,
listening on 127.0.0.1 on a free port with its unix socket inside that
directory, durability switched off because nothing in it is worth keeping.

As root (CI) the server binaries refuse to run, so every command is run as the
``postgres`` user through ``runuser`` and the directory is handed to that user.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Literal

from tests.serving import free_port

logger = logging.getLogger(__name__)

StopMode = Literal["smart", "fast", "immediate"]

SERVER_USER = "postgres"
BINDIR_CANDIDATES = (
    os.environ.get("PG_BINDIR", ""),
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
)
START_TIMEOUT_S = 30
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "16MB",
    "max_wal_senders": "0",
    "wal_level": "minimal",
    "log_min_messages": "warning",
    "logging_collector": "off",
    "timezone": "'Etc/UTC'",
}

_live_clusters: weakref.WeakSet[PgCluster] = weakref.WeakSet()


class PgClusterError(RuntimeError):
    """A cluster command failed; the message carries the server log's tail."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (``$PG_BINDIR`` wins)."""
    for candidate in BINDIR_CANDIDATES:
        if candidate and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise PgClusterError("pg_ctl not found: install PostgreSQL or set PG_BINDIR")


class PgCluster:
    """One disposable PostgreSQL server. ``start()`` runs ``initdb`` on first use.

    ``start()`` and ``stop()`` are idempotent, so a test may leave the cluster
    in either state and the next user puts it back where it needs it.
    """

    def __init__(self, *, bindir: Path | None = None, port: int | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.root = Path(tempfile.mkdtemp(prefix="lockngen-pg-"))
        self.datadir = self.root / "data"
        self.socket_dir = self.root / "run"
        self.logfile = self.root / "server.log"
        self._as_server_user = os.geteuid() == 0
        self._initialised = False
        self._cleaned = False
        if self._as_server_user:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        _live_clusters.add(self)

    def __repr__(self) -> str:
        return f"<PgCluster 127.0.0.1:{self.port} {self.root}>"

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # --- commands ----------------------------------------------------------

    def _run(
        self, tool: str, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        if self._as_server_user:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            # Locale and timezone of the caller must not leak into the cluster.
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        )
        if check and result.returncode != 0:
            raise PgClusterError(
                f"{tool} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n{self.log_tail()}"
            )
        return result

    def _write(self, path: Path, text: str) -> None:
        # Written by us, read by the server user: hand the file over too.
        path.write_text(text)
        if self._as_server_user:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(path, account.pw_uid, account.pw_gid)

    def init(self) -> None:
        """``initdb`` (no fsync, trust auth) and the configuration; once."""
        if self._initialised:
            return
        self._run(
            "initdb",
            "--pgdata",
            str(self.datadir),
            "--username",
            SERVER_USER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
            "--no-instructions",
        )
        self.socket_dir.mkdir()
        if self._as_server_user:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.socket_dir, account.pw_uid, account.pw_gid)
        self._write(self.logfile, "")
        self._configure()
        self._initialised = True

    def _configure(self) -> None:
        lines = [f"{name} = {value}" for name, value in SETTINGS.items()]
        lines += [
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
        ]
        self._write(self.datadir / "lockngen-test.conf", "\n".join(lines) + "\n")
        conf = self.datadir / "postgresql.conf"
        text = conf.read_text()
        if "include 'lockngen-test.conf'" not in text:
            self._write(conf, text + "\ninclude 'lockngen-test.conf'\n")

    @property
    def running(self) -> bool:
        if not self._initialised:
            return False
        status = self._run(
            "pg_ctl", "status", "--pgdata", str(self.datadir), check=False
        )
        return status.returncode == 0

    def start(self, *, wait: bool = True) -> None:
        """Start the server; with ``wait`` return once it accepts connections.

        Without ``wait`` it returns while the server is still starting up,
        which is what "the database comes up late" tests want.
        """
        self.init()
        if self.running:
            return
        for _ in range(3):
            result = self._run(
                "pg_ctl",
                "start",
                "--pgdata",
                str(self.datadir),
                "--log",
                str(self.logfile),
                "--wait" if wait else "--no-wait",
                "--timeout",
                str(START_TIMEOUT_S),
                check=False,
                timeout=START_TIMEOUT_S + 10,
            )
            if result.returncode == 0:
                return
            # free_port() is only a snapshot: another process may have taken
            # the port since. A cluster nobody has connected to yet can move.
            if "Address already in use" in self.log_tail() and not self._fixed_port:
                logger.warning("port %d taken, moving the test cluster", self.port)
                self.port = free_port()
                self._configure()
                continue
            break
        raise PgClusterError(
            f"pg_ctl start failed: {result.stderr.strip()}\n{self.log_tail()}"
        )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the server accepts connections (after ``start(wait=False)``)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self._run(
                "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), check=False
            )
            if ready.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise PgClusterError(f"{self!r} not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``fast`` disconnects clients, ``immediate`` crashes)."""
        if not self.running:
            return
        self._run(
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.datadir),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(START_TIMEOUT_S),
            timeout=START_TIMEOUT_S + 10,
        )

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (if running) and start again on the same port."""
        self.stop(mode)
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self) -> None:
        """Stop the server whatever its state and delete its directory."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            if self._initialised:
                with contextlib.suppress(PgClusterError, subprocess.SubprocessError):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            _live_clusters.discard(self)


@atexit.register
def _cleanup_forgotten_clusters() -> None:
    # A server outliving the test run would hold its port and directory forever.
    for cluster in list(_live_clusters):
        cluster.cleanup()

"""Debian's nginx with the shipped config (docker/nginx/) in front of a test server.

The http-context file is rendered exactly as the official image's envsubst
step renders it, for its two variables only; the shipped top-level
``nginx.conf`` has its paths (pid, error log, conf.d, temp files) pointed
into a scratch directory. Loopback only; the process is always stopped by
the context manager that started it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.serving import BASE_DIR, free_port

TEMPLATE = BASE_DIR / "docker" / "nginx" / "templates" / "default.conf.template"
TEMPLATE_VARIABLES = ("LOCKNGEN_UPSTREAM", "NGINX_PORT")
START_DEADLINE_S = 15


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def render(values: dict[str, str]) -> str:
    """``envsubst '${LOCKNGEN_UPSTREAM} ${NGINX_PORT}'`` of the template."""
    assert set(values) == set(TEMPLATE_VARIABLES)
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


TOP_LEVEL = BASE_DIR / "docker" / "nginx" / "nginx.conf"


def top_level_config(directory: Path, server_file: Path) -> str:
    """docker/nginx/nginx.conf with its paths moved into ``directory``."""
    text = TOP_LEVEL.read_text()
    paths = {
        "/run/nginx.pid": directory / "nginx.pid",
        "/var/log/nginx/error.log": directory / "error.log",
        "/etc/nginx/conf.d/*.conf": server_file,
    }
    for shipped, scratch in paths.items():
        assert shipped in text, shipped
        text = text.replace(shipped, str(scratch))
    # The image's unprivileged user; as root here, workers may stay root
    # (the scratch directory is private to this user).
    user = "user root root;" if os.geteuid() == 0 else ""
    assert "user nginx;" in text
    text = text.replace("user nginx;", user)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Debian's compiled-in temp paths are shared by every nginx on the host.
    return text.replace("http {\n", "http {\n" + temp + "\n", 1)


@dataclass
class Proxy:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        parts = []
        for name in ("stdout.log", "error.log"):
            path = self.directory / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


@contextlib.contextmanager
def nginx_in_front(upstream_port: int, directory: Path) -> Iterator[Proxy]:
    binary = nginx_binary()
    assert binary, "nginx is not installed: apt-get install -y nginx"
    port = free_port()
    server_file = directory / "default.conf"
    server_file.write_text(
        render(
            {"LOCKNGEN_UPSTREAM": f"127.0.0.1:{upstream_port}", "NGINX_PORT": str(port)}
        )
    )
    config = directory / "nginx.conf"
    config.write_text(top_level_config(directory, server_file))
    with (directory / "stdout.log").open("wb") as out:
        process = subprocess.Popen(
            [binary, "-p", str(directory), "-c", str(config), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proxy = Proxy(port, directory, process)
    try:
        wait_until_listening(proxy)
        yield proxy
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_until_listening(proxy: Proxy) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            raise AssertionError(f"nginx exited:\n{proxy.log()}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=2)
            try:
                conn.request("GET", "/nginx-health")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.1)
    raise AssertionError(f"nginx did not answer /nginx-health:\n{proxy.log()}")

"""Load generators for the HTTP benchmarks: wrk, or a bounded Python client.

``load()`` runs a closed loop of ``connections`` keep-alive connections
against one URL for ``duration`` seconds and returns requests/s and the p50 /
p99 latency. It uses wrk (a second process, C, on loopback) when installed;
``ensure_wrk()`` installs Debian's package for full runs. Without wrk a
Python client with one thread per connection does the same job (slower: it
shares the GIL, so its absolute numbers are lower, but both sides of a ratio
get the same client).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import percentile

HOST = "127.0.0.1"

# The HTTP benchmarks' shared schedule: concurrency levels, alternated rounds
# per cell, seconds per round (smoke: just enough to prove it runs).
LEVELS, ROUNDS, DURATION = (1, 8, 32), 5, 1
SMOKE_LEVELS, SMOKE_ROUNDS, SMOKE_DURATION = (1, 8), 1, 1
RATIO_TARGET = 0.7  # SPEC §9: API >= 0.7 x the bare view
HUGE_RATE_LIMIT = 1_000_000_000  # per minute: never reached, always counted


# Labels of the sides the read and write benchmarks compare.
BARE = "bare Django view"
THROTTLED = "API, key rate_limit=1e9"
UNLIMITED = "API, key rate_limit=0"
PROXIED = "API via nginx, rate_limit=1e9"


def schedule(smoke: bool) -> tuple[tuple[int, ...], int, int]:
    """``(levels, rounds, duration)`` for a full or a smoke run."""
    if smoke:
        return SMOKE_LEVELS, SMOKE_ROUNDS, SMOKE_DURATION
    return LEVELS, ROUNDS, DURATION


WRK_TIMEOUT = "10s"
RESULT_MARK = "BENCHJSON "

# wrk calls done() once with every thread's statistics merged.
DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,"
    .. "\\"p99_us\\":%d,\\"errors\\":%d,\\"status_errors\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx responses
    client: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def ensure_wrk(*, install: bool) -> str | None:
    """wrk's path; with ``install``, ``apt-get install -y wrk`` first if missing."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("wrk is missing: apt-get install -y wrk", flush=True)
    install_wrk = ["apt-get", "install", "-y", "wrk"]
    # A fresh machine may have no package lists yet: update once, retry.
    for commands in ([install_wrk], [["apt-get", "update"], install_wrk]):
        for command in commands:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(command, env=env, capture_output=True, timeout=300)
        if shutil.which("wrk"):
            break
    return shutil.which("wrk")


def load(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    connections: int,
    duration: float,
    use_wrk: bool = True,
) -> LoadResult:
    headers = headers or {}
    wrk = shutil.which("wrk") if use_wrk else None
    if wrk:
        return _wrk(wrk, port, path, method, body, headers, connections, duration)
    return _python(port, path, method, body, headers, connections, duration)


def _lua_string(text: str) -> str:
    level = "=" * 4
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def _wrk(
    wrk: str,
    port: int,
    path: str,
    method: str,
    body: bytes | None,
    headers: dict[str, str],
    connections: int,
    duration: float,
) -> LoadResult:
    script = [f"wrk.method = {_lua_string(method)}"]
    if body is not None:
        script.append(f"wrk.body = {_lua_string(body.decode())}")
    for name, value in headers.items():
        script.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    script.append(DONE_LUA)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write("\n".join(script))
    try:
        seconds = max(1, round(duration))
        result = subprocess.run(
            [
                wrk,
                f"--threads={min(2, connections)}",
                f"--connections={connections}",
                f"--duration={seconds}s",
                f"--timeout={WRK_TIMEOUT}",
                f"--script={handle.name}",
                f"http://{HOST}:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
    finally:
        Path(handle.name).unlink(missing_ok=True)
    return parse_wrk(result)


def parse_wrk(completed: subprocess.CompletedProcess[str]) -> LoadResult:
    """The result line ``DONE_LUA`` prints at the end of a wrk run."""
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            return LoadResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=data["errors"] + data["status_errors"],
                client="wrk",
            )
    raise RuntimeError(
        f"wrk failed ({completed.returncode}): {completed.stderr.strip()}"
    )


def _python(
    port: int,
    path: str,
    method: str,
    body: bytes | None,
    headers: dict[str, str],
    connections: int,
    duration: float,
) -> LoadResult:
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    stop_at = time.perf_counter() + duration

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=10)
        samples = latencies[index]
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    errors[index] += 1
                    connection.close()
                    connection = http.client.HTTPConnection(HOST, port, timeout=10)
                    continue
                samples.append(time.perf_counter() - started)
                if response.status >= 400:
                    errors[index] += 1
        finally:
            connection.close()

    started = time.perf_counter()
    run_threads(worker, connections)
    elapsed = time.perf_counter() - started
    merged = [sample * 1000 for samples in latencies for sample in samples]
    return LoadResult(
        requests=len(merged),
        seconds=elapsed,
        p50_ms=percentile(merged, 50) if merged else 0.0,
        p99_ms=percentile(merged, 99) if merged else 0.0,
        errors=sum(errors),
        client="python",
    )


def run_threads(target: Callable[[int], None], count: int) -> None:
    """``target(0) … target(count - 1)`` in threads; re-raise the first failure."""
    failures: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # reported to the caller below
            failures.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(index,), daemon=True)
        for index in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


@dataclass(frozen=True)
class Target:
    """One side of a comparison: what every request of a load run sends."""

    path: str
    method: str = "GET"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    port: int | None = None  # a server of its own (else alternate()'s port)


@dataclass(frozen=True)
class Cell:
    """Every round of one target at one concurrency level."""

    rounds: list[LoadResult]
    cpu_seconds: list[float] = field(default_factory=list)  # server side, per round

    @property
    def cpu_ms(self) -> float | None:
        """Server CPU (gunicorn workers + PostgreSQL backends) per request."""
        if not self.cpu_seconds:
            return None
        requests = sum(result.requests for result in self.rounds)
        return sum(self.cpu_seconds) * 1000 / requests if requests else None

    @property
    def rps(self) -> float:
        seconds = sum(result.seconds for result in self.rounds)
        return sum(result.requests for result in self.rounds) / seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(result.p50_ms for result in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(result.p99_ms for result in self.rounds)

    @property
    def errors(self) -> int:
        return sum(result.errors for result in self.rounds)

    def ratio_to(self, baseline: Cell) -> float:
        """Median over rounds of this round's req/s ÷ the baseline's same round.

        Rounds alternate A B A B, so each pair ran seconds apart: noise from
        the rest of the machine hits both sides of a pair alike.
        """
        return statistics.median(
            mine.rps / theirs.rps
            for mine, theirs in zip(self.rounds, baseline.rounds, strict=True)
        )


def alternate(
    port: int | None,
    targets: dict[str, Target],
    *,
    levels: tuple[int, ...],
    rounds: int,
    duration: float,
    warmup: float = 1,
    cpu: Callable[[], float] | None = None,
) -> dict[int, dict[str, Cell]]:
    """For each concurrency level: A B C, A B C, … ``rounds`` times.

    ``cpu``, if given, returns the server side's CPU seconds so far; it is
    sampled around every run.
    """
    for target in targets.values():  # every worker and connection warmed up
        load(
            target.port or port,
            target.path,
            method=target.method,
            body=target.body,
            headers=target.headers,
            connections=max(levels),
            duration=warmup,
        )
    table: dict[int, dict[str, Cell]] = {}
    for connections in levels:
        runs: dict[str, list[LoadResult]] = {name: [] for name in targets}
        spent: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, target in targets.items():
                before = cpu() if cpu else 0.0
                runs[name].append(
                    load(
                        target.port or port,
                        target.path,
                        method=target.method,
                        body=target.body,
                        headers=target.headers,
                        connections=connections,
                        duration=duration,
                    )
                )
                if cpu:
                    spent[name].append(cpu() - before)
        table[connections] = {
            name: Cell(results, spent[name]) for name, results in runs.items()
        }
    return table


def print_proxy_cost(ratios: dict[int, dict[str, float]]) -> None:
    """The proxy's cost: (API via nginx / bare) / (API direct / bare) per level."""
    costs = [
        f"{level}: {row[PROXIED] / row[THROTTLED]:.2f}"
        for level, row in ratios.items()
        if PROXIED in row and row[THROTTLED]
    ]
    if costs:
        print("through nginx / direct (same key), by concurrency: " + ", ".join(costs))


def print_table(
    table: dict[int, dict[str, Cell]], *, baseline: str, label: str = "view"
) -> dict[int, dict[str, float]]:
    """Print req/s, p50, p99, ratio to ``baseline`` and, when measured, the
    server CPU per request and its ratio (baseline CPU / this CPU: 0.5 = twice
    the work); return the req/s ratios.
    """
    names = list(next(iter(table.values())))
    width = max(len(label), *(len(name) for name in names)) + 2
    with_cpu = any(cell.cpu_ms for cells in table.values() for cell in cells.values())
    cpu_header = f"{'CPU ms/req':>11}{'CPU ratio':>10}" if with_cpu else ""
    print(
        f"{'conc':>4}  {label:<{width}}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'ratio':>8}{cpu_header}"
    )
    ratios: dict[int, dict[str, float]] = {}
    for connections, cells in table.items():
        ratios[connections] = {}
        base = cells[baseline]
        for name in names:
            cell = cells[name]
            ratio = " " * 8
            if name != baseline:
                value = cell.ratio_to(base)
                ratios[connections][name] = value
                ratio = f"{value:8.2f}"
            cpu_columns = ""
            if with_cpu and cell.cpu_ms:
                cpu_columns = f"{cell.cpu_ms:11.2f}"
                if name != baseline and base.cpu_ms:
                    cpu_columns += f"{base.cpu_ms / cell.cpu_ms:10.2f}"
            print(
                f"{connections:>4}  {name:<{width}}{cell.rps:8.0f}"
                f"{cell.p50_ms:9.2f}{cell.p99_ms:9.2f}{cell.errors:8d}{ratio}"
                f"{cpu_columns}"
            )
    return ratios

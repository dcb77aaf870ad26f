"""Turn the environment into Django's ``DATABASES["default"]``.

Everything here is a pure function of an environment mapping so that tests can
check every mode (direct, pool, PgBouncer, SQLite fallback) without reloading
settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url

from lockngen.env import ConfigError, env_bool, env_int

POSTGRES_ENGINES = {"django.db.backends.postgresql", "lockngen.db"}
SQLITE_FALLBACK = Path("var") / "lockngen.sqlite3"
APPLICATION_NAME = "lockngen"
# Prepare on the first run (psycopg's default is the sixth): only cursors that
# bind on the server, lockngen.rows's, ever prepare.
PREPARE_THRESHOLD = 0


def redact_url(url: str) -> str:
    """Return ``scheme://user@host:port/name`` without the password, for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable DATABASE_URL>"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def connect_retry_delay(failed_attempts: int) -> float:
    """The wait after the n-th failed connection attempt: 0.1 s doubling, at most 2 s.

    The one schedule: the backend (lockngen.db.base) sleeps it between attempts
    and database_config() counts it in the worst case it checks.
    """
    return min(0.1 * 2 ** (failed_attempts - 1), 2.0)


def connect_retry_delays(retries: int) -> list[float]:
    """Every wait of ``retries`` retries, in order."""
    return [connect_retry_delay(attempt) for attempt in range(1, retries + 1)]


def database_config(
    env: Mapping[str, str], *, production: bool, base_dir: Path
) -> dict[str, Any]:
    """Build ``DATABASES["default"]`` from ``env`` (see SPEC §2)."""
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        if production:
            raise ConfigError(
                "DATABASE_URL is required when LOCKNGEN_ENV=production "
                "(e.g. postgres://lockn:secret@db:5432/lockngen)"
            )
        # Its directory is made at start-up (lockngen.apps), not here.
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(base_dir / SQLITE_FALLBACK),
            "OPTIONS": {"timeout": 20},
            "FALLBACK": True,
        }

    try:
        config: dict[str, Any] = dj_database_url.parse(url)
    except ValueError as exc:  # message may quote the URL: never echo it
        raise ConfigError(
            f"DATABASE_URL is not a valid database URL ({type(exc).__name__}): "
            f"{redact_url(url)}"
        ) from None
    config["CONN_HEALTH_CHECKS"] = True
    config["FALLBACK"] = False
    if config["ENGINE"] not in POSTGRES_ENGINES:
        config["CONN_MAX_AGE"] = env_int(env, "DB_CONN_MAX_AGE", 300)
        return config

    config["ENGINE"] = "lockngen.db"
    options: dict[str, Any] = config.setdefault("OPTIONS", {})
    connect_timeout = env_int(env, "DB_CONNECT_TIMEOUT", 5, minimum=1)
    statement_timeout_ms = env_int(env, "DB_STATEMENT_TIMEOUT_MS", 30000)
    retries = env_int(env, "DB_CONNECT_RETRIES", 3)
    gunicorn_timeout = env_int(env, "GUNICORN_TIMEOUT", 60, minimum=1)
    pgbouncer = env_bool(env, "DB_PGBOUNCER")
    pooled = env_bool(env, "DB_POOL")
    config["PGBOUNCER"] = pgbouncer  # lockngen.db sends no startup options then

    options.setdefault("connect_timeout", connect_timeout)
    options.setdefault("sslmode", env.get("DB_SSLMODE", "").strip() or "prefer")
    options.setdefault("application_name", APPLICATION_NAME)
    if pgbouncer:
        # PgBouncer (transaction pooling) refuses startup parameters it does not
        # know and cannot keep a server-side cursor across transactions: the
        # statement timeout is set on the database role instead.
        config["DISABLE_SERVER_SIDE_CURSORS"] = True
    elif statement_timeout_ms:
        options.setdefault("options", f"-c statement_timeout={statement_timeout_ms}")

    if pooled:
        threads = env_int(env, "GUNICORN_THREADS", 4, minimum=1)
        options["pool"] = {
            "min_size": env_int(env, "DB_POOL_MIN_SIZE", 1),
            "max_size": env_int(env, "DB_POOL_MAX_SIZE", threads, minimum=1),
            "max_lifetime": env_int(env, "DB_POOL_MAX_LIFETIME", 300, minimum=1),
            "timeout": env_int(env, "DB_POOL_TIMEOUT", 10, minimum=1),
        }
        if options["pool"]["min_size"] > options["pool"]["max_size"]:
            raise ConfigError(
                "DB_POOL_MIN_SIZE must not exceed DB_POOL_MAX_SIZE "
                f"({options['pool']['min_size']} > {options['pool']['max_size']})"
            )
        # Django's pool refuses persistent connections; the pool keeps them.
        config["CONN_MAX_AGE"] = 0
        config["CONNECT_RETRIES"] = 0  # the pool has its own reconnect loop
        worst_connect = options["pool"]["timeout"]
    else:
        config["CONN_MAX_AGE"] = env_int(env, "DB_CONN_MAX_AGE", 300)
        config["CONNECT_RETRIES"] = retries
        worst_connect = (retries + 1) * connect_timeout + sum(
            connect_retry_delays(retries)
        )

    if not pgbouncer and (pooled or config["CONN_MAX_AGE"] != 0):
        # psycopg's prepared statements, which Django turns off for the sake
        # of poolers: only lockngen.rows.fetch_all_prepared's cursors bind on
        # the server and use them (Django's own bind on the client and never
        # prepare). Only where connections outlive a request: preparing costs
        # a round trip of its own, paid back from the second run on.
        options.setdefault("prepare_threshold", PREPARE_THRESHOLD)

    worst_case = worst_connect + (0 if pgbouncer else statement_timeout_ms / 1000)
    if worst_case >= gunicorn_timeout:
        raise ConfigError(
            f"database worst case ({worst_case:.0f}s: connect attempts x "
            f"DB_CONNECT_TIMEOUT + DB_STATEMENT_TIMEOUT_MS) must stay below "
            f"GUNICORN_TIMEOUT ({gunicorn_timeout}s)"
        )
    return config

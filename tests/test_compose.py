"""docker-compose.yml, Dockerfile and gunicorn.conf.py, read as their tools read them.

There is no Docker engine in CI: the compose file is parsed with PyYAML and
its api environments go through our real settings code; gunicorn prints the
configuration it would run with; the PostgreSQL init script runs for real.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from lockngen.database import database_config
from tests.serving import (
    BASE_DIR,
    VENV_BIN,
    process_env,
    scratch_database,
    scratch_role,
    url_for,
)

COMPOSE = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
INIT_DIR = BASE_DIR / "docker" / "postgres" / "initdb"


def environment(service: str) -> dict[str, str]:
    """A service's environment (compose accepts a mapping or KEY=VALUE list)."""
    env = SERVICES[service].get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def healthcheck_command(service: str) -> str:
    test = SERVICES[service]["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per logical line, continuations joined."""
    text = re.sub(r"\\\n", " ", (BASE_DIR / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [args for name, args in dockerfile() if name == keyword]


# --- docker-compose.yml -------------------------------------------------------------


def test_postgres_service_is_exactly_the_specified_one():
    postgres = SERVICES["postgres"]
    assert postgres["image"] == "postgres:16-alpine"
    assert environment("postgres") == {
        "POSTGRES_DB": "lockngen",
        "POSTGRES_USER": "lockn",
        "POSTGRES_PASSWORD": "secret",
    }
    assert "postgres_data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "postgres_data" in COMPOSE["volumes"]
    assert "5432:5432" in postgres["ports"]
    assert "pg_isready -U lockn -d lockngen" in healthcheck_command("postgres")
    assert postgres["healthcheck"]["interval"] == "5s"
    assert postgres["healthcheck"]["retries"] == 5


def test_redis_service_has_a_healthcheck():
    assert SERVICES["redis"]["image"] == "redis:7-alpine"
    assert "redis-cli ping" in healthcheck_command("redis")


def test_api_is_built_here_and_waits_for_healthy_postgres_and_redis():
    api = SERVICES["api"]
    assert api["build"] == "."
    assert api["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert "ports" not in api  # reachable only through `proxy` (SPEC §12)
    assert "/health/ready" in healthcheck_command("api")
    assert environment("api")["LOCKNGEN_ENV"] == "development"


def test_api_environment_yields_a_postgres_configuration_on_the_services():
    env = environment("api")
    db = database_config(env, production=False, base_dir=BASE_DIR)
    assert db["ENGINE"] == "lockngen.db"
    assert db["FALLBACK"] is False
    assert (db["HOST"], db["PORT"], db["NAME"]) == ("postgres", 5432, "lockngen")
    postgres_env = environment("postgres")
    assert (db["USER"], db["PASSWORD"]) == (
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
    )
    assert "statement_timeout" in db["OPTIONS"]["options"]
    redis = urlsplit(env["REDIS_URL"])
    assert (redis.scheme, redis.hostname) == ("redis", "redis")


def test_base_services_start_without_a_profile():
    for name in ("postgres", "redis", "api", "webhooks"):
        assert "profiles" not in SERVICES[name], name


def test_the_webhook_worker_runs_deliver_webhooks_on_a_direct_connection():
    webhooks = SERVICES["webhooks"]
    assert webhooks["image"] == SERVICES["api"]["image"]
    assert webhooks["command"] == ["python", "manage.py", "deliver_webhooks"]
    env = environment("webhooks")
    db = database_config(env, production=False, base_dir=BASE_DIR)
    # It LISTENs: PostgreSQL itself, never PgBouncer.
    assert (db["HOST"], db["PORT"], db.get("PGBOUNCER")) == ("postgres", 5432, False)
    assert env["MIGRATE_ON_START"] == "0"  # `api` is the one that migrates
    assert webhooks["depends_on"]["api"] == {"condition": "service_healthy"}
    assert "ports" not in webhooks
    # Not one of nginx's upstreams.
    assert "lockngen-api" not in str(webhooks.get("networks", ""))


def test_scale_profile_runs_pgbouncer_in_transaction_mode_in_front_of_postgres():
    pgbouncer = SERVICES["pgbouncer"]
    env = environment("pgbouncer")
    postgres_env = environment("postgres")
    assert pgbouncer["profiles"] == ["scale"]
    assert pgbouncer["image"].startswith("edoburu/pgbouncer:")
    assert env["POOL_MODE"] == "transaction"
    assert (env["DB_HOST"], env["DB_PORT"]) == ("postgres", "5432")
    assert (env["DB_NAME"], env["DB_USER"], env["DB_PASSWORD"]) == (
        postgres_env["POSTGRES_DB"],
        postgres_env["POSTGRES_USER"],
        postgres_env["POSTGRES_PASSWORD"],
    )
    assert pgbouncer["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert "pg_isready" in healthcheck_command("pgbouncer")


def test_replicas_reach_postgres_only_through_pgbouncer():
    replica = SERVICES["api-replica"]
    env = environment("api-replica")
    db = database_config(env, production=False, base_dir=BASE_DIR)
    assert replica["profiles"] == ["scale"]
    assert replica["image"] == SERVICES["api"]["image"]
    assert (db["HOST"], db["PORT"], db["NAME"]) == ("pgbouncer", 5432, "lockngen")
    assert db["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert "options" not in db["OPTIONS"]  # PgBouncer refuses startup options
    assert env["REDIS_URL"] == environment("api")["REDIS_URL"]  # shared limits
    assert env["MIGRATE_ON_START"] == "0"  # only `api` migrates, directly


def test_replicas_start_after_the_api_has_migrated_and_sit_behind_the_proxy():
    replica = SERVICES["api-replica"]
    assert replica["depends_on"] == {
        "pgbouncer": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        # healthy = /health/ready = migrated; replicas then find nothing to apply
        "api": {"condition": "service_healthy"},
    }
    # Until issue 9 each replica published a host port; now only the proxy
    # does, and it reaches every replica by the shared network alias.
    assert "ports" not in replica
    assert "/health/ready" in healthcheck_command("api-replica")


# --- the proxy (nginx, SPEC §12) ---------------------------------------------------

PROXY = SERVICES["proxy"]
NGINX_TEMPLATES = BASE_DIR / "docker" / "nginx" / "templates"


def published_ports() -> dict[str, list[str]]:
    return {
        name: service["ports"]
        for name, service in SERVICES.items()
        if "ports" in service
    }


def test_the_proxy_is_the_only_published_http_port():
    ports = published_ports()
    assert ports.pop("proxy") == ["8000:80"]
    assert ports.pop("postgres") == ["5432:5432"]
    assert ports.pop("pgbouncer") == ["6432:5432"]
    assert ports == {}, "a published port bypasses the proxy"
    assert "profiles" not in PROXY  # in front of every way compose runs


def test_the_proxy_runs_the_shipped_nginx_config_for_every_api_service():
    assert PROXY["image"].startswith("nginx:")
    assert "./docker/nginx/templates:/etc/nginx/templates:ro" in PROXY["volumes"]
    assert "./docker/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in PROXY["volumes"]
    assert sorted(path.name for path in NGINX_TEMPLATES.iterdir()) == [
        "default.conf.template"
    ]
    env = environment("proxy")
    host, port = env["LOCKNGEN_UPSTREAM"].rsplit(":", 1)
    assert port == "8000"  # the image's PORT
    for name in ("api", "api-replica"):
        assert host in SERVICES[name]["networks"]["default"]["aliases"], name
    assert PROXY["ports"] == [f"8000:{env['NGINX_PORT']}"]
    assert PROXY["depends_on"]["api"] == {"condition": "service_healthy"}
    assert PROXY["depends_on"]["api-replica"]["required"] is False
    assert "/nginx-health" in healthcheck_command("proxy")


def test_api_services_believe_x_forwarded_for_only_from_the_proxy():
    [subnet] = COMPOSE["networks"]["default"]["ipam"]["config"]
    network = ipaddress.ip_network(subnet["subnet"])
    proxy_address = ipaddress.ip_address(PROXY["networks"]["default"]["ipv4_address"])
    assert proxy_address in network
    for name in ("api", "api-replica"):
        trusted = environment(name)["TRUSTED_PROXIES"].split(",")
        assert [ipaddress.ip_network(item) for item in trusted] == [
            ipaddress.ip_network(f"{proxy_address}/32")
        ], name


def test_postgres_runs_our_init_scripts():
    assert (
        "./docker/postgres/initdb:/docker-entrypoint-initdb.d:ro"
        in (SERVICES["postgres"]["volumes"])
    )
    assert sorted(path.suffix for path in INIT_DIR.iterdir()) == [".sql"]


def test_init_script_sets_the_statement_timeout_on_the_role():
    """Run as the role itself, like the postgres image runs it as POSTGRES_USER."""
    [script] = sorted(INIT_DIR.glob("*.sql"))
    with scratch_role() as role, scratch_database(owner=role) as name:
        with psycopg.connect(url_for(name, user=role), autocommit=True) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
            conn.execute(script.read_text())
        # A new session of the role gets it, with no startup option at all.
        with psycopg.connect(url_for(name, user=role)) as conn:
            timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
        with psycopg.connect(url_for(name)) as conn:  # only that role
            other = conn.execute("SHOW statement_timeout").fetchone()[0]
    assert timeout == "30s"
    assert other == "0"


# --- Dockerfile -----------------------------------------------------------------------


def test_dependencies_are_installed_in_their_own_layer_before_the_code():
    steps = [f"{name} {args}" for name, args in dockerfile()]
    copy_requirements = steps.index("COPY requirements.txt ./")
    install = next(i for i, s in enumerate(steps) if "pip install -r" in s)
    copy_code = steps.index("COPY . .")
    assert copy_requirements < install < copy_code


def test_image_has_the_postgres_client_of_the_compose_server():
    """migration_script runs pg_dump / psql, which refuse a newer server."""
    server_major = SERVICES["postgres"]["image"].split(":")[1].split("-")[0]
    [client_major] = [
        args.split("=", 1)[1]
        for args in instruction_args("ARG")
        if args.startswith("PG_CLIENT_MAJOR=")
    ]
    assert client_major == server_major
    runs = " ".join(instruction_args("RUN"))
    assert '"postgresql-client-${PG_CLIENT_MAJOR}"' in runs


def test_image_runs_as_a_non_root_user():
    users = instruction_args("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    created = " ".join(args for name, args in dockerfile() if name == "RUN")
    assert f"useradd --system --uid {user}" in created


def test_entrypoint_is_executable_in_git_and_runs_gunicorn_by_default():
    [entrypoint] = instruction_args("ENTRYPOINT")
    assert entrypoint == '["/app/docker/entrypoint.sh"]'
    assert instruction_args("CMD") == ['["gunicorn", "--config", "gunicorn.conf.py"]']
    script = BASE_DIR / "docker" / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    mode = subprocess.run(
        ["git", "ls-files", "--stage", "docker/entrypoint.sh"],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert mode.startswith("100755"), mode or "entrypoint.sh is not committed"


@pytest.mark.parametrize("entry", [".env", ".git", ".venv", "var", "__pycache__"])
def test_dockerignore_keeps_secrets_and_local_state_out(entry):
    lines = (BASE_DIR / ".dockerignore").read_text().splitlines()
    assert entry in lines


# --- gunicorn.conf.py ---------------------------------------------------------------


def gunicorn_config(**env: str) -> dict[str, str]:
    """The configuration gunicorn itself reads from gunicorn.conf.py."""
    done = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "--config", "gunicorn.conf.py", "--print-config"],
        cwd=BASE_DIR,
        env=process_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    config = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            config[key.strip()] = value.strip()
    return config


def test_gunicorn_defaults():
    config = gunicorn_config()
    assert config["bind"] == "['0.0.0.0:8000']"
    assert (config["workers"], config["threads"]) == ("2", "4")
    # gthread minus its blocking close on the event loop (lockngen.gunicorn_worker)
    assert config["worker_class"] == "lockngen.gunicorn_worker.ThreadWorker"
    assert config["timeout"] == "60"
    assert config["control_socket_disable"] == "True"
    assert config["forwarded_allow_ips"] == "['127.0.0.1/32', '::1/128']"
    assert config["post_worker_init"] == "<post_worker_init()>"
    assert config["preload_app"] == "False"  # Django ticket #36957
    assert config["wsgi_app"] == "lockngen.wsgi:application"
    assert config["accesslog"] == "-"
    assert "%({x-request-id}o)s" in config["access_log_format"]
    assert config["worker_exit"] == "<worker_exit()>"


def test_gunicorn_reads_port_concurrency_threads_and_timeouts_from_the_env():
    config = gunicorn_config(
        PORT="9123",
        WEB_CONCURRENCY="3",
        GUNICORN_THREADS="8",
        GUNICORN_TIMEOUT="90",
        GUNICORN_GRACEFUL_TIMEOUT="20",
    )
    assert config["bind"] == "['0.0.0.0:9123']"
    assert (config["workers"], config["threads"]) == ("3", "8")
    assert (config["timeout"], config["graceful_timeout"]) == ("90", "20")


def test_gunicorn_timeout_is_above_the_statement_timeout():
    statement_timeout_s = 30000 / 1000  # DB_STATEMENT_TIMEOUT_MS default
    assert int(gunicorn_config()["timeout"]) > statement_timeout_s
    assert Path(INIT_DIR / "10-statement-timeout.sql").read_text().count("'30s'")

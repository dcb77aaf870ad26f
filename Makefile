# LockN Gen persistence service. `make run` and `make test` are the quick start.
SHELL := /bin/bash
PYTHON_BIN ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# The suite always runs against PostgreSQL; this is the default server.
TEST_DATABASE_URL := $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:5432/postgres)

.PHONY: run test lint format bench migrate superuser clean

$(VENV)/bin/python:
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_dev_key
	@echo ""
	@echo "  LockN Gen is starting on http://127.0.0.1:$(PORT)"
	@echo "  API docs  http://127.0.0.1:$(PORT)/api/docs"
	@echo "  Admin     http://127.0.0.1:$(PORT)/admin/"
	@echo "  Health    http://127.0.0.1:$(PORT)/health/"
	@$(PY) manage.py seed_dev_key --print | tail -n 1
	@echo ""
	@# On PostgreSQL (DATABASE_URL, from the environment or .env) a webhook
	@# delivery worker runs beside the server and stops with it.
	@if $(PY) manage.py deliver_webhooks --check >/dev/null 2>&1; then \
	  echo "  Webhooks  delivery worker started (manage.py deliver_webhooks)"; \
	  $(PY) manage.py deliver_webhooks & worker=$$!; \
	  trap 'kill $$worker 2>/dev/null; wait $$worker 2>/dev/null' EXIT; \
	  $(PY) manage.py runserver 127.0.0.1:$(PORT); \
	else \
	  echo "  Webhooks  unavailable on the SQLite fallback (set DATABASE_URL)"; \
	  $(PY) manage.py runserver 127.0.0.1:$(PORT); \
	fi

test: $(VENV)/.dev
	@DATABASE_URL='$(TEST_DATABASE_URL)' DB_CONNECT_RETRIES=0 $(PY) manage.py wait_for_db --timeout 3 >/dev/null 2>$(VENV)/.pgcheck || { \
	  echo "PostgreSQL is not usable at DATABASE_URL ($$(tail -n 1 $(VENV)/.pgcheck | sed 's/^CommandError: //')): start it with 'pg_ctlcluster --skip-systemctl-redirect 15 main start' (or 'docker compose up -d postgres') or set DATABASE_URL."; exit 1; }
	@$(PY) -c "import redis; redis.Redis(host='127.0.0.1', port=6379, socket_connect_timeout=2).ping()" 2>/dev/null || { \
	  echo "Redis is not reachable at 127.0.0.1:6379 (the rate-limit tests share counters through it): start it with 'redis-server --daemonize yes' (or 'docker compose up -d redis')."; exit 1; }
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || { \
	  echo "pgbouncer is not installed (the PgBouncer tests run a real one): apt-get install -y pgbouncer"; exit 1; }
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  echo "nginx is not installed (the proxy tests run a real one with docker/nginx/'s config): apt-get install -y nginx"; exit 1; }
	DATABASE_URL='$(TEST_DATABASE_URL)' $(PY) -m pytest --cov --cov-report=term $(PYTEST_ARGS)
	@echo "== SQLite fallback smoke run (DATABASE_URL unset) =="
	env -u DATABASE_URL -u REDIS_URL $(PY) -m pytest -m sqlite_smoke $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

migrate: $(VENV)/.runtime
	$(PY) manage.py migrate --noinput

superuser: $(VENV)/.runtime
	$(PY) manage.py createsuperuser

bench: $(VENV)/.dev
	DATABASE_URL='$(TEST_DATABASE_URL)' $(PY) -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .coverage

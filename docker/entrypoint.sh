#!/bin/sh
# Container entrypoint: wait for the database, then (development only) migrate
# and seed the dev key, then exec the command (gunicorn by default).
#
# Production never migrates on start: several replicas would race, and schema
# changes are an operator's decision (README "Production deployment").
# /health/ready answers 503 until `manage.py migrate` has run.
set -eu

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" manage.py wait_for_db --timeout "${WAIT_FOR_DB_TIMEOUT:-60}"

# MIGRATE_ON_START=0: a development replica that must leave migrating to the
# one `api` service (compose profile `scale`).
if [ "${LOCKNGEN_ENV:-development}" = "development" ] && [ "${MIGRATE_ON_START:-1}" != "0" ]; then
  "$PYTHON" manage.py migrate --noinput
  "$PYTHON" manage.py seed_dev_key
fi

if [ "$#" -eq 0 ]; then
  set -- gunicorn --config gunicorn.conf.py
fi
exec "$@"

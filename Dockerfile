# LockN Gen persistence service. Production by default:
#   docker build -t lockngen .
#   docker run -e DATABASE_URL=... -e SECRET_KEY=... -e ALLOWED_HOSTS=... -p 8000:8000 lockngen
# docker-compose.yml runs it in development mode instead (README "Docker compose").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# manage.py migration_script copies the target's schema with pg_dump and psql,
# which must be of the server's major version (compose runs PostgreSQL 16;
# Debian's own client is another major), so the client comes from the
# PostgreSQL project's apt repository, enabled by Debian's postgresql-common.
ARG PG_CLIENT_MAJOR=16
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-common \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends "postgresql-client-${PG_CLIENT_MAJOR}" \
 && rm -rf /var/lib/apt/lists/*

# Dependencies in their own layer: rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# A fixed numeric uid, so orchestrators can verify runAsNonRoot.
RUN groupadd --system --gid 10001 lockngen \
 && useradd --system --uid 10001 --gid lockngen --home-dir /app --no-create-home lockngen

COPY . .

# Static files (admin, Swagger UI) are collected into the image at build time
# and served by WhiteNoise with hashed, compressed names. Production settings
# need these three variables; nothing connects to this dummy database.
RUN LOCKNGEN_ENV=production SECRET_KEY=collectstatic-only ALLOWED_HOSTS=localhost \
    DATABASE_URL=postgres://build@localhost:5432/build \
    python manage.py collectstatic --noinput \
 && mkdir -p var && chown lockngen:lockngen var

# LIVENESS_PORT: each worker answers /health/live on 127.0.0.1:8001 too, from
# a thread outside the request pool, and the HEALTHCHECK asks there: a table
# locked for minutes must not get a healthy container restarted (SPEC §12).
ENV LOCKNGEN_ENV=production \
    PORT=8000 \
    LIVENESS_PORT=8001
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "docker/healthcheck.py", "/health/live"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["gunicorn", "--config", "gunicorn.conf.py"]

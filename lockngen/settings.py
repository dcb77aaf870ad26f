"""LockN Gen persistence service settings: one module, every knob an env var.

See README "Configuration" and SPEC §2. A ``.env`` file next to ``manage.py``
may supply variables; the real environment wins over it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from dotenv import load_dotenv

from lockngen.client_address import DEFAULT_TRUSTED_PROXIES, parse_networks
from lockngen.database import database_config
from lockngen.env import ConfigError, env_bool, env_int, env_list, env_seconds_list

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env", override=False)
env = os.environ

LOCKNGEN_ENV = env.get("LOCKNGEN_ENV", "development").strip() or "development"
if LOCKNGEN_ENV not in {"development", "production"}:
    raise ConfigError(
        f"LOCKNGEN_ENV must be 'development' or 'production', got {LOCKNGEN_ENV!r}"
    )
PRODUCTION = LOCKNGEN_ENV == "production"
if PRODUCTION:
    missing = [
        name
        for name in ("DATABASE_URL", "SECRET_KEY", "ALLOWED_HOSTS")
        if not env.get(name, "").strip()
    ]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set when LOCKNGEN_ENV=production"
        )


# --- Core ------------------------------------------------------------------

DEV_SECRET_KEY = "django-insecure-lockngen-development-only-never-use-in-production"  # noqa: S105
SECRET_KEY = env.get("SECRET_KEY", "").strip()
ALLOWED_HOSTS = env_list(env, "ALLOWED_HOSTS")
if PRODUCTION:
    DEBUG = False  # never, whatever DEBUG says
else:
    SECRET_KEY = SECRET_KEY or DEV_SECRET_KEY
    ALLOWED_HOSTS = ALLOWED_HOSTS or ["localhost", "127.0.0.1", "[::1]"]
    DEBUG = env_bool(env, "DEBUG", default=True)

CSRF_TRUSTED_ORIGINS = env_list(env, "CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "axes",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "health_check",
    "lockngen",
    "apikeys",
    "generations",
    "webhooks",
]
if not PRODUCTION:
    # Test-only: tests/test_migrations.py installs tests.migration_app in its
    # manage.py subprocesses this way. Ignored in production.
    INSTALLED_APPS += env_list(env, "LOCKNGEN_EXTRA_APPS")

MIDDLEWARE = [
    # Outermost: every response (probes included) gets an X-Request-ID, and
    # any error under /api/ leaves as JSON whichever layer produced it.
    "lockngen.requestid.RequestIDMiddleware",
    "lockngen.http.errors.ApiErrorsAsJsonMiddleware",
    # Before anything that validates the Host or redirects to HTTPS:
    # /health/live and /health/ready answer probes with any Host over plain
    # HTTP (SPEC §2). Nothing above it may call request.get_host().
    "lockngen.probes.HealthProbeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "lockngen.middleware.DatabaseUnavailableMiddleware",
    # Last, as django-axes asks: turns its lockout into the 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "lockngen.urls"
WSGI_APPLICATION = "lockngen.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------

DATABASES = {
    "default": database_config(env, production=PRODUCTION, base_dir=BASE_DIR),
}
DATABASE_FALLBACK = DATABASES["default"]["FALLBACK"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# procrastinate (the webhook delivery engine, SPEC §10) keeps its queue in
# PostgreSQL functions and triggers: its migrations are PostgreSQL SQL, so its
# app is installed only on PostgreSQL. On the SQLite fallback webhooks are
# unavailable (webhooks.services.webhooks_available).
if not DATABASE_FALLBACK:
    INSTALLED_APPS.insert(
        INSTALLED_APPS.index("webhooks"), "procrastinate.contrib.django"
    )

# --- Cache, Redis and rate limits (SPEC §12) ---------------------------------

# Process memory: the per-process fallback of the rate-limit counters and
# nothing shared. Shared counters live in Redis (REDIS_URL), reached through
# lockngen.counters' own client, not through Django's cache.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        # Room for every key's and address's counter of a window while Redis
        # is down (the default 300 would cull live counters).
        "OPTIONS": {"MAX_ENTRIES": 100_000},
    }
}
REDIS_URL = env.get("REDIS_URL", "").strip()
# A sick Redis must cost a request milliseconds: connect and socket timeouts,
# then a circuit breaker that stops trying for a few seconds.
REDIS_TIMEOUT_SECONDS = 0.1
REDIS_BREAKER_FAILURES = 3
REDIS_BREAKER_RESET_SECONDS = 5.0

# Failed API-key authentications one client address may make per minute
# before 429 (0 = no limit); the address rule is lockngen.client_address.
AUTH_FAILURES_PER_MINUTE = env_int(env, "AUTH_FAILURES_PER_MINUTE", 60)
# Peers whose X-Forwarded-For is believed (the proxy in front).
TRUSTED_PROXIES = parse_networks(
    env_list(env, "TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES), name="TRUSTED_PROXIES"
)

# /health/ answers from a report at most this old (a flood costs one run of
# the checks per interval and process).
HEALTH_REPORT_SECONDS = 3.0

# --- Auth, i18n, static ----------------------------------------------------

# django-axes first: it refuses a locked-out address + username before the
# password hasher runs (~230 ms of CPU per attempt).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
ADMIN_LOGIN_FAILURES = env_int(env, "ADMIN_LOGIN_FAILURES", 5, minimum=1)
AXES_FAILURE_LIMIT = ADMIN_LOGIN_FAILURES
AXES_COOLOFF_TIME = timedelta(minutes=15)
AXES_LOCKOUT_PARAMETERS = [["ip_address", "username"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "lockngen.client_address.client_address"

# The admin shows a new key's raw value once, as a message: the default
# cookie storage would carry it signed but readable in the browser.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"  # created at start-up (lockngen.apps)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# --- Production hardening (behind a TLS-terminating proxy) -----------------

if PRODUCTION:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = env_int(env, "SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# --- Service knobs -----------------------------------------------------------

LEASE_SECONDS = env_int(env, "LEASE_SECONDS", 300, minimum=1)
MAX_ATTEMPTS = env_int(env, "MAX_ATTEMPTS", 3, minimum=1)

# Webhooks (SPEC §10). Private targets are refused in production unless
# WEBHOOK_ALLOW_PRIVATE=1; development allows them (a receiver on localhost).
WEBHOOK_ALLOW_PRIVATE = env_bool(env, "WEBHOOK_ALLOW_PRIVATE", default=not PRODUCTION)
# Seconds before each retry (Svix's schedule); its length + 1 = attempts.
WEBHOOK_RETRY_SCHEDULE = env_seconds_list(
    env, "WEBHOOK_RETRY_SCHEDULE", "5,300,1800,7200,18000,36000,36000"
)
WEBHOOK_TIMEOUT = env_int(env, "WEBHOOK_TIMEOUT", 15, minimum=1)

# Empty: the documented default key (apikeys.keys.DEFAULT_DEV_API_KEY). The
# apikeys app checks the format when Django starts (apikeys.apps).
LOCKNGEN_DEV_API_KEY = env.get("LOCKNGEN_DEV_API_KEY", "").strip()

# --- REST API (SPEC §5) ------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["apikeys.auth.ApiKeyAuthentication"],
    # Least privilege: an endpoint is closed to worker keys unless its view
    # opts in (``permission_classes_by_action``; apikeys.permissions).
    "DEFAULT_PERMISSION_CLASSES": ["apikeys.permissions.IsClientOrAdminKey"],
    # Run right after authentication, before permissions (lockngen.http.views).
    "DEFAULT_THROTTLE_CLASSES": ["apikeys.ratelimit.ApiKeyRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # JSON with bounded size, depth and keys, no lone surrogates (SPEC §12).
    "DEFAULT_PARSER_CLASSES": ["lockngen.http.inbound.BoundedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "lockngen.http.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "UNAUTHENTICATED_TOKEN": None,
}

# Request bodies (SPEC §12): the largest real one, a 4,000-character prompt and
# negative prompt, is at most 32 KB as UTF-8. Django checks Content-Length
# against this before reading; lockngen.http.inbound applies it to chunked bodies
# and in the JSON parser.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024

SPECTACULAR_SETTINGS = {
    "TITLE": "LockN Gen persistence service",
    "DESCRIPTION": (
        "Generation jobs and API keys. Authenticate with "
        "`Authorization: Bearer <key>` or `X-API-Key: <key>`."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",  # the default
        "lockngen.http.schema.document_body_limits",
    ],
}

# Error pages and reports hide DATABASE_URL / REDIS_URL like other secrets.
DEFAULT_EXCEPTION_REPORTER_FILTER = "lockngen.reporting.CredentialsFilter"

# --- Logging -----------------------------------------------------------------

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env.get("LOG_LEVEL", "INFO")},
    "filters": {
        "health_warnings": {"()": "lockngen.health.DropDegradedTracebacks"},
        "request_id": {"()": "lockngen.requestid.RequestIDLogFilter"},
        "quiet_retries": {"()": "webhooks.retry.QuietRetries"},
    },
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # Through the root handler only (one line, with the request id).
        "django": {"handlers": [], "level": "INFO"},
        "health_check": {"filters": ["health_warnings"]},
        # Failed logins and lockouts are warnings; the start-up banner and
        # per-login housekeeping lines (INFO) would reach every manage.py run.
        "axes": {"level": "WARNING"},
        # "Adding tasks from blueprint" on every manage.py run.
        "procrastinate.blueprints": {"level": "WARNING"},
        # A scheduled webhook retry is one line, not a traceback.
        "procrastinate.worker": {"filters": ["quiet_retries"]},
        # One INFO line per request with its URL: a webhook URL may carry the
        # receiver's own token. Our delivery log names the delivery instead.
        "httpx": {"level": "WARNING"},
    },
}

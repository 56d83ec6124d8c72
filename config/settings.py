"""Settings come from the environment (12-factor).

With nothing set the platform runs on SQLite, Celery runs tasks eagerly and the
provider is the project's own simulator on loopback, so a newcomer sees it work
with no keys and no servers. Production sets DATABASE_URL, CELERY_BROKER_URL,
OPENAI_BASE_URL and OPENAI_API_KEY.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var")))

VAR_DIR.mkdir(parents=True, exist_ok=True)
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY",
    default="dev-only-insecure-key-set-DJANGO_SECRET_KEY-in-production",
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "simple_history",
    "pgtrigger",
    "governance",
    "budgets",
    "conversations",
    "simulator",
]

MIDDLEWARE = [
    "config.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "simple_history.middleware.HistoryRequestMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database -------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.postgresql":
    # Django's native psycopg pool: the gateway's DB sections check a
    # connection out per section instead of opening one per request.
    _db.setdefault("OPTIONS", {})
    _db["OPTIONS"]["pool"] = {
        "min_size": env.int("DB_POOL_MIN", default=2),
        "max_size": env.int("DB_POOL_MAX", default=20),
        "timeout": env.float("DB_POOL_TIMEOUT", default=3.0),  # fail fast when Postgres is down
    }
    _db["CONN_MAX_AGE"] = 0
elif _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + IMMEDIATE transactions let the gateway's worker threads write
    # without "database is locked" surprises on the embedded default.
    _db.setdefault("OPTIONS", {})
    _db["OPTIONS"].update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (not shared in-memory) test database, so the gateway's threads and
    # an in-process server see the same data as the test.
    _db.setdefault("TEST", {})["NAME"] = str(VAR_DIR / "test-db.sqlite3")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache / broker -------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
# /metrics: with a token, only scrapes that send it (Authorization: Bearer);
# without one, only scrapes from this machine (governance/health.py).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # Short timeouts: a dead Redis must degrade the gateway, not stall it.
            "OPTIONS": {"socket_timeout": 0.25, "socket_connect_timeout": 0.25},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="") or None
CELERY_TASK_ALWAYS_EAGER = not CELERY_BROKER_URL
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TIMEZONE = "UTC"
CELERY_TASK_ROUTES = {"conversations.*": {"queue": "maintenance"}, "budgets.*": {"queue": "maintenance"}}
CELERY_BEAT_SCHEDULE = {
    "reap-interrupted-calls": {"task": "conversations.reap_interrupted_calls", "schedule": 60.0},
    "expire-budget-reservations": {"task": "budgets.expire_reservations", "schedule": 15.0},
    "detect-cost-regressions": {"task": "budgets.detect_cost_regressions", "schedule": 900.0},
}

# --- Auth / i18n ----------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# The embedded default serves admin assets itself; behind a real web server set SERVE_STATIC=false.
SERVE_STATIC = env.bool("SERVE_STATIC", default=True)

# --- API ------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["conversations.api.auth.ApplicationKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["conversations.api.auth.IsApplication"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "conversations.api.errors.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.CursorPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "GenAI governance gateway",
    "DESCRIPTION": "OpenAI-compatible gateway plus a native API for an application's own conversations.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
}

# --- Provider and gateway -------------------------------------------------
SIMULATOR_PORT = env.int("SIMULATOR_PORT", default=8765)
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default=f"http://127.0.0.1:{SIMULATOR_PORT}/v1")
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="sk-simulator-not-a-secret")
GATEWAY = {
    # Bodies over this are refused with 413 before JSON parsing.
    "MAX_BODY_BYTES": env.int("GATEWAY_MAX_BODY_BYTES", default=4 * 1024 * 1024),
    "MAX_MESSAGES": env.int("GATEWAY_MAX_MESSAGES", default=500),
    "PROVIDER_TIMEOUT_S": env.float("GATEWAY_PROVIDER_TIMEOUT_S", default=60.0),
    "PROVIDER_CONNECT_TIMEOUT_S": env.float("GATEWAY_PROVIDER_CONNECT_TIMEOUT_S", default=5.0),
    "DB_THREADS": env.int("GATEWAY_DB_THREADS", default=8),
    # Most requests one group-commit transaction writes (Postgres). Small
    # batches keep a lone request from waiting behind a long transaction in a
    # burst; 8 beat 64 on p99 in six of six alternating benchmark pairs
    # (docs/performance.md), at a few percent of peak throughput.
    "GROUP_COMMIT_MAX_BATCH": env.int("GATEWAY_GROUP_COMMIT_MAX_BATCH", default=8),
    # On Postgres, open and finish each call with one SQL function call
    # (conversations migration 0004) instead of the ORM's statements.
    "SQL_RECORDING": env.bool("GATEWAY_SQL_RECORDING", default=True),
    # Prepare the gateway's few per-request statements (off behind a
    # transaction-pooling proxy that cannot keep prepared statements).
    "PREPARED_STATEMENTS": env.bool("GATEWAY_PREPARED_STATEMENTS", default=True),
    "KEY_LAST_USED_RESOLUTION_S": 60,
    # A degradation ladder reads the budgets' spend as this process last saw
    # it written (Postgres), if no older than this; else it queries. 0: query
    # before every call. Hard caps are always checked under the row locks.
    "LADDER_READING_MAX_AGE_MS": env.float("GATEWAY_LADDER_READING_MAX_AGE_MS", default=250.0),
    # The garbage collector's generation thresholds in gateway processes
    # (conversations/gateway/warmup.py); empty keeps CPython's (700, 10, 10).
    "GC_THRESHOLD": tuple(env.list("GATEWAY_GC_THRESHOLD", cast=int, default=[50_000, 20, 100])),
    # Applied when a budget applies and the request sets no max_tokens, so the worst case is bounded.
    "DEFAULT_MAX_OUTPUT_TOKENS": env.int("GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS", default=4096),
    # A hold not settled by then belongs to a dead process and is released by the reaper.
    "RESERVATION_TTL_S": env.float("GATEWAY_RESERVATION_TTL_S", default=180.0),
    "BREAKER": {
        "MIN_CALLS": env.int("BREAKER_MIN_CALLS", default=10),
        "FAILURE_RATIO": env.float("BREAKER_FAILURE_RATIO", default=0.5),
        "OPEN_S": env.float("BREAKER_OPEN_S", default=30.0),
        "PROBE_TIMEOUT_S": env.float("BREAKER_PROBE_TIMEOUT_S", default=30.0),
    },
}
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY["MAX_BODY_BYTES"]

# --- Logging --------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="console")  # or "json"
LOGGING_CONFIG = None
from config.logging import configure_logging  # noqa: E402

configure_logging(level=LOG_LEVEL, fmt=LOG_FORMAT)

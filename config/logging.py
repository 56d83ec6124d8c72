"""One logging setup for Django, Celery and the gateway.

Every line carries the request id of the request it belongs to (bound in a
contextvar by RequestIdMiddleware), so one grep follows a call end to end.
Message contents and keys are never passed to loggers; the redaction processor
is a second line of defence for anything that looks like a key.
"""

import logging
import logging.config
import re

import structlog

_SECRET_RE = re.compile(r"(sk|gk)-[A-Za-z0-9_\-]{8,}")


def _redact(_, __, event_dict):
    for key, value in list(event_dict.items()):
        if isinstance(value, str) and _SECRET_RE.search(value):
            event_dict[key] = _SECRET_RE.sub(lambda m: m.group(0)[:7] + "…[redacted]", value)
    return event_dict


def configure_logging(*, level: str = "INFO", fmt: str = "console") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "structured": {
                    "()": structlog.stdlib.ProcessorFormatter,
                    "processors": [
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        renderer,
                    ],
                    "foreign_pre_chain": shared,
                }
            },
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
            "root": {"handlers": ["console"], "level": level},
            "loggers": {
                "django.db.backends": {"level": "WARNING"},
                "httpx": {"level": "WARNING"},
                "httpcore": {"level": "WARNING"},
                "uvicorn.access": {"level": "WARNING"},
            },
        }
    )

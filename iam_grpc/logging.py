"""Logging with loguru: compact JSON lines, redacted before any sink sees them.

Sinks (behaviour.md 9.1): stdout always; with a log directory, ``app.log``
(application records at or above the configured level), ``error.log`` (ERROR
and above), ``access.log`` (one record per RPC) and ``audit.log`` (security
events). Files rotate, are kept for a while, and are created mode 0640.

Components log through child loggers: ``log = component_logger("iam.server")``
then ``log.bind(user_id=...).info("login succeeded")``: messages are constant
text, every variable goes in a bound field. The request interceptor adds
``request_id``, ``method`` and ``caller`` with ``logger.contextualize`` so every
line of a call carries them.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger, Record

__all__ = [
    "ACCESS",
    "AUDIT",
    "REDACTED",
    "Redactor",
    "component_logger",
    "configure_logging",
    "mask_email",
]

ACCESS = "access"
AUDIT = "audit"
REDACTED = "[REDACTED]"

SENSITIVE_KEYS = frozenset(
    {
        "password",
        "current_password",
        "new_password",
        "refresh_token",
        "access_token",
        "link_token",
        "grant_token",
        "token",
        "code",
        "otp",
        "secret",
        "pepper",
        "peppers",
        "master_key",
        "api_key",
        "x-iam-api-key",
        "authorization",
        "cookie",
        "private_key",
        "sealed_params",
        "smtp_password",
    }
)

_TOKEN_SHAPES = re.compile(
    r"(?:iam[rgk]_[A-Za-z0-9_-]{8,})"  # refresh tokens, grants, API keys
    r"|(?:eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*)"  # JWT / JWS (access and link tokens)
)
_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9])[A-Za-z0-9.-]*?(\.[A-Za-z]{2,})\b")
_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]*:)[^@\s]+(@)")


def mask_email(address: str) -> str:
    """``jane@example.com`` -> ``j***@e***.com`` (enough to recognise, not to read)."""
    local, _, domain = address.partition("@")
    if not domain:
        return "***"
    tld = domain.rsplit(".", 1)[1] if "." in domain else ""
    return f"{local[:1]}***@{domain[:1]}***" + (f".{tld}" if tld else "")


class Redactor:
    """Replaces secrets in log records: by key (any depth, case-insensitive) and by shape."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self.keys = SENSITIVE_KEYS | {key.lower() for key in extra_keys}

    def text(self, value: str) -> str:
        value = _TOKEN_SHAPES.sub(REDACTED, value)
        value = _URL_PASSWORD.sub(r"\1***\2", value)
        return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}***{m.group(3)}", value)

    def value(self, key: str, value: Any) -> Any:
        lowered = key.lower()
        if lowered in self.keys and value not in (None, ""):
            return REDACTED
        if lowered in ("email", "new_email", "recipient") and isinstance(value, str):
            return mask_email(value)
        return self.walk(value)

    def walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {str(k): self.value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.walk(item) for item in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        # Unknown objects (protobuf messages included) are never logged whole.
        return f"<{type(value).__name__}>"


_RESERVED = ("ts", "level", "msg", "logger")


def _serialize(record: Record, redactor: Redactor) -> str:
    extra = record["extra"]
    out: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{record['time'].microsecond // 1000:03d}Z",
        "level": record["level"].name,
        "msg": redactor.text(record["message"]),
        "logger": extra.get("logger", record["name"] or "iam"),
    }
    for key, value in extra.items():
        if key.startswith("_") or key in _RESERVED or key == "kind":
            continue
        out[key] = redactor.value(key, value)
    if record["exception"] is not None:
        import traceback

        exc = record["exception"]
        text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
        out["exc"] = redactor.text(text)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)


class _InterceptHandler(std_logging.Handler):
    """Route standard-library records (grpc, SQLAlchemy, asyncio, aiosmtplib) into loguru."""

    def emit(self, record: std_logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(logger=record.name).opt(exception=record.exc_info).log(level, record.getMessage())


_lock = threading.Lock()
_configured_ids: list[int] = []


def _file_opener(path: str, flags: int) -> int:
    return os.open(path, flags, 0o640)


def _gzip_private(path: str) -> None:
    """Compress a rotated log file into ``<path>.gz`` with mode 0640, then remove it."""
    import gzip
    import shutil

    fd = os.open(path + ".gz", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with (
        open(path, "rb") as source,
        os.fdopen(fd, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb") as target,
    ):
        shutil.copyfileobj(source, target)
    os.remove(path)


def configure_logging(
    *,
    level: str = "INFO",
    log_dir: Path | None = None,
    rotation_mb: int = 100,
    retention_days: int = 14,
    redact_extra: Iterable[str] = (),
    stdout: Any = None,
    worker: int | None = None,
) -> Redactor:
    """(Re)configure every sink. Idempotent: earlier sinks of this function are removed."""
    redactor = Redactor(redact_extra)

    def patch(record: Record) -> None:
        record["extra"]["_json"] = _serialize(record, redactor)

    def formatter(_record: Record) -> str:
        return "{extra[_json]}\n"

    def only(kind: str | None) -> Callable[[Record], bool]:
        return lambda record: record["extra"].get("kind") == kind

    with _lock:
        logger.remove()
        _configured_ids.clear()
        logger.configure(patcher=patch)
        _configured_ids.append(
            logger.add(stdout or sys.stdout, level=level, format=formatter, colorize=False, enqueue=False)
        )
        if log_dir is not None:
            log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            suffix = f".w{worker}" if worker else ""
            common: dict[str, Any] = {
                "format": formatter,
                "rotation": f"{rotation_mb} MB",
                "retention": f"{retention_days} days",
                "compression": _gzip_private,
                "encoding": "utf-8",
                "opener": _file_opener,
                "colorize": False,
            }
            files = (
                ("app", level, lambda r: r["extra"].get("kind") not in (ACCESS, AUDIT)),
                ("error", "ERROR", None),
                ("access", level, only(ACCESS)),
                ("audit", "INFO", only(AUDIT)),
            )
            for name, sink_level, record_filter in files:
                _configured_ids.append(
                    logger.add(
                        str(log_dir / f"{name}{suffix}.log"), level=sink_level, filter=record_filter, **common
                    )
                )
        handler = _InterceptHandler()
        for name in ("grpc", "sqlalchemy", "asyncio", "aiosmtplib", "alembic", "redis"):
            std = std_logging.getLogger(name)
            std.handlers = [handler]
            std.setLevel(std_logging.WARNING)
            std.propagate = False
    return redactor


def component_logger(name: str) -> Logger:
    """A child logger whose records carry ``logger = name``."""
    return logger.bind(logger=name)

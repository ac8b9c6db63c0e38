"""Operations: logging, audit retention, the periodic cleanup, shutdown, tracing."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from iam_grpc.config.values import Duration, SettingsGroup


class LoggingSettings(SettingsGroup):
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    dir: Path | None = None  # default: <data_dir>/logs; "" disables files
    files: bool = True
    rotation_mb: int = Field(default=100, ge=1)
    retention_days: int = Field(default=14, ge=1)
    hot_ok_level: Literal["TRACE", "DEBUG", "INFO"] = "DEBUG"
    access_log_probes: bool = True  # log health/reflection calls (at DEBUG when OK); false: never
    redact_extra: list[str] = []

    @field_validator("level", "hot_ok_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class AuditSettings(SettingsGroup):
    retention: Duration = timedelta(days=400)


class CleanupSettings(SettingsGroup):
    interval: Duration = timedelta(minutes=10)
    batch: int = Field(default=1000, ge=1)


class ShutdownSettings(SettingsGroup):
    drain_delay: Duration = timedelta(seconds=5)
    grace: Duration = timedelta(seconds=20)


class TracingSettings(SettingsGroup):
    """OpenTelemetry traces (the ``otel`` extra): off by default; with no endpoint, spans only
    give every log line of a call its ``trace_id``."""

    enabled: bool = False
    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4317 (OTLP over gRPC)
    service_name: str = Field(default="iam-grpc", min_length=1, max_length=128)
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)  # of traces started here

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")) or any(c.isspace() for c in value):
            raise ValueError("an http:// or https:// URL of an OTLP/gRPC collector")
        return value

"""Test helpers for services that call iam-grpc: run the real service in your
test's event loop, on free ports, against a throw-away data directory.

    async with running_service(tmp_path) as iam:
        async with iam.channel() as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            ...

Nothing here is mocked: it is the same server ``iam-grpc serve`` runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from iam_grpc.app import Application
from iam_grpc.clock import Clock
from iam_grpc.config import Settings, load_settings
from iam_grpc.status import ErrorDetails, error_details  # re-exported for tests

__all__ = ["ErrorDetails", "RunningService", "error_details", "running_service", "service_settings"]


def service_settings(data_dir: Path, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings for a test instance: free ports, files under ``data_dir``, quick shutdown."""
    env = {
        "IAM_DATA_DIR": str(data_dir),
        "IAM_GRPC_LISTEN": "127.0.0.1:0",
        "IAM_HTTP_LISTEN": "127.0.0.1:0",
        "IAM_SHUTDOWN__DRAIN_DELAY": "0",
        "IAM_SHUTDOWN__GRACE": "2",
    }
    env.update(environ or {})
    return load_settings(environ=env, **overrides)


@dataclass
class RunningService:
    app: Application

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.grpc_port}"

    @property
    def http_port(self) -> int | None:
        return self.app.http.port if self.app.http else None

    def channel(self, **options: Any) -> grpc.aio.Channel:
        """A plaintext channel to the service (use ``async with``)."""
        return grpc.aio.insecure_channel(self.address, **options)


@asynccontextmanager
async def running_service(
    data_dir: Path,
    environ: Mapping[str, str] | None = None,
    *,
    settings: Settings | None = None,
    clock: Clock | None = None,
    probe_interval: float = 5.0,
) -> AsyncIterator[RunningService]:
    """Start the service, yield it, and stop it (without the production drain delay)."""
    app = Application(
        settings or service_settings(data_dir, environ), clock=clock, probe_interval=probe_interval
    )
    await app.start()
    try:
        yield RunningService(app)
    finally:
        await app.stop(drain_delay=timedelta(0), grace=timedelta(seconds=1))

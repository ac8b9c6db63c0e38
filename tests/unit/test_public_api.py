"""The public surface is pinned: changing it is a deliberate act."""

from __future__ import annotations

import iam_grpc
import iam_grpc.testing


def test_package_exports() -> None:
    """iam_grpc exports the service, its settings and the version."""
    assert sorted(iam_grpc.__all__) == [
        "Application",
        "ConfigError",
        "Settings",
        "__version__",
        "load_settings",
    ]
    assert iam_grpc.Application.__name__ == "Application"  # type: ignore[attr-defined]


def test_testing_helpers_exports() -> None:
    """iam_grpc.testing ships the in-process service, error decoding, captures of the audit
    events and mails a block caused, and argon2-cffi's cheapest profile."""
    assert sorted(iam_grpc.testing.__all__) == [
        "CHEAPEST_ARGON2",
        "ErrorDetails",
        "QueuedMail",
        "RunningService",
        "capture_audit",
        "capture_outbox",
        "error_details",
        "running_service",
        "service_settings",
    ]


def test_client_exports() -> None:
    """iam_grpc.client ships the client, the guard and the interceptor, without importing the server."""
    import subprocess
    import sys

    import iam_grpc.client

    assert sorted(iam_grpc.client.__all__) == [
        "GuardInterceptor",
        "IamCallError",
        "IamClient",
        "Principal",
        "TokenGuard",
        "current_principal",
    ]
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, iam_grpc.client; print('iam_grpc.app' in sys.modules, 'sqlalchemy' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.split() == ["False", "False"]

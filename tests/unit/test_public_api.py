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
    """iam_grpc.testing ships the in-process service and error decoding."""
    assert sorted(iam_grpc.testing.__all__) == [
        "ErrorDetails",
        "RunningService",
        "error_details",
        "running_service",
        "service_settings",
    ]

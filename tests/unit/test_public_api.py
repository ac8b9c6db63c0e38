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
    """iam_grpc_client ships the client, the guard, the interceptor and error decoding."""
    import iam_grpc_client

    assert sorted(iam_grpc_client.__all__) == [
        "ErrorDetails",
        "GuardInterceptor",
        "IamCallError",
        "IamClient",
        "Principal",
        "TokenGuard",
        "current_principal",
        "error_details",
    ]


def test_the_server_re_exports_the_client() -> None:
    """iam_grpc.client, iam_grpc.proto and iam_grpc.status are the client distribution's objects."""
    import iam_grpc.client
    import iam_grpc.proto
    import iam_grpc.status
    import iam_grpc_client
    import iam_grpc_client.proto

    assert sorted(iam_grpc.client.__all__) == [
        "GuardInterceptor",
        "IamCallError",
        "IamClient",
        "Principal",
        "TokenGuard",
        "current_principal",
    ]
    for name in iam_grpc.client.__all__:
        assert getattr(iam_grpc.client, name) is getattr(iam_grpc_client, name)
    assert iam_grpc.proto.__all__ == iam_grpc_client.proto.__all__
    for name in iam_grpc.proto.__all__:
        assert getattr(iam_grpc.proto, name) is getattr(iam_grpc_client.proto, name)
    assert iam_grpc.status.error_details is iam_grpc_client.error_details

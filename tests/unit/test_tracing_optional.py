"""Tracing is optional: without the OpenTelemetry packages the server imports and serves, and only
tracing.enabled is refused, with the extra to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_the_server_needs_no_opentelemetry_unless_tracing_is_on() -> None:
    """In an interpreter where every opentelemetry import fails: the application and server modules
    import, tracing off opens nothing, tracing on raises MissingExtra naming the otel extra."""
    script = textwrap.dedent(
        """
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(name)
                return None

        sys.meta_path.insert(0, NoOtel())
        import iam_grpc.app, iam_grpc.server
        from iam_grpc.config import load_settings
        from iam_grpc.tracing import MissingExtra, open_tracing

        assert open_tracing(load_settings(environ={}).tracing, (), None) is None
        try:
            open_tracing(load_settings(environ={"IAM_TRACING__ENABLED": "true"}).tracing, (), None)
        except MissingExtra as exc:
            print(exc)
        assert not any(m.startswith("opentelemetry") for m in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'iam-grpc[otel]'" in result.stdout

"""The routes of the ops HTTP listener (``iam_grpc.ops_http``): ``/healthz``, ``/metrics`` and
``/.well-known/jwks.json``."""

from __future__ import annotations

import json
from datetime import timedelta

from iam_grpc.core.keys import KeyRing
from iam_grpc.health import Readiness
from iam_grpc.metrics import Metrics
from iam_grpc.ops_http import Response, Route

__all__ = ["ops_routes"]


def ops_routes(
    readiness: Readiness, metrics: Metrics, keys: KeyRing, jwks_max_age: timedelta
) -> dict[str, Route]:
    async def healthz() -> Response:
        serving = readiness.serving
        body = {
            "status": "SERVING" if serving else "NOT_SERVING",
            "dependencies": readiness.dependencies.states(),
        }
        return Response(200 if serving else 503, json.dumps(body).encode())

    async def metrics_text() -> Response:
        return Response(200, metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    async def jwks() -> Response:
        body = json.dumps(keys.jwks(), separators=(",", ":")).encode()
        return Response(
            200,
            body,
            content_type="application/jwk-set+json",
            headers=(("cache-control", f"public, max-age={int(jwks_max_age.total_seconds())}"),),
        )

    return {"/healthz": healthz, "/metrics": metrics_text, "/.well-known/jwks.json": jwks}

"""The routes of the ops HTTP listener (``iam_grpc.ops_http``): ``/healthz``, ``/metrics`` and
``/.well-known/jwks.json`` and the OpenID Connect discovery document
``/.well-known/openid-configuration`` (api.md "HTTP ops additions")."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from iam_grpc.core.keys import KeyRing
from iam_grpc.health import Readiness
from iam_grpc.metrics import Metrics
from iam_grpc.ops_http import Response, Route

__all__ = ["Discovery", "ops_routes"]

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
CLAIMS = ("iss", "aud", "sub", "sid", "did", "roles", "jti", "iat", "exp", "auth_time")


@dataclass(frozen=True, slots=True)
class Discovery:
    """What the discovery document states: the tokens' issuer and signing algorithm, and the
    listener's public base URL (``http.public_url``, else the address it listens on)."""

    issuer: str
    algorithm: str
    base_url: Callable[[], str]

    def document(self, jwks: dict[str, object]) -> dict[str, object]:
        keys = jwks.get("keys")
        published = (
            {k["alg"] for k in keys if isinstance(k, dict) and "alg" in k}
            if isinstance(keys, list)
            else set()
        )
        return {
            "issuer": self.issuer,
            "jwks_uri": self.base_url().rstrip("/") + JWKS_PATH,
            "id_token_signing_alg_values_supported": sorted({self.algorithm, *published}),
            "subject_types_supported": ["public"],
            "claims_supported": [
                "sub",
                "sid",
                "did",
                "roles",
                "jti",
                "auth_time",
                "typ",
                "iss",
                "aud",
                "exp",
                "iat",
            ],
        }


def ops_routes(
    readiness: Readiness,
    metrics: Metrics,
    keys: KeyRing,
    jwks_max_age: timedelta,
    discovery: Discovery | None = None,
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

    async def openid_configuration() -> Response:
        assert discovery is not None
        body = json.dumps(discovery.document(keys.jwks()), separators=(",", ":")).encode()
        max_age = int(jwks_max_age.total_seconds())
        return Response(200, body, headers=(("cache-control", f"public, max-age={max_age}"),))

    routes: dict[str, Route] = {"/healthz": healthz, "/metrics": metrics_text, JWKS_PATH: jwks}
    if discovery is not None:
        routes[DISCOVERY_PATH] = openid_configuration
    return routes

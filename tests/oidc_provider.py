"""A local OpenID Connect provider stand-in: its own signing keys, a JWKS served over real HTTP on
127.0.0.1, and ID tokens signed with them (or with a key it does not publish)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://id.example.test"
CLIENT_ID = "bff-web"


class OidcProvider:
    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.published: list[str] = []
        self.fetches = 0
        self.rotate()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.fetches += 1
                body = json.dumps(provider.jwks()).encode()
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    def settings(self, name: str = "acme") -> str:
        """IAM_OIDC_PROVIDERS for this provider."""
        return json.dumps({name: {"issuer": ISSUER, "client_ids": [CLIENT_ID], "jwks_url": self.jwks_url}})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rotate(self) -> str:
        """A new signing key, published alone from now on; its kid."""
        kid = secrets.token_hex(4)
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        self.published = [kid]
        return kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in self.published:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
        return {"keys": keys}

    def token(
        self,
        subject: str,
        nonce: str,
        *,
        email: str = "",
        email_verified: bool = True,
        audience: str = CLIENT_ID,
        issuer: str = ISSUER,
        lifetime: int = 300,
        issued_ago: int = 0,
        key: ec.EllipticCurvePrivateKey | None = None,
        kid: str | None = None,
    ) -> str:
        now = int(time.time()) - issued_ago
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime,
            "nonce": nonce,
            "given_name": "Grace",
            "family_name": "Hopper",
        }
        if email:
            claims |= {"email": email, "email_verified": email_verified}
        kid = kid or self.published[-1]
        return jwt.encode(claims, key or self.keys[kid], algorithm="ES256", headers={"kid": kid})

"""The OpenID Connect discovery document of the ops listener (api.md "HTTP ops additions")."""

from __future__ import annotations

import pytest

from iam_grpc.config import ConfigError, load_settings
from iam_grpc.ops_routes import Discovery


def test_the_document_names_issuer_jwks_uri_and_every_published_algorithm() -> None:
    """The configured algorithm and those of the published keys (during an algorithm change)."""
    discovery = Discovery("https://iam.example", "ES256", lambda: "https://iam.example/ops/")
    document = discovery.document({"keys": [{"alg": "EdDSA"}, {"alg": "ES256"}, {"kty": "EC"}]})
    assert document["issuer"] == "https://iam.example"
    assert document["jwks_uri"] == "https://iam.example/ops/.well-known/jwks.json"
    assert document["id_token_signing_alg_values_supported"] == ["ES256", "EdDSA"]
    assert "sid" in document["claims_supported"]  # type: ignore[operator]


def test_the_public_url_setting_is_a_plain_http_url() -> None:
    """IAM_HTTP__PUBLIC_URL: http(s), no query, fragment or credentials; a trailing slash is cut."""
    settings = load_settings(environ={"IAM_HTTP__PUBLIC_URL": "https://iam-ops.example:8443/"})
    assert settings.http.public_url == "https://iam-ops.example:8443"
    assert load_settings(environ={}).http.public_url is None
    for bad in ("ftp://x", "https://u:p@x", "https://x/?a=1", "https://x/#f", "iam.example"):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ={"IAM_HTTP__PUBLIC_URL": bad})
        assert caught.value.problems[0].startswith("http.public_url"), caught.value.problems

"""Passkeys (WebAuthn) and sign-in with another provider's OpenID Connect ID token."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from iam_grpc.config.values import Duration, SettingsGroup


class WebauthnSettings(SettingsGroup):
    # IAM_WEBAUTHN_RP_ID: the relying party id, a registrable domain the origins are under
    rp_id: str = "localhost"
    rp_name: str = "IAM"
    # IAM_WEBAUTHN_ORIGINS: the origins a ceremony may come from (the BFF's pages); unset:
    # http://localhost:3000 for the rp id localhost, else https://<rp_id>
    origins: list[str] = []
    ceremony_ttl: Duration = timedelta(minutes=5)
    max_per_user: int = Field(default=10, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _default_origins(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("origins"):
            rp_id = str(data.get("rp_id") or "localhost").strip().lower()
            data = {
                **data,
                "origins": ["http://localhost:3000" if rp_id == "localhost" else f"https://{rp_id}"],
            }
        return data

    @field_validator("rp_id")
    @classmethod
    def _rp_id(cls, value: str) -> str:
        value = value.strip().lower()
        if not value or "/" in value or ":" in value or " " in value:
            raise ValueError("must be a domain such as example.com (no scheme, port or path)")
        return value

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        cleaned: list[str] = []
        for origin in value:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError("each origin must be scheme://host[:port] (http or https), no path")
            cleaned.append(f"{parts.scheme}://{parts.netloc}")
        if not cleaned:
            raise ValueError("at least one origin is needed")
        return cleaned

    @model_validator(mode="after")
    def _origins_under_rp(self) -> Self:
        for origin in self.origins:
            host = urlsplit(origin).hostname or ""
            if host != self.rp_id and not host.endswith("." + self.rp_id):
                raise ValueError("every origin's host must be the relying party id or under it")
        return self


class OidcProvider(SettingsGroup):
    issuer: str
    client_ids: list[str]
    jwks_url: str | None = None
    jwks_file: Path | None = None
    # the algorithms accepted in the ID token's header (never "none", never HMAC)
    algorithms: list[str] = ["RS256", "ES256", "PS256", "EdDSA"]

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("needs exactly one of jwks_url and jwks_file")
        if not self.client_ids or not all(self.client_ids):
            raise ValueError("client_ids must name at least one client id")
        if not self.issuer:
            raise ValueError("issuer is required")
        if any(alg.lower() == "none" or alg.upper().startswith("HS") for alg in self.algorithms):
            raise ValueError("algorithms may not include none or HMAC")
        if self.jwks_url is not None and urlsplit(self.jwks_url).scheme not in ("http", "https"):
            raise ValueError("jwks_url must be an http(s) URL")
        return self


class OidcSettings(SettingsGroup):
    # IAM_OIDC_PROVIDERS: provider name -> {issuer, client_ids, jwks_url | jwks_file}
    providers: dict[str, OidcProvider] = {}
    leeway: Duration = timedelta(seconds=60)  # exp / iat / nbf tolerance for clock skew
    jwks_cache_ttl: Duration = timedelta(hours=1)
    # a token with an unknown kid refetches the JWKS, at most once per this interval per provider
    jwks_refetch_interval: Duration = timedelta(seconds=30)
    jwks_fetch_timeout: Duration = timedelta(seconds=5)
    max_jwks_bytes: int = Field(default=512 * 1024, ge=1024)

    @field_validator("providers")
    @classmethod
    def _names(cls, value: dict[str, OidcProvider]) -> dict[str, OidcProvider]:
        for name in value:
            if (
                not name
                or len(name) > 32
                or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
            ):
                raise ValueError("provider names are 1-32 characters of [A-Za-z0-9_-]")
        return value

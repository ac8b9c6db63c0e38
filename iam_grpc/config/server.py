"""Transport settings: the gRPC and ops-HTTP listeners, TLS, the callers allowed in, ext_authz rules."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator

from iam_grpc.config.values import Duration, SettingsGroup


class TlsSettings(SettingsGroup):
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None  # set: mTLS with client certificates required

    @model_validator(mode="after")
    def _pairs(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("server.tls.cert_file and server.tls.key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("server.tls.client_ca_file needs server.tls.cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


class ServerSettings(SettingsGroup):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    max_message_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    default_deadline: Duration = timedelta(seconds=10)
    keepalive_time: Duration = timedelta(seconds=60)
    keepalive_timeout: Duration = timedelta(seconds=20)
    max_connection_age: Duration = timedelta(seconds=300)
    max_connection_age_grace: Duration = timedelta(seconds=30)
    reflection: bool | None = None  # default: on in embedded mode, off in production
    tls: TlsSettings = TlsSettings()


class HttpSettings(SettingsGroup):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    # how clients reach the ops listener (the discovery document's jwks_uri); default: its address
    public_url: str | None = None

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not _PUBLIC_URL.match(value):
            raise ValueError(
                "an http(s) URL without query, fragment or credentials, e.g. https://iam.example"
            )
        return value.rstrip("/")


_PUBLIC_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/]*)?\Z")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
_CALLER_ID = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
_METHOD = re.compile(r"^(\*|[A-Za-z0-9_.]+/(\*|[A-Za-z0-9_]+))\Z")
# SPIFFE ID (spiffe.io standard): lower-case trust domain, then a path of unreserved characters
_SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]{1,255}(/[A-Za-z0-9._-]+)+\Z")


class CallerSettings(SettingsGroup):
    """One calling service (behaviour.md 2.8)."""

    api_key_sha256: list[str] = Field(default=[], max_length=2)
    cert_sans: list[str] = []
    spiffe_ids: list[str] = []  # forwarded by a trusted proxy in x-forwarded-client-cert
    methods: list[str] = Field(default=[], min_length=1)
    trust_client_ip: bool = False

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        out = [item.strip().lower() for item in value]
        if not all(_SHA256_HEX.match(item) for item in out):
            raise ValueError("each entry must be a SHA-256 hex digest (64 hex characters)")
        return out

    @field_validator("spiffe_ids")
    @classmethod
    def _spiffe(cls, value: list[str]) -> list[str]:
        if not all(_SPIFFE_ID.match(item) for item in value):
            raise ValueError("entries must be SPIFFE ids, spiffe://<trust domain>/<path>")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = [item.strip().lstrip("/") for item in value]
        if not all(_METHOD.match(item) for item in out):
            raise ValueError("entries must be '*', 'package.Service/*' or 'package.Service/Method'")
        return out

    @model_validator(mode="after")
    def _credential(self) -> Self:
        if not self.api_key_sha256 and not self.cert_sans and not self.spiffe_ids:
            raise ValueError("a caller needs api_key_sha256, cert_sans or spiffe_ids")
        return self


class CallersSettings(BaseModel):
    """Caller authentication; every other key is a caller id (``callers.<id>``)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    __pydantic_extra__: dict[str, CallerSettings] = Field(init=False)

    allow_unauthenticated: bool = False
    allow_unauthenticated_loopback: bool = True
    unauthenticated_trust_client_ip: bool = False  # for callers admitted by allow_unauthenticated
    # peers (addresses or CIDRs) whose x-forwarded-client-cert header is believed; default none
    trusted_proxies: list[IPvAnyNetwork] = Field(default=[], max_length=64)

    @model_validator(mode="after")
    def _ids(self) -> Self:
        for caller_id in self.entries:
            if not _CALLER_ID.match(caller_id):
                raise ValueError("caller ids must match ^[a-z][a-z0-9_-]{0,31}$")
        return self

    @property
    def entries(self) -> dict[str, CallerSettings]:
        return dict(self.__pydantic_extra__ or {})


class ExtAuthzRule(SettingsGroup):
    """One path rule of the Envoy ``Check``: requests under ``prefix`` (whole segments, any case)
    need every role in ``roles``."""

    prefix: str = Field(min_length=1, max_length=1024)
    roles: list[str] = Field(default=[], max_length=32)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in "?#%;\\") or not value.isprintable():
            # paths are matched with their ;parameters cut, so a prefix holding one would match nothing
            raise ValueError(
                "a prefix is a decoded URL path starting with '/' (no query, no %-escapes, no ;parameters)"
            )
        if "//" in value or any(part in (".", "..") for part in value.split("/")):
            raise ValueError("a prefix has no empty, '.' or '..' segments (paths are matched normalised)")
        return value

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        from iam_grpc.core.validation import ROLE_NAME

        if not all(ROLE_NAME.match(role) for role in value):
            raise ValueError("role names match ^[a-z][a-z0-9:_-]{0,63}$")
        return value


class ExtAuthzSettings(SettingsGroup):
    """The Envoy ``envoy.service.auth.v3.Authorization/Check`` service; the first rule whose prefix
    starts the request path decides the required roles (none: a valid token is enough)."""

    enabled: bool = True
    rules: list[ExtAuthzRule] = Field(default=[], max_length=256)

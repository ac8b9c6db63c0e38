"""Configuration: one frozen, validated settings object built at startup.

Sources, highest precedence first:

1. explicit overrides (CLI flags);
2. environment variables ``IAM_<GROUP>__<KEY>`` (nested with ``__``), the flat
   contract names of ``api.md`` (``IAM_GRPC_LISTEN``, ``IAM_DATABASE_URL``, ...),
   and ``<NAME>_FILE`` variants that read a value (a secret) from a file;
3. the TOML file named by ``--config`` or ``IAM_CONFIG_FILE``;
4. defaults, which are complete for every group.

Nothing else in the package reads ``os.environ``. Validation failures raise
:class:`ConfigError`, whose lines name the setting and the rule it broke and
never echo the value.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from iam_grpc.core.ratelimit.groups import DEFAULT_GROUPS, Group, parse_window

__all__ = ["ConfigError", "Duration", "Settings", "load_settings", "mask_url", "production_refusals"]

ENV_PREFIX = "IAM_"

# ---------------------------------------------------------------------------
# value types


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _parse_duration(value: Any) -> Any:
    """Accept seconds (int/float) or text like ``250ms``, ``15m``, ``30d``."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30, '15m' or '30d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("must be a duration such as 30, '250ms', '15m' or '30d'")
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    return value


def _format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(_parse_duration),
    PlainSerializer(_format_duration, return_type=str, when_used="json"),
]


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs and ``config show``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _masked(value: str) -> str:
    return mask_url(value)


MaskedUrl = Annotated[str, PlainSerializer(_masked, return_type=str, when_used="json")]


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------
# groups (behaviour.md 11.3)


class TlsSettings(_Group):
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


class ServerSettings(_Group):
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


class HttpSettings(_Group):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)


class DatabaseSettings(_Group):
    url: MaskedUrl = ""  # default: sqlite+aiosqlite:///<data_dir>/iam.db
    pool_size: int = Field(default=10, ge=1)
    max_overflow: int = Field(default=10, ge=0)
    pool_recycle: Duration = timedelta(seconds=1800)
    pool_pre_ping: bool = True
    # With MariaDB down or stalled a call fails within these (docs/deployment.md, "Losing a
    # dependency"): a new connection, and each wait for the server's answer or a pooled connection.
    connect_timeout: Duration = timedelta(seconds=2)
    statement_timeout: Duration = timedelta(seconds=2)
    startup_wait: Duration = timedelta(seconds=60)
    auto_migrate: bool | None = None  # default: true in embedded mode, false in production

    @field_validator("url")
    @classmethod
    def _driver(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "mysql+asyncmy://", "mysql+aiomysql://")):
            raise ValueError("must start with sqlite+aiosqlite://, mysql+asyncmy:// or mysql+aiomysql://")
        if value:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                parsed = make_url(value)
                _ = parsed.port  # parses the port
            except (ArgumentError, ValueError):
                raise ValueError("is not a valid URL (scheme://user:password@host:port/database)") from None
            if parsed.get_backend_name() == "mysql" and not (parsed.host and parsed.database):
                raise ValueError("a MySQL URL needs a host and a database name")
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


class RedisSettings(_Group):
    url: MaskedUrl = ""  # empty: in-process ephemeral store
    # no braces: a hash tag in the prefix would put every key in one Redis Cluster slot
    key_prefix: str = Field(default="iam:", min_length=1, max_length=64, pattern=r"^[^{}]+$")
    socket_timeout: Duration = timedelta(milliseconds=250)
    connect_timeout: Duration = timedelta(seconds=1)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        """One server, Sentinel or Cluster (iam_grpc.storage.redis_topology parses all three)."""
        if value:
            from iam_grpc.storage.redis_topology import parse_redis_url  # redis-py only when set

            parse_redis_url(value)
        return value


class EphemeralSettings(_Group):
    memory_max_keys: int = Field(default=200_000, ge=1000)


class SecretsSettings(_Group):
    master_key: SecretStr | None = None  # base64, at least 32 bytes; generated in embedded mode
    previous_master_keys: list[SecretStr] = []

    @field_validator("master_key")
    @classmethod
    def _master_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_key_material(value.get_secret_value())
        return value

    @field_validator("previous_master_keys")
    @classmethod
    def _previous(cls, value: list[SecretStr]) -> list[SecretStr]:
        for item in value:
            _check_key_material(item.get_secret_value())
        return value


def _check_key_material(text: str) -> None:
    import base64
    import binascii

    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 text") from None
    if len(raw) < 32:
        raise ValueError("must decode to at least 32 bytes (generate one with `iam-grpc secrets generate`)")


ARGON2_FLOOR = {"memory_kib": 19456, "time_cost": 2, "parallelism": 1}


class PasswordsSettings(_Group):
    memory_kib: int = Field(default=19456, ge=ARGON2_FLOOR["memory_kib"], le=4 * 1024 * 1024)
    time_cost: int = Field(default=2, ge=ARGON2_FLOOR["time_cost"], le=100)
    parallelism: int = Field(default=1, ge=ARGON2_FLOOR["parallelism"], le=64)
    hash_len: int = Field(default=32, ge=16, le=64)
    salt_len: int = Field(default=16, ge=16, le=64)
    peppers: dict[int, SecretStr] = {}
    current_pepper: int | None = None
    min_length: int = Field(default=12, ge=8, le=128)
    max_length: int = Field(default=128, ge=64, le=1024)
    max_concurrent_hashes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    max_queued_hashes: int = Field(default=64, ge=0)
    common_list: Path | None = None  # None: the bundled list

    @field_validator("peppers")
    @classmethod
    def _peppers(cls, value: dict[int, SecretStr]) -> dict[int, SecretStr]:
        for pepper_id, secret in value.items():
            if not 1 <= pepper_id <= 32767:
                raise ValueError("pepper ids must be between 1 and 32767")
            if len(secret.get_secret_value().encode()) < 16:
                raise ValueError("each pepper must be at least 16 bytes")
        return value

    @model_validator(mode="after")
    def _current(self) -> Self:
        if self.current_pepper is not None and self.current_pepper not in self.peppers:
            raise ValueError("passwords.current_pepper must name an entry of passwords.peppers")
        if self.peppers and self.current_pepper is None:
            raise ValueError("passwords.current_pepper is required when passwords.peppers is set")
        if self.max_length < self.min_length:
            raise ValueError("passwords.max_length must not be below passwords.min_length")
        return self


class HibpSettings(_Group):
    mode: Literal["off", "online", "offline"] | None = None  # default: off embedded, online production
    url: str = "https://api.pwnedpasswords.com/range/"
    file: Path | None = None  # offline mode: sorted SHA-1:count file
    timeout: Duration = timedelta(seconds=1)
    fail_open: bool = True
    cache_ttl: Duration = timedelta(hours=24)


class EmailChecksSettings(_Group):
    check_mx: bool | None = None  # default: false embedded, true production
    mx_timeout: Duration = timedelta(seconds=1)
    nameservers: list[str] = []  # ip[:port]; empty: the system resolver
    disposable: bool = True
    allow_domains: list[str] = []
    deny_domains: list[str] = []

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        for item in value:
            _split_host_port(item, default_port=53)
        return value


class TokensSettings(_Group):
    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    issuer: str = Field(default="iam-grpc", min_length=1)
    audience: str = Field(default="iam-grpc", min_length=1)
    access_ttl: Duration = timedelta(seconds=900)
    leeway: Duration = timedelta(seconds=30)
    denylist_fallback: Literal["sql", "closed"] = "sql"
    denylist_replay: Duration = timedelta(seconds=60)


class KeysSettings(_Group):
    rotation_interval: Duration = timedelta(days=30)  # 0: manual rotation only
    publish_ahead: Duration = timedelta(hours=1)
    jwks_max_age: Duration = timedelta(seconds=300)
    reload_interval: Duration = timedelta(seconds=60)

    @model_validator(mode="after")
    def _ahead(self) -> Self:
        if self.publish_ahead <= self.jwks_max_age:
            raise ValueError("keys.publish_ahead must be longer than keys.jwks_max_age")
        return self


class RefreshSettings(_Group):
    absolute_ttl: Duration = timedelta(days=30)
    idle_ttl: Duration = timedelta(days=7)
    grace: Duration = timedelta(seconds=15)
    reuse_memory: Duration = timedelta(days=7)
    reuse_mfa_hold: Duration = timedelta(days=7)


class SessionsSettings(_Group):
    max_per_user: int = Field(default=10, ge=1, le=1000)


class DevicesSettings(_Group):
    trust_idle: Duration = timedelta(days=90)
    max_networks: int = Field(default=8, ge=1, le=64)
    network_memory: Duration = timedelta(days=90)
    max_countries: int = Field(default=5, ge=1, le=64)


class LoginSettings(_Group):
    mfa_on_new_device: bool = True


class MfaSettings(_Group):
    code_length: int = Field(default=6, ge=6, le=8)
    ttl: Duration = timedelta(minutes=10)
    max_attempts: int = Field(default=5, ge=1, le=20)
    resend_interval: Duration = timedelta(seconds=60)
    max_resends: int = Field(default=3, ge=0, le=10)
    max_lifetime: Duration = timedelta(minutes=30)
    max_pending_per_user: int = Field(default=3, ge=1, le=20)


class LinkPaths(_Group):
    mfa: str = "/auth/mfa"
    step_up: str = "/auth/step-up"
    password_reset: str = "/auth/reset-password"  # noqa: S105 - a URL path, not a secret
    email_change: str = "/auth/confirm-email"


class LinksSettings(_Group):
    base_url: str | None = None  # embedded default http://localhost:3000; required in production
    paths: LinkPaths = LinkPaths()
    password_reset_ttl: Duration = timedelta(minutes=20)
    email_change_ttl: Duration = timedelta(hours=1)

    @field_validator("base_url")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError("must be an http(s) URL without query or fragment")
        return value.rstrip("/")


class ResetSettings(_Group):
    response_floor: Duration = timedelta(milliseconds=500)
    untrust_devices: bool = False


class EmailChangeSettings(_Group):
    max_auth_age: Duration = timedelta(minutes=15)


CheckAction = Literal["mfa", "block", "off"]


class CheckSettings(_Group):
    action: CheckAction = "mfa"


class AnomalySettings(_Group):
    """The Refresh checks of behaviour.md 3.2: one ``action`` per check, and their parameters."""

    device: CheckSettings = CheckSettings()
    idle: CheckSettings = CheckSettings()
    session_count: CheckSettings = CheckSettings()
    rotation_burst: CheckSettings = CheckSettings(action="block")
    network: CheckSettings = CheckSettings()
    risk: CheckSettings = CheckSettings()
    proxy: CheckSettings = CheckSettings()
    tor: CheckSettings = CheckSettings()
    fingerprint: CheckSettings = CheckSettings()
    travel: CheckSettings = CheckSettings()
    idle_after: Duration = timedelta(hours=72)
    max_sessions: int = Field(default=5, ge=1, le=1000)
    session_count_bypass: Duration = timedelta(days=7)
    burst_max: int = Field(default=3, ge=1, le=1000)
    burst_window: Duration = timedelta(minutes=10)
    ipv4_prefix: int = Field(default=24, ge=8, le=32)
    ipv6_prefix: int = Field(default=56, ge=16, le=128)
    asn_match: bool = True
    risk_threshold: int = Field(default=25, ge=1)
    proxy_allowance: Duration = timedelta(days=30)
    travel_max_kmh: float = Field(default=900, gt=0)
    travel_min_km: float = Field(default=500, ge=0)


class StepUpSettings(_Group):
    grant_ttl: Duration = timedelta(minutes=5)
    actions: list[str] = []


class SmtpSettings(_Group):
    host: str = ""  # empty: write .eml files to mail.outbox_dir
    port: int = Field(default=587, ge=1, le=65535)
    # STARTTLS on a plain connection: required (refuse to send without it), when_offered, or off
    starttls: Literal["required", "when_offered", "off"] = "required"
    tls: bool = False  # implicit TLS (smtps, usually port 465)
    verify_certificate: bool = True
    username: str = ""
    password: SecretStr | None = None
    timeout: Duration = timedelta(seconds=10)


class MailSettings(_Group):
    from_address: str = "no-reply@localhost"
    from_name: str = "IAM"
    site_name: str = "IAM"
    support_url: str = ""
    default_locale: str = "en"
    templates_dir: Path | None = None
    outbox_dir: Path | None = None  # default: <data_dir>/outbox
    smtp: SmtpSettings = SmtpSettings()
    batch: int = Field(default=20, ge=1, le=1000)
    poll_interval: Duration = timedelta(seconds=2)
    retry_backoff: list[Duration] = [timedelta(seconds=s) for s in (30, 60, 120, 300, 600, 1800, 3600, 7200)]
    max_attempts: int = Field(default=8, ge=1, le=50)
    max_per_minute: int = Field(default=600, ge=1)


class GeoipSettings(_Group):
    city_db: Path | None = None
    asn_db: Path | None = None
    anonymous_db: Path | None = None
    hosting_asns: list[int] = []


class UaSettings(_Group):
    cache_size: int = Field(default=10_000, ge=0)


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")
_CALLER_ID = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
_METHOD = re.compile(r"^(\*|[A-Za-z0-9_.]+/(\*|[A-Za-z0-9_]+))\Z")


class CallerSettings(_Group):
    """One calling service (behaviour.md 2.8)."""

    api_key_sha256: list[str] = Field(default=[], max_length=2)
    cert_sans: list[str] = []
    methods: list[str] = Field(default=[], min_length=1)
    trust_client_ip: bool = False

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, value: list[str]) -> list[str]:
        out = [item.strip().lower() for item in value]
        if not all(_SHA256_HEX.match(item) for item in out):
            raise ValueError("each entry must be a SHA-256 hex digest (64 hex characters)")
        return out

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = [item.strip().lstrip("/") for item in value]
        if not all(_METHOD.match(item) for item in out):
            raise ValueError("entries must be '*', 'package.Service/*' or 'package.Service/Method'")
        return out

    @model_validator(mode="after")
    def _credential(self) -> Self:
        if not self.api_key_sha256 and not self.cert_sans:
            raise ValueError("a caller needs api_key_sha256 or cert_sans")
        return self


class CallersSettings(BaseModel):
    """Caller authentication; every other key is a caller id (``callers.<id>``)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    __pydantic_extra__: dict[str, CallerSettings] = Field(init=False)

    allow_unauthenticated: bool = False
    allow_unauthenticated_loopback: bool = True
    unauthenticated_trust_client_ip: bool = False  # for callers admitted by allow_unauthenticated

    @model_validator(mode="after")
    def _ids(self) -> Self:
        for caller_id in self.entries:
            if not _CALLER_ID.match(caller_id):
                raise ValueError("caller ids must match ^[a-z][a-z0-9_-]{0,31}$")
        return self

    @property
    def entries(self) -> dict[str, CallerSettings]:
        return dict(self.__pydantic_extra__ or {})


class LimitGroupSettings(_Group):
    """Overrides of one limiter group's defaults (behaviour.md 8.3); unset fields keep them."""

    windows: list[str] | None = None  # e.g. ["10/1s", "100/10m"], "5/1h fc" for failures-only + consecutive
    max_strikes: int | None = Field(default=None, ge=0, le=100)
    block: Duration | None = None
    block_max: Duration | None = None

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("a group needs at least one window")
            for item in value:
                parse_window(item)
        return value


class RateLimitSettings(_Group):
    enabled: bool = True
    on_store_failure: Literal["local", "closed"] = "local"
    exempt_cidrs: list[str] = []
    groups: dict[str, LimitGroupSettings] = {}

    @field_validator("exempt_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError("entries must be CIDR networks such as 10.0.0.0/8") from None
        return value

    @model_validator(mode="after")
    def _known_groups(self) -> Self:
        unknown = sorted(set(self.groups) - set(DEFAULT_GROUPS))
        if unknown:
            raise ValueError("ratelimit.groups: unknown group " + ", ".join(unknown))
        self.resolved_groups()  # validates block lengths of the merged groups
        return self

    def resolved_groups(self) -> dict[str, Group]:
        """The default groups with this configuration's overrides applied."""
        merged = dict(DEFAULT_GROUPS)
        for name, override in self.groups.items():
            merged[name] = merged[name].with_changes(
                windows=tuple(parse_window(w) for w in override.windows) if override.windows else None,
                max_strikes=override.max_strikes,
                block=override.block,
                block_max=override.block_max,
            )
        return merged

    def exempt_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in self.exempt_cidrs]


class ExtAuthzRule(_Group):
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


class ExtAuthzSettings(_Group):
    """The Envoy ``envoy.service.auth.v3.Authorization/Check`` service; the first rule whose prefix
    starts the request path decides the required roles (none: a valid token is enough)."""

    enabled: bool = True
    rules: list[ExtAuthzRule] = Field(default=[], max_length=256)


class RolesSettings(_Group):
    default: list[str] = ["user"]


class LoggingSettings(_Group):
    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    dir: Path | None = None  # default: <data_dir>/logs; "" disables files
    files: bool = True
    rotation_mb: int = Field(default=100, ge=1)
    retention_days: int = Field(default=14, ge=1)
    hot_ok_level: Literal["TRACE", "DEBUG", "INFO"] = "DEBUG"
    access_log_probes: bool = True  # log health/reflection calls (at DEBUG when OK); false: never
    redact_extra: list[str] = []

    @field_validator("level", "hot_ok_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class AuditSettings(_Group):
    retention: Duration = timedelta(days=400)


class CleanupSettings(_Group):
    interval: Duration = timedelta(minutes=10)
    batch: int = Field(default=1000, ge=1)


class ShutdownSettings(_Group):
    drain_delay: Duration = timedelta(seconds=5)
    grace: Duration = timedelta(seconds=20)


# ---------------------------------------------------------------------------
# the root


_MODE_DEFAULTS: dict[str, dict[tuple[str, str], Any]] = {
    "embedded": {
        ("server", "reflection"): True,
        ("hibp", "mode"): "off",
        ("email_checks", "check_mx"): False,
        ("database", "auto_migrate"): True,
        ("links", "base_url"): "http://localhost:3000",
    },
    "production": {
        ("server", "reflection"): False,
        ("hibp", "mode"): "online",
        ("email_checks", "check_mx"): True,
        ("database", "auto_migrate"): False,
    },
}


class Settings(BaseSettings):
    """Every setting of the service, validated once and frozen."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    mode: Literal["embedded", "production"] = "embedded"
    data_dir: Path = Path("./var")
    # IAM_TEST_FAILPOINTS: "1" enables test fault hooks; "name=action;..." also arms some
    # (see iam_grpc.core.failpoints). Empty: off. Refused in production.
    test_failpoints: str = ""

    server: ServerSettings = ServerSettings()
    http: HttpSettings = HttpSettings()
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    ephemeral: EphemeralSettings = EphemeralSettings()
    secrets: SecretsSettings = SecretsSettings()
    passwords: PasswordsSettings = PasswordsSettings()
    hibp: HibpSettings = HibpSettings()
    email_checks: EmailChecksSettings = EmailChecksSettings()
    tokens: TokensSettings = TokensSettings()
    keys: KeysSettings = KeysSettings()
    refresh: RefreshSettings = RefreshSettings()
    sessions: SessionsSettings = SessionsSettings()
    devices: DevicesSettings = DevicesSettings()
    login: LoginSettings = LoginSettings()
    anomaly: AnomalySettings = AnomalySettings()
    mfa: MfaSettings = MfaSettings()
    links: LinksSettings = LinksSettings()
    reset: ResetSettings = ResetSettings()
    email_change: EmailChangeSettings = EmailChangeSettings()
    step_up: StepUpSettings = StepUpSettings()
    mail: MailSettings = MailSettings()
    geoip: GeoipSettings = GeoipSettings()
    ua: UaSettings = UaSettings()
    callers: CallersSettings = CallersSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    ext_authz: ExtAuthzSettings = ExtAuthzSettings()
    roles: RolesSettings = RolesSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()
    cleanup: CleanupSettings = CleanupSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        """Fill the settings whose default depends on the mode or the data directory."""
        if not isinstance(data, dict):
            return data
        mode = data.get("mode", "embedded")
        defaults = _MODE_DEFAULTS.get(mode if isinstance(mode, str) else "", {})
        data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in data.items()}
        for (group, key), value in defaults.items():
            section = data.setdefault(group, {})
            if isinstance(section, dict) and section.get(key) is None:
                section[key] = value
        data_dir = Path(str(data.get("data_dir") or "./var"))
        database = data.setdefault("database", {})
        if isinstance(database, dict) and not database.get("url"):
            database["url"] = f"sqlite+aiosqlite:///{data_dir / 'iam.db'}"
        mail = data.setdefault("mail", {})
        if isinstance(mail, dict) and not mail.get("outbox_dir"):
            mail["outbox_dir"] = str(data_dir / "outbox")
        log = data.setdefault("logging", {})
        if isinstance(log, dict) and log.get("dir") is None:
            log["dir"] = str(data_dir / "logs")
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        if self.server.workers > 1:
            # Workers share nothing in memory: rate limits, deny-lists and grace results must be
            # in Redis, and SQLite is one file behind one writer (behaviour.md 11.2).
            if self.database.is_sqlite or not self.redis.url:
                raise ValueError(
                    "server.workers > 1 needs MySQL (IAM_DATABASE_URL) and Redis (IAM_REDIS_URL): "
                    "workers share no memory"
                )
            if self.server.port == 0:
                raise ValueError("server.workers > 1 needs a fixed port (IAM_GRPC_LISTEN), not 0")
        return self

    # derived values -------------------------------------------------------

    @property
    def reflection(self) -> bool:
        return bool(self.server.reflection)

    @property
    def auto_migrate(self) -> bool:
        return bool(self.database.auto_migrate)

    @property
    def log_dir(self) -> Path | None:
        if not self.logging.files or self.logging.dir is None or str(self.logging.dir) in ("", "."):
            return None
        return self.logging.dir

    @property
    def outbox_dir(self) -> Path:
        return self.mail.outbox_dir or self.data_dir / "outbox"

    @property
    def grpc_address(self) -> str:
        return join_host_port(self.server.host, self.server.port)

    @property
    def http_address(self) -> str:
        return join_host_port(self.http.host, self.http.port)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        inputs = _LOAD_INPUTS.get()
        environ = inputs.environ if inputs is not None else dict(os.environ)  # noqa: TID251
        config_file = inputs.config_file if inputs is not None else None
        if config_file is None and environ.get("IAM_CONFIG_FILE"):
            config_file = Path(environ["IAM_CONFIG_FILE"])
        sources: list[PydanticBaseSettingsSource] = [init_settings, _IamEnvSource(settings_cls, environ)]
        if config_file is not None:
            sources.append(_TomlSource(settings_cls, config_file))
        return tuple(sources)


def production_refusals(settings: Settings) -> list[str]:
    """What production mode refuses to start with (behaviour.md 11.2), one line per setting."""
    if settings.mode != "production":
        return []
    problems: list[str] = []
    if settings.database.is_sqlite:
        problems.append("database.url (IAM_DATABASE_URL): production needs MySQL/MariaDB, not SQLite")
    if not settings.redis.url:
        problems.append("redis.url (IAM_REDIS_URL): production needs Redis for shared state")
    if not settings.mail.smtp.host:
        problems.append("mail.smtp.host (IAM_SMTP_URL): production needs SMTP, not the file outbox")
    if settings.secrets.master_key is None:
        problems.append("secrets.master_key: required in production (IAM_SECRETS__MASTER_KEY or _FILE)")
    if not settings.passwords.peppers:
        problems.append("passwords.peppers: at least one pepper is required in production")
    if not settings.links.base_url:
        problems.append("links.base_url (IAM_PUBLIC_LINK_BASE): required in production")
    if not settings.callers.entries and not settings.callers.allow_unauthenticated:
        problems.append(
            "callers: production needs at least one configured caller "
            "(or callers.allow_unauthenticated = true, explicitly)"
        )
    if settings.reflection and not settings.server.tls.mutual:
        problems.append("server.reflection: reflection in production needs mTLS (server.tls.client_ca_file)")
    if settings.test_failpoints:
        problems.append("IAM_TEST_FAILPOINTS: test fault hooks are refused in production")
    return problems


# ---------------------------------------------------------------------------
# sources


class _LoadInputs:
    def __init__(self, environ: Mapping[str, str], config_file: Path | None) -> None:
        self.environ = dict(environ)
        self.config_file = config_file


_LOAD_INPUTS: ContextVar[_LoadInputs | None] = ContextVar("iam_config_inputs", default=None)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per failing setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError("must be host:port")
        port_text = str(default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("port must be a number between 0 and 65535")
    if not host:
        raise ValueError("host is missing")
    if ":" in host:
        ipaddress.IPv6Address(host)  # raises ValueError with a message that holds no secret
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


_FLAT_SIMPLE: dict[str, tuple[str, ...]] = {
    "IAM_MODE": ("mode",),
    "IAM_DATA_DIR": ("data_dir",),
    "IAM_DATABASE_URL": ("database", "url"),
    "IAM_REDIS_URL": ("redis", "url"),
    "IAM_PUBLIC_LINK_BASE": ("links", "base_url"),
    "IAM_HIBP_MODE": ("hibp", "mode"),
    "IAM_HIBP_URL": ("hibp", "url"),
    "IAM_MX_CHECK": ("email_checks", "check_mx"),
    "IAM_GEOIP_CITY_DB": ("geoip", "city_db"),
    "IAM_GEOIP_ASN_DB": ("geoip", "asn_db"),
    "IAM_GEOIP_ANONYMOUS_DB": ("geoip", "anonymous_db"),
    "IAM_LOG_DIR": ("logging", "dir"),
    "IAM_LOG_LEVEL": ("logging", "level"),
    "IAM_REFRESH_GRACE_SECONDS": ("refresh", "grace"),
    "IAM_ARGON2_MEMORY_KIB": ("passwords", "memory_kib"),
    "IAM_ARGON2_TIME_COST": ("passwords", "time_cost"),
    "IAM_ARGON2_PARALLELISM": ("passwords", "parallelism"),
    "IAM_TEST_FAILPOINTS": ("test_failpoints",),
}
_FLAT_NAMES = frozenset(_FLAT_SIMPLE) | {
    "IAM_GRPC_LISTEN",
    "IAM_HTTP_LISTEN",
    "IAM_DNS_NAMESERVERS",
    "IAM_MAIL_FROM",
    "IAM_SMTP_URL",
}


def _flat_aliases(name: str, value: str) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Map the flat contract variables of api.md to nested settings."""
    if name in _FLAT_SIMPLE:
        path = _FLAT_SIMPLE[name]
        if name == "IAM_REFRESH_GRACE_SECONDS" and value.strip().isdigit():
            yield path, int(value)
        elif name == "IAM_TEST_FAILPOINTS":
            yield path, "" if value.strip() in ("", "0", "false", "False") else value.strip()
        else:
            yield path, value
    elif name in ("IAM_GRPC_LISTEN", "IAM_HTTP_LISTEN"):
        group = "server" if name == "IAM_GRPC_LISTEN" else "http"
        if group == "http" and not value.strip():
            yield (group, "enabled"), False
            return
        try:
            host, port = _split_host_port(value)
        except ValueError as exc:
            raise ConfigError([f"{name}: {exc}"]) from None
        yield (group, "host"), host
        yield (group, "port"), port
    elif name == "IAM_DNS_NAMESERVERS":
        yield ("email_checks", "nameservers"), [p for p in re.split(r"[,\s]+", value) if p]
    elif name == "IAM_MAIL_FROM":
        from email.utils import parseaddr

        display, address = parseaddr(value)
        if not address or "@" not in address:
            raise ConfigError([f"{name}: must be an address such as 'IAM <no-reply@example.com>'"])
        yield ("mail", "from_address"), address
        if display:
            yield ("mail", "from_name"), display
    elif name == "IAM_SMTP_URL":
        yield from _smtp_url(value)


def _smtp_url(value: str) -> Iterator[tuple[tuple[str, ...], Any]]:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigError(["IAM_SMTP_URL: must be smtp://host:port or smtps://user:pass@host:465"]) from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError(["IAM_SMTP_URL: must be smtp://host:port or smtps://user:pass@host:465"])
    implicit = parts.scheme == "smtps"
    yield ("mail", "smtp", "host"), parts.hostname
    yield ("mail", "smtp", "port"), port or (465 if implicit else 587)
    yield ("mail", "smtp", "tls"), implicit
    # smtp:// upgrades with STARTTLS when the server offers it; ?starttls=required|off changes that
    query = dict(part.partition("=")[::2] for part in (parts.query or "").split("&") if part)
    starttls = query.get("starttls", "when_offered")
    if starttls not in ("required", "when_offered", "off"):
        raise ConfigError(["IAM_SMTP_URL: ?starttls= must be required, when_offered or off"])
    yield ("mail", "smtp", "starttls"), "off" if implicit else starttls
    if parts.username:
        yield ("mail", "smtp", "username"), unquote(parts.username)
    if parts.password:
        yield ("mail", "smtp", "password"), unquote(parts.password)


def _parse_env_value(text: str) -> Any:
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text


def _known_path(model: type[BaseModel], path: tuple[str, ...], *, declared: bool = False) -> bool:
    """Whether a nested env path names a real setting.

    Dict-typed groups (``passwords.peppers``, ``ratelimit.groups``, caller ids) accept any key;
    with ``declared`` the last part must be a declared field, not such a free key.
    """
    current: Any = model
    for index, part in enumerate(path):
        last = index == len(path) - 1
        if current is CallersSettings:
            if part in CallersSettings.model_fields:
                return last
            if last:
                return not declared  # callers.<id>
            return index == len(path) - 2 and path[-1] in CallerSettings.model_fields
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return current is dict and not (declared and last)
        field = current.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        origin = getattr(annotation, "__origin__", None)
        current = dict if origin is dict else annotation
    return True


def _names_setting(name: str, *, declared: bool = False) -> bool:
    """Whether an environment name is a setting itself (so ``X_FILE`` may mean "X, read from a file")."""
    if "__" in name:
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        return _known_path(Settings, path, declared=declared)
    return name in _FLAT_NAMES


def _file_variant(name: str) -> str | None:
    """The setting an ``..._FILE`` variable reads from a file, or None when it is a setting of its own
    (``IAM_SERVER__TLS__CERT_FILE``)."""
    if not name.endswith("_FILE"):
        return None
    stem = name[: -len("_FILE")]
    if _names_setting(name, declared=True) or not _names_setting(stem):
        return None
    return stem


class _IamEnvSource(PydanticBaseSettingsSource):
    """``IAM_*`` environment variables: nested names, flat aliases and ``_FILE`` variants."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ builds the whole tree

    def __call__(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        problems: list[str] = []
        for raw_name, raw_value in sorted(self._environ.items()):
            if not raw_name.startswith(ENV_PREFIX) or raw_name == "IAM_CONFIG_FILE":
                continue
            name, value = raw_name, raw_value
            stem = _file_variant(name)
            if stem is not None:
                if stem in self._environ:
                    problems.append(f"{raw_name}: set either {stem} or {raw_name}, not both")
                    continue
                name = stem
                try:
                    value = Path(raw_value).read_text().rstrip("\r\n")
                except OSError:
                    problems.append(f"{raw_name}: the file cannot be read")
                    continue
            if "__" in name:
                path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
                if not _known_path(Settings, path):
                    if path[0] in Settings.model_fields:
                        problems.append(f"{raw_name}: no such setting ({'.'.join(path)})")
                    continue
                _set(nested, path, _parse_env_value(value))
                continue
            try:
                for path, parsed in _flat_aliases(name, value):
                    _set(flat, path, parsed)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        return _deep_merge(flat, nested)


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self._path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        try:
            with self._path.open("rb") as handle:
                data = tomllib.load(handle)
        except OSError:
            raise ConfigError([f"config file {self._path}: cannot be read"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"config file {self._path}: not valid TOML ({exc})"]) from None
        return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_ALIAS_OF = {
    "mode": "IAM_MODE",
    "data_dir": "IAM_DATA_DIR",
    "database.url": "IAM_DATABASE_URL",
    "redis.url": "IAM_REDIS_URL",
    "links.base_url": "IAM_PUBLIC_LINK_BASE",
    "hibp.mode": "IAM_HIBP_MODE",
    "hibp.url": "IAM_HIBP_URL",
    "email_checks.check_mx": "IAM_MX_CHECK",
    "email_checks.nameservers": "IAM_DNS_NAMESERVERS",
    "logging.dir": "IAM_LOG_DIR",
    "logging.level": "IAM_LOG_LEVEL",
    "refresh.grace": "IAM_REFRESH_GRACE_SECONDS",
    "passwords.memory_kib": "IAM_ARGON2_MEMORY_KIB",
    "passwords.time_cost": "IAM_ARGON2_TIME_COST",
    "passwords.parallelism": "IAM_ARGON2_PARALLELISM",
}


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ()) if not str(part).startswith("function-"))
    message = str(error.get("msg", "invalid"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error.get("type") == "extra_forbidden":
        message = "unknown setting"
    first = message.split(" ", 1)[0]
    if "." in first and (not loc or first.startswith(loc)):
        return message  # a cross-field rule that names its settings itself
    alias = _ALIAS_OF.get(loc)
    name = f"{loc} ({alias})" if alias else (loc or "settings")
    return f"{name}: {message}"


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from overrides, the environment and the TOML file.

    Raises :class:`ConfigError` listing each failing setting (never its value).
    """
    token = _LOAD_INPUTS.set(
        _LoadInputs(os.environ if environ is None else environ, config_file)  # noqa: TID251
    )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = sorted({_describe(error) for error in exc.errors(include_input=False, include_url=False)})
        raise ConfigError(problems) from None
    finally:
        _LOAD_INPUTS.reset(token)

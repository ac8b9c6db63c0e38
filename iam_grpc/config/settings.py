"""The root of the settings: every group, the defaults that depend on the mode, and
:func:`load_settings`, which builds the one frozen object at startup."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from iam_grpc.config import sources
from iam_grpc.config.checks import (
    AnomalySettings,
    EmailChecksSettings,
    GeoipSettings,
    RateLimitSettings,
    UaSettings,
)
from iam_grpc.config.events import EventsSettings
from iam_grpc.config.flows import (
    EmailChangeSettings,
    LinksSettings,
    LoginSettings,
    MfaSettings,
    ResetSettings,
    StepUpSettings,
)
from iam_grpc.config.mail import MailSettings
from iam_grpc.config.ops import AuditSettings, CleanupSettings, LoggingSettings, ShutdownSettings
from iam_grpc.config.security import HibpSettings, PasswordsSettings, SecretsSettings
from iam_grpc.config.server import CallersSettings, ExtAuthzSettings, HttpSettings, ServerSettings
from iam_grpc.config.sessions import (
    DevicesSettings,
    KeysSettings,
    RefreshSettings,
    RolesSettings,
    SessionsSettings,
    TokensSettings,
)
from iam_grpc.config.storage import DatabaseSettings, EphemeralSettings, RedisSettings
from iam_grpc.config.values import join_host_port

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
    events: EventsSettings = EventsSettings()

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
            named = sources.CONTRACT_NAME_OF
            # Workers share nothing in memory: rate limits, deny-lists and grace results must be
            # in Redis, and SQLite is one file behind one writer (behaviour.md 11.2).
            if self.database.is_sqlite or not self.redis.url:
                raise ValueError(
                    f"server.workers > 1 needs MySQL ({named['database.url']}) and "
                    f"Redis ({named['redis.url']}): workers share no memory"
                )
            if self.server.port == 0:
                raise ValueError(f"server.workers > 1 needs a fixed port ({named['server.port']}), not 0")
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
        """Overrides, then the environment, then the TOML file: see :mod:`iam_grpc.config.sources`."""
        return sources.settings_sources(settings_cls, init_settings)


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from overrides, the environment and the TOML file.

    Raises :class:`ConfigError` listing each failing setting (never its value).
    """
    with sources.reading(environ, config_file):
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            raise sources.config_error(exc) from None

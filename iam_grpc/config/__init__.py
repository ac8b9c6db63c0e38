"""Configuration: one frozen, validated settings object built at startup.

- :mod:`~iam_grpc.config.sources`: where values come from (environment with the contract
  names of api.md and ``IAM_<GROUP>__<KEY>``, ``<NAME>_FILE``, the TOML file) and their
  precedence; the only reader of ``os.environ``;
- :mod:`~iam_grpc.config.settings`: the root :class:`Settings` and :func:`load_settings`;
- one module per theme for the groups (``server``, ``storage``, ``security``, ``sessions``,
  ``flows``, ``mail``, ``checks``, ``ops``), on the value types of ``values``;
- :mod:`~iam_grpc.config.production`: what production mode refuses to start with.

Validation failures raise :class:`ConfigError`, whose lines name the setting and the rule it
broke and never echo the value.
"""

from __future__ import annotations

from functools import partial

from iam_grpc.config.checks import (
    AnomalySettings,
    CheckAction,
    CheckSettings,
    EmailChecksSettings,
    GeoipSettings,
    LimitGroupSettings,
    RateLimitSettings,
    UaSettings,
)
from iam_grpc.config.events import EventsSettings, NatsSettings, WebhookSettings
from iam_grpc.config.flows import (
    EmailChangeSettings,
    LinkPaths,
    LinksSettings,
    LoginSettings,
    MfaSettings,
    ResetSettings,
    StepUpSettings,
)
from iam_grpc.config.mail import MailSettings, SmtpSettings
from iam_grpc.config.ops import AuditSettings, CleanupSettings, LoggingSettings, ShutdownSettings
from iam_grpc.config.production import production_refusals
from iam_grpc.config.security import ARGON2_FLOOR, HibpSettings, PasswordsSettings, SecretsSettings
from iam_grpc.config.server import (
    CallerSettings,
    CallersSettings,
    ExtAuthzRule,
    ExtAuthzSettings,
    HttpSettings,
    ServerSettings,
    TlsSettings,
)
from iam_grpc.config.sessions import (
    DevicesSettings,
    KeysSettings,
    RefreshSettings,
    RolesSettings,
    SessionsSettings,
    TokensSettings,
)
from iam_grpc.config.settings import Settings, load_settings
from iam_grpc.config.sources import ENV_PREFIX, ConfigError, file_variant, names_setting
from iam_grpc.config.storage import DatabaseSettings, EphemeralSettings, RedisSettings
from iam_grpc.config.values import Duration, MaskedUrl, join_host_port, mask_url, split_host_port

# the names these had when the configuration was one module (iam_grpc.dns, tests/deploy use them)
_split_host_port = split_host_port
_names_setting = partial(names_setting, Settings)
_file_variant = partial(file_variant, Settings)

__all__ = [
    "ARGON2_FLOOR",
    "ENV_PREFIX",
    "AnomalySettings",
    "AuditSettings",
    "CallerSettings",
    "CallersSettings",
    "CheckAction",
    "CheckSettings",
    "CleanupSettings",
    "ConfigError",
    "DatabaseSettings",
    "DevicesSettings",
    "Duration",
    "EmailChangeSettings",
    "EmailChecksSettings",
    "EphemeralSettings",
    "EventsSettings",
    "ExtAuthzRule",
    "ExtAuthzSettings",
    "GeoipSettings",
    "HibpSettings",
    "HttpSettings",
    "KeysSettings",
    "LimitGroupSettings",
    "LinkPaths",
    "LinksSettings",
    "LoggingSettings",
    "LoginSettings",
    "MailSettings",
    "MaskedUrl",
    "MfaSettings",
    "NatsSettings",
    "PasswordsSettings",
    "RateLimitSettings",
    "RedisSettings",
    "RefreshSettings",
    "ResetSettings",
    "RolesSettings",
    "SecretsSettings",
    "ServerSettings",
    "SessionsSettings",
    "Settings",
    "ShutdownSettings",
    "SmtpSettings",
    "StepUpSettings",
    "TlsSettings",
    "TokensSettings",
    "UaSettings",
    "WebhookSettings",
    "join_host_port",
    "load_settings",
    "mask_url",
    "production_refusals",
]

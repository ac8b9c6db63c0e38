"""What production mode refuses to start with."""

from __future__ import annotations

from iam_grpc.config.settings import Settings
from iam_grpc.config.sources import label


def production_refusals(settings: Settings) -> list[str]:
    """What production mode refuses to start with (behaviour.md 11.2), one line per setting."""
    if settings.mode != "production":
        return []
    problems: list[str] = []
    if settings.database.is_sqlite:
        problems.append(f"{label('database.url')}: production needs MySQL/MariaDB, not SQLite")
    if not settings.redis.url:
        problems.append(f"{label('redis.url')}: production needs Redis for shared state")
    if not settings.mail.smtp.host:
        problems.append(f"{label('mail.smtp.host')}: production needs SMTP, not the file outbox")
    if settings.secrets.master_key is None:
        problems.append("secrets.master_key: required in production (IAM_SECRETS__MASTER_KEY or _FILE)")
    if not settings.passwords.peppers:
        problems.append("passwords.peppers: at least one pepper is required in production")
    if not settings.links.base_url:
        problems.append(f"{label('links.base_url')}: required in production")
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

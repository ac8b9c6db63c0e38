"""Builders of the service's infrastructure components: keys, audit, limits, mail, the
deny-list and access tokens, cleanup.

Each ``build_*`` takes the settings, the opened stores and the clock (what it needs of them),
then the components it depends on by name, and returns one component. Builders do no network
I/O; what must happen before serving (loading keys, verifying the deny-list, the dummy hash) is
the opening of the component in ``iam_grpc.app``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iam_grpc.clock import Clock
from iam_grpc.config import Settings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.cleanup import Cleanup, CleanupPolicy
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.keys import KeyRing, KeysUnreadable
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.mail.sender import OutboxSender
from iam_grpc.core.ratelimit import RateLimiter
from iam_grpc.core.risk import RiskScores, limiter_hook
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.tokens.denylist_mirror import DenyFeed
from iam_grpc.dependencies import ObservedTransport
from iam_grpc.mail.render import MailRenderer
from iam_grpc.mail.transports import FileTransport, SmtpTransport
from iam_grpc.metrics import Metrics
from iam_grpc.storage.ports import Database, MailTransport
from iam_grpc.ua import UserAgentParser
from iam_grpc.wiring.errors import StartupError
from iam_grpc.wiring.stores import Stores

if TYPE_CHECKING:
    from iam_grpc.storage.redis import RedisEphemeral

__all__ = [
    "build_access",
    "build_agents",
    "build_audit",
    "build_cleanup",
    "build_denylist",
    "build_keys",
    "build_limiter",
    "build_mail_renderer",
    "build_mail_transport",
    "build_mailer",
    "build_outbox_sender",
    "build_risk",
    "load_keys",
]


# keys ---------------------------------------------------------------------------------------


def build_keys(settings: Settings, db: Database, clock: Clock, material: SecretMaterial) -> KeyRing:
    """The signing keys. Needs SQL only: the workers' parent and the CLI build it without the
    ephemeral store."""
    tokens, keys = settings.tokens, settings.keys
    return KeyRing(
        db,
        material,
        clock,
        algorithm=tokens.algorithm,
        publish_ahead=keys.publish_ahead,
        retire_after=tokens.access_ttl + tokens.leeway + keys.jwks_max_age,
        rotation_interval=keys.rotation_interval,
    )


async def load_keys(keys: KeyRing) -> None:
    """Step 4: read the key table, create the first key if there is none (under a lock), and
    refuse to start without a key to sign with."""
    try:
        await keys.reload()
        await keys.ensure_initial_key()
        await keys.reload()
        if keys.signing_key() is None:
            raise StartupError("no usable signing key: another replica holds keys:rotate; retry the start")
    except KeysUnreadable as unreadable:
        where = "secrets.master_key" if "master key" in unreadable.why else "signing_keys table"
        raise StartupError(f"{where}: {unreadable}") from None


# audit, risk, limits ----------------------------------------------------------------------------


def build_audit(
    settings: Settings, stores: Stores, clock: Clock, material: SecretMaterial, caller: str | None = None
) -> AuditTrail:
    """``caller``: fixed for events outside RPCs (the CLI's ``"cli"``)."""
    return AuditTrail(stores.db, clock, material, caller=caller)


def build_risk(settings: Settings, stores: Stores, clock: Clock, material: SecretMaterial) -> RiskScores:
    return RiskScores(stores.ephemeral, material, clock)


def build_limiter(
    settings: Settings,
    stores: Stores,
    clock: Clock,
    material: SecretMaterial,
    metrics: Metrics,
    audit: AuditTrail,
    risk: RiskScores,
) -> RateLimiter:
    limits = settings.ratelimit
    return RateLimiter(
        stores.limits,
        groups=limits.resolved_groups(),
        material=material,
        clock=clock,
        metrics=metrics,
        fallback=stores.fallback_limits,
        exempt=limits.exempt_networks(),
        audit=audit,
        enabled=limits.enabled,
        on_refusal=limiter_hook(risk),
    )


# mail ---------------------------------------------------------------------------------------------


def build_mail_renderer(settings: Settings, material: SecretMaterial) -> MailRenderer:
    mail = settings.mail
    return MailRenderer(
        material=material,
        from_address=mail.from_address,
        from_name=mail.from_name,
        site_name=mail.site_name,
        support_url=mail.support_url,
        templates_dir=mail.templates_dir,
    )


def build_mail_transport(settings: Settings) -> MailTransport:
    """SMTP (observed, for the dependency report) when ``mail.smtp.host`` is set, else .eml files
    in the outbox folder."""
    smtp = settings.mail.smtp
    if not smtp.host:
        return FileTransport(settings.outbox_dir)
    return ObservedTransport(
        SmtpTransport(
            smtp.host,
            smtp.port,
            tls=smtp.tls,
            starttls=smtp.starttls,
            username=smtp.username,
            password=smtp.password.get_secret_value() if smtp.password else None,
            timeout=smtp.timeout,
            verify_certificate=smtp.verify_certificate,
        )
    )


def build_outbox_sender(
    settings: Settings,
    stores: Stores,
    clock: Clock,
    transport: MailTransport,
    renderer: MailRenderer,
    material: SecretMaterial,
    metrics: Metrics,
) -> OutboxSender:
    mail = settings.mail
    return OutboxSender(
        stores.db,
        transport,
        renderer,
        material,
        clock,
        metrics,
        batch=mail.batch,
        poll_interval=mail.poll_interval,
        retry_backoff=mail.retry_backoff,
        max_attempts=mail.max_attempts,
        max_per_minute=mail.max_per_minute,
    )


def build_mailer(
    settings: Settings, clock: Clock, limiter: RateLimiter, material: SecretMaterial, sender: OutboxSender
) -> Mailer:
    """Queues mail in the caller's transaction and wakes the local sender after the commit."""
    return Mailer(limiter, material, clock, default_locale=settings.mail.default_locale, wake=sender.wake)


# tokens -------------------------------------------------------------------------------------------


def build_agents(settings: Settings) -> UserAgentParser:
    return UserAgentParser(settings.ua.cache_size)


def _deny_feed(redis: RedisEphemeral | None) -> DenyFeed | None:
    """The change feed that keeps each worker's deny-list copy current (Redis only)."""
    if redis is None:
        return None
    from iam_grpc.storage.redis_denyfeed import RedisDenyFeed  # redis-py only when configured

    return RedisDenyFeed(redis)


def build_denylist(settings: Settings, stores: Stores, clock: Clock, metrics: Metrics) -> DenyList:
    """The revocation deny-lists: SQL the authority, the ephemeral store a cache that is
    distrusted (and read from SQL) whenever it may have lost entries."""
    tokens = settings.tokens
    redis = stores.redis
    denylist = DenyList(
        stores.ephemeral,
        stores.db,
        clock,
        metrics,
        access_ttl=tokens.access_ttl,
        leeway=tokens.leeway,
        fallback=tokens.denylist_fallback,
        server_id=(lambda: redis.server_id) if redis is not None else None,
        feed=_deny_feed(redis),
        staleness=tokens.denylist_staleness,
        stale=tokens.denylist_stale,
    )
    cache = denylist.cache
    cache.listeners.append(lambda trusted: metrics.denylist_trusted.set(1 if trusted else 0))
    if redis is not None:
        # a restart or failover of Redis: the cache may lack entries until verified or rebuilt
        redis.server_listeners.append(lambda _run_id: cache.server_changed())
    return denylist


def build_access(
    settings: Settings, clock: Clock, keys: KeyRing, denylist: DenyList, metrics: Metrics
) -> AccessTokens:
    tokens = settings.tokens
    return AccessTokens(
        keys,
        denylist,
        clock,
        metrics,
        algorithm=tokens.algorithm,
        issuer=tokens.issuer,
        audience=tokens.audience,
        ttl=tokens.access_ttl,
        leeway=tokens.leeway,
    )


# maintenance --------------------------------------------------------------------------------------


def build_cleanup(settings: Settings, stores: Stores, clock: Clock) -> Cleanup:
    return Cleanup(
        stores.db,
        stores.ephemeral,
        clock,
        CleanupPolicy(
            reuse_memory=settings.refresh.reuse_memory,
            audit_retention=settings.audit.retention,
            batch=settings.cleanup.batch,
        ),
    )

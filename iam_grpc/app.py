"""The running service: builds adapters from settings, starts them in the
documented order (behaviour.md 11.4) and stops them gracefully (11.6)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from iam_grpc.clock import Clock, SystemClock
from iam_grpc.config import Settings, join_host_port
from iam_grpc.core.anomalies import CHECKS, AnomalyChecks, AnomalyPolicy
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import ChallengePolicy, Challenges, end_session_challenges
from iam_grpc.core.cleanup import Cleanup, CleanupPolicy
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.common_passwords import CommonPasswords
from iam_grpc.core.email_change import EmailChange
from iam_grpc.core.email_domains import EmailDomainPolicy
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.keys import KeyRing, KeysUnreadable
from iam_grpc.core.links import Links
from iam_grpc.core.login import LoginFlow
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.mail.sender import OutboxSender
from iam_grpc.core.mfa import MfaFlows, MfaPolicy
from iam_grpc.core.observation import LearningPolicy, Observer
from iam_grpc.core.password_change import PasswordChange
from iam_grpc.core.password_reset import PasswordReset
from iam_grpc.core.password_rules import PasswordRules
from iam_grpc.core.passwords import Argon2Params, PasswordHashing
from iam_grpc.core.ratelimit import RateLimiter
from iam_grpc.core.risk import POINTS, RiskScores, limiter_hook
from iam_grpc.core.signup import SignupFlow
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.tokens.sessions import SessionManager, SessionPolicy
from iam_grpc.dependencies import Dependencies, ObservedTransport, ProbedDependency
from iam_grpc.errors import BackendUnavailable
from iam_grpc.geo import GeoLookup, geo_lookup
from iam_grpc.hibp import BreachedPasswords as BreachedPasswordsAdapter
from iam_grpc.hibp import breached_passwords
from iam_grpc.logging import component_logger
from iam_grpc.mail.render import MailRenderer
from iam_grpc.mail.transports import FileTransport, SmtpTransport
from iam_grpc.metrics import Metrics
from iam_grpc.ops_http import OpsHttpServer, Response
from iam_grpc.secret_material import ResolvedSecrets, resolve_secrets
from iam_grpc.server import ListenError, build_server, served_services
from iam_grpc.services.auth import AuthFlows
from iam_grpc.storage.memory import MemoryEphemeral, MemoryLimiterStore
from iam_grpc.storage.ports import Ephemeral, LimiterStore, MailError, MailTransport
from iam_grpc.storage.sql import schema
from iam_grpc.storage.sql.database import ACCESS_DENIED_CODES, SqlDatabase
from iam_grpc.ua import UserAgentParser

if TYPE_CHECKING:
    from iam_grpc.storage.redis import RedisEphemeral

__all__ = ["Application", "StartupError"]

log = component_logger("iam.app")

PROBE_INTERVAL = 5.0
PROBE_FAILURES = 3


class StartupError(Exception):
    """The service cannot start; the message names what to fix (never a secret)."""


@dataclass(frozen=True, slots=True)
class Addresses:
    grpc_port: int
    http_port: int | None


def give_back_startup_memory() -> None:
    """Once serving: collect what only startup needed (a migration's Alembic work, the parsed
    common-password list) and hand freed heap pages back to the system, so an idle replica's RSS
    is what serving needs (bench/README.md). Best effort, glibc only. (Alembic's modules stay
    imported: unloading them breaks a later migration in the same process.)"""
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class Application:
    """One service process. ``await start()``, then ``await stop()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        migrate_on_start: bool | None = None,
        probe_interval: float = PROBE_INTERVAL,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        self.worker = worker  # 0: the only process; 1..N: a pre-forked worker (iam_grpc.workers)
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.failpoints = Failpoints(settings.test_failpoints)
        self.health = health_aio.HealthServicer()
        self._migrate = settings.auto_migrate if migrate_on_start is None else migrate_on_start
        self.db: SqlDatabase | None = None
        self.ephemeral: Ephemeral | None = None
        self.secrets: ResolvedSecrets | None = None
        self.keys: KeyRing | None = None
        self.audit: AuditTrail | None = None
        self.limiter: RateLimiter | None = None
        self._fallback_memory: MemoryEphemeral | None = None
        self.renderer: MailRenderer | None = None
        self.transport: MailTransport | None = None
        self.sender: OutboxSender | None = None
        self.mailer: Mailer | None = None
        self.agents: UserAgentParser | None = None
        self.denylist: DenyList | None = None
        self.access: AccessTokens | None = None
        self.sessions: SessionManager | None = None
        self.cleanup: Cleanup | None = None
        self.hashing: PasswordHashing | None = None
        self.breached: BreachedPasswordsAdapter | None = None
        self.links: Links | None = None
        self.challenges: Challenges | None = None
        self.geo: GeoLookup | None = None
        self.risk: RiskScores | None = None
        self.mfa: MfaFlows | None = None
        self.flows: AuthFlows | None = None
        self.server: grpc.aio.Server | None = None
        self.http: OpsHttpServer | None = None
        self.grpc_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False
        self._draining = False
        self._stopped = asyncio.Event()
        self._probe_interval = probe_interval
        self._probe_failures = 0
        self.dependencies = Dependencies(self.metrics)
        self._probed: dict[str, ProbedDependency] = {}
        self._server_id: Callable[[], str] = lambda: ""
        self._redis: RedisEphemeral | None = None
        self._sql_answers = True

    # startup ----------------------------------------------------------------

    async def prepare(self) -> None:
        """Steps 1-4 only (database, migrations, first key), then close: the parent of workers."""
        try:
            await self._start_database()
            await self._start_secrets_and_keys()
        finally:
            await self._close_resources()

    async def start(self) -> None:
        started = time.monotonic()
        try:
            await self._start_database()
            await self._start_secrets_and_keys()
            await self._start_ephemeral()
            await self._start_accounts()
            await self._start_serving()
        except BaseException:
            if self.server is not None:
                await self.server.stop(0)
            await self._close_resources()
            raise
        give_back_startup_memory()
        log.bind(
            grpc=f"{self.settings.server.host}:{self.grpc_port}",
            http=f"{self.settings.http.host}:{self.http.port}" if self.http else None,
            mode=self.settings.mode,
            startup_ms=round((time.monotonic() - started) * 1000),
        ).info("serving")

    async def _start_database(self) -> None:
        s = self.settings.database
        self.db = SqlDatabase.from_url(
            s.url,
            pool_size=s.pool_size,
            max_overflow=s.max_overflow,
            pool_recycle=s.pool_recycle,
            pool_pre_ping=s.pool_pre_ping,
            connect_timeout=s.connect_timeout,
            statement_timeout=s.statement_timeout,
            on_statement=self.metrics.sql_statements.inc,
        )
        deadline = time.monotonic() + s.startup_wait.total_seconds()
        delay = 0.25
        while True:
            try:
                await self.db.ping()
                break
            except BackendUnavailable as exc:
                cause = exc.cause()
                if cause.get("driver_code") in ACCESS_DENIED_CODES:
                    raise StartupError(
                        f"database.url (IAM_DATABASE_URL): access denied or unknown database "
                        f"(MySQL error {cause['driver_code']}); check user, password and database name"
                    ) from None
                if time.monotonic() >= deadline:
                    raise StartupError(
                        "database.url: the database did not answer within database.startup_wait"
                    ) from None
                log.bind(**cause).warning("database not reachable yet; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        engine = self.db.engine
        head = schema.HEAD
        current = await schema.database_revision(engine)
        if current != head and self._migrate:
            from iam_grpc.storage.sql import migrate  # Alembic only when there is work for it

            try:
                await migrate.upgrade(engine)
            except migrate.MigrationLockTimeout:
                raise StartupError("another process held the migration lock for 60 s") from None
            current = await schema.database_revision(engine)
        if current != head:
            raise StartupError(
                f"database schema is at {current or 'empty'}, this version needs {head}: "
                "run `iam-grpc migrate` (or serve with --migrate)"
            )

    async def _start_secrets_and_keys(self) -> None:
        assert self.db is not None
        self.secrets = resolve_secrets(self.settings)
        tokens, keys = self.settings.tokens, self.settings.keys
        self.keys = KeyRing(
            self.db,
            self.secrets.material,
            self.clock,
            algorithm=tokens.algorithm,
            publish_ahead=keys.publish_ahead,
            retire_after=tokens.access_ttl + tokens.leeway + keys.jwks_max_age,
            rotation_interval=keys.rotation_interval,
        )
        try:
            await self.keys.reload()
            await self.keys.ensure_initial_key()
            await self.keys.reload()
            if self.keys.signing_key() is None:
                raise StartupError(
                    "no usable signing key: another replica holds keys:rotate; retry the start"
                )
        except KeysUnreadable as unreadable:
            where = "secrets.master_key" if "master key" in unreadable.why else "signing_keys table"
            raise StartupError(f"{where}: {unreadable}") from None

    async def _start_ephemeral(self) -> None:
        s = self.settings
        if s.redis.url:
            from iam_grpc.storage.redis import (
                RedisEphemeral,
                RedisLimiterStore,
            )  # redis-py only when configured

            store = RedisEphemeral(
                s.redis.url,
                prefix=s.redis.key_prefix,
                socket_timeout=s.redis.socket_timeout,
                connect_timeout=s.redis.connect_timeout,
            )
            self.ephemeral = store
            self._redis = store
            self._server_id = lambda: store.server_id
            deadline = time.monotonic() + s.database.startup_wait.total_seconds()
            while True:
                try:
                    await store.ping()
                    break
                except BackendUnavailable as exc:
                    if time.monotonic() >= deadline:
                        raise StartupError(
                            "redis.url: Redis did not answer within database.startup_wait"
                        ) from None
                    log.bind(**exc.cause()).warning("redis not reachable yet; retrying")
                    await asyncio.sleep(0.5)
            limits: LimiterStore = RedisLimiterStore(store)
            fallback: LimiterStore | None = None
            if s.ratelimit.on_store_failure == "local":
                self._fallback_memory = MemoryEphemeral(s.ephemeral.memory_max_keys, clock=self.clock)
                self._fallback_memory.start()
                fallback = MemoryLimiterStore(self._fallback_memory)
        else:
            memory = MemoryEphemeral(s.ephemeral.memory_max_keys, clock=self.clock)
            memory.start()
            self.ephemeral = memory
            limits, fallback = MemoryLimiterStore(memory), None
        assert self.db is not None
        assert self.secrets is not None
        self.audit = AuditTrail(self.db, self.clock, self.secrets.material)
        self.risk = RiskScores(self.ephemeral, self.secrets.material, self.clock)
        self.limiter = RateLimiter(
            limits,
            groups=s.ratelimit.resolved_groups(),
            material=self.secrets.material,
            clock=self.clock,
            metrics=self.metrics,
            fallback=fallback,
            exempt=s.ratelimit.exempt_networks(),
            audit=self.audit,
            enabled=s.ratelimit.enabled,
            on_refusal=limiter_hook(self.risk),
        )
        self._start_mail()
        self._start_tokens()
        async with self.db.transaction() as tx:
            await tx.users.ensure_roles(s.roles.default, self.clock.now())
        assert self.denylist is not None
        # A restarted in-process store or a flushed Redis forgets nothing: verified or rebuilt now.
        await self.denylist.start()

    def _start_tokens(self) -> None:
        s = self.settings
        assert self.db is not None
        assert self.ephemeral is not None
        assert self.secrets is not None
        assert self.keys is not None
        assert self.audit is not None
        assert self.mailer is not None
        assert self.limiter is not None
        self.agents = UserAgentParser(s.ua.cache_size)
        self.denylist = DenyList(
            self.ephemeral,
            self.db,
            self.clock,
            self.metrics,
            access_ttl=s.tokens.access_ttl,
            leeway=s.tokens.leeway,
            fallback=s.tokens.denylist_fallback,
            server_id=self._server_id,
        )
        cache = self.denylist.cache
        cache.listeners.append(lambda trusted: self.metrics.denylist_trusted.set(1 if trusted else 0))
        if self._redis is not None:
            # a restart or failover of Redis: the cache may lack entries until verified or rebuilt
            self._redis.server_listeners.append(lambda _run_id: cache.lost("store server changed"))
        self.access = AccessTokens(
            self.keys,
            self.denylist,
            self.clock,
            self.metrics,
            algorithm=s.tokens.algorithm,
            issuer=s.tokens.issuer,
            audience=s.tokens.audience,
            ttl=s.tokens.access_ttl,
            leeway=s.tokens.leeway,
        )
        self.sessions = SessionManager(
            self.db,
            self.ephemeral,
            self.secrets.material,
            self.clock,
            self.access,
            self.denylist,
            self.audit,
            self.mailer,
            self.limiter,
            self.agents,
            self.metrics,
            self.failpoints,
            SessionPolicy(
                access_ttl=s.tokens.access_ttl,
                absolute_ttl=s.refresh.absolute_ttl,
                idle_ttl=s.refresh.idle_ttl,
                grace=s.refresh.grace,
                reuse_mfa_hold=s.refresh.reuse_mfa_hold,
                max_per_user=s.sessions.max_per_user,
                trust_idle=s.devices.trust_idle,
            ),
        )

    async def _start_accounts(self) -> None:
        """Passwords (hashing pool and dummy hash), breach and domain checks, links, challenges and
        the account flows."""
        s = self.settings
        assert self.db is not None
        assert self.ephemeral is not None
        assert self.secrets is not None
        assert self.limiter is not None
        assert self.mailer is not None
        assert self.audit is not None
        assert self.sessions is not None
        assert self.access is not None
        assert self.agents is not None
        material = self.secrets.material
        pw = s.passwords
        self.hashing = PasswordHashing(
            Argon2Params(pw.memory_kib, pw.time_cost, pw.parallelism, pw.hash_len, pw.salt_len),
            self.secrets.peppers,
            self.secrets.current_pepper,
            max_concurrent=pw.max_concurrent_hashes,
            max_queued=pw.max_queued_hashes,
        )
        await self.hashing.start()
        hashing = self.hashing
        self.metrics.hashes.labels("running").set_function(lambda: hashing.stats()["running"])
        self.metrics.hashes.labels("queued").set_function(lambda: hashing.stats()["queued"])
        self.metrics.hashes_peak.labels("running").set_function(lambda: hashing.stats()["peak_running"])
        self.metrics.hashes_peak.labels("queued").set_function(lambda: hashing.stats()["peak_queued"])
        self.metrics.hashes_refused.labels("queue_full").set_function(lambda: hashing.stats()["refused"])
        self.metrics.hashes_refused.labels("deadline").set_function(lambda: hashing.stats()["abandoned"])
        try:
            common = CommonPasswords.load(pw.common_list)
        except (OSError, ValueError) as exc:
            raise StartupError(f"passwords.common_list: {exc}") from None
        try:
            self.breached = breached_passwords(
                s.hibp, on_failure=lambda kind: self.metrics.hibp_failures.labels(kind).inc()
            )
        except ValueError as exc:
            raise StartupError(f"hibp: {exc}") from None
        rules = PasswordRules(
            min_length=pw.min_length, max_length=pw.max_length, common=common, breached=self.breached
        )
        checks = s.email_checks
        lookup = None
        if checks.check_mx:
            from iam_grpc.dns import MailDomainLookup  # dnspython (~3 MB) only when MX checks are on

            lookup = MailDomainLookup(
                timeout=checks.mx_timeout,
                nameservers=checks.nameservers,
                on_unknown=lambda kind: self.metrics.mx_unknown.labels(kind).inc(),
            )
        domains = EmailDomainPolicy(
            disposable=checks.disposable,
            allow_domains=checks.allow_domains,
            deny_domains=checks.deny_domains,
            mail_lookup=lookup,
        )
        assert s.links.base_url is not None
        self.links = Links(
            material,
            self.ephemeral,
            self.clock,
            issuer=s.tokens.issuer,
            base_url=s.links.base_url,
            paths=s.links.paths.model_dump(),
        )
        try:
            self.geo = geo_lookup(s.geoip)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        observer = Observer(self.agents, self.geo)
        anomaly, devices = s.anomaly, s.devices
        learning = LearningPolicy(
            ipv4_prefix=anomaly.ipv4_prefix,
            ipv6_prefix=anomaly.ipv6_prefix,
            max_networks=devices.max_networks,
            network_memory=devices.network_memory,
            max_countries=devices.max_countries,
            proxy_allowance=anomaly.proxy_allowance,
        )
        self.challenges = Challenges(
            self.db,
            self.ephemeral,
            material,
            self.clock,
            self.mailer,
            self.links,
            ChallengePolicy(
                code_length=s.mfa.code_length,
                ttl=s.mfa.ttl,
                max_attempts=s.mfa.max_attempts,
                resend_interval=s.mfa.resend_interval,
                max_resends=s.mfa.max_resends,
                max_lifetime=s.mfa.max_lifetime,
                max_pending_per_user=s.mfa.max_pending_per_user,
            ),
            audit=self.audit,
        )
        self.sessions.sessions_ended = partial(end_session_challenges, self.ephemeral)
        assert self.risk is not None
        self.mfa = MfaFlows(
            self.db,
            self.ephemeral,
            material,
            self.clock,
            self.limiter,
            self.challenges,
            self.links,
            self.sessions,
            self.access,
            observer,
            self.risk,
            self.mailer,
            self.audit,
            policy=MfaPolicy(
                code_length=s.mfa.code_length,
                grant_ttl=s.step_up.grant_ttl,
                step_up_actions=tuple(s.step_up.actions),
                retry_window=s.refresh.grace,
            ),
            learning=learning,
            failpoints=self.failpoints,
        )
        anomaly_checks = AnomalyChecks(
            self.clock,
            self.challenges,
            self.mfa,
            self.sessions,
            observer,
            self.risk,
            self.limiter,
            self.audit,
            self.metrics,
            policy=AnomalyPolicy(
                actions={name: getattr(anomaly, name).action for name in CHECKS},
                tor_action=anomaly.tor.action,
                idle_after=anomaly.idle_after,
                max_sessions=anomaly.max_sessions,
                session_count_bypass=anomaly.session_count_bypass,
                burst_max=anomaly.burst_max,
                burst_window=anomaly.burst_window,
                asn_match=anomaly.asn_match,
                risk_threshold=anomaly.risk_threshold,
                travel_max_kmh=anomaly.travel_max_kmh,
                travel_min_km=anomaly.travel_min_km,
            ),
            learning=learning,
        )
        if any(getattr(anomaly, name).action != "off" for name in CHECKS):
            self.sessions.refresh_check = (
                anomaly_checks  # with every check off, Refresh does not pay for the seam
            )
        risk = self.risk

        async def risk_event(event: str, client: ClientInfo) -> None:
            ip_points, device_points = POINTS[event]
            await risk.add(
                ip=client.ip,
                device_id=client.device_id or None,
                ip_points=ip_points,
                device_points=device_points,
            )

        self.sessions.risk_event = risk_event
        common_args = (self.db, self.clock, self.failpoints)
        self.flows = AuthFlows(
            signup=SignupFlow(
                *common_args,
                self.limiter,
                rules,
                domains,
                self.hashing,
                self.sessions,
                self.audit,
                observer,
                default_roles=s.roles.default,
                learning=learning,
            ),
            login=LoginFlow(
                *common_args,
                self.limiter,
                rules,
                self.hashing,
                self.sessions,
                self.challenges,
                self.mfa,
                self.mailer,
                observer,
                self.risk,
                self.audit,
                self.metrics,
                mfa_on_new_device=s.login.mfa_on_new_device,
                risk_threshold=anomaly.risk_threshold,
                travel_min_km=anomaly.travel_min_km,
                travel_max_kmh=anomaly.travel_max_kmh,
                learning=learning,
            ),
            reset=PasswordReset(
                *common_args,
                material,
                self.limiter,
                rules,
                self.hashing,
                self.sessions,
                self.links,
                self.mailer,
                self.agents,
                self.audit,
                link_ttl=s.links.password_reset_ttl,
                response_floor=s.reset.response_floor,
                untrust_devices=s.reset.untrust_devices,
            ),
            password=PasswordChange(
                *common_args,
                self.limiter,
                self.access,
                rules,
                self.hashing,
                self.sessions,
                self.mailer,
                self.agents,
                self.audit,
            ),
            email=EmailChange(
                *common_args,
                material,
                self.limiter,
                self.access,
                domains,
                self.sessions,
                self.links,
                self.mailer,
                self.agents,
                self.audit,
                link_ttl=s.links.email_change_ttl,
                max_auth_age=s.email_change.max_auth_age,
                response_floor=s.reset.response_floor,
            ),
        )

    def _start_mail(self) -> None:
        s = self.settings
        assert self.db is not None
        assert self.secrets is not None
        assert self.limiter is not None
        material = self.secrets.material
        self.renderer = MailRenderer(
            material=material,
            from_address=s.mail.from_address,
            from_name=s.mail.from_name,
            site_name=s.mail.site_name,
            support_url=s.mail.support_url,
            templates_dir=s.mail.templates_dir,
        )
        smtp = s.mail.smtp
        self.transport = (
            ObservedTransport(
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
            if smtp.host
            else FileTransport(s.outbox_dir)
        )
        self.sender = OutboxSender(
            self.db,
            self.transport,
            self.renderer,
            material,
            self.clock,
            self.metrics,
            batch=s.mail.batch,
            poll_interval=s.mail.poll_interval,
            retry_backoff=s.mail.retry_backoff,
            max_attempts=s.mail.max_attempts,
            max_per_minute=s.mail.max_per_minute,
        )
        self.mailer = Mailer(
            self.limiter, material, self.clock, default_locale=s.mail.default_locale, wake=self.sender.wake
        )

    async def _start_serving(self) -> None:
        s = self.settings
        for name in ("", *served_services(self.settings)):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.server, self.grpc_port = build_server(self, s)
        except ListenError as exc:
            raise StartupError(str(exc)) from None
        await self.server.start()
        if s.http.enabled:
            # Pre-forked worker k listens on http.port + k - 1, so each can be scraped on its own.
            http_port = s.http.port + self.worker - 1 if self.worker and s.http.port else s.http.port
            self.http = OpsHttpServer(
                {
                    "/healthz": self._healthz,
                    "/metrics": self._metrics_route,
                    "/.well-known/jwks.json": self._jwks,
                },
                s.http.host,
                http_port,
            )
            try:
                await self.http.start()
            except OSError:
                where = join_host_port(s.http.host, http_port)
                raise StartupError(
                    f"http.host/http.port (IAM_HTTP_LISTEN): cannot listen on {where}"
                ) from None
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._probe_loop(), name="health-probe"))
        assert self.keys is not None
        assert self.denylist is not None
        self._tasks.append(loop.create_task(self._every(s.keys.reload_interval, self.keys.maintain, "keys")))
        self._tasks.append(
            loop.create_task(self._every(s.tokens.denylist_replay, self.denylist.replay, "deny-list"))
        )
        assert self.db is not None
        assert self.ephemeral is not None
        self.cleanup = Cleanup(
            self.db,
            self.ephemeral,
            self.clock,
            CleanupPolicy(
                reuse_memory=s.refresh.reuse_memory,
                audit_retention=s.audit.retention,
                batch=s.cleanup.batch,
            ),
        )
        self._tasks.append(loop.create_task(self._every(s.cleanup.interval, self.cleanup.run, "cleanup")))
        if self.transport is not None:
            try:
                await self.transport.check()
            except MailError as exc:
                log.bind(error=exc.summary).warning("mail transport not reachable; mail waits in the outbox")
        if self.sender is not None:
            self.sender.start()
        self._track_dependencies()
        await self._set_serving(True)

    def _track_dependencies(self) -> None:
        """What /healthz and iam_dependency_state report (iam_grpc.dependencies)."""
        assert self.db is not None
        assert self.denylist is not None
        self._probed["sql"] = sql = ProbedDependency(self.db.breaker)
        self.dependencies.track("sql", sql.state)
        if self._redis is not None:
            cache = self.denylist.cache
            self._probed["ephemeral"] = redis = ProbedDependency(
                self._redis.breaker, trusted=lambda: cache.trusted
            )
            self.dependencies.track("redis", redis.state)
        if isinstance(self.transport, ObservedTransport):
            self.dependencies.track("smtp", self.transport.state)

    # health ------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self._serving and not self._draining

    async def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *served_services(self.settings)):
            await self.health.set(name, status)
        self.metrics.serving.set(1 if self.serving else 0)

    async def check_stores(self) -> bool:
        """Probe SQL and the ephemeral store; True when both answer."""
        ok = True
        for store, probe in (("sql", self.db), ("ephemeral", self.ephemeral)):
            if probe is None:
                continue
            try:
                async with asyncio.timeout(2.0):
                    await probe.ping()
                answered = True
            except (BackendUnavailable, TimeoutError):
                self.metrics.store_failures.labels(store).inc()
                log.bind(store=store).warning("store health probe failed")
                answered = ok = False
            if store == "sql":
                self._sql_answers = answered
            if store in self._probed:
                self._probed[store].probed(answered)
        return ok

    async def _probe_loop(self) -> None:
        while not self._draining:
            await asyncio.sleep(self._probe_interval)
            await self.probe_once()

    async def probe_once(self) -> None:
        """One health probe: three SQL failures in a row mean NOT_SERVING, one success SERVING
        again. The ephemeral store does not count: without it every RPC still answers correctly
        from its documented fallback (SQL deny-list, local limits), and taking every replica out of
        the balancer because a shared Redis blinked would turn a degradation into an outage."""
        await self.check_stores()
        healthy = self._sql_answers
        if self._draining:
            return
        if healthy:
            self._probe_failures = 0
            if not self._serving:
                log.info("stores answer again; serving")
                await self._set_serving(True)
            return
        self._probe_failures += 1
        if self._probe_failures >= PROBE_FAILURES and self._serving:
            log.error("database failing; reporting NOT_SERVING")
            await self._set_serving(False)

    async def _every(self, interval: timedelta, job: Callable[[], Awaitable[object]], name: str) -> None:
        """Run ``job`` every ``interval`` (with up to 20% random jitter) until stopped."""
        seconds = max(interval.total_seconds(), 0.05)
        while not self._draining:
            await asyncio.sleep(seconds * (1 + random.random() * 0.2))  # noqa: S311 - spreading load, not security
            try:
                await job()
            except BackendUnavailable:
                log.bind(job=name).warning("background job could not reach a store")
            except Exception:
                log.bind(job=name).exception("background job failed")

    async def _jwks(self) -> Response:
        assert self.keys is not None
        body = json.dumps(self.keys.jwks(), separators=(",", ":")).encode()
        max_age = int(self.settings.keys.jwks_max_age.total_seconds())
        return Response(
            200,
            body,
            content_type="application/jwk-set+json",
            headers=(("cache-control", f"public, max-age={max_age}"),),
        )

    async def _healthz(self) -> Response:
        status = "SERVING" if self.serving else "NOT_SERVING"
        body = {"status": status, "dependencies": self.dependencies.states()}
        return Response(200 if self.serving else 503, json.dumps(body).encode())

    async def _metrics_route(self) -> Response:
        return Response(200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    # shutdown ----------------------------------------------------------------

    async def stop(self, *, drain_delay: timedelta | None = None, grace: timedelta | None = None) -> None:
        """Drain: NOT_SERVING, wait for balancers, let calls in flight finish, close everything."""
        if self._stopped.is_set() or self._draining:
            return
        self._draining = True
        for task in self._tasks:
            task.cancel()
        await self._set_serving(False)
        delay = self.settings.shutdown.drain_delay if drain_delay is None else drain_delay
        if delay.total_seconds() > 0:
            log.bind(seconds=delay.total_seconds()).info("draining")
            await asyncio.sleep(delay.total_seconds())
        if self.server is not None:
            limit = self.settings.shutdown.grace if grace is None else grace
            await self.server.stop(limit.total_seconds())
        if self.sender is not None:
            await self.sender.stop()
        if self.audit is not None:
            await self.audit.drain()
        await self._close_resources()
        self._stopped.set()
        log.info("stopped")

    async def _close_resources(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.denylist is not None:
            with contextlib.suppress(Exception):
                await self.denylist.close()
        for store in (self.ephemeral, self._fallback_memory):
            if store is not None:
                with contextlib.suppress(Exception):
                    await store.close()
        if self.hashing is not None:
            with contextlib.suppress(Exception):
                await self.hashing.close()
        if self.geo is not None:
            self.geo.close()
        if self.breached is not None:
            with contextlib.suppress(Exception):
                await self.breached.close()
        if self.db is not None:
            with contextlib.suppress(Exception):
                await self.db.close()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

"""Builders of the account side: sessions and Refresh, passwords, email checks, links,
challenges and MFA, the anomaly checks, and the account flows (the same contract as
``iam_grpc.wiring.builders``: settings, stores, the runtime or clock, then named components)."""

from __future__ import annotations

from functools import partial

from iam_grpc.config import Settings
from iam_grpc.core.anomalies import CHECKS, AnomalyChecks, AnomalyPolicy
from iam_grpc.core.challenges import ChallengePolicy, Challenges, end_session_challenges
from iam_grpc.core.client import AgentParser
from iam_grpc.core.common_passwords import CommonPasswords
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.email_change import EmailChange, EmailChangePolicy
from iam_grpc.core.email_domains import EmailDomainPolicy
from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.links import Links
from iam_grpc.core.login import LoginFlow, LoginPolicy
from iam_grpc.core.mfa.codes import ChallengeCodes, CodePolicy
from iam_grpc.core.mfa.completion import ChallengeCompletion
from iam_grpc.core.mfa.magic_links import MagicLinks
from iam_grpc.core.mfa.step_up import StepUp, StepUpPolicy
from iam_grpc.core.mfa.totp import TotpFactors
from iam_grpc.core.observation import LearningPolicy, Observer
from iam_grpc.core.password_change import PasswordChange
from iam_grpc.core.password_reset import PasswordReset, ResetPolicy
from iam_grpc.core.password_rules import BreachedPasswords, PasswordRules
from iam_grpc.core.passwords import Argon2Params, PasswordHashing
from iam_grpc.core.risk import RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.signup import SignupFlow, SignupPolicy
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.tokens.refresh import RefreshPolicy, RefreshRotation
from iam_grpc.core.tokens.rotation import SessionPolicy, SessionTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.geo import GeoLookup, geo_lookup
from iam_grpc.hibp import BreachedPasswords as BreachAdapter
from iam_grpc.hibp import breached_passwords
from iam_grpc.metrics import Metrics
from iam_grpc.secret_material import ResolvedSecrets
from iam_grpc.wiring.errors import StartupError
from iam_grpc.wiring.stores import Stores

__all__ = [
    "build_anomalies",
    "build_breached",
    "build_challenge_codes",
    "build_challenges",
    "build_completion",
    "build_email_change",
    "build_email_domains",
    "build_geo",
    "build_hashing",
    "build_learning",
    "build_links",
    "build_login",
    "build_magic_links",
    "build_observer",
    "build_password_change",
    "build_password_reset",
    "build_password_rules",
    "build_refresh",
    "build_session_tokens",
    "build_sessions",
    "build_signup",
    "build_step_up",
]


# sessions and Refresh -------------------------------------------------------------------------


def _session_policy(settings: Settings) -> SessionPolicy:
    return SessionPolicy(
        absolute_ttl=settings.refresh.absolute_ttl,
        idle_ttl=settings.refresh.idle_ttl,
        max_per_user=settings.sessions.max_per_user,
        trust_idle=settings.devices.trust_idle,
    )


def build_session_tokens(
    settings: Settings, runtime: Runtime, material: SecretMaterial, access: AccessTokens
) -> SessionTokens:
    return SessionTokens(runtime, material, access, _session_policy(settings))


def build_sessions(
    settings: Settings,
    stores: Stores,
    runtime: Runtime,
    tokens: SessionTokens,
    agents: AgentParser,
    denylist: DenyList,
) -> Sessions:
    """Revoking a session ends its pending challenges, in the shared store."""
    ended = partial(end_session_challenges, stores.ephemeral)
    return Sessions(runtime, tokens, agents, denylist, ended, _session_policy(settings))


def build_refresh(
    settings: Settings,
    stores: Stores,
    runtime: Runtime,
    tokens: SessionTokens,
    sessions: Sessions,
    agents: AgentParser,
    risk: RiskScores,
    anomalies: AnomalyChecks | None,
) -> RefreshRotation:
    policy = RefreshPolicy(grace=settings.refresh.grace, reuse_mfa_hold=settings.refresh.reuse_mfa_hold)
    return RefreshRotation(runtime, stores.ephemeral, tokens, sessions, agents, risk, policy, check=anomalies)


# passwords and email addresses --------------------------------------------------------------------


def build_hashing(settings: Settings, secrets: ResolvedSecrets, metrics: Metrics) -> PasswordHashing:
    """The argon2 pool (its dummy hash is computed when it opens), reported as gauges."""
    pw = settings.passwords
    hashing = PasswordHashing(
        Argon2Params(pw.memory_kib, pw.time_cost, pw.parallelism, pw.hash_len, pw.salt_len),
        secrets.peppers,
        secrets.current_pepper,
        max_concurrent=pw.max_concurrent_hashes,
        max_queued=pw.max_queued_hashes,
    )
    metrics.hashes.labels("running").set_function(lambda: hashing.stats()["running"])
    metrics.hashes.labels("queued").set_function(lambda: hashing.stats()["queued"])
    metrics.hashes_peak.labels("running").set_function(lambda: hashing.stats()["peak_running"])
    metrics.hashes_peak.labels("queued").set_function(lambda: hashing.stats()["peak_queued"])
    metrics.hashes_refused.labels("queue_full").set_function(lambda: hashing.stats()["refused"])
    metrics.hashes_refused.labels("deadline").set_function(lambda: hashing.stats()["abandoned"])
    return hashing


def build_breached(settings: Settings, metrics: Metrics) -> BreachAdapter:
    try:
        return breached_passwords(
            settings.hibp, on_failure=lambda kind: metrics.hibp_failures.labels(kind).inc()
        )
    except ValueError as exc:
        raise StartupError(f"hibp: {exc}") from None


def build_password_rules(settings: Settings, breached: BreachedPasswords) -> PasswordRules:
    pw = settings.passwords
    try:
        common = CommonPasswords.load(pw.common_list)
    except (OSError, ValueError) as exc:
        raise StartupError(f"passwords.common_list: {exc}") from None
    return PasswordRules(min_length=pw.min_length, max_length=pw.max_length, common=common, breached=breached)


def build_email_domains(settings: Settings, metrics: Metrics) -> EmailDomainPolicy:
    checks = settings.email_checks
    lookup = None
    if checks.check_mx:
        from iam_grpc.dns import MailDomainLookup  # dnspython (~3 MB) only when MX checks are on

        lookup = MailDomainLookup(
            timeout=checks.mx_timeout,
            nameservers=checks.nameservers,
            on_unknown=lambda kind: metrics.mx_unknown.labels(kind).inc(),
        )
    return EmailDomainPolicy(
        disposable=checks.disposable,
        allow_domains=checks.allow_domains,
        deny_domains=checks.deny_domains,
        mail_lookup=lookup,
    )


# what a request's client is ---------------------------------------------------------------------


def build_geo(settings: Settings) -> GeoLookup:
    try:
        return geo_lookup(settings.geoip)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def build_observer(settings: Settings, agents: AgentParser, geo: GeoLookup) -> Observer:
    return Observer(agents, geo)


def build_learning(settings: Settings) -> LearningPolicy:
    anomaly, devices = settings.anomaly, settings.devices
    return LearningPolicy(
        ipv4_prefix=anomaly.ipv4_prefix,
        ipv6_prefix=anomaly.ipv6_prefix,
        max_networks=devices.max_networks,
        network_memory=devices.network_memory,
        max_countries=devices.max_countries,
        proxy_allowance=anomaly.proxy_allowance,
    )


# links, challenges, MFA -----------------------------------------------------------------------------


def build_links(settings: Settings, stores: Stores, runtime: Runtime, material: SecretMaterial) -> Links:
    assert settings.links.base_url is not None  # settings fill it in from the listen address
    return Links(
        material,
        stores.ephemeral,
        runtime.clock,
        issuer=settings.tokens.issuer,
        base_url=settings.links.base_url,
        paths=settings.links.paths.model_dump(),
    )


def build_challenges(
    settings: Settings, stores: Stores, runtime: Runtime, material: SecretMaterial, links: Links
) -> Challenges:
    mfa = settings.mfa
    policy = ChallengePolicy(
        code_length=mfa.code_length,
        ttl=mfa.ttl,
        max_attempts=mfa.max_attempts,
        resend_interval=mfa.resend_interval,
        max_resends=mfa.max_resends,
        max_lifetime=mfa.max_lifetime,
        max_pending_per_user=mfa.max_pending_per_user,
        email_with_totp=mfa.email_with_totp,
    )
    return Challenges(
        runtime.db,
        stores.ephemeral,
        material,
        runtime.clock,
        runtime.mailer,
        links,
        policy,
        audit=runtime.audit,
    )


def build_step_up(
    settings: Settings,
    stores: Stores,
    runtime: Runtime,
    material: SecretMaterial,
    access: AccessTokens,
    challenges: Challenges,
    observer: Observer,
) -> StepUp:
    policy = StepUpPolicy(grant_ttl=settings.step_up.grant_ttl, actions=tuple(settings.step_up.actions))
    return StepUp(runtime, stores.ephemeral, material, access, challenges, observer, policy)


def build_completion(
    settings: Settings,
    runtime: Runtime,
    sessions: Sessions,
    tokens: SessionTokens,
    step_up: StepUp,
    risk: RiskScores,
    learning: LearningPolicy,
) -> ChallengeCompletion:
    return ChallengeCompletion(runtime, sessions, tokens, step_up, risk, learning)


def build_challenge_codes(
    settings: Settings,
    stores: Stores,
    runtime: Runtime,
    material: SecretMaterial,
    challenges: Challenges,
    completion: ChallengeCompletion,
    sessions: Sessions,
    observer: Observer,
    risk: RiskScores,
    factors: TotpFactors | None = None,
) -> ChallengeCodes:
    policy = CodePolicy(code_length=settings.mfa.code_length, retry_window=settings.refresh.grace)
    return ChallengeCodes(
        runtime, stores.ephemeral, material, challenges, completion, sessions, observer, risk, policy, factors
    )


def build_magic_links(
    settings: Settings,
    runtime: Runtime,
    material: SecretMaterial,
    links: Links,
    challenges: Challenges,
    completion: ChallengeCompletion,
    observer: Observer,
    verification: EmailVerification | None = None,
) -> MagicLinks:
    return MagicLinks(runtime, material, links, challenges, completion, observer, verification)


def build_anomalies(
    settings: Settings,
    runtime: Runtime,
    challenges: Challenges,
    completion: ChallengeCompletion,
    sessions: Sessions,
    observer: Observer,
    risk: RiskScores,
    learning: LearningPolicy,
) -> AnomalyChecks | None:
    """The Refresh anomaly checks; None with every check off, so Refresh does not pay for the seam."""
    anomaly = settings.anomaly
    if all(getattr(anomaly, name).action == "off" for name in CHECKS):
        return None
    policy = AnomalyPolicy(
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
    )
    return AnomalyChecks(
        runtime, challenges, completion, sessions, observer, risk, policy=policy, learning=learning
    )


# the account flows ------------------------------------------------------------------------------------


def build_signup(
    settings: Settings,
    runtime: Runtime,
    rules: PasswordRules,
    hashing: PasswordHashing,
    domains: EmailDomainPolicy,
    sessions: Sessions,
    observer: Observer,
    learning: LearningPolicy,
    verification: EmailVerification | None = None,
) -> SignupFlow:
    policy = SignupPolicy(default_roles=tuple(settings.roles.default), learning=learning)
    return SignupFlow(runtime, rules, hashing, domains, sessions, observer, policy, verification)


def build_login(
    settings: Settings,
    runtime: Runtime,
    rules: PasswordRules,
    hashing: PasswordHashing,
    sessions: Sessions,
    challenges: Challenges,
    completion: ChallengeCompletion,
    observer: Observer,
    risk: RiskScores,
    learning: LearningPolicy,
) -> LoginFlow:
    anomaly = settings.anomaly
    policy = LoginPolicy(
        mfa_on_new_device=settings.login.mfa_on_new_device,
        require_verified_email=settings.email_verification.required,
        risk_threshold=anomaly.risk_threshold,
        travel_min_km=anomaly.travel_min_km,
        travel_max_kmh=anomaly.travel_max_kmh,
        learning=learning,
    )
    return LoginFlow(runtime, rules, hashing, sessions, challenges, completion, observer, risk, policy)


def build_password_reset(
    settings: Settings,
    runtime: Runtime,
    material: SecretMaterial,
    rules: PasswordRules,
    hashing: PasswordHashing,
    sessions: Sessions,
    links: Links,
    agents: AgentParser,
) -> PasswordReset:
    policy = ResetPolicy(
        link_ttl=settings.links.password_reset_ttl,
        response_floor=settings.reset.response_floor,
        untrust_devices=settings.reset.untrust_devices,
    )
    return PasswordReset(runtime, material, rules, hashing, sessions, links, agents, policy)


def build_password_change(
    settings: Settings,
    runtime: Runtime,
    access: AccessTokens,
    rules: PasswordRules,
    hashing: PasswordHashing,
    sessions: Sessions,
    agents: AgentParser,
) -> PasswordChange:
    return PasswordChange(runtime, access, rules, hashing, sessions, agents)


def build_email_change(
    settings: Settings,
    runtime: Runtime,
    material: SecretMaterial,
    access: AccessTokens,
    domains: EmailDomainPolicy,
    sessions: Sessions,
    links: Links,
    agents: AgentParser,
) -> EmailChange:
    policy = EmailChangePolicy(
        link_ttl=settings.links.email_change_ttl,
        max_auth_age=settings.email_change.max_auth_age,
        response_floor=settings.reset.response_floor,
    )
    return EmailChange(runtime, material, access, domains, sessions, links, agents, policy)

"""The object graph of one service process, built whole (:func:`build_components`) into a frozen
:class:`Components`.

Every component is built by one typed function of ``iam_grpc.wiring.builders`` or
``iam_grpc.wiring.accounts``, from the settings, the opened stores, the clock and the components
it names; nothing is set on a component after it is built. The server registers servicers over
these fields (``iam_grpc.server``), the CLI's admin use-cases build the few they need with the
same functions (``iam_grpc.admin``), and ``iam_grpc.app`` opens the ones that hold resources.
"""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.clock import Clock
from iam_grpc.config import Settings
from iam_grpc.core.anomalies import AnomalyChecks
from iam_grpc.core.api_tokens import ApiTokens
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.challenges import Challenges
from iam_grpc.core.cleanup import Cleanup
from iam_grpc.core.email_change import EmailChange
from iam_grpc.core.email_verification import EmailVerification
from iam_grpc.core.event_stream import EventStream
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.keys import KeyRing
from iam_grpc.core.links import Links
from iam_grpc.core.login import LoginFlow
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.mail.sender import OutboxSender
from iam_grpc.core.mfa.codes import ChallengeCodes
from iam_grpc.core.mfa.completion import ChallengeCompletion
from iam_grpc.core.mfa.magic_links import MagicLinks
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.mfa.totp import TotpFactors
from iam_grpc.core.mfa.totp_enrollment import TotpEnrollment
from iam_grpc.core.password_change import PasswordChange
from iam_grpc.core.password_reset import PasswordReset
from iam_grpc.core.passwords import PasswordHashing
from iam_grpc.core.profiles import Profiles
from iam_grpc.core.ratelimit import RateLimiter
from iam_grpc.core.risk import RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.signup import SignupFlow
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.tokens.refresh import RefreshRotation
from iam_grpc.core.tokens.rotation import SessionTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.geo import GeoLookup
from iam_grpc.hibp import BreachedPasswords
from iam_grpc.mail.render import MailRenderer
from iam_grpc.metrics import Metrics
from iam_grpc.secret_material import ResolvedSecrets
from iam_grpc.storage.ports import Ephemeral, MailTransport
from iam_grpc.storage.sql.database import SqlDatabase
from iam_grpc.ua import UserAgentParser
from iam_grpc.wiring import accounts as a
from iam_grpc.wiring import builders as b
from iam_grpc.wiring import directory as d
from iam_grpc.wiring import factors as f
from iam_grpc.wiring.events import EventParts, build_events
from iam_grpc.wiring.signin import SignInMethods, build_sign_in_methods
from iam_grpc.wiring.stores import Stores

__all__ = ["Components", "build_components"]


@dataclass(frozen=True, slots=True)
class Components:
    """Everything a running service is made of, in build order."""

    settings: Settings
    clock: Clock
    metrics: Metrics
    failpoints: Failpoints
    secrets: ResolvedSecrets
    stores: Stores
    keys: KeyRing
    # audit, limits, mail
    audit: AuditTrail
    risk: RiskScores
    limiter: RateLimiter
    renderer: MailRenderer
    transport: MailTransport
    sender: OutboxSender
    mailer: Mailer
    runtime: Runtime
    # tokens and sessions
    agents: UserAgentParser
    denylist: DenyList
    access: AccessTokens
    tokens: SessionTokens
    sessions: Sessions
    # passwords, email addresses, clients
    hashing: PasswordHashing
    breached: BreachedPasswords
    geo: GeoLookup
    links: Links
    # challenges and MFA
    challenges: Challenges
    step_up: StepUp
    completion: ChallengeCompletion
    codes: ChallengeCodes
    magic_links: MagicLinks
    totp_factors: TotpFactors
    totp_enrollment: TotpEnrollment
    verification: EmailVerification
    # Refresh and the account flows
    anomalies: AnomalyChecks | None  # None when every check is off
    refresh: RefreshRotation
    signup: SignupFlow
    login: LoginFlow
    password_reset: PasswordReset
    password_change: PasswordChange
    email_change: EmailChange
    sign_in: SignInMethods  # passkeys, other providers' ID tokens
    # maintenance
    cleanup: Cleanup
    # the user directory and personal API tokens
    api_tokens: ApiTokens
    profiles: Profiles
    # the event stream (WatchEvents) and its push sinks
    events: EventStream
    event_sinks: EventParts

    @property
    def db(self) -> SqlDatabase:
        return self.stores.db

    @property
    def ephemeral(self) -> Ephemeral:
        return self.stores.ephemeral


def build_components(
    settings: Settings,
    stores: Stores,
    clock: Clock,
    *,
    secrets: ResolvedSecrets,
    keys: KeyRing,
    metrics: Metrics,
    failpoints: Failpoints,
) -> Components:
    """The whole graph over opened stores and loaded keys, each component after those it takes.
    No I/O but reading configured files (the common-password list, the GeoIP databases); raises
    StartupError for a setting that cannot be used."""
    material = secrets.material
    audit = b.build_audit(settings, stores, clock, material)
    risk = b.build_risk(settings, stores, clock, material)
    limiter = b.build_limiter(settings, stores, clock, material, metrics, audit, risk)
    renderer = b.build_mail_renderer(settings, material)
    transport = b.build_mail_transport(settings)
    sender = b.build_outbox_sender(settings, stores, clock, transport, renderer, material, metrics)
    mailer = b.build_mailer(settings, clock, limiter, material, sender)
    run = Runtime(stores.db, clock, audit, mailer, limiter, metrics, failpoints)

    agents = b.build_agents(settings)
    denylist = b.build_denylist(settings, stores, clock, metrics)
    access = b.build_access(settings, clock, keys, denylist, metrics)
    tokens = a.build_session_tokens(settings, run, material, access)
    sessions = a.build_sessions(settings, stores, run, tokens, agents, denylist)

    hashing = a.build_hashing(settings, secrets, metrics)
    breached = a.build_breached(settings, metrics)
    rules = a.build_password_rules(settings, breached)
    domains = a.build_email_domains(settings, metrics)
    geo = a.build_geo(settings)
    observer = a.build_observer(settings, agents, geo)
    learning = a.build_learning(settings)
    links = a.build_links(settings, stores, run, material)

    challenges = a.build_challenges(settings, stores, run, material, links)
    step_up = a.build_step_up(settings, stores, run, material, access, challenges, observer)
    completion = a.build_completion(settings, run, sessions, tokens, step_up, risk, learning)
    totp_factors = f.build_totp_factors(settings, run, material)
    codes = a.build_challenge_codes(
        settings, stores, run, material, challenges, completion, sessions, observer, risk, totp_factors
    )
    verification = f.build_email_verification(settings, run, material, access, links)
    magic_links = a.build_magic_links(
        settings, run, material, links, challenges, completion, observer, verification
    )
    anomalies = a.build_anomalies(settings, run, challenges, completion, sessions, observer, risk, learning)
    login = a.build_login(
        settings, run, rules, hashing, sessions, challenges, completion, observer, risk, learning
    )
    sign_in = build_sign_in_methods(
        settings,
        stores,
        run,
        material,
        access,
        sessions,
        login,
        challenges,
        completion,
        observer,
        risk,
        learning,
    )
    event_parts = build_events(settings, stores, clock)
    return Components(
        settings=settings,
        clock=clock,
        metrics=metrics,
        failpoints=failpoints,
        secrets=secrets,
        stores=stores,
        keys=keys,
        audit=audit,
        risk=risk,
        limiter=limiter,
        renderer=renderer,
        transport=transport,
        sender=sender,
        mailer=mailer,
        runtime=run,
        agents=agents,
        denylist=denylist,
        access=access,
        tokens=tokens,
        sessions=sessions,
        hashing=hashing,
        breached=breached,
        geo=geo,
        links=links,
        challenges=challenges,
        step_up=step_up,
        completion=completion,
        codes=codes,
        magic_links=magic_links,
        totp_factors=totp_factors,
        verification=verification,
        totp_enrollment=f.build_totp_enrollment(stores, run, access, step_up, totp_factors),
        anomalies=anomalies,
        refresh=a.build_refresh(settings, stores, run, tokens, sessions, agents, risk, anomalies),
        signup=a.build_signup(
            settings, run, rules, hashing, domains, sessions, observer, learning, verification
        ),
        login=login,
        password_reset=a.build_password_reset(
            settings, run, material, rules, hashing, sessions, links, agents
        ),
        password_change=a.build_password_change(settings, run, access, rules, hashing, sessions, agents),
        email_change=a.build_email_change(settings, run, material, access, domains, sessions, links, agents),
        sign_in=sign_in,
        cleanup=b.build_cleanup(settings, stores, clock),
        api_tokens=d.build_api_tokens(settings, run, material, access, denylist),
        profiles=d.build_profiles(run, access, step_up, d.build_user_access(stores, run, denylist)),
        events=event_parts.stream,
        event_sinks=event_parts,
    )

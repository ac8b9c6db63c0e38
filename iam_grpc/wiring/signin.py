"""Builders of the sign-in methods beyond the password: passkeys and other providers' ID tokens."""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.config import Settings
from iam_grpc.core.challenges import Challenges
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.federated import FederatedPolicy, FederatedSignIn
from iam_grpc.core.login import LoginFlow
from iam_grpc.core.mfa.completion import ChallengeCompletion
from iam_grpc.core.observation import LearningPolicy, Observer
from iam_grpc.core.passkey_login import PasskeyLogin
from iam_grpc.core.passkeys import PasskeyPolicy, PasskeyRegistry
from iam_grpc.core.risk import RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.oidc import OidcVerifier
from iam_grpc.wiring.stores import Stores

__all__ = ["SignInMethods", "build_sign_in_methods"]


@dataclass(frozen=True, slots=True)
class SignInMethods:
    passkeys: PasskeyRegistry
    passkey_login: PasskeyLogin
    federated: FederatedSignIn


def build_passkey_policy(settings: Settings) -> PasskeyPolicy:
    webauthn = settings.webauthn
    return PasskeyPolicy(
        rp_id=webauthn.rp_id,
        rp_name=webauthn.rp_name,
        origins=tuple(webauthn.origins),
        ceremony_ttl=webauthn.ceremony_ttl,
        max_per_user=webauthn.max_per_user,
        max_auth_age=settings.email_change.max_auth_age,
    )


def build_sign_in_methods(
    settings: Settings,
    stores: Stores,
    runtime: Runtime,
    material: SecretMaterial,
    access: AccessTokens,
    sessions: Sessions,
    login: LoginFlow,
    challenges: Challenges,
    completion: ChallengeCompletion,
    observer: Observer,
    risk: RiskScores,
    learning: LearningPolicy,
) -> SignInMethods:
    policy = build_passkey_policy(settings)
    federated = FederatedPolicy(
        default_roles=tuple(settings.roles.default),
        learning=learning,
        max_auth_age=settings.email_change.max_auth_age,
        leeway=settings.oidc.leeway,
    )
    return SignInMethods(
        passkeys=PasskeyRegistry(runtime, stores.ephemeral, access, policy),
        passkey_login=PasskeyLogin(
            runtime, stores.ephemeral, material, login, challenges, completion, observer, risk, policy
        ),
        federated=FederatedSignIn(
            runtime,
            stores.ephemeral,
            OidcVerifier(settings.oidc),
            access,
            sessions,
            login,
            observer,
            federated,
        ),
    )

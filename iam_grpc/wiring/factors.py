"""Builders of second factors kept in SQL (TOTP and its enrollment) and of email verification."""

from __future__ import annotations

from iam_grpc.config import Settings
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.email_verification import EmailVerification, VerificationPolicy
from iam_grpc.core.links import Links
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.mfa.totp import TotpFactors, TotpPolicy
from iam_grpc.core.mfa.totp_enrollment import TotpEnrollment
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.wiring.stores import Stores

__all__ = ["build_email_verification", "build_totp_enrollment", "build_totp_factors"]


def build_totp_factors(settings: Settings, runtime: Runtime, material: SecretMaterial) -> TotpFactors:
    mfa = settings.mfa
    policy = TotpPolicy(
        issuer=mfa.totp_issuer,
        window=mfa.totp_window,
        enrollment_ttl=mfa.ttl,
        enrollment_attempts=mfa.max_attempts,
        max_auth_age=mfa.totp_max_auth_age,
    )
    return TotpFactors(runtime.db, material, runtime.clock, policy)


def build_totp_enrollment(
    stores: Stores, runtime: Runtime, access: AccessTokens, step_up: StepUp, factors: TotpFactors
) -> TotpEnrollment:
    return TotpEnrollment(runtime, stores.ephemeral, access, step_up, factors)


def build_email_verification(
    settings: Settings, runtime: Runtime, material: SecretMaterial, access: AccessTokens, links: Links
) -> EmailVerification:
    verification = settings.email_verification
    policy = VerificationPolicy(
        link_ttl=settings.links.verify_email_ttl,
        on_signup=verification.on_signup,
        required=verification.required,
    )
    return EmailVerification(runtime, material, access, links, policy)

"""Builders of second factors kept in SQL: TOTP and its enrollment."""

from __future__ import annotations

from iam_grpc.config import Settings
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.mfa.totp import TotpFactors, TotpPolicy
from iam_grpc.core.mfa.totp_enrollment import TotpEnrollment
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.wiring.stores import Stores

__all__ = ["build_totp_enrollment", "build_totp_factors"]


def build_totp_factors(settings: Settings, runtime: Runtime, material: SecretMaterial) -> TotpFactors:
    mfa = settings.mfa
    policy = TotpPolicy(
        issuer=mfa.totp_issuer,
        window=mfa.totp_window,
        enrollment_ttl=mfa.ttl,
        enrollment_attempts=mfa.max_attempts,
    )
    return TotpFactors(runtime.db, material, runtime.clock, policy)


def build_totp_enrollment(
    stores: Stores, runtime: Runtime, access: AccessTokens, step_up: StepUp, factors: TotpFactors
) -> TotpEnrollment:
    return TotpEnrollment(runtime, stores.ephemeral, access, step_up, factors)

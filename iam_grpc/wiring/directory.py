"""Builders of the second round's user directory components: personal API tokens, the signed-in
user's profile, and ending a user's access (disable, erase)."""

from __future__ import annotations

from iam_grpc.config import Settings
from iam_grpc.core.api_tokens import ApiTokenPolicy, ApiTokens
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.mfa.step_up import StepUp
from iam_grpc.core.profiles import Profiles
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.tokens.denylist import DenyList
from iam_grpc.core.user_access import UserAccess
from iam_grpc.wiring.stores import Stores

__all__ = ["build_api_tokens", "build_profiles", "build_user_access"]


def build_api_tokens(
    settings: Settings, run: Runtime, material: SecretMaterial, access: AccessTokens, denylist: DenyList
) -> ApiTokens:
    policy = ApiTokenPolicy(
        max_per_user=settings.api_tokens.max_per_user,
        max_ttl=settings.api_tokens.max_ttl,
        max_auth_age=settings.email_change.max_auth_age,  # the one recent sign-in rule
    )
    return ApiTokens(run, material, access, denylist, policy)


def build_user_access(stores: Stores, run: Runtime, denylist: DenyList) -> UserAccess:
    return UserAccess(run.db, run.clock, run.audit, denylist, stores.ephemeral)


def build_profiles(run: Runtime, access: AccessTokens, step_up: StepUp, user_access: UserAccess) -> Profiles:
    return Profiles(run, access, step_up, user_access)

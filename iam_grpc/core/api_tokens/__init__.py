"""Personal API tokens (api.md, ApiTokenService): long-lived credentials for scripts, verified
from process memory after the first check, with revocation seen within the access-token bound."""

from iam_grpc.core.api_tokens.secrets import PREFIX, display_prefix, new_secret, well_formed
from iam_grpc.core.api_tokens.tokens import (
    SCOPE,
    ApiTokenPolicy,
    ApiTokens,
    IssuedApiToken,
    NewApiToken,
    VerifiedApiToken,
    end_user_api_tokens,
)

__all__ = [
    "PREFIX",
    "SCOPE",
    "ApiTokenPolicy",
    "ApiTokens",
    "IssuedApiToken",
    "NewApiToken",
    "VerifiedApiToken",
    "display_prefix",
    "end_user_api_tokens",
    "new_secret",
    "well_formed",
]

"""IP-keyed rate limits per RPC, applied before validation and before any
storage is touched (behaviour.md 2.1, 8.3), on the IP the client-IP
interceptor settled.

Limits keyed by identities (email, user, token, link, challenge...) need the
validated request or a storage lookup; the flows apply them.
"""

from __future__ import annotations

from google.protobuf.message import Message

from iam_grpc.core.call import CallInfo
from iam_grpc.core.ratelimit import RateLimiter, ip_key
from iam_grpc.interceptors.base import RequestInterceptor

__all__ = ["RPC_IP_GROUPS", "RateLimitInterceptor"]

# method -> (groups to consume, groups whose block alone refuses)
RPC_IP_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "/iam.v1.AuthService/Signup": (("signup.ip",), ()),
    "/iam.v1.AuthService/Login": (("login.ip",), ("login.ip_fail",)),
    "/iam.v1.AuthService/Logout": (("logout.ip",), ()),
    "/iam.v1.AuthService/RequestPasswordReset": (("reset_request.ip",), ()),
    "/iam.v1.AuthService/ResetPassword": (("reset.ip",), ()),
    "/iam.v1.AuthService/ChangePassword": (("change_password.ip",), ()),
    "/iam.v1.AuthService/RequestEmailChange": (("email_change.ip",), ()),
    "/iam.v1.AuthService/ConfirmEmailChange": (("link_redeem.ip",), ()),
    "/iam.v1.TokenService/Refresh": (("refresh.ip",), ("refresh.ip_invalid",)),
    "/iam.v1.MfaService/VerifyChallenge": (("code.ip",), ("code.ip_fail",)),
    "/iam.v1.MfaService/RedeemMagicLink": (("link_redeem.ip",), ()),
    "/iam.v1.MfaService/StartPasskeyLogin": (("passkey.ip",), ("passkey.ip_fail",)),
    "/iam.v1.MfaService/FinishPasskeyLogin": (("passkey.ip",), ("passkey.ip_fail",)),
    "/iam.v1.AuthService/SignInWithIdToken": (("oauth.ip",), ("oauth.ip_fail",)),
    "/iam.v1.AuthService/LinkIdentity": (("oauth.ip",), ("oauth.ip_fail",)),
}


class RateLimitInterceptor(RequestInterceptor):
    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def before(self, method: str, request: Message, call: CallInfo) -> None:
        groups = RPC_IP_GROUPS.get(method)
        if groups is None or call.client_ip is None:
            return
        key = ip_key(call.client_ip)
        consume, block_only = groups
        for name in block_only:
            await self._limiter.ensure_not_blocked(name, key)
        for name in consume:
            await self._limiter.hit(name, key)

"""Client library for services that call iam-grpc.

- :class:`IamClient`: an async client with the caller's API key and deadlines.
- :class:`TokenGuard`: local access-token verification against the JWKS.
- :class:`GuardInterceptor` and :func:`current_principal`: protect a grpc.aio
  service by method, with required roles.
"""

from iam_grpc.client._client import IamClient
from iam_grpc.client._errors import IamCallError
from iam_grpc.client._guard import Principal, TokenGuard
from iam_grpc.client._interceptor import GuardInterceptor, current_principal

__all__ = ["GuardInterceptor", "IamCallError", "IamClient", "Principal", "TokenGuard", "current_principal"]

"""iam-grpc-client: the Python client of iam-grpc, without the server.

- :class:`IamClient`: an async client with the caller's API key and deadlines.
- :class:`TokenGuard`: local access-token verification against the JWKS.
- :class:`GuardInterceptor` and :func:`current_principal`: protect a grpc.aio
  service by method, with required roles.
- :class:`IamCallError`: a failed call, with the service's reason;
  :func:`error_details` decodes the same details from any failed call
  (``ErrorInfo``, ``BadRequest``, ``RetryInfo``).
- :mod:`iam_grpc_client.proto`: the generated iam.v1 messages and stubs.

It depends on grpcio, protobuf, googleapis-common-protos and PyJWT only, and
imports nothing of the server (tests/unit/test_client_distribution.py).
"""

from iam_grpc_client._client import IamClient
from iam_grpc_client._errors import IamCallError
from iam_grpc_client._guard import Principal, TokenGuard
from iam_grpc_client._interceptor import GuardInterceptor, current_principal
from iam_grpc_client._status import ErrorDetails, error_details

__all__ = [
    "ErrorDetails",
    "GuardInterceptor",
    "IamCallError",
    "IamClient",
    "Principal",
    "TokenGuard",
    "current_principal",
    "error_details",
]

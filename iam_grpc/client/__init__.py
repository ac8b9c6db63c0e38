"""The Python client, re-exported from its own distribution (``iam-grpc-client``,
package :mod:`iam_grpc_client`, under clients/python). New code imports
``iam_grpc_client`` directly: it loads no server module.
"""

from iam_grpc_client import (
    GuardInterceptor,
    IamCallError,
    IamClient,
    Principal,
    TokenGuard,
    current_principal,
)

__all__ = ["GuardInterceptor", "IamCallError", "IamClient", "Principal", "TokenGuard", "current_principal"]

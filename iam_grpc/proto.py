"""The generated iam.v1 protocol modules, re-exported under stable names.

from iam_grpc.proto import auth_pb2, auth_pb2_grpc

The code is generated into the client distribution (clients/python,
:mod:`iam_grpc_client.proto`), which the server depends on.
"""

# The same names as the client's module, listed once there.
from iam_grpc_client.proto import *  # noqa: F403
from iam_grpc_client.proto import __all__ as __all__

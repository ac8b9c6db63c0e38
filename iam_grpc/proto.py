"""The generated iam.v1 protocol modules, re-exported under stable names.

from iam_grpc.proto import auth_pb2, auth_pb2_grpc

The code is generated into the client distribution (clients/python,
:mod:`iam_grpc_client.proto`), which the server depends on.
"""

from iam_grpc_client.proto import (
    api_token_pb2,
    api_token_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    event_pb2,
    event_pb2_grpc,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)

__all__ = [
    "api_token_pb2",
    "api_token_pb2_grpc",
    "auth_pb2",
    "auth_pb2_grpc",
    "common_pb2",
    "event_pb2",
    "event_pb2_grpc",
    "mfa_pb2",
    "mfa_pb2_grpc",
    "token_pb2",
    "token_pb2_grpc",
    "user_pb2",
    "user_pb2_grpc",
]

"""The generated iam.v1 protocol modules, re-exported under stable names.

from iam_grpc.proto import auth_pb2, auth_pb2_grpc
"""

from iam_grpc._proto.iam.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)

__all__ = [
    "auth_pb2",
    "auth_pb2_grpc",
    "common_pb2",
    "mfa_pb2",
    "mfa_pb2_grpc",
    "token_pb2",
    "token_pb2_grpc",
]

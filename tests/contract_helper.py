"""The iam.v1 contract as the tests walk it: every generated module, and the RPCs whose
servicers have not landed yet.

Tests that go over every RPC of the protos (answered by a servicer, field limits, malformed
payloads) take their list from here. ``PENDING_RPCS`` names the RPCs the protos declare but the
server does not serve yet, ``PENDING_FIELDS`` the new fields of served RPCs: those tests leave them
out (test_server expects pending RPCs to fail, strictly), so the contract can land before its
behaviour. Remove a name when its behaviour lands; every walker then covers it, and test_server's
strict xfail fails until the name is removed.
"""

from __future__ import annotations

from types import ModuleType

from iam_grpc.proto import api_token_pb2, auth_pb2, event_pb2, mfa_pb2, token_pb2, user_pb2

# Every iam.v1 module that declares services.
SERVICE_MODULES: tuple[ModuleType, ...] = (auth_pb2, token_pb2, mfa_pb2, user_pb2, api_token_pb2, event_pb2)

# "Service/Method" of every RPC declared but not served yet.
PENDING_RPCS: frozenset[str] = frozenset()


# "Service/Method.field" of request fields added to an RPC that is served, before the behaviour
# that reads them lands (the server ignores them until then). test_field_limits leaves them out of
# its every-field check; remove a name when its limit is tested there.
PENDING_FIELDS: frozenset[str] = frozenset({})


# Server-streaming RPCs: the unary walkers (field limits, malformed payloads) leave them out, since
# a valid request opens a stream that does not end; tests/integration/test_event_stream.py covers
# WatchEvents' fields (malformed cursors and kinds) and its refusals.
STREAMING_RPCS: frozenset[str] = frozenset({"EventService/WatchEvents"})


def walked_as_unary(service: str, method: str) -> bool:
    """Whether the unary walkers cover ``service`` / ``method``: served, and not a stream."""
    name = f"{service.rsplit('.', 1)[-1]}/{method}"
    return name not in PENDING_RPCS and name not in STREAMING_RPCS


def is_pending(service: str, method: str) -> bool:
    """Whether ``service`` (short or full name) / ``method`` is declared but not served yet."""
    return f"{service.rsplit('.', 1)[-1]}/{method}" in PENDING_RPCS

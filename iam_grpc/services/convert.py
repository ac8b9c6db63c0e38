"""Proto <-> domain translation shared by the servicers."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from iam_grpc.core.call import current_call
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.core.validation import ClientRules, Violations, clean_user_agent, first_language_tag
from iam_grpc.proto import common_pb2

__all__ = ["client_info", "session_message", "timestamp"]


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def client_info(client: common_pb2.ClientContext, violations: Violations) -> ClientInfo:
    """The end user's context, with the IP the call is counted under (the relayed one only from
    trusted callers). Problems are added to ``violations``."""
    call = current_call()
    trusted = bool(call and call.caller and call.caller.trust_client_ip)
    ClientRules(ip_required=trusted).check(
        violations, client.ip, client.user_agent, client.device_id, client.accept_language
    )
    # Without a peer address (a unix socket) the relayed one is used, in the form that is stored:
    # parsed, or nothing.
    relayed = parse_ip(client.ip)
    ip = (call.client_ip if call else None) or (str(relayed) if relayed is not None else "")
    return ClientInfo(
        ip=ip,
        user_agent=clean_user_agent(client.user_agent),
        device_id=client.device_id,
        accept_language=first_language_tag(client.accept_language),
    )


def session_message(issued: IssuedSession) -> common_pb2.Session:
    return common_pb2.Session(
        access_token=issued.access_token,
        access_expires_at=timestamp(issued.access_expires_at),
        refresh_token=issued.refresh_token,
        refresh_expires_at=timestamp(issued.refresh_expires_at),
        session_id=issued.session_id,
        user_id=issued.user_id,
        device_id=issued.device_id,
    )

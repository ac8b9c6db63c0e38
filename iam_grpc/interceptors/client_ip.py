"""Which IP is the end user's: ``client.ip`` when the caller is trusted to
relay it (``callers.<id>.trust_client_ip``), otherwise the connection's peer
address, so an untrusted caller cannot choose the IP that limits count (S56)."""

from __future__ import annotations

from google.protobuf.message import Message

from iam_grpc.core.call import CallInfo
from iam_grpc.core.ratelimit.keys import parse_ip
from iam_grpc.interceptors.base import RequestInterceptor

__all__ = ["ClientIpInterceptor", "client_ip"]


def client_ip(request: Message, call: CallInfo) -> str | None:
    if call.caller is not None and call.caller.trust_client_ip:
        client = getattr(request, "client", None)
        offered = getattr(client, "ip", "") if client is not None else ""
        address = parse_ip(offered) if offered else None
        if address is not None:
            return str(address)
    return call.peer_ip


class ClientIpInterceptor(RequestInterceptor):
    async def before(self, method: str, request: Message, call: CallInfo) -> None:
        call.client_ip = client_ip(request, call)

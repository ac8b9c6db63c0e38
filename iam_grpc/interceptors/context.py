"""Request context: request id (validated, generated when absent, echoed),
the call record that later layers read, and log context for every line."""

from __future__ import annotations

import functools
import ipaddress
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from loguru import logger

from iam_grpc.core.call import CallInfo, reset_current, set_current
from iam_grpc.ids import REQUEST_ID
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor, drive_stream

__all__ = ["RequestContextInterceptor", "parse_peer"]

REQUEST_ID_KEY = "x-request-id"


@functools.lru_cache(maxsize=4096)  # a connection's peer string is the same for all its calls
def parse_peer(peer: str) -> str | None:
    """The IP of a grpc peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``); None for unix sockets."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = rest.rsplit(":", 1)[0].strip("[]")
    else:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _metadata_value(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None


class RequestContextInterceptor(UnaryInterceptor):
    def __init__(self, default_deadline: timedelta) -> None:
        self._default = default_deadline.total_seconds()

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        return self._wrap(behaviour, method, self._default)

    def wrap_stream(self, behaviour: Callable[[Any, Context], Any], method: str) -> Behaviour:
        # A stream (WatchEvents) lasts as long as the caller wants: only its own deadline ends it.
        return self._wrap(drive_stream(behaviour), method, None)

    def _wrap(self, behaviour: Behaviour, method: str, default: float | None) -> Behaviour:

        async def run(request: Any, context: Context) -> Any:
            offered = _metadata_value(context, REQUEST_ID_KEY)
            request_id = offered if offered and REQUEST_ID.match(offered) else str(uuid.uuid4())
            peer = context.peer() or ""
            remaining = context.time_remaining()
            budget = (
                default if remaining is None else remaining
            )  # the default applies only to calls without one
            call = CallInfo(
                method=method,
                request_id=request_id,
                peer=peer,
                peer_ip=parse_peer(peer),
                deadline=None if budget is None else time.monotonic() + budget,
            )
            echo = ((REQUEST_ID_KEY, request_id),)
            await context.send_initial_metadata(echo)
            context.set_trailing_metadata(echo)
            token = set_current(call)
            try:
                with logger.contextualize(request_id=request_id, method=method):
                    return await behaviour(request, context)
            finally:
                reset_current(token)

        return run

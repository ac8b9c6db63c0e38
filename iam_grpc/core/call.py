"""What the transport knows about the call being handled, for any layer to read.

The request-context interceptor creates one :class:`CallInfo` per RPC and puts
it in a context variable; grpc.aio runs each RPC in its own task, so calls
never see each other's. Core code reads the deadline (to refuse starting an
expensive hash too late) and the caller; it never writes the status fields.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

__all__ = ["CallInfo", "Caller", "current_call", "remaining"]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated calling service (behaviour.md 2.8)."""

    id: str
    methods: tuple[str, ...]
    trust_client_ip: bool
    via: str  # api_key, mtls, xfcc, loopback, unauthenticated

    def may_call(self, method: str) -> bool:
        name = method.lstrip("/")
        service = name.split("/", 1)[0]
        return any(rule in ("*", name, f"{service}/*") for rule in self.methods)


@dataclass(slots=True)
class CallInfo:
    method: str
    request_id: str
    peer: str
    peer_ip: str | None
    client_ip: str | None = None  # the end user's IP: client.ip from a trusted caller, else the peer's
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() value
    caller: Caller | None = None
    user_id: str | None = None
    code: str = "OK"
    reason: str | None = None
    request_bytes: int | None = None


_CURRENT: ContextVar[CallInfo | None] = ContextVar("iam_call", default=None)


def current_call() -> CallInfo | None:
    return _CURRENT.get()


def remaining() -> float | None:
    """Seconds left before the current call's deadline (None outside a call)."""
    call = _CURRENT.get()
    if call is None or call.deadline is None:
        return None
    return call.deadline - time.monotonic()


def set_current(call: CallInfo | None) -> object:
    return _CURRENT.set(call)


def reset_current(token: object) -> None:
    _CURRENT.reset(token)  # type: ignore[arg-type]

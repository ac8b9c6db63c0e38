"""Access log and RPC metrics: one record and one observation per call."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from iam_grpc.core.call import current_call
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor, is_exempt
from iam_grpc.logging import ACCESS, component_logger
from iam_grpc.metrics import Metrics

__all__ = ["AccessLogInterceptor"]

log = component_logger("iam.access").bind(kind=ACCESS)

# Expected client outcomes are INFO; refusals WARNING; our failures ERROR (behaviour.md 9.5).
_WARNING = {"RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}
_ERROR = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS"}
# Called on every request of other services: successful calls are logged quietly.
HOT_METHODS = (
    "/iam.v1.TokenService/VerifyAccessToken",
    "/iam.v1.TokenService/GetJwks",
    "/envoy.service.auth.v3.Authorization/Check",
)


class AccessLogInterceptor(UnaryInterceptor):
    def __init__(self, metrics: Metrics, *, hot_ok_level: str = "DEBUG", log_exempt: bool = True) -> None:
        self._metrics = metrics
        self._hot_ok_level = hot_ok_level
        self._log_exempt = log_exempt

    def _level(self, method: str, code: str) -> str | None:
        if code in _ERROR:
            return "ERROR"
        if code in _WARNING:
            return "WARNING"
        if code == "OK":
            if is_exempt(method):
                return "DEBUG" if self._log_exempt else None
            if method in HOT_METHODS:
                return self._hot_ok_level
        return "INFO"

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        metrics = self._metrics

        async def run(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metrics.rpc_in_flight.inc()
            code = "OK"
            try:
                answer = await behaviour(request, context)
                call = current_call()
                if call is not None and call.code != "OK":
                    code = call.code  # a refusal answered in the message itself (ext_authz Check)
                return answer
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                call = current_call()
                code = call.code if call is not None and call.code != "OK" else "UNKNOWN"
                raise
            finally:
                elapsed = time.perf_counter() - started
                metrics.rpc_in_flight.dec()
                metrics.rpc_total.labels(method, code).inc()
                metrics.rpc_seconds.labels(method).observe(elapsed)
                level = self._level(method, code)
                if level is not None:
                    call = current_call()
                    log.bind(
                        grpc_status=code,
                        reason=call.reason if call else None,
                        duration_ms=round(elapsed * 1000, 3),
                        caller=call.caller.id if call and call.caller else None,
                        peer=call.peer if call else None,
                        user_id=call.user_id if call else None,
                    ).log(level, "rpc finished")

        return run

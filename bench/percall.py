"""The CPU cost of each piece of per-call work on the token-check path, in µs (issue 14).

Usage: python bench/percall.py [--n N]

Each piece runs N times in a loop in this process (no server, no network), best of 5 rounds,
so the figures are the pieces' own cost without the machine's noise. The pieces are the ones
the profiles of VerifyAccessToken and Health/Check show (bench/profile.py), called as the
interceptors and the servicer call them; the h2load figures (bench/unary.py) say how much they
matter together.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger

from iam_grpc.config import CallersSettings
from iam_grpc.core.call import Caller, CallInfo, current_call, reset_current, set_current
from iam_grpc.core.validation import Violations, check_roles
from iam_grpc.interceptors.callers import CallerRegistry
from iam_grpc.interceptors.context import parse_peer
from iam_grpc.logging import ACCESS, component_logger, configure_logging
from iam_grpc.metrics import Metrics
from iam_grpc.proto import token_pb2
from iam_grpc.services.convert import timestamp

METHOD = "/iam.v1.TokenService/VerifyAccessToken"


def best(function: Callable[[], Any], n: int) -> float:
    """µs per call, best of 5 rounds of n calls."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            function()
        rounds.append((time.perf_counter() - started) / n * 1e6)
    return round(min(rounds), 2)


async def best_async(function: Callable[[], Any], n: int) -> float:
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await function()
        rounds.append((time.perf_counter() - started) / n * 1e6)
    return round(min(rounds), 2)


async def main(n: int, sink: Any) -> dict[str, float]:
    configure_logging(level="INFO", stdout=sink)
    metrics = Metrics()
    access_log = component_logger("iam.access").bind(kind=ACCESS)
    key = "iamk_bench_" + secrets.token_urlsafe(32)[:43]
    callers = CallersSettings.model_validate(
        {
            "bench": {
                "api_key_sha256": [hashlib.sha256(key.encode()).hexdigest()],
                "methods": ["*"],
                "trust_client_ip": True,
            }
        }
    )
    registry = CallerRegistry(callers, embedded=False)
    caller = Caller(
        "bench", ("iam.v1.TokenService/*", "envoy.service.auth.v3.Authorization/Check"), True, "api_key"
    )
    out: dict[str, float] = {}

    out["uuid4 request id (str(uuid.uuid4()))"] = best(lambda: str(uuid.uuid4()), n)
    out["parse_peer('ipv4:127.0.0.1:54321') (ipaddress)"] = best(
        lambda: parse_peer("ipv4:127.0.0.1:54321"), n
    )
    call = CallInfo(method=METHOD, request_id="x" * 36, peer="ipv4:127.0.0.1:1", peer_ip="127.0.0.1")
    out["CallInfo(...) creation"] = best(
        lambda: CallInfo(method=METHOD, request_id="x" * 36, peer="ipv4:127.0.0.1:1", peer_ip="127.0.0.1"), n
    )
    out["ContextVar set + reset (set_current/reset_current)"] = best(
        lambda: reset_current(set_current(call)), n
    )
    out["current_call()"] = best(current_call, n)

    def contextualize() -> None:
        with logger.contextualize(request_id="0f8fad5b-d9cb-469f-a165-70867728950e", method=METHOD):
            pass

    out["logger.contextualize(2 fields) enter+exit"] = best(contextualize, n)

    async def timeout() -> None:
        async with asyncio.timeout(10.0):  # noqa: ASYNC100 - the timer's own cost is measured
            pass

    out["asyncio.timeout(10) enter+exit (a timer per call)"] = await best_async(timeout, n)

    def metric_ops() -> None:
        metrics.rpc_in_flight.inc()
        metrics.rpc_in_flight.dec()
        metrics.rpc_total.labels(METHOD, "OK").inc()
        metrics.rpc_seconds.labels(METHOD).observe(0.0004)

    out["access log metrics: gauge inc/dec, counter labels().inc(), histogram labels().observe()"] = best(
        metric_ops, n
    )
    total = metrics.rpc_total.labels(METHOD, "OK")
    seconds = metrics.rpc_seconds.labels(METHOD)

    def metric_ops_bound() -> None:
        metrics.rpc_in_flight.inc()
        metrics.rpc_in_flight.dec()
        total.inc()
        seconds.observe(0.0004)

    out["... the same with the label children looked up once"] = best(metric_ops_bound, n)

    def quiet_access_log() -> None:
        access_log.bind(
            grpc_status="OK",
            reason=None,
            duration_ms=0.412,
            caller="bench",
            peer="ipv4:127.0.0.1:1",
            user_id="u",
        ).log("DEBUG", "rpc finished")

    out["access log at DEBUG with the sink at INFO: log.bind(6 fields).log(...) (dropped)"] = best(
        quiet_access_log, n
    )

    def info_access_log() -> None:
        access_log.bind(
            grpc_status="OK",
            reason=None,
            duration_ms=0.412,
            caller="bench",
            peer="ipv4:127.0.0.1:1",
            user_id="u",
        ).info("rpc finished")

    out["access log at INFO, written (JSON line to /dev/null)"] = best(info_access_log, n // 10)
    out["CallerRegistry.by_api_key (sha256 + compare_digest, 1 caller)"] = best(
        lambda: registry.by_api_key(key), n
    )
    out["Caller.may_call(method)"] = best(lambda: caller.may_call(METHOD), n)

    def roles() -> None:
        violations = Violations()
        check_roles(violations, "required_roles", [])
        violations.raise_any()

    out["VerifyAccessToken validation (Violations + check_roles, no roles)"] = best(roles, n)
    now = datetime.now(UTC)
    out["timestamp(datetime) -> protobuf Timestamp"] = best(lambda: timestamp(now), n)

    def response() -> bytes:
        return token_pb2.VerifyAccessTokenResponse(
            user_id="01JB0000000000000000000000",
            session_id="01JB0000000000000000000001",
            device_id="dev_" + "a" * 22,
            roles=["user"],
            expires_at=timestamp(now + timedelta(minutes=15)),
            jti="EiqQOJiogVP-NMadXm-BbQ",
        ).SerializeToString()

    out["VerifyAccessTokenResponse built and serialised"] = best(response, n)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        print(json.dumps(asyncio.run(main(args.n, devnull)), indent=2, ensure_ascii=False))

"""FusedChain: the interceptor chain composed once per method, innermost first (issue 14)."""

from __future__ import annotations

from typing import Any

import grpc

from iam_grpc.interceptors.base import Behaviour, Context, Handler, UnaryInterceptor
from iam_grpc.interceptors.fused import FusedChain


class Tag(UnaryInterceptor):
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        self.seen.append(f"wrap {self.name}")

        async def run(request: Any, context: Context) -> Any:
            return f"{self.name}({await behaviour(request, context)})"

        return run


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


async def test_composed_once_per_method_in_the_chain_order() -> None:
    seen: list[str] = []
    fused = FusedChain([Tag("outer", seen), Tag("inner", seen)])

    async def servicer(request: Any, context: Any) -> str:
        return str(request)

    handler = grpc.unary_unary_rpc_method_handler(servicer)

    async def continuation(details: Any) -> Handler | None:
        return handler if details.method == "/x.S/M" else None

    for _ in range(3):
        composed = await fused.intercept_service(continuation, Details("/x.S/M"))  # type: ignore[arg-type]
        assert composed is not None
        assert await composed.unary_unary("r", None) == "outer(inner(r))"
    assert seen == ["wrap inner", "wrap outer"]  # composed once, innermost first
    assert await fused.intercept_service(continuation, Details("/x.S/Unknown")) is None  # type: ignore[arg-type]
    assert list(fused._composed) == ["/x.S/M"]  # unknown names are not remembered

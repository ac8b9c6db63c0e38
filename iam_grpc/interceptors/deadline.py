"""Deadlines: every call ends by its deadline (the client's, or
``server.default_deadline`` when it sent none) with DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from iam_grpc.core.call import current_call
from iam_grpc.errors import DeadlineExceeded
from iam_grpc.interceptors.base import Behaviour, Context, UnaryInterceptor

__all__ = ["DeadlineInterceptor"]


class DeadlineInterceptor(UnaryInterceptor):
    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            call = current_call()
            if call is None or call.deadline is None:
                return await behaviour(request, context)
            budget = call.deadline - time.monotonic()
            if budget <= 0:
                raise DeadlineExceeded()
            timer = asyncio.timeout(budget)
            try:
                async with timer:
                    return await behaviour(request, context)
            except TimeoutError:
                if timer.expired():
                    raise DeadlineExceeded() from None
                raise  # a timeout of the code itself, not of the deadline

        return run

"""Failpoint ``rpc:<method>`` before every servicer call; installed only when
failpoints are enabled (tests), never in production."""

from __future__ import annotations

from google.protobuf.message import Message

from iam_grpc.core.call import CallInfo
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.interceptors.base import RequestInterceptor

__all__ = ["FailpointInterceptor"]


class FailpointInterceptor(RequestInterceptor):
    def __init__(self, failpoints: Failpoints) -> None:
        self._failpoints = failpoints

    async def before(self, method: str, request: Message, call: CallInfo) -> None:
        await self._failpoints.hit(f"rpc:{method}")

"""Test-only fault hooks (security.md: "failpoints").

Present only when the process starts with ``IAM_TEST_FAILPOINTS`` set, which
production mode refuses. Code marks a place with ``await failpoints.hit(name)``;
a test arms it with an action:

- ``sleep:<seconds>``: wait there (in-flight calls, deadlines, draining);
- ``raise``: a bug (RuntimeError) there;
- ``unavailable``: the backend fails there (BackendUnavailable).

The places: ``rpc:<full method>`` (before any handler), ``refresh.after_insert``,
``refresh.before_commit``, ``refresh.after_commit``, ``login.before_rehash``,
``redeem.before_finish`` (a verified link, before its challenge moves on), and
``<flow>.before_commit`` (the last step inside each multi-row transaction: ``signup``,
``login``, ``reset``, ``password_change``, ``email_change``; security.md S59).

Arm from the environment (``IAM_TEST_FAILPOINTS="rpc:/iam.v1.AuthService/Login=sleep:2"``,
entries separated by ``;``) or in-process with :meth:`Failpoints.arm`.
"""

from __future__ import annotations

import asyncio

from iam_grpc.errors import BackendUnavailable

__all__ = ["Failpoints"]


class Failpoints:
    def __init__(self, spec: str = "") -> None:
        self.enabled = bool(spec)
        self._armed: dict[str, str] = {}
        if spec and spec != "1":
            for entry in spec.split(";"):
                name, _, action = entry.strip().rpartition("=")
                if name:
                    self.arm(name, action)

    def arm(self, name: str, action: str) -> None:
        if not self.enabled:
            raise RuntimeError("failpoints are off (IAM_TEST_FAILPOINTS is not set)")
        if action not in ("raise", "unavailable") and not action.startswith("sleep:"):
            raise ValueError("failpoint actions: raise, unavailable, sleep:<seconds>")
        self._armed[name] = action

    def disarm(self, name: str) -> None:
        self._armed.pop(name, None)

    async def hit(self, name: str) -> None:
        if not self.enabled:
            return
        action = self._armed.get(name)
        if action is None:
            return
        if action == "raise":
            raise RuntimeError(f"failpoint {name}")
        if action == "unavailable":
            raise BackendUnavailable()
        await asyncio.sleep(float(action.split(":", 1)[1]))

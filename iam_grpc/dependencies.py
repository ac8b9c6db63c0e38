"""The state of each dependency (SQL, Redis, SMTP) as ``up``, ``degraded`` or ``down``, for
``/healthz`` and the ``iam_dependency_state`` metric.

Readiness is a separate question (the gRPC health status): losing Redis or SMTP leaves the
service answering correctly from its fallbacks, so it stays SERVING and only this report says
what is wrong (docs/deployment.md, "Losing a dependency"; docs/decisions.md).

- ``down``: the last probe failed, or the dependency's breaker is open (calls fail fast);
- ``degraded``: it failed within the last :data:`RECENT` seconds but answers now, or (Redis) token
  checks do not trust its deny-list yet and read SQL; (SMTP) the server defers messages (4xx);
- ``up``: otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Literal

from iam_grpc.metrics import Metrics
from iam_grpc.storage.breaker import Breaker
from iam_grpc.storage.ports import MailError, MailTransport, TransientMailError

__all__ = ["RECENT", "Dependencies", "ObservedTransport", "ProbedDependency", "State"]

State = Literal["up", "degraded", "down"]
STATES: tuple[State, ...] = ("up", "degraded", "down")
RECENT = 10.0  # seconds a failure keeps a dependency "degraded" after it answers again


class ProbedDependency:
    """A store judged by its breaker (if any) and the health probe's last outcome."""

    def __init__(self, breaker: Breaker | None = None, *, trusted: Callable[[], bool] | None = None) -> None:
        self._breaker = breaker
        self._trusted = trusted  # Redis: whether token checks trust its deny-list
        self._probe_ok = True
        self._last_failure: float | None = None

    def probed(self, ok: bool) -> None:
        self._probe_ok = ok
        if not ok:
            self._last_failure = time.monotonic()

    def state(self) -> State:
        breaker = self._breaker
        if not self._probe_ok or (breaker is not None and breaker.is_open):
            return "down"
        recent = self._last_failure is not None and time.monotonic() - self._last_failure < RECENT
        if recent or (breaker is not None and breaker.failed_recently(RECENT)):
            return "degraded"
        if self._trusted is not None and not self._trusted():
            return "degraded"
        return "up"


class ObservedTransport:
    """A mail transport that remembers whether its server answered the last attempt."""

    def __init__(self, inner: MailTransport) -> None:
        self._inner = inner
        self._state: State = "up"

    def state(self) -> State:
        return self._state

    def _judge(self, error: TransientMailError | None) -> None:
        if error is None:
            self._state = "up"
        else:  # a 4xx answer means a server that defers; anything else, none that answers
            self._state = "degraded" if error.summary.startswith("SMTP ") else "down"

    async def send(self, message: EmailMessage) -> str:
        try:
            answer = await self._inner.send(message)
        except MailError as error:
            # a permanent refusal (5xx) came from a server that answers
            self._judge(error if isinstance(error, TransientMailError) else None)
            raise
        self._judge(None)
        return answer

    async def check(self) -> None:
        try:
            await self._inner.check()
        except MailError as error:
            self._judge(error if isinstance(error, TransientMailError) else None)
            raise
        self._judge(None)


class Dependencies:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._sources: dict[str, Callable[[], State]] = {}

    def track(self, name: str, state: Callable[[], State]) -> None:
        self._sources[name] = state
        for each in STATES:
            self._metrics.dependency_state.labels(name, each).set_function(
                lambda each=each: 1.0 if state() == each else 0.0  # type: ignore[misc]
            )

    def states(self) -> dict[str, State]:
        return {name: state() for name, state in self._sources.items()}

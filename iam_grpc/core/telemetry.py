"""The counters core code bumps, as Protocols: the wiring passes the Prometheus registry
(``iam_grpc.metrics.Metrics``), tests may pass anything of the same shape, and no core module
imports prometheus_client."""

from __future__ import annotations

from typing import Protocol

__all__ = ["CoreMetrics", "Count", "CountBy"]


class Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class CountBy(Protocol):
    """A counter with labels: ``refreshes.labels("rotated").inc()``."""

    def labels(self, *values: str) -> Count: ...


class CoreMetrics(Protocol):
    """Every counter a core rule reports to (names and labels: ``iam_grpc.metrics``)."""

    @property
    def refreshes(self) -> CountBy: ...
    @property
    def logins(self) -> CountBy: ...
    @property
    def password_verifications(self) -> Count: ...
    @property
    def challenges(self) -> CountBy: ...
    @property
    def anomaly_blocks(self) -> CountBy: ...
    @property
    def store_fallbacks(self) -> CountBy: ...
    @property
    def ratelimit_refusals(self) -> CountBy: ...
    @property
    def ratelimit_blocks(self) -> CountBy: ...
    @property
    def ratelimit_fallbacks(self) -> Count: ...
    @property
    def mail_outcomes(self) -> CountBy: ...
    @property
    def key_reloads(self) -> Count: ...
    @property
    def denylist_rebuilds(self) -> Count: ...
    @property
    def denylist_fallbacks(self) -> Count: ...

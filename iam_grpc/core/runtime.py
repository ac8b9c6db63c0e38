"""What every use-case of the service runs on (:class:`Runtime`).

A flow (signup, login, a refresh, a password reset, an MFA step) opens SQL transactions, records
audit events and queues mail in them, spends rate-limit points, bumps counters, and in tests
stops at failpoints. These six are the same objects for every flow of a service and hold no
state of the flow, so they travel together; what a flow needs beyond them (sessions, challenges,
links, password rules) it names in its own constructor.
"""

from __future__ import annotations

from dataclasses import dataclass

from iam_grpc.clock import Clock
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.failpoints import Failpoints
from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.core.ratelimit import RateLimiter
from iam_grpc.core.telemetry import CoreMetrics
from iam_grpc.storage.ports import Database

__all__ = ["Runtime"]


@dataclass(frozen=True, slots=True)
class Runtime:
    db: Database  # the unit of work: every change commits in one transaction
    clock: Clock
    audit: AuditTrail  # audit rows, written in the change's transaction
    mailer: Mailer  # outbox rows, written in the change's transaction
    limiter: RateLimiter
    metrics: CoreMetrics
    failpoints: Failpoints

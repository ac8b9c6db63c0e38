"""Queuing email (behaviour.md 7.3, 7.4): one outbox row in the same SQL
transaction as the change that needs it, secrets sealed with the row id as
associated data, limits per recipient, user and IP (never one global limit),
and a wake-up for the local sender once the transaction has committed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.mail.kinds import KINDS
from iam_grpc.core.ratelimit import RateLimiter, email_key, ip_key
from iam_grpc.errors import RateLimited
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import OutboxMessage

__all__ = ["Mailer", "QueuedMail"]

log = component_logger("iam.mail")


def _tell(listeners: list[Callable[[QueuedMail], None]], mail: QueuedMail) -> None:
    for listener in listeners:
        listener(mail)


@dataclass(frozen=True)
class QueuedMail:
    """One queued email as its recipient would read it: plain parameters and secrets
    (``code``, ``link``...) together."""

    id: int
    kind: str
    to: str
    status: str
    params: Mapping[str, str]


class Mailer:
    def __init__(
        self,
        limiter: RateLimiter,
        material: SecretMaterial,
        clock: Clock,
        *,
        default_locale: str = "en",
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._limiter = limiter
        self._material = material
        self._clock = clock
        self._default_locale = default_locale
        self._wake = wake
        self._listeners: list[Callable[[QueuedMail], None]] = []

    def listen(self, listener: Callable[[QueuedMail], None]) -> Callable[[], None]:
        """Call ``listener`` with every email once the transaction that queued it has committed,
        secrets included, in memory only; returns the function that stops it. For
        :func:`iam_grpc.testing.capture_outbox`: a listener must not raise or block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def queue(
        self,
        tx: Transaction,
        kind: str,
        to: str,
        *,
        params: Mapping[str, object] | None = None,
        secrets: Mapping[str, str] | None = None,
        user_id: str | None = None,
        locale: str | None = None,
        ip: str | None = None,
        not_after: datetime | None = None,
        dedupe_scope: str | None = None,
    ) -> int | None:
        """Queue one email; returns the row id, or None when deduplicated.

        Code and link emails over a limit raise RateLimited (no email, and the
        caller makes no challenge); notices over the recipient limit are stored
        ``suppressed`` instead. ``dedupe_scope`` (e.g. the device) joins kind and
        user in the dedupe key of deduplicated notices; without it, the hour.
        """
        spec = KINDS[kind]
        plain = dict(params or {})
        sealed = dict(secrets or {})
        if set(plain) - {*spec.params, "name"} or set(sealed) != set(spec.secrets):
            raise ValueError(f"{kind}: params {sorted(spec.params)}, secrets {sorted(spec.secrets)}")
        now = self._clock.now()
        deadline = not_after or (now + spec.deadline if spec.deadline else None)
        if deadline is None:
            raise ValueError(f"{kind}: codes and links need the deadline of what they unlock")
        if spec.challenge:
            if user_id:
                await self._limiter.hit("mail.user_challenge", user_id)
            if ip:
                await self._limiter.hit("mail.ip_challenge", ip_key(ip))
        status = "pending"
        try:
            await self._limiter.hit("mail.recipient", email_key(to))
        except RateLimited:
            if not spec.is_notice:
                raise
            status = "suppressed"  # notices never make the triggering call fail
        dedupe_key = None
        if spec.dedupe and user_id:
            dedupe_key = f"{kind}:{user_id}:{dedupe_scope or now.strftime('%Y%m%d%H')}"[:96]
        message = OutboxMessage(
            kind=kind,
            recipient=to,
            recipient_h=self._material.keyed_hash("email", email_key(to)),
            user_id=user_id,
            locale=locale or self._default_locale,
            params=plain,
            priority=spec.priority,
            status=status,
            next_attempt_at=now,
            created_at=now,
            not_after=deadline,
            dedupe_key=dedupe_key,
        )
        message_id = await tx.outbox.enqueue(message)
        if message_id is None:
            return None
        if sealed:
            payload = json.dumps(sealed, separators=(",", ":")).encode()
            await tx.outbox.seal(message_id, self._material.seal("outbox", payload, str(message_id).encode()))
        log.bind(kind=kind, recipient_h=message.recipient_h[:12], status=status).info("mail queued")
        if status == "pending" and self._wake is not None:
            tx.after_commit(self._wake)
        if self._listeners:
            queued = QueuedMail(
                message_id, kind, to, status, {**{k: str(v) for k, v in plain.items()}, **sealed}
            )
            tx.after_commit(partial(_tell, list(self._listeners), queued))
        return message_id

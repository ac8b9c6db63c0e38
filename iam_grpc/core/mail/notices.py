"""The security notices several flows send, each queued in the caller's transaction and
deduplicated per ``dedupe_scope`` (see :meth:`~iam_grpc.core.mail.mailer.Mailer.queue`)."""

from __future__ import annotations

from datetime import datetime

from iam_grpc.core.mail.mailer import Mailer
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import User

__all__ = ["queue_new_device", "queue_password_changed", "queue_security_alert"]


def _utc(now: datetime) -> str:
    return now.strftime("%Y-%m-%d %H:%M")


async def queue_security_alert(
    mailer: Mailer, tx: Transaction, user: User, *, what: str, now: datetime, dedupe_scope: str | None
) -> None:
    """``security_alert``: something happened that the account's owner must know (``what``)."""
    await mailer.queue(
        tx,
        "security_alert",
        user.email,
        params={"name": user.name, "what": what, "time_utc": _utc(now)},
        user_id=user.id,
        locale=user.locale,
        dedupe_scope=dedupe_scope,
    )


async def queue_new_device(
    mailer: Mailer,
    tx: Transaction,
    user: User,
    *,
    device: str,
    location: str,
    now: datetime,
    device_id: str,
    ip: str | None = None,
) -> None:
    """``new_device``: a device was trusted, or signed in untrusted; once per device."""
    await mailer.queue(
        tx,
        "new_device",
        user.email,
        params={"name": user.name, "device": device, "location": location, "time_utc": _utc(now)},
        user_id=user.id,
        locale=user.locale,
        ip=ip,
        dedupe_scope=device_id,
    )


async def queue_password_changed(
    mailer: Mailer, tx: Transaction, user: User, *, ip: str, device: str, now: datetime, how: str
) -> None:
    """The ``password_changed`` notice (a reset or a change), deduplicated per kind of change."""
    await mailer.queue(
        tx,
        "password_changed",
        user.email,
        params={"name": user.name, "time_utc": _utc(now), "device": device, "location": ""},
        user_id=user.id,
        locale=user.locale,
        ip=ip,
        dedupe_scope=how,
    )

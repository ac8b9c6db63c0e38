"""Ports of mail delivery: the transport that hands a message to SMTP (or a folder) and the
renderer that turns an outbox row into an email, with the errors a send can raise.
Re-exported by :mod:`iam_grpc.storage.ports`."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Protocol

from iam_grpc.storage.records import OutboxMessage

__all__ = ["MailError", "MailTransport", "MessageRenderer", "PermanentMailError", "TransientMailError"]


class MailError(Exception):
    """A failed send. ``summary`` is safe to store: an SMTP code and a fixed text, never the message."""

    def __init__(self, summary: str) -> None:
        super().__init__(summary)
        self.summary = summary[:255]


class TransientMailError(MailError):
    """Try again later (connection failure, timeout, 4xx)."""


class PermanentMailError(MailError):
    """Never try again (5xx, a template that would leak a secret)."""


class MailTransport(Protocol):
    """Hands a rendered message to SMTP, or writes it to a folder in embedded mode."""

    async def send(self, message: EmailMessage) -> str:
        """Deliver; return the provider's message id (or ours). Raises a :class:`MailError`."""
        ...

    async def check(self) -> None:
        """Raise :class:`TransientMailError` when the transport cannot be reached (startup check)."""
        ...


class MessageRenderer(Protocol):
    """Turns an outbox row (and its opened secrets) into an email."""

    def render(self, row: OutboxMessage, secrets: dict[str, str]) -> EmailMessage:
        """Raises :class:`PermanentMailError` when the row cannot be rendered safely."""
        ...

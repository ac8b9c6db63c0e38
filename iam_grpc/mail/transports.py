"""Mail transports: SMTP (aiosmtplib) and, in embedded mode, ``.eml`` files.

Failures become :class:`TransientMailError` (try again: connection problems,
timeouts, 4xx) or :class:`PermanentMailError` (5xx), whose summaries hold an
SMTP code and a fixed text, never any part of the message.
"""

from __future__ import annotations

import os
import re
import ssl
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Literal

import aiosmtplib

from iam_grpc.storage.ports import PermanentMailError, TransientMailError

__all__ = ["FileTransport", "SmtpTransport"]


class SmtpTransport:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        starttls: Literal["required", "when_offered", "off"] = "required",
        username: str = "",
        password: str | None = None,
        timeout: timedelta = timedelta(seconds=10),
        verify_certificate: bool = True,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._starttls: bool | None = None if starttls == "when_offered" else starttls == "required"
        if tls:
            self._starttls = False
        self._username = username or None
        self._password = password
        self._timeout = timeout.total_seconds()
        self._verify = verify_certificate

    def _client(self) -> aiosmtplib.SMTP:
        context = ssl.create_default_context() if self._verify else ssl._create_unverified_context()  # noqa: S323
        return aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=self._tls,
            start_tls=self._starttls,
            timeout=self._timeout,
            username=self._username,
            password=self._password,
            tls_context=context,
            validate_certs=self._verify,
        )

    async def send(self, message: EmailMessage) -> str:
        try:
            async with self._client() as client:
                await client.send_message(message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            raise _by_code(min(codes) if codes else 550, "recipient refused") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _by_code(exc.code, "server refused the message") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientMailError(f"connection failed ({type(exc).__name__})") from None
        return str(message["Message-ID"])

    async def check(self) -> None:
        try:
            async with self._client() as client:
                await client.noop()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientMailError(f"connection failed ({type(exc).__name__})") from None


def _by_code(code: int, text: str) -> TransientMailError | PermanentMailError:
    summary = f"SMTP {code} {text}"
    return PermanentMailError(summary) if 500 <= code < 600 else TransientMailError(summary)


class FileTransport:
    """Writes each message as ``<outbox_dir>/<message-id>.eml`` (mode 0600): embedded mode's mailbox."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def send(self, message: EmailMessage) -> str:
        message_id = str(message["Message-ID"])
        name = re.sub(r"[^A-Za-z0-9.-]", "", message_id.split("@", 1)[0]) or "message"
        try:
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._folder / f"{name}.eml"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(message.as_bytes())
        except OSError as exc:
            raise TransientMailError(f"cannot write the outbox folder ({type(exc).__name__})") from None
        return message_id

    async def check(self) -> None:
        try:
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TransientMailError(f"cannot create the outbox folder ({type(exc).__name__})") from None

"""Rendering outbox rows into email (behaviour.md 7.2): Jinja2 templates per
kind and locale, a text and an HTML body in one ``multipart/alternative``
message, secrets only ever in bodies.

Built-in English templates live in ``iam_grpc/mail/templates/en``; operators add
or override ``<locale>/<kind>.subject``, ``.txt`` and ``.html`` files in
``mail.templates_dir``. A missing file falls back to the built-in English one.
HTML is autoescaped; text is not (it is not markup).
"""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import jinja2

from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.mail.kinds import KINDS
from iam_grpc.storage.ports import PermanentMailError
from iam_grpc.storage.records import OutboxMessage

__all__ = ["BUILTIN_TEMPLATES", "MailRenderer", "pick_locale"]

BUILTIN_TEMPLATES = Path(__file__).parent / "templates"
_PARTS = ("subject", "txt", "html")


def _accept_language_tags(header: str) -> list[str]:
    """Language tags of an Accept-Language header, best first (q-values honoured)."""
    weighted: list[tuple[float, int, str]] = []
    for index, item in enumerate(header.split(",")[:20]):
        tag, _, rest = item.strip().partition(";")
        quality = 1.0
        if rest.strip().startswith("q="):
            try:
                quality = float(rest.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and tag != "*" and quality > 0:
            weighted.append((-quality, index, tag.lower()))
    return [tag for _, _, tag in sorted(weighted)]


def pick_locale(
    available: set[str], user_locale: str | None, accept_language: str | None, default: str
) -> str:
    """The stored locale if templates exist for it, else the best Accept-Language match, else default."""
    for candidate in ([user_locale] if user_locale else []) + _accept_language_tags(accept_language or ""):
        tag = candidate.lower()
        if tag in available:
            return tag
        primary = tag.split("-", 1)[0]
        if primary in available:
            return primary
    return default


class MailRenderer:
    def __init__(
        self,
        *,
        material: SecretMaterial,
        from_address: str,
        from_name: str,
        site_name: str,
        support_url: str = "",
        templates_dir: Path | None = None,
    ) -> None:
        self._material = material
        self._from = Address(display_name=from_name, addr_spec=from_address)
        self._domain = from_address.rpartition("@")[2] or "localhost"
        self._common = {"site_name": site_name, "support_url": support_url}
        folders = [str(templates_dir)] if templates_dir else []
        self._folders = [Path(f) for f in folders] + [BUILTIN_TEMPLATES]
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader([*folders, str(BUILTIN_TEMPLATES)]),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            auto_reload=False,
        )

    def locales(self) -> set[str]:
        """Locales that have at least one template file."""
        found = set()
        for folder in self._folders:
            if folder.is_dir():
                for locale in folder.iterdir():
                    if locale.is_dir() and any(locale.glob("*.subject")):
                        found.add(locale.name.lower())
        return found

    def _template(self, locale: str, kind: str, part: str) -> jinja2.Template:
        try:
            return self._env.get_template(f"{locale}/{kind}.{part}")
        except jinja2.TemplateNotFound:
            return self._env.get_template(f"en/{kind}.{part}")

    def message_id(self, message_id: int) -> str:
        """Stable for a row, so a resend after a crash can be recognised as the same message."""
        tag = self._material.keyed_hash("outbox", f"message-id:{message_id}")[:16]
        return f"<iam-{message_id}.{tag}@{self._domain}>"

    def render(self, row: OutboxMessage, secrets: dict[str, str]) -> EmailMessage:
        assert row.id is not None
        kind = KINDS[row.kind]
        variables: dict[str, Any] = {
            "name": "",
            **self._common,
            **row.params,
            **secrets,
            "locale": row.locale,
        }
        try:
            subject = " ".join(self._template(row.locale, kind.name, "subject").render(variables).split())
            text = self._template(row.locale, kind.name, "txt").render(variables)
            html = self._template(row.locale, kind.name, "html").render(variables)
        except jinja2.TemplateError as exc:
            raise PermanentMailError(f"template error ({type(exc).__name__})") from None
        if any(value and len(value) >= 4 and value in subject for value in secrets.values()):
            # An overridden template must never put a code or link where previews show it.
            raise PermanentMailError("template places a secret in the subject")
        email = EmailMessage()
        email["From"] = self._from
        email["To"] = row.recipient
        email["Subject"] = subject
        email["Date"] = format_datetime(row.created_at)
        email["Message-ID"] = self.message_id(row.id)
        email["Auto-Submitted"] = "auto-generated"
        email["Content-Language"] = row.locale
        email.set_content(text + "\n")
        email.add_alternative(html, subtype="html")
        return email

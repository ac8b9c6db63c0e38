"""The emails the service sends (behaviour.md 7.1) and what each needs.

Codes and links are *secret* variables: they are sealed in the outbox row,
placed only in message bodies, and wiped once the row is sent, expired or dead.
Everything else is a plain parameter stored with the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

__all__ = ["KINDS", "MailKind"]


@dataclass(frozen=True, slots=True)
class MailKind:
    name: str
    priority: int  # 0: codes and links (sent first), 1: notices
    params: tuple[str, ...]  # plain template variables (besides the common ones)
    secrets: tuple[str, ...] = ()  # sealed template variables
    challenge: bool = False  # counts in the per-user and per-IP challenge-mail limits
    deadline: timedelta | None = None  # send deadline for notices; codes and links give their own
    dedupe: bool = False  # a burst of triggers sends one notice (kind + user + device or hour)

    @property
    def is_notice(self) -> bool:
        return self.priority == 1


_NOTICE = timedelta(hours=24)

KINDS: dict[str, MailKind] = {
    k.name: k
    for k in (
        MailKind(
            "mfa_code",
            0,
            ("reason_text", "device", "location", "time_utc", "minutes_left"),
            ("code", "link"),
            challenge=True,
        ),
        MailKind(
            "step_up_code",
            0,
            ("action", "device", "location", "minutes_left"),
            ("code", "link"),
            challenge=True,
        ),
        MailKind("password_reset", 0, ("minutes_left", "device", "location"), ("link",)),
        MailKind("email_change_confirm", 0, ("minutes_left",), ("link",)),
        MailKind("verify_email", 0, ("hours_left",), ("link",)),
        MailKind("email_change_requested", 1, ("new_email_masked", "device", "location"), deadline=_NOTICE),
        MailKind("email_in_use", 1, (), deadline=_NOTICE, dedupe=True),
        MailKind("email_changed", 1, ("new_email_masked",), deadline=_NOTICE),
        MailKind("new_device", 1, ("device", "location", "time_utc"), deadline=_NOTICE, dedupe=True),
        MailKind("password_changed", 1, ("time_utc", "device", "location"), deadline=_NOTICE, dedupe=True),
        MailKind("security_alert", 1, ("what", "time_utc"), deadline=_NOTICE, dedupe=True),
    )
}

"""Limiter groups (behaviour.md 8.3): who is counted, how much, for how long.

A group has a key kind and one or more windows (a union: a request consumes
from all of them and is refused if any is exhausted). A window marked
*failures* counts only failed outcomes, with a reservation taken before the
guarded operation and given back on success; *consecutive* windows are also
reset by a success. Refusals add strikes; ``max_strikes`` strikes impose a
block of ``block`` doubling per earlier block within 24 h, capped at
``block_max``. ``max_strikes = 0`` means refusals never block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import timedelta

from iam_grpc.storage.records import LimitSpec, LimitWindow

__all__ = ["DEFAULT_GROUPS", "KEY_KINDS", "Group", "Window", "parse_window"]

KEY_KINDS = ("ip", "email", "ip_email", "user", "session", "token", "link", "device", "challenge", "caller")

_WINDOW = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*(?:\s([fc]+))?\s*\Z")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Window:
    points: int
    length: timedelta
    failures: bool = False  # counts failed outcomes only (reserved, refunded on success)
    consecutive: bool = False  # reset by a success of the same key

    def __str__(self) -> str:
        seconds = self.length.total_seconds()
        unit = next(u for u, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)) if seconds % size == 0)
        flags = ("f" if self.failures else "") + ("c" if self.consecutive else "")
        return f"{self.points}/{int(seconds // _UNIT[unit])}{unit}" + (f" {flags}" if flags else "")


def parse_window(text: str) -> Window:
    """``"5/1h"``, ``"1/1s"``, ``"5/1h fc"`` (f: failures only, c: reset on success)."""
    match = _WINDOW.match(text)
    if not match:
        raise ValueError("windows look like '10/1s', '100/10m' or '5/1h fc'")
    points, amount, unit, flags = match.groups()
    length = timedelta(seconds=float(amount) * _UNIT[unit])
    if int(points) < 1 or length < timedelta(seconds=1):
        raise ValueError("a window allows at least 1 point over at least 1 s")
    flags = flags or ""
    return Window(int(points), length, "f" in flags, "c" in flags)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    key: str  # one of KEY_KINDS
    windows: tuple[Window, ...]
    max_strikes: int = 0
    block: timedelta = timedelta(0)
    block_max: timedelta = timedelta(0)

    @property
    def spec(self) -> LimitSpec:
        return LimitSpec(
            windows=tuple(LimitWindow(w.points, int(w.length.total_seconds() * 1000)) for w in self.windows),
            max_strikes=self.max_strikes,
            block_ms=int(self.block.total_seconds() * 1000),
            block_max_ms=int(self.block_max.total_seconds() * 1000),
        )

    @property
    def failure_windows(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.windows) if w.failures)

    @property
    def consecutive_windows(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.windows) if w.consecutive)

    def with_changes(
        self,
        windows: tuple[Window, ...] | None = None,
        max_strikes: int | None = None,
        block: timedelta | None = None,
        block_max: timedelta | None = None,
    ) -> Group:
        changed = replace(
            self,
            windows=windows if windows is not None else self.windows,
            max_strikes=max_strikes if max_strikes is not None else self.max_strikes,
            block=block if block is not None else self.block,
            block_max=block_max if block_max is not None else self.block_max,
        )
        if changed.max_strikes and (changed.block <= timedelta(0) or changed.block_max < changed.block):
            raise ValueError(
                f"ratelimit.groups.{self.name}: block must be positive and block_max at least block"
            )
        return changed


def _g(
    name: str, key: str, windows: str, strikes: int = 0, block: str = "0s", block_max: str = "0s"
) -> Group:
    def length(text: str) -> timedelta:
        value = _WINDOW.match(f"1/{text}")
        assert value is not None
        return timedelta(seconds=float(value.group(2)) * _UNIT[value.group(3)])

    return Group(
        name=name,
        key=key,
        windows=tuple(parse_window(w) for w in windows.split("+")),
        max_strikes=strikes,
        block=length(block) if strikes else timedelta(0),
        block_max=length(block_max) if strikes else timedelta(0),
    )


# behaviour.md 8.3, row by row.
DEFAULT_GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        _g("signup.ip", "ip", "2/1s + 5/30m", 2, "15m", "24h"),
        _g("signup.pair", "ip_email", "1/1s + 3/24h", 2, "30m", "24h"),
        _g("signup.email", "email", "3/24h", 2, "24h", "24h"),
        _g("signup.device", "device", "3/24h", 2, "24h", "24h"),
        _g("login.ip", "ip", "10/1s + 100/10m", 3, "10m", "24h"),
        _g("login.ip_fail", "ip", "20/1h f", 1, "1h", "24h"),
        _g("login.pair", "ip_email", "1/1s + 5/1h fc", 3, "30m", "4h"),
        _g("login.account", "email", "10/1h fc", 1, "15m", "1h"),
        # sign-in with a passkey or another provider's ID token: login's ip limits (8.3)
        _g("passkey.ip", "ip", "10/1s + 100/10m", 3, "10m", "24h"),
        _g("passkey.ip_fail", "ip", "20/1h f", 1, "1h", "24h"),
        _g("oauth.ip", "ip", "10/1s + 100/10m", 3, "10m", "24h"),
        _g("oauth.ip_fail", "ip", "20/1h f", 1, "1h", "24h"),
        _g("refresh.ip", "ip", "20/1s + 300/10m", 3, "10m", "1h"),
        _g("refresh.ip_invalid", "ip", "10/10m f", 1, "30m", "24h"),
        _g("refresh.token", "token", "10/1m", 1, "10m", "10m"),
        _g("logout.ip", "ip", "30/10m", 3, "10m", "1h"),
        _g("reset_request.ip", "ip", "1/1s + 5/1h + 20/24h", 2, "1h", "24h"),
        _g("reset_request.email", "email", "3/1h"),
        _g("reset.ip", "ip", "1/1s + 5/10m", 2, "10m", "1h"),
        _g("reset.link", "link", "6/10m f", 1, "20m", "20m"),
        _g("change_password.ip", "ip", "10/10m", 2, "10m", "1h"),
        _g("change_password.user", "user", "5/15m fc", 1, "15m", "1h"),
        _g("email_change.user", "user", "3/24h"),
        _g("email_change.ip", "ip", "10/1h", 2, "1h", "24h"),
        _g("code.ip", "ip", "5/1s + 30/10m", 2, "10m", "1h"),
        _g("code.ip_fail", "ip", "20/1h f", 1, "1h", "24h"),
        _g("code.device", "device", "10/1h f", 1, "1h", "4h"),
        _g("code.user_fail", "user", "15/24h f", 1, "1h", "4h"),
        _g("resend.challenge", "challenge", "1/60s"),
        _g("link_redeem.ip", "ip", "2/1s + 30/30m", 2, "15m", "1h"),
        _g("link_inspect.link", "link", "30/30m"),
        _g("link_inspect.caller_invalid", "caller", "300/1m f"),
        _g("step_up.session", "session", "3/10m"),
        _g("step_up.user", "user", "10/24h"),
        _g("totp.user", "user", "10/1h"),
        _g("verify_email.user", "user", "5/24h"),
        _g("grant.caller_fail", "caller", "60/1m f"),
        _g("sessions.user", "user", "30/1m", 3, "1m", "10m"),
        # second round: API tokens (creation and rotation per user; failed verifications per caller)
        _g("api_token.create_user", "user", "30/1h"),
        _g("api_token.caller_invalid", "caller", "300/1m f"),
        _g("profile.user", "user", "30/1h"),
        # behaviour.md 7.4: per recipient, per user and per IP; never one global mail limit
        _g("mail.recipient", "email", "10/1h + 30/24h"),
        _g("mail.user_challenge", "user", "8/24h", 1, "12h", "12h"),
        _g("mail.ip_challenge", "ip", "20/24h", 1, "4h", "4h"),
    )
}

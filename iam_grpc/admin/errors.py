"""What an operator request can fail with; messages name the problem, never a secret or an
account's data."""

from __future__ import annotations

__all__ = ["AdminError", "Invalid", "NotFound", "Unavailable"]


class AdminError(Exception):
    """An operator request that cannot be done."""


class NotFound(AdminError):
    """The user, role, key or row named does not exist."""


class Invalid(AdminError):
    """The request itself is malformed (a role name, a limiter group, a choice of arguments)."""


class Unavailable(AdminError):
    """What was asked for is not reachable from here (in-process state of a running server)."""

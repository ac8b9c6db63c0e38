"""The one error of building and opening the service."""

from __future__ import annotations

__all__ = ["StartupError"]


class StartupError(Exception):
    """The service cannot start; the message names what to fix (never a secret)."""

"""The storage port of second factors kept in SQL: TOTP and its recovery codes.

Kept apart from ``ports.py`` (one idea per module); ``Transaction.totp`` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

__all__ = ["TotpFactor", "TotpStore"]


@dataclass(frozen=True, slots=True)
class TotpFactor:
    user_id: str
    secret_enc: bytes  # sealed under the master key's ``totp`` sub-key, bound to the user id
    enabled_at: datetime
    last_step: int  # the newest time-step a code was accepted for


class TotpStore(Protocol):
    async def get(self, user_id: str) -> TotpFactor | None: ...

    async def enable(self, factor: TotpFactor) -> None:
        """Insert the user's factor; a second one raises ``Conflict('totp_factors.primary')``."""
        ...

    async def advance_step(self, user_id: str, step: int) -> bool:
        """Compare-and-set ``last_step`` to ``step`` if it is newer: False when a code of this
        step (or a later one) was accepted already (a replay, on any replica)."""
        ...

    async def disable(self, user_id: str) -> bool:
        """Delete the factor and every recovery code; False when there was no factor."""
        ...

    async def replace_recovery_codes(self, user_id: str, code_hashes: Sequence[str], now: datetime) -> None:
        """The user's recovery codes become exactly these (the earlier ones stop working)."""
        ...

    async def spend_recovery_code(self, user_id: str, code_hash: str, now: datetime) -> bool:
        """Mark one unused code of the user used; False when unknown or used already."""
        ...

    async def recovery_codes_left(self, user_id: str) -> int: ...

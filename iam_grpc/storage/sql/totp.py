"""TOTP factors and recovery codes (migration 0005)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, insert, select, update

from iam_grpc.storage.factor_ports import TotpFactor
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import totp_factors, totp_recovery_codes

__all__ = ["SqlTotpStore"]


class SqlTotpStore:
    def __init__(self, connection: SqlConnection) -> None:
        self._c = connection

    async def get(self, user_id: str) -> TotpFactor | None:
        rows = await self._c.execute(select(totp_factors).where(totp_factors.c.user_id == user_id))
        row = rows.first()
        return TotpFactor(**dict(row._mapping)) if row is not None else None

    async def enable(self, factor: TotpFactor) -> None:
        await self._c.execute(
            insert(totp_factors).values(
                user_id=factor.user_id,
                secret_enc=factor.secret_enc,
                enabled_at=factor.enabled_at,
                last_step=factor.last_step,
            )
        )

    async def advance_step(self, user_id: str, step: int) -> bool:
        result = await self._c.execute(
            update(totp_factors)
            .where(totp_factors.c.user_id == user_id, totp_factors.c.last_step < step)
            .values(last_step=step)
        )
        return result.rowcount == 1

    async def disable(self, user_id: str) -> bool:
        await self._c.execute(delete(totp_recovery_codes).where(totp_recovery_codes.c.user_id == user_id))
        result = await self._c.execute(delete(totp_factors).where(totp_factors.c.user_id == user_id))
        return result.rowcount == 1

    async def replace_recovery_codes(self, user_id: str, code_hashes: Sequence[str], now: datetime) -> None:
        await self._c.execute(delete(totp_recovery_codes).where(totp_recovery_codes.c.user_id == user_id))
        if code_hashes:
            await self._c.execute(
                insert(totp_recovery_codes),
                [
                    {"code_hash": h, "user_id": user_id, "created_at": now, "used_at": None}
                    for h in code_hashes
                ],
            )

    async def spend_recovery_code(self, user_id: str, code_hash: str, now: datetime) -> bool:
        result = await self._c.execute(
            update(totp_recovery_codes)
            .where(
                totp_recovery_codes.c.code_hash == code_hash,
                totp_recovery_codes.c.user_id == user_id,
                totp_recovery_codes.c.used_at.is_(None),
            )
            .values(used_at=now)
        )
        return result.rowcount == 1

    async def recovery_codes_left(self, user_id: str) -> int:
        rows = await self._c.execute(
            select(func.count())
            .select_from(totp_recovery_codes)
            .where(totp_recovery_codes.c.user_id == user_id, totp_recovery_codes.c.used_at.is_(None))
        )
        return int(rows.scalar_one())

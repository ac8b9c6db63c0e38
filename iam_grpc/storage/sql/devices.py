"""Devices and user-devices."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from iam_grpc.storage.records import Device, UserDevice
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.tables import devices, user_devices

__all__ = ["SqlDeviceStore"]


_TOUCH_LINK = (
    update(user_devices)
    .where(user_devices.c.user_id == bindparam("user"), user_devices.c.device_id == bindparam("device"))
    .values(last_seen_at=bindparam("now"), last_ip=bindparam("ip"))
)


class SqlDeviceStore:
    def __init__(self, connection: AsyncConnection, dialect: str) -> None:
        self._c = connection
        self._dialect = dialect

    async def insert(self, device: Device) -> None:
        await self._c.execute(insert(devices).values(**to_values(device)))

    async def get(self, device_id: str) -> Device | None:
        row = (await self._c.execute(select(devices).where(devices.c.id == device_id))).first()
        return to_record(Device, row)

    async def update(self, device: Device) -> None:
        values = to_values(device, without=("id", "created_at"))
        await self._c.execute(update(devices).where(devices.c.id == device.id).values(**values))

    async def get_link(self, user_id: str, device_id: str) -> UserDevice | None:
        row = (
            await self._c.execute(
                select(user_devices).where(
                    user_devices.c.user_id == user_id, user_devices.c.device_id == device_id
                )
            )
        ).first()
        return to_record(UserDevice, row)

    async def save_link(self, link: UserDevice) -> None:
        values = to_values(link)
        changes = {k: v for k, v in values.items() if k not in ("user_id", "device_id", "first_seen_at")}
        if self._dialect == "mysql":
            upsert_mysql = mysql_insert(user_devices).values(**values)
            await self._c.execute(upsert_mysql.on_duplicate_key_update(**changes))
        else:
            upsert_sqlite = sqlite_insert(user_devices).values(**values)
            await self._c.execute(
                upsert_sqlite.on_conflict_do_update(index_elements=["user_id", "device_id"], set_=changes)
            )

    async def touch_link(self, user_id: str, device_id: str, now: datetime, ip: str) -> None:
        await self._c.execute(_TOUCH_LINK, {"user": user_id, "device": device_id, "now": now, "ip": ip})

    async def links_of(self, user_id: str) -> list[UserDevice]:
        rows = await self._c.execute(
            select(user_devices)
            .where(user_devices.c.user_id == user_id)
            .order_by(user_devices.c.last_seen_at.desc())
        )
        return [UserDevice(**dict(row._mapping)) for row in rows]

"""Devices and user-devices."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from iam_grpc.storage.records import Device, UserDevice
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import devices, user_devices

__all__ = ["SqlDeviceStore"]

# Built once (see users.py). Upserts take every value as a parameter; the update part reads them
# back with excluded.<column> (SQLite) or VALUES(<column>) (MySQL).
_INSERT_DEVICE = insert(devices)
_DEVICE = select(devices).where(devices.c.id == bindparam("b_id"))
_UPDATE_DEVICE = update(devices).where(devices.c.id == bindparam("b_id"))
_LINK = select(user_devices).where(
    user_devices.c.user_id == bindparam("b_user"), user_devices.c.device_id == bindparam("b_device")
)
_LINKS_OF = (
    select(user_devices)
    .where(user_devices.c.user_id == bindparam("b_user"))
    .order_by(user_devices.c.last_seen_at.desc())
)
_KEY_COLUMNS = ("user_id", "device_id", "first_seen_at")
_SQLITE_UPSERT = sqlite_insert(user_devices)
_SQLITE_SAVE_LINK = _SQLITE_UPSERT.on_conflict_do_update(
    index_elements=["user_id", "device_id"],
    set_={c.name: _SQLITE_UPSERT.excluded[c.name] for c in user_devices.c if c.name not in _KEY_COLUMNS},
)
_MYSQL_UPSERT = mysql_insert(user_devices)
_MYSQL_SAVE_LINK = _MYSQL_UPSERT.on_duplicate_key_update(
    {c.name: _MYSQL_UPSERT.inserted[c.name] for c in user_devices.c if c.name not in _KEY_COLUMNS}
)


_TOUCH_LINK = (
    update(user_devices)
    .where(user_devices.c.user_id == bindparam("user"), user_devices.c.device_id == bindparam("device"))
    .values(last_seen_at=bindparam("now"), last_ip=bindparam("ip"))
)


class SqlDeviceStore:
    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._dialect = dialect

    async def insert(self, device: Device) -> None:
        await self._c.execute(_INSERT_DEVICE, to_values(device))

    async def get(self, device_id: str) -> Device | None:
        row = (await self._c.execute(_DEVICE, {"b_id": device_id})).first()
        return to_record(Device, row)

    async def update(self, device: Device) -> None:
        values = to_values(device, without=("id", "created_at"))
        await self._c.execute(_UPDATE_DEVICE, {"b_id": device.id, **values})

    async def get_link(self, user_id: str, device_id: str) -> UserDevice | None:
        row = (await self._c.execute(_LINK, {"b_user": user_id, "b_device": device_id})).first()
        return to_record(UserDevice, row)

    async def save_link(self, link: UserDevice) -> None:
        statement = _MYSQL_SAVE_LINK if self._dialect == "mysql" else _SQLITE_SAVE_LINK
        await self._c.execute(statement, to_values(link))

    async def touch_link(self, user_id: str, device_id: str, now: datetime, ip: str) -> None:
        await self._c.execute(_TOUCH_LINK, {"user": user_id, "device": device_id, "now": now, "ip": ip})

    async def links_of(self, user_id: str) -> list[UserDevice]:
        rows = await self._c.execute(_LINKS_OF, {"b_user": user_id})
        return [UserDevice(**dict(row._mapping)) for row in rows]

"""Users and roles."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from iam_grpc.storage.records import User
from iam_grpc.storage.sql._rows import to_record, to_values
from iam_grpc.storage.sql.connection import SqlConnection
from iam_grpc.storage.sql.tables import roles, user_roles, users
from iam_grpc.storage.sql.types import UtcDateTime

__all__ = ["SqlUserStore"]

# Statements on the login and signup paths are built once: building one costs several times
# what running it does (bench/README.md).
_INSERT = insert(users)
_BY_ID = select(users).where(users.c.id == bindparam("b_id"))
_BY_EMAIL = select(users).where(users.c.email_norm == bindparam("b_email"))
_RECORD_LOGIN = update(users).where(users.c.id == bindparam("b_id")).values(last_login_at=bindparam("b_now"))
_ROLES_OF = (
    select(roles.c.name)
    .join(user_roles, user_roles.c.role_id == roles.c.id)
    .where(user_roles.c.user_id == bindparam("b_id"))
    .order_by(roles.c.name)
)


class SqlUserStore:
    def __init__(self, connection: SqlConnection, dialect: str) -> None:
        self._c = connection
        self._dialect = dialect

    async def insert(self, user: User) -> None:
        await self._c.execute(_INSERT, to_values(user))

    async def get(self, user_id: str) -> User | None:
        row = (await self._c.execute(_BY_ID, {"b_id": user_id})).first()
        return to_record(User, row)

    async def get_by_email(self, email_norm: str) -> User | None:
        row = (await self._c.execute(_BY_EMAIL, {"b_email": email_norm})).first()
        return to_record(User, row)

    async def set_password(
        self,
        user_id: str,
        password_hash: str,
        pepper_id: int,
        now: datetime,
        *,
        expect_credential_version: int | None = None,
        bump_version: bool = True,
        verify_email: bool = False,
    ) -> bool:
        condition = users.c.id == user_id
        if expect_credential_version is not None:
            condition = and_(condition, users.c.credential_version == expect_credential_version)
        values: dict[str, object] = {
            "password_hash": password_hash,
            "pepper_id": pepper_id,
            "updated_at": now,
        }
        if bump_version:
            values["credential_version"] = users.c.credential_version + 1
            values["password_changed_at"] = now
        if verify_email:
            values["email_verified_at"] = func.coalesce(
                users.c.email_verified_at, literal(now, type_=UtcDateTime()), type_=UtcDateTime()
            )
        result = await self._c.execute(update(users).where(condition).values(**values))
        return result.rowcount == 1

    async def change_email(
        self,
        user_id: str,
        email: str,
        email_norm: str,
        now: datetime,
        *,
        expect_email_norm: str,
        expect_credential_version: int,
    ) -> bool:
        result = await self._c.execute(
            update(users)
            .where(
                users.c.id == user_id,
                users.c.email_norm == expect_email_norm,
                users.c.credential_version == expect_credential_version,
            )
            # The address is a credential too: the bump voids every reset link mailed to the old
            # address, and any other pending email change.
            .values(
                email=email,
                email_norm=email_norm,
                email_verified_at=now,
                updated_at=now,
                credential_version=users.c.credential_version + 1,
            )
        )
        return result.rowcount == 1

    async def set_status(self, user_id: str, status: str, now: datetime) -> bool:
        result = await self._c.execute(
            update(users)
            .where(users.c.id == user_id)
            .values(
                status=status,
                disabled_at=now if status == "disabled" else None,
                updated_at=now,
                # disabling voids every link mailed before (each carries the credential version)
                credential_version=users.c.credential_version + (1 if status == "disabled" else 0),
            )
        )
        return result.rowcount == 1

    async def set_mfa_hold(self, user_id: str, until: datetime | None, now: datetime) -> None:
        await self._c.execute(
            update(users).where(users.c.id == user_id).values(mfa_hold_until=until, updated_at=now)
        )

    async def mark_email_verified(self, user_id: str, now: datetime) -> None:
        await self._c.execute(
            update(users)
            .where(users.c.id == user_id, users.c.email_verified_at.is_(None))
            .values(email_verified_at=now)
        )

    async def record_login(self, user_id: str, now: datetime) -> None:
        await self._c.execute(_RECORD_LOGIN, {"b_id": user_id, "b_now": now})

    async def ensure_roles(self, names: Sequence[str], now: datetime) -> None:
        wanted = sorted(set(names))
        if not wanted:
            return
        rows = [{"name": name, "created_at": now} for name in wanted]
        # Insert-or-ignore: replicas starting together on one database must not collide.
        if self._dialect == "mysql":
            upsert = mysql_insert(roles)
            await self._c.execute(upsert.on_duplicate_key_update(name=upsert.inserted.name), rows)
        else:
            await self._c.execute(sqlite_insert(roles).on_conflict_do_nothing(index_elements=["name"]), rows)

    async def grant_role(self, user_id: str, role: str, granted_by: str, now: datetime) -> bool:
        role_id = (await self._c.execute(select(roles.c.id).where(roles.c.name == role))).scalar()
        if role_id is None:
            raise LookupError("no such role")
        held = (
            await self._c.execute(
                select(user_roles.c.role_id).where(
                    user_roles.c.user_id == user_id, user_roles.c.role_id == role_id
                )
            )
        ).first()
        if held is not None:
            return False
        await self._c.execute(
            insert(user_roles).values(user_id=user_id, role_id=role_id, granted_at=now, granted_by=granted_by)
        )
        return True

    async def revoke_role(self, user_id: str, role: str) -> bool:
        role_id = select(roles.c.id).where(roles.c.name == role).scalar_subquery()
        result = await self._c.execute(
            delete(user_roles).where(user_roles.c.user_id == user_id, user_roles.c.role_id == role_id)
        )
        return result.rowcount > 0

    async def list_roles(self) -> list[tuple[str, str | None, int]]:
        holders = func.count(user_roles.c.user_id)
        query = (
            select(roles.c.name, roles.c.description, holders)
            .select_from(roles.outerjoin(user_roles, user_roles.c.role_id == roles.c.id))
            .group_by(roles.c.id, roles.c.name, roles.c.description)
            .order_by(roles.c.name)
        )
        rows = [tuple(row) for row in (await self._c.execute(query)).all()]
        return [(str(n), d, int(c)) for n, d, c in rows]

    async def delete_role(self, name: str) -> bool:
        role_id = (await self._c.execute(select(roles.c.id).where(roles.c.name == name))).scalar()
        if role_id is None:
            return False
        await self._c.execute(delete(user_roles).where(user_roles.c.role_id == role_id))
        await self._c.execute(delete(roles).where(roles.c.id == role_id))
        return True

    async def roles_of(self, user_id: str) -> list[str]:
        return list((await self._c.execute(_ROLES_OF, {"b_id": user_id})).scalars())

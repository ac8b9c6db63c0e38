"""iam.v1.UserService: the signed-in user's own profile (core/profiles.py) and the admin RPCs,
which call the operator use-cases of ``iam_grpc.admin`` over the running service's components
(the CLI's ``users`` and ``roles`` commands call the same functions)."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import TypeVar

from iam_grpc.admin import (
    AdminTools,
    Invalid,
    NotFound,
    delete_user,
    export_user,
    get_user,
    grant_role,
    list_audit_events,
    list_users,
    revoke_role,
    set_status,
)
from iam_grpc.core.call import current_call
from iam_grpc.core.profiles import ProfileChanges, Profiles, UserProfile
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import InvalidArgument, UserNotFound
from iam_grpc.interceptors.base import Context as Ctx
from iam_grpc.proto import common_pb2, user_pb2, user_pb2_grpc
from iam_grpc.services.convert import client_info, timestamp
from iam_grpc.services.user_requests import (
    check_audit_kinds,
    check_email_prefix,
    check_page,
    check_role,
    check_since,
    check_user_id,
)
from iam_grpc.storage.records import AuditEvent

__all__ = ["UserService", "user_message"]

T = TypeVar("T")
_STATUS = {"active": user_pb2.USER_STATUS_ACTIVE, "disabled": user_pb2.USER_STATUS_DISABLED}
_STATUS_FILTER = {user_pb2.USER_STATUS_ACTIVE: "active", user_pb2.USER_STATUS_DISABLED: "disabled"}


def user_message(profile: UserProfile) -> user_pb2.User:
    user = profile.user
    message = user_pb2.User(
        user_id=user.id,
        email=user.email,
        email_verified=user.email_verified_at is not None,
        name=user.name,
        last_name=user.last_name,
        locale=user.locale or "",
        roles=profile.roles,
        status=_STATUS.get(user.status, user_pb2.USER_STATUS_DISABLED),
        created_at=timestamp(user.created_at),
        mfa_methods=list(profile.methods.mfa_methods),
        identities=[
            common_pb2.Identity(
                provider=i.provider, subject=i.subject, email=i.email, linked_at=timestamp(i.linked_at)
            )
            for i in profile.methods.identities
        ],
    )
    if user.last_login_at is not None:
        message.last_login_at.CopyFrom(timestamp(user.last_login_at))
    return message


def audit_message(event: AuditEvent) -> user_pb2.AuditEvent:
    return user_pb2.AuditEvent(
        id=str(event.id),
        kind=event.type,
        at=timestamp(event.occurred_at),
        user_id=event.user_id or "",
        session_id=event.session_id or "",
        ip=event.ip or "",
        detail_json=json.dumps(event.details, separators=(",", ":"), sort_keys=True),
    )


async def _admin(step: Awaitable[T], field: str = "user_id") -> T:
    """An operator use-case's failures as the contract's errors."""
    try:
        return await step
    except NotFound:
        raise UserNotFound() from None
    except Invalid as invalid:
        raise InvalidArgument.one(field, str(invalid)) from None


def _note_user(user_id: str) -> None:
    call = current_call()
    if call is not None:
        call.user_id = user_id


class UserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, profiles: Profiles, tools: AdminTools) -> None:
        self._profiles = profiles
        self._tools = tools

    # the signed-in user ----------------------------------------------------------------------

    async def GetMe(self, request: user_pb2.GetMeRequest, context: Ctx) -> user_pb2.GetMeResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        profile = await self._profiles.get_me(client, request.access_token)
        _note_user(profile.user.id)
        return user_pb2.GetMeResponse(user=user_message(profile))

    async def UpdateProfile(
        self, request: user_pb2.UpdateProfileRequest, context: Ctx
    ) -> user_pb2.UpdateProfileResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        form = ProfileChanges(
            paths=list(request.update_mask.paths),
            name=request.name,
            last_name=request.last_name,
            locale=request.locale,
        )
        profile = await self._profiles.update(client, request.access_token, form)
        _note_user(profile.user.id)
        return user_pb2.UpdateProfileResponse(user=user_message(profile))

    async def DeleteMyAccount(
        self, request: user_pb2.DeleteMyAccountRequest, context: Ctx
    ) -> user_pb2.DeleteMyAccountResponse:
        violations = Violations()
        client = client_info(request.client, violations)
        violations.raise_any()
        await self._profiles.delete_my_account(client, request.access_token, request.step_up_grant)
        return user_pb2.DeleteMyAccountResponse()

    # admin -------------------------------------------------------------------------------------

    async def _user(self, user_id: str) -> user_pb2.User:
        return user_message(await _admin(get_user(self._tools, user_id=user_id)))

    async def GetUser(self, request: user_pb2.GetUserRequest, context: Ctx) -> user_pb2.GetUserResponse:
        violations = Violations()
        key = request.WhichOneof("key")  # which field of the oneof is set, not a secret
        if request.HasField("user_id"):
            check_user_id(violations, "user_id", request.user_id)
        elif request.HasField("email"):
            check_email(violations, "email", request.email)
        else:
            violations.add("key", "give user_id or email")
        violations.raise_any()
        lookup = get_user(self._tools, user_id=request.user_id, email=request.email)
        return user_pb2.GetUserResponse(user=user_message(await _admin(lookup, key or "key")))

    async def ListUsers(self, request: user_pb2.ListUsersRequest, context: Ctx) -> user_pb2.ListUsersResponse:
        violations = Violations()
        check_page(violations, request.page_size, request.page_token)
        check_email_prefix(violations, request.email_prefix)
        check_role(violations, "role", request.role, required=False)
        if request.status not in _STATUS_FILTER and request.status != user_pb2.USER_STATUS_UNSPECIFIED:
            violations.add("status", "must be a UserStatus")
        violations.raise_any()
        listing = list_users(
            self._tools,
            page_size=request.page_size,
            page_token=request.page_token,
            email_prefix=request.email_prefix,
            role=request.role,
            status=_STATUS_FILTER.get(request.status, ""),
        )
        page = await _admin(listing, "page_token")
        return user_pb2.ListUsersResponse(
            users=[user_message(p) for p in page.users], next_page_token=page.next_page_token
        )

    async def DisableUser(
        self, request: user_pb2.DisableUserRequest, context: Ctx
    ) -> user_pb2.DisableUserResponse:
        violations = Violations()
        check_user_id(violations, "user_id", request.user_id)
        if len(request.reason) > 500 or any(ord(ch) < 32 and ch not in "\t" for ch in request.reason):
            violations.add("reason", "at most 500 characters, no control characters")
        violations.raise_any()
        await _admin(set_status(self._tools, request.user_id, "disabled", reason=request.reason))
        return user_pb2.DisableUserResponse(user=await self._user(request.user_id))

    async def EnableUser(
        self, request: user_pb2.EnableUserRequest, context: Ctx
    ) -> user_pb2.EnableUserResponse:
        _one_user_id(request.user_id)
        await _admin(set_status(self._tools, request.user_id, "active"))
        return user_pb2.EnableUserResponse(user=await self._user(request.user_id))

    async def GrantRole(self, request: user_pb2.GrantRoleRequest, context: Ctx) -> user_pb2.GrantRoleResponse:
        _role_change(request.user_id, request.role)
        grant = grant_role(self._tools, request.user_id, request.role, end_sessions=request.end_sessions)
        await _admin(grant, "role")
        return user_pb2.GrantRoleResponse(user=await self._user(request.user_id))

    async def RevokeRole(
        self, request: user_pb2.RevokeRoleRequest, context: Ctx
    ) -> user_pb2.RevokeRoleResponse:
        _role_change(request.user_id, request.role)
        revoke = revoke_role(
            self._tools, request.user_id, request.role, now=False, end_sessions=request.end_sessions
        )
        await _admin(revoke, "role")
        return user_pb2.RevokeRoleResponse(user=await self._user(request.user_id))

    async def DeleteUser(
        self, request: user_pb2.DeleteUserRequest, context: Ctx
    ) -> user_pb2.DeleteUserResponse:
        _one_user_id(request.user_id)
        await _admin(delete_user(self._tools, request.user_id))
        return user_pb2.DeleteUserResponse()

    async def ExportUser(
        self, request: user_pb2.ExportUserRequest, context: Ctx
    ) -> user_pb2.ExportUserResponse:
        _one_user_id(request.user_id)
        export = await _admin(export_user(self._tools, request.user_id))
        return user_pb2.ExportUserResponse(json=json.dumps(export, separators=(",", ":"), sort_keys=True))

    async def ListAuditEvents(
        self, request: user_pb2.ListAuditEventsRequest, context: Ctx
    ) -> user_pb2.ListAuditEventsResponse:
        violations = Violations()
        if request.user_id:
            check_user_id(violations, "user_id", request.user_id)
        check_audit_kinds(violations, list(request.kinds))
        since = check_since(violations, request.since if request.HasField("since") else None)
        check_page(violations, request.page_size, request.page_token)
        violations.raise_any()
        listing = list_audit_events(
            self._tools,
            user_id=request.user_id,
            kinds=list(request.kinds),
            since=since,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = await _admin(listing, "page_token")
        return user_pb2.ListAuditEventsResponse(
            events=[audit_message(e) for e in page.events], next_page_token=page.next_page_token
        )


def _one_user_id(user_id: str) -> None:
    violations = Violations()
    check_user_id(violations, "user_id", user_id)
    violations.raise_any()


def _role_change(user_id: str, role: str) -> None:
    violations = Violations()
    check_user_id(violations, "user_id", user_id)
    check_role(violations, "role", role)
    violations.raise_any()

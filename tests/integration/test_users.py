"""UserService (api.md, second round) on both backends: the signed-in user's profile, the admin
RPCs (through the caller method allow-list), disabling, erasure, export and the audit trail, and
the events each change writes in its transaction."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask

from iam_grpc.core.api_tokens import NewApiToken
from iam_grpc.core.client import ClientInfo
from iam_grpc.proto import (
    api_token_pb2,
    api_token_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import PASSWORD, account_env, code_of, failure, new_email, signup, wait_for_mail
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX, NO_ANOMALY_CHECKS

IP = "203.0.113.10"
NOBODY = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # a well-formed id of no one
BFF_KEY = "iamk_bff_" + "u" * 43
CALLERS = {
    # a BFF allowed the end-user services only: every admin RPC is refused to it
    "IAM_CALLERS__BFF__API_KEY_SHA256": json.dumps([hashlib.sha256(BFF_KEY.encode()).hexdigest()]),
    "IAM_CALLERS__BFF__METHODS": json.dumps(
        ["iam.v1.AuthService/*", "iam.v1.UserService/GetMe", "iam.v1.UserService/UpdateProfile"]
    ),
    "IAM_CALLERS__BFF__TRUST_CLIENT_IP": "true",
}


def here(device_id: str) -> common_pb2.ClientContext:
    return common_pb2.ClientContext(ip=IP, user_agent=FIREFOX, device_id=device_id)


@dataclass(frozen=True)
class Stubs:
    auth: auth_pb2_grpc.AuthServiceStub
    users: user_pb2_grpc.UserServiceStub
    tokens: token_pb2_grpc.TokenServiceStub
    mfa: mfa_pb2_grpc.MfaServiceStub
    api: api_token_pb2_grpc.ApiTokenServiceStub


@dataclass(frozen=True)
class Member:
    """A signed-up user as the BFF holds it."""

    user_id: str
    email: str
    session: common_pb2.Session

    @property
    def client(self) -> common_pb2.ClientContext:
        return here(self.session.device_id)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(
    backend: Backend, mailbox: Mailbox, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    groups = {"login.pair": {"windows": ["1000/1s"]}}  # logins repeated at once for comparison
    env = account_env(backend, mailbox, groups, **NO_ANOMALY_CHECKS, **CALLERS)
    async with running_service(tmp_path_factory.mktemp("users"), env) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stubs(iam: RunningService) -> AsyncIterator[Stubs]:
    async with iam.channel() as channel:
        yield Stubs(
            auth_pb2_grpc.AuthServiceStub(channel),
            user_pb2_grpc.UserServiceStub(channel),
            token_pb2_grpc.TokenServiceStub(channel),
            mfa_pb2_grpc.MfaServiceStub(channel),
            api_token_pb2_grpc.ApiTokenServiceStub(channel),
        )


async def member(stubs: Stubs, email: str | None = None) -> Member:
    address = email or new_email()
    session = await signup(stubs.auth, address)
    return Member(session.user_id, address, session)


async def verified(stubs: Stubs, access_token: str) -> str:
    try:
        await stubs.tokens.VerifyAccessToken(token_pb2.VerifyAccessTokenRequest(access_token=access_token))
    except grpc.aio.AioRpcError as error:
        return error_details(error).reason or ""
    return "OK"


async def api_token_of(iam: RunningService, who: Member) -> str:
    issued = await iam.app.components.api_tokens.create(
        ClientInfo(ip=IP, user_agent=FIREFOX, device_id=who.session.device_id),
        who.session.access_token,
        NewApiToken("script", ["repo:read"], None, []),
    )
    return issued.secret


async def api_token_works(stubs: Stubs, secret: str) -> str:
    try:
        await stubs.api.VerifyApiToken(api_token_pb2.VerifyApiTokenRequest(secret=secret))
    except grpc.aio.AioRpcError as error:
        return error_details(error).reason or ""
    return "OK"


async def events_of(iam: RunningService, user_id: str) -> list[str]:
    """The event kinds written for the user, oldest first (sequenced or not)."""
    from sqlalchemy import select

    from iam_grpc.storage.sql.tables import events

    async with iam.app.components.db.transaction() as tx:
        rows = await tx.connection.execute(  # type: ignore[attr-defined]
            select(events.c.kind).where(events.c.user_id == user_id).order_by(events.c.pos)
        )
        return [str(kind) for kind in rows.scalars()]


# the signed-in user ---------------------------------------------------------------------------


async def test_get_me_answers_the_token_owner_s_profile(stubs: Stubs) -> None:
    """GetMe: id, email, names, roles, status ACTIVE, mfa_methods ["email"], never a secret."""
    who = await member(stubs)
    me = (
        await stubs.users.GetMe(
            user_pb2.GetMeRequest(client=who.client, access_token=who.session.access_token)
        )
    ).user
    assert (me.user_id, me.email, me.name, me.last_name) == (who.user_id, who.email, "Ada", "Lovelace")
    assert (me.status, list(me.mfa_methods), list(me.identities)) == (
        user_pb2.USER_STATUS_ACTIVE,
        ["email"],
        [],
    )
    assert "user" in me.roles
    assert me.HasField("created_at")


async def test_get_me_refuses_a_token_presented_from_another_device(stubs: Stubs) -> None:
    """client.device_id must be the token's device: TOKEN_INVALID otherwise."""
    who, other = await member(stubs), await member(stubs)
    code, details = await failure(
        stubs.users.GetMe(user_pb2.GetMeRequest(client=other.client, access_token=who.session.access_token))
    )
    assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


async def test_update_profile_changes_only_the_masked_fields(iam: RunningService, stubs: Stubs) -> None:
    """name and locale in the mask change; last_name (not in the mask) stays; user.updated is
    written as an audit row and an event in the same transaction."""
    who = await member(stubs)
    answer = await stubs.users.UpdateProfile(
        user_pb2.UpdateProfileRequest(
            client=who.client,
            access_token=who.session.access_token,
            name="  Augusta ",
            last_name="ignored",
            locale="pt-BR",
            update_mask=FieldMask(paths=["name", "locale"]),
        )
    )
    assert (answer.user.name, answer.user.last_name, answer.user.locale) == ("Augusta", "Lovelace", "pt-BR")
    assert "user.updated" in await events_of(iam, who.user_id)
    code, details = await failure(
        stubs.users.UpdateProfile(
            user_pb2.UpdateProfileRequest(
                client=who.client,
                access_token=who.session.access_token,
                update_mask=FieldMask(paths=["email"]),
            )
        )
    )
    assert (code, set(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {"update_mask"})


# admin lookups ---------------------------------------------------------------------------------


async def test_get_user_by_id_or_email_and_unknown_users(stubs: Stubs) -> None:
    """GetUser by id and by email in any case; an unknown id or email is NOT_FOUND USER_NOT_FOUND."""
    who = await member(stubs)
    by_id = (await stubs.users.GetUser(user_pb2.GetUserRequest(user_id=who.user_id))).user
    by_email = (await stubs.users.GetUser(user_pb2.GetUserRequest(email=who.email.upper()))).user
    assert by_id == by_email
    assert by_id.user_id == who.user_id
    for request in (user_pb2.GetUserRequest(user_id=NOBODY), user_pb2.GetUserRequest(email=new_email())):
        code, details = await failure(stubs.users.GetUser(request))
        assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    code, details = await failure(stubs.users.GetUser(user_pb2.GetUserRequest()))
    assert (code, set(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {"key"})


async def test_list_users_pages_through_a_filter(stubs: Stubs) -> None:
    """Pages of 2 over 3 users with one email prefix; the last page has no next token; a token
    with other filters is INVALID_ARGUMENT; role and status filters apply."""
    prefix = f"page.{secrets.token_hex(4)}."
    made = [await member(stubs, f"{prefix}{i}@example.com") for i in range(3)]
    first = await stubs.users.ListUsers(user_pb2.ListUsersRequest(page_size=2, email_prefix=prefix.upper()))
    assert len(first.users) == 2
    assert first.next_page_token
    second = await stubs.users.ListUsers(
        user_pb2.ListUsersRequest(page_size=2, email_prefix=prefix, page_token=first.next_page_token)
    )
    assert (len(second.users), second.next_page_token) == (1, "")
    assert [u.user_id for u in [*first.users, *second.users]] == sorted(m.user_id for m in made)
    code, details = await failure(
        stubs.users.ListUsers(user_pb2.ListUsersRequest(page_size=2, page_token=first.next_page_token))
    )
    assert (code, set(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    await stubs.users.GrantRole(user_pb2.GrantRoleRequest(user_id=made[1].user_id, role="auditor"))
    await stubs.users.DisableUser(user_pb2.DisableUserRequest(user_id=made[2].user_id))
    holders = await stubs.users.ListUsers(user_pb2.ListUsersRequest(email_prefix=prefix, role="auditor"))
    assert [u.user_id for u in holders.users] == [made[1].user_id]
    disabled = await stubs.users.ListUsers(
        user_pb2.ListUsersRequest(email_prefix=prefix, status=user_pb2.USER_STATUS_DISABLED)
    )
    assert [u.user_id for u in disabled.users] == [made[2].user_id]


# disabling -------------------------------------------------------------------------------------


async def test_disable_ends_sessions_and_api_tokens_and_enable_keeps_them_ended(
    iam: RunningService, stubs: Stubs
) -> None:
    """DisableUser: status DISABLED, access token SESSION_REVOKED, API token TOKEN_INVALID, reset
    links void; user.disabled and session.revoked events. EnableUser: ACTIVE, what ended stays
    ended. Both idempotent."""
    who = await member(stubs)
    secret = await api_token_of(iam, who)
    assert await api_token_works(stubs, secret) == "OK"
    disabled = await stubs.users.DisableUser(user_pb2.DisableUserRequest(user_id=who.user_id, reason="left"))
    assert disabled.user.status == user_pb2.USER_STATUS_DISABLED
    await stubs.users.DisableUser(user_pb2.DisableUserRequest(user_id=who.user_id))
    assert await verified(stubs, who.session.access_token) == "SESSION_REVOKED"
    assert await api_token_works(stubs, secret) == "TOKEN_INVALID"
    kinds = await events_of(iam, who.user_id)
    assert kinds.count("user.disabled") == 1
    assert "session.revoked" in kinds
    enabled = await stubs.users.EnableUser(user_pb2.EnableUserRequest(user_id=who.user_id))
    assert enabled.user.status == user_pb2.USER_STATUS_ACTIVE
    assert "user.enabled" in await events_of(iam, who.user_id)
    assert await verified(stubs, who.session.access_token) == "SESSION_REVOKED"
    assert await api_token_works(stubs, secret) == "TOKEN_INVALID"
    for rpc in (
        stubs.users.DisableUser(user_pb2.DisableUserRequest(user_id=NOBODY)),
        stubs.users.EnableUser(user_pb2.EnableUserRequest(user_id=NOBODY)),
    ):
        code, details = await failure(rpc)
        assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


async def test_a_disabled_user_s_login_fails_exactly_like_a_wrong_password(
    iam: RunningService, stubs: Stubs
) -> None:
    """The right password of a disabled account: INVALID_CREDENTIALS, the same message, and one
    password verification, as a wrong password of an active account."""
    gone, active = await member(stubs), await member(stubs)
    await stubs.users.DisableUser(user_pb2.DisableUserRequest(user_id=gone.user_id))
    counter = iam.app.components.metrics.password_verifications

    async def login(email: str, password: str) -> tuple[grpc.StatusCode, str | None, str, float]:
        before = counter._value.get()
        code, details = await failure(
            stubs.auth.Login(auth_pb2.LoginRequest(client=here(""), email=email, password=password))
        )
        return code, details.reason, details.message, counter._value.get() - before

    assert await login(gone.email, PASSWORD) == await login(active.email, PASSWORD + "x")
    assert (await login(gone.email, PASSWORD))[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


# roles -----------------------------------------------------------------------------------------


async def test_grant_and_revoke_role_with_and_without_ending_sessions(
    iam: RunningService, stubs: Stubs
) -> None:
    """Without end_sessions the session lives on (the role reaches tokens at the next rotation);
    with it the session ends now. role.granted / role.revoked events; unknown user NOT_FOUND."""
    who = await member(stubs)
    granted = await stubs.users.GrantRole(user_pb2.GrantRoleRequest(user_id=who.user_id, role="billing"))
    assert "billing" in granted.user.roles
    assert await verified(stubs, who.session.access_token) == "OK"
    revoked = await stubs.users.RevokeRole(
        user_pb2.RevokeRoleRequest(user_id=who.user_id, role="billing", end_sessions=True)
    )
    assert "billing" not in revoked.user.roles
    assert await verified(stubs, who.session.access_token) == "SESSION_REVOKED"
    kinds = await events_of(iam, who.user_id)
    assert ("role.granted" in kinds, "role.revoked" in kinds) == (True, True)
    code, details = await failure(
        stubs.users.GrantRole(user_pb2.GrantRoleRequest(user_id=NOBODY, role="billing"))
    )
    assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


# erasure ---------------------------------------------------------------------------------------


async def test_delete_user_erases_personal_data_and_keeps_audit_rows_under_the_id(
    iam: RunningService, stubs: Stubs
) -> None:
    """DeleteUser: the user is gone for every lookup and login; sessions and API tokens end;
    audit rows remain under the id without addresses or details; a user.deleted event."""
    who = await member(stubs)
    secret = await api_token_of(iam, who)
    await stubs.users.DeleteUser(user_pb2.DeleteUserRequest(user_id=who.user_id))
    for request in (user_pb2.GetUserRequest(user_id=who.user_id), user_pb2.GetUserRequest(email=who.email)):
        assert (await failure(stubs.users.GetUser(request)))[1].reason == "USER_NOT_FOUND"
    assert (await failure(stubs.users.DeleteUser(user_pb2.DeleteUserRequest(user_id=who.user_id))))[
        1
    ].reason == ("USER_NOT_FOUND")
    assert await verified(stubs, who.session.access_token) == "SESSION_REVOKED"
    assert await api_token_works(stubs, secret) == "TOKEN_INVALID"
    login = stubs.auth.Login(auth_pb2.LoginRequest(client=here(""), email=who.email, password=PASSWORD))
    assert (await failure(login))[1].reason == "INVALID_CREDENTIALS"
    audit = await stubs.users.ListAuditEvents(user_pb2.ListAuditEventsRequest(user_id=who.user_id))
    assert {e.kind for e in audit.events} >= {"user.signup", "user.deleted"}
    assert all((e.ip, e.detail_json) == ("", "{}") for e in audit.events)
    assert "user.deleted" in await events_of(iam, who.user_id)
    async with iam.app.components.db.transaction() as tx:
        row = await tx.users.get(who.user_id)
    assert row is not None
    assert (row.email, row.name, row.password_hash, row.status) == ("", "", None, "deleted")


async def test_delete_my_account_needs_a_delete_account_grant_of_the_same_session(
    iam: RunningService, stubs: Stubs, mailbox: Mailbox
) -> None:
    """StartStepUp("delete-account") → code → grant; a grant of another session is refused;
    the right one erases the account, once."""
    who, other = await member(stubs), await member(stubs)

    async def grant_for(m: Member) -> str:
        challenge = await stubs.mfa.StartStepUp(
            mfa_pb2.StartStepUpRequest(
                client=m.client, access_token=m.session.access_token, action="delete-account"
            )
        )
        code = code_of((await wait_for_mail(mailbox, m.email, "Confirm an action"))[-1])
        answer = await stubs.mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(client=m.client, challenge_id=challenge.challenge_id, code=code)
        )
        return answer.grant.grant_token

    foreign = await grant_for(other)
    code, details = await failure(
        stubs.users.DeleteMyAccount(
            user_pb2.DeleteMyAccountRequest(
                client=who.client, access_token=who.session.access_token, step_up_grant=foreign
            )
        )
    )
    assert (code, set(details.field_violations)) == (grpc.StatusCode.INVALID_ARGUMENT, {"step_up_grant"})
    grant = await grant_for(who)
    request = user_pb2.DeleteMyAccountRequest(
        client=who.client, access_token=who.session.access_token, step_up_grant=grant
    )
    await stubs.users.DeleteMyAccount(request)
    assert (await failure(stubs.users.GetUser(user_pb2.GetUserRequest(user_id=who.user_id))))[1].reason == (
        "USER_NOT_FOUND"
    )
    assert (await failure(stubs.users.DeleteMyAccount(request)))[1].reason in (
        "SESSION_REVOKED",
        "CHALLENGE_EXPIRED",
    )


# export and audit ------------------------------------------------------------------------------


async def test_export_user_holds_profile_sessions_and_token_metadata_but_no_secret(
    iam: RunningService, stubs: Stubs
) -> None:
    """ExportUser: one JSON object with the profile, devices, sessions, API tokens (no hash or
    secret) and audit events; unknown user NOT_FOUND."""
    who = await member(stubs)
    secret = await api_token_of(iam, who)
    export = json.loads((await stubs.users.ExportUser(user_pb2.ExportUserRequest(user_id=who.user_id))).json)
    assert export["user"]["email"] == who.email
    assert "password_hash" not in export["user"]
    assert [s["id"] for s in export["sessions"]] == [who.session.session_id]
    assert len(export["devices"]) == 1
    assert [t["name"] for t in export["api_tokens"]] == ["script"]
    assert "secret_hash" not in export["api_tokens"][0]
    assert secret not in json.dumps(export)
    assert "user.signup" in {e["type"] for e in export["audit_events"]}
    assert (await failure(stubs.users.ExportUser(user_pb2.ExportUserRequest(user_id=NOBODY))))[1].reason == (
        "USER_NOT_FOUND"
    )


async def test_list_audit_events_filters_by_kind_and_time_and_pages_newest_first(stubs: Stubs) -> None:
    """kinds and since filter; pages of 1 walk the events newest first to an empty token."""
    who = await member(stubs)
    await stubs.users.GrantRole(user_pb2.GrantRoleRequest(user_id=who.user_id, role="auditor"))
    await stubs.users.RevokeRole(user_pb2.RevokeRoleRequest(user_id=who.user_id, role="auditor"))
    kinds = ["roles.granted", "roles.revoked"]
    page = await stubs.users.ListAuditEvents(
        user_pb2.ListAuditEventsRequest(user_id=who.user_id, kinds=kinds, page_size=1)
    )
    seen = list(page.events)
    while page.next_page_token:
        page = await stubs.users.ListAuditEvents(
            user_pb2.ListAuditEventsRequest(
                user_id=who.user_id, kinds=kinds, page_size=1, page_token=page.next_page_token
            )
        )
        seen += page.events
    assert [e.kind for e in seen] == ["roles.revoked", "roles.granted"]
    assert json.loads(seen[0].detail_json)["role"] == "auditor"
    later = user_pb2.ListAuditEventsRequest(user_id=who.user_id)
    later.since.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert list((await stubs.users.ListAuditEvents(later)).events) == []


# callers ---------------------------------------------------------------------------------------


async def test_admin_rpcs_are_refused_to_a_caller_whose_allow_list_omits_them(
    stubs: Stubs, iam: RunningService
) -> None:
    """A BFF allowed AuthService/* and GetMe: GetMe works, every admin RPC is PERMISSION_DENIED
    CALLER_UNKNOWN (the loopback default allows them, as the other tests show)."""
    who = await member(stubs)
    key = (("x-iam-api-key", BFF_KEY),)
    async with iam.channel() as channel:
        users = user_pb2_grpc.UserServiceStub(channel)
        me = await users.GetMe(
            user_pb2.GetMeRequest(client=who.client, access_token=who.session.access_token), metadata=key
        )
        assert me.user.user_id == who.user_id
        refused = [
            users.GetUser(user_pb2.GetUserRequest(user_id=who.user_id), metadata=key),
            users.ListUsers(user_pb2.ListUsersRequest(), metadata=key),
            users.DisableUser(user_pb2.DisableUserRequest(user_id=who.user_id), metadata=key),
            users.GrantRole(user_pb2.GrantRoleRequest(user_id=who.user_id, role="admin"), metadata=key),
            users.DeleteUser(user_pb2.DeleteUserRequest(user_id=who.user_id), metadata=key),
            users.ExportUser(user_pb2.ExportUserRequest(user_id=who.user_id), metadata=key),
            users.ListAuditEvents(user_pb2.ListAuditEventsRequest(), metadata=key),
            api_token_pb2_grpc.ApiTokenServiceStub(channel).VerifyApiToken(
                api_token_pb2.VerifyApiTokenRequest(secret="iam_pat_x"), metadata=key
            ),
        ]
        for call in refused:
            code, details = await failure(call)
            assert (code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_UNKNOWN")
    assert (await stubs.users.GetUser(user_pb2.GetUserRequest(user_id=who.user_id))).user.status == (
        user_pb2.USER_STATUS_ACTIVE
    )


async def test_the_cli_and_the_rpc_disable_through_the_same_use_case(
    iam: RunningService, stubs: Stubs
) -> None:
    """iam_grpc.admin.set_status (the CLI's users disable) ends API tokens too, and writes the
    same user.disabled event as DisableUser."""
    from iam_grpc.admin import AdminTools, set_status

    who = await member(stubs)
    secret = await api_token_of(iam, who)
    ended = await set_status(AdminTools.from_components(iam.app.components), who.email, "disabled")
    assert ended.count == 1
    assert await api_token_works(stubs, secret) == "TOKEN_INVALID"
    assert "user.disabled" in await events_of(iam, who.user_id)

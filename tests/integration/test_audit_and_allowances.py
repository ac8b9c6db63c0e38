"""The audit trail of a whole account's life (security.md S69, behaviour.md 9.6) and the bounds of
the proxy/hosting allowance (S70, behaviour.md 3.2 check 8 and 3.4), on both backends."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from iam_grpc.clock import ManualClock
from iam_grpc.proto import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    mfa_pb2,
    mfa_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
)
from iam_grpc.storage.records import AuditEvent
from iam_grpc.testing import RunningService, running_service
from tests.accounts_helper import (
    PASSWORD,
    account_env,
    client,
    code_of,
    failure,
    link_token,
    new_email,
    wait_for_mail,
)
from tests.conftest import Backend
from tests.geo_fixture import BERLIN_IP, HOSTING_IP, VPN_IP, GeoPaths, write_default_geo_databases
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX, IPHONE

NEW_PASSWORD = "a brand new passphrase 7"
LAPTOP_IP = "203.0.113.10"
PHONE_IP = "198.51.100.23"
LIMITS = {
    "code.ip": {"windows": ["1000/1s"]},
    "login.pair": {"windows": ["1000/1h fc"]},
    "refresh.ip": {"windows": ["1000/1s"]},
    "refresh.token": {"windows": ["1000/1m"]},
}
SECRET_SHAPES = re.compile(r"iam[rgk]_[\w-]{20,}|eyJ[\w-]+\.[\w-]+\.[\w-]+")


# S69 ---------------------------------------------------------------------------------------------


@dataclass
class Flow:
    """The calls of the scripted flow: each step's x-request-id and client ip, in order, and every
    secret the flow handled (none may reach the audit trail)."""

    steps: dict[str, tuple[str, str]] = field(default_factory=dict)  # step -> (request id, ip)
    secrets: dict[str, str] = field(default_factory=dict)  # what -> value

    def call(self, step: str, ip: str) -> tuple[tuple[str, str]]:
        """The metadata of the call of ``step`` from ``ip``: a request id of its own."""
        assert step not in self.steps
        request_id = f"s69-{step}-{secrets.token_hex(6)}"
        self.steps[step] = (request_id, ip)
        return (("x-request-id", request_id),)

    def keep(self, what: str, value: str) -> str:
        assert value, what
        self.secrets[what] = value
        return value

    def step_of(self, event: AuditEvent) -> str:
        found = [step for step, (request_id, _) in self.steps.items() if request_id == event.request_id]
        assert found, f"{event.type} has request id {event.request_id!r}, not one of the flow's"
        return found[0]


def kind(event: AuditEvent) -> str:
    """The event type, with the reason for session revocations (9.6 lists those reasons)."""
    if event.type == "session.revoked":
        return f"session.revoked:{event.details.get('reason')}"
    return event.type


# What each call of the flow must leave in audit_events (behaviour.md 9.6 and the sections it
# cites), as sets: the order of events within one transaction is not part of the contract.
EXPECTED: dict[str, set[str]] = {
    # 2.3, 1.7: the account, its first session, and trust granted to the signup device
    "signup": {"user.signup", "session.created", "device.trusted"},
    # 2.4 step 9: a new device needs MFA; 4.1: the code is sent
    "phone_login": {"login.mfa_required", "mfa.sent"},
    # 2.4 step 10 after 4.2, 1.7: session, success, verification, the phone now trusted
    "phone_verify": {"mfa.verified", "device.trusted", "session.created", "login.success"},
    "phone_refresh": set(),  # an ordinary rotation is not an audit event
    # 1.5: the replay ends the session and the device's trust
    "phone_replay": {"refresh.reuse_detected", "session.revoked:reuse", "device.untrusted"},
    "reset_request": {"password.reset_requested"},
    # 2.5 step 5: every session ends (here the laptop's)
    "reset": {"password.reset", "session.revoked:password_reset"},
    # the replay put a security hold on the account (1.5): MFA even on the trusted laptop
    "laptop_login": {"login.mfa_required", "mfa.sent"},
    "laptop_verify": {"mfa.verified", "session.created", "login.success"},
    "second_login": {"login.mfa_required", "mfa.sent"},
    "second_verify": {"mfa.verified", "session.created", "login.success"},
    "email_request": {"email.change_requested"},
    # 2.7: every session but the requesting one ends
    "email_confirm": {"email.changed", "session.revoked:email_change"},
    "step_up": {"mfa.sent"},
    "step_up_verify": {"step_up.granted"},
    "step_up_consume": {"step_up.consumed"},
    "logout": {"session.revoked:logout"},
}
# Events that are about a device or happen on one carry its id; events about a session, the
# session's id.
WITH_DEVICE = {
    "user.signup",
    "session.created",
    "device.trusted",
    "device.untrusted",
    "mfa.verified",
    "login.success",
    "refresh.reuse_detected",
}
WITH_SESSION = {
    "user.signup",
    "session.created",
    "session.revoked",
    "mfa.verified",
    "login.success",
    "refresh.reuse_detected",
    "email.change_requested",
    "step_up.granted",
    "step_up.consumed",
}


async def run_flow(iam: RunningService, mailbox: Mailbox, flow: Flow) -> dict[str, common_pb2.Session]:
    """Signup, new-device login with MFA, refresh, replay, reset, login under the security hold,
    email change, step-up, logout: every call through the real RPCs with its own x-request-id.
    Returns the sessions by the step that opened them."""
    email = flow.keep("email", new_email())
    new_address = flow.keep("new email", new_email())
    flow.keep("password", PASSWORD)
    flow.keep("new password", NEW_PASSWORD)
    laptop = client(ip=LAPTOP_IP, ua=FIREFOX)
    phone = client(ip=PHONE_IP, ua=IPHONE)
    opened: dict[str, common_pb2.Session] = {}
    async with iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)
        tokens = token_pb2_grpc.TokenServiceStub(channel)

        signed_up = await auth.Signup(
            auth_pb2.SignupRequest(
                client=laptop,
                email=email,
                password=PASSWORD,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            ),
            metadata=flow.call("signup", LAPTOP_IP),
        )
        opened["signup"] = first = signed_up.session
        flow.keep("signup refresh token", first.refresh_token)
        flow.keep("signup access token", first.access_token)
        laptop = client(ip=LAPTOP_IP, ua=FIREFOX, device_id=first.device_id)

        challenge = await auth.Login(
            auth_pb2.LoginRequest(client=phone, email=email, password=PASSWORD),
            metadata=flow.call("phone_login", PHONE_IP),
        )
        assert (challenge.WhichOneof("result"), challenge.mfa.reason) == ("mfa", "NEW_DEVICE")
        message = (await wait_for_mail(mailbox, email, "sign-in code"))[-1]
        flow.keep("phone link", link_token(message))
        verified = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=phone,
                challenge_id=challenge.mfa.challenge_id,
                code=flow.keep("phone code", code_of(message)),
            ),
            metadata=flow.call("phone_verify", PHONE_IP),
        )
        opened["phone_verify"] = on_phone = verified.session
        flow.keep("phone refresh token", on_phone.refresh_token)
        flow.keep("phone access token", on_phone.access_token)
        phone = client(ip=PHONE_IP, ua=IPHONE, device_id=on_phone.device_id)

        rotated = await tokens.Refresh(
            token_pb2.RefreshRequest(client=phone, refresh_token=on_phone.refresh_token),
            metadata=flow.call("phone_refresh", PHONE_IP),
        )
        assert rotated.WhichOneof("result") == "session"
        flow.keep("rotated refresh token", rotated.session.refresh_token)
        await asyncio.sleep(1.5)  # past refresh.grace = 1 s: the old token is now a replay
        _status, details = await failure(
            tokens.Refresh(
                token_pb2.RefreshRequest(client=phone, refresh_token=on_phone.refresh_token),
                metadata=flow.call("phone_replay", PHONE_IP),
            )
        )
        assert details.reason == "REFRESH_TOKEN_REUSED"

        await auth.RequestPasswordReset(
            auth_pb2.RequestPasswordResetRequest(client=laptop, email=email),
            metadata=flow.call("reset_request", LAPTOP_IP),
        )
        reset_link = flow.keep(
            "reset link", link_token((await wait_for_mail(mailbox, email, "Reset your"))[-1])
        )
        await auth.ResetPassword(
            auth_pb2.ResetPasswordRequest(client=laptop, link_token=reset_link, new_password=NEW_PASSWORD),
            metadata=flow.call("reset", LAPTOP_IP),
        )

        held = await auth.Login(
            auth_pb2.LoginRequest(client=laptop, email=email, password=NEW_PASSWORD),
            metadata=flow.call("laptop_login", LAPTOP_IP),
        )
        assert (held.WhichOneof("result"), held.mfa.reason) == ("mfa", "SECURITY_HOLD")
        message = (await wait_for_mail(mailbox, email, "sign-in code", count=2))[-1]
        flow.keep("laptop link", link_token(message))
        verified = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=laptop,
                challenge_id=held.mfa.challenge_id,
                code=flow.keep("laptop code", code_of(message)),
            ),
            metadata=flow.call("laptop_verify", LAPTOP_IP),
        )
        opened["laptop_verify"] = current = verified.session
        flow.keep("laptop refresh token", current.refresh_token)
        flow.keep("laptop access token", current.access_token)
        # a second session, for the email change to end (the hold lasts: MFA again)
        held = await auth.Login(
            auth_pb2.LoginRequest(client=laptop, email=email, password=NEW_PASSWORD),
            metadata=flow.call("second_login", LAPTOP_IP),
        )
        assert (held.WhichOneof("result"), held.mfa.reason) == ("mfa", "SECURITY_HOLD")
        message = (await wait_for_mail(mailbox, email, "sign-in code", count=3))[-1]
        flow.keep("second link", link_token(message))
        second = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=laptop,
                challenge_id=held.mfa.challenge_id,
                code=flow.keep("second code", code_of(message)),
            ),
            metadata=flow.call("second_verify", LAPTOP_IP),
        )
        opened["second_verify"] = second.session
        flow.keep("second refresh token", second.session.refresh_token)

        await auth.RequestEmailChange(
            auth_pb2.RequestEmailChangeRequest(
                client=laptop, access_token=current.access_token, new_email=new_address
            ),
            metadata=flow.call("email_request", LAPTOP_IP),
        )
        confirmation = (await wait_for_mail(mailbox, new_address, "Confirm your new"))[-1]
        await auth.ConfirmEmailChange(
            auth_pb2.ConfirmEmailChangeRequest(
                client=laptop, link_token=flow.keep("email change link", link_token(confirmation))
            ),
            metadata=flow.call("email_confirm", LAPTOP_IP),
        )

        step_up = await mfa.StartStepUp(
            mfa_pb2.StartStepUpRequest(
                client=laptop, access_token=current.access_token, action="delete-account"
            ),
            metadata=flow.call("step_up", LAPTOP_IP),
        )
        message = (await wait_for_mail(mailbox, new_address, "Confirm an action"))[-1]
        flow.keep("step-up link", link_token(message))
        granted = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=laptop,
                challenge_id=step_up.challenge_id,
                code=flow.keep("step-up code", code_of(message)),
            ),
            metadata=flow.call("step_up_verify", LAPTOP_IP),
        )
        grant = flow.keep("grant token", granted.grant.grant_token)
        consumed = await mfa.ConsumeStepUpGrant(
            mfa_pb2.ConsumeStepUpGrantRequest(grant_token=grant, action="delete-account"),
            metadata=flow.call("step_up_consume", "127.0.0.1"),  # no client context: the peer
        )
        assert consumed.session_id == current.session_id

        await auth.Logout(
            auth_pb2.LogoutRequest(client=laptop, refresh_token=current.refresh_token),
            metadata=flow.call("logout", LAPTOP_IP),
        )
    return opened


async def trail(iam: RunningService, user_id: str) -> list[AuditEvent]:
    """The user's audit events, oldest first, once background records are written."""
    await iam.app.components.audit.drain()
    async with iam.app.components.db.transaction(read_only=True) as tx:
        events = await tx.audit.recent(user_id=user_id, limit=1000)
    return sorted(events, key=lambda e: e.id or 0)


def leaks(event: AuditEvent, flow: Flow) -> list[str]:
    """What of the flow's secrets (or anything shaped like a token) the event carries."""
    text = json.dumps(event.details, default=str)
    columns = " ".join(
        str(value) for value in (event.type, event.outcome, event.caller, event.request_id, event.ip) if value
    )
    found = [what for what, value in flow.secrets.items() if value.lower() in (text + columns).lower()]
    return found + SECRET_SHAPES.findall(text + columns)


async def test_an_account_s_life_is_audited_step_by_step_without_secrets(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """S69: a scripted flow (signup, new-device login with MFA, refresh, replay after the grace
    window, password reset, login under the resulting security hold, email change, step-up,
    logout) leaves, per call and in call order, the event types behaviour.md 9.6 requires; every
    event names the user, the call's x-request-id, the client ip and the caller, plus the session
    and device where they apply; no password, token, code, link or email address appears in any
    event. (The other half of S69, a rolled-back transaction leaving no event, is covered by
    tests/integration/test_half_written.py, which compares each account's audit trail before and
    after a failpoint aborts the commit.)"""
    env = account_env(
        backend, mailbox, LIMITS, IAM_REFRESH_GRACE_SECONDS="1", IAM_RESET__RESPONSE_FLOOR="50ms"
    )
    flow = Flow()
    async with running_service(tmp_path, env) as iam:
        opened = await run_flow(iam, mailbox, flow)
        user_id = opened["signup"].user_id
        events = await trail(iam, user_id)

    assert events, "no audit events"
    steps = list(flow.steps)
    sessions = {step: session.session_id for step, session in opened.items()}
    devices = {step: session.device_id for step, session in opened.items()}
    # every event: the user, the request id of the call that caused it (in call order), the
    # call's client ip, the caller, and no secret
    order = [steps.index(flow.step_of(event)) for event in events]
    assert order == sorted(order), "events are not in the order of the calls that caused them"
    for event in events:
        step = flow.step_of(event)
        what = f"{kind(event)} of {step}"
        assert event.user_id == user_id, what
        assert event.ip == flow.steps[step][1], what
        assert event.caller, what
        assert event.outcome in ("ok", "fail", "info"), what
        if event.type in WITH_SESSION:
            assert event.session_id, f"{what} names no session"
        if event.type in WITH_DEVICE:
            assert event.device_id, f"{what} names no device"
        assert leaks(event, flow) == [], f"{what} carries {leaks(event, flow)}: {event.details}"

    def the(step: str, type_: str) -> AuditEvent:
        (event,) = [e for e in events if flow.step_of(e) == step and kind(e) == type_]
        return event

    # the ids are the right ones, not just present
    signed_up = the("signup", "user.signup")
    assert (signed_up.session_id, signed_up.device_id) == (sessions["signup"], devices["signup"])
    assert the("phone_verify", "device.trusted").device_id == devices["phone_verify"]
    replay = the("phone_replay", "refresh.reuse_detected")
    assert (replay.session_id, replay.device_id) == (sessions["phone_verify"], devices["phone_verify"])
    assert the("phone_replay", "session.revoked:reuse").session_id == sessions["phone_verify"]
    assert the("phone_replay", "device.untrusted").device_id == devices["phone_verify"]
    assert the("step_up_consume", "step_up.consumed").session_id == sessions["laptop_verify"]
    assert the("logout", "session.revoked:logout").session_id == sessions["laptop_verify"]

    # every call left the events 9.6 requires for it
    recorded: dict[str, set[str]] = {step: set() for step in steps}
    for event in events:
        recorded[flow.step_of(event)].add(kind(event))
    missing = {
        step: sorted(EXPECTED[step] - recorded[step]) for step in steps if EXPECTED[step] - recorded[step]
    }
    assert missing == {}, f"missing audit events per call: {missing}; recorded: {recorded}"
    assert the("signup", "device.trusted").device_id == devices["signup"]
    assert the("reset", "session.revoked:password_reset").session_id == sessions["signup"]
    assert the("email_confirm", "session.revoked:email_change").session_id == sessions["second_verify"]


async def test_a_reset_request_for_an_unknown_address_is_audited_by_hash_only(
    backend: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """S69 (behaviour.md 2.5 step 4): a reset requested for an address without an account is still
    audited, with no user and the keyed email hash, never the address."""
    env = account_env(backend, mailbox, LIMITS, IAM_RESET__RESPONSE_FLOOR="50ms")
    address = "nobody." + secrets.token_hex(5) + "@Example.com"
    request_id = "s69-unknown-" + secrets.token_hex(6)
    async with running_service(tmp_path, env) as iam, iam.channel() as channel:
        await auth_pb2_grpc.AuthServiceStub(channel).RequestPasswordReset(
            auth_pb2.RequestPasswordResetRequest(client=client(ip=LAPTOP_IP), email=address),
            metadata=(("x-request-id", request_id),),
        )
        await iam.app.components.audit.drain()
        async with iam.app.components.db.transaction(read_only=True) as tx:
            recent = await tx.audit.recent(type_prefix="password.reset_requested", limit=1000)
    (event,) = [e for e in recent if e.request_id == request_id]
    assert (event.user_id, event.ip) == (None, LAPTOP_IP)
    assert event.details.get("email_h")
    assert address.lower() not in json.dumps(event.details).lower()
    assert address.split("@")[0] not in json.dumps(event.details)


# S70 ---------------------------------------------------------------------------------------------

ALLOWANCE = timedelta(minutes=2)


@pytest.fixture(scope="module")
def geo(tmp_path_factory: pytest.TempPathFactory) -> GeoPaths:
    return write_default_geo_databases(tmp_path_factory.mktemp("geo"))


def challenged(answer: token_pb2.RefreshResponse) -> str:
    """The challenge reason, or "" when the refresh answered a Session."""
    return answer.mfa.reason if answer.WhichOneof("result") == "mfa" else ""


@dataclass
class Device:
    """One browser of the user: its context and its current session."""

    context: common_pb2.ClientContext
    session: common_pb2.Session

    async def refresh(self, iam: RunningService, ip: str) -> str:
        """Refresh from ``ip``: "" when rotated (the session moves on), else the challenge reason."""
        context = common_pb2.ClientContext()
        context.CopyFrom(self.context)
        context.ip = ip
        async with iam.channel() as channel:
            answer = await token_pb2_grpc.TokenServiceStub(channel).Refresh(
                token_pb2.RefreshRequest(client=context, refresh_token=self.session.refresh_token)
            )
        if answer.WhichOneof("result") == "session":
            self.session = answer.session
        return challenged(answer)


async def test_a_proxy_allowance_stays_on_its_device_its_class_and_its_time(
    backend: Backend, mailbox: Mailbox, geo: GeoPaths, tmp_path: Path
) -> None:
    """S70: device A passes a PROXY_OR_HOSTING challenge from a VPN address; from then on its
    refreshes from the VPN pass (in any of its sessions), while device B of the same user,
    refreshing from the same VPN address, is still challenged, and so is device A from a hosting
    address (the allowance is per class). One second before the (shortened) allowance ends device
    A still passes; one second after, it is challenged again. The service runs on a ManualClock,
    so the bound is exact whatever the machine's load. The network check is off so that the
    proxy check answers on its own (a VPN address is also an unknown network), and burst_max is
    raised so that device A's five rotations within minutes are not a rotation burst (check 5)."""
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    env = account_env(
        backend,
        mailbox,
        LIMITS,
        **geo.environ(),
        IAM_ANOMALY__NETWORK__ACTION="off",
        IAM_ANOMALY__BURST_MAX="10",
        IAM_ANOMALY__PROXY_ALLOWANCE=f"{int(ALLOWANCE.total_seconds())}s",
    )
    email = new_email()
    async with running_service(tmp_path, env, clock=clock) as iam, iam.channel() as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        mfa = mfa_pb2_grpc.MfaServiceStub(channel)

        async def code(count: int) -> str:
            return code_of((await wait_for_mail(mailbox, email, "sign-in code", count=count))[-1])

        signed_up = await auth.Signup(
            auth_pb2.SignupRequest(
                client=client(ip=BERLIN_IP, ua=FIREFOX),
                email=email,
                password=PASSWORD,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            )
        )
        a = Device(client(ip=BERLIN_IP, ua=FIREFOX, device_id=signed_up.session.device_id), signed_up.session)
        login = await auth.Login(
            auth_pb2.LoginRequest(client=client(ip=BERLIN_IP, ua=IPHONE), email=email, password=PASSWORD)
        )
        assert login.mfa.reason == "NEW_DEVICE"
        phone = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=client(ip=BERLIN_IP, ua=IPHONE),
                challenge_id=login.mfa.challenge_id,
                code=await code(1),
            )
        )
        b = Device(client(ip=BERLIN_IP, ua=IPHONE, device_id=phone.session.device_id), phone.session)
        assert a.session.user_id == b.session.user_id
        assert a.context.device_id != b.context.device_id

        # device A meets the VPN and passes the challenge it raises
        answer = await token_pb2_grpc.TokenServiceStub(channel).Refresh(
            token_pb2.RefreshRequest(
                client=client(ip=VPN_IP, ua=FIREFOX, device_id=a.context.device_id),
                refresh_token=a.session.refresh_token,
            )
        )
        assert challenged(answer) == "PROXY_OR_HOSTING"
        passed = await mfa.VerifyChallenge(
            mfa_pb2.VerifyChallengeRequest(
                client=client(ip=VPN_IP, ua=FIREFOX, device_id=a.context.device_id),
                challenge_id=answer.mfa.challenge_id,
                code=await code(2),
            )
        )
        a.session = passed.session
        granted_at = clock.now()

        assert await a.refresh(iam, VPN_IP) == ""
        assert await b.refresh(iam, VPN_IP) == "PROXY_OR_HOSTING"  # the same user, another device

        # bound to the device, not the session; bound to the class (proxy), not to any flagged ip
        again = await auth.Login(
            auth_pb2.LoginRequest(
                client=client(ip=VPN_IP, ua=FIREFOX, device_id=a.context.device_id),
                email=email,
                password=PASSWORD,
            )
        )
        assert again.WhichOneof("result") == "session"
        a2 = Device(a.context, again.session)
        assert await a2.refresh(iam, VPN_IP) == ""
        assert await a2.refresh(iam, HOSTING_IP) == "PROXY_OR_HOSTING"

        # bounded in time
        clock.advance(granted_at + ALLOWANCE - timedelta(seconds=1) - clock.now())
        assert await a.refresh(iam, VPN_IP) == ""
        clock.advance(timedelta(seconds=2))
        assert await a.refresh(iam, VPN_IP) == "PROXY_OR_HOSTING"

"""The session life cycle as an attacker meets it: a hypothesis state machine drives a real server
(gRPC, real stores, real SMTP, a clock the test moves) with an owner and a thief.

The owner has a laptop and a phone and the mailbox; the thief holds copies of the owner's refresh
tokens and device ids (stolen at any moment) and tries them from other browsers, addresses and
User-Agents (empty and stripped ones included), guesses codes and passwords. The owner logs in,
refreshes at home and abroad, loses cookies, completes challenges by code or approves them by
link on either device, steps up, revokes, logs out, resets the password and changes the address;
time moves and cleanup runs.

Invariants, after every step:

- the thief never receives a Session, except the grace answer of a rotation the owner made (the
  very successor the owner holds, bound to the owner's device), and the owner's current token is
  never found rotated by someone else;
- every session of the account is bound to a device the owner was given, and only such devices
  are trusted;
- no session ends without a ``session.revoked`` audit event giving its reason;
- a session has at most one live challenge per kind, a (user, device) one login challenge;
- no call answers INTERNAL, UNKNOWN or BACKEND_UNAVAILABLE.

``make test`` runs a short, derandomised exploration per backend; ``make fuzz`` a long, random one
(``IAM_FUZZ_EXAMPLES``, ``IAM_FUZZ_STEPS``). A failure prints its shrunk steps and a
``@reproduce_failure`` line to replay it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any, TypeVar

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text

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
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import PASSWORD, account_env, client, new_email, text_of
from tests.conftest import Backend
from tests.mailbox import Mailbox
from tests.sessions_helper import FIREFOX, IPHONE

T = TypeVar("T")

FUZZ = bool(os.environ.get("IAM_FUZZ_EXAMPLES"))
EXAMPLES = int(os.environ.get("IAM_FUZZ_EXAMPLES") or 12)
STEPS = int(os.environ.get("IAM_FUZZ_STEPS") or 40)

CHROME = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"
STRIPPED = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101"  # Firefox without its browser
WINDOWS_FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0"
OWNER = {"laptop": FIREFOX, "phone": IPHONE}
THIEF_UAS = [CHROME, "", STRIPPED, WINDOWS_FIREFOX]
FAKE_DEVICE = "dev_" + "Q" * 22
BROKEN = {"INTERNAL", "UNKNOWN", "BACKEND_UNAVAILABLE"}
REFRESH_REFUSALS = {"SESSION_REVOKED", "SESSION_EXPIRED", "TOKEN_INVALID", "ANOMALY_BLOCKED", "RATE_LIMITED"}
# Per-second bursts and mail volume opened up: the clock stands still between its moves, so
# every call of a run would otherwise fall into one second, and one owner receives far more mail
# than anyone would. Every other limit keeps its default.
LIMITS = {
    "refresh.ip": {"windows": ["1000/1s", "1000/10m"]},
    "login.ip": {"windows": ["1000/1s", "1000/10m"]},
    "login.pair": {"windows": ["1000/1s", "5/1h fc"]},
    "code.ip": {"windows": ["1000/1s", "1000/10m"]},
    "mail.recipient": {"windows": ["10000/1h"]},
    "mail.user_challenge": {"windows": ["10000/24h"]},
    "mail.ip_challenge": {"windows": ["10000/24h"]},
    "sessions.user": {"windows": ["1000/1m"]},
    "reset_request.email": {"windows": ["1000/1h"]},  # over it a request is dropped without a word
}
_LINK = re.compile(r"https?://\S+\?token=([\w.%-]+)")
_CODE = re.compile(r"Your code: (\d{6,8})\b")


@dataclass
class Answer:
    value: Any = None
    reason: str = ""  # ErrorInfo reason of a failure, "" on success


@dataclass
class World:
    """The service on the test's event loop; the machine runs in a worker thread and hands each
    call over to that loop."""

    loop: asyncio.AbstractEventLoop
    iam: RunningService
    clock: ManualClock
    mailbox: Mailbox
    auth: auth_pb2_grpc.AuthServiceStub
    mfa: mfa_pb2_grpc.MfaServiceStub
    tokens: token_pb2_grpc.TokenServiceStub

    def run(self, coroutine: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)  # type: ignore[arg-type]

    def call(self, method: Callable[[Any], Any], request: Any) -> Answer:
        async def go() -> Answer:
            try:
                return Answer(await method(request))
            except grpc.aio.AioRpcError as error:
                return Answer(None, error_details(error).reason or error.code().name)

        answer = self.run(go())
        assert answer.reason not in BROKEN, f"{type(request).__name__} answered {answer.reason}"
        return answer


_runs = itertools.count()
# What the owner does when a challenge arrives: leave it for later, or at once the code, or the
# link on the device that asked, or the link on the other one (then the asking device repeats).
REACTIONS = ["later", "code", "link here", "link on the other device"]


@dataclass(frozen=True)
class Addresses:
    """Each run's own networks (limits and risk points are kept per address), so that a run
    replayed while hypothesis shrinks meets the same service as the first time."""

    home: str  # the owner's /24 at home
    abroad: str
    thief: str

    @classmethod
    def of_run(cls, n: int) -> Addresses:
        a, b = n // 256 % 256, n % 256
        return cls(f"10.{a}.{b}.", f"172.{16 + a % 16}.{b}.", f"100.{64 + a % 64}.{b}.")

    def owner(self, name: str, where: str) -> str:
        host = 10 if name == "laptop" else 12
        return f"{self.home if where == 'home' else self.abroad}{host}"

    @property
    def thieves(self) -> list[str]:
        return [f"{self.thief}66", f"{self.thief}77", f"{self.home}99"]  # the last: the owner's /24


@dataclass
class Device:
    """One of the owner's browsers: its cookie (device id) and its session, if any."""

    name: str
    net: Addresses
    device_id: str = ""
    session: common_pb2.Session | None = None

    def context(self, where: str = "home") -> common_pb2.ClientContext:
        return client(ip=self.net.owner(self.name, where), ua=OWNER[self.name], device_id=self.device_id)


@dataclass
class Raised:
    """A challenge the owner's own request raised, and how to complete it."""

    kind: str  # refresh, login, step_up
    device: str
    context: common_pb2.ClientContext
    token: str = ""  # refresh kind: the token it was raised for
    code: str = ""
    link: str = ""
    over: bool = False  # completed, or answered as expired or used


@dataclass
class Model:
    email: str
    password: str = PASSWORD
    addresses: list[str] = field(default_factory=list)
    devices: dict[str, Device] = field(default_factory=dict)
    owner_devices: set[str] = field(default_factory=set)  # every device id handed to the owner
    owner_tokens: set[str] = field(default_factory=set)  # every refresh token handed to the owner
    raised: dict[str, Raised] = field(default_factory=dict)
    thief_raised: dict[str, None] = field(default_factory=dict)  # ordered
    stolen: list[tuple[str, str]] = field(default_factory=list)  # (refresh token, device id)
    thief_guesses: int = 0
    moved: timedelta = timedelta(0)
    user_id: str = ""


def _claims(link: str) -> dict[str, Any]:
    payload = link.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


class SessionLifeCycle(RuleBasedStateMachine):
    world: World  # set by the test before the run

    def __init__(self) -> None:
        super().__init__()
        self.net = Addresses.of_run(next(_runs))
        self.m = Model(email=new_email())
        self.m.addresses.append(self.m.email)
        self.seen_links: set[str] = set()
        self.codes: dict[str, str] = {}  # challenge id -> its latest code, read from the mailbox

    # plumbing ----------------------------------------------------------------------------------

    def mail(self, wanted: Callable[[dict[str, Any]], bool], *, timeout: float = 10.0) -> tuple[str, str]:
        """(code, link) of the newest message to one of the owner's addresses whose link claims
        satisfy ``wanted``; waits for the outbox sender."""
        deadline = time.monotonic() + timeout
        while True:
            with self.world.mailbox._lock:
                messages = [m for m in self.world.mailbox.messages if m["To"] in self.m.addresses]
            for message in reversed(messages):
                body = text_of(message)
                link = _LINK.search(body)
                if link is None:
                    continue
                token = link.group(1)
                if wanted(_claims(token)):
                    code = _CODE.search(body)
                    return (code.group(1) if code else "", token)
            if time.monotonic() > deadline:
                raise AssertionError("the expected email never came")
            time.sleep(0.05)

    def challenge_mail(self, challenge_id: str) -> tuple[str, str]:
        code, link = self.mail(lambda claims: claims.get("cid") == challenge_id)
        self.codes[challenge_id] = code
        return code, link

    def took(self, device: Device, session: common_pb2.Session) -> None:
        """The owner's device received a Session."""
        device.session = session
        device.device_id = session.device_id
        self.m.owner_devices.add(session.device_id)
        self.m.owner_tokens.add(session.refresh_token)

    def raised_by_owner(
        self, challenge: common_pb2.MfaChallenge, raised: Raised, react: str = "later"
    ) -> None:
        """A challenge answered to the owner; new ones are read from the mailbox, and the owner
        reacts at once (code, or the link on this or the other device) or later."""
        cid = challenge.challenge_id
        if cid in self.m.raised or cid in self.m.thief_raised:
            return  # pending already: the first to see it raised it
        raised.code, raised.link = self.challenge_mail(cid)
        self.m.raised[cid] = raised
        if react == "code":
            self.enter_code(cid)
        elif react == "link here":
            self.open_link(cid, "raising")
        elif react == "link on the other device":
            self.open_link(cid, "phone" if raised.device == "laptop" else "laptop")

    def signed_in(self) -> bool:
        return any(device.session is not None for device in self.m.devices.values())

    def signed_in_device(self, pick: int) -> tuple[str, Device]:
        names = sorted(name for name, device in self.m.devices.items() if device.session is not None)
        name = names[pick % len(names)]
        return name, self.m.devices[name]

    def session_over(self, session_id: str) -> bool:
        async def read() -> bool:
            async with self.world.iam.app.components.db.transaction(read_only=True) as tx:
                session = await tx.sessions.get(session_id)
            now = self.world.clock.now()
            return session is None or session.revoked_at is not None or session.absolute_expires_at <= now

        return self.world.run(read())

    # the owner ---------------------------------------------------------------------------------

    @initialize()
    def sign_up(self) -> None:
        # Each run starts at a UTC midnight, so every limiter window (the longest is a day, counted
        # in buckets aligned to the epoch) meets the run at the same phase.
        now = self.world.clock.now()
        self.world.clock.advance(datetime.combine(now.date(), dt_time(), UTC) + timedelta(days=1) - now)
        laptop = Device("laptop", self.net)
        self.m.devices = {"laptop": laptop, "phone": Device("phone", self.net)}
        answer = self.world.call(
            self.world.auth.Signup,
            auth_pb2.SignupRequest(
                client=laptop.context(),
                email=self.m.email,
                password=self.m.password,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            ),
        )
        assert answer.reason == "", answer.reason
        self.took(laptop, answer.value.session)
        self.m.user_id = answer.value.session.user_id
        # the premise: the thief already holds a copy of the laptop's cookies
        self.m.stolen.append((laptop.session.refresh_token, laptop.device_id))

    @precondition(lambda self: self.signed_in())
    @rule(
        pick=st.integers(0, 1),
        where=st.sampled_from(["home", "home", "abroad"]),
        wait=st.sampled_from([0, 5 * 60, 14 * 60]),
        react=st.sampled_from(REACTIONS),
    )
    def owner_refreshes(self, pick: int, where: str, wait: int, react: str) -> None:
        name, device = self.signed_in_device(pick)
        assert device.session is not None
        self.advance_by(timedelta(seconds=wait))
        token, context = device.session.refresh_token, device.context(where)
        answer = self.world.call(
            self.world.tokens.Refresh, token_pb2.RefreshRequest(client=context, refresh_token=token)
        )
        if answer.reason == "":
            if answer.value.WhichOneof("result") == "session":
                assert answer.value.session.session_id == device.session.session_id
                self.took(device, answer.value.session)
            else:
                self.raised_by_owner(answer.value.mfa, Raised("refresh", name, context, token=token), react)
            return
        assert answer.reason != "REFRESH_TOKEN_REUSED", "someone else rotated the owner's current token"
        assert answer.reason in REFRESH_REFUSALS, answer.reason
        if answer.reason == "TOKEN_INVALID":
            assert self.session_over(device.session.session_id), "the owner's live token is unknown"
        if answer.reason != "RATE_LIMITED":
            device.session = None

    @rule(
        name=st.sampled_from(["laptop", "phone"]),
        where=st.sampled_from(["home", "abroad"]),
        react=st.sampled_from(REACTIONS),
    )
    def owner_logs_in(self, name: str, where: str, react: str) -> None:
        device = self.m.devices[name]
        context = device.context(where)
        answer = self.world.call(
            self.world.auth.Login,
            auth_pb2.LoginRequest(client=context, email=self.m.email, password=self.m.password),
        )
        if answer.reason == "":
            if answer.value.WhichOneof("result") == "session":
                self.took(device, answer.value.session)
            else:
                self.raised_by_owner(answer.value.mfa, Raised("login", name, context), react)
            return
        allowed = {"RATE_LIMITED"} | ({"INVALID_CREDENTIALS"} if self.m.thief_guesses >= 10 else set())
        assert answer.reason in allowed, answer.reason

    @rule(name=st.sampled_from(["laptop", "phone"]))
    def owner_loses_the_cookie(self, name: str) -> None:
        self.m.devices[name].device_id = ""

    @precondition(lambda self: self.signed_in())
    @rule(
        pick=st.integers(0, 1),
        action=st.sampled_from(["export", "reauth"]),
        react=st.sampled_from(REACTIONS),
    )
    def owner_steps_up(self, pick: int, action: str, react: str) -> None:
        name, device = self.signed_in_device(pick)
        assert device.session is not None
        context = device.context()
        answer = self.world.call(
            self.world.mfa.StartStepUp,
            mfa_pb2.StartStepUpRequest(
                client=context, access_token=device.session.access_token, action=action
            ),
        )
        if answer.reason == "":
            self.raised_by_owner(answer.value, Raised("step_up", name, context), react)
            return
        assert answer.reason in {"TOKEN_EXPIRED", "TOKEN_INVALID", "SESSION_REVOKED", "RATE_LIMITED"}, (
            answer.reason
        )

    def open_challenges(self) -> list[str]:
        """The owner's challenges not known to be over, in order of appearance (replayable)."""
        return [cid for cid, raised in self.m.raised.items() if not raised.over]

    def _owner_challenge(self, pick: int) -> tuple[str, Raised] | None:
        open_ = self.open_challenges()
        if not open_:
            return None
        cid = open_[pick % len(open_)]
        return cid, self.m.raised[cid]

    def _completed(self, raised: Raised, value: Any) -> None:
        """A VerifyChallenge or RedeemMagicLink answer on the raising device."""
        raised.over = True
        if value.WhichOneof("result") == "session":
            assert raised.kind in ("refresh", "login")
            self.took(self.m.devices[raised.device], value.session)
        elif value.WhichOneof("result") == "grant":
            assert raised.kind == "step_up"

    @precondition(lambda self: bool(self.open_challenges()))
    @rule(pick=st.integers(min_value=0))
    def owner_enters_the_code(self, pick: int) -> None:
        chosen = self._owner_challenge(pick)
        if chosen is not None:
            self.enter_code(chosen[0])

    def enter_code(self, cid: str) -> None:
        raised = self.m.raised[cid]
        answer = self.world.call(
            self.world.mfa.VerifyChallenge,
            mfa_pb2.VerifyChallengeRequest(client=raised.context, challenge_id=cid, code=raised.code),
        )
        if answer.reason == "":
            self._completed(raised, answer.value)
            return
        # the right code from the raising device is never CODE_INVALID
        assert answer.reason in {"CHALLENGE_EXPIRED", "RATE_LIMITED", "SESSION_REVOKED"}, answer.reason
        raised.over = answer.reason != "RATE_LIMITED"

    @precondition(lambda self: bool(self.open_challenges()))
    @rule(pick=st.integers(min_value=0), on=st.sampled_from(["laptop", "phone", "raising"]))
    def owner_opens_the_link(self, pick: int, on: str) -> None:
        chosen = self._owner_challenge(pick)
        if chosen is not None:
            self.open_link(chosen[0], on)

    def open_link(self, cid: str, on: str) -> None:
        raised = self.m.raised[cid]
        context = raised.context if on == "raising" else self.m.devices[on].context()
        answer = self.world.call(
            self.world.mfa.RedeemMagicLink,
            mfa_pb2.RedeemMagicLinkRequest(client=context, link_token=raised.link),
        )
        same_device = (context.device_id, context.user_agent) == (
            raised.context.device_id,
            raised.context.user_agent,
        )
        if answer.reason == "":
            if same_device or raised.kind == "step_up":
                self._completed(raised, answer.value)
            else:
                assert answer.value.WhichOneof("result") is None, "another device received the result"
            return
        assert answer.reason in {"CHALLENGE_EXPIRED", "LINK_USED", "RATE_LIMITED"}, answer.reason
        raised.over = answer.reason == "CHALLENGE_EXPIRED"  # LINK_USED: approved, the code may still do

    @precondition(lambda self: bool(self.open_challenges()))
    @rule(pick=st.integers(min_value=0))
    def owner_repeats_the_raising_call(self, pick: int) -> None:
        """After an approval elsewhere (4.5) the raising device repeats its Refresh or Login."""
        chosen = self._owner_challenge(pick)
        if chosen is None or chosen[1].kind == "step_up":
            return
        cid, raised = chosen
        device = self.m.devices[raised.device]
        if raised.kind == "refresh":
            if device.session is None or device.session.refresh_token != raised.token:
                raised.over = True  # its token is gone: it can never complete
                return
            answer = self.world.call(
                self.world.tokens.Refresh,
                token_pb2.RefreshRequest(client=raised.context, refresh_token=raised.token),
            )
        else:
            answer = self.world.call(
                self.world.auth.Login,
                auth_pb2.LoginRequest(client=raised.context, email=self.m.email, password=self.m.password),
            )
        if answer.reason == "":
            if answer.value.WhichOneof("result") == "session":
                raised.over = True
                self.took(device, answer.value.session)
            elif answer.value.mfa.challenge_id != cid:
                raised.over = True
                token = raised.token
                self.raised_by_owner(
                    answer.value.mfa, Raised(raised.kind, raised.device, raised.context, token)
                )
            return
        assert answer.reason != "REFRESH_TOKEN_REUSED", "someone else rotated the owner's current token"
        if raised.kind == "refresh" and answer.reason in {
            "SESSION_REVOKED",
            "SESSION_EXPIRED",
            "ANOMALY_BLOCKED",
        }:
            device.session = None
            return
        if raised.kind == "refresh" and answer.reason == "TOKEN_INVALID":
            assert self.session_over(device.session.session_id if device.session else ""), answer.reason
            device.session = None
            return
        allowed = {"RATE_LIMITED"} | ({"INVALID_CREDENTIALS"} if self.m.thief_guesses >= 10 else set())
        assert answer.reason in allowed, answer.reason

    @precondition(lambda self: self.signed_in())
    @rule(pick=st.integers(0, 1), how=st.sampled_from(["logout", "revoke one", "revoke all"]))
    def owner_ends_sessions(self, pick: int, how: str) -> None:
        name, device = self.signed_in_device(pick)
        assert device.session is not None
        if how == "logout":
            answer = self.world.call(
                self.world.auth.Logout,
                auth_pb2.LogoutRequest(client=device.context(), refresh_token=device.session.refresh_token),
            )
            assert answer.reason in {"", "RATE_LIMITED"}, answer.reason
            if answer.reason == "":
                device.session = None
            return
        if how == "revoke all":
            answer = self.world.call(
                self.world.tokens.RevokeAllSessions,
                token_pb2.RevokeAllSessionsRequest(
                    access_token=device.session.access_token, keep_current=True
                ),
            )
        else:
            other = self.m.devices["phone" if name == "laptop" else "laptop"]
            target = other.session.session_id if other.session else device.session.session_id
            answer = self.world.call(
                self.world.tokens.RevokeSession,
                token_pb2.RevokeSessionRequest(access_token=device.session.access_token, session_id=target),
            )
        assert answer.reason in {"", "TOKEN_EXPIRED", "TOKEN_INVALID", "SESSION_REVOKED", "RATE_LIMITED"}, (
            answer.reason
        )

    @rule(change=st.sampled_from(["password", "address", "address"]), pick=st.integers(0, 1))
    def owner_changes_credentials(self, change: str, pick: int) -> None:
        if change == "password":
            self.reset_the_password()
        elif self.signed_in():
            self.change_the_address(pick)

    def reset_the_password(self) -> None:
        context = self.m.devices["laptop"].context()
        answer = self.world.call(
            self.world.auth.RequestPasswordReset,
            auth_pb2.RequestPasswordResetRequest(client=context, email=self.m.email),
        )
        assert answer.reason in {"", "RATE_LIMITED"}, answer.reason
        if answer.reason:
            return
        seen = set(self.seen_links)
        _, link = self.mail(
            lambda claims: claims.get("pur") == "password_reset" and claims["jti"] not in seen
        )
        self.seen_links.add(_claims(link)["jti"])
        password = f"{PASSWORD} {len(self.seen_links)}"
        answer = self.world.call(
            self.world.auth.ResetPassword,
            auth_pb2.ResetPasswordRequest(client=context, link_token=link, new_password=password),
        )
        assert answer.reason in {"", "RATE_LIMITED"}, answer.reason
        if answer.reason == "":
            self.m.password = password

    def change_the_address(self, pick: int) -> None:
        _, device = self.signed_in_device(pick)
        assert device.session is not None
        new = new_email()
        answer = self.world.call(
            self.world.auth.RequestEmailChange,
            auth_pb2.RequestEmailChangeRequest(
                client=device.context(), access_token=device.session.access_token, new_email=new
            ),
        )
        if answer.reason:
            assert answer.reason in {
                "REAUTH_REQUIRED",
                "TOKEN_EXPIRED",
                "TOKEN_INVALID",
                "SESSION_REVOKED",
                "RATE_LIMITED",
            }, answer.reason
            return
        self.m.addresses.append(new)
        _, link = self.mail(lambda claims: claims.get("pur") == "email_change" and claims.get("nem") == new)
        answer = self.world.call(
            self.world.auth.ConfirmEmailChange,
            auth_pb2.ConfirmEmailChangeRequest(client=device.context(), link_token=link),
        )
        assert answer.reason in {"", "LINK_USED", "RATE_LIMITED"}, answer.reason
        if answer.reason == "":
            self.m.email = new

    # the thief ---------------------------------------------------------------------------------

    @precondition(lambda self: self.signed_in())
    @rule(pick=st.integers(0, 1))
    def thief_copies_the_cookies(self, pick: int) -> None:
        _, device = self.signed_in_device(pick)
        assert device.session is not None
        self.m.stolen.append((device.session.refresh_token, device.device_id))

    @precondition(lambda self: bool(self.m.stolen))
    @rule(
        pick=st.integers(min_value=0),
        polls=st.lists(
            st.tuples(
                st.sampled_from(THIEF_UAS), st.integers(0, 2), st.sampled_from(["copied", "none", "fake"])
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def thief_refreshes(self, pick: int, polls: list[tuple[str, int, str]]) -> None:
        """The thief tries one stolen token from a few browsers, addresses and device ids."""
        token, copied = self.m.stolen[pick % len(self.m.stolen)]
        for ua, ip, device in polls:
            device_id = {"copied": copied, "none": "", "fake": FAKE_DEVICE}[device]
            context = client(ip=self.net.thieves[ip], ua=ua, device_id=device_id)
            answer = self.world.call(
                self.world.tokens.Refresh, token_pb2.RefreshRequest(client=context, refresh_token=token)
            )
            assert answer.reason in {"", *REFRESH_REFUSALS, "REFRESH_TOKEN_REUSED"}, answer.reason
            if answer.reason or answer.value.WhichOneof("result") != "session":
                if answer.reason == "":
                    cid = answer.value.mfa.challenge_id
                    if cid not in self.m.raised and cid not in self.m.thief_raised:
                        self.m.thief_raised[cid] = None
                        self.challenge_mail(cid)  # the code goes to the owner's mailbox, not the thief's
                continue
            session = answer.value.session
            # Only a grace answer: the successor of a rotation the owner made seconds ago, on the
            # owner's device. Anything else is a session the owner's mailbox never allowed.
            assert session.refresh_token in self.m.owner_tokens, "the thief received a session of its own"
            assert session.device_id in self.m.owner_devices, "the thief received a session on its device"
            self.m.stolen.append((session.refresh_token, copied))

    @precondition(lambda self: bool(self.m.raised) or bool(self.m.thief_raised))
    @rule(pick=st.integers(min_value=0), ua=st.sampled_from(THIEF_UAS), guess=st.integers(0, 999_999))
    def thief_guesses_a_code(self, pick: int, ua: str, guess: int) -> None:
        known = [*self.m.raised, *self.m.thief_raised]  # in order of appearance: replayable
        cid = known[pick % len(known)]
        code = f"{guess:06d}"
        if code == self.codes[cid]:
            code = f"{(guess + 1) % 1_000_000:06d}"
        context = client(ip=self.net.thieves[0], ua=ua)
        answer = self.world.call(
            self.world.mfa.VerifyChallenge,
            mfa_pb2.VerifyChallengeRequest(client=context, challenge_id=cid, code=code),
        )
        assert answer.reason != "", "a wrong code completed a challenge"
        assert answer.reason in {"CODE_INVALID", "CHALLENGE_EXPIRED", "RATE_LIMITED"}, answer.reason

    @rule(ua=st.sampled_from(THIEF_UAS), ip=st.integers(0, 2), copied=st.booleans())
    def thief_guesses_the_password(self, ua: str, ip: int, copied: bool) -> None:
        device_id = self.m.stolen[-1][1] if copied and self.m.stolen else ""
        self.m.thief_guesses += 1
        answer = self.world.call(
            self.world.auth.Login,
            auth_pb2.LoginRequest(
                client=client(ip=self.net.thieves[ip], ua=ua, device_id=device_id),
                email=self.m.email,
                password="not it at all 9",
            ),
        )
        assert answer.reason in {"INVALID_CREDENTIALS", "RATE_LIMITED"}, answer.reason

    # the world ---------------------------------------------------------------------------------

    def advance_by(self, delta: timedelta) -> None:
        if self.m.moved + delta > timedelta(days=300):
            return  # audit events live 400 days; a run never outlives them
        self.m.moved += delta
        self.world.clock.advance(delta)

    @rule(
        seconds=st.sampled_from([0, 1, 16, 11 * 60, 2 * 3600, 4 * 86400, 8 * 86400, 31 * 86400]),
        cleanup=st.booleans(),
    )
    def time_passes(self, seconds: int, cleanup: bool) -> None:
        self.advance_by(timedelta(seconds=seconds))
        if cleanup:
            self.world.run(self.world.iam.app.components.cleanup.run(lock=False))

    # invariants --------------------------------------------------------------------------------

    def _rows(self, query: str) -> list[Any]:
        async def read() -> list[Any]:
            engine = self.world.iam.app.components.db.engine  # type: ignore[union-attr]
            async with engine.connect() as connection:
                return list((await connection.execute(text(query), {"user": self.m.user_id})).all())

        return self.world.run(read())

    @invariant()
    def sessions_and_trust_stay_with_the_owner(self) -> None:
        if not self.m.user_id:
            return
        bound = {row[0] for row in self._rows("SELECT device_id FROM sessions WHERE user_id = :user")}
        assert bound <= self.m.owner_devices, "a session is bound to a device the owner never had"
        trusted = {
            row[0]
            for row in self._rows(
                "SELECT device_id FROM user_devices WHERE user_id = :user AND trusted_at IS NOT NULL"
                " AND (trust_revoked_at IS NULL OR trust_revoked_at < trusted_at)"
            )
        }
        assert trusted <= self.m.owner_devices, "a device the owner never had is trusted"

    @invariant()
    def every_ended_session_says_why(self) -> None:
        if not self.m.user_id:
            return
        ended = self._rows(
            "SELECT id, revoke_reason FROM sessions WHERE user_id = :user AND revoked_at IS NOT NULL"
        )
        events = self._rows(
            "SELECT session_id, details FROM audit_events WHERE user_id = :user AND type = 'session.revoked'"
        )
        said = {
            (
                session_id,
                (json.loads(details) if isinstance(details, str | bytes) else details or {}).get("reason"),
            )
            for session_id, details in events
        }
        silent = [(session_id, reason) for session_id, reason in ended if (session_id, reason) not in said]
        assert silent == [], f"sessions ended without a session.revoked event: {silent}"

    @invariant()
    def one_live_challenge_per_kind(self) -> None:
        if not self.m.user_id:
            return

        async def live() -> list[Any]:
            app = self.world.iam.app
            raw = await app.components.ephemeral.get(f"mfa:user:{{{self.m.user_id}}}")
            found = []
            for challenge_id in json.loads(raw) if raw else {}:
                challenge = await app.components.challenges.get(challenge_id)
                if challenge is not None and challenge.live(self.world.clock.now()):
                    found.append(challenge)
            return found

        slots = [
            (c.kind, c.session_id)
            if c.kind != "login"
            else (c.kind, c.device_id, tuple(sorted(c.fingerprint.items())))
            for c in self.world.run(live())
        ]
        assert len(slots) == len(set(slots)), f"two live challenges in one slot: {slots}"


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=not FUZZ,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


async def test_the_thief_never_gets_what_the_owners_mailbox_guards(
    own_database: Backend, mailbox: Mailbox, tmp_path: Path
) -> None:
    """The state machine above, against a real server on this backend, with a moving clock."""
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    env = account_env(own_database, mailbox, LIMITS, IAM_RESET__RESPONSE_FLOOR="10ms")
    async with running_service(tmp_path, env, clock=clock) as iam, iam.channel() as channel:
        SessionLifeCycle.world = World(
            asyncio.get_running_loop(),
            iam,
            clock,
            mailbox,
            auth_pb2_grpc.AuthServiceStub(channel),
            mfa_pb2_grpc.MfaServiceStub(channel),
            token_pb2_grpc.TokenServiceStub(channel),
        )
        await asyncio.to_thread(run_state_machine_as_test, SessionLifeCycle, settings=_settings())

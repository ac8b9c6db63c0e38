"""A steady mixed load on both replicas (Login, Refresh, VerifyAccessToken, Logout), as clients
behind a balancer make it, with what it saw recorded call by call.

The load behaves like careful clients: a call that meets a replica that is gone (a transport
error, no ErrorInfo) is sent to the other replica at once, as a balancer would; a Refresh or
Logout that fails is retried later with the same token (a rotation whose answer was lost is
served again from the grace window). What the suite checks from the records:

- **revoked accepted**: a token whose Logout had answered OK, verified OK, or its refresh token
  refreshed OK, at any moment;
- **lost sessions**: a session nobody logged out that answered SESSION_REVOKED, TOKEN_INVALID,
  REFRESH_TOKEN_REUSED or SESSION_EXPIRED;
- **errors**: answers UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL or UNKNOWN, with
  their times (the error window) and the calls' durations.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2, token_pb2, token_pb2_grpc
from iam_grpc.testing import error_details
from tests.accounts_helper import PASSWORD
from tests.sessions_helper import FIREFOX

DEADLINE = 10.0
ERROR_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"}
LOST = {"SESSION_REVOKED", "TOKEN_INVALID", "REFRESH_TOKEN_REUSED", "SESSION_EXPIRED"}


@dataclass
class Account:
    email: str
    ip: str
    device_id: str = ""
    live: int = 0

    def client(self) -> common_pb2.ClientContext:
        return common_pb2.ClientContext(ip=self.ip, user_agent=FIREFOX, device_id=self.device_id)


@dataclass
class Held:
    """A live session as its client holds it."""

    account: Account
    session_id: str
    access: str
    refresh: str
    busy: bool = False


@dataclass
class Call:
    at: float
    op: str
    replica: int
    code: str  # OK or the status code's name
    reason: str
    seconds: float
    failover: bool = False  # a transport error: the client went to the other replica


@dataclass
class Stubs:
    auth: auth_pb2_grpc.AuthServiceStub
    tokens: token_pb2_grpc.TokenServiceStub


@dataclass
class Load:
    channels: list[grpc.aio.Channel]
    accounts: list[Account]
    live: list[Held] = field(default_factory=list)
    revoked: list[Held] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    accepted_revoked: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.stubs = [
            Stubs(auth_pb2_grpc.AuthServiceStub(c), token_pb2_grpc.TokenServiceStub(c)) for c in self.channels
        ]

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    # one call, with failover ----------------------------------------------------------------------

    async def call(self, op: str, invoke: Callable[[Stubs], Awaitable[Any]]) -> tuple[Any, str, str]:
        """(answer or None, code, reason) after at most one failover."""
        first = next(self._turn) % len(self.stubs)
        code, reason = "UNAVAILABLE", ""
        for replica in (first, 1 - first):
            started = self.now
            try:
                answer = await invoke(self.stubs[replica])
            except grpc.aio.AioRpcError as error:
                code, reason = error.code().name, error_details(error).reason or ""
                transport = code == "UNAVAILABLE" and not reason
                self.calls.append(Call(started, op, replica, code, reason, self.now - started, transport))
                if transport:
                    continue
                return None, code, reason
            self.calls.append(Call(started, op, replica, "OK", "", self.now - started))
            return answer, "OK", ""
        return None, code, reason

    # the operations -------------------------------------------------------------------------------

    async def login(self, account: Account) -> None:
        request = auth_pb2.LoginRequest(client=account.client(), email=account.email, password=PASSWORD)
        answer, _code, _reason = await self.call("login", lambda s: s.auth.Login(request, timeout=DEADLINE))
        if answer is None:
            return
        if answer.WhichOneof("result") != "session":
            self.unexpected.append(f"login answered {answer.WhichOneof('result')}")
            return
        self.adopt(account, answer.session)

    def adopt(self, account: Account, session: common_pb2.Session) -> None:
        account.device_id = session.device_id
        account.live += 1
        self.live.append(Held(account, session.session_id, session.access_token, session.refresh_token))

    async def refresh(self, held: Held) -> None:
        request = token_pb2.RefreshRequest(client=held.account.client(), refresh_token=held.refresh)
        answer, _code, reason = await self.call(
            "refresh", lambda s: s.tokens.Refresh(request, timeout=DEADLINE)
        )
        if answer is not None:
            if answer.WhichOneof("result") != "session":
                self.unexpected.append(f"refresh answered {answer.WhichOneof('result')}")
                return
            held.access, held.refresh = answer.session.access_token, answer.session.refresh_token
        elif reason in LOST:
            self.lost.append(f"{held.session_id}: {reason}")
            self._drop(held)

    async def verify(self, token: str, *, revoked: bool) -> None:
        request = token_pb2.VerifyAccessTokenRequest(access_token=token)
        op = "verify_revoked" if revoked else "verify"
        _, code, _reason = await self.call(
            op, lambda s: s.tokens.VerifyAccessToken(request, timeout=DEADLINE)
        )
        if revoked and code == "OK":
            self.accepted_revoked.append(f"access token of a logged-out session verified at {self.now:.2f}")

    async def refresh_revoked(self, held: Held) -> None:
        request = token_pb2.RefreshRequest(client=held.account.client(), refresh_token=held.refresh)
        _, code, _ = await self.call("refresh_revoked", lambda s: s.tokens.Refresh(request, timeout=DEADLINE))
        if code == "OK":
            self.accepted_revoked.append(f"refresh token of a logged-out session refreshed at {self.now:.2f}")

    async def logout(self, held: Held) -> bool:
        request = auth_pb2.LogoutRequest(client=held.account.client(), refresh_token=held.refresh)
        _, code, _ = await self.call("logout", lambda s: s.auth.Logout(request, timeout=DEADLINE))
        if code != "OK":
            return False
        self._drop(held)
        self.revoked.append(held)
        return True

    def _drop(self, held: Held) -> None:
        if held in self.live:
            self.live.remove(held)
            held.account.live -= 1

    # the steady load ------------------------------------------------------------------------------

    async def _every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            task = asyncio.create_task(action())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(seconds * random.uniform(0.8, 1.2))
        if tasks:
            await asyncio.gather(*tasks)

    def _take(self) -> Held | None:
        free = [h for h in self.live if not h.busy]
        if not free:
            return None
        held = random.choice(free)
        held.busy = True
        return held

    async def _verify_once(self) -> None:
        if self.live:
            await self.verify(random.choice(self.live).access, revoked=False)
        if self.revoked:
            await self.verify(random.choice(self.revoked).access, revoked=True)

    async def _refresh_once(self) -> None:
        held = self._take()
        if held is not None:
            try:
                await self.refresh(held)
            finally:
                held.busy = False

    async def _login_once(self) -> None:
        room = [a for a in self.accounts if a.live < 4]  # anomaly.max_sessions is 5
        if room:
            await self.login(random.choice(room))

    async def _logout_once(self) -> None:
        if self.revoked:
            await self.refresh_revoked(random.choice(self.revoked))
        if len(self.live) <= 12:
            return
        held = self._take()
        if held is not None:
            try:
                await self.logout(held)
            finally:
                held.busy = False

    async def run(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run the load while ``body`` runs (the fault's injection and healing), then stop it."""
        self._stop.clear()
        loops = [
            asyncio.create_task(self._every(0.025, self._verify_once)),
            asyncio.create_task(self._every(0.15, self._refresh_once)),
            asyncio.create_task(self._every(1.0, self._login_once)),
            asyncio.create_task(self._every(1.0, self._logout_once)),
        ]
        try:
            await body()
        finally:
            self._stop.set()
            await asyncio.gather(*loops)

    # what it saw --------------------------------------------------------------------------------

    def errors(self, since: float = 0.0) -> list[Call]:
        return [c for c in self.calls if c.at >= since and c.code in ERROR_CODES and not c.failover]

    def summary(self, since: float = 0.0) -> dict[str, dict[str, int]]:
        table: dict[str, Counter[str]] = {}
        for call in self.calls:
            if call.at >= since:
                label = "failover" if call.failover else (call.reason or call.code)
                table.setdefault(call.op, Counter())[label] += 1
        return {op: dict(counts) for op, counts in sorted(table.items())}

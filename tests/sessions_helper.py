"""Creating users and sessions directly, without passwords or the API, for token tests."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta

from iam_grpc.app import Application
from iam_grpc.core.anomalies import CHECKS
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.tokens.revocation_cache import RevocationCache
from iam_grpc.core.tokens.rotation import IssuedSession
from iam_grpc.ids import new_ulid
from iam_grpc.storage.records import User

FIREFOX = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"


async def new_user(app: Application, *, roles: tuple[str, ...] = ()) -> User:
    now = app.clock.now()
    email = f"tok.{secrets.token_hex(5)}@example.com"
    user = User(
        id=new_ulid(now),
        email=email,
        email_norm=email,
        password_hash=None,
        pepper_id=1,
        name="Token Tester",
        terms_accepted_at=now,
        created_at=now,
        updated_at=now,
    )
    async with app.components.db.transaction() as tx:
        await tx.users.insert(user)
        await tx.users.ensure_roles(["user", *roles], now)
        for role in ("user", *roles):
            await tx.users.grant_role(user.id, role, "test", now)
    return user


async def new_session(
    app: Application,
    user: User | None = None,
    *,
    ip: str = "198.51.100.10",
    user_agent: str = FIREFOX,
    device_id: str = "",
) -> tuple[User, IssuedSession]:
    """A signed-in session, as Signup or Login will create it."""
    user = user or await new_user(app)
    async with app.components.db.transaction() as tx:
        issued, evicted = await app.components.sessions.open_session(
            tx, user, ClientInfo(ip=ip, user_agent=user_agent, device_id=device_id), trust_device=True
        )
    await app.components.sessions.after_revocations(evicted)
    return user, issued


SHORT = timedelta(seconds=1)

# For tests of token mechanics (check 1 of behaviour.md 3.2): the behavioural checks 2-10 off, so
# that refreshes from changing test addresses are not challenged. tests/integration/test_anomalies.py
# covers the checks themselves.
NO_ANOMALY_CHECKS = {f"IAM_ANOMALY__{name.upper()}__ACTION": "off" for name in CHECKS}

# For tests that count SQL statements: every background job that runs SQL is pushed an hour away
# (the outbox sender's poll, cleanup, the key-table reload, the deny-list replay, the event
# poller, the API-token use flush), so that only the calls under test run statements. A new
# background job that touches SQL belongs here. The health probe is the service's
# ``probe_interval``.
NO_BACKGROUND_SQL = {
    "IAM_MAIL__POLL_INTERVAL": "1h",
    "IAM_CLEANUP__INTERVAL": "1h",
    "IAM_KEYS__RELOAD_INTERVAL": "1h",
    "IAM_TOKENS__DENYLIST_REPLAY": "1h",
    "IAM_EVENTS__POLL_INTERVAL": "1h",
    "IAM_API_TOKENS__LAST_USED_FLUSH": "1h",
}


async def until_trusted(replica: RevocationCache, seconds: float = 3.0) -> None:
    """Wait until a deny-list cache is trusted again (verified or rebuilt), at most ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not replica.trusted:
        assert asyncio.get_running_loop().time() < deadline, replica.reason
        await asyncio.sleep(0.01)

"""How passwords are stored and what a new password may be (security.md S65-S67; behaviour.md 2.1,
2.2), on both backends: argon2id at the configured parameters and never below the OWASP floor,
rehashed at the next successful login after the parameters rise; a pepper applied through HMAC so a
dump plus the password does not verify, and rotated at login; lengths in code points after NFKC,
no composition rules, no truncation, breached passwords refused and the range API failing open.

The default parameters are behaviour.md's m=19456, t=2, p=1 (the floor), not the m=65536, t=3, p=4
of S65's text: see docs/decisions.md, "argon2 defaults". Restarts reuse the data: the same data
directory (where embedded mode keeps its generated master key and pepper) and, on MySQL, the same
environment (database, Redis prefix, master key, pepper).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from argon2 import Parameters, Type, extract_parameters
from argon2.exceptions import VerifyMismatchError
from argon2.low_level import verify_secret
from loguru import logger

from iam_grpc.config import ConfigError, load_settings
from iam_grpc.proto import auth_pb2, auth_pb2_grpc
from iam_grpc.storage.records import User
from iam_grpc.testing import RunningService, error_details, running_service
from tests.accounts_helper import NO_BURSTS, PASSWORD, client, failure, new_email, signup
from tests.conftest import Backend
from tests.hibp_server import RangeServer

# No per-second bursts; login.pair keeps only its failure count (5 an hour per ip and address).
GROUPS = json.dumps({**NO_BURSTS, "login.pair": {"windows": ["5/1h fc"]}})
DEFAULT_PHC = "$argon2id$v=19$m=19456,t=2,p=1$"
RAISED_PHC = "$argon2id$v=19$m=65536,t=3,p=1$"
TOO_SHORT_OR_LONG = "INVALID_ARGUMENT password"  # a field violation on password and nothing else
BREACHED = "INVALID_ARGUMENT PASSWORD_BREACHED"


def service_env(backend: Backend, **extra: str) -> dict[str, str]:
    return {**backend.isolated(), "IAM_RATELIMIT__GROUPS": GROUPS, **extra}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def iam(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningService]:
    async with running_service(tmp_path_factory.mktemp("passwords"), service_env(backend)) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def stub(iam: RunningService) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    async with iam.channel() as channel:
        yield auth_pb2_grpc.AuthServiceStub(channel)


def login(
    stub: auth_pb2_grpc.AuthServiceStub, email: str, password: str = PASSWORD, *, device_id: str = ""
) -> grpc.aio.UnaryUnaryCall[auth_pb2.LoginRequest, auth_pb2.LoginResponse]:
    """A login from a fresh address, so that one test's failures never raise another's risk score."""
    ip = f"198.18.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"
    return stub.Login(
        auth_pb2.LoginRequest(client=client(ip=ip, device_id=device_id), email=email, password=password)
    )


async def stored(app: RunningService, user_id: str) -> User:
    """The user's row as the database holds it."""
    async with app.app.components.db.transaction(read_only=True) as tx:
        user = await tx.users.get(user_id)
    assert user is not None
    assert user.password_hash is not None
    return user


def peppered(pepper: bytes, password: str) -> bytes:
    """The argon2 input behaviour.md 2.2 names: HMAC-SHA256(pepper, NFKC(password))."""
    return hmac.new(pepper, unicodedata.normalize("NFKC", password).encode(), hashlib.sha256).digest()


def verifies(phc: str, secret: bytes) -> bool:
    """Whether a stock argon2 implementation accepts ``secret`` for the PHC string."""
    try:
        return verify_secret(phc.encode("ascii"), secret, Type.ID)
    except VerifyMismatchError:
        return False


async def accepted(stub: auth_pb2_grpc.AuthServiceStub, password: str) -> bool | str:
    """True if Signup accepts ``password``; else its status code and the violated fields (or the
    reason when there are none)."""
    try:
        await signup(stub, password=password)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        return f"{error.code().name} {','.join(sorted(details.field_violations)) or details.reason}"
    return True


# --- S65: argon2id at the configured parameters, never below the floor, upgraded on login -------------


async def test_a_new_user_is_stored_as_argon2id_with_the_configured_defaults(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """S65: the stored PHC string of a new user reads argon2id v=19 with the defaults m=19456, t=2,
    p=1 (the OWASP floor, docs/decisions.md), a 16-byte salt and a 32-byte hash, plus the current
    pepper id."""
    session = await signup(stub)
    user = await stored(iam, session.user_id)
    assert user.password_hash is not None
    assert user.password_hash.startswith(DEFAULT_PHC)
    assert extract_parameters(user.password_hash) == Parameters(
        type=Type.ID,
        version=19,
        salt_len=16,
        hash_len=32,
        time_cost=2,
        memory_cost=19456,
        parallelism=1,
    )
    assert user.pepper_id == iam.app.components.secrets.current_pepper


@pytest.mark.parametrize(
    ("variable", "value", "setting", "floor"),
    [
        ("IAM_ARGON2_MEMORY_KIB", "19455", "passwords.memory_kib", 19456),
        ("IAM_ARGON2_TIME_COST", "1", "passwords.time_cost", 2),
        ("IAM_ARGON2_PARALLELISM", "0", "passwords.parallelism", 1),
    ],
)
async def test_parameters_below_the_owasp_floor_are_refused_at_startup(
    tmp_path: Path, variable: str, value: str, setting: str, floor: int
) -> None:
    """S65: one step below the floor (memory 19455 KiB, time 1, parallelism 0) is a configuration
    error naming the setting, and the service does not start; the floor itself is accepted."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={variable: value})
    assert caught.value.problems == [
        f"{setting} ({variable}): Input should be greater than or equal to {floor}"
    ]
    with pytest.raises(ConfigError):
        async with running_service(tmp_path, {variable: value}):
            pytest.fail("the service started below the argon2 floor")
    at_floor = load_settings(environ={variable: str(floor)})
    assert getattr(at_floor.passwords, setting.split(".")[1]) == floor


async def test_raised_parameters_rewrite_the_hash_at_the_next_successful_login(
    backend: Backend, tmp_path: Path
) -> None:
    """S65: a user signed up at the defaults; the service restarts on the same data with memory
    65536 KiB and time 3. A wrong password leaves the hash alone; the next successful login (from
    the signup device: a Session) rewrites it with m=65536, t=3, p=1, same pepper, without bumping
    the credential version, and the new hash keeps working; a new signup gets the raised ones."""
    env = service_env(backend)  # built once: the restart must find the same database, prefix and secrets
    email = new_email()
    async with running_service(tmp_path, env) as first, first.channel() as channel:
        owner = await signup(auth_pb2_grpc.AuthServiceStub(channel), email)
        before = await stored(first, owner.user_id)
    assert before.password_hash is not None
    assert before.password_hash.startswith(DEFAULT_PHC)

    raised = {**env, "IAM_ARGON2_MEMORY_KIB": "65536", "IAM_ARGON2_TIME_COST": "3"}
    async with running_service(tmp_path, raised) as second, second.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        code, details = await failure(login(stub, email, "not " + PASSWORD, device_id=owner.device_id))
        assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
        assert (await stored(second, owner.user_id)).password_hash == before.password_hash

        answer = await login(stub, email, device_id=owner.device_id)
        assert answer.WhichOneof("result") == "session"
        assert answer.session.user_id == owner.user_id
        after = await stored(second, owner.user_id)
        assert after.password_hash is not None
        assert after.password_hash.startswith(RAISED_PHC)
        assert (after.pepper_id, after.credential_version) == (before.pepper_id, before.credential_version)

        again = await login(stub, email, device_id=owner.device_id)
        assert again.WhichOneof("result") == "session"
        assert (await stored(second, owner.user_id)).password_hash == after.password_hash
        newcomer = await signup(stub)
        assert str((await stored(second, newcomer.user_id)).password_hash).startswith(RAISED_PHC)


# --- S66: the pepper ---------------------------------------------------------------------------------


async def test_a_dump_and_the_password_do_not_verify_without_the_pepper(
    iam: RunningService, stub: auth_pb2_grpc.AuthServiceStub
) -> None:
    """S66: the stored hash is a standard PHC string that stock argon2 checks, but not against the
    password: only against HMAC-SHA256(pepper, NFKC(password)) with the user's pepper. The password
    is sent in full-width form, so the raw text, its HMAC without NFKC, and the HMAC under another
    pepper all fail."""
    typed = "ｃｏｒｒｅｃｔ horse battery staple 42"  # NFKC: PASSWORD
    assert unicodedata.normalize("NFKC", typed) == PASSWORD != typed
    session = await signup(stub, password=typed)
    user = await stored(iam, session.user_id)
    assert user.password_hash is not None
    pepper = iam.app.components.secrets.peppers[user.pepper_id]

    assert not verifies(user.password_hash, typed.encode())
    assert not verifies(user.password_hash, PASSWORD.encode())
    assert not verifies(user.password_hash, hmac.new(pepper, typed.encode(), hashlib.sha256).digest())
    assert not verifies(user.password_hash, peppered(secrets.token_bytes(32), typed))
    assert verifies(user.password_hash, peppered(pepper, typed))


async def test_peppers_rotate_at_the_next_login(backend: Backend, tmp_path: Path) -> None:
    """S66: a user hashed with pepper 1; the service restarts on the same data with peppers {1, 2}
    and pepper 2 current. The user's login (a Session) rehashes the password under pepper 2:
    users.pepper_id is 2 and the hash verifies under HMAC(P2, password) and no longer under P1; a
    new signup gets pepper 2 at once; the rotated hash keeps working."""
    env = service_env(backend)
    email = new_email()
    async with running_service(tmp_path, env) as first, first.channel() as channel:
        owner = await signup(auth_pb2_grpc.AuthServiceStub(channel), email)
        before = await stored(first, owner.user_id)
        first_pepper = first.app.components.secrets.peppers[1]
    assert before.pepper_id == 1
    assert before.password_hash is not None
    assert verifies(before.password_hash, peppered(first_pepper, PASSWORD))

    second_pepper = secrets.token_urlsafe(24).encode()
    rotated = {
        **env,
        "IAM_PASSWORDS__PEPPERS": json.dumps({"1": first_pepper.decode(), "2": second_pepper.decode()}),
        "IAM_PASSWORDS__CURRENT_PEPPER": "2",
    }
    async with running_service(tmp_path, rotated) as second, second.channel() as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        assert second.app.components.secrets.peppers == {1: first_pepper, 2: second_pepper}
        assert (await stored(second, owner.user_id)).pepper_id == 1  # nothing moves before a login

        answer = await login(stub, email, device_id=owner.device_id)
        assert answer.WhichOneof("result") == "session"
        after = await stored(second, owner.user_id)
        assert after.pepper_id == 2
        assert after.password_hash is not None
        assert after.password_hash.startswith(DEFAULT_PHC)
        assert verifies(after.password_hash, peppered(second_pepper, PASSWORD))
        assert not verifies(after.password_hash, peppered(first_pepper, PASSWORD))
        assert after.credential_version == before.credential_version

        newcomer = await signup(stub)
        assert (await stored(second, newcomer.user_id)).pepper_id == 2
        again = await login(stub, email, device_id=owner.device_id)
        assert again.WhichOneof("result") == "session"


# --- S67: the policy ---------------------------------------------------------------------------------


async def test_lengths_are_code_points_after_nfkc(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """S67: 12 to 128 code points, counted after NFKC (not bytes, not the typed form): 11 is a
    field violation on password, 12 and 128 pass, 129 is refused; 128 four-byte emoji (512 bytes,
    the byte cap) pass. A password accepted in one normal form signs in with another."""
    cases = {
        "é" * 11: TOO_SHORT_OR_LONG,  # 11 code points, 22 bytes
        "e\u0301" * 11: TOO_SHORT_OR_LONG,  # 22 typed code points, 11 after NFKC
        "é" * 12: True,
        "\ufb01" * 6: True,  # 6 typed ligatures, "fi" * 6 after NFKC
        "e\u0301" * 128: True,  # 256 typed code points, 128 after NFKC
        "é" * 128: True,
        "\U0001f511" * 128: True,  # 128 code points, 512 bytes
        "é" * 129: TOO_SHORT_OR_LONG,
        "\ufb01" * 64 + "x": TOO_SHORT_OR_LONG,  # 65 typed, 129 after NFKC
    }
    results = {password: await accepted(stub, password) for password in cases}
    assert results == cases

    email = new_email()
    owner = await signup(stub, email, "\ufb01" * 6)
    answer = await login(stub, email, "fi" * 6, device_id=owner.device_id)
    assert answer.WhichOneof("result") == "session"


async def test_there_are_no_composition_rules(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """S67: no class rules: only lower-case letters, only digits, only upper case and spaces, or only
    symbols are all accepted as long as they are long enough."""
    for password in (
        "purple elephants dance quietly",
        "".join(secrets.choice("0123456789") for _ in range(16)),
        "PURPLE ELEPHANTS DANCE",
        "!?*#%&()[]{}<>~^",
    ):
        assert await accepted(stub, password) is True, password


async def test_long_passwords_are_never_truncated(stub: auth_pb2_grpc.AuthServiceStub) -> None:
    """S67: two 128-character passwords that differ only at position 100 (well past bcrypt's 72
    bytes), or only in their last character, are different passwords: the other one is
    INVALID_CREDENTIALS, the right one a Session."""
    words = "a quiet river runs under the old stone bridge while swallows circle "
    password = (words * 2)[:128]
    at_100 = password[:99] + ("Z" if password[99] != "Z" else "Y") + password[100:]
    at_end = password[:127] + ("Z" if password[127] != "Z" else "Y")
    assert len(password) == len(at_100) == len(at_end) == 128
    email = new_email()
    owner = await signup(stub, email, password)
    for other in (at_100, at_end):
        code, details = await failure(login(stub, email, other, device_id=owner.device_id))
        assert (code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    answer = await login(stub, email, password, device_id=owner.device_id)
    assert answer.WhichOneof("result") == "session"
    assert answer.session.user_id == owner.user_id


async def test_breached_passwords_are_refused_and_a_down_range_api_fails_open(
    backend: Backend, tmp_path: Path
) -> None:
    """S67: with the range API online, a common password (bundled list) and one the API reports
    breached give INVALID_ARGUMENT PASSWORD_BREACHED. With the API stopped, a signup with a password
    it would report passes (hibp.fail_open), and a WARNING from iam.hibp records the connect failure
    (and the failure is counted)."""
    ranges = RangeServer()
    ranges.start()
    try:
        ranges.add("a breached passphrase of 2024", 321)
        ranges.add("another breached passphrase 77", 12)
        env = service_env(backend, IAM_HIBP_MODE="online", IAM_HIBP__URL=ranges.url, IAM_HIBP__TIMEOUT="3s")
        async with running_service(tmp_path, env) as iam, iam.channel() as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            assert await accepted(stub, "Password1234") == BREACHED
            assert await accepted(stub, "a breached passphrase of 2024") == BREACHED
            assert ranges.requests

            ranges.stop()
            records: list[Any] = []
            sink = logger.add(lambda message: records.append(message.record), level="WARNING")
            try:
                session = await signup(stub, password="another breached passphrase 77")
            finally:
                logger.remove(sink)
            assert session.user_id
            warnings = [r for r in records if r["extra"].get("logger") == "iam.hibp"]
            assert [(r["level"].name, r["message"], r["extra"]["failure"]) for r in warnings] == [
                ("WARNING", "breached-password check failed", "connect")
            ]
            assert 'iam_hibp_failures_total{kind="connect"} 1.0' in iam.app.metrics.render().decode()
    finally:
        ranges.stop()

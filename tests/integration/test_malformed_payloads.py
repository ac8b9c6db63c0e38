"""S54: malformed protobuf never crashes the server or yields INTERNAL [behaviour.md 2.1].

10,000 payloads, sent raw (no client-side serializer) and spread evenly over every
method of AuthService, TokenService and MfaService (listed from the generated
service descriptors), to a real ``iam-grpc serve`` process:

- purely random bytes of random length (0..2 KiB);
- mutations of a valid serialized request of that method: bit flips,
  truncation, inserted and duplicated bytes, known fields re-sent with the
  wrong wire type, length-delimited fields declaring huge or overflowing
  lengths, invalid UTF-8 inside (nested) string fields, unknown fields,
  deeply nested groups and length-delimited garbage, splices of another
  method's request; one to three of them stacked.

The rule each answer is held to depends on what the payload *is*, decided in
this process with the generated message class's ``FromString`` (the same upb
parser the server uses):

- a payload that does not decode must be answered INVALID_ARGUMENT by the
  decode guard (ErrorInfo ``INVALID_ARGUMENT``, a violation on ``request``);
- a payload that decodes is a well-formed request with odd values, so any
  client-caused answer is legitimate (OK, or a code of ``ClientError``: e.g.
  INVALID_ARGUMENT from the validators, UNAUTHENTICATED for a mangled token,
  ALREADY_EXISTS, RESOURCE_EXHAUSTED), always with ErrorInfo in domain
  ``iam.v1``; INTERNAL, UNKNOWN and server-side codes never.

Each method's valid request belongs to an account of its own (signed up
first, real access and refresh tokens), so mutations that leave the tokens
intact go deep into the flows, and one method's revocations never starve
another's.

Afterwards health still says SERVING for the server and each service, a normal
Signup + VerifyAccessToken succeeds, and the server's RSS (``VmRSS`` of the
serving process, read from ``/proc``) is at most 10% above the RSS measured
after a warm-up of a few hundred payloads of the same mix. The server runs
with glibc's mmap threshold pinned at its 128 KiB default: every password
hash (decoded Login, Signup, ChangePassword... payloads) takes a 19 MiB
argon2 area, and with glibc's sliding threshold such areas stay resident
after use, or not, by chance, moving RSS by about 20 MiB (some 10% of this
server) whatever the payloads. Pinned, each area is returned when its hash
ends, so what the comparison sees is the growth the payloads cause; a leak
stays resident either way.

Backend: the default embedded mode (SQLite + in-process state) only. Decoding
and the decode guard run before any adapter is chosen, so the property is the
same on MySQL + Redis; the embedded server keeps its rate-limit counters and
ephemeral state inside the measured process, so it is the stricter memory
check; and a second 10,000-call run would double the runtime. Rate limits stay
on (decoded payloads go through the limiters with their odd keys) but every
group is raised far above the traffic, so payloads reach the validators and
the flows instead of being refused for speed.

The payload stream is fixed by ``SEED`` (the tokens inside the valid requests
differ per run, their lengths and so the mutations do not); a failure names
each offending call's index, method, mutation, payload bytes and the server's
log lines for it (its x-request-id is ``s54-run-<index>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iam_grpc.core.ratelimit.groups import DEFAULT_GROUPS
from iam_grpc.errors import ClientError
from iam_grpc.ids import b64url, new_challenge_id, new_grant_token
from iam_grpc.interceptors.errors import GRPC_CODES
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, token_pb2, token_pb2_grpc
from iam_grpc.server import SERVICE_NAMES
from iam_grpc.testing import error_details
from tests.accounts_helper import PASSWORD, client, new_email
from tests.contract_helper import SERVICE_MODULES, walked_as_unary
from tests.served import free_port

pytestmark = pytest.mark.slow

SEED = 54
WARMUP_SEED = 4554
PAYLOADS = 10_000
WARMUP_PAYLOADS = 400
IN_FLIGHT = 32
CALL_TIMEOUT = 30.0
MAX_RSS_GROWTH = 1.10
RANDOM_SHARE = 0.25  # the rest are mutations of a valid request

IAM = str(Path(sys.executable).parent / "iam-grpc")
# Every limit far above this test's traffic: the payloads must reach the parser, validators and flows.
NO_LIMITS = {name: {"windows": ["1000000/1s"]} for name in DEFAULT_GROUPS}
# What a decoded (well-formed, odd-valued) request may be answered: OK or a client-caused code.
CLIENT_CODES = frozenset(
    {grpc.StatusCode.OK} | {GRPC_CODES[cls.code] for cls in ClientError.__subclasses__()}
)


# --- the methods, from the service descriptors -------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str  # /iam.v1.AuthService/Login
    request_type: type[Message]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def every_rpc() -> list[Rpc]:
    rpcs = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if not walked_as_unary(service.name, method.name):
                    continue  # not served yet, or a stream (tests/contract_helper.py)
                rpcs.append(
                    Rpc(
                        f"/{service.full_name}/{method.name}",
                        message_factory.GetMessageClass(method.input_type),
                    )
                )
    return rpcs


RPCS = every_rpc()


def decodes(rpc: Rpc, payload: bytes) -> bool:
    """Whether the server's deserializer (the generated class) accepts these bytes."""
    try:
        rpc.request_type.FromString(payload)
    except Exception:
        return False
    return True


# --- protobuf wire format, by hand -------------------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, body: bytes) -> bytes:
    return tag(number, LEN) + varint(len(body)) + body


def split_fields(raw: bytes) -> list[tuple[int, int, bytes]]:
    """(number, wire type, the whole encoded field) of a valid message without groups."""

    def read_varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = raw[at]
            value |= (byte & 0x7F) << shift
            at += 1
            shift += 7
            if byte < 0x80:
                return value, at

    fields, at = [], 0
    while at < len(raw):
        start = at
        key, at = read_varint(at)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            _, at = read_varint(at)
        elif wire_type == I64:
            at += 8
        elif wire_type == I32:
            at += 4
        else:
            size, at = read_varint(at)
            at += size
        fields.append((number, wire_type, raw[start:at]))
    return fields


# --- payloads ----------------------------------------------------------------------------------

INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # a lone surrogate
    b"\xe2\x82",  # truncated sequence
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80\x80\x80",  # bare continuation bytes
)


@dataclass(frozen=True)
class Seed:
    """A valid request of one method: its bytes and which fields carry strings (with a path)."""

    raw: bytes
    string_paths: tuple[tuple[int, ...], ...]  # field numbers from the top: (2,) email, (1, 1) client.ip
    known_numbers: frozenset[int]


def string_paths(message: Any, depth: int = 2) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for field in message.fields:
        if field.type == field.TYPE_STRING:
            paths.append((field.number,))
        elif field.type == field.TYPE_MESSAGE and depth > 1:
            paths += [(field.number, *inner) for inner in string_paths(field.message_type, depth - 1)]
    return paths


def seed_of(rpc: Rpc, request: Message) -> Seed:
    message = rpc.request_type.DESCRIPTOR
    return Seed(
        request.SerializeToString(),
        tuple(string_paths(message)),
        frozenset(field.number for field in message.fields),
    )


def nest(path: tuple[int, ...], body: bytes) -> bytes:
    """``body`` as the string at ``path`` (enclosing messages merge with the request's own)."""
    encoded = length_delimited(path[-1], body)
    for number in reversed(path[:-1]):
        encoded = length_delimited(number, encoded)
    return encoded


Mutation = Callable[[random.Random, bytes, Seed, list[Seed]], bytes]


def random_bytes(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def bit_flips(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    if not data:
        return random_bytes(rng, 1)
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncation(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def inserted_bytes(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    at = rng.randint(0, len(data))
    return data[:at] + random_bytes(rng, rng.randint(1, 16)) + data[at:]


def duplicated_bytes(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    if not data:
        return data
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 64)]
    at = rng.randint(0, len(data))
    return data[:at] + chunk * rng.randint(1, 4) + data[at:]


def body_of(rng: random.Random, wire_type: int) -> bytes:
    if wire_type == VARINT:
        return varint(rng.choice([0, 1, 127, 2**31, 2**63, 2**64 - 1, rng.getrandbits(64)]))
    if wire_type == I64:
        return random_bytes(rng, 8)
    if wire_type == I32:
        return random_bytes(rng, 4)
    if wire_type == LEN:
        return varint(n := rng.randint(0, 40)) + random_bytes(rng, n)
    return random_bytes(rng, rng.randint(0, 8))  # groups and the invalid wire types 6 and 7


def wrong_wire_type(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """A known field re-sent with another wire type (and a body of that type)."""
    fields = split_fields(seed.raw)
    if not fields:
        number, current = rng.choice(sorted(seed.known_numbers) or [1]), LEN
    else:
        number, current, _ = rng.choice(fields)
    wire_type = rng.choice([w for w in (VARINT, I64, LEN, SGROUP, EGROUP, I32, 6, 7) if w != current])
    field = tag(number, wire_type) + body_of(rng, wire_type)
    if wire_type == SGROUP and rng.random() < 0.5:
        field += tag(number, EGROUP)  # a well-formed (but mistyped) group
    kept = [encoded for n, _, encoded in fields if n != number or rng.random() < 0.3]
    kept.insert(rng.randint(0, len(kept)), field)
    return b"".join(kept) if data == seed.raw else data + field


def huge_length(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """A length-delimited field declaring far more bytes than follow (or an overflowing varint)."""
    number = rng.choice([*sorted(seed.known_numbers), 1, 15, 2**29 - 1])
    declared = rng.choice(
        [
            varint(len(data) + rng.randint(1, 100)),
            varint(2**31 - 1),
            varint(2**32),
            varint(2**63),
            varint(2**64 - 1),
            b"\xff" * rng.randint(10, 12) + b"\x01",  # a varint longer than ten bytes
            b"\x80" * rng.randint(1, 9),  # a varint that never ends
        ]
    )
    field = tag(number, LEN) + declared + random_bytes(rng, rng.randint(0, 32))
    if rng.random() < 0.3 and seed.string_paths:  # inside the nested message instead
        path = rng.choice([p for p in seed.string_paths if len(p) > 1] or seed.string_paths)
        field = nest(path[:-1], field) if len(path) > 1 else field
    at = rng.choice([0, len(data)])
    return data[:at] + field + data[at:]


def invalid_utf8(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """A (nested) string field whose bytes are not UTF-8."""
    if not seed.string_paths:
        return data + length_delimited(rng.randint(1, 20), rng.choice(INVALID_UTF8))
    path = rng.choice(seed.string_paths)
    bad = bytearray(b"ok-value" if rng.random() < 0.5 else b"")
    bad[rng.randint(0, len(bad)) : 0] = rng.choice(INVALID_UTF8)
    field = nest(path, bytes(bad))
    return field + data if rng.random() < 0.5 else data + field


def unknown_fields(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """Fields the schema does not know (valid numbers, mostly), which decoding must ignore."""
    extra = bytearray()
    for _ in range(rng.randint(1, 5)):
        number = rng.choice([rng.randint(7, 1000), 18_999, 19_500, 2**29 - 1, rng.randint(1, 2**29 - 1)])
        if number in seed.known_numbers:
            number += 1000
        if rng.random() < 0.05:
            number = rng.choice([0, 2**29, 2**32])  # not a field number at all
        wire_type = rng.choice([VARINT, I64, LEN, I32])
        extra += tag(number, wire_type) + body_of(rng, wire_type)
    return bytes(extra) + data if rng.random() < 0.3 else data + bytes(extra)


def deep_nesting(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """Garbage nested deeply: unknown groups within groups, or messages within messages."""
    depth = rng.choice([rng.randint(1, 99), rng.randint(100, 120), rng.randint(121, 400)])
    if rng.random() < 0.5:
        number = rng.randint(50, 500)
        closing = tag(number, EGROUP) * depth if rng.random() < 0.8 else b""
        nested = tag(number, SGROUP) * depth + random_bytes(rng, rng.randint(0, 8)) + closing
    else:
        nested = random_bytes(rng, rng.randint(0, 16))
        for _ in range(depth):
            nested = length_delimited(rng.choice([1, 1, 2, rng.randint(3, 30)]), nested)
    return data + nested


def splice(rng: random.Random, data: bytes, seed: Seed, others: list[Seed]) -> bytes:
    """Another method's valid request, whole or in part, glued on."""
    other = rng.choice(others).raw
    part = other[rng.randrange(len(other) + 1) :] if rng.random() < 0.5 else other
    return part + data if rng.random() < 0.5 else data + part


MUTATIONS: dict[str, Mutation] = {
    "bit_flips": bit_flips,
    "truncation": truncation,
    "inserted_bytes": inserted_bytes,
    "duplicated_bytes": duplicated_bytes,
    "wrong_wire_type": wrong_wire_type,
    "huge_length": huge_length,
    "invalid_utf8": invalid_utf8,
    "unknown_fields": unknown_fields,
    "deep_nesting": deep_nesting,
    "splice": splice,
}


@dataclass(frozen=True)
class Payload:
    index: int
    rpc: Rpc
    kind: str  # "random" or the mutations applied, joined with "+"
    data: bytes
    decodes: bool
    request_id: str  # sent as x-request-id, so the server's log lines for it can be found


def payloads(rng: random.Random, count: int, seeds: dict[str, Seed], stage: str) -> list[Payload]:
    made = []
    for index in range(count):
        rpc = RPCS[index % len(RPCS)]
        if rng.random() < RANDOM_SHARE:
            kind, data = "random", random_bytes(rng, rng.randint(0, 2048))
        else:
            seed = seeds[rpc.path]
            others = [s for path, s in seeds.items() if path != rpc.path and s.raw]
            names = rng.sample(sorted(MUTATIONS), rng.choice([1, 1, 1, 2, 3]))
            data = seed.raw
            for name in names:
                data = MUTATIONS[name](rng, data, seed, others)
            kind = "+".join(names)
        made.append(Payload(index, rpc, kind, data, decodes(rpc, data), f"s54-{stage}-{index:05d}"))
    return made


# --- valid requests to mutate, one fresh account per method ------------------------------------


@dataclass(frozen=True)
class Account:
    email: str
    user_id: str
    session_id: str
    device_id: str
    access_token: str
    refresh_token: str


def fake_jws() -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "link-1"}).encode())
    body = b64url(json.dumps({"sub": "01J0000000000000000000000", "purpose": "reset"}).encode())
    return f"{header}.{body}.{b64url(secrets.token_bytes(32))}"


def valid_request(rpc: Rpc, account: Account) -> Message:
    """A request of ``rpc`` whose every field holds a plausible value for ``account``."""
    values: dict[str, Any] = {
        "email": account.email,
        "new_email": new_email(),
        "password": PASSWORD,
        "current_password": PASSWORD,
        "new_password": "another long passphrase 54",
        "name": "Ada",
        "last_name": "Lovelace",
        "terms_accepted": True,
        "access_token": account.access_token,
        "refresh_token": account.refresh_token,
        "session_id": account.session_id,
        "keep_current": True,
        "required_roles": ["user"],
        "link_token": fake_jws(),
        "challenge_id": new_challenge_id(),
        "grant_token": new_grant_token(),
        "code": "123456",
        "action": "delete-account",
        "client": client(ip="203.0.113.54", device_id=account.device_id, accept_language="en-GB"),
    }
    request = rpc.request_type()
    for field in rpc.request_type.DESCRIPTOR.fields:
        value = values.get(field.name)
        if value is None:
            value = "s54" if field.type == field.TYPE_STRING else None
        if value is None:
            continue
        if field.is_repeated:
            getattr(request, field.name).extend(value if isinstance(value, list) else [value])
        elif field.type == field.TYPE_MESSAGE:
            getattr(request, field.name).CopyFrom(value)
        else:
            setattr(request, field.name, value)
    return request


async def sign_up(channel: grpc.aio.Channel, email: str) -> Account:
    session = (
        await auth_pb2_grpc.AuthServiceStub(channel).Signup(
            auth_pb2.SignupRequest(
                client=client(ip="203.0.113.54"),
                email=email,
                password=PASSWORD,
                name="Ada",
                last_name="Lovelace",
                terms_accepted=True,
            ),
            timeout=CALL_TIMEOUT,
        )
    ).session
    return Account(
        email,
        session.user_id,
        session.session_id,
        session.device_id,
        session.access_token,
        session.refresh_token,
    )


# --- the server --------------------------------------------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    address: str
    stdout: Path
    stderr: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS for the server process")

    def log_lines(self, request_id: str) -> list[str]:
        return [
            line for line in self.stdout.read_text(errors="replace").splitlines() if f'"{request_id}"' in line
        ]


def wait_serving(address: str, process: subprocess.Popen[bytes], stdout: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"iam-grpc serve exited with {process.returncode}:\n{stdout.read_text()[-4000:]}")
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.1)
    pytest.fail("iam-grpc serve did not become SERVING")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`iam-grpc serve` in embedded mode (SQLite, in-process state) on a free port."""
    folder = tmp_path_factory.mktemp("s54")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_")}
    env.update(
        IAM_DATA_DIR=str(folder / "var"),
        IAM_GRPC_LISTEN=f"127.0.0.1:{port}",
        IAM_HTTP_LISTEN="",
        IAM_SHUTDOWN__DRAIN_DELAY="0",
        IAM_RATELIMIT__GROUPS=json.dumps(NO_LIMITS),
        # Each hash's 19 MiB argon2 area goes back to the system when the hash ends (module docstring).
        GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072",
    )
    stdout = folder / "stdout.log"
    with stdout.open("wb") as out, (folder / "stderr.log").open("wb") as err:
        process = subprocess.Popen([IAM, "serve"], cwd=folder, env=env, stdout=out, stderr=err)
    try:
        wait_serving(f"127.0.0.1:{port}", process, stdout)
        yield Served(process, f"127.0.0.1:{port}", stdout, folder / "stderr.log")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# --- sending them ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    payload: Payload
    code: grpc.StatusCode
    reason: str | None
    domain: str | None
    violations: tuple[str, ...]
    message: str

    def describe(self, served: Served) -> str:
        p = self.payload
        logged = "\n      ".join(line[:3000] for line in served.log_lines(p.request_id)) or "(no log lines)"
        return (
            f"#{p.index} {p.rpc.path} [{p.kind}] decodes={p.decodes} -> {self.code.name} "
            f"reason={self.reason} domain={self.domain} violations={list(self.violations)} "
            f"message={self.message!r}\n    payload ({len(p.data)} bytes): {p.data[:512].hex()}"
            f"\n    server log for {p.request_id}:\n      {logged}"
        )


async def send(channel: grpc.aio.Channel, payload: Payload) -> Outcome:
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        payload.rpc.path, request_serializer=None, response_deserializer=None
    )
    try:
        await raw(payload.data, timeout=CALL_TIMEOUT, metadata=(("x-request-id", payload.request_id),))
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        return Outcome(
            payload,
            details.code,
            details.reason,
            details.domain,
            tuple(details.field_violations),
            details.message,
        )
    return Outcome(payload, grpc.StatusCode.OK, None, None, (), "")


async def send_all(channel: grpc.aio.Channel, batch: list[Payload]) -> list[Outcome]:
    """Every payload, at most IN_FLIGHT at a time."""
    queue = iter(batch)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        for payload in queue:
            outcomes.append(await send(channel, payload))

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return sorted(outcomes, key=lambda o: o.payload.index)


@dataclass(frozen=True)
class Storm:
    served: Served
    outcomes: list[Outcome]
    rss_after_warmup_kib: int
    rss_peak_kib: int
    rss_after_kib: int
    seconds: float

    def summary(self) -> str:
        split = Counter(
            ("decodes" if o.payload.decodes else "does not decode", o.code.name) for o in self.outcomes
        )
        lines = [f"S54: {len(self.outcomes)} payloads in {self.seconds:.1f} s (seed {SEED})"]
        lines += [f"  {what:>15} -> {code}: {n}" for (what, code), n in sorted(split.items())]
        lines.append(
            f"  RSS KiB: after warm-up {self.rss_after_warmup_kib}, peak {self.rss_peak_kib}, "
            f"after {self.rss_after_kib} ({self.rss_after_kib / self.rss_after_warmup_kib:.3f}x)"
        )
        return "\n".join(lines)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(served.address) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def storm(served: Served, channel: grpc.aio.Channel) -> Storm:
    """Warm up with a few hundred payloads of the same mix, measure RSS, then send the 10,000."""
    accounts = await asyncio.gather(
        *(sign_up(channel, f"s54.{rpc.name.lower()}.{secrets.token_hex(4)}@example.com") for rpc in RPCS)
    )
    seeds = {
        rpc.path: seed_of(rpc, valid_request(rpc, account))
        for rpc, account in zip(RPCS, accounts, strict=True)
    }

    await send_all(channel, payloads(random.Random(WARMUP_SEED), WARMUP_PAYLOADS, seeds, "warmup"))
    await asyncio.sleep(0.5)
    rss_after_warmup = served.rss_kib()

    peak = rss_after_warmup
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, served.rss_kib())
            await asyncio.sleep(0.2)

    batch = payloads(random.Random(SEED), PAYLOADS, seeds, "run")
    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        outcomes = await send_all(channel, batch)
    finally:
        done.set()
        await sampler
    seconds = time.monotonic() - started
    assert served.process.poll() is None, (
        f"the server died: exit {served.process.returncode}\n"
        f"{served.stdout.read_text(errors='replace')[-4000:]}\n{served.stderr.read_text(errors='replace')[-4000:]}"
    )
    result = Storm(served, outcomes, rss_after_warmup, max(peak, served.rss_kib()), served.rss_kib(), seconds)
    print("\n" + result.summary())
    return result


def failures(storm: Storm, wrong: Callable[[Outcome], bool], limit: int = 8) -> str:
    bad = [o for o in storm.outcomes if wrong(o)]
    shown = "\n  ".join(o.describe(storm.served) for o in bad[:limit])
    kinds = Counter((o.payload.rpc.name, o.code.name) for o in bad)
    return f"{len(bad)} wrong answers {dict(kinds)}:\n  {shown}\n{storm.summary()}"


# --- the requirement ---------------------------------------------------------------------------


def test_the_payloads_cover_every_method_with_both_kinds(storm: Storm) -> None:
    """10,000 payloads over every RPC of the three services, each with undecodable and decodable ones."""
    # every service but EventService, whose one RPC streams (tests/contract_helper.STREAMING_RPCS)
    assert {rpc.path.split("/")[1] for rpc in RPCS} == set(SERVICE_NAMES) - {"iam.v1.EventService"}
    assert len(storm.outcomes) == PAYLOADS
    per_rpc = Counter((o.payload.rpc.path, o.payload.decodes) for o in storm.outcomes)
    for rpc in RPCS:
        assert per_rpc[(rpc.path, False)] >= 100, rpc.path
        assert per_rpc[(rpc.path, True)] >= 10, rpc.path
    used = Counter(name for o in storm.outcomes for name in o.payload.kind.split("+"))
    assert set(used) == {"random", *MUTATIONS}


def test_a_payload_that_does_not_decode_is_invalid_argument(storm: Storm) -> None:
    """Every undecodable payload is refused by the decode guard: INVALID_ARGUMENT on `request`."""
    refused = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "iam.v1", True)

    def wrong(o: Outcome) -> bool:
        return not o.payload.decodes and (o.code, o.reason, o.domain, "request" in o.violations) != refused

    assert not any(wrong(o) for o in storm.outcomes), failures(storm, wrong)


def test_no_payload_yields_internal_or_unknown(storm: Storm) -> None:
    """No answer at all is INTERNAL or UNKNOWN (a bug, or gRPC's own failure to deserialize)."""

    def wrong(o: Outcome) -> bool:
        return o.code in {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

    assert not any(wrong(o) for o in storm.outcomes), failures(storm, wrong)


def test_a_decodable_payload_gets_a_client_caused_answer(storm: Storm) -> None:
    """A payload that decodes is an odd but well-formed request: OK or a client error in domain iam.v1."""

    def wrong(o: Outcome) -> bool:
        mapped = o.code == grpc.StatusCode.OK or o.domain == "iam.v1"
        return o.payload.decodes and not (o.code in CLIENT_CODES and mapped)

    assert not any(wrong(o) for o in storm.outcomes), failures(storm, wrong)


async def test_the_server_keeps_serving_and_answers_a_normal_call(
    storm: Storm, channel: grpc.aio.Channel
) -> None:
    """After the payloads the same process is SERVING (overall and per service) and a Signup works."""
    assert storm.served.process.poll() is None
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, name
    account = await sign_up(channel, new_email())
    verified = await token_pb2_grpc.TokenServiceStub(channel).VerifyAccessToken(
        token_pb2.VerifyAccessTokenRequest(access_token=account.access_token), timeout=CALL_TIMEOUT
    )
    assert verified.user_id == account.user_id


def test_memory_grows_by_less_than_ten_percent(storm: Storm) -> None:
    """The serving process's RSS after the payloads is within 10% of its RSS after the warm-up."""
    assert storm.rss_after_kib <= storm.rss_after_warmup_kib * MAX_RSS_GROWTH, storm.summary()

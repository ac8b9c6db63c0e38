"""TOTP as a second factor (RFC 6238, computed by pyotp) and its recovery codes.

The secret is kept only sealed under the master key's ``totp`` sub-key, bound to the user id, so a
dump of the database (or a row moved to another user) yields nothing usable. A code is accepted
once: proving one advances the factor's ``last_step`` by a compare-and-set in SQL, which every
replica shares, so the same code (or an older one of the window) is refused everywhere after its
first use. Recovery codes are stored as keyed hashes and spent once, ever.

``TotpFactors`` answers "does this user have TOTP" and proves codes for challenges;
``core/mfa/totp_enrollment.py`` turns the factor on and off.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp

from iam_grpc.clock import Clock
from iam_grpc.core.crypto import SealError, SecretMaterial, constant_time_equal
from iam_grpc.logging import component_logger
from iam_grpc.storage.factor_ports import TotpFactor
from iam_grpc.storage.ports import Database, Transaction

__all__ = [
    "RECOVERY_CODE_RULE",
    "TOTP_DIGITS",
    "TotpFactors",
    "TotpPolicy",
    "mfa_methods",
    "normalize_recovery_code",
]

log = component_logger("iam.mfa")

TOTP_DIGITS = 6
_PERIOD = 30
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/i/l: read aloud and typed by hand
_RECOVERY_LENGTH = 12
_RECOVERY_SHAPE = re.compile(rf"^[{_RECOVERY_ALPHABET}]{{{_RECOVERY_LENGTH}}}\Z")
RECOVERY_CODE_RULE = "must be a recovery code (12 letters and digits, hyphens allowed)"


@dataclass(frozen=True, slots=True)
class TotpPolicy:
    issuer: str = "iam-grpc"  # shown by the authenticator app next to the account
    window: int = 1  # time-steps accepted either side of now (clock drift of the phone)
    enrollment_ttl: timedelta = timedelta(minutes=10)
    enrollment_attempts: int = 5
    recovery_codes: int = 10
    max_auth_age: timedelta = timedelta(minutes=15)  # EnrollTotp needs a sign-in this recent


def normalize_recovery_code(text: str) -> str | None:
    """Lower case, hyphens and spaces dropped; None unless it has a recovery code's shape."""
    cleaned = text.replace("-", "").replace(" ", "").lower()
    return cleaned if _RECOVERY_SHAPE.match(cleaned) else None


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
    return "-".join(raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4))


async def mfa_methods(tx: Transaction, user_id: str) -> list[str]:
    """The second factors a user has, for ``User.mfa_methods`` (GetMe): "email" always (the
    address receives codes), "totp" once an authenticator app is confirmed."""
    methods = ["email"]
    if await tx.totp.get(user_id) is not None:
        methods.append("totp")
    return methods


class TotpFactors:
    def __init__(self, db: Database, material: SecretMaterial, clock: Clock, policy: TotpPolicy) -> None:
        self._db = db
        self._material = material
        self._clock = clock
        self.policy = policy

    # the secret ------------------------------------------------------------------------------

    @staticmethod
    def new_secret() -> str:
        return pyotp.random_base32()  # 32 base32 characters: 160 bits, RFC 4226's recommendation

    def seal(self, user_id: str, secret: str) -> bytes:
        return self._material.seal("totp", secret.encode(), _associated(user_id))

    def open(self, user_id: str, sealed: bytes) -> str | None:
        try:
            return self._material.open("totp", sealed, _associated(user_id)).decode()
        except SealError:
            log.bind(user_id=user_id).error("a TOTP secret does not open under any master key")
            return None

    def provisioning_uri(self, secret: str, account: str) -> str:
        return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=_PERIOD).provisioning_uri(
            name=account, issuer_name=self.policy.issuer
        )

    def step_of(self, secret: str, code: str, now: datetime | None = None) -> int | None:
        """The time-step whose code ``code`` is, within the window around now; None when none.
        Every step of the window is compared, in constant time, so timing tells nothing."""
        if len(code) != TOTP_DIGITS or not code.isascii() or not code.isdigit():
            return None
        totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=_PERIOD)
        at = int((now or self._clock.now()).timestamp())
        found: int | None = None
        for offset in range(-self.policy.window, self.policy.window + 1):
            moment = at + offset * _PERIOD
            if constant_time_equal(totp.at(moment), code) and found is None:
                found = totp.timecode(moment)
        return found

    # proving ---------------------------------------------------------------------------------

    async def enabled(self, user_id: str, tx: Transaction | None = None) -> bool:
        if tx is not None:
            return await tx.totp.get(user_id) is not None
        async with self._db.transaction(read_only=True) as own:
            return await own.totp.get(user_id) is not None

    async def prove_code(self, user_id: str, code: str) -> bool:
        """A current code of the user's factor, not used before: True once, on every replica."""
        async with self._db.transaction() as tx:
            factor: TotpFactor | None = await tx.totp.get(user_id)
            if factor is None:
                return False
            secret = self.open(user_id, factor.secret_enc)
            step = self.step_of(secret, code) if secret is not None else None
            if step is None:
                return False
            if not await tx.totp.advance_step(user_id, step):
                log.bind(user_id=user_id).warning("a TOTP code was presented again")
                return False
            return True

    async def prove_recovery_code(self, user_id: str, text: str) -> bool:
        """An unused recovery code of the user: True once, ever."""
        code = normalize_recovery_code(text)
        if code is None:
            return False
        now = self._clock.now()
        async with self._db.transaction() as tx:
            for _, digest in self._material.keyed_hashes("otp", _recovery_input(user_id, code)):
                if await tx.totp.spend_recovery_code(user_id, digest, now):
                    return True
        return False

    def new_recovery_codes(self, user_id: str) -> tuple[list[str], list[str]]:
        """Fresh recovery codes (shown once) and their keyed hashes (stored)."""
        codes = [_new_recovery_code() for _ in range(self.policy.recovery_codes)]
        hashes = [
            self._material.keyed_hash("otp", _recovery_input(user_id, normalize_recovery_code(c) or ""))
            for c in codes
        ]
        return codes, hashes


def _associated(user_id: str) -> bytes:
    return b"totp-secret:" + user_id.encode()


def _recovery_input(user_id: str, code: str) -> str:
    return f"recovery:{user_id}:{code}"

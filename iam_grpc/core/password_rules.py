"""What a password must be (behaviour.md 2.1, 2.2): the new-password policy, the common list
and the breached-password check, in the order the flows apply them.

Policy problems are field violations (INVALID_ARGUMENT with every problem
listed); a common or breached password is PASSWORD_BREACHED at Signup,
ResetPassword and ChangePassword, and only an advisory flag at Login.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol

from iam_grpc.core.passwords import login_password_problems, new_password_problems
from iam_grpc.core.validation import Violations
from iam_grpc.errors import PasswordBreached

__all__ = ["BreachedPasswords", "PasswordRules"]


class BreachedPasswords(Protocol):
    """How often a password was seen in breaches: 0 = never, None = unknown (check skipped)."""

    async def count(self, password: str) -> int | None: ...


class PasswordRules:
    def __init__(
        self,
        *,
        min_length: int,
        max_length: int,
        common: Container[str],
        breached: BreachedPasswords,
    ) -> None:
        self._min = min_length
        self._max = max_length
        self._common = common
        self._breached = breached

    def check_new(
        self, violations: Violations, name: str, password: str, *, email: str, names: Sequence[str]
    ) -> None:
        for problem in new_password_problems(
            password, min_length=self._min, max_length=self._max, email=email, names=names
        ):
            violations.add(name, problem)

    def check_shape(self, violations: Violations, name: str, password: str) -> None:
        """The rules of a new password that need no account (size, valid text): checked before
        storage is touched (2.1); :meth:`check_new` adds the personal ones once the account is read."""
        for problem in new_password_problems(
            password, min_length=self._min, max_length=self._max, email="", names=()
        ):
            violations.add(name, problem)

    def check_presented(self, violations: Violations, name: str, password: str) -> None:
        for problem in login_password_problems(password):
            violations.add(name, problem)

    async def is_breached(self, password: str) -> bool:
        if password in self._common:
            return True
        return (await self._breached.count(password) or 0) > 0

    async def ensure_not_breached(self, password: str) -> None:
        if await self.is_breached(password):
            raise PasswordBreached()

"""Signing in with a passkey, and a passkey as the answer to an MFA challenge.

``StartPasskeyLogin`` keeps a random challenge in the shared ephemeral store for
``webauthn.ceremony_ttl``; ``FinishPasskeyLogin`` takes it with an atomic get-and-delete, so one
ceremony signs in once on any replica. With an email the options name that account's
credentials; an address without an account (or without passkeys) gets made-up credential ids
that are stable per address, so the answer does not tell whether the account exists. User
verification is required. A verified assertion moves the stored signature counter forward with a
compare-and-set: the same assertion presented twice at once wins once, and a counter that goes
backwards (a cloned authenticator) does not verify. Then the login pipeline runs as for a
password (``LoginFlow.proven``): the passkey stands for the NEW_DEVICE check, the risk checks
still apply.

For an MFA challenge the WebAuthn challenge is derived from the challenge id under the master
key, so nothing more is stored: the MFA challenge itself is single use (compare-and-set to
``done``), wrong assertions spend its attempts like wrong codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from webauthn import generate_authentication_options, options_to_json, verify_authentication_response
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url, parse_authentication_credential_json
from webauthn.helpers.structs import PublicKeyCredentialDescriptor, UserVerificationRequirement

from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.client import ClientInfo
from iam_grpc.core.crypto import SecretMaterial
from iam_grpc.core.login import LoginFlow, LoginResult
from iam_grpc.core.mfa.completion import ChallengeCompletion, Outcome
from iam_grpc.core.observation import Observer
from iam_grpc.core.passkeys import PasskeyPolicy, check_credential_json, credential_hash, descriptors
from iam_grpc.core.ratelimit import Permit, ip_key
from iam_grpc.core.risk import POINTS, RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.validation import Violations, check_email
from iam_grpc.errors import ChallengeExpired, CodeInvalid, InvalidCredentials
from iam_grpc.ids import CHALLENGE_ID, new_challenge_id
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Ephemeral
from iam_grpc.storage.records import PasskeyRecord, User

__all__ = ["PasskeyLogin", "PasskeyStart"]

log = component_logger("iam.passkeys")


@dataclass(frozen=True, slots=True)
class PasskeyStart:
    challenge_id: str
    options_json: str


def _login_key(challenge_id: str) -> str:
    return f"webauthn:login:{{{challenge_id}}}"


class _Refused(Exception):
    """An assertion that does not verify (the reason is logged, never answered)."""


class PasskeyLogin:
    def __init__(
        self,
        runtime: Runtime,
        ephemeral: Ephemeral,
        material: SecretMaterial,
        login: LoginFlow,
        challenges: Challenges,
        completion: ChallengeCompletion,
        observer: Observer,
        risk: RiskScores,
        policy: PasskeyPolicy,
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._material = material
        self._login = login
        self._challenges = challenges
        self._completion = completion
        self._observer = observer
        self._risk = risk
        self.policy = policy

    # StartPasskeyLogin / FinishPasskeyLogin ----------------------------------------------------

    async def start(self, client: ClientInfo, email_text: str, violations: Violations) -> PasskeyStart:
        email = check_email(violations, "email", email_text) if email_text else None
        violations.raise_any()
        allowed: list[PublicKeyCredentialDescriptor] = []
        if email is not None:
            async with self._run.db.transaction(read_only=True) as tx:
                user = await tx.users.get_by_email(email.norm)
                mine = await tx.passkeys.of_user(user.id) if user is not None else []
            allowed = descriptors(mine, transports=False) or self._decoys(email.norm)
        options = generate_authentication_options(
            rp_id=self.policy.rp_id,
            timeout=int(self.policy.ceremony_ttl.total_seconds() * 1000),
            allow_credentials=allowed,
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        challenge_id = new_challenge_id()
        state = {
            "challenge": bytes_to_base64url(options.challenge),
            "email": email.norm if email else "",
            "device": client.device_id,  # finished by the device that started it
        }
        await self._ephemeral.set(
            _login_key(challenge_id), json.dumps(state).encode(), self.policy.ceremony_ttl
        )
        return PasskeyStart(challenge_id, options_to_json(options))

    def _decoys(self, email_norm: str) -> list[PublicKeyCredentialDescriptor]:
        """One made-up credential id per address, the same every time (no account, or none yet)."""
        fake = self._material.keyed_hash("otp", f"passkey-decoy:{email_norm}")
        return [PublicKeyCredentialDescriptor(id=base64url_to_bytes(fake)[:16])]

    async def finish(
        self, client: ClientInfo, challenge_id: str, credential_json: str, violations: Violations
    ) -> LoginResult:
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", "must be a challenge id (ch_ and 22 characters)")
        check_credential_json(violations, "credential_json", credential_json)
        violations.raise_any()
        raw = await self._ephemeral.get_and_delete(_login_key(challenge_id))  # works once
        if raw is None:
            raise ChallengeExpired()
        state = json.loads(raw)
        permit = await self._run.limiter.hit("passkey.ip_fail", ip_key(client.ip))
        try:
            user, _ = await self._verified(credential_json, base64url_to_bytes(state["challenge"]))
            if state.get("device", "") != client.device_id:
                raise _Refused("another device")
            if state["email"] and user.email_norm != state["email"]:
                raise _Refused("another account's passkey")
            if user.status != "active":
                raise _Refused("disabled account")
        except _Refused as refused:
            await self._failed(client, None, str(refused))
            raise InvalidCredentials() from None
        await permit.succeeded()
        return await self._login.proven(user, client, second_factor=True)

    # the MFA channel ---------------------------------------------------------------------------

    def _mfa_challenge(self, challenge_id: str) -> bytes:
        return base64url_to_bytes(self._material.keyed_hash("otp", f"passkey-mfa:{challenge_id}"))

    async def offer(self, challenge: Challenge) -> str:
        """Request options for answering ``challenge`` with a passkey; empty when the user has
        none."""
        async with self._run.db.transaction(read_only=True) as tx:
            mine = await tx.passkeys.of_user(challenge.user_id)
        if not mine:
            return ""
        options = generate_authentication_options(
            rp_id=self.policy.rp_id,
            challenge=self._mfa_challenge(challenge.id),
            timeout=int(self.policy.ceremony_ttl.total_seconds() * 1000),
            allow_credentials=descriptors(mine),
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        return options_to_json(options)

    async def verify_challenge(
        self, client: ClientInfo, challenge_id: str, assertion_json: str, violations: Violations
    ) -> Outcome:
        """VerifyChallenge with ``passkey_assertion_json`` (behaviour.md 4.2 with a passkey for the
        code): from the challenge's device, with one of the challenge user's passkeys."""
        if not CHALLENGE_ID.match(challenge_id):
            violations.add("challenge_id", "must be a challenge id (ch_ and 22 characters)")
        check_credential_json(violations, "passkey_assertion_json", assertion_json)
        violations.raise_any()
        if client.device_id:
            await self._run.limiter.ensure_not_blocked("code.device", client.device_id)
        challenge = await self._challenges.get(challenge_id)
        if challenge is None or not challenge.live(self._run.clock.now()):
            raise ChallengeExpired()
        permits = await self._reserve(client, challenge)
        seen = self._observer.observe(client)
        try:
            if not challenge.comes_from(client.device_id, seen.agent):
                raise _Refused("another device")
            user, _ = await self._verified(assertion_json, self._mfa_challenge(challenge.id))
            if user.id != challenge.user_id:
                raise _Refused("another account's passkey")
        except _Refused as refused:
            await self._failed(client, challenge.user_id, str(refused))
            left = await self._challenges.spend_attempt(challenge.id)
            raise CodeInvalid(left) from None
        done = await self._challenges.finish(challenge.id)  # two right answers at once: one wins
        for permit in permits:
            await permit.succeeded()
        return await self._completion.complete(done, client, seen, mailbox=False)

    async def _reserve(self, client: ClientInfo, challenge: Challenge) -> list[Permit]:
        limiter = self._run.limiter
        permits = [
            await limiter.hit("code.ip_fail", ip_key(client.ip)),
            await limiter.hit("code.user_fail", challenge.user_id),
        ]
        if client.device_id:
            permits.append(await limiter.hit("code.device", client.device_id))
        return permits

    # verifying an assertion ---------------------------------------------------------------------

    async def _verified(self, credential_json: str, expected_challenge: bytes) -> tuple[User, PasskeyRecord]:
        """The user and passkey of an assertion that verifies, its counter moved; else _Refused."""
        try:
            credential = parse_authentication_credential_json(credential_json)
        except Exception:  # the parser raises several kinds for one meaning
            raise _Refused("malformed") from None
        async with self._run.db.transaction(read_only=True) as tx:
            passkey = await tx.passkeys.by_credential(credential_hash(bytes_to_base64url(credential.raw_id)))
            user = await tx.users.get(passkey.user_id) if passkey is not None else None
        if passkey is None or user is None:
            raise _Refused("unknown credential")
        handle = credential.response.user_handle
        if handle and handle != user.id.encode():
            raise _Refused("user handle")
        try:
            verified = verify_authentication_response(
                credential=credential,
                expected_challenge=expected_challenge,
                expected_rp_id=self.policy.rp_id,
                expected_origin=list(self.policy.origins),
                credential_public_key=passkey.public_key,
                credential_current_sign_count=passkey.sign_count,
                require_user_verification=True,
            )
        except Exception as error:  # InvalidAuthenticationResponse and the parsers' errors
            raise _Refused(type(error).__name__) from None
        async with self._run.db.transaction() as tx:
            moved = await tx.passkeys.used(
                passkey.id,
                expect_count=passkey.sign_count,
                sign_count=verified.new_sign_count,
                backed_up=verified.credential_backed_up,
                now=self._run.clock.now(),
            )
        if not moved:
            raise _Refused("counter raced")  # the same assertion verified elsewhere just now
        return user, passkey

    async def _failed(self, client: ClientInfo, user_id: str | None, why: str) -> None:
        log.bind(user_id=user_id, check=why).info("passkey assertion refused")
        ip_points, device_points = POINTS["failed_login"]
        await self._risk.add(
            ip=client.ip, device_id=client.device_id or None, ip_points=ip_points, device_points=device_points
        )
        async with self._run.db.transaction() as tx:
            await self._run.audit.record(
                self._run.audit.event(
                    "passkey.failure", "fail", user_id=user_id, ip=client.ip, details={"check": why}
                ),
                tx,
            )

"""Passkeys (WebAuthn): registering, listing and deleting them (the ceremonies of signing in with
one are in :mod:`iam_grpc.core.passkey_login`).

The BFF relays the browser's ceremony as JSON: creation options out, the browser's
``PublicKeyCredential`` back. Each ceremony's challenge is random, kept in the shared ephemeral
store under the session that started it, lives ``webauthn.ceremony_ttl`` and is taken with an
atomic get-and-delete, so it works once on any replica. The relying party id and the allowed
origins come from the configuration; a credential made for another origin or relying party, or
without user verification, does not verify. Registration requires resident keys (discoverable
credentials) and user verification; attestation is not requested (``none``): we trust the
authenticator's key, not its make.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from webauthn import generate_registration_options, options_to_json, verify_registration_response
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from iam_grpc.core.client import ClientInfo
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.sign_in_methods import keep_a_way_in
from iam_grpc.core.signed_in import signed_in
from iam_grpc.core.tokens.access import AccessTokens
from iam_grpc.core.validation import Violations, check_name
from iam_grpc.errors import ChallengeExpired, InvalidArgument
from iam_grpc.ids import ULID_RE, new_ulid
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Conflict, Ephemeral
from iam_grpc.storage.records import PasskeyRecord

__all__ = ["PasskeyPolicy", "PasskeyRegistry", "credential_hash", "descriptors"]

log = component_logger("iam.passkeys")

MAX_CREDENTIAL_JSON = 32 * 1024  # real ones are a few KB; a request is at most 64 KiB


@dataclass(frozen=True, slots=True)
class PasskeyPolicy:
    rp_id: str  # webauthn.rp_id (IAM_WEBAUTHN_RP_ID)
    rp_name: str
    origins: tuple[str, ...]  # webauthn.origins (IAM_WEBAUTHN_ORIGINS)
    ceremony_ttl: timedelta
    max_per_user: int
    max_auth_age: timedelta  # registering or deleting one needs a recent sign-in (email_change's)


def credential_hash(credential_id: str) -> str:
    """The unique lookup key of a credential id (base64url of its SHA-256: fixed length)."""
    return bytes_to_base64url(hashlib.sha256(credential_id.encode()).digest())


def descriptors(
    passkeys: list[PasskeyRecord], *, transports: bool = True
) -> list[PublicKeyCredentialDescriptor]:
    """The credentials as options name them; without ``transports`` (hints only) when the answer
    must look the same as the made-up ones of an address without passkeys."""
    return [
        PublicKeyCredentialDescriptor(
            id=base64url_to_bytes(p.credential_id),
            transports=[AuthenticatorTransport(t) for t in p.transports.split(",") if _transport(t)]
            if transports
            else None,
        )
        for p in passkeys
    ]


def _transport(name: str) -> bool:
    return name in {t.value for t in AuthenticatorTransport}


def _registration_key(session_id: str) -> str:
    return f"webauthn:reg:{{{session_id}}}"


def check_credential_json(violations: Violations, field: str, text: str) -> None:
    if not text or len(text) > MAX_CREDENTIAL_JSON:
        violations.add(
            field, f"must be the browser's PublicKeyCredential as JSON, 1 to {MAX_CREDENTIAL_JSON} bytes"
        )


class PasskeyRegistry:
    def __init__(
        self, runtime: Runtime, ephemeral: Ephemeral, access: AccessTokens, policy: PasskeyPolicy
    ) -> None:
        self._run = runtime
        self._ephemeral = ephemeral
        self._access = access
        self.policy = policy

    async def start_registration(self, client: ClientInfo, access_token: str) -> str:
        """Creation options for ``navigator.credentials.create()``; the challenge is kept for the
        session, replacing one it started before."""
        claims, user = await signed_in(
            self._run, self._access, client, access_token, max_auth_age=self.policy.max_auth_age
        )
        async with self._run.db.transaction(read_only=True) as tx:
            existing = await tx.passkeys.of_user(user.id)
        if len(existing) >= self.policy.max_per_user:
            raise InvalidArgument.one(
                "access_token", f"the account has {self.policy.max_per_user} passkeys already"
            )
        options = generate_registration_options(
            rp_id=self.policy.rp_id,
            rp_name=self.policy.rp_name,
            user_name=user.email,
            user_id=user.id.encode(),
            user_display_name=" ".join(part for part in (user.name, user.last_name) if part) or user.email,
            timeout=int(self.policy.ceremony_ttl.total_seconds() * 1000),
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=UserVerificationRequirement.REQUIRED,
            ),
            exclude_credentials=descriptors(existing),
        )
        state = json.dumps({"challenge": bytes_to_base64url(options.challenge), "user_id": user.id})
        await self._ephemeral.set(
            _registration_key(claims.session_id), state.encode(), self.policy.ceremony_ttl
        )
        return options_to_json(options)

    async def finish_registration(
        self, client: ClientInfo, access_token: str, credential_json: str, name: str, violations: Violations
    ) -> PasskeyRecord:
        label = check_name(violations, "name", name, required=True)
        check_credential_json(violations, "credential_json", credential_json)
        violations.raise_any()
        claims, user = await signed_in(self._run, self._access, client, access_token)
        raw = await self._ephemeral.get_and_delete(_registration_key(claims.session_id))  # once
        if raw is None:
            raise ChallengeExpired()
        state = json.loads(raw)
        if state.get("user_id") != user.id:
            raise ChallengeExpired()
        try:
            verified = verify_registration_response(
                credential=credential_json,
                expected_challenge=base64url_to_bytes(state["challenge"]),
                expected_rp_id=self.policy.rp_id,
                expected_origin=list(self.policy.origins),
                require_user_verification=True,
            )
            transports = _transports_of(credential_json)
        except Exception as error:  # the library raises several kinds for one meaning
            log.bind(user_id=user.id, error=type(error).__name__).info("passkey registration refused")
            raise InvalidArgument.one("credential_json", "does not verify for this ceremony") from None
        now = self._run.clock.now()
        credential_id = bytes_to_base64url(verified.credential_id)
        record = PasskeyRecord(
            id=new_ulid(now),
            user_id=user.id,
            credential_id=credential_id,
            public_key=verified.credential_public_key,
            sign_count=verified.sign_count,
            name=label,
            created_at=now,
            credential_hash=credential_hash(credential_id),
            transports=",".join(transports),
            aaguid=verified.aaguid,
            backup_eligible=int(verified.credential_device_type.value == "multi_device"),
            backed_up=int(verified.credential_backed_up),
        )
        try:
            async with self._run.db.transaction() as tx:
                if await tx.passkeys.count(user.id) >= self.policy.max_per_user:
                    raise InvalidArgument.one("credential_json", "the account has too many passkeys")
                await tx.passkeys.insert(record)
                await self._run.audit.record(
                    self._run.audit.event(
                        "passkey.registered",
                        "ok",
                        user_id=user.id,
                        session_id=claims.session_id,
                        details={"passkey_id": record.id},
                    ),
                    tx,
                )
        except Conflict:
            raise InvalidArgument.one("credential_json", "this passkey is registered already") from None
        log.bind(user_id=user.id).info("passkey registered")
        return record

    async def list(self, client: ClientInfo, access_token: str) -> list[PasskeyRecord]:
        _, user = await signed_in(self._run, self._access, client, access_token)
        async with self._run.db.transaction(read_only=True) as tx:
            return await tx.passkeys.of_user(user.id)

    async def delete(
        self, client: ClientInfo, access_token: str, passkey_id: str, violations: Violations
    ) -> None:
        """Delete one of the user's passkeys; never the last way to sign in. Someone else's or an
        unknown id changes nothing."""
        if not ULID_RE.match(passkey_id):
            violations.add("passkey_id", "must be a passkey id (26 characters)")
        violations.raise_any()
        claims, user = await signed_in(
            self._run, self._access, client, access_token, max_auth_age=self.policy.max_auth_age
        )
        async with self._run.db.transaction() as tx:
            if passkey_id not in {p.id for p in await tx.passkeys.of_user(user.id)}:
                return
            await keep_a_way_in(tx, user.id, removing="passkey")
            await tx.passkeys.delete(user.id, passkey_id)
            await self._run.audit.record(
                self._run.audit.event(
                    "passkey.deleted",
                    "ok",
                    user_id=user.id,
                    session_id=claims.session_id,
                    details={"passkey_id": passkey_id},
                ),
                tx,
            )


def _transports_of(credential_json: str) -> list[str]:
    document = json.loads(credential_json)
    listed = document.get("response", {}).get("transports", []) if isinstance(document, dict) else []
    return [t for t in listed if isinstance(t, str) and _transport(t)][:8]

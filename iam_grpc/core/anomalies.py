"""Anomaly evaluation on Refresh (behaviour.md 3): checks 2-10 in order, the first hit decides.

Check 1 (the token's own state) is the rotation logic of Refresh; this module
plugs into its :class:`~iam_grpc.core.tokens.refresh.RefreshCheck` seam and
runs inside the rotation's transaction, so what it reads and what the rotation
writes are one unit. A hit answers with an email challenge
(``action = mfa``) or refuses (``action = block``, ANOMALY_BLOCKED naming the
check); ``off`` skips the check. Every hit is an audit event with the compared
values. A Refresh that passes every check teaches the device its network,
country and location; nothing is learned from a request that did not pass.

A pending refresh challenge of the session short-cuts the checks only for the
request that raised it: the same device (device id and coarse fingerprint)
presenting the same refresh token. For it, still pending → the same challenge
again (no new email); approved from another device (4.5) → rotate now with the
MFA success applied. Anyone else holding the token (a thief polling Refresh
while the owner approves on the phone) is evaluated as usual, and a check that
hits answers the session's pending challenge again rather than raising a second
one: an approval is collected only where the challenge was raised.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from iam_grpc.core.challenges import Challenge, Challenges
from iam_grpc.core.crypto import constant_time_equal
from iam_grpc.core.fingerprint import (
    fingerprint_mismatches,
    network_known,
    recent_countries,
    travel_is_impossible,
)
from iam_grpc.core.mfa.completion import ChallengeCompletion
from iam_grpc.core.observation import LearningPolicy, Observation, Observer, learned
from iam_grpc.core.risk import RiskScores
from iam_grpc.core.runtime import Runtime
from iam_grpc.core.tokens.refresh import RefreshContext, RefreshVerdict, Refusal
from iam_grpc.core.tokens.rotation import AfterRotation, IssuedSession
from iam_grpc.core.tokens.sessions import Sessions
from iam_grpc.errors import AnomalyBlocked, BackendUnavailable
from iam_grpc.logging import component_logger
from iam_grpc.storage.ports import Transaction
from iam_grpc.storage.records import UserDevice

__all__ = ["CHECKS", "AnomalyChecks", "AnomalyPolicy"]

log = component_logger("iam.anomaly")

CHECKS = (
    "device",
    "idle",
    "session_count",
    "rotation_burst",
    "network",
    "risk",
    "proxy",
    "fingerprint",
    "travel",
)
_REASON = {
    "device": "NEW_DEVICE",
    "idle": "IDLE",
    "session_count": "TOO_MANY_SESSIONS",
    "rotation_burst": "ROTATION_BURST",
    "network": "IP_CHANGED",
    "risk": "SUSPICIOUS_ACTIVITY",
    "proxy": "PROXY_OR_HOSTING",
    "fingerprint": "FINGERPRINT_CHANGED",
    "travel": "IMPOSSIBLE_TRAVEL",
}


@dataclass(frozen=True, slots=True)
class AnomalyPolicy:
    actions: dict[str, str] = field(default_factory=lambda: {"rotation_burst": "block"})  # missing: mfa
    tor_action: str = "mfa"
    idle_after: timedelta = timedelta(hours=72)
    max_sessions: int = 5
    session_count_bypass: timedelta = timedelta(days=7)
    burst_max: int = 3
    burst_window: timedelta = timedelta(minutes=10)
    asn_match: bool = True
    risk_threshold: int = 25
    travel_max_kmh: float = 900
    travel_min_km: float = 500

    def action(self, check: str) -> str:
        return self.actions.get(check, "mfa")


@dataclass
class _Evaluation:
    """One Refresh under evaluation: its context, what was observed, and derived facts."""

    context: RefreshContext
    seen: Observation
    tx: Transaction
    now: datetime
    allowed_ip: bool = False  # the ip is flagged (proxy/hosting) and this device holds an allowance


@dataclass(frozen=True, slots=True)
class _Hit:
    check: str
    details: dict[str, Any]
    action: str | None = None  # overrides the check's action (Tor exits)


_REWRITE_AFTER = timedelta(hours=1)


def _worth_writing(before: UserDevice, after: UserDevice, now: datetime) -> bool:
    """Whether a passing refresh taught the device something (a network, a country, a raised
    version, a new place) or what it learned is an hour old; otherwise only ``last_seen_at`` and
    ``last_ip`` are touched: one narrow UPDATE instead of rewriting the JSON columns."""
    seen_before = _stamps(before.known_networks, "prefix")
    seen_after = _stamps(after.known_networks, "prefix")
    countries_before = _stamps(before.known_countries, "code")
    countries_after = _stamps(after.known_countries, "code")
    if seen_before.keys() != seen_after.keys() or list(countries_before) != list(countries_after):
        return True
    if before.baseline != after.baseline:
        return True
    if (before.last_lat, before.last_lon) != (after.last_lat, after.last_lon):
        return True
    if before.last_located_at is not None and now - before.last_located_at >= _REWRITE_AFTER:
        return True
    for after_stamps, before_stamps in ((seen_after, seen_before), (countries_after, countries_before)):
        for name, stamp in after_stamps.items():
            if stamp != before_stamps[name]:
                try:
                    if now - datetime.fromisoformat(before_stamps[name]) >= _REWRITE_AFTER:
                        return True
                except ValueError:
                    return True
    return False


def _stamps(entries: list[Any], name: str) -> dict[str, str]:
    """{name: seen_at} of learned entries, in stored order (a bare string is a name never stamped)."""
    return {
        (str(entry.get(name)) if isinstance(entry, dict) else str(entry)): (
            str(entry.get("seen_at", "")) if isinstance(entry, dict) else ""
        )
        for entry in entries
    }


def _same_token(pending: Challenge, context: RefreshContext) -> bool:
    return pending.token_hash is not None and constant_time_equal(
        pending.token_hash, context.token.token_hash
    )


def _raised_by(pending: Challenge, context: RefreshContext, seen: Observation) -> bool:
    """The request that raised the refresh challenge: the same refresh token, from the same device
    id with the same coarse fingerprint (4.1). Only it may collect an approval given elsewhere."""
    return _same_token(pending, context) and pending.comes_from(context.client.device_id, seen.agent)


class AnomalyChecks:
    def __init__(
        self,
        runtime: Runtime,
        challenges: Challenges,
        completion: ChallengeCompletion,
        sessions: Sessions,
        observer: Observer,
        risk: RiskScores,
        *,
        policy: AnomalyPolicy,
        learning: LearningPolicy,
    ) -> None:
        self._run = runtime
        self._challenges = challenges
        self._completion = completion
        self._sessions = sessions
        self._observer = observer
        self._risk = risk
        self._policy = policy
        self._learning = learning
        self._checks: tuple[tuple[str, Callable[[_Evaluation], Awaitable[_Hit | None]]], ...] = (
            ("device", self._device),
            ("idle", self._idle),
            ("session_count", self._session_count),
            ("rotation_burst", self._rotation_burst),
            ("network", self._network),
            ("risk", self._risk_score),
            ("proxy", self._proxy),
            ("fingerprint", self._fingerprint),
            ("travel", self._travel),
        )

    async def __call__(self, context: RefreshContext, tx: Transaction) -> RefreshVerdict:
        seen = self._observer.observe(context.client)
        try:
            pending = await self._challenges.pending_for_session(context.session.id)
        except BackendUnavailable:
            # Fails open: the checks below run as if nothing were pending, and a hit still needs
            # the store for its challenge (BACKEND_UNAVAILABLE then); every one of them is decided
            # from SQL or by its own store rule, so no Refresh passes one it would not pass anyway.
            self._run.metrics.store_fallbacks.labels("pending_challenge").inc()
            log.warning("pending challenge unreadable; evaluating the checks")
            pending = None
        if pending is not None and pending.kind == "refresh" and _raised_by(pending, context, seen):
            return await self._resume(pending, context, seen, tx)
        evaluation = _Evaluation(context, seen, tx, self._run.clock.now())
        for name, check in self._checks:
            if self._policy.action(name) == "off":
                continue
            hit = await check(evaluation)
            if hit is not None:
                return await self._decide(hit, evaluation, pending)
        return self._pass(evaluation)

    # outcomes ---------------------------------------------------------------------------------------

    async def _resume(
        self, pending: Challenge, context: RefreshContext, seen: Observation, tx: Transaction
    ) -> Challenge | AfterRotation:
        """Step 6 of behaviour.md 1.5: the same challenge while pending; once approved from
        another device, rotate now with the MFA success applied (3.4)."""
        if pending.state == "pending":
            return pending
        done = await self._challenges.finish(pending.id)
        device_id = ""
        if done.reason == "NEW_DEVICE":
            device = await self._sessions.resolve_device(
                tx, context.client, seen.agent, self._run.clock.now()
            )
            device_id = device.id
        return self._completion.after_rotation(done, context.client, seen, device_id)

    async def _decide(
        self, hit: _Hit, evaluation: _Evaluation, pending: Challenge | None = None
    ) -> Refusal | Challenge:
        """A hit: refuse (block), or challenge; with a refresh challenge already pending for the
        session (raised by another request for the same token), that one is answered again, so a
        session never has two and no second code is mailed (4.1)."""
        context, tx = evaluation.context, evaluation.tx
        action = hit.action or self._policy.action(hit.check)
        details = {"check": hit.check, "action": action, **hit.details}
        if action == "block":
            self._run.metrics.anomaly_blocks.labels(hit.check).inc()
            await self._run.audit.record(
                self._run.audit.event(
                    "anomaly.blocked",
                    "fail",
                    user_id=context.user.id,
                    session_id=context.session.id,
                    device_id=context.session.device_id,
                    details=details,
                ),
                tx,
            )
            ended = None
            if hit.check == "rotation_burst" and await tx.sessions.revoke(
                context.session.id, "rotation_burst", evaluation.now
            ):
                ended = context.session.id
                await self._run.audit.sessions_revoked(tx, context.user.id, [ended], "rotation_burst")
            return Refusal(AnomalyBlocked(hit.check), ended_session=ended)
        reason = _REASON[hit.check]
        if pending is not None and not _same_token(pending, context):
            # Raised for a token rotated since: it can never complete, so it gives way.
            await self._challenges.end(pending)
            pending = None
        if pending is not None:
            await self._run.audit.record(
                self._run.audit.event(
                    "anomaly.challenge",
                    "info",
                    user_id=context.user.id,
                    session_id=context.session.id,
                    device_id=context.session.device_id,
                    details={**details, "reason": reason, "challenge": pending.id, "pending": True},
                ),
                tx,
            )
            return pending
        await self._run.limiter.ensure_not_blocked("code.user_fail", context.user.id)
        challenge = await self._challenges.create(
            "refresh",
            context.user,
            reason,
            asdict(context.client),
            evaluation.seen.agent,
            device_label=evaluation.seen.agent.label,
            location=evaluation.seen.location,
            tx=tx,
            session_id=context.session.id,
            token_hash=context.token.token_hash,
        )
        self._run.metrics.challenges.labels(reason).inc()
        await self._run.audit.record(
            self._run.audit.event(
                "anomaly.challenge",
                "info",
                user_id=context.user.id,
                session_id=context.session.id,
                device_id=context.session.device_id,
                details={**details, "reason": reason, "challenge": challenge.id},
            ),
            tx,
        )
        return challenge

    def _pass(self, evaluation: _Evaluation) -> AfterRotation:
        """Every check passed: rotate, and let the device learn this network, country and place."""
        context, seen = evaluation.context, evaluation.seen

        async def apply(tx: Transaction, issued: IssuedSession) -> None:
            link = context.link
            now, ip = evaluation.now, context.client.ip
            if link is not None:
                updated = learned(link, seen, ip, now, self._learning, allowed_ip=evaluation.allowed_ip)
                if _worth_writing(link, updated, now):
                    await tx.devices.save_link(updated)
                    return
            await tx.devices.touch_link(context.user.id, issued.device_id, now, ip)

        geo = seen.geo
        return AfterRotation(apply, location=(geo.country, geo.region, geo.city))

    # the checks ---------------------------------------------------------------------------------------

    async def _device(self, e: _Evaluation) -> _Hit | None:
        """2: the refresh token moved to another browser, or the device cookie was lost."""
        presented, expected = e.context.client.device_id, e.context.session.device_id
        if presented == expected:
            return None
        return _Hit("device", {"presented_device": "empty" if not presented else "other"})

    async def _idle(self, e: _Evaluation) -> _Hit | None:
        """3: the device was not seen for longer than ``idle_after``."""
        link = e.context.link
        if link is None or e.now - link.last_seen_at <= self._policy.idle_after:
            return None
        return _Hit("idle", {"idle_hours": round((e.now - link.last_seen_at).total_seconds() / 3600, 1)})

    async def _session_count(self, e: _Evaluation) -> _Hit | None:
        """4: more live sessions than ``max_sessions``, and no MFA on this one within the bypass."""
        session = e.context.session
        if session.mfa_at is not None and e.now - session.mfa_at <= self._policy.session_count_bypass:
            return None
        live = await e.tx.sessions.list_live(e.context.user.id, e.now)
        if len(live) <= self._policy.max_sessions:
            return None
        return _Hit("session_count", {"live_sessions": len(live), "limit": self._policy.max_sessions})

    async def _rotation_burst(self, e: _Evaluation) -> _Hit | None:
        """5: this rotation would make the session's rotations within ``burst_window`` more than
        ``burst_max``: N rotate, the (N+1)-th is refused, for a session signed in a minute ago as
        for one signed in a week ago (the sign-in's own token is not a rotation)."""
        since = e.now - self._policy.burst_window
        rotations = await e.tx.sessions.recent_rotations(e.context.session.id, since)
        if rotations < self._policy.burst_max:
            return None
        return _Hit(
            "rotation_burst",
            {"rotations": rotations, "window_s": int(self._policy.burst_window.total_seconds())},
        )

    async def _network(self, e: _Evaluation) -> _Hit | None:
        """6: the ip is outside every known network of the device (a device with none passes)."""
        link = e.context.link
        if link is None or not link.known_networks:
            return None
        if network_known(
            link.known_networks,
            e.context.client.ip,
            e.seen.geo,
            ipv4_prefix=self._learning.ipv4_prefix,
            ipv6_prefix=self._learning.ipv6_prefix,
            asn_match=self._policy.asn_match,
        ):
            return None
        return _Hit(
            "network",
            {"asn": e.seen.geo.asn, "country": e.seen.geo.country, "known": len(link.known_networks)},
        )

    async def _risk_score(self, e: _Evaluation) -> _Hit | None:
        """7: the ip's or the device's risk points of the last 24 h reach the threshold."""
        score = await self._risk.score(ip=e.context.client.ip, device_id=e.context.session.device_id)
        if score is None:
            self._run.metrics.store_fallbacks.labels("risk_score").inc()
            log.warning("risk score unavailable; the check is skipped")
            return None
        if score < self._policy.risk_threshold:
            return None
        return _Hit("risk", {"score": score, "threshold": self._policy.risk_threshold})

    async def _proxy(self, e: _Evaluation) -> _Hit | None:
        """8: an anonymising or hosting ip without a current allowance for that class."""
        if not self._observer.has_anonymity_data:
            return None
        flagged = e.seen.geo.flagged_class
        if flagged is None:
            return None
        link = e.context.link
        until = None
        if link is not None:
            until = link.proxy_allowed_until if flagged == "proxy" else link.hosting_allowed_until
        if until is not None and until > e.now:
            e.allowed_ip = True  # evaluation goes on, without location fields
            return None
        tor = e.seen.geo.tor_exit
        return _Hit("proxy", {"class": flagged, "tor": tor}, action=self._policy.tor_action if tor else None)

    async def _fingerprint(self, e: _Evaluation) -> _Hit | None:
        """9: a compared field differs beyond tolerance (browser upgrades pass)."""
        link = e.context.link
        if link is None or not link.baseline:
            return None
        mismatches = fingerprint_mismatches(
            link.baseline,
            e.seen.agent,
            e.seen.geo,
            recent_countries(link.known_countries, e.now, memory=self._learning.network_memory),
            skip_country=e.allowed_ip,
        )
        if not mismatches:
            return None
        return _Hit("fingerprint", {"fields": mismatches})

    async def _travel(self, e: _Evaluation) -> _Hit | None:
        """10: implied speed since the device's last located activity is too high."""
        link = e.context.link
        current = e.seen.geo.point
        if (
            e.allowed_ip
            or link is None
            or current is None
            or link.last_lat is None
            or link.last_lon is None
            or link.last_located_at is None
        ):
            return None
        previous = (link.last_lat, link.last_lon, link.last_accuracy_km)
        if not travel_is_impossible(
            previous,
            link.last_located_at,
            current,
            e.now,
            min_km=self._policy.travel_min_km,
            max_kmh=self._policy.travel_max_kmh,
        ):
            return None
        hours = max((e.now - link.last_located_at).total_seconds() / 3600, 0.25)
        return _Hit("travel", {"hours": round(hours, 2), "country": e.seen.geo.country})

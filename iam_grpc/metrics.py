"""Prometheus metrics, one registry per running service (so tests can run
several in one process). Served as text on the ops listener's ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.rpc_total = Counter(
            "iam_rpc_total", "RPCs handled, by method and status code.", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "iam_rpc_duration_seconds",
            "RPC handling time, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_in_flight = Gauge("iam_rpc_in_flight", "RPCs being handled.", registry=r)
        self.caller_denied = Counter(
            "iam_caller_denied_total", "Calls refused by caller authentication.", ["reason"], registry=r
        )
        self.sql_statements = Counter("iam_sql_statements_total", "SQL statements executed.", registry=r)
        self.store_failures = Counter(
            "iam_store_failures_total", "Failed health probes, by store.", ["store"], registry=r
        )
        self.ratelimit_refusals = Counter(
            "iam_ratelimit_refusals_total", "Requests refused by a limiter group.", ["group"], registry=r
        )
        self.ratelimit_blocks = Counter(
            "iam_ratelimit_blocks_total", "Blocks imposed by a limiter group.", ["group"], registry=r
        )
        self.ratelimit_fallbacks = Counter(
            "iam_ratelimit_store_fallbacks_total",
            "Limiter checks answered from process memory because the shared store failed.",
            registry=r,
        )
        self.mail_outcomes = Counter(
            "iam_mail_total",
            "Outbox rows handled, by outcome (sent, retry, dead, expired).",
            ["outcome"],
            registry=r,
        )
        self.key_reloads = Counter(
            "iam_key_reloads_total", "Key-table reloads caused by unknown kids.", registry=r
        )
        self.denylist_fallbacks = Counter(
            "iam_denylist_fallbacks_total",
            "Token checks that read revocations from SQL because the ephemeral store failed.",
            registry=r,
        )
        self.denylist_rebuilds = Counter(
            "iam_denylist_rebuilds_total",
            "Deny-list caches rebuilt from SQL (the ephemeral store lost data, or a write failed).",
            registry=r,
        )
        self.denylist_trusted = Gauge(
            "iam_denylist_cache_trusted",
            "1 while token checks trust the deny-list cache; 0 while they read SQL.",
            registry=r,
        )
        self.store_fallbacks = Counter(
            "iam_check_fallbacks_total",
            "Checks answered by their documented rule because the ephemeral store failed, by check "
            "(pending_challenge and risk_score fail open, pending_login fails closed).",
            ["check"],
            registry=r,
        )
        self.dependency_state = Gauge(
            "iam_dependency_state",
            "1 for the current state (up, degraded, down) of each dependency (sql, redis, smtp).",
            ["dependency", "state"],
            registry=r,
        )
        self._account_metrics(r)
        self.serving = Gauge("iam_serving", "1 while the service reports SERVING.", registry=r)

    def _account_metrics(self, r: CollectorRegistry) -> None:
        """Refresh, login, password, MFA and anomaly outcomes."""
        self.refreshes = Counter(
            "iam_refresh_total",
            "Refresh outcomes (rotated, grace, reuse, invalid, revoked, expired).",
            ["outcome"],
            registry=r,
        )
        self.hibp_failures = Counter(
            "iam_hibp_failures_total",
            "Breached-password range lookups that failed (and were skipped when failing open), by kind.",
            ["kind"],
            registry=r,
        )
        self.mx_unknown = Counter(
            "iam_mx_unknown_total",
            "Email-domain lookups without an answer (timeout, servfail, error), which let signup pass.",
            ["kind"],
            registry=r,
        )
        self.logins = Counter(
            "iam_login_total", "Login outcomes (session, mfa, failure, guarded).", ["outcome"], registry=r
        )
        self.password_verifications = Counter(
            "iam_password_verifications_total", "argon2 verifications run (real and dummy alike).", registry=r
        )
        self.hashes = Gauge(
            "iam_password_hashes",
            "argon2 hashes and verifications running now (running) and waiting for a slot (queued).",
            ["state"],
            registry=r,
        )
        self.hashes_peak = Gauge(
            "iam_password_hashes_peak",
            "The most argon2 hashes running at once (running) and waiting (queued) since start.",
            ["state"],
            registry=r,
        )
        self.hashes_refused = Gauge(
            "iam_password_hashes_refused",
            "argon2 calls refused since start: queue full (queue_full) or too close to the deadline "
            "(deadline).",
            ["reason"],
            registry=r,
        )
        self.challenges = Counter(
            "iam_mfa_challenges_total", "MFA challenges raised, by reason.", ["reason"], registry=r
        )
        self.anomaly_blocks = Counter(
            "iam_anomaly_blocks_total",
            "Refreshes refused by an anomaly check, by check.",
            ["check"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

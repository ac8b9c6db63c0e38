"""Caller authentication (behaviour.md 2.8): which service is calling, and
may it call this method?

A caller proves itself with an API key in metadata ``x-iam-api-key`` (hashed
and compared in constant time with every configured digest) or, when the
server runs mTLS, with a certificate whose subject alternative name is
configured, or, behind a trusted proxy, with the SPIFFE id the proxy forwards in
``x-forwarded-client-cert`` (``iam_grpc.interceptors.xfcc``). Without a credential, a call is
accepted only where the configuration allows it: from loopback in embedded mode, or anywhere with
``callers.allow_unauthenticated``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from datetime import timedelta
from typing import Any

import grpc
from loguru import logger

from iam_grpc.config import CallersSettings
from iam_grpc.core.audit import AuditTrail
from iam_grpc.core.call import Caller, current_call
from iam_grpc.core.ratelimit.keys import ip_key
from iam_grpc.errors import BackendUnavailable, CallerForbidden, CallerUnknown
from iam_grpc.interceptors.base import Behaviour, Context, Handler, UnaryInterceptor, is_exempt
from iam_grpc.interceptors.xfcc import MalformedXfcc, TrustedProxies, forwarded_caller
from iam_grpc.logging import component_logger
from iam_grpc.metrics import Metrics
from iam_grpc.storage.ports import Ephemeral

__all__ = ["API_KEY_HEADER", "CallerAuthInterceptor", "CallerRegistry", "host_is_loopback"]

API_KEY_HEADER = "x-iam-api-key"
_MAX_KEY = 256

log = component_logger("iam.callers")


class CallerRegistry:
    """The configured callers, indexed for lookup by key digest or certificate name."""

    def __init__(
        self, settings: CallersSettings, *, embedded: bool, listening_on_loopback: bool = True
    ) -> None:
        self._digests: list[tuple[bytes, Caller]] = []
        self._sans: dict[str, Caller] = {}
        self._spiffe: dict[str, Caller] = {}
        for caller_id, entry in sorted(settings.entries.items()):
            methods = tuple(entry.methods)
            for digest in entry.api_key_sha256:
                self._digests.append(
                    (bytes.fromhex(digest), Caller(caller_id, methods, entry.trust_client_ip, "api_key"))
                )
            for san in entry.cert_sans:
                self._sans[san] = Caller(caller_id, methods, entry.trust_client_ip, "mtls")
            for spiffe_id in entry.spiffe_ids:
                self._spiffe[spiffe_id] = Caller(caller_id, methods, entry.trust_client_ip, "xfcc")
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        self._allow_anyone = settings.allow_unauthenticated
        # Judged by where the server listens, not only by the peer: behind a proxy or sidecar in the
        # same network namespace (Envoy, Istio's 127.0.0.6) every remote client has a loopback peer.
        self._allow_loopback = embedded and settings.allow_unauthenticated_loopback and listening_on_loopback
        self._anonymous_trust = settings.unauthenticated_trust_client_ip

    @property
    def configured(self) -> bool:
        return bool(self._digests or self._sans or self._spiffe)

    def by_api_key(self, key: str) -> Caller | None:
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for digest, caller in self._digests:  # no early exit: same work for every key
            if hmac.compare_digest(presented, digest) and found is None:
                found = caller
        return found

    def by_certificate(self, names: list[str]) -> Caller | None:
        for name in names:
            caller = self._sans.get(name)
            if caller is not None:
                return caller
        return None

    def by_spiffe_id(self, spiffe_id: str) -> Caller | None:
        return self._spiffe.get(spiffe_id)

    def anonymous(self, peer_ip: str | None, unix_socket: bool) -> Caller | None:
        if self._allow_loopback and (unix_socket or _is_loopback(peer_ip)):
            return Caller("local", ("*",), True, "loopback")  # the local BFF relays its users' IPs
        if self._allow_anyone:
            return Caller("anonymous", ("*",), self._anonymous_trust, "unauthenticated")
        return None


def host_is_loopback(host: str) -> bool:
    """Whether a listen host only accepts local connections."""
    if host == "localhost" or host.startswith("unix:"):
        return True
    return _is_loopback(host.strip("[]"))


def _is_loopback(ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _certificate_names(context: Context) -> list[str]:
    auth = context.auth_context() or {}
    names = list(auth.get("x509_subject_alternative_name", ()))  # SANs only (behaviour.md 2.8)
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _api_key(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == API_KEY_HEADER:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return text[:_MAX_KEY]
    return None


async def _deny(request: Any, context: Context) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Streaming methods are not served.")


def _refuse_streaming(handler: Handler) -> Handler:
    adapted: Any = handler
    replaced: Handler = adapted._replace(
        stream_unary=_deny if adapted.stream_unary else None,
        stream_stream=_deny if adapted.stream_stream else None,
    )
    return replaced


class CallerAuthInterceptor(UnaryInterceptor):
    def __init__(
        self,
        registry: CallerRegistry,
        metrics: Metrics,
        *,
        audit: AuditTrail | None = None,
        ephemeral: Ephemeral | None = None,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._audit = audit
        self._ephemeral = ephemeral

    async def record_denial(
        self, reason: str, peer_ip: str | None, caller_id: str | None, method: str
    ) -> None:
        """Audit ``caller.denied``, at most once a minute per peer network and reason: a caller
        without a key cannot turn its refusals into a stream of database writes. The peer is keyed
        as the limiters key an ip (an IPv6 /64: one subscriber rotating its addresses is one
        peer)."""
        if self._audit is None or self._ephemeral is None:
            return
        peer = ip_key(peer_ip) if peer_ip else None
        try:
            fresh = await self._ephemeral.set_if_absent(
                f"audit:denied:{{{reason}:{peer}:{caller_id}}}", b"1", timedelta(seconds=60)
            )
            if fresh:
                event = self._audit.event(
                    "caller.denied", "fail", ip=peer_ip, details={"reason": reason, "method": method}
                )
                self._audit.record_soon(event)
        except BackendUnavailable:
            log.warning("could not audit a caller denial")

    def applies_to(self, method: str) -> bool:
        return not is_exempt(method)

    def transform(self, handler: Handler | None, method: str) -> Handler | None:
        if (
            handler is not None
            and handler.unary_unary is None
            and handler.unary_stream is None
            and not is_exempt(method)
        ):
            # Client-streaming handlers are not wrapped by the chain, so none may be served
            # unauthenticated (server-streaming ones are: base.drive_stream).
            return _refuse_streaming(handler)
        return super().transform(handler, method)

    def _identify(self, context: Context) -> Caller:
        call = current_call()
        key = _api_key(context)
        if key is not None:
            caller = self._registry.by_api_key(key)
            if caller is None:
                raise CallerUnknown()
            return caller
        try:  # a trusted proxy's XFCC header, once present, decides alone
            forwarded = forwarded_caller(
                context.invocation_metadata() or (),
                call.peer_ip if call else None,
                self._registry.trusted_proxies,
                self._registry.by_spiffe_id,
            )
        except (MalformedXfcc, LookupError) as refused:
            log.bind(problem=str(refused)).warning("forwarded client certificate refused")
            raise CallerUnknown() from None
        if forwarded is not None:
            return forwarded
        names = _certificate_names(context)
        if names:
            caller = self._registry.by_certificate(names)
            if caller is not None:
                return caller
            raise CallerUnknown()
        peer = call.peer if call else ""
        caller = self._registry.anonymous(call.peer_ip if call else None, peer.startswith("unix"))
        if caller is None:
            raise CallerUnknown()
        return caller

    def wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            call = current_call()
            try:
                caller = self._identify(context)
            except CallerUnknown:
                self._metrics.caller_denied.labels("unknown").inc()
                log.bind(peer=call.peer if call else None).warning("caller not authenticated")
                await self.record_denial("unknown", call.peer_ip if call else None, None, method)
                raise
            if call is not None:
                call.caller = caller
            if not caller.may_call(method):
                self._metrics.caller_denied.labels("method").inc()
                log.bind(caller=caller.id).warning("caller not allowed this method")
                await self.record_denial("method", call.peer_ip if call else None, caller.id, method)
                raise CallerForbidden()
            with logger.contextualize(caller=caller.id):
                return await behaviour(request, context)

        return run

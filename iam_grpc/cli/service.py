"""The ``iam-grpc`` command (typer). Exit codes: 0 fine, 1 failure, 2 refused
configuration or startup."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from iam_grpc import __version__
from iam_grpc.config import ConfigError, Settings, load_settings, production_refusals

app = typer.Typer(
    name="iam-grpc",
    help="iam-grpc: a gRPC authentication service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
migrate_app = typer.Typer(help="Database migrations.", invoke_without_command=True)
secrets_app = typer.Typer(help="Secrets.", no_args_is_help=True)
outbox_app = typer.Typer(help="The email outbox.", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys.", no_args_is_help=True)
roles_app = typer.Typer(help="Roles.", no_args_is_help=True)
users_app = typer.Typer(help="Accounts and their sessions.", no_args_is_help=True)
cleanup_app = typer.Typer(help="Maintenance.", no_args_is_help=True)
limits_app = typer.Typer(help="Rate-limit state of one key (shared Redis state only).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(migrate_app, name="migrate")
app.add_typer(secrets_app, name="secrets")
app.add_typer(limits_app, name="limits")
app.add_typer(outbox_app, name="outbox")
app.add_typer(keys_app, name="keys")
app.add_typer(roles_app, name="roles")
app.add_typer(users_app, name="users")
app.add_typer(cleanup_app, name="cleanup")
app.add_typer(limits_app, name="ratelimit", hidden=True)  # behaviour.md 8.6 spelling

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (or IAM_CONFIG_FILE).")
]

EXIT_REFUSED = 2


def _refuse(problems: list[str]) -> typer.Exit:
    """One stderr line per problem and a CRITICAL JSON record on stdout (behaviour.md 11.2)."""
    from iam_grpc.logging import component_logger, configure_logging

    for problem in problems:
        typer.echo(f"iam-grpc: refusing to start: {problem}", err=True)
    configure_logging(level="INFO", log_dir=None)
    component_logger("iam.cli").bind(problems=problems).critical("startup refused")
    return typer.Exit(EXIT_REFUSED)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_file=config, **overrides)
    except ConfigError as exc:
        raise _refuse(exc.problems) from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


@app.command()
def serve(
    config: ConfigOption = None,
    migrate: Annotated[bool, typer.Option("--migrate", help="Apply pending migrations first.")] = False,
) -> None:
    """Run the service (embedded mode with no configuration at all)."""
    from iam_grpc.process import run_single, run_workers, setup_logging

    settings = _settings(config)
    refusals = production_refusals(settings)
    if refusals:
        raise _refuse(refusals)
    os.umask(0o027)  # nothing this process creates is readable by other users
    setup_logging(settings)
    migrate_on_start = True if migrate else None
    if settings.server.workers > 1:
        raise typer.Exit(run_workers(settings, migrate_on_start=migrate_on_start))
    raise typer.Exit(run_single(settings, migrate_on_start=migrate_on_start))


@app.command()
def health(
    config: ConfigOption = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address", "-a", help="host:port of the gRPC server (default: the configured listen address)."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 3.0,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="TLS: CA bundle to verify the server with (default: the configured certificate)."),
    ] = None,
    cert_file: Annotated[Path | None, typer.Option(help="mTLS: client certificate chain.")] = None,
    key_file: Annotated[Path | None, typer.Option(help="mTLS: client private key.")] = None,
    server_name: Annotated[
        str | None, typer.Option(help="TLS: name to verify (default: the configured certificate's name).")
    ] = None,
) -> None:
    """Exit 0 when the server reports SERVING (container health checks and exec probes).

    Reads the same settings as ``serve``: it calls the configured listen address (a wildcard host
    is reached on loopback) and speaks TLS when ``server.tls`` is set, trusting the configured
    certificate itself unless ``--ca-file`` names a CA.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = _settings(config)
    tls = settings.server.tls
    target = address or _probe_address(settings)
    if tls.mutual and (cert_file is None or key_file is None):
        typer.echo(
            "iam-grpc health: server.tls.client_ca_file is set (mTLS): pass --cert-file and --key-file",
            err=True,
        )
        raise typer.Exit(EXIT_REFUSED)

    def channel() -> grpc.Channel:
        if ca_file is None and not tls.enabled:
            return grpc.insecure_channel(target)
        # Without a CA, trust exactly the certificate the server presents (it reads the same file).
        roots = ca_file.read_bytes() if ca_file else tls.cert_file.read_bytes() if tls.cert_file else None
        credentials = grpc.ssl_channel_credentials(
            roots,
            key_file.read_bytes() if key_file else None,
            cert_file.read_bytes() if cert_file else None,
        )
        name = server_name or (_certificate_name(tls.cert_file) if tls.cert_file else None)
        options = (("grpc.ssl_target_name_override", name),) if name else ()
        return grpc.secure_channel(target, credentials, options=options)

    try:
        with channel() as opened:
            answer = health_pb2_grpc.HealthStub(opened).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        typer.echo(f"not serving: {exc.code().name}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # a certificate file that cannot be read
        typer.echo(f"not serving: {exc.strerror or 'a file cannot be read'}", err=True)
        raise typer.Exit(1) from None
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    typer.echo(name)
    raise typer.Exit(0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1)


def _probe_address(settings: Settings) -> str:
    """The configured gRPC address as a local client reaches it: wildcards become loopback."""
    from iam_grpc.config import join_host_port

    host = settings.server.host.strip("[]")
    if host in ("", "0.0.0.0"):  # noqa: S104 - the wildcard is what is compared, not bound
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if settings.server.port == 0:
        typer.echo(
            "iam-grpc health: server.port (IAM_GRPC_LISTEN) is 0 (a free port): pass --address", err=True
        )
        raise typer.Exit(EXIT_REFUSED)
    return join_host_port(host, settings.server.port)


def _certificate_name(path: Path) -> str | None:
    """The first DNS name (else IP address, else common name) of the first certificate in ``path``:
    the name the served certificate answers to, whatever address the probe dials."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return str(dns[0])
        ips = names.get_values_for_type(x509.IPAddress)
        if ips:
            return str(ips[0])
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else None


# config -------------------------------------------------------------------------


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective settings as JSON, secrets masked."""
    settings = _settings(config)
    typer.echo(json.dumps(json.loads(settings.model_dump_json()), indent=2, sort_keys=True))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration (including production refusals)."""
    settings = _settings(config)
    refusals = production_refusals(settings)
    if refusals:
        raise _refuse(refusals)
    typer.echo(f"configuration ok ({settings.mode} mode)")


# migrate ------------------------------------------------------------------------


def _engine(config: Path | None) -> Any:
    from iam_grpc.storage.sql.database import create_engine

    settings = _settings(config)
    return create_engine(settings.database.url, connect_timeout=settings.database.connect_timeout)


@migrate_app.callback()
def migrate_default(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Upgrade the database to the newest schema (``migrate`` alone = ``migrate upgrade``)."""
    if ctx.invoked_subcommand is None:
        migrate_upgrade(config)


@migrate_app.command("upgrade")
def migrate_upgrade(config: ConfigOption = None) -> None:
    """Upgrade the database to the newest schema."""
    from iam_grpc.storage.sql import migrate

    engine = _engine(config)

    async def run() -> str | None:
        try:
            await migrate.upgrade(engine)
            return await migrate.current(engine)
        finally:
            await engine.dispose()

    typer.echo(f"database at {asyncio.run(run())}")


@migrate_app.command("current")
def migrate_current(config: ConfigOption = None) -> None:
    """Print the database's schema revision and the newest one."""
    from iam_grpc.storage.sql import migrate

    engine = _engine(config)

    async def run() -> str | None:
        try:
            return await migrate.current(engine)
        finally:
            await engine.dispose()

    current = asyncio.run(run())
    typer.echo(f"current {current or '(empty)'} head {migrate.head()}")
    raise typer.Exit(0 if current == migrate.head() else 1)


@migrate_app.command("history")
def migrate_history() -> None:
    """List the schema revisions, newest first."""
    from iam_grpc.storage.sql import migrate

    for revision, down, message in migrate.history():
        typer.echo(f"{revision}  (after {down or 'nothing'})  {message.splitlines()[0] if message else ''}")


# secrets ------------------------------------------------------------------------


@secrets_app.command("generate")
def secrets_generate(
    size: Annotated[int, typer.Option(min=32, max=128, help="Random bytes.")] = 32,
) -> None:
    """Print a new random master key or pepper (base64url)."""
    from iam_grpc.core.crypto import generate_key_text

    typer.echo(generate_key_text(size))


# limits -------------------------------------------------------------------------

GroupArg = Annotated[str, typer.Argument(help="Limiter group, e.g. login.ip (see docs/configuration.md).")]
KeyArg = Annotated[
    str, typer.Argument(help="Raw key: an IP, an email, 'IP EMAIL' for pair groups, a user id, ...")
]


def _with_limiter(config: Path | None, action: Any) -> Any:
    from iam_grpc.clock import SystemClock
    from iam_grpc.core.audit import AuditTrail
    from iam_grpc.core.ratelimit import RateLimiter
    from iam_grpc.metrics import Metrics
    from iam_grpc.secret_material import resolve_secrets
    from iam_grpc.storage.redis import RedisEphemeral, RedisLimiterStore
    from iam_grpc.storage.sql.database import SqlDatabase

    settings = _settings(config)
    if not settings.redis.url:
        typer.echo(
            "iam-grpc: without redis.url the limits live in the serving process's memory; "
            "they cannot be read from here (a restart clears them)",
            err=True,
        )
        raise typer.Exit(1)
    try:
        material = resolve_secrets(settings).material
    except ConfigError as exc:
        raise _refuse(exc.problems) from None
    clock = SystemClock()

    async def run() -> Any:
        redis = RedisEphemeral(settings.redis.url, prefix=settings.redis.key_prefix)
        db = SqlDatabase.from_url(settings.database.url)
        try:
            limiter = RateLimiter(
                RedisLimiterStore(redis),
                groups=settings.ratelimit.resolved_groups(),
                material=material,
                clock=clock,
                metrics=Metrics(),
            )
            return await action(limiter, AuditTrail(db, clock, material, caller="cli"))
        finally:
            await redis.close()
            await db.close()

    return asyncio.run(run())


def _raw_key(limiter: Any, group: str, key: str) -> str:
    from iam_grpc.core.ratelimit import email_key, ip_key, pair_key

    try:
        kind = limiter.group(group).key
    except KeyError:
        typer.echo(f"iam-grpc: no limiter group {group}", err=True)
        raise typer.Exit(2) from None
    if kind == "ip":
        return str(ip_key(key))
    if kind == "email":
        return str(email_key(key))
    if kind == "ip_email":
        ip, _, email = key.strip().partition(" ")
        return str(pair_key(ip, email.strip()))
    return key.strip()


@limits_app.command("show")
def limits_show(group: GroupArg, key: KeyArg, config: ConfigOption = None) -> None:
    """Print a key's window estimates, strikes and block as JSON."""

    async def action(limiter: Any, audit: Any) -> Any:
        return await limiter.peek(group, _raw_key(limiter, group, key))

    typer.echo(json.dumps(_with_limiter(config, action), indent=2))


@limits_app.command("clear")
def limits_clear(group: GroupArg, key: KeyArg, config: ConfigOption = None) -> None:
    """Remove a key's counts, strikes and block (audited as ratelimit.unblocked)."""

    async def action(limiter: Any, audit: Any) -> bool:
        raw = _raw_key(limiter, group, key)
        cleared = bool(await limiter.clear(group, raw))
        key_h = limiter.store_key(limiter.group(group), raw).rsplit(":", 1)[1][:12]
        await audit.record(
            audit.event(
                "ratelimit.unblocked", "info", details={"group": group, "key_h": key_h, "existed": cleared}
            )
        )
        return cleared

    typer.echo("cleared" if _with_limiter(config, action) else "nothing to clear")


limits_app.command("unblock", hidden=True)(limits_clear)


# outbox -------------------------------------------------------------------------


def _with_database(config: Path | None, action: Any) -> Any:
    from iam_grpc.storage.sql.database import SqlDatabase

    settings = _settings(config)

    async def run() -> Any:
        db = SqlDatabase.from_url(settings.database.url)
        try:
            return await action(db)
        finally:
            await db.close()

    return asyncio.run(run())


@outbox_app.command("list")
def outbox_list(
    status: Annotated[str | None, typer.Option(help="pending, sent, expired, suppressed or dead.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    config: ConfigOption = None,
) -> None:
    """List outbox rows, newest first (recipients as keyed hashes; no secrets)."""

    async def action(db: Any) -> list[Any]:
        async with db.transaction() as tx:
            return list(await tx.outbox.list(status, limit))

    for row in _with_database(config, action):
        typer.echo(
            json.dumps(
                {
                    "id": row.id,
                    "kind": row.kind,
                    "status": row.status,
                    "recipient_h": row.recipient_h[:12],
                    "attempts": row.attempts,
                    "created_at": row.created_at.isoformat(),
                    "not_after": row.not_after.isoformat(),
                    "last_error": row.last_error,
                }
            )
        )


@outbox_app.command("retry")
def outbox_retry(
    message_id: Annotated[
        int | None, typer.Argument(help="Row id (see `outbox list --status dead`).")
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Retry every dead row that can be retried.")] = False,
    config: ConfigOption = None,
) -> None:
    """Send dead notices again (rows whose secrets were wiped cannot be resent)."""
    from iam_grpc.clock import SystemClock

    if (message_id is None) == (not dead):
        typer.echo("iam-grpc: give one row id or --dead", err=True)
        raise typer.Exit(2)
    now = SystemClock().now()

    async def action(db: Any) -> tuple[int, int]:
        async with db.transaction() as tx:
            ids = (
                [message_id]
                if message_id is not None
                else [r.id for r in await tx.outbox.list("dead", 10_000)]
            )
            revived = [i for i in ids if await tx.outbox.retry(i, now)]
        return len(revived), len(ids)

    revived, considered = _with_database(config, action)
    typer.echo(f"{revived} of {considered} queued again")
    raise typer.Exit(0 if revived or dead else 1)


# keys, roles, users, cleanup ------------------------------------------------------------


def _admin(config: Path | None, action: Any) -> Any:
    from iam_grpc.admin import admin_tools

    settings = _settings(config)

    async def run() -> Any:
        async with admin_tools(settings) as tools:
            return await action(tools)

    try:
        return asyncio.run(run())
    except ConfigError as exc:
        raise _refuse(exc.problems) from None


def _note_shared(tools: Any) -> None:
    if not tools.shared_state:
        typer.echo(
            "note: embedded mode: a running server applies these revocations within tokens.denylist_replay",
            err=True,
        )


def _note_uncached() -> None:
    typer.echo(
        "note: recorded in the database, but Redis did not answer: servers that still trust their "
        "deny-list cache apply it at their next tokens.denylist_replay",
        err=True,
    )


def _key_state(row: Any, now: Any) -> str:
    if row.unpublish_at is not None and row.unpublish_at <= now:
        return "unpublished"
    if row.activate_at > now:
        return "published, not signing yet"
    if row.deactivate_at is not None and row.deactivate_at <= now:
        return "retired (verifies until unpublished)"
    return "signing"


@keys_app.command("list")
def keys_list(config: ConfigOption = None) -> None:
    """The signing keys and their lifecycle times."""

    async def action(tools: Any) -> list[dict[str, Any]]:
        now = tools.clock.now()
        return [
            {
                "kid": row.kid,
                "alg": row.alg,
                "state": _key_state(row, now),
                "publish_at": row.publish_at.isoformat(),
                "activate_at": row.activate_at.isoformat(),
                "deactivate_at": row.deactivate_at.isoformat() if row.deactivate_at else None,
                "unpublish_at": row.unpublish_at.isoformat() if row.unpublish_at else None,
                "private_key": "destroyed" if row.private_key_enc is None else "encrypted",
            }
            for row in tools.keys.rows()
        ]

    for row in _admin(config, action):
        typer.echo(json.dumps(row))


@keys_app.command("rotate")
def keys_rotate(
    immediate: Annotated[bool, typer.Option(help="Sign with the new key now (emergency).")] = False,
    revoke: Annotated[
        str | None, typer.Option(help="kid to withdraw at once: its tokens stop verifying.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create the next signing key (published now, signing after keys.publish_ahead unless --immediate)."""

    async def action(tools: Any) -> Any:
        if revoke is not None and revoke not in {row.kid for row in tools.keys.rows()}:
            typer.echo(f"iam-grpc: no key {revoke}", err=True)
            raise typer.Exit(1)
        new = await tools.keys.rotate(immediate=immediate, revoke=revoke)
        if revoke is not None:
            _note_shared(tools)
            if not await tools.denylist.revoke_key(revoke):
                _note_uncached()
        await tools.audit.record(
            tools.audit.event("keys.created", "ok", details={"kid": new.kid, "immediate": immediate})
        )
        # keys.activated: written here when the key signs at once; a planned key starts signing
        # at its activate_at (in keys.created's details and in `keys list`) without a command.
        if immediate:
            await tools.audit.record(tools.audit.event("keys.activated", "ok", details={"kid": new.kid}))
        if revoke is not None:
            await tools.audit.record(tools.audit.event("keys.revoked", "ok", details={"kid": revoke}))
        return new

    new = _admin(config, action)
    typer.echo(f"new key {new.kid} signs from {new.activate_at.isoformat()}")


@roles_app.command("list")
def roles_list(config: ConfigOption = None) -> None:
    """Roles and how many users hold each."""

    async def action(tools: Any) -> Any:
        async with tools.db.transaction() as tx:
            return await tx.users.list_roles()

    for name, description, holders in _admin(config, action):
        typer.echo(json.dumps({"role": name, "description": description, "holders": holders}))


def _check_role_name(name: str) -> None:
    from iam_grpc.core.validation import ROLE_NAME

    if not ROLE_NAME.match(name):
        typer.echo("iam-grpc: role names match ^[a-z][a-z0-9:_-]{0,63}$", err=True)
        raise typer.Exit(2)


@roles_app.command("create")
def roles_create(name: str, config: ConfigOption = None) -> None:
    """Create a role (granting creates it too)."""
    _check_role_name(name)

    async def action(tools: Any) -> None:
        async with tools.db.transaction() as tx:
            await tx.users.ensure_roles([name], tools.clock.now())

    _admin(config, action)
    typer.echo(f"role {name} exists")


@roles_app.command("delete")
def roles_delete(name: str, config: ConfigOption = None) -> None:
    """Delete a role and every grant of it (tokens lose it at their next refresh)."""

    async def action(tools: Any) -> bool:
        async with tools.db.transaction() as tx:
            deleted = bool(await tx.users.delete_role(name))
            if deleted:
                await tools.audit.record(
                    tools.audit.event("roles.revoked", "ok", details={"role": name, "all": True}), tx
                )
        return deleted

    if not _admin(config, action):
        typer.echo(f"iam-grpc: no role {name}", err=True)
        raise typer.Exit(1)
    typer.echo(f"role {name} deleted")


@roles_app.command("grant")
def roles_grant(user: str, role: str, config: ConfigOption = None) -> None:
    """Grant ROLE to USER (id or email); it appears in tokens from the next refresh."""
    _check_role_name(role)

    async def action(tools: Any) -> bool:
        now = tools.clock.now()
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
            if found is None:
                typer.echo("iam-grpc: no such user", err=True)
                raise typer.Exit(1)
            await tx.users.ensure_roles([role], now)
            granted = bool(await tx.users.grant_role(found.id, role, "cli", now))
            if granted:
                await tools.audit.record(
                    tools.audit.event("roles.granted", "ok", user_id=found.id, details={"role": role}), tx
                )
        return granted

    typer.echo("granted" if _admin(config, action) else "already held")


@roles_app.command("revoke")
def roles_revoke(
    user: str,
    role: str,
    now_flag: Annotated[
        bool, typer.Option("--now", help="Also invalidate the user's current access tokens.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Revoke ROLE from USER; with --now the current access tokens stop verifying at once."""

    async def action(tools: Any) -> bool:
        now = tools.clock.now()
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
            if found is None:
                typer.echo("iam-grpc: no such user", err=True)
                raise typer.Exit(1)
            revoked = bool(await tx.users.revoke_role(found.id, role))
            jtis: list[str] = []
            if revoked and now_flag:
                jtis = await tx.sessions.access_jtis_since(found.id, now - tools.denylist.memory)
                # SQL first, in this transaction: the deny-list cache is rebuilt from it
                await tools.denylist.record_tokens(tx, jtis)
            if revoked:
                details = {"role": role, "now": now_flag, "tokens": len(jtis)}
                await tools.audit.record(
                    tools.audit.event("roles.revoked", "ok", user_id=found.id, details=details), tx
                )
        if jtis:
            _note_shared(tools)
            if not await tools.denylist.revoke_tokens(jtis):
                _note_uncached()
        return revoked

    typer.echo("revoked" if _admin(config, action) else "not held")


@users_app.command("show")
def users_show(user: str, config: ConfigOption = None) -> None:
    """An account: status, roles, devices and live sessions (no secrets, email masked)."""
    from iam_grpc.logging import mask_email

    async def action(tools: Any) -> dict[str, Any]:
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
            if found is None:
                typer.echo("iam-grpc: no such user", err=True)
                raise typer.Exit(1)
            live = await tx.sessions.list_live(found.id, tools.clock.now())
            return {
                "id": found.id,
                "email": mask_email(found.email),
                "status": found.status,
                "roles": await tx.users.roles_of(found.id),
                "created_at": found.created_at.isoformat(),
                "last_login_at": found.last_login_at.isoformat() if found.last_login_at else None,
                "mfa_hold_until": found.mfa_hold_until.isoformat() if found.mfa_hold_until else None,
                "devices": len(await tx.devices.links_of(found.id)),
                "live_sessions": [s.id for s in live],
            }

    typer.echo(json.dumps(_admin(config, action), indent=2))


@users_app.command("sessions")
def users_sessions(user: str, config: ConfigOption = None) -> None:
    """The user's live sessions."""

    async def action(tools: Any) -> list[Any]:
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
            if found is None:
                typer.echo("iam-grpc: no such user", err=True)
                raise typer.Exit(1)
            return list(await tx.sessions.list_live(found.id, tools.clock.now()))

    for session in _admin(config, action):
        typer.echo(
            json.dumps(
                {
                    "session_id": session.id,
                    "device_id": session.device_id,
                    "created_at": session.created_at.isoformat(),
                    "last_refreshed_at": session.last_refreshed_at.isoformat(),
                    "last_ip": session.last_ip,
                }
            )
        )


def _set_status(user: str, status: str, config: Path | None) -> None:
    async def action(tools: Any) -> int:
        now = tools.clock.now()
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
            if found is None:
                typer.echo("iam-grpc: no such user", err=True)
                raise typer.Exit(1)
            await tx.users.set_status(found.id, status, now)
            kind = "user.disabled" if status == "disabled" else "user.enabled"
            await tools.audit.record(tools.audit.event(kind, "ok", user_id=found.id), tx)
        if status != "disabled":
            return 0
        _note_shared(tools)
        return len(await tools.revoke_user_sessions(found, "disabled"))

    ended = _admin(config, action)
    typer.echo(f"{status}" + (f"; {ended} sessions ended" if status == "disabled" else ""))


@users_app.command("disable")
def users_disable(user: str, config: ConfigOption = None) -> None:
    """Disable an account: every session ends, logins fail like a wrong password."""
    _set_status(user, "disabled", config)


@users_app.command("enable")
def users_enable(user: str, config: ConfigOption = None) -> None:
    """Enable a disabled account again."""
    _set_status(user, "active", config)


@users_app.command("revoke-sessions")
def users_revoke_sessions(user: str, config: ConfigOption = None) -> None:
    """End every session of an account (it can sign in again)."""

    async def action(tools: Any) -> int:
        async with tools.db.transaction() as tx:
            found = await tools.find_user(tx, user)
        if found is None:
            typer.echo("iam-grpc: no such user", err=True)
            raise typer.Exit(1)
        _note_shared(tools)
        return len(await tools.revoke_user_sessions(found, "user"))

    typer.echo(f"{_admin(config, action)} sessions ended")


@cleanup_app.command("run")
def cleanup_run(config: ConfigOption = None) -> None:
    """One cleanup pass now (expired tokens, ended sessions, old mail and audit rows, stale devices)."""

    async def action(tools: Any) -> dict[str, int]:
        return dict(await tools.cleanup.run(lock=False))

    typer.echo(json.dumps(_admin(config, action)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()

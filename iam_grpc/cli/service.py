"""``iam-grpc`` commands that run or inspect the service: version, serve, health, config,
migrate, secrets."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from iam_grpc import __version__
from iam_grpc.cli._app import (
    EXIT_REFUSED,
    ConfigOption,
    app,
    config_app,
    migrate_app,
    refuse,
    secrets_app,
    settings_from,
)
from iam_grpc.config import Settings, production_refusals

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


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

    settings = settings_from(config)
    refusals = production_refusals(settings)
    if refusals:
        raise refuse(refusals)
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

    settings = settings_from(config)
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
    settings = settings_from(config)
    typer.echo(json.dumps(json.loads(settings.model_dump_json()), indent=2, sort_keys=True))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration (including production refusals)."""
    settings = settings_from(config)
    refusals = production_refusals(settings)
    if refusals:
        raise refuse(refusals)
    typer.echo(f"configuration ok ({settings.mode} mode)")


# migrate ------------------------------------------------------------------------


def _engine(config: Path | None) -> AsyncEngine:
    from iam_grpc.storage.sql.database import create_engine

    settings = settings_from(config)
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

"""The typer application, its command groups and what every command shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iam_grpc.config import ConfigError, Settings, load_settings

__all__ = [
    "EXIT_REFUSED",
    "ConfigOption",
    "app",
    "cleanup_app",
    "config_app",
    "keys_app",
    "limits_app",
    "migrate_app",
    "outbox_app",
    "refuse",
    "roles_app",
    "secrets_app",
    "settings_from",
    "users_app",
]

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


def refuse(problems: list[str]) -> typer.Exit:
    """One stderr line per problem and a CRITICAL JSON record on stdout (behaviour.md 11.2)."""
    from iam_grpc.logging import component_logger, configure_logging

    for problem in problems:
        typer.echo(f"iam-grpc: refusing to start: {problem}", err=True)
    configure_logging(level="INFO", log_dir=None)
    component_logger("iam.cli").bind(problems=problems).critical("startup refused")
    return typer.Exit(EXIT_REFUSED)


def settings_from(config: Path | None) -> Settings:
    try:
        return load_settings(config_file=config)
    except ConfigError as exc:
        raise refuse(exc.problems) from None

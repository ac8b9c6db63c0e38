"""``iam-grpc events``: the webhook deliveries of events (list, replay dead ones)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from iam_grpc.cli._app import ConfigOption, app, settings_from
from iam_grpc.cli.operators import _answer, _json
from iam_grpc.storage.sql.database import SqlDatabase

__all__ = ["events_app"]

T = TypeVar("T")

events_app = typer.Typer(help="Events: push deliveries.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Webhook deliveries: list them (newest first), or `replay` dead ones.", invoke_without_command=True
)
events_app.add_typer(deliveries_app, name="deliveries")
app.add_typer(events_app, name="events")


def _on_database(config: Path | None, use: Callable[[SqlDatabase], Awaitable[T]]) -> T:
    settings = settings_from(config)

    async def run() -> T:
        async with SqlDatabase.from_url(settings.database.url) as db:
            return await use(db)

    return _answer(lambda: asyncio.run(run()))


@deliveries_app.callback()
def deliveries_list(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="pending, delivered or dead.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    config: ConfigOption = None,
) -> None:
    """List webhook deliveries, newest first (one JSON object a line)."""
    if ctx.invoked_subcommand is not None:
        return
    from iam_grpc.admin import list_deliveries

    for row in _on_database(config, lambda db: list_deliveries(db, status, limit)):
        typer.echo(_json(row))


@deliveries_app.command("replay")
def deliveries_replay(
    delivery_id: Annotated[int | None, typer.Argument(help="Delivery id (see `--status dead`).")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Queue every dead delivery again.")] = False,
    config: ConfigOption = None,
) -> None:
    """Queue dead deliveries again, with fresh attempts."""
    from iam_grpc.admin import replay_deliveries
    from iam_grpc.clock import SystemClock

    clock = SystemClock()
    count = _on_database(config, lambda db: replay_deliveries(db, clock, delivery_id=delivery_id, dead=dead))
    typer.echo(f"{count} queued again")
    raise typer.Exit(0 if count or dead else 1)

"""``iam-grpc`` operator commands: limits, outbox, keys, roles, users, cleanup. Each parses its
arguments, calls one use-case of ``iam_grpc.admin`` and prints the answer (JSON for data);
every change is audited there with ``caller = "cli"``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from iam_grpc.cli._app import (
    EXIT_REFUSED,
    ConfigOption,
    cleanup_app,
    keys_app,
    limits_app,
    outbox_app,
    refuse,
    roles_app,
    settings_from,
    users_app,
)
from iam_grpc.config import ConfigError

if TYPE_CHECKING:
    from iam_grpc.admin import AdminTools
    from iam_grpc.storage.ports import Database

__all__: list[str] = []

T = TypeVar("T")

GroupArg = Annotated[str, typer.Argument(help="Limiter group, e.g. login.ip (see docs/configuration.md).")]
KeyArg = Annotated[
    str, typer.Argument(help="Raw key: an IP, an email, 'IP EMAIL' for pair groups, a user id, ...")
]


def _run(config: Path | None, use: Callable[[AdminTools], Awaitable[T]]) -> T:
    """Open the admin tools over the configured stores, run one use-case, close them."""
    from iam_grpc.admin import open_admin

    settings = settings_from(config)

    async def run() -> T:
        async with open_admin(settings) as tools:
            return await use(tools)

    return _answer(lambda: asyncio.run(run()))


def _run_on_database(config: Path | None, use: Callable[[Database], Awaitable[T]]) -> T:
    from iam_grpc.admin import open_outbox

    settings = settings_from(config)

    async def run() -> T:
        async with open_outbox(settings) as db:
            return await use(db)

    return _answer(lambda: asyncio.run(run()))


def _answer(run: Callable[[], T]) -> T:
    """The use-case's result; its refusals as a message and an exit code (2: a malformed
    request, 1: anything else)."""
    from iam_grpc.admin import AdminError, Invalid

    try:
        return run()
    except ConfigError as exc:
        raise refuse(exc.problems) from None
    except AdminError as exc:
        typer.echo(f"iam-grpc: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED if isinstance(exc, Invalid) else 1) from None


def _json(value: object) -> str:
    """A use-case's dataclass as one JSON object, times in ISO 8601."""
    fields = (
        dataclasses.asdict(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type)
        else value
    )
    return json.dumps(fields, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v))


def _note_unreached(reached: bool) -> None:
    if not reached:
        typer.echo(
            "note: embedded mode: a running server applies these revocations within tokens.denylist_replay",
            err=True,
        )


def _note_uncached(cached: bool) -> None:
    if not cached:
        typer.echo(
            "note: recorded in the database, but Redis did not answer: servers that still trust their "
            "deny-list cache apply it at their next tokens.denylist_replay",
            err=True,
        )


# limits -------------------------------------------------------------------------------------


@limits_app.command("show")
def limits_show(group: GroupArg, key: KeyArg, config: ConfigOption = None) -> None:
    """Print a key's window estimates, strikes and block as JSON."""
    from iam_grpc.admin import show_limits

    typer.echo(json.dumps(_run(config, lambda tools: show_limits(tools, group, key)), indent=2))


@limits_app.command("clear")
def limits_clear(group: GroupArg, key: KeyArg, config: ConfigOption = None) -> None:
    """Remove a key's counts, strikes and block (audited as ratelimit.unblocked)."""
    from iam_grpc.admin import clear_limits

    typer.echo(
        "cleared" if _run(config, lambda tools: clear_limits(tools, group, key)) else "nothing to clear"
    )


limits_app.command("unblock", hidden=True)(limits_clear)


# outbox -------------------------------------------------------------------------------------


@outbox_app.command("list")
def outbox_list(
    status: Annotated[str | None, typer.Option(help="pending, sent, expired, suppressed or dead.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    config: ConfigOption = None,
) -> None:
    """List outbox rows, newest first (recipients as keyed hashes; no secrets)."""
    from iam_grpc.admin import list_outbox

    for row in _run_on_database(config, lambda db: list_outbox(db, status, limit)):
        row_view = {
            "id": row.id,
            "kind": row.kind,
            "status": row.status,
            "recipient_h": row.recipient_h[:12],
            "attempts": row.attempts,
            "created_at": row.created_at,
            "not_after": row.not_after,
            "last_error": row.last_error,
        }
        typer.echo(_json(row_view))


@outbox_app.command("retry")
def outbox_retry(
    message_id: Annotated[
        int | None, typer.Argument(help="Row id (see `outbox list --status dead`).")
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Retry every dead row that can be retried.")] = False,
    config: ConfigOption = None,
) -> None:
    """Send dead notices again (rows whose secrets were wiped cannot be resent)."""
    from iam_grpc.admin import retry_outbox
    from iam_grpc.clock import SystemClock

    clock = SystemClock()
    retried = _run_on_database(config, lambda db: retry_outbox(db, clock, message_id=message_id, dead=dead))
    typer.echo(f"{retried.revived} of {retried.considered} queued again")
    raise typer.Exit(0 if retried.revived or dead else 1)


# keys ---------------------------------------------------------------------------------------


@keys_app.command("list")
def keys_list(config: ConfigOption = None) -> None:
    """The signing keys and their lifecycle times."""
    from iam_grpc.admin import list_keys

    for key in _run(config, list_keys):
        typer.echo(_json(key))


@keys_app.command("rotate")
def keys_rotate(
    immediate: Annotated[bool, typer.Option(help="Sign with the new key now (emergency).")] = False,
    revoke: Annotated[
        str | None, typer.Option(help="kid to withdraw at once: its tokens stop verifying.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create the next signing key (published now, signing after keys.publish_ahead unless --immediate)."""
    from iam_grpc.admin import rotate_key

    new = _run(config, lambda tools: rotate_key(tools, immediate=immediate, revoke=revoke))
    if revoke is not None:
        _note_unreached(new.reached_service_state)
        _note_uncached(new.cached)
    typer.echo(f"new key {new.kid} signs from {new.activate_at.isoformat()}")


# roles --------------------------------------------------------------------------------------


@roles_app.command("list")
def roles_list(config: ConfigOption = None) -> None:
    """Roles and how many users hold each."""
    from iam_grpc.admin import list_roles

    for role in _run(config, list_roles):
        typer.echo(_json(role))


@roles_app.command("create")
def roles_create(name: str, config: ConfigOption = None) -> None:
    """Create a role (granting creates it too)."""
    from iam_grpc.admin import create_role

    _run(config, lambda tools: create_role(tools, name))
    typer.echo(f"role {name} exists")


@roles_app.command("delete")
def roles_delete(name: str, config: ConfigOption = None) -> None:
    """Delete a role and every grant of it (tokens lose it at their next refresh)."""
    from iam_grpc.admin import delete_role

    _run(config, lambda tools: delete_role(tools, name))
    typer.echo(f"role {name} deleted")


_END_SESSIONS_HELP = "End the user's sessions now (GrantRole/RevokeRole end_sessions)."


@roles_app.command("grant")
def roles_grant(
    user: str,
    role: str,
    end_sessions: Annotated[bool, typer.Option("--end-sessions", help=_END_SESSIONS_HELP)] = False,
    config: ConfigOption = None,
) -> None:
    """Grant ROLE to USER (id or email); it appears in tokens from the next refresh."""
    from iam_grpc.admin import grant_role

    granted = _run(config, lambda tools: grant_role(tools, user, role, end_sessions=end_sessions))
    typer.echo("granted" if granted else "already held")


@roles_app.command("revoke")
def roles_revoke(
    user: str,
    role: str,
    now_flag: Annotated[
        bool, typer.Option("--now", help="Also invalidate the user's current access tokens.")
    ] = False,
    end_sessions: Annotated[bool, typer.Option("--end-sessions", help=_END_SESSIONS_HELP)] = False,
    config: ConfigOption = None,
) -> None:
    """Revoke ROLE from USER; with --now the current access tokens stop verifying at once."""
    from iam_grpc.admin import revoke_role

    revoked = _run(
        config, lambda tools: revoke_role(tools, user, role, now=now_flag, end_sessions=end_sessions)
    )
    if revoked.tokens:
        _note_unreached(revoked.reached_service_state)
        _note_uncached(revoked.cached)
    typer.echo("revoked" if revoked.revoked else "not held")


# users --------------------------------------------------------------------------------------


@users_app.command("show")
def users_show(user: str, config: ConfigOption = None) -> None:
    """An account: status, roles, devices and live sessions (no secrets, email masked)."""
    from iam_grpc.admin import show_user

    shown = _run(config, lambda tools: show_user(tools, user))
    typer.echo(json.dumps(json.loads(_json(shown)), indent=2))


@users_app.command("sessions")
def users_sessions(user: str, config: ConfigOption = None) -> None:
    """The user's live sessions."""
    from iam_grpc.admin import live_sessions

    for session in _run(config, lambda tools: live_sessions(tools, user)):
        view = {
            "session_id": session.id,
            "device_id": session.device_id,
            "created_at": session.created_at,
            "last_refreshed_at": session.last_refreshed_at,
            "last_ip": session.last_ip,
        }
        typer.echo(_json(view))


@users_app.command("disable")
def users_disable(
    user: str,
    reason: Annotated[str, typer.Option("--reason", help="Why (audit trail, user.disabled event).")] = "",
    config: ConfigOption = None,
) -> None:
    """Disable an account: every session and API token ends, logins fail like a wrong password."""
    from iam_grpc.admin import set_status

    ended = _run(config, lambda tools: set_status(tools, user, "disabled", reason=reason[:500]))
    _note_unreached(ended.reached_service_state)
    typer.echo(f"disabled; {ended.count} sessions ended")


@users_app.command("enable")
def users_enable(user: str, config: ConfigOption = None) -> None:
    """Enable a disabled account again."""
    from iam_grpc.admin import set_status

    _run(config, lambda tools: set_status(tools, user, "active"))
    typer.echo("active")


@users_app.command("revoke-sessions")
def users_revoke_sessions(user: str, config: ConfigOption = None) -> None:
    """End every session of an account (it can sign in again)."""
    from iam_grpc.admin import revoke_sessions

    ended = _run(config, lambda tools: revoke_sessions(tools, user))
    _note_unreached(ended.reached_service_state)
    typer.echo(f"{ended.count} sessions ended")


# cleanup ------------------------------------------------------------------------------------


@cleanup_app.command("run")
def cleanup_run(config: ConfigOption = None) -> None:
    """One cleanup pass now (expired tokens, ended sessions, old mail and audit rows, stale devices)."""
    from iam_grpc.admin import run_cleanup

    typer.echo(json.dumps(_run(config, run_cleanup)))

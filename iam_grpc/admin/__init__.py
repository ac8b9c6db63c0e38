"""Operator use-cases (behaviour.md 11.7): users, roles, signing keys, rate limits, the outbox
and cleanup, as typed functions over :class:`AdminTools`.

The CLI opens the tools against the configured stores (:func:`open_admin`, built with the
service's own builders) and only parses arguments and prints; an admin RPC would take
:meth:`AdminTools.from_components` of the running service and call the same functions. Every
change writes an audit event (``caller = "cli"`` from the CLI). Failures an operator can act on
are :class:`AdminError`.
"""

from iam_grpc.admin.context import AdminTools, open_admin, open_outbox
from iam_grpc.admin.directory import (
    AuditPage,
    UserPage,
    delete_user,
    export_user,
    get_user,
    list_audit_events,
    list_users,
)
from iam_grpc.admin.errors import AdminError, Invalid, NotFound, Unavailable
from iam_grpc.admin.events import list_deliveries, replay_deliveries
from iam_grpc.admin.keys import KeyRotated, KeyView, list_keys, rotate_key
from iam_grpc.admin.limits import clear_limits, show_limits
from iam_grpc.admin.maintenance import run_cleanup
from iam_grpc.admin.outbox import Retried, list_outbox, retry_outbox
from iam_grpc.admin.roles import (
    RoleRevoked,
    RoleView,
    create_role,
    delete_role,
    grant_role,
    list_roles,
    revoke_role,
)
from iam_grpc.admin.users import (
    SessionsEnded,
    UserView,
    live_sessions,
    revoke_sessions,
    set_status,
    show_user,
)

__all__ = [
    "AdminError",
    "AdminTools",
    "AuditPage",
    "Invalid",
    "KeyRotated",
    "KeyView",
    "NotFound",
    "Retried",
    "RoleRevoked",
    "RoleView",
    "SessionsEnded",
    "Unavailable",
    "UserPage",
    "UserView",
    "clear_limits",
    "create_role",
    "delete_role",
    "delete_user",
    "export_user",
    "get_user",
    "grant_role",
    "list_audit_events",
    "list_deliveries",
    "list_keys",
    "list_outbox",
    "list_roles",
    "list_users",
    "live_sessions",
    "open_admin",
    "open_outbox",
    "replay_deliveries",
    "retry_outbox",
    "revoke_role",
    "revoke_sessions",
    "rotate_key",
    "run_cleanup",
    "set_status",
    "show_limits",
    "show_user",
]

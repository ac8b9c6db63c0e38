"""Maintenance: one cleanup pass on demand (behaviour.md 1.8)."""

from __future__ import annotations

from iam_grpc.admin.context import AdminTools

__all__ = ["run_cleanup"]


async def run_cleanup(tools: AdminTools) -> dict[str, int]:
    """Expired tokens, ended sessions, old mail and audit rows, stale devices: rows removed per
    table. Runs even while a server's own pass holds the cleanup lock."""
    return dict(await tools.cleanup.run(lock=False))

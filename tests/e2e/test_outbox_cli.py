"""`iam-grpc outbox list|retry` against a real database file."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from iam_grpc.storage.records import OutboxMessage
from iam_grpc.storage.sql.database import SqlDatabase
from tests.e2e.test_cli import clean_env, run


def seed(data_dir: Path) -> tuple[int, int]:
    """A dead notice and a dead code email (whose secrets were wiped)."""

    async def insert() -> tuple[int, int]:
        db = SqlDatabase.from_url(f"sqlite+aiosqlite:///{data_dir / 'iam.db'}")
        now = datetime.now(UTC)
        ids = []
        async with db.transaction() as tx:
            for kind in ("password_changed", "mfa_code"):
                message_id = await tx.outbox.enqueue(
                    OutboxMessage(
                        kind=kind,
                        recipient="someone@example.com",
                        recipient_h="h" * 43,
                        locale="en",
                        params={},
                        priority=1,
                        next_attempt_at=now,
                        created_at=now,
                        not_after=now + timedelta(hours=1),
                        status="dead",
                        attempts=8,
                        last_error="SMTP 550 server refused the message",
                    )
                )
                assert message_id is not None
                ids.append(message_id)
        await db.close()
        return ids[0], ids[1]

    return asyncio.run(insert())


def test_outbox_list_and_retry(tmp_path: Path) -> None:
    """Dead rows are listed without recipients in clear; notices can be queued again, wiped codes cannot."""
    env = clean_env(IAM_DATA_DIR=str(tmp_path / "var"))
    assert run("migrate", cwd=tmp_path, env=env).returncode == 0
    notice, code = seed(tmp_path / "var")
    listed = run("outbox", "list", "--status", "dead", cwd=tmp_path, env=env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["id"] for r in rows} == {notice, code}
    assert "someone@example.com" not in listed.stdout
    refused = run("outbox", "retry", str(code), cwd=tmp_path, env=env)
    assert (refused.returncode, refused.stdout.strip()) == (1, "0 of 1 queued again")
    retried = run("outbox", "retry", "--dead", cwd=tmp_path, env=env)
    assert (retried.returncode, retried.stdout.strip()) == (0, "1 of 2 queued again")
    pending = [
        json.loads(line)["id"]
        for line in run("outbox", "list", "--status", "pending", cwd=tmp_path, env=env).stdout.splitlines()
    ]
    assert pending == [notice]
    assert run("outbox", "retry", cwd=tmp_path, env=env).returncode == 2

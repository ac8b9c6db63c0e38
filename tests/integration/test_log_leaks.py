"""A database error carrying a user's row leaves none of it in the logs (behaviour.md 9.4, S49).

A failing statement's text is what a traceback in error.log shows: SQLAlchemy appends the bound
parameters to it (``[parameters: (...)]``) unless the engine hides them. Signup's INSERT INTO
users carries the argon2 hash, the name and both stored forms of the address, so a database
trigger (installed by the test, on both engines) refuses exactly that insert for one trap account,
and every log sink of a real ``iam-grpc serve`` process (stdout, stderr and the log files, DEBUG on)
is searched for those values in every form: as typed, as stored (Unicode domain), normalised
(ASCII/punycode domain), lower case, URL-encoded, and the name and password alone.

The backstop for values a column cannot hold (MySQL 1406, 1366, ...) is checked the same way on
MariaDB: such an error answers INVALID_ARGUMENT naming no column, and its log line keeps the driver
code and column name but not the driver's message, which (for 1366) quotes the value.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from pathlib import Path
from urllib.parse import quote

import grpc
import idna
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from iam_grpc.core.validation import Violations, check_email
from iam_grpc.proto import auth_pb2, auth_pb2_grpc, common_pb2
from iam_grpc.testing import error_details
from tests.conftest import Backend
from tests.log_scan import address_forms, leaked
from tests.served import Served, serve
from tests.sessions_helper import FIREFOX

PASSWORD = "trap passphrase " + secrets.token_hex(6)
SUFFIX = secrets.token_hex(4)
NAME = f"Zoë Trapname{SUFFIX}"
EMAIL = f"Zoe.Trap.{SUFFIX}@BÜCHER-{SUFFIX}.example"  # as typed: mixed case, Unicode domain
TRIGGER = "iam_test_refuse_trap"


def everything_logged(folder: Path) -> str:
    """stdout and stderr of the process, and every file of its log directory."""
    texts = [(folder / "serve.log").read_text(errors="replace")]
    texts += [path.read_text(errors="replace") for path in sorted((folder / "var" / "logs").glob("*.log"))]
    return "\n".join(texts)


def sqlite_trigger(database: Path, body: str) -> None:
    with sqlite3.connect(database) as connection:
        connection.execute(f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON users {body}")


async def mysql_trigger(url: str, body: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(
                text(f"CREATE TRIGGER {TRIGGER} BEFORE INSERT ON users FOR EACH ROW {body}")
            )
    finally:
        await engine.dispose()


def signup(served: Served, email: str = EMAIL, name: str = NAME) -> tuple[grpc.StatusCode, str, list[str]]:
    with grpc.insecure_channel(served.address) as channel:
        try:
            auth_pb2_grpc.AuthServiceStub(channel).Signup(
                auth_pb2.SignupRequest(
                    client=common_pb2.ClientContext(ip="203.0.113.44", user_agent=FIREFOX),
                    email=email,
                    password=PASSWORD,
                    name=name,
                    last_name=name,
                    terms_accepted=True,
                ),
                timeout=10,
            )
        except grpc.RpcError as error:
            details = error_details(error)
            return details.code, details.reason or "", sorted(details.field_violations)
    return grpc.StatusCode.OK, "", []


async def test_a_database_error_on_a_users_row_leaves_no_hash_name_or_address_in_any_log(
    own_database: Backend, tmp_path: Path
) -> None:
    """The refused INSERT answers INTERNAL and its traceback (with the statement) is in error.log,
    without the argon2 hash, the name, the password or any form of the address."""
    folder = tmp_path / "leaky"
    environ = {**own_database.environ, "IAM_LOG_LEVEL": "DEBUG", "IAM_RATELIMIT__ENABLED": "false"}
    with serve(folder, environ) as served:
        if own_database.shared:
            await mysql_trigger(
                own_database.environ["IAM_DATABASE_URL"],
                f"BEGIN IF NEW.name = '{NAME}' THEN SIGNAL SQLSTATE '23000' "
                "SET MYSQL_ERRNO = 1452, MESSAGE_TEXT = 'refused by the test trigger'; END IF; END",
            )
        else:
            sqlite_trigger(
                folder / "var" / "iam.db",
                f"WHEN NEW.name = '{NAME}' BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END",
            )
        outcome = await asyncio.to_thread(signup, served)
        # the same values in a row nobody refuses: the hash really exists, and is only in the database
        other = await asyncio.to_thread(
            signup, served, EMAIL.replace("Trap", "Kept"), NAME.replace("Trap", "Kept")
        )
    assert outcome[:2] == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert other == (grpc.StatusCode.OK, "", [])
    logs = everything_logged(folder)
    error_log = (folder / "var" / "logs" / "error.log").read_text()
    assert "refused by the test trigger" in error_log  # the driver's error was logged...
    assert "INSERT INTO users" in error_log  # ...with its statement, where parameters would follow
    secrets_of_the_row = [
        "$argon2id$",
        PASSWORD,
        NAME,
        f"Trapname{SUFFIX}",
        f"Keptname{SUFFIX}",
        *address_forms(EMAIL),
        *address_forms(EMAIL.replace("Trap", "Kept")),
        f"BÜCHER-{SUFFIX}",  # the domain alone, in both forms: it is the account's too
        idna.encode(f"bücher-{SUFFIX}").decode(),
    ]
    assert leaked(logs, secrets_of_the_row) == []


async def test_a_value_the_database_cannot_store_is_invalid_argument_and_logs_no_value(
    shared_own_database: Backend, tmp_path: Path
) -> None:
    """MariaDB: a data error (here 1366, whose message quotes the value, raised by a trigger for
    one name) answers INVALID_ARGUMENT naming no column; the log names driver code and column."""
    folder = tmp_path / "backstop"
    environ = {**shared_own_database.environ, "IAM_LOG_LEVEL": "DEBUG", "IAM_RATELIMIT__ENABLED": "false"}
    with serve(folder, environ) as served:
        await mysql_trigger(
            shared_own_database.environ["IAM_DATABASE_URL"],
            "BEGIN DECLARE message VARCHAR(255); "
            f"IF NEW.name = '{NAME}' THEN "
            "SET message = CONCAT('Incorrect string value: ''', NEW.name, ''' for column `users`.`name` at row 1'); "
            "SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1366, MESSAGE_TEXT = message; END IF; END",
        )
        outcome = await asyncio.to_thread(signup, served)
    assert outcome == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", ["request"])
    logs = everything_logged(folder)
    app_log = (folder / "var" / "logs" / "app.log").read_text()
    refused = [line for line in app_log.splitlines() if "the database refused a value" in line]
    assert len(refused) == 1
    assert '"driver_code":1366' in refused[0]
    assert '"column":"name"' in refused[0]
    assert "Traceback" not in logs
    assert leaked(logs, ["$argon2id$", PASSWORD, NAME, f"Trapname{SUFFIX}", *address_forms(EMAIL)]) == []


@pytest.mark.parametrize("form", ["$argon2id$", "Trapname", "bücher", "xn--bcher", "local"])
def test_the_search_finds_what_it_looks_for(form: str) -> None:
    """The scan is not vacuous: each kind of value is found when it is there."""
    values = ["$argon2id$", f"Trapname{SUFFIX}", *address_forms(EMAIL)]
    parsed = check_email(Violations(), "email", EMAIL)
    assert parsed is not None
    sample = {
        "$argon2id$": "[parameters: ('$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA')]",
        "Trapname": f"name={NAME.upper()}",
        "bücher": quote(EMAIL.lower()),
        "xn--bcher": f"recipient={parsed.norm}",
        "local": f"to {parsed.display.split('@')[0].lower()}@…",
    }[form]
    assert leaked(sample, values) != []

"""Log records: compact JSON lines, sinks by kind, redaction before any sink."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from loguru import logger

from iam_grpc.logging import (
    ACCESS,
    AUDIT,
    REDACTED,
    Redactor,
    component_logger,
    configure_logging,
    mask_email,
)

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"
REFRESH = "iamr_" + "A" * 43


def test_secret_keys_are_redacted_at_any_depth_and_case() -> None:
    """password, tokens, codes, API keys... are replaced whatever the nesting or letter case."""
    redactor = Redactor(extra_keys=["ssn"])
    record = {
        "Password": "hunter2hunter2",
        "nested": {"refresh_token": REFRESH, "list": [{"CODE": "123456"}]},
        "x-iam-api-key": "iamk_bff_" + "k" * 43,
        "ssn": "078-05-1120",
        "user_id": "01J000000000000000000000",
    }
    out = redactor.walk(record)
    assert out["Password"] == REDACTED
    assert out["nested"]["refresh_token"] == REDACTED
    assert out["nested"]["list"][0]["CODE"] == REDACTED
    assert out["x-iam-api-key"] == REDACTED
    assert out["ssn"] == REDACTED
    assert out["user_id"] == "01J000000000000000000000"


def test_token_shapes_are_removed_from_any_text() -> None:
    """JWTs, refresh tokens, grants and API keys inside free text are replaced."""
    text = Redactor().text(f"saw {JWT} and {REFRESH} and iamg_{'g' * 43} in the error")
    assert JWT not in text
    assert REFRESH not in text
    assert "iamg_" not in text
    assert text.count(REDACTED) == 3


def test_emails_are_masked() -> None:
    """Addresses are logged masked, under email keys and inside text."""
    assert mask_email("jane.doe@example.com") == "j***@e***.com"
    assert Redactor().walk({"email": "jane@example.com"}) == {"email": "j***@e***.com"}
    assert "jane@example.com" not in Redactor().text("lookup failed for jane@example.com")


def test_url_passwords_are_removed() -> None:
    """A database URL in text loses its password."""
    assert (
        Redactor().text("cannot reach mysql+asyncmy://iam:s3cret@db/iam")
        == "cannot reach mysql+asyncmy://iam:***@db/iam"
    )


def test_unknown_objects_are_not_logged_whole() -> None:
    """Protobuf messages and other objects appear only as their type name."""

    class Message:
        password = "x"

    assert Redactor().walk({"request": Message()}) == {"request": "<Message>"}


@pytest.fixture
def restore_logging() -> object:
    yield None
    logger.remove()
    logger.configure(patcher=lambda record: None)
    logger.add(__import__("sys").stderr)


def test_sinks_split_records_by_kind_and_level(tmp_path: Path, restore_logging: object) -> None:
    """stdout and app get application records, access and audit their own kinds, error only ERROR+; all JSON."""
    stdout = io.StringIO()
    configure_logging(level="INFO", log_dir=tmp_path, stdout=stdout)
    log = component_logger("iam.test")
    log.bind(user_id="u1", password="hunter2hunter2").info("login succeeded")
    log.bind(kind=ACCESS, grpc_status="OK").info("rpc finished")
    log.bind(kind=AUDIT, type="user.signup").info("audit")
    log.debug("not at INFO")
    try:
        raise ValueError("boom " + REFRESH)
    except ValueError:
        log.exception("unexpected error")
    logger.complete()

    def lines(name: str) -> list[dict[str, object]]:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    app = lines("app.log")
    assert [r["msg"] for r in app] == ["login succeeded", "unexpected error"]
    assert app[0]["logger"] == "iam.test"
    assert app[0]["password"] == REDACTED
    assert app[0]["ts"].endswith("Z")  # type: ignore[union-attr]
    assert [r["msg"] for r in lines("access.log")] == ["rpc finished"]
    assert [r["type"] for r in lines("audit.log")] == ["user.signup"]
    errors = lines("error.log")
    assert len(errors) == 1
    assert "ValueError" in str(errors[0]["exc"])
    everything = stdout.getvalue() + "".join(
        (tmp_path / n).read_text() for n in ("app.log", "access.log", "audit.log", "error.log")
    )
    assert "hunter2hunter2" not in everything
    assert REFRESH not in everything
    assert all(json.loads(line) for line in stdout.getvalue().splitlines())
    assert oct((tmp_path / "app.log").stat().st_mode & 0o777) == "0o640"


def test_rotated_logs_are_compressed_privately(tmp_path: Path) -> None:
    """A rotated file becomes <name>.gz with mode 0640 and the same content."""
    import gzip
    import os

    from iam_grpc.logging import _gzip_private

    rotated = tmp_path / "app.2026-11-27.log"
    rotated.write_text('{"msg":"x"}\n')
    previous = os.umask(0)
    try:
        _gzip_private(str(rotated))
    finally:
        os.umask(previous)
    packed = tmp_path / "app.2026-11-27.log.gz"
    assert not rotated.exists()
    assert oct(packed.stat().st_mode & 0o777) == "0o640"
    assert gzip.decompress(packed.read_bytes()) == b'{"msg":"x"}\n'

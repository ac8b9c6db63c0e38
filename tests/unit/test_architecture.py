"""The shape of the package stays what docs/architecture.md describes: core free of transport and
adapters, no import cycle, modules and functions a reader can hold in mind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import iam_grpc

PACKAGE = Path(iam_grpc.__file__).parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120
# Generated code.
UNMEASURED = ("_proto",)
# Scripts Alembic runs in its own context, and the entry point that runs the CLI on import.
NOT_IMPORTABLE = {"iam_grpc.__main__", "iam_grpc.storage.sql.migrations.env"}
# What loading a core module must not load: the transport and every adapter.
EDGES = (
    "grpc",
    "grpc_health",
    "iam_grpc.interceptors",
    "iam_grpc.services",
    "iam_grpc.server",
    "iam_grpc.storage.sql",
    "iam_grpc.storage.redis",
    "iam_grpc.storage.memory",
    "iam_grpc.ua",
    "iam_grpc.geo",
    "iam_grpc.hibp",
    "iam_grpc.dns",
    "iam_grpc.mail",
    "iam_grpc.metrics",
    "iam_grpc.config",
    "prometheus_client",
    "sqlalchemy",
    "redis",
    "ua_parser",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(under: Path = PACKAGE) -> list[str]:
    names = {_module_name(path) for path in under.rglob("*.py")}
    return sorted(names - NOT_IMPORTABLE)


def _measured() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if not any(part in UNMEASURED for part in path.relative_to(PACKAGE).parts)
    ]


def _is_edge(module: str) -> bool:
    return any(module == edge or module.startswith(edge + ".") for edge in EDGES)


def _loaded_after_importing(modules: list[str]) -> set[str]:
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return set(done.stdout.split())


def test_every_package_folder_is_a_package() -> None:
    """Each folder holding Python modules has its ``__init__.py`` (no namespace packages)."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").exists()) == []


def test_core_imports_neither_transport_nor_an_adapter() -> None:
    """Loading every core module loads no grpc, no storage driver, no parser and no metrics
    library: core takes those through Protocols the wiring satisfies."""
    loaded = _loaded_after_importing(_modules(PACKAGE / "core"))
    assert "iam_grpc.core.tokens.refresh" in loaded  # the scan imported core for real
    assert sorted(m for m in loaded if _is_edge(m)) == []


def test_the_error_tree_imports_no_grpc() -> None:
    """``iam_grpc.errors`` is transport-neutral; the error interceptor alone knows gRPC codes."""
    loaded = _loaded_after_importing(["iam_grpc.errors"])
    assert not {m for m in loaded if m == "grpc" or m.startswith("grpc.")}


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_without_a_cycle(order: str) -> None:
    """Every module of the package imports in a fresh interpreter, in sorted and in reverse
    order, so no import cycle hides behind a lucky first import."""
    modules = _modules()
    if order == "reversed":
        modules.reverse()
    loaded = _loaded_after_importing(modules)
    assert set(modules) <= loaded


def test_no_module_is_longer_than_the_limit() -> None:
    """A module that grows past one idea is two modules."""
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in _measured()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_is_longer_than_the_limit() -> None:
    """Functions (and methods) fit on a screen or two."""
    long = {}
    for path in _measured():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"] = lines
    assert long == {}

"""The domain is pure: import-linter's contract (pyproject), plus an AST walk of
migctl/domain that works without the tool."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOMAIN = REPO / "migctl" / "domain"


def _contract() -> dict[str, object]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if c["source_modules"] == ["migctl.domain"])


FORBIDDEN: list[str] = list(_contract()["forbidden_modules"])  # type: ignore[call-overload]


def _lint_imports() -> str | None:
    local = Path(sys.executable).parent / "lint-imports"
    return str(local) if local.exists() else shutil.which("lint-imports")


def test_import_linter_contracts_are_kept() -> None:
    tool = _lint_imports()
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("lint-imports is not installed (pip install -e '.[dev]')")
        pytest.skip("lint-imports is not installed; the AST check below still runs")
    result = subprocess.run(
        [tool, "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    hint = (
        "\nhint: pyproject's [tool.importlinter] needs include_external_packages = true"
        if "include_external_packages" in result.stdout
        else ""
    )
    assert result.returncode == 0, result.stdout + result.stderr + hint
    assert "0 broken" in result.stdout


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module a source file imports, at any depth (functions and
    TYPE_CHECKING blocks included); relative imports resolved against `module`."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # `from migctl import adapters` imports the module migctl.adapters.
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def forbidden(modules: set[str]) -> set[str]:
    return {m for m in modules for f in FORBIDDEN if m == f or m.startswith(f + ".")}


def _domain_files() -> list[Path]:
    return sorted(DOMAIN.rglob("*.py"))


def test_the_domain_has_modules() -> None:
    assert _domain_files(), "migctl/domain/ is empty"


@pytest.mark.parametrize(
    "path", _domain_files(), ids=lambda p: str(p.relative_to(REPO)) if isinstance(p, Path) else p
)
def test_domain_module_imports_nothing_forbidden(path: Path) -> None:
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    if path.name == "__init__.py":
        module += ".__init__"  # relative imports in a package's __init__ resolve to the package
    bad = forbidden(imported_modules(path.read_text(), module))
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import redis", {"redis"}),
        ("import redis.asyncio as r", {"redis.asyncio"}),
        ("from google.cloud import compute_v1", {"google.cloud", "google.cloud.compute_v1"}),
        ("def f():\n    import celery\n", {"celery"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import grpc\n",
            {"grpc"},
        ),
        ("from ..adapters import redis_store", {"migctl.adapters", "migctl.adapters.redis_store"}),
        ("from migctl import wire", {"migctl.wire"}),
        ("import importlib\nimportlib.import_module('requests')", {"requests"}),
        ("import dataclasses\nfrom . import model\nimport redisx", set()),
    ],
)
def test_the_ast_check_catches_forbidden_imports(source: str, bad: set[str]) -> None:
    assert forbidden(imported_modules(source, "migctl.domain.example")) == bad

"""The committed stubs in migctl/wire/ are exactly what proto/generate.sh makes from proto/.

The generator versions are pinned in pyproject's dev extras: another grpcio-tools or
mypy-protobuf writes different version stamps, so the comparison would mean nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATORS = ("grpcio-tools", "mypy-protobuf")


def _pins() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for requirement in pyproject["project"]["optional-dependencies"]["dev"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", requirement.strip())
        if match:
            pins[match[1].lower()] = match[2]
    return pins


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generators_are_pinned_and_installed_at_the_pins() -> None:
    pins = _pins()
    for name in GENERATORS:
        assert name in pins, f"pin {name} with == in pyproject's dev extras"
        installed = metadata.version(name)
        assert installed == pins[name], (
            f"{name} {installed} is installed but {pins[name]} is pinned: "
            "pip install -e '.[dev]' to get the pinned generator"
        )


def test_generate_sh_reproduces_migctl_wire(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # generate.sh runs `python -m grpc_tools.protoc` and the protoc-gen-mypy plugins:
    # take them from the interpreter running the tests.
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    result = subprocess.run(
        ["bash", str(REPO / "proto" / "generate.sh"), str(out)],
        cwd=tmp_path,  # the script must not depend on the caller's directory
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    generated = _files(out / "migctl" / "wire")
    committed = _files(REPO / "migctl" / "wire")
    assert sorted(generated) == sorted(committed)
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run proto/generate.sh and commit migctl/wire/"


@pytest.mark.parametrize("name", ["commands_pb2.py", "commands_pb2_grpc.py"])
def test_stubs_import_each_other_inside_the_package(name: str) -> None:
    text = (REPO / "migctl" / "wire" / "miglet" / name).read_text()
    if name == "commands_pb2_grpc.py":
        assert "from migctl.wire.miglet import commands_pb2" in text
    # The proto package on the wire stays miglet.commands whatever the Python path is.
    assert "miglet.commands" in text

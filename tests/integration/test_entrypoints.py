"""Each process refuses a bad configuration with one line naming the key, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: str = "/"
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        args, env={**base, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "migctl-grpc-gateway")],
        [str(BIN / "migctl-bridge")],
        [str(BIN / "celery"), "-A", "migctl", "worker"],
        [str(BIN / "celery"), "-A", "migctl", "beat"],
    ],
    ids=["gateway", "bridge", "worker", "beat"],
)
def test_missing_required_config_names_the_key(command: list[str]) -> None:
    result = run(command)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "pool.id" in output and "CONTROLLER_POOL_ID" in output, output
    assert "Traceback" not in output, output


def test_a_bad_value_names_its_yaml_path_and_env_var(tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"
    config.write_text("pool:\n  id: p1\nvm_manager:\n  max_vms: lots\n")
    result = run([str(BIN / "migctl-grpc-gateway"), "--config", str(config)])
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "vm_manager.max_vms" in output and "CONTROLLER_VM_MANAGER_MAX_VMS" in output, output
    assert "Traceback" not in output


def test_a_missing_config_file_is_named() -> None:
    result = run([str(BIN / "migctl-bridge"), "--config", "/no/such/controller.yaml"])
    assert result.returncode == 2
    assert "/no/such/controller.yaml" in result.stdout + result.stderr


def test_cli_mistakes_say_what_to_do(tmp_path: Path) -> None:
    result = run([str(BIN / "migctl"), "submit"], cwd=str(tmp_path))
    assert result.returncode == 2
    assert "migctl up --keep-running" in result.stderr
    result = run([str(BIN / "migctl"), "up", "--jobs", "-1"], cwd=str(tmp_path))
    assert result.returncode == 2 and "--jobs" in result.stderr

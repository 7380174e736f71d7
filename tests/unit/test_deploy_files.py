"""Procfile, docker-compose.yml and Dockerfile agree with each other and with the package.

No Docker engine runs here: these are read as files, never built or started.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import migctl

REPO = Path(__file__).resolve().parents[2]

PROCFILE = {
    "bridge": "migctl-bridge",
    "worker": "celery -A migctl worker -E --loglevel INFO",
    "beat": "celery -A migctl beat --loglevel INFO",
    "gateway": "migctl-grpc-gateway",
    "flower": "celery -A migctl flower",
}
SECRET = re.compile(r"PASSWORD|PRIVATE_KEY|TOKEN|SECRET|BASIC_AUTH|CREDENTIALS")


def _procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep and re.fullmatch(r"[a-z][a-z0-9_-]*", name), f"bad Procfile line {line!r}"
        assert name not in processes, f"{name} twice in the Procfile"
        processes[name] = command.strip()
    return processes


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, Any]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _dockerfile() -> str:
    # Join continuation lines so each instruction is one line.
    return (REPO / "Dockerfile").read_text().replace("\\\n", " ")


def _instructions(keyword: str) -> list[str]:
    return [
        line.split(None, 1)[1] if " " in line.strip() else ""
        for line in _dockerfile().splitlines()
        if line.strip().upper().startswith(keyword + " ")
    ]


def _env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


# --- Procfile ---------------------------------------------------------------------------


def test_procfile_is_the_five_processes() -> None:
    assert _procfile() == PROCFILE
    assert (REPO / "Procfile").read_text() == "".join(f"{k}: {v}\n" for k, v in PROCFILE.items())


def _commands() -> list[list[str]]:
    argvs = [_argv(c) for c in _procfile().values()]
    argvs += [_argv(s["command"]) for s in _services().values() if "command" in s]
    cmd = _instructions("CMD")
    assert len(cmd) == 1, "the Dockerfile needs one CMD"
    argvs.append(_argv(yaml.safe_load(cmd[0])))
    return argvs


def test_every_console_script_named_exists_in_pyproject() -> None:
    scripts = _scripts()
    named = {argv[0] for argv in _commands() if argv[0].startswith("migctl")}
    assert {"migctl", "migctl-bridge", "migctl-grpc-gateway"} <= named
    missing = named - set(scripts)
    assert not missing, f"not in [project.scripts]: {sorted(missing)}"
    for name in named:
        assert re.fullmatch(r"migctl(\.\w+)*:\w+", scripts[name]), scripts[name]


def test_celery_app_option_resolves() -> None:
    celery_argvs = [argv for argv in _procfile().values() if argv.startswith("celery ")]
    assert len(celery_argvs) == 3
    for command in celery_argvs:
        argv = shlex.split(command)
        assert argv[argv.index("-A") + 1] == "migctl"
    # `celery -A migctl` reads migctl.app / migctl.celery, which the package builds lazily.
    assert callable(getattr(migctl, "__getattr__", None))
    with pytest.raises(AttributeError):
        migctl.__getattr__("not_an_app")


def test_beat_scheduler_class_is_installed() -> None:
    # The scheduler comes from the app's config (beat_scheduler), not a -S flag, so a
    # plain `celery -A migctl beat` takes the pool's lock too.
    from migctl.worker.beat import MigctlScheduler

    assert "-S" not in shlex.split(_procfile()["beat"])
    assert MigctlScheduler.__mro__[1].__module__.startswith("redbeat")
    assert importlib.util.find_spec("flower") is not None


# --- docker-compose.yml -----------------------------------------------------------------


def test_every_procfile_process_is_a_service_with_the_same_command() -> None:
    services = _services()
    for name, command in _procfile().items():
        assert name in services, f"no compose service for Procfile process {name}"
        assert _argv(services[name]["command"]) == shlex.split(command), name


def test_process_services_share_config_and_redis() -> None:
    services = _services()
    for name in PROCFILE:
        service = services[name]
        env = _env(service)
        assert env["MIGCTL_CONFIG"] == "/etc/migctl/controller.yaml", name
        assert env["REDIS_JOBS_HOST"] == "redis", name
        assert env["REDIS_VM_HOST"] == "redis", name
        assert env["PUBSUB_EMULATOR_HOST"] == "pubsub-emulator:8085", name
        mounts = [str(v) for v in service["volumes"]]
        assert any(m.startswith("./configs:/etc/migctl") for m in mounts), name
        assert service["build"] == "." or service["build"]["context"] == ".", name
        assert "redis" in service["depends_on"], name


def test_redis_and_pubsub_emulator_services() -> None:
    services = _services()
    assert services["redis"]["image"].startswith("redis:")
    emulator = services["pubsub-emulator"]
    assert emulator["image"].startswith("google/cloud-sdk:") and "emulators" in emulator["image"]
    assert "gcloud beta emulators pubsub start --host-port=0.0.0.0:8085" in emulator["command"]
    assert "pubsub-init" in services["bridge"]["depends_on"]


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def test_published_ports() -> None:
    services = _services()
    assert {50051, 8080} <= _container_ports(services["gateway"])
    assert 5555 in _container_ports(services["flower"])


def test_flower_basic_auth_comes_from_the_environment() -> None:
    value = _env(_services()["flower"])["FLOWER_BASIC_AUTH"]
    assert value.startswith("${FLOWER_BASIC_AUTH")


@pytest.mark.parametrize("name", ["redis", "pubsub-emulator", "worker", "gateway", "flower"])
def test_healthchecks(name: str) -> None:
    check = _services()[name]["healthcheck"]
    assert check["test"]
    assert check.get("disable") is not True


def test_no_secret_values_in_compose() -> None:
    for name, service in _services().items():
        for key, value in _env(service).items():
            if SECRET.search(key):
                assert value is None or str(value).startswith("${"), f"{name}: {key} has a value"


# --- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_installs_the_package() -> None:
    text = _dockerfile()
    froms = _instructions("FROM")
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    copied = " ".join(_instructions("COPY"))
    assert "pyproject.toml" in copied and "migctl" in copied
    runs = " ".join(_instructions("RUN"))
    # Built from the project directory (pip wheel/install .), then installed.
    assert re.search(r"pip (install|wheel)[^&]* \.(\s|$)", runs), "the project is not built"
    assert re.search(r"pip install [^&]*(\.whl|\s\.)(\s|$)", runs), "the package is not installed"
    assert "RUN pip install" in text


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = _instructions("USER")
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_bakes_in_no_secret() -> None:
    for keyword in ("ENV", "ARG"):
        for instruction in _instructions(keyword):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)\s*=", instruction):
                assert not SECRET.search(name), f"{keyword} {name} in the Dockerfile"
    copied = " ".join(_instructions("COPY")).lower()
    assert ".pem" not in copied and "secret" not in copied and ".env" not in copied


def test_dockerfile_default_command_prints_help() -> None:
    (cmd,) = _instructions("CMD")
    assert yaml.safe_load(cmd) == ["migctl", "--help"]

"""The settings tree: the seed's YAML layout, both env naming schemes, durations, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from migctl import config_example
from migctl.settings import (
    ConfigError,
    Settings,
    env_names,
    format_duration,
    leaves,
    load_settings,
    parse_duration,
)

REPO = Path(__file__).resolve().parents[2]

# The seed README's "Pool", "Scheduler" and "VM Manager" blocks, plus the sections its env
# tables imply.
SEED_YAML = """\
pool:
  id: "pool-2vcpu-linux"      # Unique pool identifier
  type: "2vcpu"               # Machine type identifier
  os: "linux"                 # Operating system
  arch: "x64"                 # Architecture
  labels:                     # Runner labels
    - "self-hosted"
    - "linux"
    - "x64"

scheduler:
  poll_interval: "1s"                    # How often to check for jobs
  assignment_timeout: "5m"               # Max time to wait for VM ready
  max_concurrent_assignments: 10         # Parallel assignments

vm_manager:
  poll_interval: "30s"           # How often to sync with GCloud
  heartbeat_timeout: "60s"       # Mark unhealthy if no heartbeat
  min_ready_vms: 2               # Warm pool size
  max_vms: 50                    # Hard limit
  idle_timeout: "10m"            # Stop VM after this idle time
  max_scale_up_per_minute: 5     # Rate limiting

gcp:
  project_id: "your-project"
  zone: "us-central1-a"
  mig_name: "monkci-runners-2vcpu"

github_app:
  app_id: "12345"
  private_key_path: "/etc/controller/github-app-key.pem"

redis:
  jobs:
    host: "redis-jobs.internal"
  vm_status:
    host: "redis-vm.internal"

pubsub:
  project_id: "your-project"
  subscription: "jobs-pool-2vcpu-sub"
"""

# The seed's Quick Start env block (bare names) ...
SEED_ENV_BARE = {
    "CONTROLLER_POOL_ID": "pool-2vcpu-linux",
    "CONTROLLER_GCP_PROJECT_ID": "your-project",
    "CONTROLLER_GCP_ZONE": "us-central1-a",
    "CONTROLLER_GCP_MIG_NAME": "monkci-runners-2vcpu",
    "GITHUB_APP_ID": "12345",
    "GITHUB_APP_PRIVATE_KEY_PATH": "/etc/controller/github-app-key.pem",
    "REDIS_JOBS_HOST": "localhost",
    "REDIS_VM_HOST": "localhost",
    "PUBSUB_PROJECT_ID": "your-project",
    "PUBSUB_SUBSCRIPTION": "jobs-pool-2vcpu-sub",
    "CONTROLLER_LOG_LEVEL": "info",
    "CONTROLLER_LOG_FORMAT": "json",
}

# ... and its "minimum required" block (CONTROLLER_ names).
SEED_ENV_MINIMUM = {
    "CONTROLLER_POOL_ID": "pool-2vcpu-linux",
    "CONTROLLER_GCP_PROJECT_ID": "your-project",
    "CONTROLLER_GCP_ZONE": "us-central1-a",
    "CONTROLLER_GCP_MIG_NAME": "runners-2vcpu",
    "CONTROLLER_GITHUB_APP_ID": "12345",
    "CONTROLLER_GITHUB_APP_PRIVATE_KEY_PATH": "/path/to/key.pem",
    "CONTROLLER_REDIS_JOBS_HOST": "redis.internal",
    "CONTROLLER_REDIS_VM_HOST": "redis.internal",
    "CONTROLLER_PUBSUB_PROJECT_ID": "your-project",
    "CONTROLLER_PUBSUB_SUBSCRIPTION": "jobs-2vcpu-sub",
}

# Every env var the seed names (both tables, the quick start and the minimum block), the
# setting it maps to, a value to set and the value expected in the tree.
SEED_VARS = [
    ("CONTROLLER_POOL_ID", ("pool", "id"), "pool-x", "pool-x"),
    ("CONTROLLER_POOL_TYPE", ("pool", "type"), "4vcpu", "4vcpu"),
    ("CONTROLLER_GCP_PROJECT_ID", ("gcp", "project_id"), "proj-x", "proj-x"),
    ("CONTROLLER_GCP_ZONE", ("gcp", "zone"), "europe-west1-b", "europe-west1-b"),
    ("CONTROLLER_GCP_MIG_NAME", ("gcp", "mig_name"), "mig-x", "mig-x"),
    ("GITHUB_APP_ID", ("github_app", "app_id"), "999", "999"),
    ("CONTROLLER_GITHUB_APP_ID", ("github_app", "app_id"), "998", "998"),
    ("GITHUB_APP_PRIVATE_KEY_PATH", ("github_app", "private_key_path"), "/k1.pem", "/k1.pem"),
    (
        "CONTROLLER_GITHUB_APP_PRIVATE_KEY_PATH",
        ("github_app", "private_key_path"),
        "/k2.pem",
        "/k2.pem",
    ),
    ("GITHUB_APP_PRIVATE_KEY", ("github_app", "private_key"), "PEM-1", "PEM-1"),
    ("CONTROLLER_GITHUB_APP_PRIVATE_KEY", ("github_app", "private_key"), "PEM-2", "PEM-2"),
    ("REDIS_JOBS_HOST", ("redis", "jobs", "host"), "jobs-1", "jobs-1"),
    ("CONTROLLER_REDIS_JOBS_HOST", ("redis", "jobs", "host"), "jobs-2", "jobs-2"),
    ("REDIS_JOBS_PASSWORD", ("redis", "jobs", "password"), "pw-1", "pw-1"),
    ("CONTROLLER_REDIS_JOBS_PASSWORD", ("redis", "jobs", "password"), "pw-2", "pw-2"),
    ("REDIS_VM_HOST", ("redis", "vm_status", "host"), "vm-1", "vm-1"),
    ("CONTROLLER_REDIS_VM_HOST", ("redis", "vm_status", "host"), "vm-2", "vm-2"),
    ("REDIS_VM_PASSWORD", ("redis", "vm_status", "password"), "pw-3", "pw-3"),
    ("CONTROLLER_REDIS_VM_PASSWORD", ("redis", "vm_status", "password"), "pw-4", "pw-4"),
    ("PUBSUB_PROJECT_ID", ("pubsub", "project_id"), "ps-1", "ps-1"),
    ("CONTROLLER_PUBSUB_PROJECT_ID", ("pubsub", "project_id"), "ps-2", "ps-2"),
    ("PUBSUB_SUBSCRIPTION", ("pubsub", "subscription"), "sub-1", "sub-1"),
    ("CONTROLLER_PUBSUB_SUBSCRIPTION", ("pubsub", "subscription"), "sub-2", "sub-2"),
    ("CONTROLLER_LOG_LEVEL", ("logging", "level"), "DEBUG", "debug"),
    ("CONTROLLER_LOG_FORMAT", ("logging", "format"), "console", "console"),
]

# Bare seed name, its CONTROLLER_ twin: both set, the prefixed one wins.
PAIRS = [
    ("GITHUB_APP_ID", "CONTROLLER_GITHUB_APP_ID", ("github_app", "app_id")),
    (
        "GITHUB_APP_PRIVATE_KEY_PATH",
        "CONTROLLER_GITHUB_APP_PRIVATE_KEY_PATH",
        ("github_app", "private_key_path"),
    ),
    ("GITHUB_APP_PRIVATE_KEY", "CONTROLLER_GITHUB_APP_PRIVATE_KEY", ("github_app", "private_key")),
    ("REDIS_JOBS_HOST", "CONTROLLER_REDIS_JOBS_HOST", ("redis", "jobs", "host")),
    ("REDIS_JOBS_PASSWORD", "CONTROLLER_REDIS_JOBS_PASSWORD", ("redis", "jobs", "password")),
    ("REDIS_VM_HOST", "CONTROLLER_REDIS_VM_HOST", ("redis", "vm_status", "host")),
    ("REDIS_VM_PASSWORD", "CONTROLLER_REDIS_VM_PASSWORD", ("redis", "vm_status", "password")),
    ("PUBSUB_PROJECT_ID", "CONTROLLER_PUBSUB_PROJECT_ID", ("pubsub", "project_id")),
    ("PUBSUB_SUBSCRIPTION", "CONTROLLER_PUBSUB_SUBSCRIPTION", ("pubsub", "subscription")),
]


def _get(settings: Settings, path: tuple[str, ...]) -> object:
    node: object = settings
    for part in path:
        node = getattr(node, part)
    return node


def _settings_env() -> list[str]:
    return [*env_names(), "MIGCTL_CONFIG"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No env var the settings read leaks in from the machine running the tests."""
    for name in _settings_env():
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    path = tmp_path / "controller.yaml"
    path.write_text(SEED_YAML)
    return path


def _write(tmp_path: Path, text: str, name: str = "controller.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- the seed's YAML and env blocks load ---------------------------------------------


def test_seed_yaml_loads(seed_file: Path) -> None:
    s = load_settings(seed_file)
    assert s.pool.id == "pool-2vcpu-linux"
    assert (s.pool.type, s.pool.os, s.pool.arch) == ("2vcpu", "linux", "x64")
    assert s.pool.labels == ["self-hosted", "linux", "x64"]
    assert s.scheduler.poll_interval == 1.0
    assert s.scheduler.assignment_timeout == 300.0
    assert s.scheduler.max_concurrent_assignments == 10
    vm = s.vm_manager
    assert (vm.poll_interval, vm.heartbeat_timeout, vm.idle_timeout) == (30.0, 60.0, 600.0)
    assert (vm.min_ready_vms, vm.max_vms, vm.max_scale_up_per_minute) == (2, 50, 5)
    assert s.redis.jobs.host == "redis-jobs.internal"
    assert s.redis.vm_status.host == "redis-vm.internal"
    assert s.pubsub.subscription == "jobs-pool-2vcpu-sub"


@pytest.mark.parametrize("block", [SEED_ENV_BARE, SEED_ENV_MINIMUM], ids=["quickstart", "minimum"])
def test_seed_env_blocks_load_without_a_file(
    block: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in block.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert s.pool.id == "pool-2vcpu-linux"
    assert s.github_app.app_id == "12345"
    assert s.gcp.zone == "us-central1-a"
    assert s.redis.jobs.host == block.get(
        "REDIS_JOBS_HOST", block.get("CONTROLLER_REDIS_JOBS_HOST")
    )
    assert s.pubsub.project_id == "your-project"


@pytest.mark.parametrize(("name", "path", "value", "expected"), SEED_VARS, ids=lambda v: v)
def test_each_seed_env_var_sets_its_key(
    name: str,
    path: tuple[str, ...],
    value: str,
    expected: str,
    seed_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(name, value)
    assert _get(load_settings(seed_file), path) == expected
    assert env_names()[name] == path


def test_every_seed_env_var_is_known() -> None:
    names = env_names()
    seed = {n for n, *_ in SEED_VARS} | set(SEED_ENV_BARE) | set(SEED_ENV_MINIMUM)
    assert seed - set(names) == set()


def test_every_leaf_has_a_controller_prefixed_env_var() -> None:
    names = env_names()
    for path, _ in leaves():
        assert names["CONTROLLER_" + "_".join(path).upper()] == path


def test_env_overrides_the_file(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_VM_MANAGER_MAX_VMS", "80")
    monkeypatch.setenv("CONTROLLER_SCHEDULER_POLL_INTERVAL", "250ms")
    monkeypatch.setenv("REDIS_VM_HOST", "from-env")
    monkeypatch.setenv("CONTROLLER_POOL_LABELS", "self-hosted, linux ,gpu")
    s = load_settings(seed_file)
    assert s.vm_manager.max_vms == 80
    assert s.scheduler.poll_interval == 0.25
    assert s.redis.vm_status.host == "from-env"
    assert s.redis.jobs.host == "redis-jobs.internal"  # a sibling keeps the file's value
    assert s.pool.labels == ["self-hosted", "linux", "gpu"]


@pytest.mark.parametrize(("bare", "prefixed", "path"), PAIRS, ids=lambda v: v)
def test_prefixed_env_wins_over_bare(
    bare: str,
    prefixed: str,
    path: tuple[str, ...],
    seed_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(bare, "bare-value")
    monkeypatch.setenv(prefixed, "prefixed-value")
    assert _get(load_settings(seed_file), path) == "prefixed-value"


def test_overrides_win_over_env(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_POOL_ID", "from-env")
    s = load_settings(seed_file, pool={"id": "from-override"})
    assert s.pool.id == "from-override"
    assert s.pool.labels == ["self-hosted", "linux", "x64"]


def test_migctl_config_env_names_the_file(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGCTL_CONFIG", str(seed_file))
    assert load_settings().pool.id == "pool-2vcpu-linux"


def test_empty_env_for_a_non_string_means_unset(
    seed_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTROLLER_GITHUB_APP_INSTALLATION_ID", "")
    monkeypatch.setenv("CONTROLLER_VM_MANAGER_MAX_VMS", "")
    s = load_settings(seed_file)
    assert s.github_app.installation_id is None
    assert s.vm_manager.max_vms == 50


def test_yaml_accepts_redis_vm_and_log_aliases(tmp_path: Path) -> None:
    text = SEED_YAML.replace("  vm_status:\n", "  vm:\n") + "log:\n  level: WARN\n"
    s = load_settings(_write(tmp_path, text))
    assert s.redis.vm_status.host == "redis-vm.internal"
    assert s.logging.level == "warn"


def test_env_overrides_a_yaml_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_REDIS_VM_HOST", "from-env")
    monkeypatch.setenv("CONTROLLER_REDIS_VM_PORT", "6380")
    s = load_settings(_write(tmp_path, SEED_YAML.replace("  vm_status:\n", "  vm:\n")))
    assert (s.redis.vm_status.host, s.redis.vm_status.port) == ("from-env", 6380)


def test_yaml_alias_and_canonical_together_is_an_error(tmp_path: Path) -> None:
    text = SEED_YAML.replace("\npubsub:", "  vm:\n    host: other\n\npubsub:")
    msg = _error(_write(tmp_path, text))
    assert "redis.vm and redis.vm_status" in msg
    assert "controller.yaml" in msg


def test_sim_provider_needs_no_gcp(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SEED_ENV_MINIMUM.items():
        if "_GCP_" not in name:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONTROLLER_VM_MANAGER_PROVIDER", "sim")
    assert load_settings().gcp.project_id == ""


def test_secrets_are_not_in_repr(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_JOBS_PASSWORD", "hunter2-jobs")
    monkeypatch.setenv("GITHUB_APP_PRIVATE_KEY", "-----BEGIN PRIVATE KEY----- abc")
    text = repr(load_settings(seed_file))
    assert "hunter2-jobs" not in text
    assert "BEGIN PRIVATE KEY" not in text


# --- durations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("0s", 0.0),
        ("30", 30.0),
        ("2.5", 2.5),
        (45, 45.0),
        (0.5, 0.5),
        (" 10s ", 10.0),
        ("1500us", 0.0015),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "5x", "m5", "1h 30m", "-1s", "1d", "s", "5mm", "abc", True, -3, "1s5"]
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.0, 0.25, 1.0, 59.0, 60.0, 90.0, 600.0, 3600.0, 5400.0])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_bad_duration_names_yaml_path_and_env(tmp_path: Path) -> None:
    text = SEED_YAML.replace('idle_timeout: "10m"', 'idle_timeout: "ten minutes"')
    msg = _error(_write(tmp_path, text))
    assert msg.count("\n") == 0
    assert "vm_manager.idle_timeout" in msg
    assert "CONTROLLER_VM_MANAGER_IDLE_TIMEOUT" in msg
    assert "duration" in msg
    assert "'ten minutes'" in msg


# --- errors for people ----------------------------------------------------------------


def test_nothing_configured_names_every_required_key_and_its_env() -> None:
    msg = _error()
    assert msg.splitlines() == [
        "config error: pool.id (env CONTROLLER_POOL_ID): required, not set",
    ]


REQUIRED = [
    ("CONTROLLER_POOL_ID", "pool.id"),
    ("CONTROLLER_GCP_PROJECT_ID", "gcp.project_id"),
    ("CONTROLLER_GCP_ZONE", "gcp.zone"),
    ("CONTROLLER_GCP_MIG_NAME", "gcp.mig_name"),
    ("CONTROLLER_GITHUB_APP_ID", "github_app.app_id"),
    ("CONTROLLER_GITHUB_APP_PRIVATE_KEY_PATH", "github_app.private_key_path"),
    ("CONTROLLER_PUBSUB_PROJECT_ID", "pubsub.project_id"),
    ("CONTROLLER_PUBSUB_SUBSCRIPTION", "pubsub.subscription"),
]


@pytest.mark.parametrize(("env", "path"), REQUIRED, ids=[p for _, p in REQUIRED])
def test_missing_required_names_key_and_env(
    env: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SEED_ENV_MINIMUM.items():
        if name != env:
            monkeypatch.setenv(name, value)
    lines = _error().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {path} (env ")
    assert env in lines[0]
    assert "required" in lines[0]


def test_bare_env_names_are_in_the_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SEED_ENV_MINIMUM.items():
        if name != "CONTROLLER_GITHUB_APP_ID":
            monkeypatch.setenv(name, value)
    assert "GITHUB_APP_ID" in _error().replace("CONTROLLER_GITHUB_APP_ID", "")


def test_several_missing_keys_give_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_POOL_ID", "p")
    lines = _error().splitlines()
    paths = [line.split(" ")[2] for line in lines]
    assert paths == [
        "gcp.project_id",
        "gcp.zone",
        "gcp.mig_name",
        "github_app.app_id",
        "github_app.private_key_path",
        "pubsub.project_id",
        "pubsub.subscription",
    ]
    assert all(line.startswith("config error: ") for line in lines)


def test_bad_types_name_the_yaml_path_the_env_var_and_what_was_expected(tmp_path: Path) -> None:
    text = SEED_YAML.replace("max_vms: 50", 'max_vms: "lots"').replace(
        'poll_interval: "1s"', 'poll_interval: "soon"'
    )
    text += "server:\n  grpc_port: 70000\n"
    lines = _error(_write(tmp_path, text)).splitlines()
    assert len(lines) == 3, lines
    by_path = {line.split(" ")[2]: line for line in lines}
    assert "CONTROLLER_VM_MANAGER_MAX_VMS" in by_path["vm_manager.max_vms"]
    assert "integer" in by_path["vm_manager.max_vms"]
    assert "'lots'" in by_path["vm_manager.max_vms"]
    assert "CONTROLLER_SCHEDULER_POLL_INTERVAL" in by_path["scheduler.poll_interval"]
    assert "less than or equal to 65535" in by_path["server.grpc_port"]


def test_bad_env_value_names_the_env_var(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_VM_PORT", "sixty")
    msg = _error(seed_file)
    assert msg.startswith("config error: redis.vm_status.port (env ")
    assert "REDIS_VM_PORT" in msg
    assert "'sixty'" in msg


def test_bad_choice_lists_the_choices(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_LOG_LEVEL", "loud")
    msg = _error(seed_file)
    assert "logging.level" in msg
    assert "CONTROLLER_LOG_LEVEL" in msg
    assert "'debug'" in msg
    assert "'loud'" in msg


def test_list_item_error_names_the_index(tmp_path: Path) -> None:
    text = SEED_YAML.replace('    - "linux"\n', "    - {a: 1}\n")
    msg = _error(_write(tmp_path, text))
    assert msg.startswith("config error: pool.labels[1] (env CONTROLLER_POOL_LABELS): ")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, SEED_YAML.replace("max_vms: 50", "max_vm: 50")))
    assert msg == (
        "config error: vm_manager.max_vm: unknown setting "
        "(check the spelling and the section it is in)"
    )


def test_min_ready_above_max_vms(seed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROLLER_VM_MANAGER_MIN_READY_VMS", "9")
    monkeypatch.setenv("CONTROLLER_VM_MANAGER_MAX_VMS", "3")
    msg = _error(seed_file)
    assert "vm_manager.min_ready_vms" in msg
    assert "CONTROLLER_VM_MANAGER_MIN_READY_VMS" in msg
    assert "at most vm_manager.max_vms (3), got 9" in msg


def test_secret_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    text = SEED_YAML.replace('app_id: "12345"', 'app_id: "12345"\n  private_key: [TOPSECRET]')
    path = _write(tmp_path, text)
    msg = _error(path)
    assert "github_app.private_key" in msg
    assert "TOPSECRET" not in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "pool:\n  id: x\n  labels: [a, b\nscheduler: {}\n")
    msg = _error(path)
    assert msg.count("\n") == 0
    assert msg.startswith(f"config error: {path} line ")
    assert "not valid YAML" in msg
    line = int(msg.split(" line ")[1].split(",")[0])
    assert 3 <= line <= 4


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "- pool\n- scheduler\n"))
    assert "expected a YAML mapping" in msg
    assert "got a list" in msg


def test_empty_yaml_file_is_no_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SEED_ENV_MINIMUM.items():
        monkeypatch.setenv(name, value)
    assert load_settings(_write(tmp_path, "# nothing yet\n")).pool.id == "pool-2vcpu-linux"


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = _error(missing)
    assert msg.startswith(f"config error: --config {missing}: no such file")


def test_missing_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGCTL_CONFIG", str(tmp_path / "nope.yaml"))
    assert _error().startswith(f"config error: MIGCTL_CONFIG {tmp_path / 'nope.yaml'}: no such")


def test_config_error_hides_the_pydantic_traceback(seed_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(seed_file, vm_manager={"max_vms": "x"})
    assert info.value.__suppress_context__
    assert info.value.__cause__ is None


CHECK = """\
import sys
from migctl.settings import ConfigError, load_settings
try:
    load_settings(sys.argv[1] if len(sys.argv) > 1 else None)
except ConfigError as exc:
    sys.exit(str(exc))
print("ok")
"""


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _settings_env()}
    return subprocess.run(
        [sys.executable, "-c", CHECK, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_usage_prints_one_line_and_no_traceback() -> None:
    result = _run([], {**SEED_ENV_MINIMUM, "CONTROLLER_VM_MANAGER_MAX_VMS": "lots"})
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("config error: vm_manager.max_vms (env ")


def test_cli_usage_with_a_good_config(seed_file: Path) -> None:
    result = _run([str(seed_file)], {})
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


# --- configs/controller.yaml.example ---------------------------------------------------


def test_example_file_is_the_generators_output() -> None:
    committed = (REPO / "configs" / "controller.yaml.example").read_text()
    assert committed == config_example.render(), (
        "regenerate: python -m migctl.config_example > configs/controller.yaml.example"
    )


def test_example_file_has_every_key_with_its_default() -> None:
    data = yaml.safe_load((REPO / "configs" / "controller.yaml.example").read_text())
    for path, field in leaves():
        node = data
        for part in path:
            assert part in node, f"{'.'.join(path)} missing from the example"
            node = node[part]
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(node, str) and isinstance(default, float):
            node = parse_duration(node)
        assert node == default, ".".join(path)


def test_example_file_loads_once_required_values_are_filled_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in SEED_ENV_MINIMUM.items():
        monkeypatch.setenv(name, value)
    s = load_settings(REPO / "configs" / "controller.yaml.example")
    assert s.pool.id == "pool-2vcpu-linux"
    assert s.scheduler.assignment_timeout == 300.0
    assert s.redis.vm_status.host == "redis.internal"


def test_example_file_comments_every_key() -> None:
    lines = (REPO / "configs" / "controller.yaml.example").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "- ")):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {stripped!r}"

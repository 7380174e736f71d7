"""The one typed settings tree: YAML file (the Go controller's layout) overlaid by env vars.

Loaded once per process at its edge (`load_settings`); everything else receives it.
Both env naming schemes of the seed work: `GITHUB_APP_ID` and `CONTROLLER_GITHUB_APP_ID`,
`REDIS_JOBS_HOST` and `CONTROLLER_REDIS_JOBS_HOST`, and generally `CONTROLLER_<SECTION>_<KEY>`
for every leaf. Precedence: `load_settings` overrides > env > YAML file > defaults; among env
names for one setting, a `CONTROLLER_` name wins over a bare seed name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# Go's time.ParseDuration units (longest first so "ms" is not read as "m" + "s").
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "a duration such as '250ms', '30s', '5m' or '1h30m' (or plain seconds)"


def parse_duration(value: Any) -> float:
    """Go-style durations ("1s", "5m", "1h30m", "250ms") or plain seconds, as float seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected {_DURATION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for match in _DURATION.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT[match.group(2)]
                pos = match.end()
            if not text or pos != len(text):
                raise ValueError(f"expected {_DURATION_HINT}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected {_DURATION_HINT}, not negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Go-style spelling of seconds: 90 -> "1m30s", 0.25 -> "250ms" (parse_duration inverts it)."""
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    rest = ms // 1000
    out = ""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolSettings(_Section):
    """The pool this controller serves: one controller deployment per pool (machine type)."""

    id: str = Field(
        min_length=1,
        description="Unique pool identifier; namespaces every Redis key and queue.",
        examples=["pool-2vcpu-linux"],
    )
    type: str = Field("2vcpu", description="Machine type identifier (2vcpu, 4vcpu, ...).")
    os: str = Field("linux", description="Operating system of the pool's VMs.")
    arch: str = Field("x64", description="CPU architecture of the pool's VMs.")
    labels: list[str] = Field(
        default_factory=lambda: ["self-hosted", "linux", "x64"],
        description="Runner labels every VM of the pool registers with; "
        "a job's labels must be a subset. As an env var: comma-separated.",
    )
    idle_action: Literal["stop", "suspend", "delete"] = Field(
        "stop", description="What idle stop does to a VM idle past vm_manager.idle_timeout."
    )
    post_job: Literal["reuse", "warm", "idle"] = Field(
        "reuse",
        description="After a job: reuse = re-register for the next queued job, warm = keep ready, "
        "idle = let the idle path decide.",
    )


class SchedulerSettings(_Section):
    """Job assignment."""

    poll_interval: Duration = Field(
        1.0, description="Safety-net sweep interval for queued jobs (assignment is event-driven)."
    )
    assignment_timeout: Duration = Field(
        300.0,
        description="An ASSIGNED job whose runner never starts it goes back to the queue "
        "after this.",
    )
    max_concurrent_assignments: int = Field(
        10, ge=1, description="Runner registrations in flight (sent, not yet acked) at once."
    )
    max_retries: int = Field(
        3, ge=0, description="Times a job is put back in the queue before it is FAILED."
    )


class VmManagerSettings(_Section):
    """VM lifecycle: the MIG sync, health, the warm pool and idle stop."""

    provider: Literal["gce", "sim"] = Field(
        "gce", description="gce = a real MIG; sim = the simulated MIG of the local world."
    )
    poll_interval: Duration = Field(30.0, description="How often the GCloud sync lists the MIG.")
    heartbeat_timeout: Duration = Field(
        60.0, description="No heartbeat for this long marks a VM UNHEALTHY."
    )
    boot_timeout: Duration = Field(
        600.0, description="A VM still booting or never connected after this is replaced."
    )
    min_ready_vms: int = Field(
        2, ge=0, description="Warm pool size: VMs kept READY/IDLE with no job."
    )
    max_vms: int = Field(
        50, ge=1, description="Hard limit on VMs in the pool, all states but deleted."
    )
    idle_timeout: Duration = Field(
        600.0, description="Stop (idle_action) a VM idle longer than this, above min_ready_vms."
    )
    max_scale_up_per_minute: int = Field(
        5, ge=1, description="VMs created or started per minute at most, across workers."
    )
    drain_timeout: Duration = Field(
        900.0,
        description="How long a draining VM may take to finish its job before it is "
        "stopped anyway.",
    )


class GcpSettings(_Section):
    """The Google Cloud managed instance group."""

    project_id: str = Field("", description="GCP project of the MIG.", examples=["your-project"])
    zone: str = Field("", description="Zone of the zonal MIG.", examples=["us-central1-a"])
    mig_name: str = Field(
        "",
        description="Managed instance group name; instance name = vm_id.",
        examples=["runners-2vcpu"],
    )
    api_endpoint: str = Field(
        "", description="Override of the Compute endpoint (tests, private endpoints)."
    )
    credentials_file: str = Field(
        "", description="Service account JSON; empty = Application Default Credentials."
    )
    anonymous: bool = Field(
        False, description="Send no credentials (only for a local fake endpoint)."
    )
    api_calls_per_second: float = Field(
        10.0, gt=0, description="Shared token bucket for Compute API calls across workers."
    )
    standby_mode: Literal["", "MANUAL", "SCALE_OUT_POOL"] = Field(
        "",
        description="The MIG's standby policy mode, kept as set by the GCloud sync; empty = "
        "leave the MIG's own setting alone.",
    )
    standby_initial_delay: Duration | None = Field(
        None,
        description="The standby policy's initial delay (0-3600 s) before a new VM is "
        "stopped or suspended; unset = leave the MIG's own setting alone.",
    )


class GithubAppSettings(_Section):
    """The GitHub App that mints runner registration tokens."""

    app_id: str = Field(
        "",
        description="GitHub App ID (or client ID) used as the JWT issuer.",
        examples=["12345"],
    )
    private_key_path: str = Field(
        "",
        description="Path to the App's PEM private key.",
        examples=["/etc/controller/github-app-key.pem"],
    )
    private_key: str = Field(
        "",
        description="The App's PEM private key content (alternative to the path; "
        "prefer the env var to the file).",
        repr=False,
    )
    installation_id: int | None = Field(
        None, description="Installation id when jobs do not carry one."
    )
    base_url: str = Field(
        "https://api.github.com",
        description="REST base URL; GitHub Enterprise Server: https://HOST/api/v3.",
    )
    web_url: str = Field(
        "https://github.com", description="Base URL runners register against (runner_url)."
    )
    org: str = Field("", description="Organisation whose runners this pool provides (org scope).")
    runner_scope: Literal["org", "repo"] = Field(
        "org", description="Register runners at org or repo level."
    )
    runner_group: str = Field(
        "", description="Runner group name or numeric id; empty = default group."
    )
    use_jit: bool = Field(
        True, description="Hand JIT configs to agents that advertise the 'jit' capability."
    )
    hygiene_interval: Duration = Field(
        300.0,
        description="How often runner hygiene lists the pool's runners and removes offline "
        "orphans; 0 = off.",
    )
    runner_grace: Duration = Field(
        120.0,
        description="A VM whose acked registration shows no runner in GitHub after this is "
        "flagged (runner never appeared).",
    )


class RedisEndpoint(_Section):
    """One Redis server (or Memorystore instance)."""

    host: str = Field("localhost", description="Redis host.")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    password: str = Field("", description="Redis password.", repr=False)
    db: int = Field(0, ge=0, description="Redis database number.")
    tls: bool = Field(
        False, description="Use TLS (rediss://), e.g. Memorystore with in-transit encryption."
    )

    def url(self, db: int | None = None) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db if db is None else db}"


class RedisSettings(_Section):
    """The seed's two Redis stores; they may be the same server. YAML also accepts `vm:`."""

    jobs: RedisEndpoint = Field(
        default_factory=RedisEndpoint, description="Jobs store (queue, job records, Celery broker)."
    )
    vm_status: RedisEndpoint = Field(
        default_factory=RedisEndpoint, description="VM status store (VM records, outboxes)."
    )


class PubsubSettings(_Section):
    """Where queued jobs come from."""

    project_id: str = Field(
        "", description="Project of the job subscription.", examples=["your-project"]
    )
    subscription: str = Field(
        "",
        description="Subscription the bridge pulls queued-job messages from.",
        examples=["jobs-pool-2vcpu-sub"],
    )
    topic: str = Field("", description="Topic the webhook ingress publishes to.")
    dead_letter_topic: str = Field(
        "", description="Topic that invalid messages are also published to; empty = Redis only."
    )
    emulator_host: str = Field(
        "", description="host:port of a Pub/Sub emulator (same as PUBSUB_EMULATOR_HOST)."
    )
    max_messages: int = Field(
        100, ge=1, description="Flow control: messages outstanding in the bridge at once."
    )
    source: Literal["pubsub", "local"] = Field(
        "pubsub",
        description="local = a Redis list job source (the local world without the emulator).",
    )


class ServerSettings(_Section):
    """The gateway's gRPC and HTTP listeners and how agents authenticate."""

    grpc_port: int = Field(
        50051, ge=1, le=65535, description="Gateway gRPC port for MIGlet streams."
    )
    http_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="HTTP port for /health, /ready, /stats, /metrics, the admin API.",
    )
    webhook_port: int = Field(
        8090, ge=1, le=65535, description="Port of the optional GitHub webhook ingress."
    )
    bind: str = Field("0.0.0.0", description="Address the servers listen on.")
    auth_mode: Literal["none", "token", "gce-identity"] = Field(
        "none", description="How agents authenticate to the gateway."
    )
    agent_token: str = Field(
        "", description="Bearer token agents present in auth_mode=token.", repr=False
    )
    identity_audience: str = Field(
        "", description="Audience of GCE identity tokens in auth_mode=gce-identity."
    )
    tls_cert_file: str = Field("", description="Gateway TLS certificate (PEM); empty = plaintext.")
    tls_key_file: str = Field("", description="Gateway TLS private key (PEM).")
    tls_client_ca_file: str = Field(
        "", description="CA for client certificates; set = mTLS required."
    )
    admin_token: str = Field(
        "", description="Bearer token required by admin API writes (drain, cancel).", repr=False
    )
    webhook_secret: str = Field(
        "",
        description="Secret of the GitHub App's webhook, checked against X-Hub-Signature-256 "
        "by migctl-webhook.",
        repr=False,
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted from an agent."
    )


class LoggingSettings(_Section):
    """Logs (the seed's CONTROLLER_LOG_LEVEL / CONTROLLER_LOG_FORMAT). YAML also accepts `log:`."""

    level: Annotated[
        Literal["debug", "info", "warning", "warn", "error"], BeforeValidator(_lower)
    ] = Field("info", description="Log level (case-insensitive).")
    format: Annotated[Literal["json", "console", "text"], BeforeValidator(_lower)] = Field(
        "json", description="json for machines, console (or text) for people."
    )


class FlowerSettings(_Section):
    """Flower, the Celery task monitor."""

    basic_auth: str = Field(
        "",
        description="user:password for Flower; required unless FLOWER_UNAUTHENTICATED_API is set.",
        repr=False,
    )
    port: int = Field(5555, ge=1, le=65535, description="Flower port.")


class SimSettings(_Section):
    """The local world (`vm_manager.provider: sim`): simulated MIG timings and agents."""

    create_s: Duration = Field(
        3.0, description="Seconds a simulated VM takes from create to RUNNING."
    )
    start_s: Duration = Field(2.0, description="Seconds a stopped simulated VM takes to start.")
    resume_s: Duration = Field(1.0, description="Seconds a suspended simulated VM takes to resume.")
    stop_s: Duration = Field(1.0, description="Seconds a simulated VM takes to stop or suspend.")
    heartbeat_interval: Duration = Field(
        2.0, description="Heartbeat period of the simulated agents."
    )
    job_duration: Duration = Field(2.0, description="How long a demo job runs on its runner.")
    redis_url: str = Field(
        "",
        description=(
            "Redis holding the simulated MIG; empty: the jobs store. A separate one keeps "
            "the simulated cloud out of the controller's state (it survives a FLUSHALL)."
        ),
    )


@dataclass(frozen=True)
class Requirement:
    """A setting that must be non-empty, and when (read by the validator and the example file)."""

    path: tuple[str, ...]
    when: str
    applies: Callable[[Settings], bool]
    satisfied: Callable[[Settings], bool] | None = None


def _get(settings: BaseModel, path: tuple[str, ...]) -> Any:
    node: Any = settings
    for part in path:
        node = getattr(node, part)
    return node


REQUIREMENTS: tuple[Requirement, ...] = (
    *(
        Requirement(
            ("gcp", key), "vm_manager.provider is gce", lambda s: s.vm_manager.provider == "gce"
        )
        for key in ("project_id", "zone", "mig_name")
    ),
    Requirement(("github_app", "app_id"), "always", lambda s: True),
    Requirement(
        ("github_app", "private_key_path"),
        "github_app.private_key is empty",
        lambda s: True,
        lambda s: bool(s.github_app.private_key or s.github_app.private_key_path),
    ),
    *(
        Requirement(
            ("pubsub", key), "pubsub.source is pubsub", lambda s: s.pubsub.source == "pubsub"
        )
        for key in ("project_id", "subscription")
    ),
    Requirement(
        ("server", "agent_token"),
        "server.auth_mode is token",
        lambda s: s.server.auth_mode == "token",
    ),
)


class Settings(BaseSettings):
    """The whole controller configuration, one tree."""

    model_config = SettingsConfigDict(extra="forbid")

    pool: PoolSettings
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    vm_manager: VmManagerSettings = Field(default_factory=VmManagerSettings)
    gcp: GcpSettings = Field(default_factory=GcpSettings)
    github_app: GithubAppSettings = Field(default_factory=GithubAppSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    pubsub: PubsubSettings = Field(default_factory=PubsubSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    sim: SimSettings = Field(default_factory=SimSettings)

    @model_validator(mode="after")
    def _required_by_mode(self) -> Settings:
        missing = [
            ".".join(r.path)
            for r in REQUIREMENTS
            if r.applies(self) and not (r.satisfied(self) if r.satisfied else _get(self, r.path))
        ]
        if missing:
            raise PydanticCustomError(
                "missing_required",
                "missing required settings: {paths}",
                {"paths": ", ".join(missing)},
            )
        vm = self.vm_manager
        if vm.min_ready_vms > vm.max_vms:
            raise PydanticCustomError(
                "conflict",
                "vm_manager.min_ready_vms ({low}) must not exceed vm_manager.max_vms ({high})",
                {"low": vm.min_ready_vms, "high": vm.max_vms},
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvSource(settings_cls), _YamlSource(settings_cls))


# Seed env names that do not follow CONTROLLER_<SECTION>_<KEY>.
ALIASES: dict[str, tuple[str, ...]] = {
    "GITHUB_APP_ID": ("github_app", "app_id"),
    "GITHUB_APP_PRIVATE_KEY_PATH": ("github_app", "private_key_path"),
    "GITHUB_APP_PRIVATE_KEY": ("github_app", "private_key"),
    "GITHUB_APP_INSTALLATION_ID": ("github_app", "installation_id"),
    # The seed's "minimum required" block; the section is github_app, the key app_id.
    "CONTROLLER_GITHUB_APP_ID": ("github_app", "app_id"),
    "REDIS_JOBS_HOST": ("redis", "jobs", "host"),
    "REDIS_JOBS_PORT": ("redis", "jobs", "port"),
    "REDIS_JOBS_PASSWORD": ("redis", "jobs", "password"),
    "REDIS_VM_HOST": ("redis", "vm_status", "host"),
    "REDIS_VM_PORT": ("redis", "vm_status", "port"),
    "REDIS_VM_PASSWORD": ("redis", "vm_status", "password"),
    "CONTROLLER_REDIS_VM_HOST": ("redis", "vm_status", "host"),
    "CONTROLLER_REDIS_VM_PORT": ("redis", "vm_status", "port"),
    "CONTROLLER_REDIS_VM_PASSWORD": ("redis", "vm_status", "password"),
    "PUBSUB_PROJECT_ID": ("pubsub", "project_id"),
    "PUBSUB_SUBSCRIPTION": ("pubsub", "subscription"),
    "PUBSUB_EMULATOR_HOST": ("pubsub", "emulator_host"),
    # The seed's optional block names the section "log", not "logging".
    "CONTROLLER_LOG_LEVEL": ("logging", "level"),
    "CONTROLLER_LOG_FORMAT": ("logging", "format"),
    "FLOWER_BASIC_AUTH": ("flower", "basic_auth"),
    "GITHUB_WEBHOOK_SECRET": ("server", "webhook_secret"),
}

# YAML keys accepted for a canonical key (the seed shows no layout for these sections).
YAML_ALIASES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("redis", "vm"): ("redis", "vm_status"),
    ("log",): ("logging",),
}


def leaves(
    model: type[BaseModel] | None = None, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf setting of the tree (depth first, declaration order) with its field info."""
    for name, field in (model or Settings).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaves(ann, (*prefix, name))
        else:
            yield (*prefix, name), field


def env_names() -> dict[str, tuple[str, ...]]:
    """Every env var the settings read, mapped to its path in the tree."""
    names = {"CONTROLLER_" + "_".join(path).upper(): path for path, _ in leaves()}
    names.update(ALIASES)
    return names


def _env_rank(name: str, path: tuple[str, ...]) -> int:
    """Which env name wins for one path: a seed CONTROLLER_ name > the generated
    CONTROLLER_<SECTION>_<KEY> > a bare seed name."""
    if not name.startswith("CONTROLLER_"):
        return 0
    return 2 if name in ALIASES else 1


def env_hint(path: tuple[str, ...]) -> str:
    """The env vars that set a path, for error messages (strongest first)."""
    names = [k for k, v in env_names().items() if v == path]
    return " or ".join(sorted(names, key=lambda n: (-_env_rank(n, path), n)))


def _field(path: tuple[str, ...]) -> FieldInfo | None:
    return dict(leaves()).get(path)


def _is_secret(path: tuple[str, ...]) -> bool:
    field = _field(path)
    return field is not None and field.repr is False


class _EnvSource(PydanticBaseSettingsSource):
    def get_field_value(
        self, field: Any, field_name: str
    ) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fields = dict(leaves())
        ordered = sorted(env_names().items(), key=lambda kv: _env_rank(*kv))
        for name, path in ordered:
            if name not in os.environ:
                continue
            value: Any = os.environ[name]
            ann = fields[path].annotation
            if value == "" and ann is not str:
                continue  # an empty ${VAR:-} in a deploy template means "not set" for non-strings
            if ann == list[str]:
                value = [s.strip() for s in value.split(",") if s.strip()]
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return out


_yaml_data: ContextVar[dict[str, Any]] = ContextVar("migctl_settings_yaml")


class _YamlSource(PydanticBaseSettingsSource):
    """The parsed YAML file of the `load_settings` call in progress (none: no file)."""

    def get_field_value(
        self, field: Any, field_name: str
    ) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _yaml_data.get({})


class ConfigError(Exception):
    """A configuration problem, already phrased for a person (one line per problem)."""


def _where(path: tuple[str, ...]) -> str:
    hint = env_hint(path)
    return ".".join(path) + (f" (env {hint})" if hint else "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(err: ValidationError) -> str:
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(str(p) for p in e["loc"])
        kind = e["type"]
        ctx = e.get("ctx") or {}
        if kind == "missing_required":
            for part in str(ctx["paths"]).split(", "):
                path = tuple(part.split("."))
                when = next(r.when for r in REQUIREMENTS if r.path == path)
                cond = "" if when == "always" else f" when {when}"
                lines.append(
                    f"config error: {_where(path)}: required{cond}, not set "
                    "(set it in the YAML file or the env var)"
                )
            continue
        if kind == "conflict":
            lines.append(
                f"config error: {_where(('vm_manager', 'min_ready_vms'))}: expected at most "
                f"vm_manager.max_vms ({ctx['high']}), got {ctx['low']}"
            )
            continue
        if kind == "missing" and loc and _field(loc) is None:
            # A whole section is missing: name its required leaves.
            for path, field in leaves():
                if path[: len(loc)] == loc and field.is_required():
                    lines.append(f"config error: {_where(path)}: required, not set")
            continue
        # The YAML path as written (list indexes in brackets) and the leaf setting it is in.
        shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        names = tuple(p for p in e["loc"] if isinstance(p, str))
        path = next((names[:n] for n in range(len(names), 0, -1) if _field(names[:n])), names)
        hint = env_hint(path) if _field(path) is not None else ""
        where = (shown or "(top level)") + (f" (env {hint})" if hint else "")
        if kind == "missing":
            msg = "required, not set"
        elif kind == "extra_forbidden":
            msg = "unknown setting (check the spelling and the section it is in)"
        else:
            msg = e["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ")
            msg = msg[:1].lower() + msg[1:]
            if not _is_secret(path):
                msg += f", got {_shown(e['input'])}"
        lines.append(f"config error: {where}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path, origin: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config error: {origin} {path}: cannot read it: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config error: {path}{at}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config error: {path}: expected a YAML mapping of sections (pool:, scheduler:, ...), "
            f"got a {type(data).__name__}"
        )
    for alias, canonical in YAML_ALIASES.items():
        parent: Any = data
        for part in alias[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or alias[-1] not in parent:
            continue
        if canonical[-1] in parent:
            raise ConfigError(
                f"config error: {path}: both {'.'.join(alias)} and {'.'.join(canonical)} are "
                f"set; keep one ({'.'.join(canonical)})"
            )
        parent[canonical[-1]] = parent.pop(alias[-1])
    return data


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load the YAML file (if any; else $MIGCTL_CONFIG) then env. Raises ConfigError."""
    origin = "--config"
    path: str | os.PathLike[str] | None = config_path
    if not path and os.environ.get("MIGCTL_CONFIG"):
        origin, path = "MIGCTL_CONFIG", os.environ["MIGCTL_CONFIG"]
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config error: {origin} {p}: no such file "
                "(copy configs/controller.yaml.example there, or fix the path)"
            )
        data = _read_yaml(p, origin)
    token = _yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _yaml_data.reset(token)

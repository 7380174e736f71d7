"""The one typed settings tree: YAML file (the Go controller's layout) overlaid by env vars.

Loaded once per process at its edge (`load_settings`); everything else receives it.
Both env naming schemes of the seed work: `GITHUB_APP_ID` and `CONTROLLER_GITHUB_APP_ID`,
`REDIS_JOBS_HOST` and `CONTROLLER_REDIS_JOBS_HOST`, and generally `CONTROLLER_<SECTION>_<KEY>`
for every leaf. Env overrides the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Go-style durations ("1s", "5m", "1h30m", "250ms") or plain seconds, as float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30s' or '5m'")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"expected a duration such as '30s', '5m' or '1h30m', got {value!r}")
    return total


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolSettings(_Section):
    id: str = Field(min_length=1, description="Unique pool identifier; namespaces every Redis key and queue.")
    type: str = Field("2vcpu", description="Machine type identifier (2vcpu, 4vcpu, ...).")
    os: str = Field("linux", description="Operating system of the pool's VMs.")
    arch: str = Field("x64", description="CPU architecture of the pool's VMs.")
    labels: list[str] = Field(
        default_factory=lambda: ["self-hosted", "linux", "x64"],
        description="Runner labels every VM of the pool registers with; a job's labels must be a subset.",
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
    poll_interval: Duration = Field(1.0, description="Safety-net sweep interval for queued jobs (assignment is event-driven).")
    assignment_timeout: Duration = Field(300.0, description="An ASSIGNED job whose runner never starts it goes back to the queue after this.")
    max_concurrent_assignments: int = Field(10, ge=1, description="Runner registrations in flight (sent, not yet acked) at once.")
    max_retries: int = Field(3, ge=0, description="Times a job is put back in the queue before it is FAILED.")


class VmManagerSettings(_Section):
    provider: Literal["gce", "sim"] = Field("gce", description="gce = a real MIG; sim = the simulated MIG of the local world.")
    poll_interval: Duration = Field(30.0, description="How often the GCloud sync lists the MIG.")
    heartbeat_timeout: Duration = Field(60.0, description="No heartbeat for this long marks a VM UNHEALTHY.")
    boot_timeout: Duration = Field(600.0, description="A VM still booting or never connected after this is replaced.")
    min_ready_vms: int = Field(2, ge=0, description="Warm pool size: VMs kept READY/IDLE with no job.")
    max_vms: int = Field(50, ge=1, description="Hard limit on VMs in the pool, all states but deleted.")
    idle_timeout: Duration = Field(600.0, description="Stop (idle_action) a VM idle longer than this, above min_ready_vms.")
    max_scale_up_per_minute: int = Field(5, ge=1, description="VMs created or started per minute at most, across workers.")
    drain_timeout: Duration = Field(900.0, description="How long a draining VM may take to finish its job before it is stopped anyway.")


class GcpSettings(_Section):
    project_id: str = Field("", description="GCP project of the MIG.")
    zone: str = Field("", description="Zone of the zonal MIG.")
    mig_name: str = Field("", description="Managed instance group name; instance name = vm_id.")
    api_endpoint: str = Field("", description="Override of the Compute endpoint (tests, private endpoints).")
    credentials_file: str = Field("", description="Service account JSON; empty = Application Default Credentials.")
    anonymous: bool = Field(False, description="Send no credentials (only for a local fake endpoint).")
    api_calls_per_second: float = Field(10.0, gt=0, description="Shared token bucket for Compute API calls across workers.")


class GithubAppSettings(_Section):
    app_id: str = Field("", description="GitHub App ID (or client ID) used as the JWT issuer.")
    private_key_path: str = Field("", description="Path to the App's PEM private key.")
    private_key: str = Field("", description="The App's PEM private key content (alternative to the path).", repr=False)
    installation_id: int | None = Field(None, description="Installation id when jobs do not carry one.")
    base_url: str = Field("https://api.github.com", description="REST base URL; GitHub Enterprise Server: https://HOST/api/v3.")
    web_url: str = Field("https://github.com", description="Base URL runners register against (runner_url).")
    org: str = Field("", description="Organisation whose runners this pool provides (org scope).")
    runner_scope: Literal["org", "repo"] = Field("org", description="Register runners at org or repo level.")
    runner_group: str = Field("", description="Runner group name or numeric id; empty = default group.")
    use_jit: bool = Field(True, description="Hand JIT configs to agents that advertise the 'jit' capability.")


class RedisEndpoint(_Section):
    host: str = Field("localhost", description="Redis host.")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    password: str = Field("", description="Redis password.", repr=False)
    db: int = Field(0, ge=0, description="Redis database number.")
    tls: bool = Field(False, description="Use TLS (rediss://), e.g. Memorystore with in-transit encryption.")

    def url(self, db: int | None = None) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/{self.db if db is None else db}"


class RedisSettings(_Section):
    jobs: RedisEndpoint = Field(default_factory=RedisEndpoint, description="Jobs store (queue, job records, Celery broker).")
    vm_status: RedisEndpoint = Field(default_factory=RedisEndpoint, description="VM status store (VM records, outboxes).")


class PubsubSettings(_Section):
    project_id: str = Field("", description="Project of the job subscription.")
    subscription: str = Field("", description="Subscription the bridge pulls queued-job messages from.")
    topic: str = Field("", description="Topic the webhook ingress publishes to.")
    dead_letter_topic: str = Field("", description="Topic that invalid messages are also published to; empty = Redis only.")
    emulator_host: str = Field("", description="host:port of a Pub/Sub emulator (same as PUBSUB_EMULATOR_HOST).")
    max_messages: int = Field(100, ge=1, description="Flow control: messages outstanding in the bridge at once.")
    source: Literal["pubsub", "local"] = Field("pubsub", description="local = a Redis list job source (the local world without the emulator).")


class ServerSettings(_Section):
    grpc_port: int = Field(50051, ge=1, le=65535, description="Gateway gRPC port for MIGlet streams.")
    http_port: int = Field(8080, ge=1, le=65535, description="HTTP port for /health, /ready, /stats, /metrics, the admin API.")
    webhook_port: int = Field(8090, ge=1, le=65535, description="Port of the optional GitHub webhook ingress.")
    bind: str = Field("0.0.0.0", description="Address the servers listen on.")
    auth_mode: Literal["none", "token", "gce-identity"] = Field("none", description="How agents authenticate to the gateway.")
    agent_token: str = Field("", description="Bearer token agents present in auth_mode=token.", repr=False)
    identity_audience: str = Field("", description="Audience of GCE identity tokens in auth_mode=gce-identity.")
    tls_cert_file: str = Field("", description="Gateway TLS certificate (PEM); empty = plaintext.")
    tls_key_file: str = Field("", description="Gateway TLS private key (PEM).")
    tls_client_ca_file: str = Field("", description="CA for client certificates; set = mTLS required.")
    admin_token: str = Field("", description="Bearer token required by admin API writes (drain, cancel).", repr=False)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted from an agent.")


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "warn", "error"] = Field("info", description="Log level.")
    format: Literal["json", "console", "text"] = Field("json", description="json for machines, console for people.")


class FlowerSettings(_Section):
    basic_auth: str = Field("", description="user:password for Flower; required unless FLOWER_UNAUTHENTICATED_API is set.", repr=False)
    port: int = Field(5555, ge=1, le=65535, description="Flower port.")


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

    @model_validator(mode="after")
    def _required_by_mode(self) -> Settings:
        missing: list[str] = []
        if self.vm_manager.provider == "gce":
            missing += [f"gcp.{k}" for k in ("project_id", "zone", "mig_name") if not getattr(self.gcp, k)]
        if not self.github_app.app_id:
            missing.append("github_app.app_id")
        if not (self.github_app.private_key or self.github_app.private_key_path):
            missing.append("github_app.private_key_path")
        if self.pubsub.source == "pubsub":
            missing += [f"pubsub.{k}" for k in ("project_id", "subscription") if not getattr(self.pubsub, k)]
        if self.server.auth_mode == "token" and not self.server.agent_token:
            missing.append("server.agent_token")
        if missing:
            raise ValueError("missing required: " + ", ".join(missing))
        if self.vm_manager.min_ready_vms > self.vm_manager.max_vms:
            raise ValueError("vm_manager.min_ready_vms must not exceed vm_manager.max_vms")
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
}


def env_names() -> dict[str, tuple[str, ...]]:
    """Every env var the settings read, mapped to its path in the tree."""
    names: dict[str, tuple[str, ...]] = {}

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, (*prefix, name))
            else:
                path = (*prefix, name)
                names["CONTROLLER_" + "_".join(path).upper()] = path

    walk(Settings, ())
    names.update(ALIASES)
    return names


def env_hint(path: tuple[str, ...]) -> str:
    """The env vars that set a path, for error messages."""
    return " or ".join(sorted((k for k, v in env_names().items() if v == path), key=len))


class _EnvSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # Prefixed names win over bare seed aliases when both are set.
        for name, path in sorted(env_names().items(), key=lambda kv: kv[0].startswith("CONTROLLER_")):
            if name not in os.environ:
                continue
            value: Any = os.environ[name]
            if path == ("pool", "labels"):
                value = [s.strip() for s in value.split(",") if s.strip()]
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return out


class _YamlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        data = yaml.safe_load(self.path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: expected a YAML mapping at the top level")
        return data


class ConfigError(Exception):
    """A configuration problem, already phrased for a person (one line per problem)."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = tuple(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if path and e["type"] == "missing" and path == ("pool",):
            path = ("pool", "id")
        if path:
            hint = env_hint(path)
            where = ".".join(path) + (f" (env {hint})" if hint else "")
            lines.append(f"config error: {where}: {msg}")
        else:
            for part in msg.removeprefix("missing required: ").split(", ") if msg.startswith("missing required") else [msg]:
                hint = env_hint(tuple(part.split(".")))
                lines.append(
                    f"config error: {part}: required" + (f" (set it in the YAML or env {hint})" if hint else "")
                    if msg.startswith("missing required")
                    else f"config error: {part}"
                )
    return "\n".join(lines)


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load the YAML file (if any; else $MIGCTL_CONFIG) then env. Raises ConfigError."""
    path = config_path or os.environ.get("MIGCTL_CONFIG") or None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: --config {p}: no such file")
        _YamlSource.path = p
    else:
        _YamlSource.path = None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path}: not valid YAML: {exc}") from None
    finally:
        _YamlSource.path = None

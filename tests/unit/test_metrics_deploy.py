"""deploy/: the Kubernetes manifests and the Grafana dashboard agree with the package.

Read as files (no cluster): every YAML parses, every container runs a command that exists
(a [project.scripts] entry point or `celery -A migctl <worker|beat|flower>`), one beat
per pool, config from the ConfigMap (and it loads), secrets only from the Secret, and the
dashboard queries only metrics the collector exposes.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from migctl.metrics import HISTOGRAMS, METRIC_NAMES
from migctl.settings import env_names, load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
DASHBOARD = REPO / "deploy" / "grafana" / "migctl.json"
CELERY_COMMANDS = {"worker", "beat", "flower"}
SECRET = re.compile(r"PASSWORD|PRIVATE_KEY|TOKEN|SECRET|BASIC_AUTH|CREDENTIALS")
OTHER_ENV = {"MIGCTL_CONFIG", "FLOWER_ADDRESS", "FLOWER_PORT", "GOOGLE_APPLICATION_CREDENTIALS"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def everything() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) for d in documents(p)]


def of_kind(kind: str, under: str = "base") -> list[dict[str, Any]]:
    return [d for p, d in everything() if d["kind"] == kind and p.parent.name == under]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in [*container.get("command", []), *container.get("args", [])]]


def scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def procfile() -> dict[str, str]:
    lines = (REPO / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


# -- manifests ----------------------------------------------------------------------------


def test_every_yaml_parses_into_named_objects() -> None:
    found = everything()
    assert len(found) >= 12
    for path, doc in found:
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path


@pytest.mark.parametrize("directory", ["base", "pool-4vcpu"])
def test_kustomizations_list_files_that_exist(directory: str) -> None:
    [kustomization] = documents(K8S / directory / "kustomization.yaml")
    for entry in kustomization.get("resources", []):
        assert (K8S / directory / entry).exists(), entry
    for patch in kustomization.get("patches", []):
        assert (K8S / directory / patch["path"]).is_file(), patch
    # The Secret template is never applied by kustomize (it would overwrite real values).
    assert "secret.example.yaml" not in str(kustomization)


def test_every_command_exists() -> None:
    deployments = of_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "migctl-worker",
        "migctl-beat",
        "migctl-gateway",
        "migctl-bridge",
        "migctl-flower",
    }
    installed = scripts()
    for deployment in deployments:
        for container in containers(deployment):
            args = argv(container)
            assert args, f"{deployment['metadata']['name']}: no command"
            if args[0] == "celery":
                assert args[1:3] == ["-A", "migctl"], args
                assert args[3] in CELERY_COMMANDS, args
            else:
                assert args[0] in installed, f"{args[0]} is not in [project.scripts]"


def test_commands_match_the_procfile() -> None:
    processes = {name: shlex.split(cmd) for name, cmd in procfile().items()}
    for deployment in of_kind("Deployment"):
        name = deployment["metadata"]["name"].removeprefix("migctl-")
        [container] = containers(deployment)
        args = argv(container)
        assert args[: len(processes[name])] == processes[name], (name, args)


def test_one_beat_per_pool_and_the_rest_scalable() -> None:
    by_name = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    beat = by_name["migctl-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert by_name["migctl-worker"]["spec"]["replicas"] >= 2
    assert by_name["migctl-gateway"]["spec"]["replicas"] >= 2
    # A second pool is an overlay of the whole base: its own beat, under its own name.
    [overlay] = documents(K8S / "pool-4vcpu" / "kustomization.yaml")
    assert overlay["resources"] == ["../base"] and overlay["nameSuffix"]


def test_config_comes_from_the_configmap_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [*env_names(), "MIGCTL_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    maps = [*of_kind("ConfigMap"), *of_kind("ConfigMap", "pool-4vcpu")]
    assert {m["metadata"]["name"] for m in maps} == {"migctl-config"}
    pools = set()
    for config_map in maps:
        text = config_map["data"]["controller.yaml"]
        path = tmp_path / "controller.yaml"
        path.write_text(text)
        settings = load_settings(path)
        pools.add(settings.pool.id)
        assert not settings.redis.jobs.password and not settings.server.admin_token
        assert not settings.github_app.private_key and not settings.flower.basic_auth
        assert settings.github_app.private_key_path.startswith("/var/run/secrets/migctl/")
    assert pools == {"pool-2vcpu-linux", "pool-4vcpu-linux"}
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "migctl-config"
        assert volumes["github-app-key"]["secret"]["secretName"] == "migctl-secrets"
        [container] = containers(deployment)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/migctl"] == "config"
        assert mounts["/var/run/secrets/migctl"] == "github-app-key"
        env = {e["name"]: e for e in container["env"]}
        assert env["MIGCTL_CONFIG"]["value"] == "/etc/migctl/controller.yaml"


def test_env_names_exist_and_secrets_come_from_the_secret() -> None:
    known = set(env_names()) | OTHER_ENV
    [secret] = documents(K8S / "secret.example.yaml")
    keys = set(secret["stringData"])
    for deployment in of_kind("Deployment"):
        for container in containers(deployment):
            for entry in container.get("env", []):
                name = entry["name"]
                assert name in known or name.startswith("FLOWER_"), name
                if SECRET.search(name):
                    ref = entry["valueFrom"]["secretKeyRef"]
                    assert "value" not in entry and ref["name"] == "migctl-secrets", name
                    assert ref["key"] in keys, name


def test_services_and_probes_point_at_real_ports_and_paths() -> None:
    ports = {}
    for deployment in of_kind("Deployment"):
        for container in containers(deployment):
            for port in container.get("ports", []):
                ports[(deployment["metadata"]["name"], port["name"])] = port["containerPort"]
            for probe in ("livenessProbe", "readinessProbe"):
                if http := container.get(probe, {}).get("httpGet"):
                    assert http["path"] in ("/health", "/healthcheck"), http
    assert ports[("migctl-gateway", "grpc")] == 50051
    assert ports[("migctl-gateway", "http")] == 8080
    for service in of_kind("Service"):
        target = service["spec"]["selector"]["app.kubernetes.io/name"]
        for port in service["spec"]["ports"]:
            assert (target, port["targetPort"]) in ports, (service["metadata"]["name"], port)
    names = {s["metadata"]["name"]: s for s in of_kind("Service")}
    assert {p["name"] for p in names["migctl-gateway"]["spec"]["ports"]} == {"grpc", "http"}
    assert [p["name"] for p in names["migctl-gateway-agents"]["spec"]["ports"]] == ["grpc"]


def test_containers_are_hardened() -> None:
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in containers(deployment):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert container["resources"]["limits"]["memory"]


# -- the Grafana dashboard ------------------------------------------------------------------


def exposed_series() -> set[str]:
    names = set(METRIC_NAMES)
    for name in METRIC_NAMES:
        names.add(f"{name}_total")
    for name in HISTOGRAMS:
        names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


PROMQL_WORDS = {
    "max",
    "min",
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "le",
    "state",
    "pool",
    "kind",
    "resource",
    "outcome",
    "gateway",
}


def test_dashboard_queries_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "pool"}
    exprs = [
        t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p.get("targets", [])
    ]
    assert len(exprs) >= 20
    series = exposed_series()
    used = set()
    for expr in exprs:
        assert 'pool="$pool"' in expr, expr
        bare = re.sub(r'\{[^}]*\}|\[[^\]]*\]|"[^"]*"', " ", expr)
        for word in re.findall(r"[a-z_][a-z0-9_]*", bare):
            if word not in PROMQL_WORDS:
                assert word in series, f"{word} (in {expr}) is not a metric migctl exposes"
                used.add(word)
    for seed in ("queue_length", "assigned_jobs", "started_vms", "created_vms", "connected_vms"):
        assert seed in used, seed
    assert "controller_job_wait_seconds_bucket" in used
    assert "controller_assignment_duration_seconds_bucket" in used


def test_dashboard_panels_do_not_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells
    assert len({p["id"] for p in panels}) == len(panels)

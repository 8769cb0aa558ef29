"""The container image recipe and the Kubernetes manifests: linted, rendered, validated offline, consistent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.config import Config
from tests.support import ROOT, Segrelay

OVERLAYS = ["single", "scaled"]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is missing: pip install -e '.[dev]' provides it"
    return path


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def test_dockerfile_is_clean_under_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_numeric_non_root_user_with_exec_form_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage
    assert "USER 10001:10001" in text
    assert 'ENTRYPOINT ["segrelay", "serve"]' in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    final = text.split("FROM ")[-1]
    assert "pip install" not in final and "apt-get" not in final  # no build tools or caches in the image
    assert (ROOT / ".dockerignore").read_text().startswith("*\n")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(overlay)))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_invariants(overlay: str, server: Segrelay) -> None:
    docs = render(overlay)
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()
    assert ports["http"] == 8080 and "8080" in container["args"]

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(server.url + path).status_code == 200, f"{probe} {path} does not answer 200"
        assert container[probe]["httpGet"]["port"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    config = one(docs, "ConfigMap", "segrelay-config")["data"]
    drain = int(config["SEGRELAY_DRAIN_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    uvicorn_graceful = 5  # timeout_graceful_shutdown in app/serve_commands.py
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + uvicorn_graceful + drain

    security, pod_security = container["securityContext"], pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] and pod_security["runAsUser"] > 0
    assert security["readOnlyRootFilesystem"] and security["capabilities"]["drop"] == ["ALL"]
    assert not security["allowPrivilegeEscalation"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["spec"]["topologySpreadConstraints"]
    env_from = container["envFrom"]
    assert {"secretRef": {"name": "segrelay-secrets"}} in env_from

    ingress = one(docs, "Ingress")
    assert ingress["spec"]["tls"] and "cert-manager.io/cluster-issuer" in ingress["metadata"]["annotations"]
    assert [p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]] == ["/segment"]

    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_single_overlay_is_one_sqlite_writer_on_a_volume() -> None:
    docs = render("single")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert "emptyDir" not in volumes["data"]
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
    assert one(docs, "ConfigMap", "segrelay-config")["data"]["SEGRELAY_STORE"] == "sqlite:////data/segrelay.db"


def test_scaled_overlay_autoscales_replicas_on_redis() -> None:
    docs = render("scaled")
    hpa, deployment = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    assert hpa["spec"]["minReplicas"] >= 3 and hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The real Redis URL (with its password) comes from the Secret, listed after the ConfigMap so it wins; the
    # ConfigMap's placeholder keeps a forgotten Secret from silently falling back to a pod-local SQLite file.
    assert one(docs, "ConfigMap", "segrelay-config")["data"]["SEGRELAY_STORE"].startswith("redis://")
    env_from = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert [next(iter(e)) for e in env_from] == ["configMapRef", "secretRef"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0



def test_the_configmap_is_a_configuration_segrelay_accepts() -> None:
    data = yaml.safe_load((ROOT / "k8s" / "base" / "configmap.yaml").read_text())["data"]
    config = Config.from_env({**data, "SEGRELAY_SECRET": "k" * 32, "SEGRELAY_STORE": "redis://redis:6379/0"})
    assert config.delivery_processes == int(data["SEGRELAY_DELIVERY_PROCESSES"])
    assert config.http_processes == int(data["SEGRELAY_HTTP_PROCESSES"])
    code = "\n".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    assert all(name in code for name in data), "the ConfigMap sets a variable segrelay does not read"


@pytest.mark.parametrize("overlay", ["single", "scaled"])
def test_overlays_carry_the_alerts_and_the_dashboard(overlay: str) -> None:
    docs = render(overlay)
    rules = one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"SegrelayCircuitOpen", "SegrelayDeadLetters", "SegrelayNoDeliveryProgress"}
    dashboard = one(docs, "ConfigMap", "segrelay-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["dashboard.json"])["uid"] == "segrelay"

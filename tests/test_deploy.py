"""The Helm chart renders with the real Helm engine, lints strictly, and every manifest validates against
Kubernetes 1.30; the Dockerfiles are checked for what can be checked without a Docker engine."""

from __future__ import annotations

import re

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "deploy/helm/k5serve"


def render(values: dict | None = None) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values or {}, name="k5", namespace="k5serve")
    docs = []
    for name, text in out.items():
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_chart_lints_strictly():
    report = helm_python.lint(str(CHART), strict=True, kube_version="v1.30.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values",
    [
        {},
        {
            "workers": [
                {
                    "name": "lite",
                    "model": "kandinsky-5.0-t2v-lite-sft-5s",
                    "replicas": 2,
                    "gpu": {"count": 1},
                    "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "64Gi"}},
                    "terminationGracePeriodSeconds": 600,
                },
                {
                    "name": "pro-i2v",
                    "model": "kandinsky-5.0-i2v-pro-sft-5s",
                    "replicas": 1,
                    "gpu": {"count": 2},
                    "resources": {"requests": {"cpu": "8"}, "limits": {"memory": "128Gi"}},
                    "terminationGracePeriodSeconds": 1800,
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                },
            ]
        },
    ],
    ids=["default", "two-pools"],
)
def test_manifests_validate_and_carry_what_matters(values):
    docs = render(values)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    workers = [d for n, d in deployments.items() if "-worker-" in n]
    assert len(workers) == len(values.get("workers", [None]))
    for dep in deployments.values():
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            for env in container["env"]:
                # Credentials come from Secrets, never inline values.
                if "SECRET" in env["name"] or "KEY" in env["name"]:
                    assert "valueFrom" in env and "value" not in env, env
    for dep, spec in zip(workers, values.get("workers") or [{"gpu": {"count": 1}}], strict=True):
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == spec["gpu"]["count"]
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 600
    gateway = deployments["k5-k5serve-gateway"]["spec"]["template"]["spec"]["containers"][0]
    served = next(e["value"] for e in gateway["env"] if e["name"] == "K5_SERVED_MODELS")
    worker_models = [
        next(e["value"] for e in w["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "K5_MODEL")
        for w in workers
    ]
    # The gateway accepts jobs for every pool's model, also while a pool is scaled to zero.
    assert served.split(",") == worker_models


@pytest.mark.parametrize("dockerfile", ["gateway.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_pin_bases_run_as_non_root_and_start_k5serve(dockerfile):
    lines = (ROOT / "docker" / dockerfile).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert ":" in base and not base.endswith(":latest"), base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["k5serve"]' in text
    # What the image copies exists, and the entry point is the package's console script.
    for src in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert (ROOT / src).exists(), src
    assert 'k5serve = "service.cli:main"' in (ROOT / "pyproject.toml").read_text()
    if dockerfile.startswith("gateway"):
        assert "torch" not in text and "[worker]" not in text

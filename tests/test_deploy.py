"""The Helm chart renders with the real Helm engine, lints strictly, and every manifest validates against
Kubernetes 1.30; the Dockerfiles, the compose file and the Grafana dashboard are checked for what can be checked
without a Docker engine or a cluster."""

from __future__ import annotations

import json
import re

import helm_python
import kubernetes_validate
import pytest
import yaml

from service.cli import main as cli
from service.console.localstack import LISTPACK
from service.contract import keys
from service.contract.models import CATALOGUE
from service.contract.settings import Settings
from tests.conftest import ROOT

CHART = ROOT / "deploy/helm/k5serve"
DOCKER = ROOT / "docker"
K8S = "1.30.0"
# Custom resources: kubernetes-validate has no schema for them, so their essential fields are asserted instead.
CRDS = {"keda.sh/v1alpha1": {"ScaledObject", "TriggerAuthentication"}, "monitoring.coreos.com/v1": {"ServiceMonitor"}}
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

LITE, LITE_ID = "Kandinsky-5.0-T2V-Lite-distilled16steps-5s", "kandinsky-5.0-t2v-lite-distilled16steps-5s"
_POOL = {"resources": {"requests": {"cpu": "8"}, "limits": {"memory": "128Gi"}}}
VALUE_SETS = {
    "default": {},
    "keda-scale-to-zero": {
        "keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 3},
        "workers": [
            {"name": "lite", "model": "kandinsky-5.0-t2v-lite-sft-5s", "gpu": {"count": 1}},
            # Opts out of the global KEDA default: a fixed pool next to a scaled one.
            {"name": "pro", "model": "kandinsky-5.0-t2v-pro-sft-5s", "replicas": 2, "gpu": {"count": 1}}
            | {"autoscaling": {"enabled": False}},
        ],
        "gateway": {"autoscaling": {"enabled": True}, "ingress": {"enabled": True, "hosts": ["videos.example.com"]}},
        "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    },
    "external-redis": {
        "redis": {"bundled": False, "existingSecret": {"name": "k5-redis", "key": "url"}},
        # A hub repo id as the model: jobs are queued (and KEDA watches) under its catalogue id.
        "workers": [
            {"name": "lite", "model": f"kandinskylab/{LITE}-Diffusers", "modelId": LITE_ID, "gpu": {"count": 1}}
        ],
        "keda": {"enabled": True, "redis": {"authSecret": {"name": "k5-redis", "addressKey": "address"}}},
        "webhooks": {"enabled": False},
    },
    "two-pools": {
        "workers": [
            {"name": "lite", "model": "kandinsky-5.0-t2v-lite-sft-10s", "replicas": 2, "gpu": {"count": 1}} | _POOL,
            {
                "name": "pro-i2v",
                "model": "/models/checkpoints/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers",
                "modelId": "kandinsky-5.0-i2v-pro-sft-5s",
                "replicas": 1,
                "gpu": {"count": 1, "type": "NVIDIA-H200"},
                "terminationGracePeriodSeconds": 1800,
                "nodeSelector": {"pool": "video"},
            }
            | _POOL,
        ],
        "modelCache": {"type": "hostPath"},
        "compileCache": {"type": "emptyDir"},
    },
}


def documented_example() -> dict:
    """The values example of the "Deploy on Kubernetes" docs, so the docs cannot drift from the chart."""
    for doc in (ROOT / "README.md",):
        if doc.exists() and (m := re.search(r"```yaml\n# values-prod.yaml\n(.*?)```", doc.read_text(), re.S)):
            return yaml.safe_load(m.group(1))
    raise AssertionError("the Deploy on Kubernetes docs lost their values example")


VALUE_SETS["documented-example"] = documented_example()


def render(values: dict) -> list[dict]:
    out = helm_python.Chart.load(str(CHART)).render(values, name="k5", namespace="k5serve")
    return [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pools(values: dict) -> list[dict]:
    """The pools a value set declares, with the chart's per-pool defaults filled in."""
    keda = {**DEFAULTS["keda"], **values.get("keda", {})}
    out = []
    for pool in values.get("workers", DEFAULTS["workers"]):
        scaled = pool.get("autoscaling", {}).get("enabled", keda["enabled"])
        out.append(pool | {"modelId": pool.get("modelId") or pool["model"], "scaled": scaled})
    return out


@pytest.fixture(params=list(VALUE_SETS), scope="module")
def case(request) -> tuple[dict, list[dict]]:
    values = VALUE_SETS[request.param]
    return values, render(values)


def test_chart_lints_strictly(case):
    values, _ = case
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{K8S}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []


def test_manifests_validate(case):
    _, docs = case
    for doc in docs:
        if doc["kind"] in CRDS.get(doc["apiVersion"], ()):
            continue  # asserted field by field in the KEDA and ServiceMonitor tests
        kubernetes_validate.validate(doc, K8S, strict=True)
    # The chart only references Secrets; it never carries one.
    assert not of_kind(docs, "Secret")


def test_workers_get_gpus_probes_and_a_grace_period_covering_a_job(case):
    values, docs = case
    deployments = of_kind(docs, "Deployment")
    job_timeout = values.get("jobTimeoutSeconds", DEFAULTS["jobTimeoutSeconds"])
    for pool in pools(values):
        dep = deployments[f"k5-k5serve-worker-{pool['name']}"]
        pod = dep["spec"]["template"]["spec"]
        (worker,) = pod["containers"]
        env = env_of(worker)
        assert worker["args"] == ["worker"] and env["K5_MODEL"]["value"] == pool["model"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == pool["gpu"]["count"]
        if pool["gpu"].get("type"):
            assert pod["nodeSelector"]["nvidia.com/gpu.product"] == pool["gpu"]["type"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", [])
        # Probes on the worker's own port (on the pod IP, not loopback); the startup budget covers a model download
        # and the compile warm-up.
        port = int(env["K5_METRICS_PORT"]["value"])
        assert env["K5_HOST"]["value"] == "0.0.0.0"
        assert worker["ports"] == [{"name": "metrics", "containerPort": port}]
        startup, ready, live = worker["startupProbe"], worker["readinessProbe"], worker["livenessProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60 * 60
        paths = [(p["httpGet"]["path"], p["httpGet"]["port"]) for p in (startup, ready, live)]
        assert paths == [("/readyz", "metrics"), ("/readyz", "metrics"), ("/healthz", "metrics")]
        # SIGTERM: the worker finishes its job within K5_SHUTDOWN_GRACE_S, a bit below the pod's grace period.
        grace = pod["terminationGracePeriodSeconds"]
        shutdown = float(env["K5_SHUTDOWN_GRACE_S"]["value"])
        assert grace == pool.get("terminationGracePeriodSeconds", grace) and 0 < grace - shutdown <= 120
        assert job_timeout == int(env["K5_JOB_TIMEOUT_S"]["value"])
        if "terminationGracePeriodSeconds" not in pool:
            # With checkpoints (the default) a stopped job resumes elsewhere: seconds, not the job's bound.
            checkpoints = pool.get("checkpoints", {}).get("enabled", True)
            want = DEFAULTS["workerDefaults"]["checkpoints"]["terminationGracePeriodSeconds"] if checkpoints else None
            assert grace == want if checkpoints else grace >= job_timeout
            assert env["K5_CHECKPOINT_ON_SHUTDOWN"]["value"] == str(checkpoints).lower()
        # Both caches are volumes; the compile cache is where TorchInductor writes.
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        assert env["TORCHINDUCTOR_CACHE_DIR"]["value"].startswith("/cache/") and mounts["/cache"] == "compile-cache"
        assert env["HF_HOME"]["value"] == "/models" and mounts["/models"] == "models"
        # KEDA owns the replica count of a scaled pool.
        assert ("replicas" in dep["spec"]) == (not pool["scaled"])


def test_pods_run_locked_down_and_take_secrets_from_secret_refs(case):
    values, docs = case
    workloads = [*of_kind(docs, "Deployment").values(), *of_kind(docs, "StatefulSet").values()]
    secretish = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY")
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        # A token only where a worker patches its own pod's deletion cost (the tests further down).
        worker = workload["metadata"]["name"].startswith("k5-k5serve-worker-")
        assert pod["automountServiceAccountToken"] is (worker and pod_cost(values))
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            for name, env in env_of(container).items():
                if secretish.search(name):
                    assert "secretKeyRef" in env.get("valueFrom", {}) and "value" not in env, env
            assert "K5_API_KEYS" not in env_of(container), "API keys come from a mounted Secret file"
    deployments = of_kind(docs, "Deployment")
    for component in ("gateway", "webhooks"):
        if dep := deployments.get(f"k5-k5serve-{component}"):
            (container,) = dep["spec"]["template"]["spec"]["containers"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    gateway_pod = deployments["k5-k5serve-gateway"]["spec"]["template"]["spec"]
    gateway = env_of(gateway_pod["containers"][0])
    assert gateway["K5_ALLOW_ANONYMOUS"]["value"] == "false"
    # K5_API_KEYS_FILE names the file the API-keys Secret is mounted as.
    keys_file = gateway["K5_API_KEYS_FILE"]["value"]
    mount = next(m for m in gateway_pod["containers"][0]["volumeMounts"] if keys_file.startswith(m["mountPath"]))
    volume = next(v for v in gateway_pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == DEFAULTS["auth"]["apiKeysSecret"]["name"]
    assert f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}" == keys_file
    if webhooks := deployments.get("k5-k5serve-webhooks"):
        (container,) = webhooks["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["webhooks"] and env_of(container)["K5_HOST"]["value"] == "0.0.0.0"
        assert env_of(container)["K5_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "k5serve-webhook"


def test_gateway_accepts_every_pools_model_and_scales_on_cpu(case):
    values, docs = case
    dep = of_kind(docs, "Deployment")["k5-k5serve-gateway"]
    env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
    # The queue-side (catalogue) id of each pool, so a pool at zero still gets jobs queued.
    assert env["K5_SERVED_MODELS"]["value"].split(",") == [p["modelId"] for p in pools(values)]
    assert all(p["modelId"] in CATALOGUE for p in pools(values))
    hpa = of_kind(docs, "HorizontalPodAutoscaler")
    if values.get("gateway", {}).get("autoscaling", {}).get("enabled"):
        assert "replicas" not in dep["spec"]
        assert hpa["k5-k5serve-gateway"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        ingress = values["gateway"]["ingress"]
        scheme = "https" if ingress.get("tlsSecretName") else "http"
        assert env["K5_PUBLIC_URL"]["value"] == f"{scheme}://{ingress['hosts'][0]}"
        assert of_kind(docs, "Ingress")["k5-k5serve-gateway"]["spec"]["rules"][0]["host"] == ingress["hosts"][0]
    else:
        assert not hpa and dep["spec"]["replicas"] == DEFAULTS["gateway"]["replicas"]
    assert of_kind(docs, "PodDisruptionBudget")["k5-k5serve-gateway"]["spec"]["maxUnavailable"] == 1


def test_keda_scales_scaled_pools_on_their_queue(case):
    values, docs = case
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject").values()}
    assert sorted(scaled) == sorted(f"k5-k5serve-worker-{p['name']}" for p in pools(values) if p["scaled"])
    for pool in (p for p in pools(values) if p["scaled"]):
        so = scaled[f"k5-k5serve-worker-{pool['name']}"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] >= 1
        (trigger,) = so["spec"]["triggers"]
        # Waiting plus running: the list the lifecycle keeps per model (service/contract/keys.py), not RQ's.
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == keys.demand(pool["modelId"])
        assert int(trigger["metadata"]["listLength"]) >= 1
        if values.get("redis", {}).get("bundled", True):
            assert trigger["metadata"]["address"] == "k5-k5serve-redis.k5serve.svc:6379"
        else:  # the address and password come from the Secret through a TriggerAuthentication
            auth = of_kind(docs, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
            refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
            assert refs == {"password": ("k5-redis", "password"), "address": ("k5-redis", "address")}
            assert "address" not in trigger["metadata"]


def test_service_monitors_scrape_gateway_workers_and_webhooks(case):
    values, docs = case
    monitors = of_kind(docs, "ServiceMonitor")
    if not values.get("monitoring", {}).get("serviceMonitor", {}).get("enabled"):
        assert not monitors
        return
    services = of_kind(docs, "Service")
    for component, port in {"gateway": "http", "worker": "metrics", "webhooks": "metrics"}.items():
        sm = monitors[f"k5-k5serve-{component}"]
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        assert sm["spec"]["endpoints"] == [{"port": port, "path": "/metrics", "interval": "30s"}]
        # Exactly one Service carries the selected labels and the named port.
        labels = sm["spec"]["selector"]["matchLabels"].items()
        selected = [s for s in services.values() if labels <= s["metadata"]["labels"].items()]
        assert [p["name"] for s in selected for p in s["spec"]["ports"]] == [port]


def test_redis_is_bundled_or_external_and_fenced_by_network_policies(case):
    values, docs = case
    bundled = values.get("redis", {}).get("bundled", True)
    pods = [d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment").values()]
    redis_env = [env_of(c)["K5_REDIS_URL"] for pod in pods for c in pod["containers"]]
    policies = of_kind(docs, "NetworkPolicy")
    components = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p for p in policies.values()}
    if bundled:
        sts = of_kind(docs, "StatefulSet")["k5-k5serve-redis"]
        image = sts["spec"]["template"]["spec"]["containers"][0]["image"]
        assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", image), image
        # The local stack's Redis settings (service/console/localstack.py), a queued job's RQ hash in a listpack.
        args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        assert " ".join(LISTPACK) in " ".join(args), args
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        assert {e["value"] for e in redis_env} == {"redis://k5-k5serve-redis.k5serve.svc:6379/0"}
        # Redis admits this release's pods (and KEDA's namespace when a pool is scaled), nothing else.
        ingress = components["redis"]["spec"]["ingress"]
        assert ingress[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "k5"}}}]
        assert len(ingress) == 1 + any(p["scaled"] for p in pools(values))
        assert components["redis"]["spec"]["egress"] == []
    else:
        assert not of_kind(docs, "StatefulSet") and "redis" not in components
        assert all(e["valueFrom"]["secretKeyRef"] == {"name": "k5-redis", "key": "url"} for e in redis_env)
    # Only the gateway takes traffic from anywhere; workers and webhooks only on their metrics port.
    assert components["gateway"]["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    for name in ("worker", "webhooks"):
        if name in components:
            (rule,) = components[name]["spec"]["ingress"]
            assert rule["ports"] == [{"port": 9400, "protocol": "TCP"}] and rule["from"]
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        dns = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
        assert policy["spec"]["egress"] == [] or dns in policy["spec"]["egress"]


@pytest.mark.parametrize(
    "values",
    [
        {"workers": [{"name": "a", "gpu": {"count": 1}}]},
        {"workers": [{"name": "a", "model": "m", "gpu": {"count": 0}}]},
        {"workers": [{"name": "a", "model": "m", "gpu": {"count": "2"}}]},
        {"workers": [{"name": "a", "model": "m", "gpu": {"count": 2}}]},
        {"workers": [{"name": "Not_A_Name", "model": "m", "gpu": {"count": 1}}]},
        {"image": {"worker": {"repository": "k5", "tag": "latest"}}},
        {"modelCache": {"type": "nfs"}},
        {"gatway": {"replicas": 3}},
    ],
    ids=[
        "no-model",
        "zero-gpus",
        "gpu-count-string",
        "idle-second-gpu",
        "bad-pool-name",
        "latest-tag",
        "unknown-cache",
        "typo",
    ],
)
def test_schema_rejects_invalid_values(values):
    chart = helm_python.Chart.load(str(CHART))
    with pytest.raises(helm_python.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):  # an install validates the same way
        chart.render(values, name="k5", namespace="k5serve")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"redis": {"bundled": False, "url": "redis://:hunter2@redis:6379/0"}}, "must not carry credentials"),
        ({"auth": {"apiKeysSecret": {"name": ""}}}, "auth.apiKeysSecret.name is required"),
        ({"redis": {"bundled": False, "url": "redis://r:6379/0"}, "keda": {"enabled": True}}, "keda.redis.address"),
        (
            {"workers": [{"name": "a", "model": "m", "gpu": {"count": 4}, "parallel": "cfg=2,sp=4"}]},
            "gpu.count is 4 but parallel=cfg=2,sp=4 spans 8 GPUs",
        ),
    ],
    ids=["password-in-redis-url", "no-api-keys", "keda-without-redis-address", "gpus-not-the-layout"],
)
def test_templates_refuse_unsafe_or_incomplete_values(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)


def test_a_parallel_pool_gets_its_gpus_the_layout_and_shared_memory_for_nccl():
    pool = {"name": "pro", "model": "kandinsky-5.0-t2v-pro-sft-5s", "gpu": {"count": 8}, "parallel": "cfg=2,sp=4"}
    docs = render({"workers": [pool, {"name": "lite", "model": "kandinsky-5.0-t2v-lite-sft-5s", "gpu": {"count": 1}}]})
    for doc in docs:
        if doc["kind"] not in CRDS.get(doc["apiVersion"], ()):
            kubernetes_validate.validate(doc, K8S, strict=True)
    deployments = of_kind(docs, "Deployment")
    parallel = deployments["k5-k5serve-worker-pro"]["spec"]["template"]["spec"]
    (worker,) = parallel["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert env_of(worker)["K5_PARALLEL"]["value"] == "cfg=2,sp=4"
    assert Settings(parallel=env_of(worker)["K5_PARALLEL"]["value"]).layout.world == 8
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    shm = {v["name"]: v for v in parallel["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    single = deployments["k5-k5serve-worker-lite"]["spec"]["template"]["spec"]
    assert env_of(single["containers"][0])["K5_PARALLEL"]["value"] == "none"
    assert "dshm" not in {v["name"] for v in single["volumes"]}


def test_every_values_key_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    for n, line in enumerate(lines):
        if re.match(r"^\s*(- )?[\w./-]+:", line) and "#" not in line:
            above = lines[n - 1].strip() if n else ""
            # A key is explained by the comment right above it (or, for a list item's later keys, the item's).
            assert above.startswith("#"), f"values.yaml:{n + 1} {line.strip()!r} has no comment"


def test_every_setting_is_documented():
    """Rule: each K5_* setting has a row in README.md's Configuration table. Settings are read from the code,
    so a new one fails this test until it is documented."""
    readme = (ROOT / "README.md").read_text()
    sections = re.split(r"^## ", readme, flags=re.M)
    docs = "".join(s for s in sections if s.startswith("Configuration"))
    documented = set(re.findall(r"`(K5_[A-Z0-9_]+)`", docs))
    missing = sorted(f"K5_{f.upper()}" for f in Settings.model_fields if f"K5_{f.upper()}" not in documented)
    assert missing == []


# Settings the chart leaves to the operator's env lists, each with why: the worker's speed and sampling choices
# depend on the pool's GPU and model (workerDefaults.env or a pool's env); the rest do not apply in the cluster.
NOT_CHART_VALUES = {
    "K5_API_KEYS": "the keys come from a Secret mounted as K5_API_KEYS_FILE",
    "K5_STORAGE_MIN_FREE_MB": "a local-disk store's bound; the chart stores on S3",
    "K5_KUBE_API_URL": "in a pod the API server is always kubernetes.default.svc; the setting is for tests",
    "K5_COMPILE_CACHE_DIR": "the compile cache volume is set through TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR",
    **dict.fromkeys(
        "K5_ATTENTION_BACKEND K5_COMPILE_BACKEND K5_COMPILE_DYNAMIC K5_COMPILE_MODE K5_COMPILE_TRANSFORMER K5_DEVICE "
        "K5_DTYPE K5_ENHANCE_CACHE K5_ENHANCE_MAX_NEW_TOKENS K5_ENHANCE_PROMPT K5_MAX_SEQUENCE_LENGTH "
        "K5_PROMPT_TEMPLATE K5_SAMPLING_GRID K5_STEP_CACHE K5_STEP_CACHE_INTERVAL K5_STEP_CACHE_MAG_RATIOS "
        "K5_STEP_CACHE_THRESHOLD K5_TEXT_CACHE_SIZE K5_TEXT_ENCODER_PLACEMENT K5_TIMESTEP_PRECISION "
        "K5_VAE_TILING".split(),
        "a worker pool's speed or sampling choice: its env list",
    ),
}


def test_every_setting_an_operator_sets_is_a_chart_value():
    """A new K5_* setting fails this until the chart passes it (values.yaml, the schema, a template) or the table
    above says why not. Optional values are given here, so that each conditional variable renders."""
    values = {
        "storage": {"endpointUrl": "https://s3.example.com"},
        "gateway": {"defaultModel": LITE_ID, "modelAliases": f"sora-2={LITE_ID}", "publicUrl": "https://v.example.com"},
        "webhooks": {"url": "https://hooks.example.com/k5", "allowedHosts": "10.0.0.0/8"},
        "usage": {"labels": {"0123abcd": "acme"}},
    }
    passed = {
        e["name"]
        for d in render(values)
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        for e in c.get("env", [])
    }
    settings = {f"K5_{f.upper()}" for f in Settings.model_fields}
    assert sorted(settings - passed - set(NOT_CHART_VALUES)) == []
    assert sorted(set(NOT_CHART_VALUES) - settings) == []  # the table names only settings that exist
    gateway = env_of(
        of_kind(render({"gateway": {"clients": {"maxConnectionsPerClient": 0}}}), "Deployment")["k5-k5serve-gateway"][
            "spec"
        ]["template"]["spec"]["containers"][0]
    )
    assert gateway["K5_MAX_CONNECTIONS_PER_CLIENT"]["value"] == "0"


def dockerfile(name: str) -> str:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("name", ["gateway.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_pin_bases_run_as_non_root_and_start_k5serve(name):
    text = dockerfile(name)
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert ":" in base and not base.endswith(":latest"), base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["k5serve"]' in text
    # The health check is valid exec form and probes /healthz.
    (check,) = re.findall(r"^HEALTHCHECK .*?CMD\s+(\[.*\])\s*$", text, re.M)
    assert "/healthz" in json.loads(check)[-1]
    # What the image copies exists, and the entry point is the package's console script.
    for src in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.M):
        assert all((ROOT / s).exists() for s in src.split()), src
    assert 'k5serve = "service.cli:main"' in (ROOT / "pyproject.toml").read_text()
    if name.startswith("gateway"):
        assert "torch" not in text and "[worker]" not in text
    else:  # model and compile caches on volumes, CUDA torch from a pinned version
        assert "HF_HOME=/models" in text and "TORCHINDUCTOR_CACHE_DIR=/cache/inductor" in text
        assert 'VOLUME ["/models", "/cache"]' in text and re.search(r"torch==\$\{TORCH_VERSION\}", text)
        assert re.search(r"^FROM nvidia/cuda:[\d.]+-\w*runtime-", text, re.M)
        # Triton compiles its launcher at run time: a C compiler, libc headers and Python.h must be in the image.
        (apt,) = re.findall(r"apt-get install (.*?)(?:&&|$)", text, re.M)
        assert {"gcc", "libc6-dev", "python3-dev"} <= set(apt.split())
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
        for pkg in ("transformers", "accelerate"):  # pinned, so a rebuild does not drift
            arg = f"{pkg.upper()}_VERSION"
            assert re.search(rf"{pkg}==\$\{{{arg}\}}", text) and re.search(rf"ARG {arg}=[\d.]+", text)


def test_compose_runs_the_stack_on_one_machine():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        if "build" in svc:
            assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]) and not svc["image"].endswith(":latest"), name
        assert str(svc.get("user", "")).split(":")[0] not in ("root", "0"), name
    assert re.fullmatch(r"chrislusf/seaweedfs:[\d.]+", services["s3"]["image"])
    assert " ".join(LISTPACK) in " ".join(services["redis"]["command"])
    assert services["s3"]["command"][0] in ("mini", "server")
    assert services["webhooks"]["command"] == ["webhooks"] and services["gateway"]["command"] == ["gateway"]
    assert services["gateway"]["environment"]["K5_ALLOW_ANONYMOUS"] == "false"
    gpu = services["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["profiles"] == ["gpu"] and devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # The cpu profile builds the tiny checkpoints first, then runs a CPU worker for each.
    assert services["tiny-model"]["command"] == ["tiny-model", "/models/tiny"]
    for task in ("t2v", "i2v"):
        svc = services[f"worker-tiny-{task}"]
        assert svc["profiles"] == ["cpu"] and svc["environment"]["K5_DEVICE"] == "cpu"
        assert svc["environment"]["K5_MODEL"] == f"/models/tiny/{task}"
        assert svc["depends_on"]["tiny-model"] == {"condition": "service_completed_successfully"}
    # Every K5_ variable the stack sets is a real setting.
    known = {f"K5_{f.upper()}" for f in Settings.model_fields}
    used = {k for svc in services.values() for k in svc.get("environment", {}) if k.startswith("K5_")}
    assert used <= known, used - known


def test_every_command_the_chart_and_compose_run_exists():
    """Deployment args and compose commands are `k5serve` subcommands (the images' entry point)."""
    docs = [d for values in VALUE_SETS.values() for d in render(values)]
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    chart_commands = {c["args"][0] for pod in pods for c in pod["containers"]}
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    ours = [s for s in compose["services"].values() if s.get("image", "").startswith("k5serve-")]
    compose_commands = {s["command"][0] for s in ours}
    assert chart_commands == {"gateway", "worker", "webhooks"}
    assert compose_commands == {"gateway", "worker", "webhooks", "tiny-model"}
    assert chart_commands | compose_commands <= set(cli.commands)
    # The chart sets only settings the code has (plus the AWS, HF, torch and HOME variables of the libraries).
    known = {f"K5_{f.upper()}" for f in Settings.model_fields}
    chart_env = {e["name"] for pod in pods for c in pod["containers"] for e in c.get("env", [])}
    assert {e for e in chart_env if e.startswith("K5_")} <= known


# The metrics the service exports (service/contract/metrics.py: gateway, workers, webhook delivery).
HISTOGRAMS = {"k5_http_request_duration_seconds", "k5_worker_phase_duration_seconds", "k5_worker_step_duration_seconds"}
METRICS = HISTOGRAMS | set(
    """k5_http_requests_total k5_queue_depth k5_queue_oldest_age_seconds k5_jobs k5_workers_online
    k5_worker_peak_gpu_memory_bytes k5_worker_jobs_total k5_worker_failures_total k5_worker_model_ready
    k5_webhook_deliveries_total k5_webhook_pending k5_usage_videos_total k5_usage_seconds_total k5_usage_steps_total
    k5_usage_steps_resumed_total k5_usage_megavoxels_total""".split()
)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "le"}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers that are not functions, keywords or label names."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", expr)  # matchers, ranges, Grafana variables
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # grouping labels
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][\w:]*)\b(\s*\()?", expr):
        if not match.group(2) and match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def test_dashboard_queries_use_only_exported_metrics_and_show_them_all():
    dashboard = json.loads((ROOT / "deploy/grafana/k5serve-dashboard.json").read_text())
    allowed = (METRICS - HISTOGRAMS) | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    used = set()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and names <= allowed, (panel["title"], names - allowed)
            used |= {re.sub(r"_(bucket|sum|count)$", "", n) if n not in METRICS else n for n in names}
    assert used == METRICS
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "k5serve"


def test_usage_settings_reach_gateway_and_workers():
    """Both count finished videos (usage totals, k5_usage_* metrics): they must agree on labels and retention."""
    docs = render({"usage": {"retentionDays": 30, "labels": {"key_00112233aabbccdd": "acme", "key_0a": "beta"}}})
    deployments = of_kind(docs, "Deployment")
    gateway = next(d for name, d in deployments.items() if name.endswith("-gateway"))
    workers = [d for name, d in deployments.items() if "-worker-" in name]
    assert workers
    for dep in [gateway, *workers]:
        env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
        assert env["K5_USAGE_LABELS"]["value"] == "key_00112233aabbccdd=acme,key_0a=beta"
        assert env["K5_USAGE_RETENTION_DAYS"]["value"] == "30"
        Settings(usage_labels=env["K5_USAGE_LABELS"]["value"])  # what the chart writes, the service reads


def test_worker_host_memory_follows_the_pools_model():
    """Pro keeps its text encoders in pinned host memory; Lite keeps everything on the GPU: each pool's memory
    limit comes from its model unless the pool sets one."""
    values = {
        "workers": [
            {"name": "lite", "model": "kandinsky-5.0-t2v-lite-sft-5s", "gpu": {"count": 1}},
            {"name": "pro", "model": "kandinsky-5.0-i2v-pro-sft-5s", "gpu": {"count": 1}},
            {"name": "own", "model": "kandinsky-5.0-t2v-pro-sft-5s", "gpu": {"count": 1}} | _POOL,
        ]
    }
    deployments = of_kind(render(values), "Deployment")

    def resources(pool: str) -> dict:
        (container,) = deployments[f"k5-k5serve-worker-{pool}"]["spec"]["template"]["spec"]["containers"]
        return container["resources"]

    host = DEFAULTS["workerDefaults"]["hostMemory"]
    assert resources("lite")["limits"]["memory"] == host["lite"]["limit"] == "24Gi"
    assert resources("lite")["requests"] == {"cpu": "4", "memory": host["lite"]["request"]}
    assert resources("pro")["limits"] == {"memory": host["pro"]["limit"], "nvidia.com/gpu": 1}
    assert resources("own")["limits"]["memory"] == "128Gi" and resources("own")["requests"]["cpu"] == "8"


def pod_cost(values: dict) -> bool:
    defaults = DEFAULTS["workerDefaults"]["podDeletionCost"]
    return values.get("workerDefaults", {}).get("podDeletionCost", defaults)["enabled"]


def test_worker_pods_alone_may_patch_pods_for_their_deletion_cost(case):
    values, docs = case
    deployments = of_kind(docs, "Deployment")
    sa = "k5-k5serve"
    for pool in pools(values):
        pod = deployments[f"k5-k5serve-worker-{pool['name']}"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == sa and pod["automountServiceAccountToken"] is True
        env = env_of(pod["containers"][0])
        assert env["K5_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["K5_POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["K5_POSTPROCESS_JOBS"]["value"] == str(pool.get("postprocessJobs", 1))
    others = [d for name, d in deployments.items() if "-worker-" not in name]
    assert others and all(d["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for d in others)
    (role,) = of_kind(docs, "Role").values()
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    (binding,) = of_kind(docs, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "k5serve"}]
    if values.get("networkPolicy", {}).get("enabled", True):
        egress = of_kind(docs, "NetworkPolicy")["k5-k5serve-worker"]["spec"]["egress"]
        assert {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]} in egress


def test_without_pod_deletion_cost_no_pod_gets_a_token():
    docs = render({"workerDefaults": {"podDeletionCost": {"enabled": False}}})
    for dep in of_kind(docs, "Deployment").values():
        pod = dep["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert "K5_POD_NAME" not in env_of(pod["containers"][0])
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")


def test_checkpoints_shorten_a_busy_workers_grace_period_to_seconds():
    pool = {"name": "lite", "model": "kandinsky-5.0-t2v-lite-sft-5s", "gpu": {"count": 1}}
    values = {
        "workerDefaults": {"checkpoints": {"enabled": True}},
        "workers": [pool, pool | {"name": "own", "terminationGracePeriodSeconds": 600}],
    }
    docs = render(values)
    deployments = of_kind(docs, "Deployment")
    margin = DEFAULTS["workerDefaults"]["shutdownMarginSeconds"]
    for name, grace in (
        ("lite", DEFAULTS["workerDefaults"]["checkpoints"]["terminationGracePeriodSeconds"]),
        ("own", 600),
    ):
        pod = deployments[f"k5-k5serve-worker-{name}"]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == grace < DEFAULTS["jobTimeoutSeconds"] or name == "own"
        assert float(env_of(pod["containers"][0])["K5_SHUTDOWN_GRACE_S"]["value"]) == grace - margin
    report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{K8S}")
    assert report["errors"] == []

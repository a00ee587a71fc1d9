"""The Kubernetes manifests of deploy/k8s, checked without a cluster.

The kustomization is rendered here (its resources in order, its namespace and image overrides applied) and, when
`kubectl` is installed, compared with `kubectl kustomize`. Every object is validated against the Kubernetes JSON
schemas shipped by `kubernetes-validate` (strict: an unknown field is an error), the ScaledObjects against KEDA's
CRD kept at deploy/k8s/schemas/ (its source and version in the file's header). Then what ties the objects to each
other and to the service: settings names, probe paths, the shutdown grace, one GPU worker per queue, the
autoscaling targets and the disruption budgets.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from core.queue import QUEUES
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests target; strict: unknown fields are errors.
K8S_VERSION = "1.30.0"
KEDA_CRD = K8S / "schemas" / "keda.sh_scaledobjects.yaml"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}
POD_OWNERS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
SETTING_NAMES = {f"ZIMAGE_{name.upper()}" for name in Settings.model_fields}

Doc = dict[str, Any]


def _split_image(image: str) -> tuple[str, str | None]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return name, tag or None


def render() -> list[Doc]:
    """kustomization.yaml resolved by hand: the documents of its `resources:` in order, `namespace:` set on every
    namespaced object, `images:` applied to every container."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert set(kust) <= {"apiVersion", "kind", "namespace", "resources", "images"}, (
        "kustomization.yaml uses a field this test does not render; teach render() about it"
    )
    docs: list[Doc] = []
    for resource in kust["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization.yaml names {resource}, which does not exist"
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    namespace = kust.get("namespace")
    images = {image["name"]: image for image in kust.get("images", [])}
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        for container in containers(doc):
            name, tag = _split_image(container["image"])
            if name in images:
                new = images[name]
                container["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag or 'latest')}"
    return docs


def pod_spec(doc: Doc) -> Doc | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in POD_OWNERS else None


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def key(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def worker_deployments(docs: list[Doc]) -> Iterator[tuple[Doc, str]]:
    """(Deployment, its --queues value) for every Celery worker Deployment."""
    for doc in of_kind(docs, "Deployment"):
        command = doc["spec"]["template"]["spec"]["containers"][0].get("command", [])
        if command[:4] == ["celery", "-A", "worker.app", "worker"]:
            yield doc, command[command.index("--queues") + 1]


def config_env(docs: list[Doc]) -> dict[str, str]:
    """The ConfigMap's and the Secret's variables, as every pod gets them."""
    env = dict(named(docs, "ConfigMap", "zimage-config")["data"])
    env.update(named(docs, "Secret", "zimage-secrets")["stringData"])
    return env


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return render()


# --- rendering and schemas ---


def test_the_kustomization_renders_as_kustomize_does(docs: list[Doc]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are checked on this test's own rendering only")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True)
    theirs = {key(doc): doc for doc in yaml.safe_load_all(out.stdout) if doc}
    ours = {key(doc): doc for doc in docs}
    assert sorted(theirs) == sorted(ours)
    for k, doc in ours.items():
        assert theirs[k] == doc, f"{k}: kubectl kustomize renders it differently"


def test_the_kustomization_holds_the_whole_service(docs: list[Doc]) -> None:
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds.count("Namespace") == 1 and kinds.count("ConfigMap") == 1 and kinds.count("Secret") == 1
    for name in ("zimage-api", "zimage-webhooks", *(f"zimage-worker-{q}" for q in QUEUES)):
        named(docs, "Deployment", name)
    named(docs, "Service", "zimage-api")
    named(docs, "HorizontalPodAutoscaler", "zimage-api")
    assert named(docs, "Job", "zimage-migrate")["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "zimage-admin",
        "migrate",
    ]
    assert len(of_kind(docs, "ScaledObject")) == len(QUEUES)
    namespace = named(docs, "Namespace", "zimage")["metadata"]["name"]
    assert all(doc["metadata"].get("namespace") == namespace for doc in docs if doc["kind"] != "Namespace")


def _ids(docs: list[Doc]) -> list[str]:
    return ["/".join(key(doc)[1:]) for doc in docs]


_K8S_DOCS = [doc for doc in render() if not doc["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("doc", _K8S_DOCS, ids=_ids(_K8S_DOCS))
def test_every_manifest_matches_the_kubernetes_schema(doc: Doc) -> None:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{'/'.join(key(doc)[1:])} against Kubernetes {K8S_VERSION}: {exc.message} at {list(exc.path)}")


def _closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever it lists properties and allows nothing else, so that a
    misspelt field fails here (the API server would prune it silently)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _validate(doc: Doc, schema: Doc, what: str) -> None:
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, f"{doc['metadata']['name']} against {what}:\n" + "\n".join(
        f"  {list(e.path)}: {e.message}" for e in errors
    )


def test_scaled_objects_match_the_keda_crd(docs: list[Doc]) -> None:
    if not KEDA_CRD.exists():
        pytest.skip(
            f"{KEDA_CRD.relative_to(ROOT)} is not in the repository: ScaledObjects need KEDA's CRD to be checked "
            "(keda.sh_scaledobjects.yaml of kedacore/keda, config/crd/bases/)"
        )
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "ScaledObject"
    for doc in of_kind(docs, "ScaledObject"):
        version = doc["apiVersion"].split("/")[1]
        served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
        assert served, f"the CRD serves no {doc['apiVersion']}"
        schema = _closed(served[0]["schema"]["openAPIV3Schema"])
        _validate(doc, schema, f"KEDA's CRD ({KEDA_CRD.name})")


# --- what ties the objects to the service ---


def test_every_zimage_variable_is_a_setting(docs: list[Doc]) -> None:
    names = set(config_env(docs))
    for doc in docs:
        for container in containers(doc):
            names |= {e["name"] for e in container.get("env", [])}
    unknown = sorted(n for n in names if n.startswith("ZIMAGE_") and n not in SETTING_NAMES)
    assert not unknown, f"not fields of core/settings.py: {unknown}"
    assert all(n.startswith("ZIMAGE_") for n in config_env(docs)), "the service reads only ZIMAGE_* variables"


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_the_config_is_valid_settings_once_the_placeholders_are_replaced(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = config_env(docs)
    assert env["ZIMAGE_ENVIRONMENT"] == "production"
    # As shipped, the placeholders are refused: a forgotten replacement cannot run with a known secret.
    with pytest.raises(ValueError, match="ZIMAGE_S3_SECRET_ACCESS_KEY"):
        _settings_from(env, monkeypatch)
    env |= {"ZIMAGE_S3_SECRET_ACCESS_KEY": "s" * 40, "ZIMAGE_LINK_SECRET": "l" * 64}
    for doc, _ in worker_deployments(docs):
        env |= {e["name"]: e["value"] for e in doc["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    settings = _settings_from(env, monkeypatch)
    assert settings.environment == "production" and settings.device == "cuda"


def test_every_pod_reads_the_configmap_and_the_secret(docs: list[Doc]) -> None:
    for doc in docs:
        for container in containers(doc):
            refs = {(k, v["name"]) for ref in container.get("envFrom", []) for k, v in ref.items()}
            assert refs == {("configMapRef", "zimage-config"), ("secretRef", "zimage-secrets")}, key(doc)
            assert container["image"].startswith("registry.example.com/zimage-service:"), key(doc)


def test_the_api_probes_are_healthz_and_readyz(docs: list[Doc]) -> None:
    from api.routes.health import router

    paths = {route.path for route in router.routes}  # type: ignore[attr-defined]
    container = named(docs, "Deployment", "zimage-api")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    assert command[:2] == ["uvicorn", "api.main:create_app"]
    assert ports["http"] == int(command[command.index("--port") + 1])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["path"] in paths
            assert container[probe]["httpGet"]["port"] in ports
    assert container["resources"]["requests"]["cpu"], "the HPA's CPU utilisation needs a CPU request"
    service = named(docs, "Service", "zimage-api")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


def test_one_gpu_worker_deployment_per_queue(docs: list[Doc]) -> None:
    workers = dict((queue, doc) for doc, queue in worker_deployments(docs))
    assert sorted(workers) == sorted(QUEUES), "one worker Deployment per queue (--queues generate, --queues edit)"
    for queue, doc in workers.items():
        spec = doc["spec"]["template"]["spec"]
        container = spec["containers"][0]
        command = container["command"]
        assert command[command.index("--pool") + 1] == "solo"
        assert command[command.index("--concurrency") + 1] == "1"
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1", queue
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), queue
        assert spec["nodeSelector"], queue
        assert "replicas" not in doc["spec"], f"{queue}: KEDA owns the replica count"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert str(ports["metrics"]) == annotations["prometheus.io/port"], queue
        if "metrics_port" in Settings.model_fields:  # the worker's own setting, once it has one
            port = config_env(docs).get("ZIMAGE_METRICS_PORT", Settings.model_fields["metrics_port"].default)
            assert int(port) == ports["metrics"], queue


def test_the_worker_grace_outlasts_the_shutdown_grace(docs: list[Doc]) -> None:
    """Kubernetes kills a pod terminationGracePeriodSeconds after SIGTERM; the worker needs the batch's grace
    (ZIMAGE_SHUTDOWN_GRACE_S) and then time to give unfinished jobs back, or they wait out their lease."""
    grace = float(config_env(docs).get("ZIMAGE_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    for doc, queue in worker_deployments(docs):
        termination = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert termination > grace, f"{queue}: {termination} s does not exceed ZIMAGE_SHUTDOWN_GRACE_S={grace:g}"
        assert termination - grace >= 20, f"{queue}: leave at least 20 s to release the batch's jobs"


def test_every_command_exists(docs: list[Doc]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for doc in docs:
        for container in containers(doc):
            command = container["command"]
            if command[0] in ("celery", "uvicorn"):
                module = command[2] if command[0] == "celery" else command[1].split(":")[0]
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), key(doc)
            elif command[:2] == ["python", "-m"]:
                path = ROOT / (command[2].replace(".", "/") + ".py")
                if not path.is_file():
                    pytest.skip(f"{command[2]} ({key(doc)[3]}) is not in the tree yet")
            else:
                assert command[0] in scripts, f"{key(doc)}: {command[0]} is no console script of pyproject.toml"


def test_every_scaled_object_scales_its_queue_on_the_true_depth(docs: list[Doc]) -> None:
    workers = {doc["metadata"]["name"]: queue for doc, queue in worker_deployments(docs)}
    settings = Settings()
    scaled = {}
    for so in of_kind(docs, "ScaledObject"):
        spec = so["spec"]
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in workers, target
        queue = workers[target["name"]]
        scaled[queue] = so
        assert spec["minReplicaCount"] == 0, "scale to zero"
        assert spec["maxReplicaCount"] >= 1
        # Longer than a batch and its drain, and several polls: not to stop a worker whose batch is still running.
        assert spec["cooldownPeriod"] >= max(300, settings.drain_s + settings.shutdown_grace_s)
        assert spec["cooldownPeriod"] > spec["pollingInterval"]
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= spec["pollingInterval"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") == "AverageValue"
        query = trigger["metadata"]["query"]
        assert f'zimage_queue_depth{{queue="{queue}"}}' in query, query
        assert query.startswith("sum("), "the depth is the sum over priorities"
        assert float(trigger["metadata"]["threshold"]) > 0
    assert sorted(scaled) == sorted(QUEUES)


def test_every_disruption_budget_and_autoscaler_finds_its_pods(docs: list[Doc]) -> None:
    deployments = of_kind(docs, "Deployment")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matches = [
            d["metadata"]["name"]
            for d in deployments
            if d["metadata"]["namespace"] == pdb["metadata"]["namespace"]
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"PodDisruptionBudget {pdb['metadata']['name']} selects {matches}"
    covered = {
        d["metadata"]["name"]
        for d in deployments
        for pdb in of_kind(docs, "PodDisruptionBudget")
        if pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    }
    assert {"zimage-api", *(f"zimage-worker-{q}" for q in QUEUES)} <= covered
    for doc in deployments:
        selector = doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        others = [
            d
            for d in deployments
            if d is not doc and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert not others, (
            f"{doc['metadata']['name']}'s selector also matches {[d['metadata']['name'] for d in others]}"
        )
    service = named(docs, "Service", "zimage-api")
    api = named(docs, "Deployment", "zimage-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    hpa = named(docs, "HorizontalPodAutoscaler", "zimage-api")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "zimage-api" and "replicas" not in api["spec"]


def test_the_schema_checks_catch_a_misspelt_field(docs: list[Doc]) -> None:
    """The two checks above are not vacuous: an unknown field and a wrong type fail them."""
    deployment = copy.deepcopy(named(docs, "Deployment", "zimage-worker-generate"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    if not KEDA_CRD.exists():
        pytest.skip(f"{KEDA_CRD.relative_to(ROOT)} is not in the repository")
    crd = yaml.safe_load(KEDA_CRD.read_text())
    schema = _closed(next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"]["openAPIV3Schema"])
    for mutate in (
        lambda so: so["spec"].update(cooldownPeriods=300),
        lambda so: so["spec"].update(minReplicaCount="0"),
        lambda so: so["spec"]["triggers"][0]["metadata"].update(threshold=35),
        lambda so: so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"].update(scaledown={}),
    ):
        so = copy.deepcopy(of_kind(docs, "ScaledObject")[0])
        mutate(so)
        with pytest.raises(AssertionError):
            _validate(so, schema, "KEDA's CRD")


def test_the_migration_can_be_applied_first(docs: list[Doc]) -> None:
    """docs/cluster.md applies `-l 'app.kubernetes.io/component in (config,migrate)'` before the rest: that
    selects the namespace, the configuration and the Job, and nothing else."""
    first = sorted(
        doc["kind"]
        for doc in docs
        if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") in ("config", "migrate")
    )
    assert first == ["ConfigMap", "Job", "Namespace", "Secret"]
    assert (
        "kubectl apply -k deploy/k8s -l 'app.kubernetes.io/component in (config,migrate)'"
        in (ROOT / "docs" / "cluster.md").read_text()
    )

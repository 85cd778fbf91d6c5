"""helm/shipyard, linted and rendered offline by the real Helm engine and judged object by object.

The engine is Helm v4's Go SDK, loaded as a shared library by helm-python-sdk (no helm binary, no
cluster: `lookup` returns nothing, .Capabilities are Helm's defaults). Each value set (the chart's
defaults and every helm/shipyard/ci/*.yaml) is rendered once for release "shipyard" in namespace
"ml"; then
- the built-in kinds are validated against the Kubernetes 1.34 schemas (kubernetes-validate, strict),
- the ray.io/v1 kinds against the KubeRay v1.7.0 CRD schemas with jsonschema (tests/cluster's
  kube_checks and its vendored RayCluster/RayJob schemas; the RayService schema is in data/ here),
  and their Pod templates against core/v1,
- the security rules of cluster/README.md are checked on every container,
- the wiring (token auth, S3 credentials, MLflow URI, GPUs, RayJob entrypoints) is checked, and
- each values file in data/bad-values/ must fail with the message on its first line.

What this offline path cannot check: Chart.yaml's `kubeVersion` (the library's render takes no
Kubernetes version and its lint ignores the constraint; `helm install` checks it against the
cluster), server-side defaulting and admission, and KubeRay's own controller-side validation.
"""
from __future__ import annotations

import functools
import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))  # kube_checks: shared with tests/cluster
import kube_checks as kc  # noqa: E402

ROOT = kc.ROOT
CHART = ROOT / "helm" / "shipyard"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
BAD_VALUES = sorted((HERE / "data" / "bad-values").glob("*.yaml"))
RAYSERVICE_SCHEMA = HERE / "data" / "kuberay-crds-v1.7.0" / "rayservices.ray.io-v1.json"
RELEASE, NAMESPACE = "shipyard", "ml"

VALUE_SETS = ["default"] + [p.name for p in CI_FILES]
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


# --------------------------------------------------------------------------------------------------
# rendering


def values_of(value_set: str) -> dict | None:
    return None if value_set == "default" else yaml.safe_load((CHART / "ci" / value_set).read_text())


@functools.lru_cache(maxsize=None)
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


@functools.lru_cache(maxsize=None)
def merged(value_set: str) -> dict:
    """The values an install with this set would use (Helm's own coalescing)."""
    return _chart().merge_values(values_of(value_set))


@functools.lru_cache(maxsize=None)
def _rendered(value_set: str) -> tuple[tuple[str, dict], ...]:
    manifests = _chart().render(values_of(value_set), name=RELEASE, namespace=NAMESPACE)
    out = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                out.append((f"{value_set}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return tuple(out)


def objects(value_set: str, kinds=None) -> list[tuple[str, dict]]:
    return [(w, o) for w, o in _rendered(value_set) if kinds is None or o["kind"] in kinds]


def all_objects(kinds=None) -> list[tuple[str, dict]]:
    return [wo for vs in VALUE_SETS for wo in objects(vs, kinds)]


def ids(pairs):
    return [w for w, _ in pairs]


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmError) as e:
        _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return str(e.value)


# --------------------------------------------------------------------------------------------------
# ray.io/v1 objects: the RayService schema and a RayCluster view of every kind


def as_raycluster(obj: dict) -> dict:
    """A RayService's cluster as a RayCluster, so kube_checks' Pod-template helpers apply to it."""
    if obj["kind"] != "RayService":
        return obj
    return {"apiVersion": obj["apiVersion"], "kind": "RayCluster", "metadata": obj["metadata"],
            "spec": obj["spec"]["rayClusterConfig"]}


@functools.lru_cache(maxsize=None)
def _rayservice_validator():
    schema = kc.structural_to_jsonschema(json.loads(RAYSERVICE_SCHEMA.read_text()))
    return kc.CRDValidator(schema, format_checker=kc._FORMATS)


def crd_errors(obj: dict) -> list[str]:
    if obj["kind"] != "RayService":
        return kc.crd_errors(obj)
    return sorted(f"{kc._path(e.absolute_path)}: {e.message}"
                  for e in _rayservice_validator().iter_errors(obj))


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every Pod an object makes, the autoscaler sidecar included
    (kube_checks.pod_templates, plus a RayJob on an existing cluster: only its submitter)."""
    if obj["kind"] == "RayJob" and "rayClusterSpec" not in obj["spec"]:
        return [("spec.submitterPodTemplate", obj["spec"]["submitterPodTemplate"])]
    if obj["kind"] in RAY_KINDS:
        return kc.pod_templates(as_raycluster(obj))
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [("spec.template", obj["spec"]["template"])]
    return []


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    return [(where, t["spec"]) for where, t in pod_templates(obj)]


def k8s_template_errors(obj: dict) -> list[str]:
    """kube_checks.k8s_errors over pod_templates(obj): each template as a v1 PodTemplate."""
    problems = []
    for where, tmpl in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": obj["metadata"], "template": tmpl}
        try:
            kubernetes_validate.validate(wrapped, kc.K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}{kc._path(list(e.absolute_path)[1:])}: {e.message}")
    return problems


def containers(obj: dict) -> list[tuple[str, dict, dict]]:
    return [(f"{where} {key[:-1]} {c['name']}", c, spec)
            for where, spec in pod_specs(obj)
            for key in ("initContainers", "containers") for c in spec.get(key, [])]


def is_ray_container(where: str) -> bool:
    return " container ray-head" in where or " container ray-worker" in where


# --------------------------------------------------------------------------------------------------
# Helm: lint and render


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_is_clean(value_set):
    report = helm.lint(CHART, values_of(value_set), strict=True, namespace=NAMESPACE, kube_version="v1.34.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is informational (only "icon is recommended"); 2 = warning, 3 = error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_there_are_ci_value_sets():
    assert {p.name for p in CI_FILES} >= {"rayjobs.yaml", "postgresql.yaml", "rayservice.yaml", "external-db.yaml"}


EXPECTED_KINDS = {
    "default": ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service"],
    "rayjobs.yaml": ["Deployment", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob", "Service"],
    "postgresql.yaml": ["Deployment", "RayCluster", "Service", "Service", "StatefulSet"],
    "rayservice.yaml": ["RayService"],
    "external-db.yaml": ["Deployment", "RayCluster", "Service"],
}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_renders_the_expected_objects(value_set):
    assert sorted(o["kind"] for _, o in objects(value_set)) == EXPECTED_KINDS[value_set]
    for _, o in objects(value_set):
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert "namespace" not in o["metadata"], "the release namespace applies"


def test_a_values_file_is_what_an_install_uses():
    # Helm's coalescing: ci values override the defaults key by key, maps merge.
    m = merged("rayjobs.yaml")
    assert set(m["ray"]["workerGroups"]) == {"cpu", "gpu", "gpu-big"}
    assert m["objectStore"]["existingSecret"] == "aws-s3"
    assert m["objectStore"]["accessKeyIdKey"] == "AWS_ACCESS_KEY_ID"


# --------------------------------------------------------------------------------------------------
# schemas: Kubernetes, KubeRay CRDs, values.schema.json


@pytest.mark.parametrize("obj", [o for _, o in all_objects()], ids=ids(all_objects()))
def test_valid_against_kubernetes_or_kuberay_schemas(obj):
    if obj["kind"] in RAY_KINDS:
        assert crd_errors(obj) == []
        assert k8s_template_errors(obj) == []
    else:
        kubernetes_validate.validate(obj, kc.K8S_VERSION, strict=True)


def test_the_crd_checks_can_fail_on_rendered_objects():
    (_, svc), = objects("rayservice.yaml", {"RayService"})
    broken = json.loads(json.dumps(svc))
    broken["spec"]["serveConfigV2"] = {"applications": []}        # must be the YAML text
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    assert crd_errors(broken) == [
        "spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas: '2' is not of type 'integer'",
        "spec.serveConfigV2: {'applications': []} is not of type 'string'",
    ]
    (_, deployment), = objects("default", {"Deployment"})
    deployment = json.loads(json.dumps(deployment))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(deployment, kc.K8S_VERSION, strict=True)


def test_rayservice_crd_schema_is_the_kuberay_release_and_its_cel_rules_are_translated():
    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    rules = set()

    def walk(node):
        if isinstance(node, dict):
            rules.update(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert rules and {r for r in rules if not kc.is_transition_rule(r)} <= kc.CEL_RULES.keys()
    src = ROOT.parent / "shared" / "kuberay-crds" / "v1.7.0" / "ray.io_rayservices.yaml"
    if not src.is_file():
        pytest.skip(f"source CRD not at hand ({src})")
    crd = yaml.load(src.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["schema"]["openAPIV3Schema"] == schema


def test_values_schema_is_draft7_and_agrees_with_helm_on_every_value_set():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    v = jsonschema.Draft7Validator(schema)
    for value_set in VALUE_SETS:
        assert [e.message for e in v.iter_errors(merged(value_set))] == [], value_set


def _expected_error(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name}: the first line names the expected error"
    return first.removeprefix("# error: ")


@pytest.mark.parametrize("path", BAD_VALUES, ids=lambda p: p.stem)
def test_bad_values_fail_with_a_clear_message(path):
    message = render_error(yaml.safe_load(path.read_text()))
    assert _expected_error(path) in message, message
    assert "\n" not in message.strip() or message.startswith("values don't meet"), message


def test_there_are_bad_values_for_schema_and_template_checks():
    errors = [_expected_error(p) for p in BAD_VALUES]
    assert sum(e.startswith("at '/") for e in errors) >= 8          # values.schema.json
    assert sum(not e.startswith("at '/") for e in errors) >= 6      # cross-field checks in templates


# --------------------------------------------------------------------------------------------------
# security


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_secret_objects_and_no_credentials_inlined(value_set):
    text = "\n".join(_chart().render(values_of(value_set), name=RELEASE, namespace=NAMESPACE).values())
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    for where, o in objects(value_set):
        assert o["kind"] != "Secret", f"{where}: the chart never creates Secrets"
        for cwhere, c, _ in containers(o):
            for e in c.get("env", []):
                if kc.SENSITIVE_ENV.search(e["name"]):
                    ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                    assert "value" not in e and ref.get("name") and ref.get("key"), f"{where} {cwhere}: {e}"
            for arg in c.get("args", []) + c.get("command", []):
                # A URI's password may only be a $(VAR) that Kubernetes fills in from a secretKeyRef.
                m = re.search(r"://[^/@\s:]+:([^/@\s]+)@", arg)
                if m:
                    var = re.fullmatch(r"\$\(([A-Z_]+)\)", m.group(1))
                    assert var, f"{where} {cwhere}: a password in {arg!r}"
                    env = {x["name"]: x for x in c.get("env", [])}
                    assert env[var.group(1)]["valueFrom"]["secretKeyRef"], arg


def _security_problems(obj: dict, ray_read_only: bool) -> list[str]:
    out = []
    for where, c, pod in containers(obj):
        psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        read_only = ray_read_only if is_ray_container(where) else True   # the rest always
        checks = {
            "runAsNonRoot": psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot", True) is True,
            "a non-zero runAsUser": psc.get("runAsUser", 0) > 0 and sc.get("runAsUser", 1) > 0,
            # Ray containers run as the image's `ray` user (uid 1000): its files, its home
            "uid 1000 for Ray": obj["kind"] not in RAY_KINDS
                                or psc.get("runAsUser") == sc.get("runAsUser", 1000) == 1000,
            "seccompProfile RuntimeDefault": psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities drop ALL, add none": sc.get("capabilities", {}).get("drop") == ["ALL"]
                                               and not sc.get("capabilities", {}).get("add"),
            f"readOnlyRootFilesystem: {str(read_only).lower()}": sc.get("readOnlyRootFilesystem") is read_only,
            "/tmp writable": any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])),
        }
        out += [f"{where}: {rule}" for rule, ok in checks.items() if not ok]
    return out


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_is_non_root_locked_down_and_has_resources(value_set):
    ray_read_only = merged(value_set)["ray"]["readOnlyRootFilesystem"]
    for where, o in objects(value_set):
        assert _security_problems(o, ray_read_only) == [], where
        for cwhere, c, _ in containers(o):
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= res.get("requests", {}).keys() & res.get("limits", {}).keys(), cwhere
            for r, limit in res["limits"].items():
                assert kc.quantity(res["requests"].get(r, limit)) <= kc.quantity(limit), f"{cwhere}: {r}"


def test_security_check_can_fail():
    (_, deployment), = objects("default", {"Deployment"})
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del broken["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]
    assert _security_problems(broken, True) == [
        "spec.template container mlflow: seccompProfile RuntimeDefault",
        "spec.template container mlflow: readOnlyRootFilesystem: true",
    ]


def test_ray_root_filesystem_follows_the_value():
    (_, svc), = objects("rayservice.yaml", {"RayService"})
    (_, cluster), = objects("default", {"RayCluster"})
    for obj, expected in ((svc, False), (cluster, True)):
        for where, c, _ in containers(obj):
            if is_ray_container(where):
                assert c["securityContext"]["readOnlyRootFilesystem"] is expected, where


# --------------------------------------------------------------------------------------------------
# wiring


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def tracking_uri(value_set: str) -> str:
    values = merged(value_set)
    m = values["mlflow"]
    return f"http://{values['fullnameOverride'] or RELEASE}-mlflow:{m['port']}" if m["enabled"] else m["externalUri"]


RAY_OBJECTS = all_objects(RAY_KINDS)


@pytest.mark.parametrize("obj", [o for _, o in RAY_OBJECTS], ids=ids(RAY_OBJECTS))
def test_ray_containers_get_the_token_s3_credentials_and_the_tracking_uri(obj):
    tokens = set()
    for where, c, _ in containers(obj):
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        tokens.add((ref["name"], ref["key"]))
        if is_ray_container(where):
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[name]["valueFrom"]["secretKeyRef"]["name"], where
            assert re.fullmatch(r"https?://[a-z][-a-z0-9.]*(:\d+)?/?", env["MLFLOW_TRACKING_URI"]["value"]), where
    assert len(tokens) == 1, f"one token for the whole cluster: {tokens}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_tracking_uri_names_the_mlflow_service(value_set):
    uri = tracking_uri(value_set)
    for where, o in objects(value_set, RAY_KINDS):
        for cwhere, c, _ in containers(o):
            if "MLFLOW_TRACKING_URI" in env_of(c):
                assert env_of(c)["MLFLOW_TRACKING_URI"]["value"] == uri, f"{where} {cwhere}"
    services = {o["metadata"]["name"]: o for _, o in objects(value_set, {"Service"})}
    if merged(value_set)["mlflow"]["enabled"]:
        host, port = re.fullmatch(r"http://([^:]+):(\d+)", uri).groups()
        assert [p["port"] for p in services[host]["spec"]["ports"]] == [int(port)]


@pytest.mark.parametrize("value_set", ["default", "rayjobs.yaml", "external-db.yaml"])
def test_object_store_secret_and_keys_follow_the_values(value_set):
    os_ = merged(value_set)["objectStore"]
    (_, cluster), = objects(value_set, {"RayCluster"})
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_of(head)
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": os_["existingSecret"], "key": os_["secretAccessKeyKey"]}
    assert ("AWS_ENDPOINT_URL" in env) == bool(os_["endpointUrlKey"])
    assert env.get("AWS_REGION", {}).get("value", "") == os_["region"]


RAY_CLUSTERS = [(w, o) for w, o in RAY_OBJECTS if o["kind"] != "RayJob" or "rayClusterSpec" in o["spec"]]


@pytest.mark.parametrize("where", ids(RAY_CLUSTERS))
def test_worker_groups_follow_the_values(where):
    value_set = where.split(":")[0]
    (obj,) = [o for w, o in RAY_CLUSTERS if w == where]
    ray = merged(value_set)["ray"]
    spec = kc.cluster_spec(as_raycluster(obj))
    assert spec["rayVersion"] == ray["version"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == ray["autoscaler"]["idleTimeoutSeconds"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups.keys() == ray["workerGroups"].keys()
    for name, g in groups.items():
        want = ray["workerGroups"][name]
        assert (g["minReplicas"], g["replicas"], g["maxReplicas"]) == (
            want["minReplicas"], want["replicas"], want["maxReplicas"])
        pod = g["template"]["spec"]
        res = pod["containers"][0]["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert int(gpus or 0) == want["gpus"], name
        assert res["requests"].get("nvidia.com/gpu") == gpus, name
        assert str(res["limits"]["memory"]) == str(want["resources"]["limits"]["memory"]), name
        assert pod.get("nodeSelector", {}) == want.get("nodeSelector", {}), name
        assert pod.get("tolerations", []) == want.get("tolerations", []), name
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["containerPort"]: p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports[8265] == "dashboard"
    assert (ports.get(8000) == "serve") == (obj["kind"] == "RayService")
    images = {c["image"] for _, c, _ in containers(obj)}
    assert len(images) == 1, images


def test_gpu_groups_land_on_gpu_nodes_by_default():
    (_, cluster), = objects("default", {"RayCluster"})
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    spec = gpu["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_image_and_pull_secrets_reach_every_pod():
    for where, o in objects("rayjobs.yaml"):
        for pwhere, spec in pod_specs(o):
            assert spec.get("imagePullSecrets") == [{"name": "regcred"}], f"{where} {pwhere}"
        for cwhere, c, _ in containers(o):
            assert c["image"] == "registry.example.com/ml/shipyard:0.1.0-cu128", cwhere
            assert c.get("imagePullPolicy", "Always") == "Always", cwhere
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    (_, cluster), = objects("default", {"RayCluster"})
    assert {c["image"] for _, c, _ in containers(cluster)} == {f"ghcr.io/example/shipyard:{chart_version}"}


def test_chart_defaults_match_the_plain_manifests():
    """cluster/kuberay/raycluster.yaml is the same cluster for users without Helm."""
    plain = kc.obj_of_kind("RayCluster")["spec"]
    (_, chart), = objects("default", {"RayCluster"})
    chart = chart["spec"]

    def groups(spec):
        return {g["groupName"]: (g["minReplicas"], g["replicas"], g["maxReplicas"],
                                 g["template"]["spec"]["containers"][0]["resources"],
                                 g["template"]["spec"].get("nodeSelector"), g["template"]["spec"].get("tolerations"))
                for g in spec["workerGroupSpecs"]}

    assert groups(chart) == groups(plain)
    for key in ("rayVersion", "enableInTreeAutoscaling"):
        assert chart[key] == plain[key], key
    assert chart["headGroupSpec"]["rayStartParams"] == plain["headGroupSpec"]["rayStartParams"]
    chead = chart["headGroupSpec"]["template"]["spec"]["containers"][0]
    phead = plain["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert chead["resources"] == phead["resources"]
    secret_refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env_of(chead).items() if "valueFrom" in e}
    assert secret_refs == {n: e["valueFrom"]["secretKeyRef"] for n, e in env_of(phead).items() if "valueFrom" in e}


# --------------------------------------------------------------------------------------------------
# MLflow


def _mlflow(value_set: str) -> tuple[dict, dict]:
    (_, d), = objects(value_set, {"Deployment"})
    c = d["spec"]["template"]["spec"]["containers"][0]
    return d, c


def _args(c: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), "")
                for a in c["args"])


@pytest.mark.parametrize("value_set", ["default", "postgresql.yaml"])
def test_services_select_their_pods_and_named_ports(value_set):
    workloads = objects(value_set, {"Deployment", "StatefulSet"})
    for where, svc in objects(value_set, {"Service"}):
        selector = svc["spec"]["selector"].items()
        (pod,) = [o["spec"]["template"] for _, o in workloads
                  if selector <= o["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, where
    for _, o in workloads:
        assert o["spec"]["selector"]["matchLabels"].items() <= o["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_backend_store_variants():
    d, c = _mlflow("default")                                   # sqlite on the chart's volume
    assert _args(c)["backend-store-uri"] == "sqlite:////mlflow/mlflow.db"
    claim = d["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"]
    assert [o["metadata"]["name"] for _, o in objects("default", {"PersistentVolumeClaim"})] == [claim]
    assert d["spec"]["strategy"] == {"type": "Recreate"}

    _, c = _mlflow("postgresql.yaml")                           # the bundled PostgreSQL
    (_, sts), = objects("postgresql.yaml", {"StatefulSet"})
    assert _args(c)["backend-store-uri"] == (
        f"postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@{sts['metadata']['name']}:5432/mlflow")
    pg_env = env_of(sts["spec"]["template"]["spec"]["containers"][0])
    assert env_of(c)["MLFLOW_DB_PASSWORD"]["valueFrom"] == pg_env["POSTGRES_PASSWORD"]["valueFrom"]
    assert objects("postgresql.yaml", {"PersistentVolumeClaim"}) == []

    _, c = _mlflow("external-db.yaml")                          # the whole URI from a Secret
    assert "backend-store-uri" not in _args(c)
    assert env_of(c)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}


def test_mlflow_server_command_line_is_one_mlflow_accepts():
    from mlflow.cli import server

    for value_set in ("default", "postgresql.yaml", "external-db.yaml"):
        _, c = _mlflow(value_set)
        assert c["command"] == ["mlflow", "server"]
        ctx = server.make_context("server", list(c["args"]))    # parses only; starts nothing
        artifacts = merged(value_set)["mlflow"]["artifactRoot"]
        if merged(value_set)["mlflow"]["serveArtifacts"]:
            assert ctx.params["serve_artifacts"] and ctx.params["artifacts_destination"] == artifacts
        else:
            assert not ctx.params["serve_artifacts"] and ctx.params["default_artifact_root"] == artifacts
        assert ctx.params["host"] == "0.0.0.0"


def test_mlflow_accepts_the_host_names_clients_use_and_rejects_others():
    from mlflow.server.security_utils import is_allowed_host_header

    for value_set in ("default", "postgresql.yaml"):
        _, c = _mlflow(value_set)
        allowed = _args(c)["allowed-hosts"].split(",")
        svc = f"{RELEASE}-mlflow"
        for host in (f"{svc}:5000", svc, f"{svc}.{NAMESPACE}:5000", f"{svc}.{NAMESPACE}.svc.cluster.local:5000",
                     "localhost:5000", "127.0.0.1:5000"):
            assert is_allowed_host_header(allowed, host), (value_set, host)
        for host in ("evil.example.com", f"{svc}.evil.example.com:5000", f"x{svc}:5000"):
            assert not is_allowed_host_header(allowed, host), (value_set, host)
    _, c = _mlflow("postgresql.yaml")
    assert is_allowed_host_header(_args(c)["allowed-hosts"].split(","), "mlflow.example.com")


def test_mlflow_probes_use_the_health_endpoint_exempt_from_host_checks():
    from mlflow.server.security_utils import is_health_endpoint

    _, c = _mlflow("default")
    for probe in ("readinessProbe", "livenessProbe"):
        assert is_health_endpoint(c[probe]["httpGet"]["path"]), probe


# --------------------------------------------------------------------------------------------------
# RayJobs run job specs from jobs/ through the real command line; the RayService serves a checkpoint


JOBS = objects("rayjobs.yaml", {"RayJob"})


@pytest.mark.parametrize("job", [o for _, o in JOBS], ids=ids(JOBS))
def test_rayjob_entrypoint_is_a_shipyard_run_the_cli_accepts(job, monkeypatch):
    from shipyard import cli

    entrypoint = job["spec"]["entrypoint"]
    name = job["metadata"]["name"].removeprefix(f"{RELEASE}-")
    want = merged("rayjobs.yaml")["rayJobs"][name]
    submitter = env_of(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    # KubeRay pastes the entrypoint into a shell: quotes are fine, nothing that chains commands.
    unquoted = re.sub(r"'[^']*'", "", entrypoint)
    assert not re.search(r"&&|\|\||[;|&`]|\$\(", unquoted), entrypoint
    expanded = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: submitter[m.group(1)]["value"], unquoted)
    assert expanded == unquoted.replace("$MLFLOW_TRACKING_URI", tracking_uri("rayjobs.yaml"))
    argv = shlex.split(re.sub(r"\$MLFLOW_TRACKING_URI", tracking_uri("rayjobs.yaml"), entrypoint))
    assert argv[:3] == ["shipyard", "run", "--quiet"] and argv[3] == want["spec"], argv
    assert argv[4:] == [f"storage.path={merged('rayjobs.yaml')['objectStore']['storagePath']}",
                        f"tracking.uri={tracking_uri('rayjobs.yaml')}", *want.get("overrides", [])]
    assert (ROOT / want["spec"]).is_file()

    seen = []
    monkeypatch.setattr(cli, "_run", lambda spec, args, resume: seen.append((spec, args)) or 0)
    monkeypatch.chdir(ROOT)  # the image's working directory is the repo root
    assert cli.main(argv[1:]) == 0
    (spec, args), = seen
    assert spec.storage.path == "s3://research-shipyard/runs"
    assert spec.tracking.uri == tracking_uri("rayjobs.yaml")
    assert args.address is None, "inside a Ray job RAY_ADDRESS names the cluster"
    if "train.steps=2000" in want.get("overrides", []):
        assert spec.train.steps == 2000 and spec.scaling.use_gpu is True


def test_rayjobs_own_cluster_or_the_charts():
    jobs = {o["metadata"]["name"]: o["spec"] for _, o in JOBS}
    own, existing = jobs[f"{RELEASE}-layerskip-stdlib"], jobs[f"{RELEASE}-minrnn"]
    assert own["shutdownAfterJobFinishes"] is True and own["ttlSecondsAfterFinished"] == 300
    assert "rayClusterSpec" in own and "clusterSelector" not in own
    (_, cluster), = objects("rayjobs.yaml", {"RayCluster"})
    assert existing["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in existing and "shutdownAfterJobFinishes" not in existing
    assert existing["activeDeadlineSeconds"] == 3600
    for spec in jobs.values():
        assert spec["backoffLimit"] == 0 and spec["submissionMode"] == "K8sJobMode"


def test_rayservice_serves_the_checkpoint_with_a_config_serve_accepts():
    from ray.serve.schema import ServeDeploySchema

    (_, svc), = objects("rayservice.yaml", {"RayService"})
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)                    # Ray Serve's own config schema
    (app,) = config["applications"]
    want = merged("rayservice.yaml")["rayService"]
    assert app["args"] == {"checkpoint": want["checkpoint"], **want["args"]}
    assert app["route_prefix"] == want["routePrefix"] and app["import_path"] == want["importPath"]
    assert app["deployments"] == want["deployments"]
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all({"name": "serve", "containerPort": 8000} in g["template"]["spec"]["containers"][0]["ports"]
               for g in workers)
    for where, c, _ in containers(svc):                          # the bearer token, from its Secret
        if is_ray_container(where):
            assert env_of(c)["SHIPYARD_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "shipyard-serve", "key": "token"}, where
    for _, cluster in objects("default", {"RayCluster"}):        # and only where something serves
        assert all("SHIPYARD_SERVE_TOKEN" not in env_of(c) for _, c, _ in containers(cluster))


def test_rayservice_application_is_the_one_shipyard_serve_builds():
    """The import path and args name `shipyard serve`'s builder and options (issue 6)."""
    serving = pytest.importorskip("shipyard.serve.app")
    (_, svc), = objects("rayservice.yaml", {"RayService"})
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is serving.build_app
    options = serving.ServeOptions.from_dict(app["args"])        # strict: unknown keys raise
    assert options.checkpoint.startswith("s3://") and options.autoscaling == [1, 4]
    assert {d["name"] for d in app["deployments"]} <= {serving.ModelServer.name}


def test_names_leave_kuberay_room():
    for where, o in all_objects(RAY_KINDS):
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", o["metadata"]["name"]), where


def test_chart_packages_and_the_archive_renders_the_same(tmp_path):
    archive = helm.package(CHART, destination=tmp_path)
    assert Path(archive).name == "shipyard-0.1.0.tgz"
    with helm.Chart.load_archive(Path(archive).read_bytes()) as packaged:
        assert packaged.schema == json.loads((CHART / "values.schema.json").read_text())
        for value_set in ("default", "rayjobs.yaml"):
            assert packaged.render(values_of(value_set), name=RELEASE, namespace=NAMESPACE) == \
                _chart().render(values_of(value_set), name=RELEASE, namespace=NAMESPACE)

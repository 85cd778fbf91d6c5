"""The KubeRay manifests under cluster/kuberay/ are valid, offline, against the schemas that will judge
them, follow the security rules, and wire up what Shipyard needs.

- Each object against the KubeRay v1.7.0 CRD OpenAPI schema (vendored in data/, read as JSON Schema
  by kube_checks.crd_validator, whose docstring says what that covers), and each Pod template inside
  it against the Kubernetes core/v1 schemas of kubernetes-validate (Kubernetes K8S_VERSION, strict:
  unknown fields are errors). kubernetes-validate has no schemas for CRDs, hence the two checks.
- Security: no secret value inlined, non-root containers, resources set; token auth on every Ray
  process; the RayJob's entrypoint accepted by the real `shipyard run` command line.
- Negative cases: broken copies fail, with messages that say where and why.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kube_checks import (CEL_RULES, CRD_DIR, CRD_SCHEMAS, K8S_VERSION, OBJECT_IDS, OBJECTS, ROOT, broken,
                         appending, cluster_spec, containers, crd_errors, crd_schema, env_of,
                         is_transition_rule, k8s_errors, kuberay_files, obj_of_kind, pod_templates, removing,
                         resource_problems, root_problems, secret_problems, setting)

S3_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


# --------------------------------------------------------------------------------------------------
# the manifests parse and are valid


def test_there_are_kuberay_manifests():
    kinds = sorted(o["kind"] for _, o in OBJECTS)
    assert kinds == ["RayCluster", "RayJob"], kinds


@pytest.mark.parametrize("path", kuberay_files(), ids=lambda p: p.name)
def test_every_yaml_parses_to_kubernetes_objects(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for d in docs:
        assert isinstance(d, dict) and {"apiVersion", "kind", "metadata"} <= d.keys(), d
        assert (d["apiVersion"], d["kind"]) in CRD_SCHEMAS, f"no schema here for {d['apiVersion']} {d['kind']}"


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_valid_against_the_kuberay_crd_schema(obj):
    assert crd_errors(obj) == []


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_pod_templates_valid_against_kubernetes_core_v1(obj):
    assert len(pod_templates(obj)) >= 3
    assert k8s_errors(obj) == []


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_names_are_dns_labels(obj):
    # KubeRay names Pods, Services and the submitter Job after the object plus suffixes
    # (-head-svc, -<group>-worker-xxxxx, ...): a DNS-1035 label short enough to leave them room in 63.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", obj["metadata"]["name"])


def test_kubernetes_validate_has_no_crd_schemas_hence_the_vendored_ones():
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(obj_of_kind("RayCluster"), K8S_VERSION, strict=True)


def test_every_cel_rule_is_translated():
    missing = set()

    def walk(node):
        if isinstance(node, dict):
            for r in node.get("x-kubernetes-validations", []):
                if not is_transition_rule(r["rule"]) and r["rule"] not in CEL_RULES:
                    missing.add(r["rule"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for api_version, kind in CRD_SCHEMAS:
        walk(crd_schema(api_version, kind))
    assert missing == set()


def test_vendored_crd_schemas_equal_the_kuberay_release():
    src = Path(os.environ.get("KUBERAY_CRDS_DIR", "/work/shared/kuberay-crds/v1.7.0"))
    if not src.is_dir():
        pytest.skip(f"source CRDs not at hand ({src}); set KUBERAY_CRDS_DIR")
    for (api_version, kind), fname in CRD_SCHEMAS.items():
        plural = fname.split(".")[0]
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on these 1 MB files
        crd = yaml.load((src / f"ray.io_{plural}.yaml").read_text(), Loader=loader)
        assert crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == api_version.split("/")[1]]
        assert v1["schema"]["openAPIV3Schema"] == crd_schema(api_version, kind), fname


def test_vendored_crd_schemas_stay_small():
    assert sum(p.stat().st_size for p in CRD_DIR.iterdir()) < 1.5e6


# --------------------------------------------------------------------------------------------------
# the checks can fail: broken copies, readable messages


W0 = "spec.workerGroupSpecs[0]"          # the cpu group
HEAD = "spec.headGroupSpec.template.spec.containers[0]"
SUBMITTER = "spec.submitterPodTemplate.spec.containers[0]"

CRD_BREAKAGES = [
    ("wrong type", "RayCluster", setting(f"{W0}.minReplicas", "zero"),
     "spec.workerGroupSpecs[0].minReplicas: 'zero' is not of type 'integer'"),
    ("required field missing", "RayCluster", removing("spec.workerGroupSpecs[1].groupName"),
     "spec.workerGroupSpecs[1]: 'groupName' is a required property"),
    ("head template missing", "RayJob", removing("spec.rayClusterSpec.headGroupSpec.template"),
     "spec.rayClusterSpec.headGroupSpec: 'template' is a required property"),
    ("misspelt field", "RayCluster", setting("spec.enableInTreeAutoScaling", True),
     "spec: Additional properties are not allowed ('enableInTreeAutoScaling' was unexpected)"),
    ("enum", "RayCluster", setting("spec.autoscalerOptions.upscalingMode", "Fast"),
     "spec.autoscalerOptions.upscalingMode: 'Fast' is not one of ['Default', 'Aggressive', 'Conservative']"),
    ("int32 overflow", "RayJob", setting("spec.ttlSecondsAfterFinished", 2**31),
     "spec.ttlSecondsAfterFinished: 2147483648 is not a 'int32'"),
    ("duplicate list-map key", "RayCluster", appending(f"{HEAD}.ports", {"name": "dash2", "containerPort": 8265}),
     "spec.headGroupSpec.template.spec.containers[0].ports: items 1 and 4 have the same key "
     "{'containerPort': 8265, 'protocol': 'TCP'}"),
    ("CEL rule", "RayJob", setting("spec.managedBy", "someone-else"),
     "spec.managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' or "
     "'kueue.x-k8s.io/multikueue'"),
    ("secret key as a number", "RayJob", setting(f"{SUBMITTER}.env[1].valueFrom.secretKeyRef.key", 7),
     f"{SUBMITTER}.env[1].valueFrom.secretKeyRef.key: 7 is not of type 'string'"),
]


@pytest.mark.parametrize("kind,edit,expected", [b[1:] for b in CRD_BREAKAGES], ids=[b[0] for b in CRD_BREAKAGES])
def test_crd_check_fails_on_a_broken_copy(kind, edit, expected):
    errors = crd_errors(broken(kind, edit))
    assert any(e.startswith(expected) for e in errors), errors


K8S_BREAKAGES = [
    ("wrong type", "RayCluster", setting(f"{W0}.template.spec.securityContext.runAsUser", "1000"),
     "spec.workerGroupSpecs[0] (cpu).template.spec.securityContext.runAsUser: '1000' is not of type 'integer'"),
    ("container without a name", "RayJob", removing(f"{SUBMITTER}.name"),
     f"{SUBMITTER}: 'name' is a required property"),
    ("misspelt field", "RayCluster", setting(f"{HEAD}.securityContext.runAsNonroot", True),
     f"{HEAD}.securityContext: Additional properties are not allowed ('runAsNonroot' was unexpected)"),
    ("autoscaler sidecar", "RayCluster",
     setting("spec.autoscalerOptions.securityContext.allowPrivilegeEscalation", "no"),
     "spec.headGroupSpec.template.spec.containers[1].securityContext.allowPrivilegeEscalation: "
     "'no' is not of type 'boolean'"),
]


@pytest.mark.parametrize("kind,edit,expected", [b[1:] for b in K8S_BREAKAGES], ids=[b[0] for b in K8S_BREAKAGES])
def test_kubernetes_check_fails_on_a_broken_copy(kind, edit, expected):
    errors = k8s_errors(broken(kind, edit))
    assert any(e.startswith(expected) for e in errors), errors


# --------------------------------------------------------------------------------------------------
# security


def test_no_secret_objects_or_credentials_in_cluster_configs():
    for path in sorted((ROOT / "cluster").rglob("*.y*ml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), f"{path}: a Secret object"
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path}: an AWS access key id"
        assert "BEGIN" not in text or "PRIVATE KEY" not in text, f"{path}: a private key"
        # `RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)` in a comment is fine; a literal value is not.
        assert not re.search(r"RAY_AUTH_TOKEN\s*=\s*[^$\s]", text), f"{path}: RAY_AUTH_TOKEN set inline"


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_no_secret_value_inlined(obj):
    assert secret_problems(obj) == []


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_containers_run_as_non_root(obj):
    assert root_problems(obj) == []


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_resources_set(obj):
    assert resource_problems(obj) == []


SECURITY_BREAKAGES = [
    ("token inlined", secret_problems, setting(f"{HEAD}.env[1]", {"name": "RAY_AUTH_TOKEN", "value": "hunter2"}),
     "spec.headGroupSpec.template container ray-head: RAY_AUTH_TOKEN must come from a Secret"),
    ("password inlined in the autoscaler", secret_problems,
     appending("spec.autoscalerOptions.env", {"name": "DB_PASSWORD", "value": "x"}),
     "spec.headGroupSpec.template container autoscaler: DB_PASSWORD must come from a Secret"),
    ("root pod", root_problems, setting("spec.workerGroupSpecs[1].template.spec.securityContext.runAsUser", 0),
     "spec.workerGroupSpecs[1] (gpu).template container ray-worker: runAsUser: 1000 in the pod securityContext"),
    ("privilege escalation", root_problems, removing(f"{HEAD}.securityContext.allowPrivilegeEscalation"),
     "spec.headGroupSpec.template container ray-head: allowPrivilegeEscalation: false"),
    ("no memory limit", resource_problems, removing(f"{W0}.template.spec.containers[0].resources.limits.memory"),
     "spec.workerGroupSpecs[0] (cpu).template container ray-worker: no resources.limits for memory"),
]


@pytest.mark.parametrize("check,edit,expected", [b[1:] for b in SECURITY_BREAKAGES],
                         ids=[b[0] for b in SECURITY_BREAKAGES])
def test_security_checks_fail_on_a_broken_copy(check, edit, expected):
    problems = check(broken("RayCluster", edit))
    assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_gpu_group_requests_gpus_and_lands_on_gpu_nodes(obj):
    groups = {g["groupName"]: g for g in cluster_spec(obj)["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= groups.keys()
    for name, g in groups.items():
        spec = g["template"]["spec"]
        gpus = spec["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if name == "gpu":
            assert int(gpus) >= 1
            assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                       for t in spec.get("tolerations", []))
            assert spec.get("nodeSelector"), "GPU pods need a nodeSelector for GPU nodes"
        else:
            assert gpus is None


# --------------------------------------------------------------------------------------------------
# wiring: token auth, S3, MLflow, autoscaling, the dashboard


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_token_auth_on_every_ray_process(obj):
    secrets = set()
    for where, c, _ in containers(obj):
        env = env_of(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{where}: RAY_AUTH_TOKEN from a Secret"
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"one token for the whole cluster: {secrets}"


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_ray_nodes_get_s3_credentials_and_the_mlflow_service(obj):
    s3_secrets = set()
    for where, c, _ in containers(obj):
        if not c["name"].startswith("ray-") or c["name"] == "ray-job-submitter":
            continue  # the autoscaler and the submitter need neither
        env = env_of(c)
        for name in S3_SECRET_ENV:
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref and "value" not in env[name], f"{where}: {name} from a Secret"
            s3_secrets.add(ref["name"])
        uri = env.get("MLFLOW_TRACKING_URI", {}).get("value", "")
        assert re.fullmatch(r"https?://[a-z][-a-z0-9.]*(:\d+)?/?", uri), f"{where}: MLFLOW_TRACKING_URI {uri!r}"
        assert not re.search(r"localhost|127\.0\.0\.1", uri), f"{where}: MLflow must be the in-cluster service"
    assert len(s3_secrets) == 1, s3_secrets


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_autoscaling_enabled_with_sane_bounds(obj):
    cs = cluster_spec(obj)
    assert cs["enableInTreeAutoscaling"] is True
    for g in cs["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        assert g["maxReplicas"] >= 1


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_head_exposes_the_dashboard_for_the_jobs_api(obj):
    head = cluster_spec(obj)["headGroupSpec"]
    ports = {p["containerPort"]: p.get("name") for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get(8265) == "dashboard"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "reach it with port-forward, not a public IP"


def _pinned_ray() -> str:
    m = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml pins ray"
    return m.group(1)


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=OBJECT_IDS)
def test_ray_version_and_image_consistent(obj):
    assert cluster_spec(obj)["rayVersion"] == _pinned_ray()
    images = {c["image"] for _, c, _ in containers(obj)}
    assert len(images) == 1, images


# --------------------------------------------------------------------------------------------------
# the RayJob runs a job spec from jobs/, through the real command line


def test_rayjob_cleans_up_after_itself():
    spec = obj_of_kind("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_entrypoint_is_a_shipyard_run_the_cli_accepts(monkeypatch):
    from shipyard import cli

    job = obj_of_kind("RayJob")
    entrypoint = job["spec"]["entrypoint"]
    # KubeRay pastes it into the submitter's shell command line: one plain command only.
    assert not re.search(r"&&|\|\||[;|&`]|\$\(", entrypoint), entrypoint
    # $VARS are expanded by the submitter's shell: they must be set there, to the head's value.
    submitter = env_of(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    head = env_of(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0])
    names = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", entrypoint)
    for name in names:
        assert submitter[name]["value"] == head[name]["value"], name
    expanded = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: submitter[m.group(1)]["value"], entrypoint)
    argv = shlex.split(expanded)
    assert argv[:2] == ["shipyard", "run"], argv
    targets = [a for a in argv[2:] if not a.startswith("-") and "=" not in a]
    assert len(targets) == 1 and (ROOT / targets[0]).is_file() and targets[0].startswith("jobs/"), targets

    seen = []
    monkeypatch.setattr(cli, "_run", lambda spec, args, resume: seen.append((spec, args)) or 0)
    monkeypatch.chdir(ROOT)  # the image's working directory is the repo root
    assert cli.main(argv[1:]) == 0
    (spec, args), = seen
    assert spec.storage.path.startswith("s3://")
    assert spec.tracking.uri == head["MLFLOW_TRACKING_URI"]["value"]
    assert args.address is None, "inside a Ray job RAY_ADDRESS names the cluster"

"""Reading cluster/kuberay/*.yaml and judging it offline: the KubeRay CRD schemas (vendored in
data/) as JSON Schema, kubernetes-validate for the Pod templates, and the security rules as checks
that return readable problems ('where: what'), [] when all is well. Used by test_manifests.py.

How a CRD's OpenAPI v3 schema is read as JSON Schema (crd_validator), and what that leaves out:
- `nullable: true` allows null; `format: int32 / int64` are range-checked.
- An object schema with `properties` and no `additionalProperties` rejects unknown fields: the API
  server prunes them, but `kubectl apply` (field validation Strict, the default since Kubernetes 1.27)
  refuses them, and a misspelt field silently doing nothing is what this check is for.
- `x-kubernetes-int-or-string`: the CRDs already spell it as anyOf [integer, string] (+ a quantity
  pattern for strings), which jsonschema checks as is.
- `x-kubernetes-list-type: set / map`: duplicates (by `x-kubernetes-list-map-keys`, missing keys
  taking their schema default, as the API server would) are errors.
- `x-kubernetes-validations` (CEL): the few rules these CRDs have are translated by hand in
  CEL_RULES; a rule not translated there is reported as an error (not skipped). Transition rules
  (those using `oldSelf`) only run on updates, so they do not apply to a newly created object.
- Not checked: defaulting (`default`), `x-kubernetes-map-type` (a server-side-apply merge hint), and
  ObjectMeta of the custom objects beyond what kubernetes-validate checks on the Pod templates.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY_DIR = ROOT / "cluster" / "kuberay"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay-crds-v1.7.0"
CRD_SCHEMAS = {("ray.io/v1", "RayCluster"): "rayclusters.ray.io-v1.json",
               ("ray.io/v1", "RayJob"): "rayjobs.ray.io-v1.json"}
# The Kubernetes version whose core/v1 schemas (shipped by kubernetes-validate) the Pod templates must
# satisfy: a recent release that the managed services (EKS, GKE, AKS) all offer.
K8S_VERSION = "1.34"

SENSITIVE_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)


# --------------------------------------------------------------------------------------------------
# loading


def kuberay_files() -> list[Path]:
    return sorted(KUBERAY_DIR.glob("*.yaml")) + sorted(KUBERAY_DIR.glob("*.yml"))


def _load_objects() -> list[tuple[str, dict]]:
    out = []
    for path in kuberay_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                is_obj = isinstance(doc, dict)
                kind, name = (doc.get("kind"), doc.get("metadata", {}).get("name")) if is_obj else ("?", i)
                out.append((f"{path.name}:{kind}/{name}", doc))
    return out


OBJECTS = _load_objects()
OBJECT_IDS = [i for i, _ in OBJECTS]


def obj_of_kind(kind: str) -> dict:
    """A deep copy of the (single) object of that kind, to break in negative tests."""
    (found,) = [o for _, o in OBJECTS if o["kind"] == kind]
    return copy.deepcopy(found)


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every Pod the object makes; the head's includes the autoscaler
    sidecar that KubeRay adds when in-tree autoscaling is on (built from autoscalerOptions)."""
    prefix = "spec.rayClusterSpec" if obj["kind"] == "RayJob" else "spec"
    cs = cluster_spec(obj)
    head = copy.deepcopy(cs["headGroupSpec"]["template"])
    if cs.get("enableInTreeAutoscaling"):
        head["spec"]["containers"].append(autoscaler_container(cs))
    out = [(f"{prefix}.headGroupSpec.template", head)]
    for i, group in enumerate(cs.get("workerGroupSpecs", [])):
        out.append((f"{prefix}.workerGroupSpecs[{i}] ({group.get('groupName')}).template", group["template"]))
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        out.append(("spec.submitterPodTemplate", obj["spec"]["submitterPodTemplate"]))
    return out


def autoscaler_container(cluster_spec: dict) -> dict:
    """The autoscaler sidecar as a Container: KubeRay copies these autoscalerOptions fields into it."""
    opts = cluster_spec.get("autoscalerOptions", {})
    head_image = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    c = {"name": "autoscaler", "image": opts.get("image", head_image)}
    for key in ("imagePullPolicy", "command", "args", "env", "envFrom", "resources", "securityContext",
                "volumeMounts"):
        if key in opts:
            c[key] = copy.deepcopy(opts[key])
    return c


def containers(obj: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, pod spec) of every container, init containers and the autoscaler included."""
    out = []
    for where, tmpl in pod_templates(obj):
        spec = tmpl["spec"]
        for key in ("initContainers", "containers"):
            for c in spec.get(key, []):
                out.append((f"{where} {key[:-1]} {c.get('name')}", c, spec))
    return out


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------------
# the CRD schema, read as JSON Schema


def _has(obj, field: str) -> bool:
    return isinstance(obj, dict) and field in obj


# Every non-transition CEL rule of the vendored CRDs, in Python (test_every_cel_rule_is_translated).
CEL_RULES = {
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not ((_has(s, "onSuccess") or _has(s, "onFailure")) and _has(s, "deletionRules")),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: (_has(s, "onSuccess") and _has(s, "onFailure")) or _has(s, "deletionRules"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not (_has(s, "jobStatus") and _has(s, "jobDeploymentStatus")),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: _has(s, "jobStatus") or _has(s, "jobDeploymentStatus"),
}


def is_transition_rule(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


def _cel(validator, rules, instance, schema):
    for r in rules:
        rule = r["rule"]
        if is_transition_rule(rule):
            continue  # evaluated by the API server on updates only
        check = CEL_RULES.get(rule)
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule not translated for the offline check "
                                             f"(add it to CEL_RULES): {rule}")
        elif not check(instance):
            yield jsonschema.ValidationError(r.get("message") or f"violates the CEL rule {rule}")


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        first: dict[tuple, int] = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in first:
                yield jsonschema.ValidationError(
                    f"items {first[key]} and {i} have the same key {dict(zip(keys, key))} "
                    f"(a list of type map, keyed by {keys})")
            first.setdefault(key, i)


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SUBSCHEMAS = ("items", "additionalProperties", "not")


def structural_to_jsonschema(node: dict) -> dict:
    """A CRD structural schema as JSON Schema draft 4 (+ the x-kubernetes-* keywords handled above)."""
    out = {}
    for k, v in node.items():
        if k in _SUBSCHEMA_MAPS:
            out[k] = {name: structural_to_jsonschema(s) for name, s in v.items()}
        elif k in _SUBSCHEMA_LISTS:
            out[k] = [structural_to_jsonschema(s) for s in v]
        elif k in _SUBSCHEMAS and isinstance(v, dict):
            out[k] = structural_to_jsonschema(v)
        else:
            out[k] = v
    if out.pop("nullable", False) is True and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-validations": _cel, "x-kubernetes-list-type": _list_type},
)


@functools.lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str) -> dict:
    return json.loads((CRD_DIR / CRD_SCHEMAS[(api_version, kind)]).read_text())


@functools.lru_cache(maxsize=None)
def crd_validator(api_version: str, kind: str):
    schema = structural_to_jsonschema(crd_schema(api_version, kind))
    return CRDValidator(schema, format_checker=_FORMATS)


def _path(parts) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "<root>"


def crd_errors(obj: dict) -> list[str]:
    """Readable problems of a custom object against its CRD schema: 'path: message', [] if valid."""
    v = crd_validator(obj["apiVersion"], obj["kind"])
    return sorted(f"{_path(e.absolute_path)}: {e.message}" for e in v.iter_errors(obj))


def k8s_errors(obj: dict) -> list[str]:
    """The first problem of each Pod template in obj against Kubernetes core/v1 (kubernetes-validate,
    strict), as 'where: message'. A template is checked as a v1 PodTemplate carrying obj's metadata."""
    problems = []
    for where, tmpl in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": copy.deepcopy(obj["metadata"]),
                   "template": tmpl}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            inner = list(e.absolute_path)
            if inner[:1] == ["template"]:
                at = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in inner[1:])
            else:
                at = _path(inner)
            problems.append(f"{at}: {e.message}")
    return problems


def broken(kind: str, edit) -> dict:
    """A copy of the object of that kind with edit(copy) applied: the negative tests' input."""
    obj = obj_of_kind(kind)
    edit(obj)
    return obj


def _parent(doc, path):
    """'a.b[0].c' (or a list of keys, for keys with dots) -> (the node holding c, 'c')."""
    keys = path if isinstance(path, list) else [int(k) if k.isdigit() else k
                                                for k in re.findall(r"[^.\[\]]+", path)]
    for k in keys[:-1]:
        doc = doc[k]
    return doc, keys[-1]


def setting(path, value):
    """An edit for broken() (and the autoscaler config's tests): set path to value."""
    def edit(doc):
        node, key = _parent(doc, path)
        node[key] = value
    return edit


def removing(path):
    """An edit for broken(): delete path."""
    def edit(doc):
        node, key = _parent(doc, path)
        del node[key]
    return edit


def appending(path, value):
    """An edit for broken(): append value to the list at path."""
    def edit(doc):
        node, key = _parent(doc, path)
        node[key].append(value)
    return edit


# --------------------------------------------------------------------------------------------------
# security rules (cluster/README.md lists them)


def secret_problems(obj: dict) -> list[str]:
    out = []
    for where, c, _ in containers(obj):
        for e in c.get("env", []):
            if SENSITIVE_ENV.search(e["name"]):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                if "value" in e or not (ref.get("name") and ref.get("key")):
                    out.append(f"{where}: {e['name']} must come from a Secret (valueFrom.secretKeyRef), "
                               "not a value")
    return out


def root_problems(obj: dict) -> list[str]:
    out = []
    for where, c, pod in containers(obj):
        pod_sc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
        checks = {
            "runAsNonRoot: true in the pod securityContext": pod_sc.get("runAsNonRoot") is True,
            "runAsUser: 1000 in the pod securityContext": pod_sc.get("runAsUser") == 1000,
            "not overridden to root": sc.get("runAsNonRoot", True) is True
                                      and sc.get("runAsUser", 1000) == 1000,
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "not privileged": sc.get("privileged") is not True,
            "capabilities drop ALL, add none": "ALL" in sc.get("capabilities", {}).get("drop", [])
                                                and not sc.get("capabilities", {}).get("add"),
            "no host namespaces": not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC")),
        }
        out += [f"{where}: {rule}" for rule, ok in checks.items() if not ok]
    return out


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTOR = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q) -> float:
    m = _QUANTITY.match(str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * _FACTOR[m.group(2)]


def resource_problems(obj: dict) -> list[str]:
    out = []
    for where, c, _ in containers(obj):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - res.get(kind, {}).keys()
            if missing:
                out.append(f"{where}: no resources.{kind} for {', '.join(sorted(missing))}")
        for r, limit in res.get("limits", {}).items():
            if quantity(res.get("requests", {}).get(r, limit)) > quantity(limit):
                out.append(f"{where}: {r} request above its limit")
    return out

"""The Ray cluster launcher config cluster/autoscaler/gpu-cluster.yaml is valid against ray-schema.json,
the schema inside the installed ray package, as `ray up` checks it (prepare_config + validate_config);
broken copies fail; and it keeps the project's rules (token auth, the pinned CUDA torch)."""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from kube_checks import removing, setting  # key paths as lists here: node type names have dots

ROOT = Path(__file__).resolve().parents[2]
AUTOSCALER_CONFIG = ROOT / "cluster" / "autoscaler" / "gpu-cluster.yaml"


@functools.lru_cache(maxsize=None)
def ray_schema() -> dict:
    import ray.autoscaler
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def autoscaler_config() -> dict:
    return yaml.safe_load(AUTOSCALER_CONFIG.read_text())


def ray_up_check(config: dict) -> None:
    """What `ray up` does before it launches anything: fill in the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(config)))


def test_autoscaler_config_valid_against_ray_schema():
    config = autoscaler_config()
    jsonschema.validate(config, ray_schema())
    ray_up_check(config)


GPU_NODE = ["available_node_types", "gpu.g5.xlarge"]
AUTOSCALER_BREAKAGES = [
    ("wrong type", setting(["max_workers"], "ten"), "'ten' is not of type 'integer'"),
    ("misspelt key", setting(["idle_timeout_minute"], 5),
     r"Additional properties are not allowed \('idle_timeout_minute' was unexpected\)"),
    ("node type without resources", removing(GPU_NODE + ["resources"]), "'resources' is a required property"),
    ("negative GPUs", setting(GPU_NODE + ["resources", "GPU"], -1), "-1 is less than the minimum of 0"),
    ("unknown head type", setting(["head_node_type"], "ray.head.gpu"),
     "`head_node_type` must be one of `available_node_types`"),
]


@pytest.mark.parametrize("edit,expected", [b[1:] for b in AUTOSCALER_BREAKAGES],
                         ids=[b[0] for b in AUTOSCALER_BREAKAGES])
def test_autoscaler_check_fails_on_a_broken_copy(edit, expected):
    config = autoscaler_config()
    edit(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=expected):
        jsonschema.validate(config, ray_schema())
        ray_up_check(config)


def test_autoscaler_gpu_node_types_and_bounds():
    config = autoscaler_config()
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert config["idle_timeout_minutes"] > 0
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "no training on the head"
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu_types)
    assert any(t["node_config"]["InstanceType"] == "g5.xlarge" for t in gpu_types)
    for name, t in types.items():
        if name != config["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name


def test_autoscaler_token_auth_and_pinned_cuda_torch():
    config = autoscaler_config()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all(re.search(r"\bRAY_AUTH_MODE=token\b", c) for c in starts), key
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token reaches every node"

    setup = "\n".join(config["setup_commands"])
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_SPEC \?= (torch==[0-9.]+)$", makefile, re.M).group(1)
    cuda_index = r"--index-url https://download\.pytorch\.org/whl/cu\d+"
    assert re.search(rf'"{re.escape(torch_pin)}" {cuda_index}', setup), \
        f"torch pinned like the Makefile ({torch_pin}), CUDA build"
    assert setup.index(torch_pin) < setup.index("install -q -e ~/shipyard"), "torch first, then the project"
    # The mounted paths exist in the repo (`ray up` runs from its root).
    for local in config["file_mounts"].values():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), local

"""The family endpoints of `shipyard serve` beyond the LayerSkip/minRNN ones: TokenFormer's
/v1/completions, UPT's /v1/fields and the Laplace classifier's /v1/classify, as three real Ray
Serve apps on 127.0.0.1 (one Serve instance, route prefixes /tokenformer, /upt, /laplace) built
from real checkpoints exactly as a Serve config file builds them, queried over HTTP and compared
with the same checkpoints' models called in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch

from s3_server import free_port
from serve_checkpoints import write_checkpoints
from serve_fuzz import bodies
from shipyard.export import load_model
from shipyard.serve import app as serving

pytestmark = pytest.mark.slow  # one Serve instance with three apps

FAMILIES = ("tokenformer", "upt", "laplace")
JOBS = {
    "tokenformer": {"model": {"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "qkv_tokens": 16,
                              "ffn_tokens": 32, "max_seq_len": 64, "init_std": 0.3},
                    "data": {"seq_len": 16}},
    "upt": {"model": {"dim": 16, "heads": 2, "encoder_depth": 1, "approximator_depth": 1,
                      "decoder_depth": 1, "latent_tokens": 4, "radius": 0.3, "max_neighbours": 8,
                      "pos_freqs": 2, "n_params": 2},
            "data": {"grid": 8, "train_trajectories": 2, "val_trajectories": 1, "snapshots": 2,
                     "dt": 0.25, "max_mode": 2, "input_points": 16, "output_points": 8,
                     "supernodes": 4}},
    "laplace": {"model": {"in_dim": 64, "hidden": 16, "depth": 1, "num_classes": 3},
                "data": {"in_classes": [0, 1, 2]},
                "laplace": {"methods": ["icla", "kfac"], "prior": "marglik", "icla_prior": "val"}},
}


def one_training_step(model, spec):
    """What training puts in a UPT checkpoint besides weights: its training normalisation."""
    from shipyard.cluster import home
    from shipyard.train.data import collate
    from shipyard_models.upt import FAMILY
    train, _ = FAMILY.datasets(spec.model, spec.data, home() / "data")
    FAMILY.loss(model, collate([train[0], train[1]]), 0, 1)


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    from ray import serve
    checkpoints = write_checkpoints(tmp_path_factory.mktemp("serve-family-runs"), FAMILIES, jobs=JOBS,
                                    before_save={"upt": one_training_step})
    port = free_port()  # outside the ephemeral range (s3_server.free_port)

    def args(family):  # the args a `--config` file carries
        options = serving.ServeOptions(checkpoint=str(checkpoints[family]), run_name=f"serve-{family}",
                                       max_tokens=32, num_cpus=0.5)
        return serving.deploy_config(options)["applications"][0]["args"]

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.RunTarget(serving.build_app(args(f)), name=f, route_prefix=f"/{f}")
                    for f in FAMILIES])
    torch.set_num_threads(1)  # as the replicas: the same kernels, so argmaxes agree exactly
    url = f"http://127.0.0.1:{port}"
    yield {"url": {f: f"{url}/{f}" for f in FAMILIES},
           "models": {f: load_model(Path(d))[0] for f, d in checkpoints.items()}}
    serve.shutdown()


def post(apps, family, path, body):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(apps["url"][family] + path, data=data,
                         headers={"Content-Type": "application/json"}, timeout=60)


def model_info(apps, family) -> dict:
    return requests.get(apps["url"][family] + "/v1/models", timeout=30).json()["data"][0]


# ---- TokenFormer --------------------------------------------------------------------------

def test_tokenformer_greedy_completion_equals_generate_and_streams_the_same_text(apps):
    prompt = "def f(x):\n"
    r = post(apps, "tokenformer", "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    model = apps["models"]["tokenformer"]
    tokens = torch.tensor([list(prompt.encode())])
    expected = bytes(model.generate(tokens, 12)[0, tokens.shape[1]:].tolist()).decode("utf-8", "replace")
    assert body["choices"][0]["text"] == expected
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": 22,
                             "decoding": "full_recompute"}
    streamed = post(apps, "tokenformer", "/v1/completions",
                    {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True})
    frames = [f for f in streamed.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    pieces = [json.loads(f[len("data: "):])["choices"][0]["text"] for f in frames[:-1]]
    assert "".join(pieces) == expected


def test_tokenformer_seeded_sampling_equals_sampling_in_process(apps):
    """A tiny random model's greedy text repeats a byte or two (the tied embedding favours the
    last token), so sampled text, which varies, checks the token loop end to end."""
    from shipyard_models.layerskip.speculative import distribution
    prompt, n = "import os\n", 16
    r = post(apps, "tokenformer", "/v1/completions",
             {"prompt": prompt, "max_tokens": n, "temperature": 0.8, "top_p": 0.9, "seed": 7})
    model, gen = apps["models"]["tokenformer"], torch.Generator().manual_seed(7)
    seq = list(prompt.encode())
    with torch.no_grad():
        for _ in range(n):
            probs = distribution(model(torch.tensor([seq]))[0, -1], 0.8, 0.9)
            seq.append(int(torch.multinomial(probs, 1, generator=gen)))
    expected = bytes(seq[len(prompt):]).decode("utf-8", "replace")
    assert len(set(expected)) > 3 and r.json()["choices"][0]["text"] == expected


def test_tokenformer_rejects_prompts_beyond_its_context(apps):
    r = post(apps, "tokenformer", "/v1/completions", {"prompt": "x" * 60, "max_tokens": 10})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"
    assert "max_seq_len" in r.json()["error"]["message"]


# ---- UPT ------------------------------------------------------------------------------------

def _upt_body(seed=0, **extra):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.rand(40, 2, generator=gen)
    values = torch.sin(2 * torch.pi * pos[:, 0]) * torch.cos(2 * torch.pi * pos[:, 1])
    query = torch.rand(7, 2, generator=gen)
    return {"input_positions": pos.tolist(), "input_values": values.tolist(),
            "params": {"log10_viscosity": -3.5, "forcing": 0.1}, "query_positions": query.tolist(),
            "horizon": 3, **extra}


def _upt_in_process(apps, body, how="latent"):
    """The model called directly: normalise as the training data did (the normalisation the
    checkpoint carries, which is the one recomputed from the data), roll out, undo."""
    from shipyard.cluster import home
    from shipyard.spec import parse_job
    from shipyard_models.upt import normalisation, normalisation_of
    info = model_info(apps, "upt")
    spec = parse_job({"name": "x", "model": {"family": "upt", **info["config"]}, "data": JOBS["upt"]["data"]})
    model = apps["models"]["upt"]
    norm, recomputed = normalisation_of(model), normalisation(spec.data, home() / "data")
    assert norm.scale == pytest.approx(recomputed.scale, rel=1e-6)
    assert norm.param_mean == pytest.approx(recomputed.param_mean, rel=1e-6)
    pos = torch.tensor(body["input_positions"])
    values = torch.tensor(body["input_values"]) / norm.scale
    params = norm.params(torch.tensor([[-3.5, 0.1]], dtype=torch.float64)).float()
    supernodes = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(body.get("seed", 0)))[:4]]
    rollout = model.rollout_latent if how == "latent" else model.rollout_physical
    out = rollout(pos[None], values[None, :, None], supernodes[None], torch.tensor([0.0]), params,
                  body["horizon"], torch.tensor(body["query_positions"])[None])
    return out[0, :, :, 0].double() * norm.scale, norm


@pytest.mark.parametrize("how", ["latent", "physical"])
def test_upt_fields_equal_the_model_rollout_in_process(apps, how):
    body = _upt_body(rollout=how, all_steps=True)
    r = post(apps, "upt", "/v1/fields", body)
    assert r.status_code == 200, r.text
    got = r.json()
    expected, norm = _upt_in_process(apps, body, how)
    # float32 model, same kernels and thread count in both processes: agreement to rounding
    torch.testing.assert_close(torch.tensor(got["steps"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert got["values"] == got["steps"][-1] and got["timestep"] == 3 and got["supernodes"] == 4
    info = model_info(apps, "upt")["upt"]
    assert info["params"] == ["log10_viscosity", "forcing"] and info["value_scale"] == pytest.approx(norm.scale)
    assert info["normalisation_source"] == "checkpoint"


def test_upt_replica_takes_the_normalisation_from_the_checkpoint_without_touching_data(tmp_path, monkeypatch):
    """In-process (no Ray): a replica of a trained checkpoint reads its units from the checkpoint
    and simulates nothing; one of an untrained checkpoint (as from before the model kept its
    normalisation) recomputes it from the job's data block."""
    from shipyard.cluster import home
    from shipyard_models.upt import normalisation
    trained = write_checkpoints(tmp_path / "trained", ("upt",), jobs=JOBS,
                                before_save={"upt": one_training_step})["upt"]
    untrained = write_checkpoints(tmp_path / "untrained", ("upt",), jobs=JOBS)["upt"]
    monkeypatch.setattr("shipyard.cluster.HOME", tmp_path / "serving-node")  # a node without the data
    served = serving.load(serving.ServeOptions(checkpoint=str(trained)))
    assert served.state["upt"]["normalisation_source"] == "checkpoint"
    assert not (home() / "data").exists() or not any((home() / "data").iterdir())
    legacy = serving.load(serving.ServeOptions(checkpoint=str(untrained)))
    assert legacy.state["upt"]["normalisation_source"] == "recomputed from data"
    assert any((home() / "data").iterdir())  # it had to simulate the training trajectories
    norm, want = served.state["upt"]["norm"], normalisation(served.spec.data, home() / "data")
    assert legacy.state["upt"]["norm"] == want and norm.scale == pytest.approx(want.scale, rel=1e-6)


def test_upt_a_query_point_does_not_depend_on_the_other_queries(apps):
    """The decoder's queries never attend to each other (the paper's 'query anywhere'): one
    point alone gets the value it gets among others."""
    body = _upt_body()
    together = post(apps, "upt", "/v1/fields", body).json()["values"]
    alone = post(apps, "upt", "/v1/fields", {**body, "query_positions": body["query_positions"][2:3]}).json()
    assert alone["values"][0] == pytest.approx(together[2], rel=1e-5, abs=1e-6)


# ---- Laplace classifier ----------------------------------------------------------------------

def test_classify_equals_the_posterior_in_process(apps):
    from shipyard_models.laplace import LaplaceConfig, digits, posthoc
    splits = digits.load([0, 1, 2], 0)
    x = torch.cat([splits.x["test"][:3], splits.ood["near"][:2]])
    r = post(apps, "laplace", "/v1/classify", {"inputs": x.tolist(), "method": "kfac"})
    assert r.status_code == 200, r.text
    got = r.json()
    model = apps["models"]["laplace"]
    phi = {k: posthoc.features(model, v) for k, v in splits.x.items()}
    cfg = LaplaceConfig(methods=("icla", "kfac"))
    post_ = posthoc.fit_method("kfac", cfg, model.head, phi["train"], splits.y["train"], phi["val"], splits.y["val"])
    p = post_.predict(posthoc.features(model, x), "probit")
    assert got["method"] == "kfac" and got["prior_precision"] == pytest.approx(post_.prior_precision, rel=1e-9)
    # the posterior is float64 on both sides; features are float32 of the same kernels
    torch.testing.assert_close(torch.tensor([q["probabilities"] for q in got["predictions"]],
                                            dtype=torch.float64), p, rtol=1e-6, atol=1e-9)
    threshold = float(torch.quantile(post_.predict(phi["val"], "probit").max(-1).values, 0.05))
    assert got["ood_threshold"] == pytest.approx(threshold, rel=1e-6)
    for q, row in zip(got["predictions"], p):
        assert q["label"] == [0, 1, 2][int(row.argmax())] and q["ood"] == (q["confidence"] < threshold)
        assert q["ood_score"] == pytest.approx(1 - float(row.max()), abs=1e-9)
        assert sum(q["map_probabilities"]) == pytest.approx(1.0)


def test_classify_default_is_icla_and_mc_matches_probit_statistically(apps):
    from shipyard_models.laplace import digits
    x = digits.load([0, 1, 2], 0).x["test"][:4].tolist()
    icla = post(apps, "laplace", "/v1/classify", {"inputs": x}).json()
    assert icla["method"] == "icla"
    described = model_info(apps, "laplace")["laplace"]
    assert set(described) == {"icla", "kfac"}
    assert described["icla"]["prior_precision"] == pytest.approx(icla["prior_precision"])
    mc = post(apps, "laplace", "/v1/classify", {"inputs": x, "predictive": "mc", "mc_samples": 10000,
                                                "seed": 3}).json()
    again = post(apps, "laplace", "/v1/classify", {"inputs": x, "predictive": "mc", "mc_samples": 10000,
                                                   "seed": 3}).json()
    assert mc == again  # seeded
    # the probit approximation vs 10^4 Monte Carlo draws: probit's own error on the digits task is
    # ~1e-2 (test_laplace's statistical check), the MC standard error < 5e-3
    for a, b in zip(icla["predictions"], mc["predictions"]):
        assert max(abs(u - v) for u, v in zip(a["probabilities"], b["probabilities"])) < 0.05


# ---- bad input, and a fuzz run, on all three -------------------------------------------------

BAD = [  # (family, path, body, status, param, words in the message)
    ("tokenformer", "/v1/completions", b"{not json", 400, None, "malformed JSON"),
    ("tokenformer", "/v1/completions", {"prompt": ""}, 422, "prompt", "at least 1"),
    ("tokenformer", "/v1/completions", {"prompt": "a", "max_tokens": 33}, 422, "max_tokens", "limit 32"),
    ("tokenformer", "/v1/completions", {"prompt": "a", "exit_layer": 1}, 422, "exit_layer", "unknown field"),
    ("tokenformer", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 422, "temperature", "finite"),
    ("upt", "/v1/fields", _upt_body(input_values=[1.0]), 422, "input_values", "one value per point"),
    ("upt", "/v1/fields", _upt_body(params={"forcing": 0.1}), 422, "params", "missing log10_viscosity"),
    ("upt", "/v1/fields", _upt_body(params={"log10_viscosity": 1, "forcing": 0, "nu": 2}), 422, "params",
     "unknown nu"),
    ("upt", "/v1/fields", _upt_body(query_positions=[[0.5, 1.5]]), 422, "query_positions", "unit torus"),
    ("upt", "/v1/fields", _upt_body(query_positions=[[0.5]]), 422, "query_positions", "[x, y]"),
    ("upt", "/v1/fields", _upt_body(horizon=0), 422, "horizon", "greater than or equal to 1"),
    ("upt", "/v1/fields", _upt_body(supernodes=41), 422, "supernodes", "40 input points"),
    ("upt", "/v1/fields", _upt_body(input_values=["1"] * 40), 422, "input_values", "valid number"),
    ("laplace", "/v1/classify", {"inputs": [[0.0] * 63]}, 422, "inputs", "64 features"),
    ("laplace", "/v1/classify", {"inputs": []}, 422, "inputs", "at least 1"),
    ("laplace", "/v1/classify", {"inputs": [[0.0] * 64], "method": "full"}, 422, "method", "fitted: icla, kfac"),
    ("laplace", "/v1/classify", {"inputs": [[0.0] * 64], "predictive": "exact"}, 422, "predictive", "'probit' or 'mc'"),
    ("laplace", "/v1/classify", {"inputs": [[0.0] * 64], "model": "other"}, 404, "model", "not served"),
    ("laplace", "/v1/classify", b'{"inputs": [[Infinity]]}', 422, "inputs", "finite"),
]


def test_bad_input_is_a_4xx_naming_the_field_and_the_servers_keep_serving(apps):
    failures = []
    for family, path, body, status, param, words in BAD:
        r = post(apps, family, path, body)
        error = r.json().get("error", {}) if r.headers.get("content-type") == "application/json" else {}
        if (r.status_code, error.get("param")) != (status, param) or words not in error.get("message", ""):
            failures.append((family, str(body)[:80], r.status_code, r.text[:300]))
    assert not failures, failures
    assert post(apps, "upt", "/v1/fields", _upt_body()).status_code == 200
    assert post(apps, "laplace", "/v1/classify", {"inputs": [[0.5] * 64]}).status_code == 200


def test_fuzz_from_the_openapi_schemas_finds_no_5xx(apps):
    statuses: dict[int, int] = {}
    for family in FAMILIES:
        spec = requests.get(apps["url"][family] + "/openapi.json", timeout=30).json()
        for path, ops in spec["paths"].items():
            if "post" not in ops:
                continue
            request = ops["post"]["requestBody"]["content"]["application/json"]["schema"]
            for raw in bodies(request, spec, n=60, seed=len(family)):
                r = requests.post(apps["url"][family] + path, data=raw,
                                  headers={"Content-Type": "application/json"}, timeout=60)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (family, raw[:300], r.status_code, r.text[:300])
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(422, 0) > 10

"""`shipyard serve` end to end: two real Ray Serve apps on 127.0.0.1 (LayerSkip at /, with a
bearer token; minRNN at /minrnn) built from real checkpoints, exactly as a Serve config file
builds them, and queried over HTTP. One Serve instance for the whole module."""
from __future__ import annotations

import json
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import requests
import torch

from s3_server import free_port
from serve_checkpoints import write_checkpoints
from serve_fuzz import bodies
from shipyard.export import load_model
from shipyard.serve import app as serving
from shipyard_models.layerskip import generate, self_speculative_generate
from shipyard_models.minrnn import decode, encode

pytestmark = pytest.mark.slow  # one Serve instance with two apps: ~40 s to start on 2 cores

MAX_TOKENS, MAX_BODY = 64, 4096
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    from ray import serve
    checkpoints = write_checkpoints(tmp_path_factory.mktemp("serve-runs"))
    token = secrets.token_hex(16)
    port = free_port()  # outside the ephemeral range (s3_server.free_port)

    def args(family, **extra):  # the args a `--config` file carries
        options = serving.ServeOptions(checkpoint=str(checkpoints[family]), run_name=f"serve-{family}",
                                       max_tokens=MAX_TOKENS, max_body_bytes=MAX_BODY, **extra)
        return serving.deploy_config(options)["applications"][0]["args"]

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([
        serve.RunTarget(serving.build_app(args("layerskip", token_sha256=serving.token_hash(token))),
                        name="layerskip", route_prefix="/"),
        serve.RunTarget(serving.build_app(args("minrnn")), name="minrnn", route_prefix="/minrnn")])
    torch.set_num_threads(1)  # as the replicas: the same kernels, so greedy argmaxes agree exactly
    models = {f: load_model(Path(d))[0] for f, d in checkpoints.items()}
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "minrnn": url + "/minrnn", "token": token, "models": models,
           "checkpoints": checkpoints, "auth": {"Authorization": f"Bearer {token}"}}
    serve.shutdown()


def post(apps, body, base=None, headers=None, **kw):
    hdrs = dict(apps["auth"] if base is None else {}, **(headers or {}))
    data = body if isinstance(body, (bytes, str)) or body is None or callable(getattr(body, "__next__", None)) \
        else json.dumps(body)
    return requests.post((base or apps["url"]) + "/v1/completions", data=data,
                         headers={"Content-Type": "application/json", **hdrs}, timeout=60, **kw)


def events(response) -> list[dict]:
    """The JSON events of a server-sent-event stream; asserts the [DONE] terminator."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in response.text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames) and frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def test_health_models_and_openapi(apps):
    assert requests.get(apps["url"] + "/healthz", timeout=30).json()["status"] == "ok"
    entry = requests.get(apps["url"] + "/v1/models", headers=apps["auth"], timeout=30).json()["data"][0]
    assert entry["id"] == "serve-layerskip" and entry["family"] == "layerskip" and entry["step"] == 0
    assert entry["checkpoint"] == str(apps["checkpoints"]["layerskip"])
    assert entry["config"]["n_layers"] == 4 and entry["run"]["name"] == "serve-layerskip"
    assert entry["limits"] == {"max_tokens": MAX_TOKENS, "max_body_bytes": MAX_BODY} and entry["auth"]
    assert requests.get(apps["minrnn"] + "/v1/models", timeout=30).json()["data"][0]["family"] == "minrnn"
    schema = requests.get(apps["url"] + "/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "max_tokens", "stream", "exit_layer", "num_speculations"} <= set(body["properties"])
    assert requests.get(apps["url"] + "/docs", timeout=30).status_code == 200


def _in_process(apps, family, mode, n, temperature=0.0, seed=None):
    """The model called directly: (text, stats) for the same request."""
    model, prompt = apps["models"][family], encode(PROMPT)[None]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if family == "minrnn":
        return decode(model.generate(prompt, n)[0, prompt.shape[1]:]), None
    if mode == "speculative":
        out, stats = self_speculative_generate(model, prompt, n, exit_layer=2, draft_len=3,
                                               temperature=temperature, generator=gen)
    else:
        out, stats = generate(model, prompt, n, exit_layer=2 if mode == "early_exit" else None)
    return decode(out[0, prompt.shape[1]:]), stats


@pytest.mark.parametrize("family,mode,extra", [
    ("layerskip", "speculative", {"exit_layer": 2, "num_speculations": 3}),
    ("layerskip", "plain", {"speculative": False}),
    ("layerskip", "early_exit", {"speculative": False, "exit_layer": 2}),
    ("minrnn", "recurrent", {}),
])
def test_greedy_completion_equals_the_model_in_process(apps, family, mode, extra):
    want, stats = _in_process(apps, family, mode, 40)
    base = apps["minrnn"] if family == "minrnn" else None
    r = post(apps, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, **extra}, base=base)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == 40
    if mode == "speculative":  # the acceptance stats are the decoding's own
        assert (usage["rounds"], usage["drafted_tokens"], usage["accepted_tokens"]) == \
            (stats.rounds, stats.drafted, stats.accepted)
        assert usage["acceptance_rate"] == pytest.approx(stats.acceptance_rate)
        assert usage["decoding"] == "self_speculative" and usage["exit_layer"] == 2


def test_default_is_self_speculative_and_seeded_sampling_matches_in_process(apps):
    r = post(apps, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9, "seed": 11,
                    "exit_layer": 2, "num_speculations": 3}).json()
    want, stats = _in_process(apps, "layerskip", "speculative", 24, temperature=0.9, seed=11)
    assert r["choices"][0]["text"] == want and r["usage"]["drafted_tokens"] == stats.drafted
    default = post(apps, {"prompt": PROMPT, "max_tokens": 8}).json()["usage"]
    assert default["decoding"] == "self_speculative" and default["exit_layer"] == 1  # L // 3


@pytest.mark.parametrize("family,stop", [("layerskip", False), ("layerskip", True),
                                         ("minrnn", False), ("minrnn", True)])
def test_streaming_yields_the_non_streaming_text(apps, family, stop):
    base = apps["minrnn"] if family == "minrnn" else None
    full, _ = _in_process(apps, family, "speculative", MAX_TOKENS)
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            **({"exit_layer": 2, "num_speculations": 3} if family == "layerskip" else {})}
    if stop:  # a stop string first seen late in the greedy text, so it cuts it
        i = next(i for i in range(3, MAX_TOKENS - 2) if full[i:i + 2] not in full[:i + 1])
        body["stop"] = ["\u00e9\u00e9", full[i:i + 2]]  # the first is outside the ASCII vocabulary
        want = full[:i]
    else:
        want = full
    whole = post(apps, body, base=base).json()
    streamed = events(post(apps, {**body, "stream": True}, base=base, stream=True))
    pieces = [e["choices"][0]["text"] for e in streamed]
    assert whole["choices"][0]["text"] == "".join(pieces) == want
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert [e["choices"][0]["finish_reason"] for e in streamed][-1] == ("stop" if stop else "length")
    assert whole["choices"][0]["finish_reason"] == streamed[-1]["choices"][0]["finish_reason"]
    assert streamed[-1]["usage"]["completion_tokens"] >= len(want)
    assert all("usage" not in e for e in streamed[:-1])


def _chunked(payload: bytes):
    for i in range(0, len(payload), 1000):
        yield payload[i:i + 1000]


BAD = [  # (body, headers, status, param, words in the message)
    (b'{"prompt": "a",', {}, 400, None, "malformed JSON"),
    (b"", {}, 400, None, "malformed JSON"),
    (b"[1, 2]", {}, 422, None, "object"),
    ({}, {}, 422, "prompt", "prompt"),
    ({"prompt": 5}, {}, 422, "prompt", "string"),
    ({"prompt": ""}, {}, 422, "prompt", "prompt"),
    ({"prompt": "caf\u00e9"}, {}, 422, "prompt", "vocabulary"),
    ({"prompt": "x" * 2040, "max_tokens": 16}, {}, 422, "prompt", "context of 2048"),  # max_seq_len
    ({"prompt": "a", "max_tokens": "8"}, {}, 422, "max_tokens", "integer"),
    ({"prompt": "a", "max_tokens": 1.5}, {}, 422, "max_tokens", "integer"),
    ({"prompt": "a", "max_tokens": 0}, {}, 422, "max_tokens", "max_tokens"),
    ({"prompt": "a", "max_tokens": MAX_TOKENS + 1}, {}, 422, "max_tokens", f"1 .. {MAX_TOKENS}"),
    (b'{"prompt": "a", "temperature": NaN}', {}, 422, "temperature", "finite"),
    (b'{"prompt": "a", "temperature": 1e999}', {}, 422, "temperature", "finite"),
    (b'{"prompt": "a", "top_p": -Infinity}', {}, 422, "top_p", "finite"),
    ({"prompt": "a", "top_p": 0}, {}, 422, "top_p", "top_p"),
    ({"prompt": "a", "temperature": True}, {}, 422, "temperature", "number"),
    ({"prompt": "a", "stop": 5}, {}, 422, "stop", "stop"),
    ({"prompt": "a", "stop": [""]}, {}, 422, "stop", "non-empty"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, {}, 422, "stop", "stop"),
    ({"prompt": "a", "stream": "yes"}, {}, 422, "stream", "boolean"),
    ({"prompt": "a", "frequency_penalty": 1}, {}, 422, "frequency_penalty", "unknown field"),
    ({"prompt": "a", "exit_layer": 4}, {}, 422, "exit_layer", "[1, 3]"),
    ({"prompt": "a", "exit_layer": 0}, {}, 422, "exit_layer", "exit_layer"),
    ({"prompt": "a", "num_speculations": 0}, {}, 422, "num_speculations", "num_speculations"),
    ({"prompt": "a", "speculative": False, "exit_layer": 5}, {}, 422, "exit_layer", "[1, 4]"),
    ({"prompt": "a", "model": "gpt-4"}, {}, 404, "model", "serve-layerskip"),
    ({"prompt": "x" * MAX_BODY}, {}, 413, "body", str(MAX_BODY)),
    (_chunked(json.dumps({"prompt": "x" * MAX_BODY}).encode()), {}, 413, "body", "limit"),
    ({"prompt": "a"}, {"Authorization": ""}, 401, "authorization", "token"),
    ({"prompt": "a"}, {"Authorization": "Bearer wrong"}, 401, "authorization", "token"),
    ({"prompt": "a"}, {"Authorization": "Basic x"}, 401, "authorization", "token"),
]


def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(apps):
    failures = []
    for body, headers, status, param, words in BAD:
        r = post(apps, body, headers=headers)
        error = r.json().get("error", {}) if r.headers.get("content-type") == "application/json" else {}
        if (r.status_code, error.get("param")) != (status, param) or words not in error.get("message", ""):
            failures.append((str(body)[:60], r.status_code, r.text[:200]))
    assert not failures, failures
    minrnn = post(apps, {"prompt": "a", "exit_layer": 2}, base=apps["minrnn"])  # LayerSkip-only field
    assert minrnn.status_code == 422 and minrnn.json()["error"]["param"] == "exit_layer"
    ok = post(apps, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_the_token_never_reaches_the_logs(apps, ray_cluster):
    post(apps, {"prompt": "a", "max_tokens": 1})
    post(apps, {"prompt": "a"}, headers={"Authorization": f"Bearer {apps['token']}x"})  # a near miss
    import ray
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    time.sleep(1)  # log files are flushed asynchronously
    leaked = [str(p) for p in logs.rglob("*") if p.is_file() and apps["token"].encode() in p.read_bytes()]
    assert list(logs.rglob("serve/*")) and not leaked


def test_load_16_clients_200_requests_no_5xx(apps):
    """A short load test: every response is a 200; p50/p99 latency is printed (not asserted)."""
    bodies_ = [{"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "speculative": i % 2 == 0}
               for i in range(200)]
    session_for: dict = {}

    def one(body):
        import threading
        session = session_for.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        r = session.post(apps["url"] + "/v1/completions", json=body, headers=apps["auth"], timeout=60)
        return r.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, b) for b in bodies_]
        done, pending = wait(futures, timeout=120)
    assert not pending, f"{len(pending)} of 200 requests unanswered after 120 s"
    codes = [f.result()[0] for f in futures]
    latencies = sorted(f.result()[1] for f in futures)
    wall = time.perf_counter() - start
    print(f"\nload: 200 requests, 16 clients: {200 / wall:.1f} req/s, "
          f"p50 {1000 * statistics.median(latencies):.0f} ms, "
          f"p99 {1000 * latencies[int(0.99 * len(latencies)) - 1]:.0f} ms, "
          f"5xx {sum(c >= 500 for c in codes)}")
    assert codes == [200] * 200


def test_minrnn_steps_of_concurrent_requests_are_batched_and_answers_unchanged(apps):
    """8 clients at once on the minRNN app: its StepBatcher runs their decoding steps as one
    batch (the replica reports the largest batch it ran) and each greedy answer still equals
    the model's own `generate` for that prompt alone."""
    prompts = [f"x = {i} * y\n" for i in range(8)]
    before = requests.get(apps["minrnn"] + "/v1/models", timeout=30).json()["data"][0]["minrnn"]["batching"]

    def one(prompt):
        return post(apps, {"prompt": prompt, "max_tokens": 24, "temperature": 0}, base=apps["minrnn"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, prompts))
    after = requests.get(apps["minrnn"] + "/v1/models", timeout=30).json()["data"][0]["minrnn"]["batching"]
    model = apps["models"]["minrnn"]
    for prompt, r in zip(prompts, answers):
        tokens = encode(prompt)[None]
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == decode(
            model.generate(tokens, 24)[0, tokens.shape[1]:]), prompt
    assert after["max_batch"] == 16 and after["steps"] > before["steps"]
    assert after["largest_batch"] > 1, after  # 8 concurrent 24-token decodings overlapped


def test_fuzz_from_the_openapi_schema_finds_no_5xx(apps):
    schema = requests.get(apps["url"] + "/openapi.json", timeout=30).json()
    statuses: dict[int, int] = {}
    for base, spec in ((apps["url"], schema),
                       (apps["minrnn"], requests.get(apps["minrnn"] + "/openapi.json", timeout=30).json())):
        for path, ops in spec["paths"].items():
            if "post" not in ops:
                continue
            request = ops["post"]["requestBody"]["content"]["application/json"]["schema"]
            for raw in bodies(request, spec, n=120, seed=len(path)):
                r = requests.post(base + path, data=raw, headers={"Content-Type": "application/json",
                                                                  **apps["auth"]}, timeout=60)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (raw[:300], r.status_code, r.text[:300])
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 10 and statuses.get(422, 0) > 10  # both valid and invalid bodies ran

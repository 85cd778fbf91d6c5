"""Serving finished checkpoints with Ray Serve: one FastAPI app per checkpoint, one contract.

`shipyard serve TARGET` resolves TARGET (checkpoint or run directory, local or s3://, MLflow run
id / prefix / name, or registered model; `target.py`), loads its consolidated `model.safetensors`
in each replica and serves it on Ray Serve; `shipyard serve TARGET --config OUT.yaml` writes the
same app as a Serve config file for `serve deploy` or a KubeRay RayService (`app.py`).

The contract every endpoint follows (later families add theirs on it):

Routes
    GET  /healthz         {"status": "ok", "model": id}; never needs a token.
    GET  /v1/models       OpenAI's list shape; the one entry also holds `family`, `job`,
                          `checkpoint`, `step`, `run` {id, name}, `registered_model`, `config`
                          (the spec's model block), `endpoints`, `limits` {max_tokens,
                          max_body_bytes}, `auth`.
    GET  /docs, /openapi.json   the OpenAPI document, request schemas included.
    POST <family endpoints>     `app.ENDPOINTS[family]`: `/v1/completions` (LayerSkip, TokenFormer,
                          minRNN; `lm.py`), `/v1/fields` (UPT; `fields.py`), `/v1/classify`
                          (classifiers with a Laplace posterior; `classify.py`), `/v1/energy`
                          (Allegro) and `/v1/properties` (Matformer; `atoms.py`).

Requests
    A JSON object, validated strictly (`protocol.Strict`): no type coercion ("3" is not 3),
    unknown fields refused, numbers finite (NaN / Infinity / 1e999 refused). A family's request
    model is a `protocol.Strict` subclass whose fields carry a `description` (it appears in the
    error message and in /docs).

/v1/completions (OpenAI-compatible; `lm.py`)
    request   prompt (non-empty string), max_tokens (1 .. server limit, default 16), temperature
              (0 = greedy .. 2, default 1), top_p ((0, 1], default 1), stop (string or up to 4
              strings; the text ends before the first), stream (bool), seed (int >= 0), model
              (optional: must be the served id), user (ignored). LayerSkip also: speculative
              (default true: self-speculative decoding), exit_layer (draft layers E in [1, L-1];
              with speculative false, early-exit decoding with E in [1, L]), num_speculations
              (drafts per round, 1 .. 64).
    response  {id, object: "text_completion", created, model, choices: [{text, index: 0,
              logprobs: null, finish_reason: "stop" | "length"}], usage: {prompt_tokens,
              completion_tokens, total_tokens, decoding, ...}}; tokens are UTF-8 bytes.
              LayerSkip self-speculative usage adds exit_layer, num_speculations, rounds,
              drafted_tokens, accepted_tokens, acceptance_rate.
    stream    `text/event-stream`: `data: {...same head, choices: [{text: piece,
              finish_reason: null}]}` per piece, then one with the finish_reason and `usage`,
              then `data: [DONE]`. The pieces join to the non-streaming text. A failure after
              the stream started ends it with `data: {"error": {...}}`.

Errors (every 4xx and 5xx body): {"error": {"message", "type", "param", "code": null}}, where
`param` names the offending field and the message names it too, with the allowed values.
    400  malformed JSON
    401  /v1/* without the right `Authorization: Bearer <token>` (when a token is set)
    404  `model` is not the served model; unknown route
    405  wrong method
    413  body above `max_body_bytes` (checked before parsing, whatever Content-Length says)
    422  a field fails validation: wrong type, missing, unknown, out of range (e.g. max_tokens
         above the limit, a prompt longer than the model's context), empty prompt, non-finite
         number; or the body is not an object
A bad request never affects the replica: it keeps serving.

Auth: `--token` or $SHIPYARD_SERVE_TOKEN. Only its SHA-256 reaches the app's arguments (and a
config file); requests are compared in constant time; no token is ever logged.
"""

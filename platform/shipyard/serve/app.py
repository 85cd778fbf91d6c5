"""The Ray Serve application: one deployment whose FastAPI ingress serves one checkpoint.

`ENDPOINTS` is the one explicit dict of what each family serves; the common routes (/healthz,
/v1/models, /docs, /openapi.json) come with every app. `ServeOptions` is everything an app is
built from; it is the `args` of `build_app`, the builder `serve deploy` imports, so
`shipyard serve` and a Serve config file build the same app.

In the replica: `ModelServer.__init__` loads the checkpoint (consolidated safetensors and
meta.json only, through `shipyard.export`), then `__serve_build_asgi_app__` builds the FastAPI
app around the loaded model and wraps it in `Guard` (bearer token, body size limit), which sees
every request before FastAPI parses anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastapi import Request  # at module level: FastAPI resolves the route's annotation here
from ray import serve

from . import atoms, classify, fields, lm
from .protocol import ApiError, Endpoint, check_model, error_body, parse

log = logging.getLogger("shipyard.serve")

TOKEN_ENV = "SHIPYARD_SERVE_TOKEN"
APP_NAME = "shipyard"

ENDPOINTS: dict[str, tuple[Endpoint, ...]] = {
    "layerskip": (Endpoint("/v1/completions", lm.LayerSkipCompletionRequest, lm.complete_layerskip,
                           "Complete a prompt (self-speculative decoding by default)"),),
    "minrnn": (Endpoint("/v1/completions", lm.CompletionRequest, lm.complete_minrnn,
                        "Complete a prompt", prepare=lm.prepare_minrnn, describe=lm.describe_minrnn),),
    "tokenformer": (Endpoint("/v1/completions", lm.CompletionRequest, lm.complete_tokenformer,
                             "Complete a prompt"),),
    "upt": (Endpoint("/v1/fields", fields.FieldsRequest, fields.predict, fields.SUMMARY,
                     prepare=fields.prepare, describe=fields.describe),),
    "laplace": (Endpoint("/v1/classify", classify.ClassifyRequest, classify.classify,
                         classify.SUMMARY, prepare=classify.prepare, describe=classify.describe),),
    "allegro": (Endpoint("/v1/energy", atoms.EnergyRequest, atoms.energy, atoms.ENERGY_SUMMARY,
                         prepare=atoms.prepare_energy, describe=atoms.describe_energy),),
    "matformer": (Endpoint("/v1/properties", atoms.PropertiesRequest, atoms.properties,
                           atoms.PROPERTIES_SUMMARY, describe=atoms.describe_properties),),
}
"""family -> the POST endpoints it serves. A family adds its endpoint here, nowhere else."""


@dataclass
class ServeOptions:
    """What a Shipyard Serve app is built from (`build_app`'s args; strict: unknown keys fail)."""

    checkpoint: str
    """A complete checkpoint directory, local or s3:// (see `target.resolve`)."""
    storage: dict | None = None
    """The run's `storage` block without credentials (those come from the environment)."""
    run_id: str | None = None
    run_name: str | None = None
    registered_model: str | None = None
    max_tokens: int = 512
    """Largest `max_tokens` a request may ask for."""
    max_body_bytes: int = 65536
    """Largest request body; bigger ones get 413 before anything parses them."""
    max_atoms: int = 256
    """Allegro / Matformer: most atoms in one posted structure (Matformer's canonical-cell search
    grows as atoms^3: about 2 s at 256 atoms on one core)."""
    token_sha256: str | None = None
    """SHA-256 (hex) of the bearer token /v1/* requires; None: the replica's $SHIPYARD_SERVE_TOKEN
    if set, else no auth. The token itself never enters the app's arguments or logs."""
    exit_layer: int | None = None
    """LayerSkip: default draft layers E (None: max(1, L // 3), as `shipyard report`)."""
    num_speculations: int = 4
    """LayerSkip: default drafts per round."""
    max_batch: int = 16
    """Recurrent LMs (minRNN): most concurrent requests whose decoding steps run as one batch
    (`lm.StepBatcher`); 1 = no batching."""
    replicas: int = 1
    autoscaling: list[int] | None = None
    """[min_replicas, max_replicas]: Serve's autoscaler instead of a fixed `replicas`."""
    target_ongoing_requests: float = 2.0
    """Autoscaling: ongoing requests per replica the autoscaler aims for."""
    num_cpus: float = 1.0
    """Logical CPUs each replica reserves."""
    threads: int = 1
    """torch threads per replica."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_body_bytes", "num_speculations", "max_batch", "replicas",
                     "threads", "max_atoms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.exit_layer is not None and (not isinstance(self.exit_layer, int) or self.exit_layer < 1):
            raise ValueError(f"exit_layer must be an integer >= 1, got {self.exit_layer!r}")
        if self.autoscaling is not None:
            a = self.autoscaling
            if (len(a) != 2 or not all(isinstance(x, int) for x in a) or not 0 <= a[0] <= a[1]
                    or a[1] < 1):
                raise ValueError(f"autoscaling must be [min_replicas, max_replicas] with "
                                 f"0 <= min <= max, max >= 1, got {a!r}")
        if self.token_sha256 is not None and (len(self.token_sha256) != 64 or any(
                c not in "0123456789abcdef" for c in self.token_sha256)):
            raise ValueError("token_sha256 must be 64 lowercase hex digits (a SHA-256)")
        if self.storage is not None and ({"access_key_id", "secret_access_key"} & set(self.storage)):
            raise ValueError("storage must not carry credentials; give them to the replicas' "
                             "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")

    @classmethod
    def from_dict(cls, args: dict) -> "ServeOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(sorted(known))}")
        return cls(**args)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Served:
    """A loaded checkpoint, as the endpoints see it."""

    model: Any
    spec: Any
    """The run's JobSpec."""
    step: int
    options: ServeOptions
    model_id: str
    endpoints: tuple[Endpoint, ...] = field(default_factory=tuple)
    state: dict = field(default_factory=dict)
    """What the endpoints' `prepare` computed at load time (see `Endpoint`)."""


def load(options: ServeOptions) -> Served:
    """Load the checkpoint's model (consolidated safetensors only) for serving."""
    import torch
    from shipyard.export import load_model, local_checkpoint
    from shipyard.spec import StorageSpec
    torch.set_num_threads(options.threads)
    storage = StorageSpec(**options.storage) if options.storage else None
    with local_checkpoint(options.checkpoint, storage) as directory:
        model, spec, meta = load_model(directory)
    if spec.family not in ENDPOINTS:
        raise ValueError(f"family {spec.family!r} has no serving endpoints yet; served families: "
                         f"{', '.join(sorted(ENDPOINTS))}")
    served = Served(model=model, spec=spec, step=meta.step, options=options,
                    model_id=options.run_name or spec.name, endpoints=ENDPOINTS[spec.family])
    for endpoint in served.endpoints:
        if endpoint.prepare is not None:
            endpoint.prepare(served)
    return served


# ---- the HTTP app -----------------------------------------------------------------------------

def make_app(served: Served, token_sha256: str | None):
    """The FastAPI app for a loaded checkpoint, wrapped in `Guard`."""
    from fastapi import FastAPI

    app = FastAPI(title=f"Shipyard: {served.model_id}", version="1",
                  description=_contract_summary(), docs_url="/docs", redoc_url=None)
    created = int(time.time())

    @app.get("/healthz", summary="Liveness: 200 while the replica serves")
    def healthz() -> dict:
        return {"status": "ok", "model": served.model_id}

    @app.get("/v1/models", summary="The served checkpoint, its run and config")
    def models() -> dict:
        o, spec = served.options, served.spec
        return {"object": "list", "data": [{
            "id": served.model_id, "object": "model", "created": created, "owned_by": "shipyard",
            "family": spec.family, "job": spec.name, "checkpoint": o.checkpoint, "step": served.step,
            "run": {"id": o.run_id, "name": o.run_name}, "registered_model": o.registered_model,
            "config": spec.to_dict()["model"],
            "endpoints": [e.path for e in served.endpoints],
            "limits": {"max_tokens": o.max_tokens, "max_body_bytes": o.max_body_bytes},
            "auth": token_sha256 is not None,
            **{spec.family: e.describe(served) for e in served.endpoints if e.describe}}]}

    components: dict[str, dict] = {}
    for endpoint in served.endpoints:
        for name, schema in _add(app, served, endpoint).items():
            if components.setdefault(name, schema) != schema:
                raise ValueError(f"two request models named {name!r} with different schemas")
    _publish_components(app, components)
    return Guard(app, served.options.max_body_bytes, token_sha256)


def _add(app, served: Served, endpoint: Endpoint) -> dict[str, dict]:
    """Route `endpoint`; returns the schemas of its request's nested models, which its request
    schema references as `#/components/schemas/<name>` (the OpenAPI document publishes them)."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    async def route(request: Request):
        try:
            body = parse(endpoint.request, await request.body())
            check_model(served, getattr(body, "model", None))  # every request body may name it
            result = await run_in_threadpool(endpoint.handle, served, body)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(_stream_errors(result), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    request_schema = endpoint.request.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = request_schema.pop("$defs", {})
    app.add_api_route(
        endpoint.path, route, methods=["POST"], summary=endpoint.summary,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": request_schema}}}},
        responses={400: {"description": "malformed JSON", "content": error},
                   401: {"description": "missing or wrong bearer token", "content": error},
                   404: {"description": "`model` is not the served one", "content": error},
                   413: {"description": "body above the byte limit", "content": error},
                   422: {"description": "a field is invalid (`param` names it)", "content": error}})
    return nested


def _publish_components(app, components: dict[str, dict]) -> None:
    """Publish the request bodies' nested models and the error body's schema under the OpenAPI
    document's `components/schemas`, where their references point."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            published = schema.setdefault("components", {}).setdefault("schemas", {})
            published.update(components)
            published["Error"] = {
                "type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "param"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": ["string", "null"]},
                                   "code": {"type": "null"}}}}}
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi


def _stream_errors(events: Iterator[str]) -> Iterator[str]:
    """A failure after the 200 went out becomes a last `error` event rather than a cut stream."""
    try:
        yield from events
    except Exception:
        log.exception("completion stream failed")
        yield f"data: {json.dumps(error_body('internal error while decoding', kind='server_error'))}\n\n"
    finally:
        events.close()


class Guard:
    """ASGI wrapper: bearer token on /v1/*, and a request body limit, before any parsing.

    The body is read here (up to the limit + 1 byte) and replayed to the app, so a lying or absent
    Content-Length cannot get a bigger body through. The token is compared as a SHA-256 in
    constant time and never logged.
    """

    def __init__(self, app, max_body_bytes: int, token_sha256: str | None):
        self.app, self.limit, self.token_sha256 = app, max_body_bytes, token_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token_sha256 and scope["path"].startswith("/v1/") and not self._authorized(headers):
            return await _send_error(send, 401, "missing or wrong bearer token (Authorization: "
                                                "Bearer <token>)", "authorization",
                                     extra=[(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, _too_large(self.limit), "body")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_error(send, 413, _too_large(self.limit), "body")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token.strip()).hexdigest(), self.token_sha256)


def _too_large(limit: int) -> str:
    return f"request body is larger than this server's limit of {limit} bytes"


async def _send_error(send, status: int, message: str, param: str | None, extra=()) -> None:
    payload = json.dumps(error_body(message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *extra]})
    await send({"type": "http.response.body", "body": payload})


def _contract_summary() -> str:
    from shipyard import serve as package
    return (package.__doc__ or "").split("\n\n", 1)[0]


# ---- the Serve deployment -----------------------------------------------------------------

@serve.deployment(name="ShipyardModel", max_ongoing_requests=16)
@serve.ingress()
class ModelServer:
    """One replica: a loaded checkpoint behind the FastAPI app."""

    def __init__(self, options: dict):
        self.options = ServeOptions.from_dict(options)
        self.served = load(self.options)
        env_token = os.environ.get(TOKEN_ENV)
        self.token_sha256 = self.options.token_sha256 or (token_hash(env_token) if env_token else None)

    def __serve_build_asgi_app__(self):
        return make_app(self.served, self.token_sha256)


def build_app(args: dict) -> serve.Application:
    """The application builder (`import_path: shipyard.serve.app:build_app`, `args`: ServeOptions)."""
    o = ServeOptions.from_dict(dict(args))
    settings: dict = {"ray_actor_options": {"num_cpus": o.num_cpus}}
    if o.autoscaling:
        settings["autoscaling_config"] = {"min_replicas": o.autoscaling[0],
                                          "max_replicas": o.autoscaling[1],
                                          "target_ongoing_requests": o.target_ongoing_requests}
    else:
        settings["num_replicas"] = o.replicas
    return ModelServer.options(**settings).bind(o.to_dict())


def deploy_config(options: ServeOptions, host: str = "0.0.0.0", port: int = 8000) -> dict:
    """A Serve config file (`serve deploy` / KubeRay RayService `serveConfigV2`), validated with
    Ray Serve's own schema. It carries no credentials and no token (only its SHA-256)."""
    from ray.serve.schema import ServeDeploySchema
    config = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
              "applications": [{"name": APP_NAME, "route_prefix": "/",
                                "import_path": "shipyard.serve.app:build_app",
                                "args": options.to_dict()}]}
    ServeDeploySchema.model_validate(config)
    return config


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Run the app on the connected Ray cluster's Serve (started on host:port if needed); returns
    its base URL once the replicas are up."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options.to_dict()), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    serve.delete(APP_NAME)

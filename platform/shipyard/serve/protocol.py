"""Wire format shared by every endpoint: validated request bodies, the error body, SSE framing.

Request bodies are parsed here, not by FastAPI, so that every failure maps to one error shape
naming the field (see the package docstring): malformed JSON -> 400, a body that is not an
object or a field that fails validation -> 422. Models are strict (no "3" for 3, no true for 1),
refuse unknown fields and non-finite numbers (`NaN`, `Infinity`, `1e999`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError


class ApiError(Exception):
    """A client error: HTTP `status`, a message, and the request field it concerns (or None)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return error_body(self.message, self.param, self.kind)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Strict(BaseModel):
    """Base of request bodies: strict types, no unknown fields, finite numbers only."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def parse(model: type[Strict], raw: bytes) -> Strict:
    """Validate a raw JSON body against `model`; an ApiError naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"malformed JSON: {first['ctx'].get('error', first['msg'])}"
                           if first.get("ctx") else f"malformed JSON: {first['msg']}") from None
        loc = [str(p) for p in first["loc"]]
        if not loc:
            raise ApiError(422, f"the request body must be a JSON object ({first['msg']})") from None
        field = loc[0]
        # a union reports one error per member (`stop.str`, `stop.list[str]`): name the field
        path = ".".join(p for p in loc if not _is_union_member(p))
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(model, loc[:-1]).model_fields)
            raise ApiError(422, f"{path}: unknown field; allowed: {allowed}", field) from None
        raise ApiError(422, f"{path}: {first['msg']}{_expected(model, field)}", field) from None


def check_model(served, model: str | None) -> None:
    """A request's optional `model` must name the served checkpoint (its id or job name): 404."""
    if model is not None and model not in (served.model_id, served.spec.name):
        raise ApiError(404, f"model: {model!r} is not served here; /v1/models lists "
                            f"{served.model_id!r}", "model", kind="not_found_error")


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel]:
    """The (nested) request model an error location points into, e.g. crystals.0 -> Crystal."""
    import typing
    for part in loc:
        info = model.model_fields.get(part)
        if info is None:
            continue  # a list index or a union member's tag
        candidates = [info.annotation]
        while candidates:
            t = candidates.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            candidates.extend(typing.get_args(t))
    return model


def _is_union_member(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or "[" in part


def _expected(model: type[Strict], field: str) -> str:
    info = model.model_fields.get(field)
    if info is None or not info.description:
        return ""
    return f" ({info.description})"


def sse(events: Iterable[dict]) -> Iterator[str]:
    """Server-sent events: one `data: <json>` per event, then `data: [DONE]` (OpenAI's framing)."""
    for event in events:
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


@dataclass(frozen=True)
class Endpoint:
    """One POST route a family serves.

    Args:
        path: the route, e.g. "/v1/completions".
        request: the body's model (its JSON schema is published in the OpenAPI document).
        handle: `handle(served, request) -> dict | Iterator[str]`, run in a worker thread: a
            JSON response, or an iterator of server-sent-event strings (`sse(...)`) to stream.
            Raise ApiError for a client mistake.
        summary: one line for /docs.
        prepare: `prepare(served)`, run once when the replica loads the checkpoint, for what the
            handler needs beyond the weights (a fitted posterior, data statistics); it keeps them
            in `served.state`. A failure fails the replica's start, not a request.
        describe: `describe(served) -> dict`, what /v1/models shows of that state (under the
            family's name).
    """

    path: str
    request: type[Strict]
    handle: Callable[[Any, Any], Any]
    summary: str
    prepare: Callable[[Any], None] | None = None
    describe: Callable[[Any], dict] | None = None


__all__ = ["ApiError", "Endpoint", "Strict", "check_model", "parse", "sse", "error_body"]

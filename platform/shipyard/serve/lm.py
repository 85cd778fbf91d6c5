"""`/v1/completions` for the byte-level language models (LayerSkip, TokenFormer, minRNN), OpenAI-compatible.

Each family contributes a token stream, `Iterator[list[int]]` of newly generated tokens, and one
function turns any such stream into the response: incremental UTF-8 decoding (invalid bytes
become U+FFFD, as `decode` does), stop strings (text is held back while it could still be the
start of one, so a stop string is never streamed), `max_tokens`, and the usage block. A
non-streaming answer is the same pieces joined, so streaming and non-streaming give the same text
by construction; the tests check it over HTTP anyway.

Token streams:
* minRNN: the prompt through the parallel scan, then one `step` per token (as `MinRNNLM.generate`);
  the steps of concurrent requests run as one batch (`StepBatcher`, `max_batch` server option).
* TokenFormer: the model has no KV cache, so each token reruns the whole sequence so far (as
  `TokenFormerLM.generate`); prompt + max_tokens must fit its `max_seq_len`, which bounds the cost.
* LayerSkip plain: prefill with the KV cache, then one token per forward (as `generate`), through
  all layers or, with `exit_layer` and `speculative: false`, the first `exit_layer` (early exit).
* LayerSkip self-speculative (the default): `self_speculative_generate` itself, run in a helper
  thread whose per-round callback hands each round's accepted tokens over; when the consumer stops
  early (a stop string), the callback raises and the decoding ends after that round.

Greedy (`temperature: 0`) answers equal the model called in-process. Sampling draws from
softmax(logits / temperature), nucleus-filtered by top_p (`speculative.distribution`); `seed`
makes it reproducible. Acceptance statistics count the rounds whose tokens were used.
"""
from __future__ import annotations

import codecs
import collections
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from pydantic import Field

from shipyard_models.layerskip import self_speculative_generate
from shipyard_models.layerskip.speculative import distribution

from .protocol import ApiError, Strict, sse

MAX_STOPS = 4


class CompletionRequest(Strict):
    """POST /v1/completions (OpenAI's fields; a prompt is one string)."""

    prompt: str = Field(min_length=1, description="the text to continue; non-empty")
    max_tokens: int = Field(16, ge=1, description="new tokens (bytes), 1 .. the server's limit")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy; at most 2")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass in (0, 1]")
    stop: str | list[str] | None = Field(
        None, description=f"up to {MAX_STOPS} non-empty strings; the text ends before the first")
    stream: bool = Field(False, description="server-sent events, one per decoded piece")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed, >= 0")
    model: str | None = Field(None, description="if given, the served model's id (/v1/models)")
    user: str | None = Field(None, max_length=256, description="ignored (OpenAI compatibility)")


class LayerSkipCompletionRequest(CompletionRequest):
    """POST /v1/completions on a LayerSkip model: self-speculative decoding by default."""

    speculative: bool = Field(True, description="self-speculative decoding (false: plain)")
    exit_layer: int | None = Field(
        None, ge=1, description="draft layers E in [1, L-1]; with speculative=false, decode "
                                "with the first E layers only (early exit), E in [1, L]")
    num_speculations: int | None = Field(None, ge=1, le=64,
                                         description="drafts per round, 1 .. 64")


@dataclass
class Sampler:
    temperature: float
    top_p: float
    generator: torch.Generator | None

    def __call__(self, logits_V: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(logits_V.argmax())
        probs = distribution(logits_V, self.temperature, self.top_p).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


# ---- token streams -------------------------------------------------------------------------

@torch.no_grad()
def minrnn_tokens(model, prompt_T: torch.Tensor, n: int, choose: Sampler,
                  step: Callable | None = None) -> Iterator[list[int]]:
    """`step(token, state [L, 1, E]) -> (logits [V], state)`: a `StepBatcher`'s, or the model's."""
    step = step or (lambda token, state: _one_step(model, token, state))
    logits_BTV, state = model(prompt_T[None])
    logits_V = logits_BTV[0, -1]
    for i in range(n):
        token = choose(logits_V)
        yield [token]
        if i < n - 1:
            logits_V, state = step(token, state)


def _one_step(model, token: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits_BV, state = model.step(torch.tensor([token], device=state.device), state)
    return logits_BV[0], state


class StepBatcher:
    """Continuous batching of recurrent decoding steps across concurrent requests.

    A recurrent LM's state has a fixed size whatever the context length (minRNN: [L, B, E]), so
    the decoding steps of different requests stack along B with no padding. There is no batching
    thread (flat combining): a request's thread queues its (token, state) and, if no batch is
    running, runs batches itself, each of the oldest queued steps (at most `max_batch`), until its
    own step is done; steps that arrive meanwhile wait, and the thread that finishes hands the
    turn to the oldest waiting one, whose step may already be done. So a lone request
    runs every step inline in its own thread, with no hand-off and no added delay, and under
    concurrency the steps queued while a batch computes form the next one. Prompts are still
    prefilled per request (the parallel scan; their lengths differ). Results equal the unbatched
    ones up to float rounding of the batched matrix products (~1e-7), so a greedy argmax can
    differ only at a near-tie.
    """

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self._queue: collections.deque = collections.deque()
        self._queue_lock = threading.Lock()  # guards _queue
        self._turn = threading.Lock()  # held by the thread running batches
        self.steps = self.batched_rows = self.largest = 0

    def step(self, token: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        item = {"token": token, "state": state, "wake": threading.Event()}
        with self._queue_lock:
            self._queue.append(item)
        while "result" not in item and "error" not in item:
            if self._turn.acquire(blocking=False):
                try:
                    while "result" not in item and "error" not in item:
                        self._run_batch()
                finally:
                    self._turn.release()
                # After the release: a step queued by a thread that found the turn taken is
                # seen here, so nobody waits on a turn that no one will hand over.
                self._hand_over()
            else:
                item["wake"].wait()
                item["wake"].clear()
        if "error" in item:
            raise item["error"]
        return item["result"]

    def _run_batch(self) -> None:
        with self._queue_lock:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
        try:
            with torch.no_grad():
                tokens = torch.tensor([item["token"] for item in batch])
                logits_BV, state = self.model.step(tokens, torch.cat([item["state"] for item in batch], 1))
            for i, item in enumerate(batch):
                item["result"] = (logits_BV[i], state[:, i:i + 1])
        except Exception as e:  # every request in the batch fails with it; the others go on
            for item in batch:
                item["error"] = e
        self.steps += 1
        self.batched_rows += len(batch)
        self.largest = max(self.largest, len(batch))
        for item in batch:
            item["wake"].set()

    def _hand_over(self) -> None:
        with self._queue_lock:
            oldest = self._queue[0] if self._queue else None
        if oldest is not None:
            oldest["wake"].set()

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "steps": self.steps, "largest_batch": self.largest,
                "mean_batch": self.batched_rows / self.steps if self.steps else 0.0}


def prepare_minrnn(served) -> None:
    if served.options.max_batch > 1:
        served.state["batcher"] = StepBatcher(served.model, served.options.max_batch)


def describe_minrnn(served) -> dict:
    batcher = served.state.get("batcher")
    return {"batching": batcher.stats() if batcher else {"max_batch": 1}}


@torch.no_grad()
def layerskip_tokens(model, prompt_T: torch.Tensor, n: int, choose: Sampler,
                     end_layer: int | None) -> Iterator[list[int]]:
    cache = model.new_cache()
    logits, _ = model(prompt_T[None], cache=cache, end_layer=end_layer)
    for i in range(n):
        token = choose(logits[0, -1])
        yield [token]
        if i < n - 1:
            logits, _ = model(torch.tensor([[token]], device=prompt_T.device), cache=cache,
                              end_layer=end_layer)


@torch.no_grad()
def tokenformer_tokens(model, prompt_T: torch.Tensor, n: int, choose: Sampler) -> Iterator[list[int]]:
    seq_BT = prompt_T[None]
    for i in range(n):
        token = choose(model(seq_BT)[0, -1])
        yield [token]
        if i < n - 1:
            seq_BT = torch.cat([seq_BT, seq_BT.new_tensor([[token]])], dim=1)


class _Cancelled(Exception):
    pass


def layerskip_speculative_tokens(model, prompt_T: torch.Tensor, n: int, choose: Sampler,
                                 exit_layer: int, draft_len: int, usage: dict
                                 ) -> Iterator[list[int]]:
    """`self_speculative_generate` in a helper thread, one list of tokens per round; fills
    `usage` with the rounds' drafted / accepted counts as they are consumed."""
    rounds: queue.Queue = queue.Queue()
    cancel = threading.Event()
    T = prompt_T.shape[0]

    sent = T

    def on_round(seq: list[int], _cache) -> None:
        nonlocal sent
        if cancel.is_set():
            raise _Cancelled
        rounds.put(("tokens", seq[sent:]))
        sent = len(seq)

    def work() -> None:
        try:
            _, stats = self_speculative_generate(
                model, prompt_T[None], n, exit_layer=exit_layer, draft_len=draft_len,
                temperature=choose.temperature, top_p=choose.top_p, generator=choose.generator,
                on_round=on_round)
            rounds.put(("done", stats))
        except _Cancelled:
            rounds.put(("cancelled", None))
        except BaseException as e:  # handed to the consumer, which raises it
            rounds.put(("error", e))

    threading.Thread(target=work, daemon=True, name="self-speculative").start()
    produced = 0
    try:
        while True:
            kind, value = rounds.get()
            if kind == "tokens":
                # a round drafts min(d, tokens still allowed) and emits its accepted drafts plus
                # one token; only the last round, cut at max_tokens, may emit one fewer (then
                # this undercounts its accepted drafts by one until "done" brings exact counts)
                drafted = min(draft_len, n - produced)
                produced += len(value)
                usage["rounds"] += 1
                usage["drafted_tokens"] += drafted
                usage["accepted_tokens"] += min(len(value) - 1, drafted)
                yield value
            elif kind == "done":  # exact counts of a decoding that ran to its end
                usage.update(rounds=value.rounds, drafted_tokens=value.drafted,
                             accepted_tokens=value.accepted)
                return
            elif kind == "error":
                raise value
            else:
                return
    finally:
        cancel.set()


# ---- from tokens to a completion ------------------------------------------------------------

def pieces(tokens: Iterator[list[int]], stops: list[str]) -> Iterator[str]:
    """Decoded text pieces of a token stream, ending before the first stop string. Returns (as
    StopIteration.value) "stop" or "length"."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    try:
        for chunk in tokens:
            text += decoder.decode(bytes(chunk))
            cut = _first_stop(text, stops)
            if cut is not None:
                if cut > sent:
                    yield text[sent:cut]
                return "stop"
            if len(text) - hold > sent:
                yield text[sent:len(text) - hold]
                sent = len(text) - hold
        text += decoder.decode(b"", final=True)
        cut = _first_stop(text, stops)
        if len(text[sent:cut]):
            yield text[sent:cut]
        return "length" if cut is None else "stop"
    finally:
        tokens.close()


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


class _Counted:
    """A token stream that counts what it hands out."""

    def __init__(self, tokens: Iterator[list[int]]):
        self.tokens, self.count = tokens, 0

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        chunk = next(self.tokens)
        self.count += len(chunk)
        return chunk

    def close(self) -> None:
        self.tokens.close()


def _respond(served, req: CompletionRequest, tokens: Iterator[list[int]], prompt_tokens: int,
             usage_extra: Callable[[], dict]):
    """The JSON completion, or (stream) its server-sent events."""
    counted = _Counted(tokens)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": served.model_id}

    def usage() -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": counted.count,
                "total_tokens": prompt_tokens + counted.count, **usage_extra()}

    def choice(text: str, finish: str | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if not req.stream:
        gen, parts = pieces(counted, stops), []
        while True:
            try:
                parts.append(next(gen))
            except StopIteration as end:
                finish = end.value
                break
        return {**head, "choices": [choice("".join(parts), finish)], "usage": usage()}

    def events():
        gen = pieces(counted, stops)
        while True:
            try:
                piece = next(gen)
            except StopIteration as end:
                yield {**head, "choices": [choice("", end.value)], "usage": usage()}
                return
            yield {**head, "choices": [choice(piece, None)]}
    return sse(events())


def _check_common(served, req: CompletionRequest) -> tuple[torch.Tensor, Sampler]:
    limit = served.options.max_tokens
    if req.max_tokens > limit:
        raise ApiError(422, f"max_tokens: {req.max_tokens} is above this server's limit "
                            f"{limit} (allowed: 1 .. {limit})", "max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop
    if stops is not None and (len(stops) > MAX_STOPS or any(s == "" for s in stops)):
        raise ApiError(422, f"stop: at most {MAX_STOPS} non-empty strings", "stop")
    prompt = torch.tensor(list(req.prompt.encode("utf-8")), dtype=torch.int64)
    vocab = served.spec.model.vocab_size
    if int(prompt.max()) >= vocab:
        raise ApiError(422, f"prompt: byte {int(prompt.max())} is outside the model's "
                            f"vocabulary of {vocab}", "prompt")
    context = getattr(served.spec.model, "max_seq_len", None)  # attention grows with T^2: bound it
    if context is not None and len(prompt) + req.max_tokens > context:
        raise ApiError(422, f"prompt: {len(prompt)} bytes + max_tokens {req.max_tokens} exceed the "
                            f"model's context of {context} tokens (max_seq_len)", "prompt")
    generator = None
    if req.temperature > 0:
        generator = torch.Generator()
        if req.seed is not None:
            generator.manual_seed(req.seed)
        else:
            generator.seed()
    return prompt, Sampler(req.temperature, req.top_p, generator)


def complete_minrnn(served, req: CompletionRequest):
    prompt, choose = _check_common(served, req)
    batcher = served.state.get("batcher")
    tokens = minrnn_tokens(served.model, prompt, req.max_tokens, choose, batcher and batcher.step)
    return _respond(served, req, tokens, len(prompt), lambda: {"decoding": "recurrent"})


def complete_tokenformer(served, req: CompletionRequest):
    prompt, choose = _check_common(served, req)
    return _respond(served, req, tokenformer_tokens(served.model, prompt, req.max_tokens, choose),
                    len(prompt), lambda: {"decoding": "full_recompute"})


def complete_layerskip(served, req: LayerSkipCompletionRequest):
    prompt, choose = _check_common(served, req)
    L = served.spec.model.n_layers
    if not req.speculative:
        E = req.exit_layer
        if E is not None and not 1 <= E <= L:
            raise ApiError(422, f"exit_layer: {E} is not in [1, {L}] (this model has {L} layers)",
                           "exit_layer")
        if req.num_speculations is not None:
            raise ApiError(422, "num_speculations: only with speculative decoding "
                                "(speculative: true)", "num_speculations")
        extra = {"decoding": "plain" if E in (None, L) else "early_exit", "exit_layer": E or L}
        tokens = layerskip_tokens(served.model, prompt, req.max_tokens, choose, E)
        return _respond(served, req, tokens, len(prompt), lambda: extra)
    if L < 2:
        raise ApiError(422, "speculative: a 1-layer model cannot draft; send speculative: false",
                       "speculative")
    E = req.exit_layer if req.exit_layer is not None else served.options.exit_layer or max(1, L // 3)
    if not 1 <= E < L:
        raise ApiError(422, f"exit_layer: {E} is not in [1, {L - 1}] (draft layers of a "
                            f"{L}-layer model)", "exit_layer")
    d = req.num_speculations or served.options.num_speculations
    usage = {"decoding": "self_speculative", "exit_layer": E, "num_speculations": d,
             "rounds": 0, "drafted_tokens": 0, "accepted_tokens": 0}
    tokens = layerskip_speculative_tokens(served.model, prompt, req.max_tokens, choose, E, d, usage)

    def with_rate() -> dict:  # as of when the usage block is written
        drafted = usage["drafted_tokens"]
        return {**usage, "acceptance_rate": usage["accepted_tokens"] / drafted if drafted else 0.0}
    return _respond(served, req, tokens, len(prompt), with_rate)

"""``preftune serve``: an OpenAI-compatible server for a trained model on uvicorn: ``/v1/chat/completions``
and ``/v1/completions`` (streamed as server-sent events or whole; completions take token-id prompts and
give per-token log-probs), ``/v1/models`` and ``/v1/models/{id}``, and vLLM's runtime LoRA endpoints
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``: an adapter is then served by its name). It takes an API key, caps bodies and ``max_tokens``, bounds its queue, cancels a
request whose client has gone, and answers OpenAI-style errors. ``background`` runs an app on loopback
in a thread (tests, local judging).

Why our own server and not ``transformers serve``: it serves what preftune trains as it was trained: a
run folder or a LoRA adapter over its base without merging (``model.load_for_inference``), prompted
through the training-time ``encode_prompt``, where message content can never produce a control token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from anyio import to_thread
from fastapi import FastAPI, Request  # Request here: FastAPI resolves the endpoints' annotations
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from peft import PeftModel
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from preftune.errors import PreftuneError
from preftune.eval.generate import cut_at_stop, generation_config, prompt_ids, stop_ids
from preftune.model import adapter_base, is_adapter

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Accepted message roles and the role the chat template sees (``developer`` is OpenAI's newer ``system``)."""
LOOPBACK_NAMES = ("localhost",)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
MAX_STOPS = 4
MAX_N = 16
MAX_LOGPROBS = 5  # OpenAI's completions allow 0..5 alternatives per token
REQUEST_LOG_LENGTH = 1000


class RequestError(Exception):
    """A bad request, answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request validation


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be a number in [{lo}, {hi}], got {value!r}", name, "invalid_value")
    return float(value)


def _content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    raise RequestError(400, f"{where}.content must be a string or a list of {{'type': 'text', 'text': string}} "
                            "parts (this server reads text only)", f"{where}.content", "invalid_value")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content} objects",
                           "messages", "missing_required_parameter" if messages is None else "invalid_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': ...}}",
                               f"messages[{i}]", "invalid_value")
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), f"messages[{i}]")})
    if out[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must come from the user (or system), not the assistant",
                           f"messages[{len(out) - 1}]", "invalid_value")
    return out


def _max_tokens(body: dict, cap: int) -> int:
    """``max_tokens`` (or ``max_completion_tokens``), clamped to the server's cap; absent -> the cap."""
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    value = body.get(name)
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"'{name}' must be a positive integer, got {value!r}", name, "invalid_value")
    return min(value, cap)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them, "
                                f"got {stop!r}", "stop", "invalid_value")
    return stops


def _seed(body: dict) -> int:
    seed = body.get("seed")
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(400, f"'seed' must be an integer in [-2**63, 2**64 - 1], got {seed!r}", "seed",
                           "invalid_value")
    return seed


def _stream(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)``."""
    stream, options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}", "stream", "invalid_value")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, "'stream_options' must be {'include_usage': bool}", "stream_options", "invalid_value")
    return stream, bool(options.get("include_usage"))


def parse_request(body: Any, cap: int, kind: str = "chat") -> dict:
    """A chat-completions (``kind="chat"``) or completions body -> its settings, or RequestError
    naming the bad field. Chat has ``messages``; completions has ``prompt`` (one string)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_json")
    stream, include_usage = _stream(body)
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N or (stream and n > 1):
        raise RequestError(400, f"'n' must be an integer in [1, {MAX_N}] (1 when streaming), got {n!r}", "n",
                           "invalid_value")
    out = {"max_tokens": _max_tokens(body, cap), "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
           "top_p": _number(body, "top_p", 0.0, 1.0, 1.0) or 1.0, "seed": _seed(body), "stop": _stop(body),
           "stream": stream, "include_usage": include_usage, "n": n, "seeded": body.get("seed") is not None,
           "model": body.get("model") if isinstance(body.get("model"), str) else None}
    if kind == "chat":
        return {**out, "messages": _messages(body), "logprobs": None}
    return {**out, "prompt": _prompt(body), "logprobs": _logprobs(body),
            "return_token_ids": body.get("return_token_ids") is True,
            "tokens_as_ids": body.get("return_tokens_as_token_ids") is True}


def _prompt(body: dict) -> str | list[int]:
    """A completions prompt: one string or one list of token ids (a list holding exactly one of either)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    is_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not is_ids and (not isinstance(prompt, str) or not prompt):
        raise RequestError(400, "'prompt' must be a non-empty string or list of token ids (or a list of exactly "
                                "one of those)", "prompt", "invalid_value")
    return prompt


def _logprobs(body: dict) -> int | None:
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}], got {value!r}", "logprobs",
                           "invalid_value")
    if body.get("stream"):
        raise RequestError(400, "'logprobs' is given only with whole (not streamed) responses here", "logprobs",
                           "unsupported_value")
    return value


MAX_JSON_DEPTH = 32
"""The deepest nesting of arrays and objects a request body may have. Checked before parsing, so the
refusal does not depend on the interpreter's recursion limit (which importing torch._dynamo raises)."""


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``raw``, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def parse_json(raw: bytes) -> Any:
    openers = raw.count(b"[") + raw.count(b"{")  # the depth's upper bound, at C speed: most bodies stop here
    if openers > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", None,
                           "invalid_json")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None


# ---------------------------------------------------------------- generation


def visible_text(text: str, stop: list[str], strip: bool, final: bool) -> tuple[str, bool]:
    """``(what of the decoded text may be sent, whether a stop string ended it)``.

    The text is cut before the first stop string. Until the end it holds back a tail that could be
    the start of a stop string, an incomplete character (``\\ufffd``) and, with ``strip``, trailing
    white space, so what is sent only grows and ends as the whole reply (stripped with ``strip``)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        text = text[: min(hits)]
    if strip:
        text = text.lstrip()
    if hits or final:
        return (text.rstrip() if strip else text), bool(hits)
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold].rstrip("\ufffd")
    return (text.rstrip() if strip else text), False


class Watch(StoppingCriteria):
    """Follows one generation token by token: sends each new piece of visible text to ``emit`` and
    stops the generation at a stop string, at an end-of-turn id, or once ``cancelled`` is set."""

    def __init__(self, tokenizer, prompt_len: int, stop_ids: list[int], stop: list[str], strip: bool,
                 cancelled: threading.Event, emit: Callable[[str], None] | None):
        self.tokenizer, self.prompt_len, self.stop_ids, self.stop, self.strip = tokenizer, prompt_len, stop_ids, stop, strip
        self.cancelled, self.emit = cancelled, emit
        self.sent, self.text, self.hit, self.new_tokens = "", "", False, 0

    def update(self, new: list[int], final: bool) -> None:
        kept = cut_at_stop(new, self.stop_ids)
        self.new_tokens = len(kept)
        decoded = self.tokenizer.decode(kept, skip_special_tokens=True)
        self.text, self.hit = visible_text(decoded, self.stop, self.strip, final or len(kept) < len(new))
        if self.emit and self.text.startswith(self.sent) and len(self.text) > len(self.sent):
            self.emit(self.text[len(self.sent):])
            self.sent = self.text

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.stop or self.emit:
            self.update(input_ids[0, self.prompt_len:].tolist(), final=False)
        done = self.hit or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate_reply(model, tokenizer, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int,
                   stop: list[str], strip: bool = True, emit: Callable[[str], None] | None = None,
                   cancelled: threading.Event | None = None, logprobs: int | None = None) -> dict:
    """One completion of prompt ``ids``: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens",
    "token_ids"}``, with ``logprobs`` (an int) also ``"logprobs"``: per new token its log-prob and the
    ``logprobs`` likeliest alternatives, from the model's raw distribution (before temperature and
    top-p, as vLLM reports them).

    Temperature 0 is greedy; sampling runs under ``seed`` in a forked RNG. ``finish_reason`` is
    ``stop`` when an end-of-turn token or a ``stop`` string ended the reply (the stop string is not
    part of it), ``length`` when ``max_tokens`` did. ``emit`` gets the text piece by piece as it
    is generated; setting ``cancelled`` ends generation after the current token."""
    stops = stop_ids(tokenizer, model)
    cfg = generation_config(model, tokenizer, max_tokens, temperature, top_p, stops)
    cfg.return_dict_in_generate, cfg.output_logits = True, logprobs is not None
    watch = Watch(tokenizer, len(ids), stops, stop, strip, cancelled or threading.Event(), emit)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg,
                             stopping_criteria=StoppingCriteriaList([watch]))
    new = out.sequences[0, len(ids):].tolist()
    watch.update(new, final=True)
    ended = watch.hit or watch.new_tokens < len(new) or len(new) < max_tokens
    kept = new[: watch.new_tokens]
    reply = {"text": watch.text, "finish_reason": "stop" if ended else "length", "prompt_tokens": len(ids),
             "completion_tokens": watch.new_tokens, "token_ids": kept}
    if logprobs is not None:
        reply["logprobs"] = token_logprobs(out.logits, kept, logprobs)
    return reply


def token_logprobs(logits: tuple[torch.Tensor, ...], new: list[int], top: int) -> list[tuple[float, list]]:
    """Per new token: ``(log p(token), [(id, log p)] of the ``top`` likeliest)`` under ``logits`` ([1, V] per step)."""
    out = []
    for step, token in zip(logits, new):
        lp = torch.log_softmax(step[0].float(), -1)
        best = lp.topk(top) if top else None
        out.append((lp[token].item(), list(zip(best.indices.tolist(), best.values.tolist())) if top else []))
    return out


def prompt_of(settings: dict, model, tokenizer) -> list[int]:
    """The prompt ids: chat messages through the training-time ``encode_prompt`` (content never yields
    a control token); a completions ``prompt`` as the raw text it is. Checked against the context."""
    if "messages" in settings:
        try:
            ids = prompt_ids(settings["messages"], tokenizer)
        except Exception as e:  # e.g. a chat template that refuses a system turn or non-alternating roles
            raise RequestError(400, f"the model's chat template rejected the messages: {e}", "messages",
                               "invalid_value") from None
    elif isinstance(settings["prompt"], list):
        ids = settings["prompt"]
        vocab = model.get_input_embeddings().num_embeddings
        if not all(0 <= t < vocab for t in ids):
            raise RequestError(400, f"'prompt' holds token ids outside the model's vocabulary [0, {vocab})", "prompt",
                               "invalid_value")
    else:
        ids = list(tokenizer.encode(settings["prompt"]))
    context = getattr(model.config, "max_position_embeddings", None)
    if context and len(ids) + settings["max_tokens"] > context:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({settings['max_tokens']}) "
                                f"exceeds the model's context of {context} tokens", "messages", "context_length_exceeded")
    return ids


class Models:
    """The served model and the LoRA adapters loaded onto it at run time, each served by its name.
    Adapters must sit on the served model (their ``base_model_name_or_path`` is its folder). Callers
    hold the engine's lock, so loading never overlaps a generation."""

    def __init__(self, model, name: str, folder: str | None, enable_lora: bool):
        self.base, self.peft, self.name, self.enable_lora = model, None, name, enable_lora
        self.folder = str(Path(folder).resolve()) if folder else None
        self.adapters: dict[str, str] = {}

    def check(self, name: str | None) -> None:
        """With LoRA enabled, a request names the served model or a loaded adapter (404 otherwise);
        without, the one model answers whatever a request names."""
        if self.enable_lora and name is not None and name != self.name and name not in self.adapters:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves {self.name!r} and the "
                                    f"adapters {sorted(self.adapters)}", "model", "model_not_found")

    @contextlib.contextmanager
    def use(self, name: str | None):
        """The model answering ``name``: its adapter switched on, or the served model (adapters off)."""
        if self.peft is None:
            yield self.base
        elif name in self.adapters:
            self.peft.set_adapter(name)
            yield self.peft
        else:
            with self.peft.disable_adapter():
                yield self.peft

    def load(self, name: str, path: str) -> None:
        """Load the adapter at ``path`` (a folder this server can read) under ``name``."""
        if not self.enable_lora:
            raise RequestError(400, "LoRA loading is off: start preftune serve with --enable-lora", "lora_name")
        if name in self.adapters or name == self.name:
            raise RequestError(400, f"the LoRA adapter {name!r} has already been loaded; unload it first", "lora_name")
        folder = Path(path).expanduser()
        if not is_adapter(folder):
            raise RequestError(400, f"lora_path {path!r} is not a LoRA adapter folder (no adapter_config.json)",
                               "lora_path")
        base = str(Path(adapter_base(folder)).resolve())
        if self.folder and base != self.folder:
            raise RequestError(400, f"the adapter at {path!r} sits on {base}, but this server serves {self.folder}",
                               "lora_path")
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(folder), adapter_name=name)
            self.peft.eval()
        self.adapters[name] = str(folder.resolve())

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise RequestError(404, f"the LoRA adapter {name!r} is not loaded (loaded: {sorted(self.adapters)})",
                               "lora_name", "not_found")
        del self.adapters[name]
        if self.adapters:
            self.peft.delete_adapter(name)
        else:  # peft cannot run with no adapter left: take the layers out again
            self.base, self.peft = self.peft.unload(), None

    def cards(self, created: int) -> list[dict]:
        card = {"object": "model", "created": created, "owned_by": "preftune"}
        return [{**card, "id": self.name, "root": self.folder or self.name, "parent": None}] + [
            {**card, "id": n, "root": p, "parent": self.name} for n, p in self.adapters.items()]


class Engine:
    """One model (and its adapters), one request at a time, behind a bounded queue.

    At most ``max_queue`` requests wait or run; the next one gets 503 with ``Retry-After`` (the mean
    of recent request times, times the queue length). A request whose client has gone is skipped if
    it is still waiting, and its generation ends at the next token if it is running."""

    def __init__(self, models: Models, tokenizer, max_queue: int):
        self.models, self.tokenizer, self.max_queue = models, tokenizer, max_queue
        self.lock = asyncio.Lock()
        self.pending = 0
        self.durations: deque[float] = deque([1.0], maxlen=20)

    def admit(self) -> None:
        if self.pending >= self.max_queue:
            wait = math.ceil(sum(self.durations) / len(self.durations) * self.pending)
            raise RequestError(503, f"the server is busy ({self.pending} requests queued, the limit); retry in "
                                    f"{wait} s", None, "server_overloaded", "server_error",
                               {"Retry-After": str(max(1, wait))})
        self.pending += 1

    def start(self, ids: list[int], settings: dict, strip: bool, cancelled: threading.Event,
              emit: Callable[[str], None] | None = None) -> asyncio.Task:
        """The task that generates for an admitted request once the model is free (None if cancelled first)."""
        return asyncio.create_task(self._run(ids, settings, strip, cancelled, emit))

    async def _run(self, ids, settings, strip, cancelled, emit) -> dict | None:
        try:
            async with self.lock:
                if cancelled.is_set():
                    return None
                start = time.monotonic()
                out = await to_thread.run_sync(lambda: self._generate(ids, settings, strip, cancelled, emit))
                self.durations.append(time.monotonic() - start)
                return out
        finally:
            self.pending -= 1

    def _generate(self, ids, settings, strip, cancelled, emit) -> dict:
        """``settings["n"]`` replies (reply ``j`` under seed + ``j``): the first one's fields, all of
        them as ``choices``, and the completion tokens summed."""
        keys = ("max_tokens", "temperature", "top_p", "stop", "logprobs")
        with self.models.use(settings["model"]) as model:
            replies = [generate_reply(model, self.tokenizer, ids, **{k: settings[k] for k in keys},
                                      seed=settings["seed"] + j, strip=strip, emit=emit, cancelled=cancelled)
                       for j in range(settings["n"])]
        return {**replies[0], "choices": replies, "completion_tokens": sum(r["completion_tokens"] for r in replies)}

    async def exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a thread once no generation runs (loading and unloading adapters)."""
        async with self.lock:
            return await to_thread.run_sync(fn)


# ---------------------------------------------------------------- responses


def _usage(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def completion_logprobs(reply: dict, tokenizer, as_ids: bool) -> dict:
    """A completions choice's ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` and
    ``text_offset``; with ``as_ids`` tokens are written ``token_id:N`` (vLLM's form)."""
    def name(t: int) -> str:
        return f"token_id:{t}" if as_ids else tokenizer.decode([t])

    tokens = [name(t) for t in reply["token_ids"]]
    offsets = [0]
    for t in tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in reply["logprobs"]],
            "top_logprobs": [{name(t): v for t, v in top} for _, top in reply["logprobs"]], "text_offset": offsets}


def whole_response(kind: str, rid: str, model_name: str, out: dict, settings: dict | None = None,
                   tokenizer=None, ids: list[int] | None = None) -> dict:
    settings = settings or {}
    choices = []
    for i, reply in enumerate(out.get("choices", [out])):
        if kind == "chat":
            choice = {"index": i, "message": {"role": "assistant", "content": reply["text"]}, "logprobs": None}
        else:
            lps = settings.get("logprobs") is not None
            choice = {"index": i, "text": reply["text"],
                      "logprobs": completion_logprobs(reply, tokenizer, settings["tokens_as_ids"]) if lps else None}
            if settings.get("return_token_ids"):
                choice |= {"prompt_token_ids": ids, "token_ids": reply["token_ids"]}
        choices.append({**choice, "finish_reason": reply["finish_reason"]})
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices, "usage": _usage(out)}


def chunk(kind: str, rid: str, model_name: str, text: str | None, finish: str | None = None,
          first: bool = False) -> dict:
    """One streamed chunk; with ``text=None`` and no ``finish``, the usage-only chunk has no choices."""
    if kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else {} if finish else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice]}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream_events(task: asyncio.Task, pieces: asyncio.Queue, cancelled: threading.Event, kind: str,
                         model_name: str, settings: dict):
    """Server-sent events for one streamed request: a chunk per piece of text as it is generated, the
    last with its ``finish_reason`` (and a usage chunk when asked), then ``[DONE]``. If the client
    goes away, Starlette cancels this generator and the ``finally`` cancels the generation."""
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        yield sse(chunk(kind, rid, model_name, "", first=True))
        while (piece := await pieces.get()) is not None:
            yield sse(chunk(kind, rid, model_name, piece))
        if task.exception() is not None:
            err = RequestError(500, f"internal error: {type(task.exception()).__name__}", None, None, "server_error")
            yield sse(err.body())
            return
        out = task.result()
        yield sse(chunk(kind, rid, model_name, None, out["finish_reason"]))
        if settings["include_usage"]:
            yield sse({**chunk(kind, rid, model_name, None), "choices": [], "usage": _usage(out)})
        yield sse("[DONE]")
    finally:
        cancelled.set()


async def _whole(task: asyncio.Task, cancelled: threading.Event, request, kind: str, model_name: str,
                 settings: dict, tokenizer, ids: list[int]) -> dict:
    """One request answered whole; the client's connection is watched and a gone client cancels it."""
    while not task.done():
        await asyncio.wait({task}, timeout=0.05)
        if not task.done() and not cancelled.is_set() and await request.is_disconnected():
            cancelled.set()
    out = task.result()
    if out is None:
        raise RequestError(499, "the client closed the request", None, "client_closed")
    return whole_response(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", model_name, out,
                          settings, tokenizer, ids)


# ---------------------------------------------------------------- the app


async def _read_body(request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           None, "request_too_large")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes", None, "request_too_large")
        chunks.append(piece)
    return b"".join(chunks)


def _authorize(request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")


def create_app(model, tokenizer, model_name: str, api_key: str | None, max_tokens_cap: int,
               max_body_bytes: int = 1_000_000, max_queue: int = 8, folder: str | None = None,
               enable_lora: bool = False, request_log: Path | None = None):
    """The FastAPI app serving ``model`` under the id ``model_name``.

    ``enable_lora`` turns on vLLM's runtime LoRA endpoints: ``POST /v1/load_lora_adapter`` with
    ``{"lora_name", "lora_path"}`` loads an adapter that sits on ``folder`` (the served model's
    folder), served from then on as the model ``lora_name`` (and a name neither served nor loaded
    gets 404); ``POST /v1/unload_lora_adapter`` with ``{"lora_name"}`` drops it. Every generation
    request's settings are kept in ``app.state.requests`` (the last 1000) and, with ``request_log``,
    appended to that JSONL file.

    With ``api_key`` every request needs ``Authorization: Bearer <key>`` (401 otherwise). Bodies over
    ``max_body_bytes`` get 413. ``max_tokens`` above ``max_tokens_cap`` is CLAMPED to the cap (not
    refused), so clients written for large models still work; a missing ``max_tokens`` means the cap.
    The one model answers whatever ``model`` a request names. Requests run one at a time behind a
    queue of ``max_queue`` (:class:`Engine`). Errors are OpenAI-style JSON."""
    app = FastAPI(title="preftune serve", docs_url=None, redoc_url=None, openapi_url=None)
    served = Models(model, model_name, folder, enable_lora)
    engine = Engine(served, tokenizer, max_queue)
    created = int(time.time())
    app.state.models, app.state.requests = served, deque(maxlen=REQUEST_LOG_LENGTH)

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        err = RequestError(exc.status_code, str(exc.detail), None, {404: "not_found"}.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        err = RequestError(500, f"internal error: {type(exc).__name__}", None, None, "server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, api_key)
        return {"object": "list", "data": served.cards(created)}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request):
        _authorize(request, api_key)
        for card in served.cards(created):
            if card["id"] == model_id:
                return card
        raise RequestError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    add_lora_routes(app, engine, api_key, max_body_bytes)

    async def answer(request: Request, kind: str):
        _authorize(request, api_key)
        settings = parse_request(parse_json(await _read_body(request, max_body_bytes)), max_tokens_cap, kind)
        served.check(settings["model"])
        ids = prompt_of(settings, model, tokenizer)
        log_request(app.state.requests, request_log, kind, settings)
        engine.admit()
        cancelled, strip = threading.Event(), kind == "chat"  # chat replies are stripped, raw completions not
        if not settings["stream"]:
            return await _whole(engine.start(ids, settings, strip, cancelled), cancelled, request, kind,
                                settings["model"] or model_name, settings, tokenizer, ids)
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        task = engine.start(ids, settings, strip, cancelled, lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p))
        task.add_done_callback(lambda _: pieces.put_nowait(None))  # after every piece: both go through the loop
        return StreamingResponse(_stream_events(task, pieces, cancelled, kind, model_name, settings),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "completion")

    return app


def add_lora_routes(app, engine: Engine, api_key: str | None, max_body_bytes: int) -> None:
    """vLLM's runtime LoRA endpoints on ``app``: loading and unloading wait for the running generation."""
    served = engine.models

    async def lora_body(request: Request, *keys: str) -> list[str]:
        _authorize(request, api_key)
        body = parse_json(await _read_body(request, max_body_bytes))
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k] for k in keys):
            raise RequestError(400, f"the body must be a JSON object with the strings {list(keys)}", keys[0],
                               "invalid_value")
        return [body[k] for k in keys]

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        name, path = await lora_body(request, "lora_name", "lora_path")
        await engine.exclusive(lambda: served.load(name, path))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        (name,) = await lora_body(request, "lora_name")
        await engine.exclusive(lambda: served.unload(name))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def log_request(requests: deque, path: Path | None, kind: str, settings: dict) -> None:
    """Keep a generation request's settings (and its prompt) in ``requests``, and append them to ``path``."""
    entry = {"endpoint": kind, "time": time.time(), **settings}
    requests.append(entry)
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- running it


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, api_key: str | None, api_key_env: str) -> None:
    """Refuse to serve beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise PreftuneError(
            f"refusing to serve on {host!r} without an API key: anyone who can reach it could use the model. "
            f"Set the environment variable {api_key_env} to a secret key (clients send 'Authorization: Bearer "
            "<key>'), or bind to 127.0.0.1."
        )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a PreftuneError that says why not."""
    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise PreftuneError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise PreftuneError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread on a free port; yields its base URL
    (``http://127.0.0.1:PORT``) once the server is accepting, and stops it on exit."""
    import uvicorn  # here, as ARCHITECTURE.md has it: only this in-process runner needs the server

    sock = listen(host, 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait(lambda: server.started or not thread.is_alive(), 30.0)
    if not server.started:
        raise PreftuneError(f"the server on {host}:{port} did not start")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait(done: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not done() and time.monotonic() < end:
        time.sleep(0.01)

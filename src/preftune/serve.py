"""``preftune serve``: an OpenAI-compatible chat endpoint (``/v1/chat/completions``, ``/v1/models``)
for a trained model on uvicorn, with an API key, body and ``max_tokens`` caps, and OpenAI-style
errors; plus ``background`` to run an app on loopback in a thread (tests, local judging)."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the endpoints' annotations here

from preftune.errors import PreftuneError

ROLES = ("system", "user", "assistant")
LOOPBACK_NAMES = ("localhost",)


class RequestError(Exception):
    """A bad request, answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

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


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content} objects",
                           "messages", "missing_required_parameter" if messages is None else "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': string}}",
                               f"messages[{i}]", "invalid_value")
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must come from the user (or system), not the assistant",
                           f"messages[{len(messages) - 1}]", "invalid_value")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _max_tokens(body: dict, cap: int) -> int:
    """``max_tokens`` (or ``max_completion_tokens``), clamped to the server's cap; absent -> the cap."""
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    value = body.get(name)
    if value is None:
        return cap
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(400, f"'{name}' must be a positive integer, got {value!r}", name, "invalid_value")
    return min(value, cap)


def parse_request(body: Any, cap: int) -> dict:
    """A chat-completions body -> generation settings, or RequestError naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_json")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported by preftune serve; send stream=false", "stream",
                           "unsupported_value")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported", "n", "unsupported_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed", "invalid_value")
    return {
        "messages": _messages(body),
        "max_tokens": _max_tokens(body, cap),
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0) or 1.0,
        "seed": seed if seed is not None else 0,
    }


# ---------------------------------------------------------------- generation


def complete(model, tokenizer, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
             seed: int) -> dict:
    """One chat completion: ``{"text", "finish_reason", "prompt_tokens", "completion_tokens"}``.

    The prompt goes through the project's chat-template function; temperature 0 is greedy;
    sampling runs under ``seed`` in a forked RNG. ``finish_reason`` is ``stop`` when an end-of-turn
    token ended the reply, ``length`` when ``max_tokens`` did."""
    import torch
    from transformers import GenerationConfig

    from preftune.eval.generate import cut_at_stop, prompt_ids, stop_ids

    try:
        ids = prompt_ids(messages, tokenizer)
    except Exception as e:  # e.g. a chat template that refuses a system turn or non-alternating roles
        raise RequestError(400, f"the model's chat template rejected the messages: {e}", "messages",
                           "invalid_value") from None
    context = getattr(model.config, "max_position_embeddings", None)
    if context and len(ids) + max_tokens > context:
        raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {context} tokens", "messages", "context_length_exceeded")
    stops = stop_ids(tokenizer, model)
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else None,
                           top_p=top_p if sample else None, top_k=None, eos_token_id=stops,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=cfg)
    new = out[0, len(ids):].tolist()
    kept = cut_at_stop(new, stops)
    return {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
            "finish_reason": "stop" if len(kept) < len(new) or len(new) < max_tokens else "length",
            "prompt_tokens": len(ids), "completion_tokens": len(kept)}


# ---------------------------------------------------------------- the app


async def _read_body(request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _authorize(request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")


def create_app(model, tokenizer, model_name: str, api_key: str | None, max_tokens_cap: int,
               max_body_bytes: int = 1_000_000):
    """The FastAPI app serving ``model``.

    With ``api_key`` every request needs ``Authorization: Bearer <key>`` (401 otherwise). Bodies over
    ``max_body_bytes`` get 413. ``max_tokens`` above ``max_tokens_cap`` is CLAMPED to the cap (not
    refused), so clients written for large models still work; a missing ``max_tokens`` means the cap.
    One model answers every ``model`` name. Generation is serialised with a lock (one model, one
    request at a time). Errors are OpenAI-style JSON."""
    from anyio import to_thread
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="preftune serve", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

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
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "preftune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        import json

        _authorize(request, api_key)
        raw = await _read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        settings = parse_request(body, max_tokens_cap)

        def run() -> dict:
            with lock:
                return complete(model, tokenizer, **settings)

        out = await to_thread.run_sync(run)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }

    return app


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


@contextlib.contextmanager
def background(app, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread on a free port; yields its base URL
    (``http://127.0.0.1:PORT``) once the server is accepting, and stops it on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
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

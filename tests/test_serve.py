"""``preftune serve`` over real HTTP: uvicorn on loopback with a tiny random Llama, no mocks."""

from __future__ import annotations

import argparse

import httpx
import pytest

from preftune.commands.tools import serve as main
from preftune.embedded import tiny_llama
from preftune.errors import PreftuneError
from preftune.eval.generate import generate
from preftune.serve import background, check_bind, create_app, is_loopback

KEY = "test-key-123"
CAP = 6
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def url(tiny):
    """A keyed server with a max_tokens cap of 6 and a 4 KB body cap."""
    model, tok = tiny
    with background(create_app(model, tok, "tiny", KEY, CAP, max_body_bytes=4096)) as base:
        yield base


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_models_lists_the_served_model(url):
    r = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny"] and r.json()["object"] == "list"


def test_chat_completion_matches_greedy_generate(url, tiny):
    """temperature 0 through HTTP = the project's greedy ``generate`` on the same messages."""
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH,
                   json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "temperature": 0, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 4 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    model, tok = tiny
    assert choice["message"]["content"] == generate(model, tok, [HELLO], 4, temperature=0.0, progress=False)[0]


def test_sampling_is_seeded(url):
    req = {"messages": HELLO, "max_tokens": CAP, "temperature": 1.0, "seed": 5}
    texts = [httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=req).json()["choices"][0]["message"]
             for _ in range(2)]
    assert texts[0] == texts[1]


def test_key_required(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = _error(httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"messages": HELLO}), 401)
        assert err["code"] == "invalid_api_key" and KEY not in err["message"]
    _error(httpx.get(f"{url}/v1/models"), 401)
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200


def test_max_tokens_clamped_to_cap(url):
    """max_tokens 10000 is clamped to the cap of 6 (documented: clamp, not 400); absent means the cap."""
    for extra in ({"max_tokens": 10_000}, {"max_completion_tokens": 10_000}, {}):
        r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH,
                       json={"messages": HELLO, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= CAP


def test_oversized_body_413(url):
    """Over the 4096-byte cap: refused from Content-Length, and also when streamed without one."""
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert _error(httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=big), 413)["code"] == \
        "request_too_large"
    chunks = (b"x" * 1024 for _ in range(8))  # chunked transfer: no Content-Length
    _error(httpx.post(f"{url}/v1/chat/completions", headers=AUTH, content=chunks), 413)


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"model": "tiny"}', "messages"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0]"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}', "stream"),
])
def test_bad_requests_400_openai_style(url, body, param):
    r = httpx.post(f"{url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    err = _error(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_unknown_route_is_openai_style(url):
    assert _error(httpx.get(f"{url}/v1/nothing", headers=AUTH), 404)["code"] == "not_found"


def test_open_server_needs_no_key(tiny):
    model, tok = tiny
    with background(create_app(model, tok, "tiny", None, 2)) as base:
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": HELLO, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_non_loopback_bind_needs_a_key(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", None, "PREFTUNE_API_KEY")
    check_bind("0.0.0.0", "secret", "PREFTUNE_API_KEY")
    with pytest.raises(PreftuneError, match="PREFTUNE_API_KEY"):
        check_bind("0.0.0.0", None, "PREFTUNE_API_KEY")
    # main() refuses before loading any model (the model name here does not even exist)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    ns = argparse.Namespace(model="/nonexistent/model", host="0.0.0.0", port=0, api_key_env="NO_SUCH_KEY_VAR",
                            max_tokens=16)
    with pytest.raises(PreftuneError, match="NO_SUCH_KEY_VAR"):
        main(ns)

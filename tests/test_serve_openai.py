"""The official ``openai`` client against ``preftune serve`` over real HTTP: in process on loopback
with a tiny random Llama, and (e2e) the ``preftune serve`` command itself in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

import preftune
from preftune.embedded import tiny_llama
from preftune.serve import background, create_app

NAME = "preftune-tiny"
HELLO = [{"role": "user", "content": "Say hello."}]
SAMPLED = dict(model=NAME, messages=HELLO, max_tokens=8, temperature=1.0, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def client(tiny):
    model, tok = tiny
    with background(create_app(model, tok, NAME, "sk-test", 8)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=60)


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_streaming_chunks_join_to_the_whole_reply(client):
    whole = client.chat.completions.create(**SAMPLED)
    chunks = list(client.chat.completions.create(**SAMPLED, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 3
    assert "".join(texts) == whole.choices[0].message.content and whole.model == NAME
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8


def test_stream_ends_in_done(client):
    """The raw event stream, through the client's own streaming response: ``data: [DONE]`` last."""
    with client.chat.completions.with_streaming_response.create(**SAMPLED, stream=True) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 5


def test_stop(client):
    text = client.chat.completions.create(**SAMPLED).choices[0].message.content
    stop = text[len(text) // 2:][:3]
    out = client.chat.completions.create(**SAMPLED, stop=[stop])
    assert out.choices[0].message.content == text[: text.find(stop)].rstrip()
    assert out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**SAMPLED, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content


def test_content_parts_and_developer_role(client):
    plain = client.chat.completions.create(**{**SAMPLED, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nhello."}]})
    parts = client.chat.completions.create(**{**SAMPLED, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]}]})
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_completions(client):
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_bad_values_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.chat.completions.create(**{**SAMPLED, "seed": 2**64})
    with pytest.raises(openai.BadRequestError, match="stop"):
        client.chat.completions.create(**SAMPLED, stop=["a", "b", "c", "d", "e"])


def test_queue_full_is_a_retryable_503(tiny, admitted_request):
    """The client sees 503 with Retry-After while the one queue place is taken; with retries it
    honours Retry-After and gets its answer once the long request is done."""
    model, tok = tiny
    with background(create_app(model, tok, NAME, None, 300, max_queue=1)) as base:
        long = admitted_request(base, {"messages": HELLO, "max_tokens": 300, "temperature": 0})
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=1)
        assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
        patient = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=8)
        assert patient.chat.completions.create(model=NAME, messages=HELLO, max_tokens=1).usage.completion_tokens == 1
        long.join()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(preftune.__file__).parents[1]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("PREFTUNE_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.e2e
def test_the_serve_command_with_a_served_name(tiny_model_dir):
    """``preftune serve DIR --port 0 --served-model-name NAME``: the client sees NAME and streams."""
    proc = _cli("serve", str(tiny_model_dir), "--port", "0", "--served-model-name", "my-model", "--max-tokens", "8")
    try:
        line = proc.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert port, line + proc.stderr.read()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port[1]}/v1", api_key="none", max_retries=0)
        for _ in range(100):  # the port is bound before the model loads; wait until uvicorn answers
            try:
                assert [m.id for m in client.models.list()] == ["my-model"]
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert client.models.retrieve("my-model").id == "my-model"
        chunks = list(client.chat.completions.create(model="my-model", messages=HELLO, max_tokens=8,
                                                     temperature=1.0, seed=1, stream=True))
        assert {c.model for c in chunks} == {"my-model"}
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_the_serve_command_refuses_a_bad_port(tiny_model_dir):
    proc = _cli("serve", str(tiny_model_dir), "--port", "99999")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip() == "preftune: error: --port must be between 0 and 65535, got 99999"

"""Shared test fixtures: the real SmolLM2 tokenizer and a tiny random Llama folder, both offline, and a
request that holds a served model's queue place."""

from __future__ import annotations

import os
import threading

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import preftune.embedded  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer random Llama with the real SmolLM2 tokenizer (a loadable HF folder)."""
    path = tmp_path_factory.mktemp("tiny")
    preftune.embedded.tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """A second tiny model (another seed): the "tuned" model of the evaluation tests."""
    path = tmp_path_factory.mktemp("tuned")
    preftune.embedded.tiny_llama(path, seed=1)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (ChatML template; EOS ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preftune.embedded.tokenizer_dir())


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models run fastest on one thread (thread start-up costs more than their matmuls);
    the subprocess tests set their own."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _admitted(url: str, body: dict, headers: dict | None = None) -> threading.Thread:
    running = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json={**body, "stream": True},
                          timeout=60) as r:
            for _ in r.iter_lines():
                running.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert running.wait(60), "the long request never streamed a line"
    return thread


@pytest.fixture
def admitted_request():
    """``start(url, body, headers=None) -> thread``: streams a chat request from a thread and returns
    once its first line has come. The server admits a request before it answers, so the request then
    holds a queue place until it ends, however fast the machine (a fixed sleep raced fast ones)."""
    return _admitted

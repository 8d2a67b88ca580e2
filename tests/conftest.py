"""Shared test fixtures: the real SmolLM2 tokenizer and a tiny random Llama folder, both offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import preftune.embedded  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer random Llama with the real SmolLM2 tokenizer (a loadable HF folder)."""
    path = tmp_path_factory.mktemp("tiny")
    preftune.embedded.tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (ChatML template; EOS ``<|im_end|>``, pad ``<|endoftext|>``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preftune.embedded.tokenizer_dir())

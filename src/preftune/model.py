"""Model and tokenizer loading: resolve a name (embedded, tiny, local folder, run folder, Hub name),
set the dtype, wrap in LoRA / QLoRA via peft, and merge adapters; which precision this machine runs fastest (``auto``). Loading never runs code from the
folder: ``trust_remote_code`` is pinned off and pickle-only weights are refused unless the config
opts in (``trust_remote_code``, ``allow_pickle``). Training and log-probs live elsewhere."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from preftune import embedded
from preftune.config import Config
from preftune.data.tokenize import use_chat_template
from preftune.env import offline
from preftune.errors import PreftuneError
from preftune.files import atomic_dir
from preftune.paths import RunDir, StageDir

log = logging.getLogger("preftune")
aten = torch.ops.aten

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}


@functools.cache
def bf16_speedup() -> float:
    """How many times faster this machine runs a bf16 matmul than an fp32 one. A CUDA GPU is not timed:
    2.0 where it has bf16 (Ampere or newer), 0.0 where it has not. A CPU is: a 256 x 256 ``torch.mm`` in
    each dtype, best of 3 (about 0.1 s even where bf16 is slow). CPUs with AMX or AVX-512 BF16 run bf16
    several times faster; CPUs without (AVX2 only) fall back to a kernel 100x slower or more."""
    if torch.cuda.is_available():
        return 2.0 if torch.cuda.is_bf16_supported() else 0.0

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        torch.mm(a, a)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


class Bf16ByFp32(TorchDispatchMode):
    """On a CPU without native bf16 (no AMX or AVX-512 BF16), the bf16 matmuls and attention run as their
    fp32 kernels on the same bf16 inputs (widened exactly) with the results rounded back to bf16: what a
    bf16 kernel that accumulates in fp32 gives, at fp32's speed instead of torch's fallback's (50-100x
    slower for a matmul, 3-4x for attention). Every other op runs as it is."""

    OUTPUTS = {aten.mm.default: (0,), aten.bmm.default: (0,), aten.addmm.default: (0,), aten.baddbmm.default: (0,),
               aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),  # (out, logsumexp: fp32)
               aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2)}
    """The ops taken, and which of their outputs are rounded back to bf16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rounded = self.OUTPUTS.get(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if rounded is None or not any(a.dtype == torch.bfloat16 and a.device.type == "cpu" for a in tensors):
            return func(*args, **kwargs)
        self.taken += 1
        wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
        out = func(*wide, **{k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v
                             for k, v in kwargs.items()})
        if isinstance(out, torch.Tensor):
            return out.to(torch.bfloat16)
        return tuple(o.to(torch.bfloat16) if i in rounded and isinstance(o, torch.Tensor) else o
                     for i, o in enumerate(out))

    taken = 0
    """bf16 ops this mode computed in fp32 (for tests and logs)."""


_fallback = threading.local()


def bf16_fallback(precision: str) -> Bf16ByFp32 | None:
    """For ``bf16`` or ``bf16-mixed`` on a CPU-only machine without native bf16: enter :class:`Bf16ByFp32`
    for the rest of this thread (once, with a log line) and return it; else None. Model loading calls it,
    so training, evaluation and generation all run bf16 at fp32's speed there."""
    if precision not in ("bf16", "bf16-mixed") or torch.cuda.is_available() or bf16_speedup() >= 1.0:
        return None
    if getattr(_fallback, "mode", None) is None:
        _fallback.mode = Bf16ByFp32()
        _fallback.mode.__enter__()  # left on for the thread: every later bf16 matmul takes the fp32 kernel
        log.warning("precision %s: this CPU has no native bf16 (bf16 matmuls %.0fx slower than fp32); bf16 matmuls "
                    "and attention run as fp32 kernels on the bf16 values, rounded back to bf16", precision,
                    1 / max(bf16_speedup(), 1e-9))
    return _fallback.mode


def auto_precision() -> str:
    """``precision: auto``: bf16-mixed where this machine runs bf16 matmuls at least 1.5x fp32's speed
    (:func:`bf16_speedup`), else fp32."""
    return "bf16-mixed" if bf16_speedup() >= 1.5 else "fp32"


def slow_bf16(precision: str) -> str | None:
    """Why ``precision`` is slow on this machine, or None: bf16 on a GPU without it. (A CPU without native
    bf16 takes :class:`Bf16ByFp32` instead, which costs about 10% over fp32.)"""
    if precision not in ("bf16", "bf16-mixed") or not torch.cuda.is_available() or bf16_speedup() >= 1.0:
        return None
    return (f"precision {precision}: this GPU has no native bf16 (Ampere or newer has), so bf16 runs emulated "
            "and slower than fp32; precision fp32, or auto, trains faster here")


def resolve_run(path: Path) -> Path:
    """A pipeline run -> its last stage; a stage run -> ``best/`` when kept, else ``final/``."""
    finished = RunDir(path).finished_stages()
    if finished:  # the last stage trained
        return resolve_run(finished[-1].root)
    if StageDir(path).is_finished():
        model = StageDir(path).model()
        if model is not None:
            return model
        raise PreftuneError(f"run folder {path} has no best/ or final/ model yet (did the run finish?)")
    return path


def resolve_model(name: str, revision: str | None = None) -> str:
    """``embedded:...``, ``tiny[:SEED]``, a local model/adapter/run folder, or a Hub name -> a local folder.
    A Hub name resolves to the snapshot of ``revision`` (a branch, tag or commit; None: main), so every
    later ``from_pretrained`` of the model and its tokenizer reads that revision's files."""
    if name == embedded.SMOLLM2:
        return str(embedded.model_dir())
    if name == "tiny" or name.startswith("tiny:"):
        seed = name.partition(":")[2]
        if seed and not seed.isdigit():
            raise PreftuneError(f"model: {name!r} is not a tiny model; the seed after 'tiny:' is a number (tiny:0, tiny:1)")
        return str(embedded.tiny_dir(int(seed) if seed else 0))
    if name.startswith("embedded:"):
        raise PreftuneError(f"unknown embedded model {name!r}; the embedded model is {embedded.SMOLLM2!r}")
    p = Path(name).expanduser()
    if p.is_file():
        raise PreftuneError(f"model: {name} is a file; pass the folder that holds the model's config.json "
                            "(or a run folder, or an adapter folder)")
    if p.exists():
        folder = resolve_run(p)
        if not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise PreftuneError(f"model: {folder} is not a model folder (no config.json or adapter_config.json); "
                                "pass a Hugging Face model folder, an adapter folder or a run folder")
        return str(folder)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PreftuneError(f"model folder not found: {name}")
    try:
        return snapshot_download(name, revision=revision, local_files_only=offline())
    except Exception as e:
        how = "offline (HF_HUB_OFFLINE=1)" if offline() else f"could not be fetched ({type(e).__name__})"
        at = f" at revision {revision!r}" if revision else ""
        raise PreftuneError(
            f"model {name!r}{at} is not a local folder and is not in the Hugging Face cache; {how}. "
            "Pass a local path to a model folder" + (", or check model_revision." if revision else ".")
        ) from None


def model_folder(cfg: Config) -> str:
    """The configured model as a local folder: ``cfg.model`` at ``cfg.model_revision``."""
    return resolve_model(cfg.model, cfg.model_revision)


def pinned_model(cfg: Config) -> str:
    """What evaluation and the pipeline name the base model by: ``cfg.model``, or with a
    ``model_revision`` the local snapshot folder of that revision (so no later load reads main)."""
    return model_folder(cfg) if cfg.model_revision else cfg.model


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    return resolve_model(base)


NOT_MODEL_FILES = frozenset({"README.md", "best.json", "snapshot.json"})  # model cards, run bookkeeping
_digests: dict[tuple, str] = {}


def content_digest(path: str | Path) -> str:
    """sha256 over a model or adapter folder's files (weights, config, tokenizer; an adapter's base
    included), so identical models share it wherever they are saved and retraining changes it. Cards
    and run bookkeeping are left out. Memoised in the process by the files' sizes and mtimes."""
    folder = Path(path).resolve()
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name not in NOT_MODEL_FILES
                   and not f.name.startswith("."))
    stamp = (str(folder), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _digests:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        if is_adapter(folder):
            h.update(content_digest(adapter_base(folder)).encode())
        _digests[stamp] = h.hexdigest()
    return _digests[stamp]


PICKLE_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")


def trust_options(cfg: Config) -> dict:
    """The config's opt-ins for :func:`load_for_inference` (both off by default), with the chat
    template the config renders prompts with (``data.chat_template``; null keeps the model's)."""
    return {"trust_remote_code": cfg.trust_remote_code, "allow_pickle": cfg.allow_pickle,
            "chat_template": cfg.data.chat_template}


def check_weights(folder: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a folder whose weights exist only as pickle (``pytorch_model.bin``, ``adapter_model.bin``):
    unpickling can run any code. ``allow_pickle`` lets it load (transformers then unpickles with
    ``weights_only=True``)."""
    folder = Path(folder)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.name.startswith(PICKLE_WEIGHTS))
    if pickles:
        raise PreftuneError(
            f"{folder} holds its weights only as pickle ({', '.join(pickles)}), and loading a pickle can run "
            "code. Convert it to safetensors (load it once where you trust it and save_pretrained with "
            "safe_serialization=True), or, if you trust where it came from, set allow_pickle: true in the "
            "config (allow_pickle=true on the command line)."
        )


@contextmanager
def _hf_errors(folder: str | Path):
    """transformers' refusal to run a folder's custom code, as an error that says how to opt in."""
    try:
        yield
    except (ValueError, OSError) as e:
        if "trust_remote_code" not in str(e):
            raise
        raise PreftuneError(
            f"{folder} ships its own Python code (auto_map in its config.json or tokenizer_config.json), which "
            "preftune does not run. Use a model that transformers supports natively, or, if you trust the "
            "code, set trust_remote_code: true in the config (trust_remote_code=true on the command line)."
        ) from None


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of a resolved folder (an adapter's base when the adapter has none); ``chat_template``
    (``data.chat_template``: Jinja text or a file) replaces its own template (tokenize.use_chat_template)."""
    folder = Path(path)
    if is_adapter(folder) and not (folder / "tokenizer_config.json").is_file():
        folder = Path(adapter_base(folder))
    with _hf_errors(folder):
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    use_chat_template(tok, chat_template)
    if tok.pad_token_id is None:
        # Batches mark padding by length, never by pad id, so reusing EOS is safe here.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _load_base(path: str, cfg: Config, trainable: bool, reward: bool = False):
    check_weights(path, cfg.allow_pickle)
    kwargs: dict = {"dtype": DTYPES[cfg.precision], "trust_remote_code": cfg.trust_remote_code}
    if reward:  # a causal LM gets a fresh scalar head (seeded); a reward model keeps its own
        kwargs["num_labels"] = 1
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.attn_implementation == "flex_attention" and trainable and not torch.cuda.is_available():
        raise PreftuneError(
            "attn_implementation 'flex_attention' cannot train on the CPU: torch's FlexAttention has no "
            "backward pass there (forward only). Use attn_implementation 'sdpa' (the same batch layouts) "
            "or train on a CUDA GPU."
        )
    if cfg.lora.quantize_4bit:
        if not torch.cuda.is_available():
            raise PreftuneError(
                "lora.quantize_4bit (QLoRA) needs a CUDA GPU: bitsandbytes 4-bit kernels do not run on the CPU. "
                "Use lora.quantize_4bit=false (plain LoRA) here."
            )
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
    with _hf_errors(path):
        model = (AutoModelForSequenceClassification if reward else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    if cfg.lora.quantize_4bit and trainable:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(cfg: Config, reward: bool = False):
    """LoRA adapters; a reward model's score head is trained whole beside them (peft's SEQ_CLS task)."""
    targets = cfg.lora.target_modules
    return PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        task_type="SEQ_CLS" if reward else "CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
    )


def load_model(cfg: Config, path: str, trainable: bool = True, gradient_checkpointing: bool = False,
               reward: bool = False):
    """Load the model at ``path`` (a resolved folder); add fresh LoRA adapters when ``cfg.lora.enabled``.
    ``reward``: as a one-label sequence classifier (a reward model) instead of a causal LM.

    An adapter folder loads onto its base (trainable when ``trainable``)."""
    if is_adapter(path):
        check_weights(path, cfg.allow_pickle)
        base = _load_base(adapter_base(path), cfg, trainable, reward)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    else:
        model = _load_base(path, cfg, trainable, reward)
        if cfg.lora.enabled and trainable:
            model = get_peft_model(model, lora_config(cfg, reward))
    if not trainable:
        model.requires_grad_(False)
    bf16_fallback(cfg.precision)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def load_for_inference(path_or_run: str, precision: str = "fp32", trust_remote_code: bool = False,
                       allow_pickle: bool = False, merge: bool = False, chat_template: str | None = None):
    """(model in eval mode, tokenizer) for generation and scoring: a run folder, an adapter (kept
    unmerged, so that it can be switched off; ``merge=True`` folds it into its base, for faster
    generation), a full model folder, or an embedded/tiny/Hub name. The opt-ins and
    ``data.chat_template`` come from :func:`trust_options`."""
    path = resolve_model(path_or_run)
    check_weights(path, allow_pickle)
    tok = load_tokenizer(path, trust_remote_code, chat_template)
    dtype = DTYPES.get(precision, torch.float32)
    bf16_fallback(precision)
    if is_adapter(path):
        base_path = adapter_base(path)
        check_weights(base_path, allow_pickle)
        with _hf_errors(base_path):
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, path)
        if merge:
            model = model.merge_and_unload()
    else:
        with _hf_errors(path):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.use_cache = True
    return model.eval(), tok


def merge_adapter(adapter: str, out: str | Path) -> Path:
    """Merge a LoRA adapter into its base and save a full model folder (written atomically)."""
    path = resolve_model(adapter)
    if not is_adapter(path):
        raise PreftuneError(f"{adapter} is not a LoRA adapter (no adapter_config.json in {path})")
    check_weights(path)
    check_weights(adapter_base(path))
    with _hf_errors(path):
        base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=torch.float32, trust_remote_code=False)
    merged = PeftModel.from_pretrained(base, path).merge_and_unload()
    tok = load_tokenizer(path)

    def write(tmp: Path):
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_dir(Path(out), write, replace=True)


def trainable_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total

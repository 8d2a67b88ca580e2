"""Loading never runs code from a model folder: custom code (auto_map) is refused even with ``y`` on
stdin, pickle-only weights are refused (a crafted pickle would create a marker file) unless the config
opts in, and model paths that are files or bad ``tiny:`` names are clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.config.validate import config_from_dict
from preftune.errors import PreftuneError
from preftune.model import load_for_inference, load_model, resolve_model
from test_checkpoint import Payload

SRC = Path(__file__).resolve().parents[1] / "src"


def custom_code_folder(tiny_model_dir: Path, dest: Path, marker: Path) -> Path:
    """The tiny model re-labelled as a custom architecture whose code, once imported, creates ``marker``."""
    shutil.copytree(tiny_model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config |= {"model_type": "evil_llama", "architectures": ["EvilForCausalLM"],
               "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return dest


def test_custom_code_never_runs_even_with_yes_on_stdin(tmp_path, tiny_model_dir):
    """`preftune generate --model FOLDER` with `y` piped in: refused, naming the opt-in; no marker."""
    marker = tmp_path / "PWNED"
    folder = custom_code_folder(tiny_model_dir, tmp_path / "custom", marker)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\neval:\n  winrate:\n    max_new_tokens: 2\n")
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "preftune.cli", "generate", str(cfg), "--model", str(folder)],
                          input="y\n" * 8, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ships its own Python code" in proc.stderr and "trust_remote_code: true" in proc.stderr


def test_custom_code_in_training_is_refused_too(tmp_path, tiny_model_dir):
    marker = tmp_path / "PWNED"
    folder = custom_code_folder(tiny_model_dir, tmp_path / "custom", marker)
    with pytest.raises(PreftuneError, match="ships its own Python code"):
        load_model(config_from_dict({}), str(folder))
    assert not marker.exists()


def pickle_only_folder(tiny_model_dir: Path, dest: Path, weights) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    torch.save(weights, dest / "pytorch_model.bin")
    return dest


def test_crafted_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    marker = tmp_path / "PWNED"
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "pickled", {"evil": Payload(marker)})
    with pytest.raises(PreftuneError, match=r"only as pickle \(pytorch_model.bin\).*allow_pickle: true"):
        load_for_inference(str(folder))
    with pytest.raises(PreftuneError, match="only as pickle"):
        load_model(config_from_dict({"lora": False}), str(folder))
    assert not marker.exists()


def test_pickle_weights_load_when_the_config_opts_in(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    (weights,) = tiny_model_dir.glob("*.safetensors")
    folder = pickle_only_folder(tiny_model_dir, tmp_path / "pickled", load_file(weights))
    model, _ = load_for_inference(str(folder), allow_pickle=True)
    want = load_file(weights)["model.embed_tokens.weight"]
    torch.testing.assert_close(model.get_input_embeddings().weight, want, rtol=0, atol=0)
    model = load_model(config_from_dict({"allow_pickle": True, "lora": False}), str(folder))
    assert model is not None


def test_model_paths_that_are_not_model_folders(tmp_path, tiny_model_dir):
    with pytest.raises(PreftuneError, match="config.json.* is a file; pass the folder"):
        resolve_model(str(tiny_model_dir / "config.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreftuneError, match="is not a model folder"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(PreftuneError, match="the seed after 'tiny:' is a number"):
        resolve_model("tiny:abc")


# ---------------------------------------------------------------- model_revision

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture
def hub_repo(tmp_path, tiny_model_dir, tuned_dir, monkeypatch):
    """A Hugging Face cache (the layout the Hub client writes) holding the repo ``preftune-test/tiny`` at
    two revisions: ``main`` (the tiny model) and the tag ``v1`` (another seed, with its own chat template)."""
    import huggingface_hub
    from transformers import AutoTokenizer

    repo = tmp_path / "hub" / "models--preftune-test--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, commit, src in (("main", MAIN, tiny_model_dir), ("v1", V1, tuned_dir)):
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    tok = AutoTokenizer.from_pretrained(repo / "snapshots" / V1)
    tok.chat_template = "V1 {{ messages[0]['content'] }}"
    tok.save_pretrained(repo / "snapshots" / V1)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return "preftune-test/tiny"


def test_model_revision_picks_the_snapshot_every_load_reads(hub_repo, tiny_model_dir, tuned_dir):
    """The model and its tokenizer both come from the pinned revision's files; without one, from main."""
    from safetensors.torch import load_file

    from preftune.model import load_tokenizer

    pinned, main = resolve_model(hub_repo, "v1"), resolve_model(hub_repo)
    assert (Path(pinned).name, Path(main).name) == (V1, MAIN)
    assert load_tokenizer(pinned).chat_template.startswith("V1")
    assert not (load_tokenizer(main).chat_template or "").startswith("V1")
    cfg = config_from_dict({"model": hub_repo, "model_revision": "v1", "lora": {"enabled": False}})
    model = load_model(cfg, pinned, trainable=False)
    want = load_file(str(tuned_dir / "model.safetensors"))
    name = next(k for k in want if k.endswith("q_proj.weight"))
    assert torch.equal(model.state_dict()[name], want[name])
    with pytest.raises(PreftuneError, match="at revision 'v2'.*check model_revision"):
        resolve_model(hub_repo, "v2")


def test_model_revision_is_recorded_in_run_json_and_the_card(hub_repo, tmp_path, monkeypatch):
    from preftune.card import lineage
    from preftune.model import model_folder
    from preftune.train import run_stage
    from test_train import make_cfg

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, hub_repo, **{"model_revision": "v1", "dpo.max_steps": 1})
    summary = run_stage(cfg, "dpo", Path(cfg.output_dir), model_folder(cfg))
    run = json.loads((Path(cfg.output_dir) / "run.json").read_text())
    assert run["model_revision"] == summary["model_revision"] == "v1"
    assert Path(run["base_model"]).name == V1
    assert "`preftune-test/tiny` at revision `v1`" in lineage(cfg, run)


def test_auto_precision_follows_the_machines_bf16_speed(monkeypatch):
    """``precision: auto`` resolves at config load: bf16-mixed where bf16 matmuls run at least 1.5x fp32
    (AMX, a bf16 GPU), else fp32; the real probe and the config agree on this machine."""
    import preftune.model as model_module

    real = model_module.bf16_speedup()
    assert real > 0
    assert config_from_dict({"precision": "auto"}).precision == ("bf16-mixed" if real >= 1.5 else "fp32")
    monkeypatch.setattr(model_module, "bf16_speedup", lambda: 0.02)  # an AVX2-only CPU: bf16 50x slower
    assert config_from_dict({"precision": "auto"}).precision == "fp32"
    monkeypatch.setattr(model_module, "bf16_speedup", lambda: 3.2)  # AMX
    assert config_from_dict({"precision": "auto"}).precision == "bf16-mixed"
    assert config_from_dict({"precision": "fp32"}).precision == "fp32"


def test_bf16_by_fp32_kernels_rounds_as_a_bf16_kernel_would(tiny_model_dir):
    """Bf16ByFp32 (bf16 on a CPU without native bf16): a bf16 matmul is the fp32 product of the same
    bf16 values rounded to bf16, exactly; a tiny model's bf16-autocast forward and backward under it
    agree with torch's own bf16 kernels within bf16 rounding, and every matmul and attention was taken."""
    from preftune.model import Bf16ByFp32

    torch.manual_seed(0)
    a, b = torch.randn(64, 96).bfloat16(), torch.randn(96, 32).bfloat16()
    with Bf16ByFp32() as mode:
        got = a @ b
    assert got.dtype == torch.bfloat16 and mode.taken == 1
    assert torch.equal(got, (a.float() @ b.float()).bfloat16())
    model = load_for_inference(str(tiny_model_dir))[0].float()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train().requires_grad_(True)
    native_loss, native = grads()
    with Bf16ByFp32() as mode:
        loss, emulated = grads()
    assert mode.taken > 10  # every linear layer, forward and backward, and the attention
    assert abs(loss.item() - native_loss.item()) < 2e-2
    for g, n in zip(emulated, native):
        assert torch.allclose(g, n, rtol=5e-2, atol=5e-3)

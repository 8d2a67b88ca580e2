"""The preflight: it passes on every loss of the table, every layout and every reference strategy in fp32
and bf16 on the tiny model (one batch each, no training); each check made to fail on purpose (a stale
reference cache, off-by-one score positions, a template that doubles BOS, a completion cut to nothing,
an option the path ignores) stops the run before step 1, naming the check; its results reach run.json
and the model card; ``--no-preflight`` skips it and says so."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from preftune import preflight
from preftune.data import collate as collation
from preftune.data.stage import stage_bins
from preftune.losses import LOSSES
from preftune.reference import read_table, write_table
from preftune.train import run_stage, setup
from test_train import make_cfg, metrics

PAIRED = [n for n, spec in LOSSES.items() if not spec.unpaired]
UNPAIRED = [n for n, spec in LOSSES.items() if spec.unpaired]
REFERENCE_FREE = [n for n in PAIRED if not LOSSES[n].needs_reference]
LAYOUTS = list(collation.LAYOUTS)


def _stage(tmp: Path, model: Path, **over):
    """A set-up stage (data, model, layout, reference) with its preflight left to the test."""
    cfg = make_cfg(tmp, str(model), **over)
    return setup(cfg, "dpo", Path(cfg.output_dir), str(model), preflight=None)


def _variant(st, loss: str | None = None, layout: str | None = None):
    """The same stage with another loss or layout (its reference, model and data kept)."""
    s = st.stage_cfg if loss is None else dataclasses.replace(st.stage_cfg, loss=loss)
    layout = layout or st.layout
    return dataclasses.replace(st, stage_cfg=s, layout=layout, bins=stage_bins(st.data.train, s, layout),
                               collate=st.method.collate(s, layout, st.tokenizer.pad_token_id))


# (strategy, settings, the variants it runs: (loss, layout) pairs). A precomputed reference is built per
# layout: in bf16 it is computed on, and keyed by, the run's own micro-batches. Every paired loss runs on
# the default layout; the others' paths do not depend on the loss.
CASES = {
    **{f"precomputed-{lay}": ({"dpo.reference": "precomputed", "lora.enabled": False, "dpo.layout": lay},
                              [(loss, None) for loss in (PAIRED if lay == "prefix_shared" else ["sigmoid"])])
       for lay in LAYOUTS},
    "copy": ({"dpo.reference": "copy", "lora.enabled": False}, [("sigmoid", lay) for lay in LAYOUTS]),
    "adapter": ({"dpo.reference": "adapter", "lora.enabled": True}, [("sigmoid", lay) for lay in LAYOUTS]),
    "none": ({"dpo.loss": "simpo", "lora.enabled": False}, [(loss, lay) for loss in REFERENCE_FREE for lay in LAYOUTS]),
    "unpaired": ({"dpo.loss": "kto", "dpo.unpair": True, "dpo.reference": "copy", "lora.enabled": False},
                 [(loss, lay) for loss in UNPAIRED for lay in LAYOUTS]),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_loss_layout_and_reference_strategy_passes(tmp_path, tiny_model_dir, monkeypatch, case, precision):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    over, variants = CASES[case]
    st = _stage(tmp_path, tiny_model_dir, precision=precision, **over)
    failures = []
    for loss, layout in variants:
        checks = preflight.run_checks(_variant(st, loss, layout))
        assert [c.name for c in checks] == list(preflight.CHECKS)
        failures += [f"{loss}/{layout or st.layout}: {c.name} {c.value} ({c.detail})" for c in checks if not c.ok]
        step0 = next(c for c in checks if c.name == "step0")
        if loss == "sigmoid":
            assert step0.value == pytest.approx(math.log(2), abs=preflight.STEP0_TOLERANCE[precision])
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- each check made to fail


def _stopped(out: Path) -> None:
    """Stopped before step 1: no metrics written, and preflight.json says which check failed."""
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_a_stale_reference_cache_stops_the_run_naming_the_file(tmp_path, tiny_model_dir, monkeypatch):
    """The cache's rows moved by 0.5 nats (as if computed from another model under the same key)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.reference": "precomputed", "dpo.max_steps": 1})
    run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    (cache,) = (tmp_path / "cache" / "reference").glob("*.safetensors")
    table = read_table(cache)
    write_table(cache, {k: {f: v + 0.5 * (f != "chosen_tail" and f != "rejected_tail") for f, v in row.items()}
                        for k, row in table.items()})
    out = tmp_path / "second"
    with pytest.raises(preflight.PreflightError) as e:
        run_stage(cfg, "dpo", out, str(tiny_model_dir))
    assert "'reference'" in str(e.value) and str(cache) in str(e.value)
    _stopped(out)
    assert json.loads((out / "preflight.json").read_text())["reference"]["ok"] is False


def test_a_layout_off_by_one_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """prefix_shared whose score positions are one token early (each token predicted from t - 2)."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    shared = collation.LAYOUTS["prefix_shared"]

    def off_by_one(items, pad_id, **kw):
        batch = shared(items, pad_id, **kw)
        batch["score_index"] = (batch["score_index"] - 1).clamp(min=0)
        return batch

    monkeypatch.setitem(collation.LAYOUTS, "prefix_shared", off_by_one)
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.reference": "copy", "lora.enabled": False,
                                                     "dpo.layout": "prefix_shared"})
    with pytest.raises(preflight.PreflightError) as e:
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert "'layout'" in str(e.value) and "padded" in str(e.value)
    _stopped(Path(cfg.output_dir))


def test_a_template_that_doubles_bos_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """SmolLM2's BOS is <|im_start|>, which its ChatML template opens with: a template that also puts
    ``bos_token`` first renders it twice."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "doubled"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(model)
    cfg = make_cfg(tmp_path, str(model), **{"dpo.reference": "copy", "lora.enabled": False})
    with pytest.raises(preflight.PreflightError) as e:
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(model))
    assert "'template'" in str(e.value) and "<|im_start|>" in str(e.value) and "doubled" in str(e.value)
    _stopped(Path(cfg.output_dir))


def test_a_completion_cut_to_nothing_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    st = _stage(tmp_path, tiny_model_dir, **{"dpo.reference": "copy", "lora.enabled": False})
    st.data.train[3].rejected_ids = []
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(st)
    assert "'truncation'" in str(e.value) and st.data.train[3].key in str(e.value)
    _stopped(st.out.root)


def test_an_option_the_path_ignores_stops_the_run_and_no_preflight_skips(tmp_path, tiny_model_dir, monkeypatch):
    """TR-DPO's sync interval set while TR-DPO is off: the run would never read it."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.ref_model_sync_steps": 8, "dpo.max_steps": 1})
    with pytest.raises(preflight.PreflightError) as e:
        run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    assert "'ignored_options'" in str(e.value) and "dpo.ref_model_sync_steps" in str(e.value)
    _stopped(Path(cfg.output_dir))
    summary = run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir), preflight=False)
    assert summary["preflight"] == {"skipped": "--no-preflight"} and summary["steps"] == 1


def test_results_reach_run_json_and_the_model_card(tmp_path, tiny_model_dir, monkeypatch):
    from preftune.card import update_card

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"dpo.max_steps": 1})
    out = Path(cfg.output_dir)
    run_stage(cfg, "dpo", out, str(tiny_model_dir))
    record = json.loads((out / "run.json").read_text())["preflight"]
    assert set(preflight.CHECKS) <= set(record) and record["seconds"] >= 0
    for name in preflight.CHECKS:
        assert record[name]["ok"] is True and {"value", "tolerance"} <= set(record[name])
    assert record["step0"]["value"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics(out)[0]["loss"] == pytest.approx(record["step0"]["value"], abs=1e-5)
    update_card(out)
    assert "**Preflight:** 6 of 6 checks passed (truncation, template" in (out / "final" / "README.md").read_text()


# ---------------------------------------------------------------- a finished run is never lost


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_config(tmp_path: Path, model: Path, output_dir: str) -> Path:
    cfg = make_cfg(tmp_path, str(model), **{"dpo.max_steps": 1, "lora.enabled": True})
    from preftune.config import to_yaml

    path = tmp_path / "demo.yaml"
    path.write_text(to_yaml(dataclasses.replace(cfg, output_dir=output_dir)))
    return path


def test_a_second_run_into_a_finished_folder_stops_unless_overwrite_or_resume(tmp_path, tiny_model_dir, monkeypatch,
                                                                               capsys):
    from preftune.cli import main

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = str(_write_config(tmp_path, tiny_model_dir, str(out)))
    assert main(["dpo", config]) == 0
    first = _tree_bytes(out / "final")
    capsys.readouterr()
    assert main(["dpo", config, "dpo.lr=0.02"]) == 2  # another learning rate, the same folder
    err = capsys.readouterr().err
    assert str(out) in err and "finished at" in err and "--overwrite" in err and "--resume" in err
    assert _tree_bytes(out / "final") == first
    assert main(["dpo", config, "--resume"]) == 0  # finished: resuming has nothing left to do
    assert _tree_bytes(out / "final") == first
    assert main(["dpo", config, "dpo.lr=0.02", "--overwrite"]) == 0
    assert _tree_bytes(out / "final") != first
    assert json.loads((out / "run.json").read_text())["steps"] == 1


def test_an_output_dir_pattern_gives_each_run_its_own_folder(tmp_path, tiny_model_dir, monkeypatch):
    from preftune.cli import main

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    config = str(_write_config(tmp_path, tiny_model_dir, str(tmp_path / "runs" / "{name}-{n}")))
    assert main(["dpo", config]) == 0 and main(["dpo", config]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo-1", "demo-2"]
    assert all((tmp_path / "runs" / n / "final").is_dir() for n in ("demo-1", "demo-2"))


# ---------------------------------------------------------------- preftune check, and what runs print


@pytest.mark.e2e
def test_check_prints_the_table_of_the_demo_config(tmp_path, monkeypatch, capsys):
    """The shipped demo config (its tiny stand-in model): data and preflight of SFT (and DPO, turned on),
    without training: nothing is written to its output_dir."""
    from preftune.cli import main
    from preftune.pipeline import QUICKSTART

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "never"
    rc = main(["check", str(QUICKSTART), "model=tiny", "dpo.enabled=true", f"output_dir={out}", "data.max_rows=16",
               "data.max_eval_rows=8"])
    printed = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    lines = printed.splitlines()
    assert lines[0].split() == ["stage", "check", "ok", "value", "tolerance", "note"]
    for stage in ("sft", "dpo"):
        assert [ln.split()[1] for ln in lines if ln.startswith(stage + " ")] == ["data", *preflight.CHECKS]
    step0 = next(ln for ln in lines if ln.startswith("dpo ") and ln.split()[1] == "step0")
    assert step0.split()[2] == "ok" and step0.split()[3] == "0.693"
    assert any(ln.startswith("eval ") and "winrate" in ln for ln in lines)
    assert f"{len(lines) - 3} of {len(lines) - 3} checks passed" in printed


@pytest.mark.e2e
def test_a_plain_run_prints_no_deepspeed_banner(tmp_path, tiny_model_dir):
    """accelerate imports DeepSpeed (when installed) to unwrap a model, and DeepSpeed then announced the
    accelerator it guessed, in the middle of the progress bar."""
    import os
    import subprocess
    import sys

    config = _write_config(tmp_path, tiny_model_dir, str(tmp_path / "run"))
    env = os.environ | {"PREFTUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "preftune.cli", "dpo", str(config)], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "real_accelerator" not in r.stderr + r.stdout and "Setting accelerator" not in r.stderr + r.stdout
    assert "fatal:" not in r.stderr + r.stdout


@pytest.mark.e2e
def test_a_pipeline_whose_rule_judge_can_score_no_row_generates_nothing_for_it(tmp_path, tiny_model_dir, monkeypatch,
                                                                               caplog):
    """Arithmetic pairs without a checkable answer in their meta (like real HH rows) and the default
    ``rule`` judge: said before training, and no model generates for the win-rate."""
    import logging

    from preftune.eval import suite
    from preftune.pipeline import run_pipeline

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    generated = []
    monkeypatch.setattr(suite, "generations", lambda *a, **k: generated.append(a) or [])
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"sft.enabled": False, "dpo.max_steps": 1, "rounds.n": 0,
                                                     "eval.heldout.enabled": False, "eval.tasks": [],
                                                     "eval.winrate.judge": "rule"})
    with caplog.at_level(logging.WARNING, logger="preftune"):
        run_pipeline(cfg)
    said = [r.getMessage() for r in caplog.records if "win-rate" in r.getMessage()]
    assert said and "the rule judge can score none of the" in said[0] and "eval.winrate.judge" in said[0]
    assert generated == []
    models = json.loads((Path(cfg.output_dir) / "eval" / "eval.json").read_text())["models"]
    assert set(models) == {"base", "dpo"} and not any("winrate" in m for m in models.values())

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
from test_train import make_cfg, metrics

from preftune import preflight
from preftune.data import collate as collation
from preftune.data.stage import stage_bins
from preftune.losses import LOSSES
from preftune.reference import read_table, write_table
from preftune.train import collate_for, run_stage, setup

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
                               collate=collate_for(s, layout, st.tokenizer.pad_token_id))


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

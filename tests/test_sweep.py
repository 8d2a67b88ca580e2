"""Sweeps: grid and variant expansion, run names, validation of every run before anything runs, SFT
sharing keys, and (e2e) a 2x2 sweep on the tiny model that pays the reference and the base
evaluation once, resumes without redoing finished runs, and reports every run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import ConfigError
from preftune.sweep import apply_overrides, expand, plan, run_name, sft_key

BASE = {"model": "tiny", "output_dir": "sweeps/s", "lora": {"r": 8}}


def _raw(sweep: dict, **base) -> dict:
    return {**BASE, **base, "sweep": sweep}


# ---------------------------------------------------------------- expansion and names


def test_grid_expands_in_axis_order_with_readable_names():
    runs = expand(_raw({"dpo.beta": [0.01, 0.1, 0.5], "dpo.loss": ["sigmoid", "ipo"]}))
    assert [n for n, _ in runs] == [
        "beta0.01-loss_sigmoid", "beta0.01-loss_ipo", "beta0.1-loss_sigmoid", "beta0.1-loss_ipo",
        "beta0.5-loss_sigmoid", "beta0.5-loss_ipo"]
    name, cfg = runs[3]
    assert (cfg.dpo.beta, cfg.dpo.loss) == (0.1, "ipo")
    assert cfg.output_dir == str(Path("sweeps/s/runs") / name)
    assert cfg.lora.r == 8  # the base config is kept


def test_shorthand_axes_go_through_config_shorthands():
    """YAML's on/off are booleans; ``lora: false`` sets lora.enabled and keeps the base's rank;
    ``data: FILE`` sets data.source."""
    import yaml

    raw = _raw(yaml.safe_load("{lora: [on, off], data: [a/hh.jsonl, embedded:prefs], precision: [fp32, bf16]}"))
    runs = dict(expand(raw))
    assert list(runs)[:2] == ["lora_on-data_hh-precision_fp32", "lora_on-data_hh-precision_bf16"]
    cfg = runs["lora_off-data_prefs-precision_bf16"]
    assert cfg.lora.enabled is False and cfg.lora.r == 8
    assert cfg.data.source == "embedded:prefs" and cfg.precision == "bf16"
    assert runs["lora_on-data_hh-precision_fp32"].data.source == "a/hh.jsonl"


def test_run_name_examples():
    assert run_name({"dpo.beta": 0.1, "lora": False}) == "beta0.1-lora_off"
    assert run_name({"lora.enabled": True, "dpo.lr": 5e-5}) == "lora_on-lr5e-05"
    assert run_name({}) == "base"


def test_nested_axes_and_cli_overrides_edit_the_block():
    raw = apply_overrides(_raw({"dpo": {"beta": [0.1, 0.3]}}), ["sweep.dpo.loss=[sigmoid,hinge]", "seed=3"])
    runs = dict(expand(raw))
    assert list(runs) == ["beta0.1-loss_sigmoid", "beta0.1-loss_hinge", "beta0.3-loss_sigmoid", "beta0.3-loss_hinge"]
    assert all(c.seed == 3 for c in runs.values())


def test_variants_with_and_without_names():
    raw = _raw({"variants": [{"name": "full-bf16", "lora": False, "precision": "bf16"},
                             {"dpo": {"beta": 0.3}, "dpo.loss": "ipo"}]})
    (n1, c1), (n2, c2) = expand(raw)
    assert (n1, c1.lora.enabled, c1.precision) == ("full-bf16", False, "bf16")
    assert (n2, c2.dpo.beta, c2.dpo.loss) == ("beta0.3-loss_ipo", 0.3, "ipo")


def test_colliding_names_get_suffixes():
    runs = expand(_raw({"data": ["x/prefs.jsonl", "y/prefs.jsonl"]}))
    assert [n for n, _ in runs] == ["data_prefs-1", "data_prefs-2"]


# ---------------------------------------------------------------- validation: everything at once


def test_every_problem_of_every_run_is_reported_at_once():
    raw = _raw({"dpo.beta": [0.1, -1.0], "dpo.los": ["ipo"], "precision": ["fp32", "fp8"]})
    with pytest.raises(ConfigError) as e:
        plan(raw)
    text = str(e.value)
    assert "unknown key 'dpo.los' (did you mean 'dpo.loss'?) (every run)" in text
    assert "dpo.beta: must be positive, got -1.0 (runs: beta-1-los_ipo-precision_fp32, beta-1-los_ipo-precision_fp8)" in text
    assert "precision: 'fp8' is not one of" in text
    assert len(e.value.problems) == 3


@pytest.mark.parametrize("sweep, message", [
    ({}, "no axes or variants"),
    ({"dpo.beta": 0.1}, "sweep.dpo.beta: an axis needs a non-empty list"),
    ({"dpo.beta": []}, "an axis needs a non-empty list"),
    ({"output_dir": ["a", "b"]}, "cannot be swept"),
    ({"dpo.beta": [0.1], "variants": [{"seed": 1}]}, "either axes (dpo.beta) or variants"),
    ({"variants": [{"name": "a"}, {"name": "a", "seed": 2}]}, "duplicate run name(s) a"),
    ({"variants": ["seed=1"]}, "sweep.variants[0]: expected a mapping"),
    ({"dpo.beta": [0.1], "tokens_per_second": 0}, "sweep.tokens_per_second"),
])
def test_block_problems(sweep, message):
    with pytest.raises(ConfigError, match=None) as e:
        plan(_raw(sweep))
    assert message in str(e.value)


# ---------------------------------------------------------------- SFT sharing


def test_sft_key_ignores_dpo_side_keys_but_not_sft_inputs():
    """Precision and LoRA are DPO-side, like beta and the loss: the study's three variants (fp32 full,
    bf16 full, bf16 LoRA) start DPO from one SFT model."""
    runs = dict(expand(_raw({"dpo.beta": [0.1, 0.5], "dpo.loss": ["sigmoid", "ipo"], "eval.tasks": [[], ["x"]]})))
    assert len({sft_key(c) for c in runs.values()}) == 1
    for axis in ({"lora": [True, False]}, {"precision": ["fp32", "bf16"]}, {"lora.r": [8, 16]}):
        assert len({sft_key(c) for _, c in expand(_raw(axis))}) == 1, axis
    for axis in ({"sft.lr": [1e-4, 2e-4]}, {"data.max_length": [384, 512]}, {"seed": [0, 1]}):
        assert len({sft_key(c) for _, c in expand(_raw(axis))}) == 2, axis


def test_plan_says_which_run_trains_the_shared_sft_and_which_sft_differs(tmp_path, monkeypatch):
    from preftune.sweep import run_sweep

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    raw = _e2e_raw(tmp_path)
    raw["sweep"] = {"variants": [{"name": "fp32-full", "precision": "fp32", "lora": False},
                                 {"name": "bf16-lora", "precision": "bf16", "lora": True},
                                 {"name": "other-sft", "sft.lr": 3e-4}]}
    printed: list[str] = []
    state = run_sweep(raw, dry_run=True, echo=printed.append)
    est = {r["name"]: r["estimate"] for r in state["runs"]}
    assert est["fp32-full"]["sft_trains_for"] == "bf16-lora (fp32, lora off)"
    assert est["bf16-lora"]["sft_shared_with"] == "fp32-full" and est["bf16-lora"]["sft"] == 0
    assert est["other-sft"]["sft_differs"] == "own SFT: differs from fp32-full's in sft.lr"
    assert "own SFT: differs from fp32-full's in sft.lr" in printed[0]
    assert "sft trained here for bf16-lora (fp32, lora off)" in printed[0]


def test_sft_key_ignores_preference_data_when_sft_has_its_own():
    runs = expand(_raw({"data": ["a.jsonl", "b.jsonl"]}, sft={"data": {"source": "sft.jsonl"}}))
    assert len({sft_key(c) for _, c in runs}) == 1
    assert sft_key(expand(_raw({"seed": [0]}, sft={"enabled": False}))[0][1]) is None


# ---------------------------------------------------------------- end to end on the tiny model

PAIRS = [("the red fox", "The red fox runs fast.", "fox fox no"), ("a blue sky", "The blue sky is clear today.", "sky."),
         ("two cats", "Two cats sleep in the sun.", "cats cats cats"), ("old tree", "The old tree stands tall.", "tree?")]


def _write_data(path: Path) -> Path:
    with open(path, "w") as f:
        for i in range(24):
            p, c, r = PAIRS[i % len(PAIRS)]
            # a checkable answer, so that the default rule judge has rows to score (else the win-rate is skipped)
            f.write(json.dumps({"prompt": f"Write about {p} ({i}).", "chosen": c, "rejected": r,
                                "category": ["a", "b"][i % 2], "check": "contains", "answer": p.split()[-1]}) + "\n")
    return path


def _e2e_raw(tmp_path: Path) -> dict:
    return {
        "model": "tiny", "output_dir": str(tmp_path / "sweep"), "seed": 0,
        "data": {"source": str(_write_data(tmp_path / "prefs.jsonl")), "max_length": 64, "max_prompt_length": 32,
                 "test_size": 0.25},
        "sft": {"max_steps": 2, "batch_size": 4},
        "dpo": {"max_steps": 2, "batch_size": 4, "reference": "precomputed"},
        "eval": {"winrate": {"per_category": 1, "max_new_tokens": 4}, "heldout": {"max_chunks": 1, "chunk_length": 32},
                 "tasks": [], "batch_size": 4},
        "sweep": {"dpo.beta": [0.1, 0.5], "dpo.loss": ["sigmoid", "ipo"]},
    }


def _counting(monkeypatch, module, name: str) -> list:
    """Wrap the real ``module.name`` so every call is counted (the function still runs)."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _entries(kind: str) -> int:
    from preftune.eval.suite import cache_dir

    return len(list((cache_dir() / kind).glob("*.json")))


def _base_entries(kind: str, base_path: str) -> int:
    from preftune.eval.suite import cache_dir

    return sum(1 for p in (cache_dir() / kind).glob("*.json")
               if json.loads(p.read_text())["about"] == base_path)


@pytest.mark.e2e
def test_sweep_2x2_pays_reference_and_base_eval_once_resumes_and_reports(tmp_path, monkeypatch):
    import preftune.eval.generate
    import preftune.eval.heldout
    import preftune.reference
    from preftune.model import resolve_model
    from preftune.report.report import fmt
    from preftune.sweep import run_sweep

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))  # an empty cache: honest counts
    references = _counting(monkeypatch, preftune.reference, "precompute")
    heldouts = _counting(monkeypatch, preftune.eval.heldout, "heldout_loss")
    generations = _counting(monkeypatch, preftune.eval.generate, "generate")
    raw = _e2e_raw(tmp_path)
    root = tmp_path / "sweep"
    state = run_sweep(raw, echo=lambda *_: None)
    names = ["beta0.1-loss_sigmoid", "beta0.1-loss_ipo", "beta0.5-loss_sigmoid", "beta0.5-loss_ipo"]
    assert [r["name"] for r in state["runs"]] == names and all(r["status"] == "done" for r in state["runs"])

    # The reference log-probs: one forward pass over the data, for all four runs.
    assert len(references) == 1
    flags = [json.loads((root / "runs" / n / "dpo" / "data.json").read_text())["reference"]["computed"] for n in names]
    assert sorted(flags) == [False, False, False, True]

    # The base evaluation: computed once. The cache holds one base entry per kind, and no entry was
    # computed twice (calls == entries); only the first run added base entries.
    base = str(Path(resolve_model("tiny")).resolve())
    assert _base_entries("heldout", base) == 1 and _base_entries("generations", base) == 1
    assert len(heldouts) == _entries("heldout") and len(generations) == _entries("generations")
    assert [r["result"]["eval_cache_new"]["generations"] for r in state["runs"]] == [3, 1, 1, 1]  # base+sft, then dpo
    assert sum(r["result"]["sft_trained_here"] for r in state["runs"]) == 1  # one shared SFT stage

    # A killed sweep: the third run never finished; the rerun does it alone and touches nothing else.
    killed = root / "runs" / names[2]
    for sub in ("dpo", "eval", "report"):
        import shutil

        shutil.rmtree(killed / sub, ignore_errors=True)
    (killed / "done.json").unlink()
    finished = [p for n in names if n != names[2] for p in (root / "runs" / n).rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    n_heldout = len(heldouts)
    state2 = run_sweep(raw, echo=lambda *_: None)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert (killed / "done.json").is_file() and (killed / "dpo" / "run.json").is_file()
    assert len(references) == 1  # reused from the cache by the rerun
    assert _base_entries("heldout", base) == 1  # the base came from the cache
    # the retrained DPO model is bit-identical to the killed one (training is deterministic), and the
    # cache is keyed by content, so even its evaluation is reused
    assert len(heldouts) == _entries("heldout") == n_heldout
    assert json.loads((killed / "dpo" / "data.json").read_text())["reference"]["computed"] is False
    assert json.loads((root / "sweep.json").read_text())["runs"][2]["status"] == "done"

    # The report's tables hold every run's figures.
    md = (Path(state2["report"]).with_suffix(".md")).read_text()
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")}
    for n in names:
        ev = json.loads((root / "runs" / n / "eval" / "eval.json").read_text())["models"]["dpo"]
        row = next(line for line in sections["Precision and LoRA variants"].splitlines() if line.startswith(f"| {n} |"))
        beta, loss = n.split("-")
        assert f"| {beta.removeprefix('beta')} |" in row and f"| {loss.removeprefix('loss_')} |" in row
        assert f"| {fmt(ev['heldout']['bpb'], 4)} |" in row and f"| {fmt(ev['winrate']['winrate'])} [" in row
        assert f"| {fmt(ev['rewards']['rewards/accuracies'])} |" in row
        assert any(line.startswith(f"| {n} | dpo |") for line in sections["Evaluation"].splitlines())
        assert f"{n}/dpo" in sections["Held-out loss by beta"]


@pytest.mark.e2e
def test_variants_over_precision_and_lora_train_sft_once(tmp_path, monkeypatch):
    """fp32 full, bf16 full and bf16 LoRA: one SFT stage, trained once (in fp32, full, by the first
    run), linked by the other two, whose DPO stages start from its final model."""
    import preftune.train
    from preftune.sweep import run_sweep

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    stages = []
    real = preftune.train.run_stage
    monkeypatch.setattr("preftune.pipeline.run_stage", lambda cfg, stage, *a, **kw: (
        stages.append((stage, cfg.precision, cfg.lora.enabled)), real(cfg, stage, *a, **kw))[1])
    raw = _e2e_raw(tmp_path)
    raw["eval"] = {"winrate": {"enabled": False}, "heldout": {"enabled": False}, "tasks": [], "kl": False}
    raw["sweep"] = {"variants": [{"name": "fp32-full", "precision": "fp32", "lora": False},
                                 {"name": "bf16-full", "precision": "bf16", "lora": False},
                                 {"name": "bf16-lora", "precision": "bf16", "lora": True}]}
    state = run_sweep(raw, echo=lambda *_: None)
    assert [s for s in stages if s[0] == "sft"] == [("sft", "fp32", False)]
    assert [s for s in stages if s[0] == "dpo"] == [("dpo", "fp32", False), ("dpo", "bf16", False),
                                                    ("dpo", "bf16", True)]
    assert [r["result"]["sft_trained_here"] for r in state["runs"]] == [True, False, False]
    root = tmp_path / "sweep" / "runs"
    shared = {(root / n / "sft").resolve() for n in ("fp32-full", "bf16-full", "bf16-lora")}
    assert len(shared) == 1
    for n in ("bf16-full", "bf16-lora"):
        run = json.loads((root / n / "dpo" / "run.json").read_text())
        assert Path(run["base_model"]).resolve() == (next(iter(shared)) / "final").resolve()


# ---------------------------------------------------------------- dry run


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch):
    """24 rows, test_size 0.25 -> 18 training pairs; batch 4 -> ceil(18/4) = 5 steps per epoch, so
    ``dpo.max_steps: 5`` is exactly one epoch and ``max_steps: 2`` is 2/5 of one."""
    from preftune.sweep import run_sweep

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    raw = _e2e_raw(tmp_path)
    raw["sweep"] = {"dpo.max_steps": [5, 2], "dpo.beta": [0.1]}
    printed: list[str] = []
    state = run_sweep(raw, dry_run=True, echo=printed.append)
    (first, second) = [r["estimate"] for r in state["runs"]]
    assert first["sft"] > 0 and second["sft"] == 0 and second["sft_shared_with"] == "max_steps5-beta0.1"
    assert second["dpo"] == int(first["dpo"] * 2 / 5)
    assert first["tokens"] == first["sft"] + first["dpo"]
    assert "max_steps2-beta0.1" in printed[0] and "default constant" in printed[0]
    assert not (tmp_path / "sweep").exists()

    # Once a run of the sweep has finished, its measured throughput replaces the constant.
    done = tmp_path / "sweep" / "runs" / "max_steps5-beta0.1" / "done.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"trained_tokens": 5000, "wall_s": 10.0}))
    state = run_sweep(raw, dry_run=True, echo=printed.append)
    assert state["tokens_per_second"] == {"value": 500.0, "source": "measured over 1 finished run(s) of this sweep"}
    assert [r["status"] for r in state["runs"]] == ["done", "planned"]


def test_packed_estimates_count_the_loops_bins(tmp_path, monkeypatch):
    """Under ``layout: packed`` an epoch is the packed bins, not ceil(rows / batch_size) batches: an
    estimate of as many steps as there are bins is exactly one epoch's tokens."""
    import math

    from preftune.config.validate import config_from_dict
    from preftune.data.stage import load_stage_data, packed_bins
    from preftune.sweep import _item_tokens, _tokenizer, stage_tokens

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    raw = _e2e_raw(tmp_path)
    raw["dpo"] |= {"layout": "packed", "token_budget": 300}
    cfg = config_from_dict({k: v for k, v in raw.items() if k != "sweep"})
    tok = _tokenizer(cfg)
    items = load_stage_data(cfg, "dpo", tok).train
    bins = packed_bins(items, 300)
    assert len(bins) != math.ceil(len(items) / cfg.dpo.batch_size)  # where the old estimate went wrong
    cfg.dpo.max_steps = len(bins)
    assert stage_tokens(cfg, "dpo", tok, {}) == sum(_item_tokens(i) for i in items)


# ---------------------------------------------------------------- SFT data x DPO data, cross-evaluated


def _write_hh_and_shp(folder: Path) -> tuple[str, str]:
    """16 HH transcript pairs and 16 SHP pairs, both with checkable answers (extra columns become
    ``meta``), so the rule judge rules on every held-out row of either."""
    folder.mkdir()
    hh, shp = folder / "hh.jsonl", folder / "shp.jsonl"
    with open(hh, "w") as f:
        for i in range(16):
            prompt = f"\n\nHuman: What is {i} + 2?\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{prompt} {i + 2}", "rejected": f"{prompt} {i + 3}", "check": "number",
                                "answer": str(i + 2)}) + "\n")
    with open(shp, "w") as f:
        for i in range(16):
            f.write(json.dumps({"history": f"How many legs do {i} birds have?", "human_ref_A": f"{2 * i} legs.",
                                "human_ref_B": "Birds fly.", "labels": 1, "score_A": 9, "score_B": 3,
                                "check": "number", "answer": str(2 * i)}) + "\n")
    return str(hh), str(shp)


@pytest.mark.e2e
def test_sweep_over_sft_data_and_dpo_data_fills_the_cross_dataset_table(tmp_path, monkeypatch):
    """The study's Tables 5 and 6 on the tiny model: SFT data {hh, shp} x DPO data {hh, shp}, every
    model evaluated on both; the report's table has a figure in every cell, each the run's eval.json."""
    from preftune.report.report import fmt
    from preftune.sweep import run_sweep

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    hh, shp = _write_hh_and_shp(tmp_path / "data")
    split = {"test_size": 0.25, "max_length": 64, "max_prompt_length": 32}
    raw = {"model": "tiny", "output_dir": str(tmp_path / "sweep"), "seed": 0, "data": {"source": hh} | split,
           "sft": {"max_steps": 2, "batch_size": 4, "data": {"source": hh} | split},
           "dpo": {"max_steps": 2, "batch_size": 4},
           "eval": {"winrate": {"per_category": 4, "max_new_tokens": 4}, "heldout": {"enabled": False},
                    "tasks": [], "kl": False, "batch_size": 4,
                    "datasets": [{"name": "hh", "source": hh, "format": "hh"} | split,
                                 {"name": "shp", "source": shp, "format": "shp"} | split]},
           "sweep": {"sft.data.source": [hh, shp], "data.source": [hh, shp]}}
    state = run_sweep(raw, echo=lambda *_: None)
    names = ["data_hh-data_hh", "data_hh-data_shp", "data_shp-data_hh", "data_shp-data_shp"]
    assert [r["name"] for r in state["runs"]] == names and all(r["status"] == "done" for r in state["runs"])
    assert sum(r["result"]["sft_trained_here"] for r in state["runs"]) == 2  # one SFT stage per SFT dataset

    md = Path(state["report"]).with_suffix(".md").read_text()
    table = md.split("## Models across evaluation datasets")[1].split("\n## ")[0].strip().splitlines()
    assert table[0] == ("| run | model | trained on | hh: reward acc (± se) | hh: win-rate [95% CI] | "
                        "hh: checked acc [95% CI] | shp: reward acc (± se) | shp: win-rate [95% CI] | "
                        "shp: checked acc [95% CI] |")
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in table[2:]}
    assert len(rows) == 12 and set(rows) == {(n, m) for n in names for m in ("base", "sft", "dpo")}
    for name in names:
        sft_data, dpo_data = (part.removeprefix("data_") for part in name.split("-"))
        ev = json.loads((tmp_path / "sweep" / "runs" / name / "eval" / "eval.json").read_text())["datasets"]
        for model in ("sft", "dpo"):
            cells = rows[(name, model)]
            assert cells[0] == (sft_data if model == "sft" else f"{sft_data} → {dpo_data}")
            assert "-" not in cells  # every cell filled
            for i, d in enumerate(("hh", "shp")):
                e = ev[d][model]
                assert e["rewards"]["n"] == 4 and e["winrate"]["n"] == 4 and e["checked"]["n"] == 4
                assert cells[1 + 3 * i] == f"{fmt(e['rewards']['rewards/accuracies'])} ± {fmt(e['rewards']['se'])}"
                assert cells[2 + 3 * i].startswith(f"{fmt(e['winrate']['winrate'])} [")
                assert cells[3 + 3 * i].startswith(f"{fmt(e['checked']['accuracy'])} [")
        if dpo_data == "hh":  # the same source as the DPO data: the same held-out rows, never a trained-on one
            run_eval = json.loads((tmp_path / "sweep" / "runs" / name / "eval" / "eval.json").read_text())
            assert ev["hh"]["dpo"]["rewards"] == run_eval["models"]["dpo"]["rewards"]
        base = rows[(name, "base")]  # no training data and no reference: no reward accuracy
        assert base[0] == base[1] == base[4] == "-" and "-" not in base[2:4] + base[5:]

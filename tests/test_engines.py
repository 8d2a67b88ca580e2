"""Generation engines against a real local ``preftune serve``: sampling settings reach the server (its
request log), token-id prompts and log-probs agree with the policy, rounds through the ``openai``
engine with LoRA adapters loaded by name (pairs equal the builtin engine's on the same samples), a
stale adapter stopping the round before training, and engines that are missing or unreachable."""

from __future__ import annotations

import json
import socket

import pytest

import preftune.rounds as rounds
from preftune.errors import PreftuneError
from preftune.eval.engines import Sampling, make_engine, parity, sample
from preftune.eval.generate import prompt_ids
from preftune.model import load_for_inference, resolve_model
from preftune.serve import background, create_app
from test_rounds import _cfg, _rows_file


def _server(folder: str, **kw):
    model, tok = load_for_inference(folder)
    return create_app(model, tok, "tiny", None, 64, folder=folder, enable_lora=True, **kw)


def _adapter(path, base: str):
    """A LoRA adapter with random (non-zero) weights on ``base``: a policy that differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(path)
    return str(path)


def test_sampling_settings_reach_the_server_and_its_logprobs_are_the_policys(tmp_path):
    tiny = resolve_model("tiny")
    app = _server(tiny)
    prompts = ["Name a colour.", [{"role": "user", "content": "What is 2 + 2?"}]]
    with background(app) as url:
        cfg = _cfg(tmp_path, "generation.engine=openai", f"generation.base_url={url}/v1")
        s = Sampling(max_new_tokens=5, temperature=0.7, top_p=0.9, n=3, stop=("zz",), seed=11, logprobs=True)
        groups = sample(cfg, tiny, prompts, s, progress=False)
        unseeded = sample(cfg, tiny, prompts[:1], Sampling(max_new_tokens=2, seed=None), progress=False)
    model, tok = load_for_inference(tiny)
    want = [prompt_ids(p, tok) for p in prompts]
    log = list(app.state.requests)
    first = sorted(log[:2], key=lambda r: r["seed"])  # sent concurrently: the server may log them in either order
    assert [r["prompt"] for r in first] == want  # token ids: preftune's template, not the server's
    for i, r in enumerate(first):
        assert (r["endpoint"], r["max_tokens"], r["temperature"], r["top_p"], r["n"], r["stop"], r["seed"],
                r["logprobs"], r["model"]) == ("completion", 5, 0.7, 0.9, 3, ["zz"], 11 + i, 1, "tiny")
    assert log[2]["seeded"] is False and log[2]["logprobs"] is None and log[2]["n"] == 1
    assert [len(g) for g in groups] == [3, 3] and len(unseeded[0]) == 1
    for g, p in zip(groups, want):
        for c in g:
            assert c.prompt_ids == p and 1 <= len(c.ids) <= 5 and len(c.logprobs) == len(c.ids)
            assert c.text == tok.decode(c.ids, skip_special_tokens=True).strip()
    figures = parity(model, [c for g in groups for c in g], [p for p in want for _ in range(3)])
    assert figures["prompt_ids"] == "match" and figures["tokens"] >= 6
    assert figures["max_abs_gap"] < 1e-4  # the server's raw log-probs are the policy's own


def _samples(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.e2e
def test_rounds_through_the_openai_engine_load_each_rounds_adapter(tmp_path, monkeypatch):
    """Two rounds from a LoRA policy: each round's adapter is loaded by name and the one it replaces
    unloaded; the parity check passes; round 1's pairs equal the builtin engine's when it is fed the
    same samples."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model("tiny")
    start = _adapter(tmp_path / "a0", tiny)
    app = _server(tiny)
    seen: list[dict] = []
    real_load, real_unload = app.state.models.load, app.state.models.unload
    monkeypatch.setattr(app.state.models, "load", lambda n, p: (seen.append({"load": n, "path": p}), real_load(n, p)))
    monkeypatch.setattr(app.state.models, "unload", lambda n: (seen.append({"unload": n}), real_unload(n)))
    rows = _rows_file(tmp_path / "rows.jsonl")
    with background(app) as url:
        cfg = _cfg(tmp_path, "generation.engine=openai", f"generation.base_url={url}/v1", "rounds.reference=sft",
                   "rounds.n=2", rows=rows)
        recs = rounds.run_rounds(cfg, tmp_path / "run", start)
    assert [r["round"] for r in recs] == [1, 2]
    loads = [e for e in seen if "load" in e]
    assert [e["path"] for e in loads] == [str((tmp_path / "a0").resolve()), recs[0]["final_model"]]
    assert {"unload": loads[0]["load"]} in seen and app.state.models.adapters == {}  # replaced, then closed
    models = [r["model"] for r in app.state.requests]
    assert set(models[: cfg.rounds.prompts]) == {loads[0]["load"]} and set(models[cfg.rounds.prompts:]) == {
        loads[1]["load"]}
    for rec in recs:
        p = rec["parity"]
        assert rec["engine"] == "openai" and p["prompt_ids"] == "match" and p["mean_abs_gap"] < 1e-4
        assert p["completions"] == cfg.generation.parity_samples
    saved = json.loads((tmp_path / "run" / "rounds" / "round-1" / "round.json").read_text())
    assert saved["parity"] == recs[0]["parity"]

    # the builtin engine fed the same samples builds the same pairs
    fed = [[s["response"] for s in row["samples"]] for row in _samples(tmp_path / "run" / "rounds" / "round-1" /
                                                                        "samples.jsonl")]
    monkeypatch.setattr(rounds, "sample", lambda *a, **k: (fed, None))
    builtin = _cfg(tmp_path, f"output_dir={tmp_path / 'b'}", "rounds.reference=sft", rows=rows)
    (rec,) = rounds.run_rounds(builtin, tmp_path / "b", start)
    assert rec["engine"] == "builtin" and rec["pairs"] == recs[0]["pairs"]
    assert (tmp_path / "b/rounds/round-1/pairs.jsonl").read_text() == \
        (tmp_path / "run/rounds/round-1/pairs.jsonl").read_text()


@pytest.mark.e2e
def test_a_server_that_keeps_the_previous_adapter_stops_the_round_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model("tiny")
    start = _adapter(tmp_path / "a0", tiny)
    app = _server(tiny)
    real_load, first = app.state.models.load, []

    def stale(name, path):  # the server "loads" each new adapter but keeps serving the first one's weights
        first.append(path)
        real_load(name, first[0])

    monkeypatch.setattr(app.state.models, "load", stale)
    with background(app) as url:
        cfg = _cfg(tmp_path, "generation.engine=openai", f"generation.base_url={url}/v1", "rounds.reference=sft",
                   "rounds.n=2", "rounds.lr=0.01")
        with pytest.raises(PreftuneError, match=r"round 2: the openai engine's log-probs differ from the policy's by "
                                                r"[0-9.]+ nats per token .* beyond generation.parity_tolerance 0.05"):
            rounds.run_rounds(cfg, tmp_path / "run", start)
    r1, r2 = tmp_path / "run/rounds/round-1", tmp_path / "run/rounds/round-2"
    assert (r1 / "round.json").is_file()
    assert not (r2 / "dpo").exists() and not (r2 / "pairs.jsonl").exists() and not (r2 / "round.json").exists()


def test_an_unreachable_server_stops_before_any_training(tmp_path):
    from preftune.pipeline import run_pipeline

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path, "generation.engine=openai", f"generation.base_url=http://127.0.0.1:{port}/v1")
    with pytest.raises(PreftuneError, match=rf"cannot reach http://127.0.0.1:{port}/v1/models .*preftune serve"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "rounds").exists()


def test_vllm_not_installed_names_the_install_command(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    cfg = _cfg(tmp_path, "generation.engine=vllm")
    with pytest.raises(PreftuneError, match=r"vLLM does not import here .*pip install vllm"):
        make_engine(cfg)


def test_an_adapter_on_another_base_is_refused_by_name(tmp_path, tuned_dir):
    """The engine checks the server's base before loading: an adapter on another model is an error
    that names both folders (a server would otherwise serve it over the wrong weights)."""
    tiny = resolve_model("tiny")
    other = _adapter(tmp_path / "other", str(tuned_dir))
    with background(_server(tiny)) as url:
        cfg = _cfg(tmp_path, "generation.engine=openai", f"generation.base_url={url}/v1")
        engine = make_engine(cfg)
        with pytest.raises(PreftuneError, match=rf"sits on {tuned_dir}.* serves {tiny}"):
            engine.load(other)
        with pytest.raises(PreftuneError, match="is a full model and the server .* serves"):
            engine.load(str(tuned_dir))
        engine.close()


def test_preftune_generate_through_the_openai_engine_equals_the_builtin_loop(tmp_path, tiny_model_dir):
    """Greedy win-rate generations of ``preftune generate`` from an adapter: the server, sent
    preftune's prompt ids and the adapter by name, answers what the builtin loop writes."""
    import argparse

    from preftune.commands.evaluation import generate

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": "yes", "rejected": "no"}) + "\n"
                            for i in range(10)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{source: {data}, test_size: 0.3}}\neval: {{winrate: {{max_new_tokens: 6}}}}\n")
    folder = _adapter(tmp_path / "adapter", str(tiny_model_dir))
    out = {}
    app = _server(str(tiny_model_dir))
    with background(app) as url:
        for engine in ("builtin", "openai"):
            ns = argparse.Namespace(config=str(cfg), model=folder, out=str(tmp_path / f"{engine}.jsonl"),
                                    overrides=[f"generation.engine={engine}", f"generation.base_url={url}/v1"])
            assert generate(ns) == 0
            out[engine] = [json.loads(x)["response"] for x in (tmp_path / f"{engine}.jsonl").read_text().splitlines()]
    assert len(out["openai"]) == 3 and out["openai"] == out["builtin"] and any(out["builtin"])
    assert [(r["temperature"], r["max_tokens"], r["n"]) for r in app.state.requests] == [(0.0, 6, 1)] * 3

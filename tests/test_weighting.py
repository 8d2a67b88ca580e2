"""Loss weighting that does not depend on how an optimizer step is split: micro-batches with different
token counts (SFT), different pair counts (DPO, padded and packed bins) give the gradient of one big
batch of the same rows; and no row is silently left out at an epoch's end (``drop_last``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.data.stage import dropped_rows, steps_per_epoch
from preftune.train import accumulate, run_stage, setup
from test_train import make_cfg, metrics, write_pairs

MICRO = [[0], [1, 2, 3], [4, 5]]  # 1, 3 and 2 rows: unequal pairs and unequal token counts


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _one_batch_grads(st, rows: list[int]) -> dict[str, torch.Tensor]:
    st.optimizer.zero_grad(set_to_none=True)
    batch = st.collate([st.data.train[i] for i in rows])
    loss, _ = st.method.step(st.policy, batch, st.stage_cfg, st.reference.logps(batch))
    loss.backward()
    return _grads(st.model)


def _mean_of_means_grads(st, micro) -> dict[str, torch.Tensor]:
    """The split-dependent weighting this replaces: every micro-batch's mean loss weighs the same."""
    st.optimizer.zero_grad(set_to_none=True)
    for idx in micro:
        batch = st.collate([st.data.train[i] for i in idx])
        loss, _ = st.method.step(st.policy, batch, st.stage_cfg, st.reference.logps(batch))
        (loss / len(micro)).backward()
    return _grads(st.model)


@pytest.mark.parametrize("stage,over,micro", [
    ("sft", {}, MICRO),
    ("dpo", {"dpo.layout": "padded"}, MICRO),
    ("dpo", {"dpo.layout": "prefix_shared"}, MICRO),
    ("dpo", {"dpo.layout": "packed"}, [[0, 1, 2], [3], [4, 5]]),  # packed bins of 3, 1 and 2 pairs
])
def test_uneven_micro_batches_give_the_one_big_batch_gradient(tmp_path, tiny_model_dir, monkeypatch, stage, over,
                                                              micro):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"lora.enabled": False, "dpo.reference": "copy",
                                                     "sft.grad_accum": 3, "dpo.grad_accum": 3, **over})
    st = setup(cfg, stage, tmp_path / "run", str(tiny_model_dir))
    try:
        rows = [i for idx in micro for i in idx]
        units = [st.method.units(st.collate([st.data.train[i] for i in idx])) for idx in micro]
        assert len(set(units)) == 3, units  # the split really is uneven in the loss's own units
        big = _one_batch_grads(st, rows)
        naive = _mean_of_means_grads(st, micro)
        st.optimizer.zero_grad(set_to_none=True)
        means, finite, _, pairs = accumulate(st, micro, [True] * len(micro))
        step = _grads(st.model)
        assert finite and pairs == len(rows) and step.keys() == big.keys()
        worst = max((step[n] - big[n]).abs().max().item() for n in big)
        assert worst < 1e-6
        assert max((naive[n] - big[n]).abs().max().item() for n in big) > 1e-4  # the old weighting is off
        # the logged loss is the one-big-batch loss too
        batch = st.collate([st.data.train[i] for i in rows])
        with torch.no_grad():
            loss, _ = st.method.step(st.policy, batch, st.stage_cfg, st.reference.logps(batch))
        assert means.means()["loss"] == pytest.approx(float(loss), abs=1e-5)
    finally:
        st.metrics_log.close()


def test_steps_per_epoch_keeps_or_drops_the_last_incomplete_step():
    """28 rows, batch 4, grad_accum 4: 7 micro-batches, a full step of 4 and an incomplete one of 3."""
    assert steps_per_epoch(7, 4, drop_last=False) == 2
    assert steps_per_epoch(7, 4, drop_last=True) == 1
    assert steps_per_epoch(8, 4, drop_last=False) == steps_per_epoch(8, 4, drop_last=True) == 2
    assert steps_per_epoch(3, 4, drop_last=True) == 1  # an epoch shorter than a step still trains
    plan = [[4 * i + j for j in range(4)] for i in range(7)]
    assert dropped_rows(plan, 4, drop_last=True) == 12 and dropped_rows(plan, 4, drop_last=False) == 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_an_epoch_trains_every_pair_unless_drop_last(tmp_path, tiny_model_dir, monkeypatch, caplog, drop_last):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "pairs", n_train=28)
    cfg = make_cfg(tmp_path, str(tiny_model_dir), **{"data.source": str(data), "dpo.max_steps": None,
                                                     "dpo.epochs": 1.0, "dpo.grad_accum": 4,
                                                     "dpo.drop_last": drop_last, "dpo.layout": "padded"})
    with caplog.at_level("WARNING", logger="preftune"):
        summary = run_stage(cfg, "dpo", Path(cfg.output_dir), str(tiny_model_dir))
    if drop_last:
        assert summary["steps"] == 1 and summary["pairs_seen"] == 16 and summary["dropped_rows"] == 12
        assert "drop_last leaves out" in caplog.text and "12 of 28 rows" in caplog.text
    else:
        assert summary["steps"] == 2 and summary["pairs_seen"] == 28 and summary["dropped_rows"] == 0
    last = metrics(Path(cfg.output_dir))[-1]
    assert last["pairs_seen"] == summary["pairs_seen"]
    assert json.loads((Path(cfg.output_dir) / "run.json").read_text())["dropped_rows"] == summary["dropped_rows"]

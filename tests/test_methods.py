"""The SFT and DPO step functions on the tiny Llama: step-0 values with policy == reference, metric
wiring, the RPO term, reference-free losses, and gradients reaching the model."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.config import DPOConfig, SFTConfig
from preftune.data.collate import collate_padded
from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.embedded import tiny_llama
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps
from preftune.methods import METHODS, reference_logps_of

# Two pairs: (prompt, chosen, rejected) token ids.
PAIRS = [([1, 5, 9, 13], [40, 41, 42], [60]), ([1, 7], [50, 51, 52, 53, 54], [70, 71])]


def preference_batch(pairs, pad_id: int = 0) -> dict:
    """Padded layout (rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected), built by the collate
    module, which test_collate checks against per-sequence runs."""
    items = [TokenizedPair(p, c, r, key=k) for (p, c, r), k in zip(pairs, "abcdefgh")]
    return collate_padded(items, pad_id)


def manual_logps(model, prompt, completion) -> tuple[float, int]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    return float(sum(logp[p - 1, ids[0, p]] for p in range(len(prompt), ids.shape[1]))), len(completion)


@pytest.fixture(scope="module")
def policy():
    model, _ = tiny_llama(seed=0)
    return SequenceLogps(model.eval())


STEP0 = [
    # (loss, label_smoothing, expected loss at policy == reference with beta = 0.1)
    ("sigmoid", 0.0, math.log(2)),
    ("sigmoid", 0.1, math.log(2)),  # cDPO: -(0.9 + 0.1) log sigma(0) = ln 2
    ("robust", 0.1, math.log(2)),  # (0.9 - 0.1) ln 2 / (1 - 0.2) = ln 2
    ("hinge", 0.0, 1.0),  # relu(1 - 0) = 1: ln 2 does not hold for hinge
    ("ipo", 0.0, 25.0),  # (0 - 1 / (2 * 0.1))^2 = 25: nor for ipo
]


@pytest.mark.parametrize("loss,smoothing,expected", STEP0)
def test_step0_policy_equals_reference(policy, loss, smoothing, expected):
    """Reference log-probs from the same model: every reward and margin is 0, accuracy 0 (ties are not
    wins, as in TRL) and the loss is ln 2 for sigmoid/cDPO/robust (1 for hinge, 1/(4 beta^2) for ipo)."""
    batch = preference_batch(PAIRS)
    cfg = DPOConfig(loss=loss, beta=0.1, label_smoothing=smoothing)
    ref = reference_logps_of(policy, batch)
    loss_value, metrics = METHODS["dpo"].step(policy, batch, cfg, ref)
    assert loss_value.item() == pytest.approx(expected, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[key]) == pytest.approx(0.0, abs=1e-7), key


def test_step0_adapter_reference_is_ln2():
    """LoRA policy with fresh (zero-B) adapters; reference = the same module inside disable_adapter():
    loss ln 2 and rewards 0."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama(seed=2)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    policy = SequenceLogps(peft_model)
    batch = preference_batch(PAIRS)
    with peft_model.disable_adapter():
        ref = reference_logps_of(policy, batch)
    loss, metrics = METHODS["dpo"].step(policy, batch, DPOConfig(beta=0.1), ref)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in peft_model.named_parameters()
        if "lora_B" in n
    )


def test_dpo_metrics_match_manual_logps(policy):
    """logps/* are batch means of summed (and per-token mean) completion log-probs, computed by hand
    per sequence; rewards/chosen with a shifted reference (-1 per chosen) is beta * (logp + 1) on average."""
    batch = preference_batch(PAIRS)
    model = policy.model
    chosen = [manual_logps(model, p, c) for p, c, _ in PAIRS]
    rejected = [manual_logps(model, p, r) for p, _, r in PAIRS]
    ref = {
        "chosen": torch.tensor([s for s, _ in chosen]) - 1,
        "rejected": torch.tensor([s for s, _ in rejected]),
    }
    _, m = METHODS["dpo"].step(policy, batch, DPOConfig(beta=0.5), ref)
    assert float(m["logps/chosen"]) == pytest.approx(sum(s for s, _ in chosen) / 2, abs=1e-5)
    assert float(m["logps/rejected"]) == pytest.approx(sum(s for s, _ in rejected) / 2, abs=1e-5)
    assert float(m["logps/chosen_mean"]) == pytest.approx(sum(s / n for s, n in chosen) / 2, abs=1e-5)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5, abs=1e-5)
    assert float(m["rewards/rejected"]) == pytest.approx(0.0, abs=1e-5)
    assert float(m["rewards/accuracies"]) == 1.0
    assert float(m["loss"]) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-5)


def test_sft_weight_adds_chosen_token_mean_nll(policy):
    """RPO: loss = DPO loss + w * (-(sum of chosen logps) / (number of chosen tokens)); at step 0
    that is ln 2 + 0.5 * NLL with NLL = -(s0 + s1) / (3 + 5)."""
    batch = preference_batch(PAIRS)
    chosen = [manual_logps(policy.model, p, c) for p, c, _ in PAIRS]
    nll = -sum(s for s, _ in chosen) / sum(n for _, n in chosen)
    ref = reference_logps_of(policy, batch)
    loss, m = METHODS["dpo"].step(policy, batch, DPOConfig(beta=0.1, sft_weight=0.5), ref)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-5)
    assert float(m["nll_loss"]) == pytest.approx(nll, abs=1e-5)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_run_without_reference(policy, loss):
    batch = preference_batch(PAIRS)
    cfg = DPOConfig(loss=loss)
    assert not METHODS["dpo"].needs_reference(cfg)
    value, metrics = METHODS["dpo"].step(policy, batch, cfg, None)
    assert torch.isfinite(value) and "rewards/margins" in metrics


def test_missing_reference_is_an_error(policy):
    assert METHODS["dpo"].needs_reference(DPOConfig(loss="sigmoid"))
    with pytest.raises(PreftuneError, match="reference"):
        METHODS["dpo"].step(policy, preference_batch(PAIRS), DPOConfig(loss="sigmoid"), None)


def test_sft_step_is_token_mean_nll_and_trains(policy):
    """SFT on the chosen halves: loss = -(sum of all completion logps) / (3 + 5 tokens), and its
    gradient reaches the embedding."""
    pairs = PAIRS
    seqs = [(p, c) for p, c, _ in pairs]
    batch = preference_batch(pairs)  # use the first B rows only as an SFT batch
    keep = batch["score_seq"] < len(pairs)
    sft_batch = dict(
        batch,
        input_ids=batch["input_ids"][:2],
        attention_mask=batch["attention_mask"][:2],
        score_index=batch["score_index"][keep],
        score_target=batch["score_target"][keep],
        score_seq=batch["score_seq"][keep],
        num_seqs=2,
    )
    expected = [manual_logps(policy.model, p, c) for p, c in seqs]
    assert not METHODS["sft"].needs_reference(SFTConfig())
    loss, metrics = METHODS["sft"].step(policy, sft_batch, SFTConfig(), None)
    assert loss.item() == pytest.approx(-sum(s for s, _ in expected) / 8, abs=1e-5)
    assert float(metrics["logps/mean"]) == pytest.approx(sum(s / n for s, n in expected) / 2, abs=1e-5)
    policy.model.zero_grad()
    loss.backward()
    assert policy.model.get_input_embeddings().weight.grad.abs().sum() > 0
    policy.model.zero_grad()


def test_tail_segments_split_each_sequence_at_the_shorter_completion():
    """PAIRS have chosen lengths (3, 5) and rejected lengths (1, 2): shared lengths 1 and 2, so chosen 0
    keeps 1 token in segment 0 and 2 in segment 4 + 0; chosen 1 keeps 2 in segment 1 and 3 in 4 + 1;
    the rejected completions have no tail."""
    from preftune.methods import tail_segments

    batch = preference_batch(PAIRS)
    seq, n = tail_segments(batch)
    assert n == 8
    counts = torch.bincount(seq, minlength=8).tolist()
    assert counts == [1, 2, 1, 2, 2, 3, 0, 0]
    # tail tokens are the last ones of their sequence, in order
    for s in range(4):
        own = seq[batch["score_seq"] == s]
        assert (own[: counts[s]] == s).all() and (own[counts[s]:] == s + 4).all()


def test_ld_alpha_and_wpo_by_hand(policy):
    """LD-DPO: logps/chosen = shared-part sum + alpha * tail sum, per sequence from full logits.
    WPO: a pair's weight is exp(mean_t(log p_t - log sum_v p_v^2)) of chosen times that of rejected; at
    step 0 the loss is ln 2 times the mean weight. Chunked and plain log-probs agree."""
    batch = preference_batch(PAIRS)
    model = policy.model

    def per_token(prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        pos = range(len(prompt) - 1, ids.shape[1] - 1)
        tok = torch.stack([logp[p, ids[0, p + 1]] for p in pos])
        sq = torch.stack([torch.logsumexp(2 * logp[p], -1) for p in pos])
        return tok, sq

    chosen = [per_token(p, c) for p, c, _ in PAIRS]
    rejected = [per_token(p, r) for p, _, r in PAIRS]
    ld = [float(t[:len(r)].sum() + 0.3 * t[len(r):].sum()) for (t, _), (_, _, r) in zip(chosen, PAIRS)]
    weight = [math.exp(float((ct - cs).mean())) * math.exp(float((rt - rs).mean()))
              for (ct, cs), (rt, rs) in zip(chosen, rejected)]
    ref = reference_logps_of(policy, batch)
    for chunked in (True, False):
        _, m = METHODS["dpo"].step(policy, batch, DPOConfig(ld_alpha=0.3, chunked_logps=chunked), ref)
        assert float(m["logps/chosen"]) == pytest.approx(sum(ld) / 2, abs=1e-5)
        assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-6)  # LD on both sides: still ln 2
        loss, _ = METHODS["dpo"].step(policy, batch, DPOConfig(wpo=True, chunked_logps=chunked), ref)
        assert loss.item() == pytest.approx(math.log(2) * sum(weight) / 2, rel=1e-5)


def test_what_the_loop_asks_of_a_method():
    """train.py asks the Method, never the config type: TR-DPO syncs after every ``ref_model_sync_steps``-th
    step with its alpha; run.json names a preference stage by its loss; SFT is padded, takes no curve
    snapshots and masks its prompt unless ``completion_only`` is false; KTO losses read unpaired rows."""
    dpo, sft = METHODS["dpo"], METHODS["sft"]
    tr = DPOConfig(sync_ref_model=True, ref_model_sync_steps=3, ref_model_mixup_alpha=0.5)
    assert [dpo.reference_sync(tr, s) for s in (1, 2, 3, 4, 6)] == [None, None, 0.5, None, 0.5]
    assert dpo.reference_sync(DPOConfig(), 512) is None and sft.reference_sync(SFTConfig(), 3) is None
    assert dpo.run_fields(DPOConfig(loss="ipo", beta=0.3)) == {"method": "ipo", "loss": "ipo", "beta": 0.3}
    assert sft.run_fields(SFTConfig()) == {"loss": None, "beta": None}
    assert dpo.unpaired(DPOConfig(loss="kto")) and not dpo.unpaired(DPOConfig()) and not sft.unpaired(SFTConfig())
    assert sft.layout(SFTConfig(), None) == "padded" and not sft.curves and dpo.curves
    items = [TokenizedSFT([1, 5], [40, 41], key="a")]
    masked = sft.collate(SFTConfig(), "padded", 0)(items)
    whole = sft.collate(SFTConfig(completion_only=False), "padded", 0)(items)
    assert masked["score_index"].numel() == 2 < whole["score_index"].numel()
    pairs = dpo.collate(DPOConfig(), "padded", 0)([TokenizedPair(p, c, r, key=k) for (p, c, r), k in zip(PAIRS, "ab")])
    assert torch.equal(pairs["input_ids"], preference_batch(PAIRS)["input_ids"])

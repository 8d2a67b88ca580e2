"""preftune's DPO step against TRL 1.16 on the same tiny model, the same reference and the same token ids.

TRL tokenizes an in-memory dataset; its collated batch goes through ``DPOTrainer.compute_loss`` (which
records TRL's metrics in ``trainer._metrics``), and preftune's batch is built from TRL's own token ids,
in the padded and the prefix-shared layout. ORPO and SimPO compare with ``trl.experimental``'s
ORPOTrainer and CPOTrainer (``get_batch_loss_metrics``)."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch

from preftune.config import DPOConfig as OurDPOConfig
from preftune.embedded import tiny_llama
from preftune.logprobs import SequenceLogps
from preftune.methods import METHODS, reference_logps_of

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = ["The sky is", "Two plus two equals", "Name a fruit:"]
CHOSEN = [" blue.", " four, of course.", " apple"]
REJECTED = [" green and purple.", " five", " a hammer, which is a tool"]
TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    """Policy (seed 0) and a different reference (seed 1), so rewards are not zero."""
    policy, tok = tiny_llama(seed=0)
    reference, _ = tiny_llama(seed=1)
    return policy, reference, tok


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def common_args() -> dict:
    return dict(
        output_dir=tempfile.mkdtemp(),
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-4,
        max_length=4096,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=len(PROMPTS),
        seed=0,
    )


def padded(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict:
    """Batch contract, padded layout: rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), width), pad_id)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    index, target, seq = [], [], []
    for r, (prompt, completion) in enumerate(seqs):
        ids = prompt + completion
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        index += [r * width + p - 1 for p in range(len(prompt), len(ids))]
        target += completion
        seq += [r] * len(completion)
    return _contract(input_ids, attention_mask, None, index, target, seq, len(pairs))


def prefix_shared(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict:
    """Batch contract, one row per pair ``[prompt | chosen | rejected]`` with a 4D additive mask (rejected
    sees the prompt, not chosen) and rejected positions restarting at len(prompt)."""
    b = len(pairs)
    width = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    input_ids = torch.full((b, width), pad_id)
    allowed = torch.zeros(b, 1, width, width, dtype=torch.bool)
    position_ids = torch.zeros(b, width, dtype=torch.long)
    index, target, seq = [], [], []
    for i, (p, c, r) in enumerate(pairs):
        lp, lc, lr = len(p), len(c), len(r)
        input_ids[i, : lp + lc + lr] = torch.tensor(p + c + r)
        position_ids[i, : lp + lc + lr] = torch.cat([torch.arange(lp + lc), torch.arange(lp, lp + lr)])
        allowed[i, 0, : lp + lc, : lp + lc] = torch.ones(lp + lc, lp + lc).tril().bool()
        allowed[i, 0, lp + lc : lp + lc + lr, :lp] = True
        allowed[i, 0, lp + lc : lp + lc + lr, lp + lc : lp + lc + lr] = torch.ones(lr, lr).tril().bool()
        index += [i * width + lp + j - 1 for j in range(lc)]
        index += [i * width + (lp - 1 if j == 0 else lp + lc + j - 1) for j in range(lr)]
        target += c + r
        seq += [i] * lc + [b + i] * lr
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return _contract(input_ids, mask, position_ids, index, target, seq, b)


def _contract(input_ids, attention_mask, position_ids, index, target, seq, b) -> dict:
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "score_index": torch.tensor(index),
        "score_target": torch.tensor(target),
        "score_seq": torch.tensor(seq),
        "num_seqs": 2 * b,
        "num_pairs": b,
        "tokens": 0,
        "keys": [str(i) for i in range(b)],
    }


LAYOUTS = {"padded": padded, "prefix_shared": prefix_shared}


def collate_layouts() -> dict:
    """The project's own collate functions (data/collate.py) on the same ids, packed included."""
    from preftune.data.collate import collate_packed, collate_padded, collate_prefix_shared
    from preftune.data.rows import TokenizedPair

    def adapt(fn):
        return lambda pairs, pad_id: fn(
            [TokenizedPair(p, c, r, key=str(i)) for i, (p, c, r) in enumerate(pairs)], pad_id
        )

    return {
        f"collate:{f.__name__}": adapt(f) for f in (collate_padded, collate_prefix_shared, collate_packed)
    }


def trl_dpo(models, dataset, **kwargs) -> tuple[dict, list[tuple[list[int], list[int], list[int]]]]:
    """TRL's loss and metrics for one batch of all rows, and TRL's token ids per pair."""
    policy, reference, tok = models
    args = trl.DPOConfig(**common_args(), precompute_ref_log_probs=False, **kwargs)
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=dataset,
        processing_class=tok,
    )
    rows = [trainer.train_dataset[i] for i in range(len(dataset))]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    metrics["loss"] = loss.item()
    return metrics, [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]


def ours(models, pairs, layout, cfg: OurDPOConfig) -> dict[str, float]:
    """preftune's DPO step on ``pairs`` laid out by ``layout`` (a name in LAYOUTS or a function)."""
    policy, reference, tok = models
    batch = (LAYOUTS[layout] if isinstance(layout, str) else layout)(pairs, tok.pad_token_id)
    ref = reference_logps_of(SequenceLogps(reference), batch) if METHODS["dpo"].needs_reference(cfg) else None
    loss, metrics = METHODS["dpo"].step(SequenceLogps(policy), batch, cfg, ref)
    out = {k: float(v) for k, v in metrics.items()}
    assert out["loss"] == pytest.approx(loss.item())
    return out


def ours_every_way(models, pairs, our_kwargs: dict, layouts: dict | None = None):
    """(layout name, chunked, preftune's metrics) for every layout (padded and collate.py's prefix-shared
    by default) with chunked and plain log-probs."""
    layouts = layouts or {"padded": padded, "collate:prefix_shared": collate_layouts()["collate:collate_prefix_shared"]}
    for name, layout in layouts.items():
        for chunked in (True, False):
            yield name, chunked, ours(models, pairs, layout, OurDPOConfig(chunked_logps=chunked, **our_kwargs))


DPO_KEYS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]

DPO_CASES = {
    # id: (TRL DPOConfig kwargs, preftune DPOConfig kwargs)
    "sigmoid": (dict(loss_type=["sigmoid"], beta=0.1), dict(loss="sigmoid", beta=0.1)),
    "ipo": (dict(loss_type=["ipo"], beta=0.1), dict(loss="ipo", beta=0.1, ipo_normalize="mean")),
    "hinge": (dict(loss_type=["hinge"], beta=0.5), dict(loss="hinge", beta=0.5)),
    "robust": (
        dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2),
        dict(loss="robust", beta=0.1, label_smoothing=0.2),
    ),
    "rpo": (
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
        dict(loss="sigmoid", beta=0.1, sft_weight=0.5),
    ),
}

# Every other TRL 1.16 loss type, the combination forms, LD-DPO, the f-divergences and WPO, in the
# general ``dpo.loss`` form. Checked in two layouts (hand-built padded, the project's prefix-shared).
MORE_CASES = {
    "exo_pair": (dict(loss_type=["exo_pair"], beta=0.3, label_smoothing=1e-3),
                 dict(loss={"name": "exo_pair", "beta": 0.3, "label_smoothing": 1e-3})),
    "nca_pair": (dict(loss_type=["nca_pair"], beta=0.3), dict(loss={"name": "nca_pair", "beta": 0.3})),
    "bco_pair": (dict(loss_type=["bco_pair"], beta=0.3), dict(loss={"name": "bco_pair", "beta": 0.3})),
    "sppo_hard": (dict(loss_type=["sppo_hard"], beta=0.3), dict(loss={"name": "sppo_hard", "beta": 0.3})),
    "aot": (dict(loss_type=["aot"], beta=0.3, label_smoothing=0.1),
            dict(loss={"name": "aot", "beta": 0.3, "label_smoothing": 0.1})),
    "aot_unpaired": (dict(loss_type=["aot_unpaired"], beta=0.3, label_smoothing=0.1),
                     dict(loss={"name": "aot_unpaired", "beta": 0.3, "label_smoothing": 0.1})),
    "apo_zero": (dict(loss_type=["apo_zero"], beta=0.3), dict(loss={"name": "apo_zero", "beta": 0.3})),
    "apo_down": (dict(loss_type=["apo_down"], beta=0.3), dict(loss={"name": "apo_down", "beta": 0.3})),
    "discopop": (dict(loss_type=["discopop"], beta=0.3, discopop_tau=0.2),
                 dict(loss={"name": "discopop", "beta": 0.3, "tau": 0.2})),
    "sigmoid_norm": (dict(loss_type=["sigmoid_norm"], beta=0.3), dict(loss="sigmoid_norm", beta=0.3)),
    "mpo_list": (dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.2),
                 dict(loss=[{"name": "sigmoid", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2},
                            {"name": "sft", "weight": 1.0}], beta=0.2)),
    "mpo_loss_weights": (dict(loss_type=["ipo", "hinge"], loss_weights=[0.3, 0.7], beta=0.2),
                         dict(loss=["ipo", "hinge"], loss_weights=[0.3, 0.7], beta=0.2)),
    "ld_alpha": (dict(loss_type=["sigmoid"], beta=0.1, ld_alpha=0.3), dict(loss="sigmoid", beta=0.1, ld_alpha=0.3)),
    "ld_alpha_ipo_sft": (dict(loss_type=["ipo", "sft"], beta=0.1, ld_alpha=0.5),
                         dict(loss=["ipo", "sft"], beta=0.1, ld_alpha=0.5)),
    "forward_kl": (dict(loss_type=["sigmoid"], beta=0.3, f_divergence_type="forward_kl"),
                   dict(loss={"name": "sigmoid", "beta": 0.3, "f_divergence": "forward_kl"})),
    "js_divergence": (dict(loss_type=["hinge"], beta=0.3, f_divergence_type="js_divergence"),
                      dict(loss={"name": "hinge", "beta": 0.3, "f_divergence": "js_divergence"})),
    "alpha_divergence": (
        dict(loss_type=["ipo", "robust"], beta=0.3, f_divergence_type="alpha_divergence",
             f_alpha_divergence_coef=0.3, label_smoothing=0.1),
        dict(loss=[{"name": "ipo", "f_divergence": "alpha_divergence", "f_alpha": 0.3},
                   {"name": "robust", "f_divergence": "alpha_divergence", "f_alpha": 0.3, "label_smoothing": 0.1}],
             beta=0.3)),
    "f_divergence_discopop_sigmoid_norm": (
        dict(loss_type=["discopop", "sigmoid_norm"], beta=0.3, f_divergence_type="js_divergence"),
        dict(loss=[{"name": "discopop", "f_divergence": "js_divergence"},
                   {"name": "sigmoid_norm", "f_divergence": "js_divergence"}], beta=0.3)),
    "wpo": (dict(loss_type=["sigmoid"], beta=0.1, use_weighting=True), dict(loss="sigmoid", beta=0.1, wpo=True)),
    # (TRL 1.16 cannot weight its "sft" term: the in-place WPO product fails on the expanded scalar)
    "wpo_ld_combination": (dict(loss_type=["sigmoid", "bco_pair"], beta=0.1, use_weighting=True, ld_alpha=0.5),
                           dict(loss=["sigmoid", "bco_pair"], beta=0.1, wpo=True, ld_alpha=0.5)),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_losses_match_trl(models, dataset, case):
    """loss, rewards/* and logps/* (sums) equal TRL 1.16's DPOTrainer within 1e-5 on one batch of 3 pairs,
    in both hand-built layouts and through data/collate.py's padded, prefix-shared and packed layouts
    (chunked and plain log-probs). TRL computes IPO on per-token means (ipo_normalize='mean'); RPO is TRL's
    loss_type=['sigmoid', 'sft'] with loss_weights [1, w] = preftune's sft_weight w."""
    trl_kwargs, our_kwargs = DPO_CASES[case]
    expected, pairs = trl_dpo(models, dataset, **trl_kwargs)
    for name, chunked, got in ours_every_way(models, pairs, our_kwargs, LAYOUTS | collate_layouts()):
        for key in DPO_KEYS:
            assert got[key] == pytest.approx(expected[key], abs=TOL), (name, chunked, key)
    assert abs(expected["rewards/margins"]) > 1e-3  # a real, non-trivial comparison


BF16_TOL = {"loss": 5e-5, "rewards/": 5e-5, "logps/": 5e-5}
"""bf16 tolerances, absolute. Both sides run the same bf16 matmuls and take the log-softmax in fp32; on
the tiny model they agree to about 1e-5 (what is left is the order of the fp32 sums: TRL's full logits
against preftune's chunked head at the scored positions). bf16 itself moves the log-prob sums away from
fp32's by 3e-4 (bf16 weights) to 1e-3 (autocast) here (checked: more than 2.5e-4, five times the bound),
so a side left in fp32 fails it."""


def _bf16_models(models, precision: str):
    """bf16 copies of policy and reference for ``bf16``; the fp32 models (under autocast) otherwise."""
    policy, reference, tok = models
    if precision == "bf16":
        return copy.deepcopy(policy).to(torch.bfloat16), copy.deepcopy(reference).to(torch.bfloat16), tok
    return models


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
@pytest.mark.parametrize("case", ["sigmoid", "ipo", "rpo"])
def test_dpo_matches_trl_in_bf16(models, dataset, case, precision):
    """The same comparison in bf16, within :data:`BF16_TOL`: ``bf16-mixed`` runs both sides on the fp32
    models inside ``torch.autocast("cpu", bfloat16)`` (what TRL's ``bf16=True`` and preftune's
    ``bf16-mixed`` train under), ``bf16`` on bf16 copies of the weights; preftune's chunked head (its
    matmuls in bf16) and plain path, padded and prefix-shared. On a CPU without native bf16 both sides
    run as a preftune run does there (``model.bf16_fallback``), whatever ran before in this process."""
    from preftune.model import bf16_fallback

    trl_kwargs, our_kwargs = DPO_CASES[case]
    fp32, _ = trl_dpo(models, dataset, **trl_kwargs)
    bf16_fallback(precision)
    models = _bf16_models(models, precision)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        expected, pairs = trl_dpo(models, dataset, **trl_kwargs)
        for name, chunked, got in ours_every_way(models, pairs, our_kwargs):
            for key in DPO_KEYS:
                tol = next(t for prefix, t in BF16_TOL.items() if key.startswith(prefix))
                assert got[key] == pytest.approx(expected[key], abs=tol), (name, chunked, key)
    assert max(abs(expected[k] - fp32[k]) for k in ("logps/chosen", "logps/rejected")) > 2.5e-4  # really bf16


@pytest.mark.parametrize("case", list(MORE_CASES))
def test_every_trl_loss_type_and_option_matches(models, dataset, case):
    """Every other TRL 1.16 loss type, both combination forms (a list with weights; names with
    ``dpo.loss_weights``), LD-DPO (``ld_alpha``: TRL weights the tokens beyond the shorter completion in
    policy and reference alike, and logs the weighted sums under logps/*, as preftune does), the
    f-divergences on the losses TRL allows them (TRL sets one divergence for all losses; preftune makes
    it a parameter of those losses), and WPO (TRL's use_weighting) alone and with LD-DPO in a combination:
    loss, rewards/* and logps/* within 1e-5, in the padded and the prefix-shared layout, chunked and plain."""
    trl_kwargs, our_kwargs = MORE_CASES[case]
    expected, pairs = trl_dpo(models, dataset, **trl_kwargs)
    for name, chunked, got in ours_every_way(models, pairs, our_kwargs):
        for key in DPO_KEYS:
            assert got[key] == pytest.approx(expected[key], abs=TOL), (name, chunked, key)
    assert abs(expected["rewards/margins"]) > 1e-3


def test_sft_alone_matches_trl_loss_and_logps(models, dataset):
    """TRL's ``loss_type=["sft"]`` alone: loss and logps/* match. Difference: TRL still runs a reference
    and logs beta * log-ratios as rewards; preftune's sft needs no reference and logs the per-token mean
    log-probs as its rewards (there is no reference to compare with)."""
    expected, pairs = trl_dpo(models, dataset, loss_type=["sft"], beta=0.1)
    got = ours(models, pairs, "padded", OurDPOConfig(loss="sft"))
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert got[key] == pytest.approx(expected[key], abs=TOL), key
    assert got["rewards/chosen"] == pytest.approx(got["logps/chosen_mean"], abs=TOL)


def _orpo_cpo_pairs(trainer, n: int):
    """(prompt, chosen, rejected) ids from an ORPO/CPO trainer's rows: the completion is where labels != -100."""
    pairs = []
    for i in range(n):
        row = trainer.train_dataset[i]
        cut = next(j for j, lab in enumerate(row["chosen_labels"]) if lab != -100)
        cut_r = next(j for j, lab in enumerate(row["rejected_labels"]) if lab != -100)
        assert cut == cut_r and row["chosen_input_ids"][:cut] == row["rejected_input_ids"][:cut]
        pairs.append(
            (row["chosen_input_ids"][:cut], row["chosen_input_ids"][cut:], row["rejected_input_ids"][cut:])
        )
    return pairs


def _experimental(name: str):
    return pytest.importorskip(f"trl.experimental.{name}")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_simpo_matches_trl_cpo(models, dataset):
    """SimPO = TRL CPOTrainer(loss_type='simpo', simpo_gamma=gamma, cpo_alpha=w), beta 2, gamma 0.5: the
    loss and rewards/* match within 1e-5, cpo_alpha's NLL equals preftune's sft_weight term (both are
    the token mean over chosen completion tokens). Difference: TRL CPO logs logps/* as per-token means;
    preftune logs sums under logps/* and the means under logps/*_mean, which are compared here."""
    cpo = _experimental("cpo")
    policy, _, tok = models
    for cpo_alpha in (0.0, 0.7):
        args = cpo.CPOConfig(
            **common_args(), loss_type="simpo", simpo_gamma=0.5, beta=2.0, cpo_alpha=cpo_alpha
        )
        trainer = cpo.CPOTrainer(
            model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=tok
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        loss, expected = trainer.get_batch_loss_metrics(trainer.model, batch)
        pairs = _orpo_cpo_pairs(trainer, len(dataset))
        got = ours(
            models,
            pairs,
            "prefix_shared",
            OurDPOConfig(loss="simpo", beta=2.0, gamma=0.5, sft_weight=cpo_alpha),
        )
        assert got["loss"] == pytest.approx(loss.item(), abs=TOL)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
            assert got[key] == pytest.approx(expected[key], abs=TOL), key
        assert got["logps/chosen_mean"] == pytest.approx(expected["logps/chosen"], abs=TOL)
        assert got["logps/rejected_mean"] == pytest.approx(expected["logps/rejected"], abs=TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_orpo_matches_trl_odds_ratio_term(models, dataset):
    """ORPO vs TRL ORPOTrainer(beta=lambda=0.1): rewards/* (lambda * mean log-probs) and the odds-ratio
    term match within 1e-5; logps/*_mean match TRL's logps/* (TRL logs means for ORPO).

    The NLL term differs by design: TRL averages its NLL over every attended token of the chosen rows,
    prompt included, pooled over the batch; preftune uses the ORPO paper's L_SFT, the chosen completion's
    per-token mean NLL (``-logps/chosen_mean``), averaged over pairs. So we compare
    ``loss - NLL`` on each side: TRL ``loss - nll_loss`` == preftune ``loss + logps/chosen_mean``."""
    orpo = _experimental("orpo")
    policy, _, tok = models
    args = orpo.ORPOConfig(**common_args(), beta=0.1)
    trainer = orpo.ORPOTrainer(
        model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=tok
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
    loss, expected = trainer.get_batch_loss_metrics(trainer.model, batch)
    pairs = _orpo_cpo_pairs(trainer, len(dataset))
    for layout in LAYOUTS:
        got = ours(models, pairs, layout, OurDPOConfig(loss="orpo", orpo_lambda=0.1))
        assert got["loss"] + got["logps/chosen_mean"] == pytest.approx(
            loss.item() - expected["nll_loss"], abs=TOL
        )
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
            assert got[key] == pytest.approx(expected[key], abs=TOL), key
        assert got["logps/chosen_mean"] == pytest.approx(expected["logps/chosen"], abs=TOL)
        assert got["logps/rejected_mean"] == pytest.approx(expected["logps/rejected"], abs=TOL)


KTO_ROWS = {
    "prompt": ["The sky is", "Two plus two equals", "Name a fruit:", "Two plus two equals"],
    "completion": [" blue.", " five", " a hammer, which is a tool", " four, of course."],
    "label": [True, False, False, True],
}
KTO_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"]


@pytest.mark.parametrize("loss_type,weights", [("kto", (1.0, 1.0)), ("kto", (1.3, 0.6)),
                                               ("apo_zero_unpaired", (0.7, 1.2))])
def test_kto_matches_trl(models, loss_type, weights):
    """KTO and apo_zero_unpaired vs TRL 1.16's KTOTrainer on one batch of 4 unpaired rows (2 desirable):
    loss, rewards/* and logps/* (means over the desirable and over the undesirable rows), rewards/margins
    and the reference point ``kl`` within 1e-5, with desirable/undesirable weights. preftune's batch is
    built from TRL's own token ids, KL completions included (TRL rotates completions by one within the
    batch; preftune fixes each row's partner once, see data/unpaired.py), in the padded and prefix-shared
    layouts. TRL logs kl = 0 for apo_zero_unpaired (no KL term), as preftune does."""
    from preftune.data.collate import collate_prefix_shared, collate_unpaired
    from preftune.data.unpaired import TokenizedUnpaired

    reference, policy, tok = models  # swapped: this way round the batch's KL estimate is positive
    kto_args = {k: v for k, v in common_args().items() if k != "per_device_train_batch_size"}
    args = trl.KTOConfig(**kto_args, per_device_train_batch_size=4, loss_type=loss_type,
                         desirable_weight=weights[0], undesirable_weight=weights[1], beta=0.2)
    trainer = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_dict(KTO_ROWS), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(4)]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    expected = {k: v[-1] for k, v in trainer._metrics["train"].items()} | {"loss": loss.item()}
    kl_ids = [r.get("KL_completion_ids", rows[i - 1]["completion_ids"]) for i, r in enumerate(rows)]
    items = [TokenizedUnpaired(r["prompt_ids"], r["completion_ids"], kl, key=str(i), label=bool(r["label"]))
             for i, (r, kl) in enumerate(zip(rows, kl_ids))]
    cfg = OurDPOConfig(loss={"name": loss_type, "beta": 0.2, "desirable_weight": weights[0],
                             "undesirable_weight": weights[1]})
    for layout in (None, collate_prefix_shared):
        batch = collate_unpaired(items, tok.pad_token_id, **({"layout": layout} if layout else {}))
        ref = reference_logps_of(SequenceLogps(reference), batch)
        value, metrics = METHODS["dpo"].step(SequenceLogps(policy), batch, cfg, ref)
        for key in KTO_KEYS:
            assert float(metrics[key]) == pytest.approx(expected[key], abs=TOL), (layout, key)
    assert abs(expected["rewards/margins"]) > 1e-3
    if loss_type == "kto":
        assert expected["kl"] > 0  # the reference point is really in play

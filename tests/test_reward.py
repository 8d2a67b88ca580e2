"""Reward models: the Bradley-Terry loss by hand, the RM step against TRL 1.16's RewardTrainer on the same
batch (loss, rewards and metrics within 1e-5; with and without margin, with centring), and the
prefix-shared and packed rewards (and gradients) equal to the padded ones, and to the classifier's own
forward, on every architecture of the layout table that has a sequence classifier."""

from __future__ import annotations

import copy
import math
import tempfile
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.attention import TESTED_ARCHITECTURES
from preftune.data.collate import collate_packed, collate_padded, collate_prefix_shared
from preftune.data.rows import TokenizedPair
from preftune.errors import PreftuneError
from preftune.methods import METHODS
from preftune.reward import SequenceRewards, bradley_terry_loss, check_reward_head, rewards_of

TOL = 1e-5


def test_bradley_terry_by_hand() -> None:
    """r_c = [1, 0], r_r = [0, 2], margin [0.5, 0], c = 0.1:
    pair 0: -log sigmoid(1 - 0 - 0.5) = log(1 + e^-0.5) = 0.474077; centring 0.1 * 1^2 = 0.1 -> 0.574077
    pair 1: -log sigmoid(0 - 2) = log(1 + e^2) = 2.126928; centring 0.1 * 2^2 = 0.4 -> 2.526928"""
    c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    losses, _, _ = bradley_terry_loss(c, r, torch.tensor([0.5, 0.0]), 0.1)
    torch.testing.assert_close(losses, torch.tensor([0.574077, 2.526928]), atol=1e-6, rtol=0)
    plain, _, _ = bradley_terry_loss(c, r)
    torch.testing.assert_close(plain, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(2))]))


# ----------------------------------------------------------------------------- TRL's RewardTrainer
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = ["The sky is", "Two plus two equals", "Name a fruit:"]
CHOSEN = [" blue.", " four, of course.", " apple"]
REJECTED = [" green and purple.", " five", " a hammer, which is a tool"]
MARGINS = [0.5, -0.25, 1.5]


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tokenizer):
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # rewards far from 0, so the checks bite
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def trl_reward(model, tokenizer, margin: bool, center: float | None):
    """TRL's loss, metrics and rewards for one batch of all rows, and TRL's ids as (prompt, chosen, rejected)."""
    rows = {"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED} | ({"margin": MARGINS} if margin else {})
    args = trl.RewardConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False,
                            per_device_train_batch_size=3, center_rewards_coefficient=center, max_length=None)
    trainer = trl.RewardTrainer(model=copy.deepcopy(model), args=args, train_dataset=datasets.Dataset.from_dict(rows),
                                processing_class=tokenizer)
    examples = [trainer.train_dataset[i] for i in range(len(PROMPTS))]
    inputs = trainer.data_collator(examples)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()} | {"loss": loss.item()}
    with torch.no_grad():
        rewards = trainer.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
    ids = []
    for ex in examples:
        c, r = ex["chosen_ids"], ex["rejected_ids"]
        p = next(i for i in range(min(len(c), len(r)) + 1) if i == min(len(c), len(r)) or c[i] != r[i])
        ids.append((c[:p], c[p:], r[p:]))
    return metrics, rewards, ids


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01), (False, 0.5)])
def test_rm_step_matches_trl(reward_model, tokenizer, layout, margin, center) -> None:
    want, want_rewards, ids = trl_reward(reward_model, tokenizer, margin, center)
    items = [TokenizedPair(p, c, r, str(i)) for i, (p, c, r) in enumerate(ids)]
    assert all(it.prompt_ids for it in items)  # the rows share a real prompt prefix
    batch = {"padded": collate_padded, "prefix_shared": collate_prefix_shared, "packed": collate_packed}[layout](
        items, tokenizer.pad_token_id)
    if margin:
        batch["margin"] = torch.tensor(MARGINS)
    cfg = SimpleNamespace(center_rewards_coefficient=center)
    policy = SequenceRewards(reward_model)
    loss, metrics = METHODS["rm"].step(policy, batch, cfg, None)
    got_rewards = rewards_of(policy, batch).detach()
    torch.testing.assert_close(got_rewards, want_rewards, atol=TOL, rtol=0)
    assert loss.item() == pytest.approx(want["loss"], abs=TOL)
    for k in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert float(metrics[k]) == pytest.approx(want[k], abs=TOL), k
    assert 0 < want["accuracy"] < 1 or want["margin"] != 0  # a batch where the figures differ from trivial


# ----------------------------------------------------------------------------- layouts across architectures
PAD, EOS, VOCAB = 0, 2, 128
WINDOW = 4
GRAD_RTOL = 1e-5  # gradients reach ~10 (falcon's embeddings): fp32 rounding there is ~1e-5 absolute
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1,
              eos_token_id=EOS, num_labels=1)
CONFIGS: dict[str, dict] = {
    "llama": {}, "gemma": {"head_dim": 8}, "phi": {}, "gpt_neox": {}, "olmo": {}, "olmo2": {}, "falcon": {},
    "mistral": {"sliding_window": WINDOW}, "phi3": {"sliding_window": WINDOW}, "starcoder2": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": WINDOW},
    "gemma3_text": {"head_dim": 8, "sliding_window": WINDOW},
}
NO_SEQUENCE_CLASSIFIER = {"granite", "cohere"}  # transformers 5 has no *ForSequenceClassification for them


def tiny_classifier(model_type: str, attn: str):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type]})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn).float().eval()
    torch.nn.init.normal_(model.score.weight, std=0.1)
    return model


def pairs() -> list[TokenizedPair]:
    """Padding, an empty prompt, a completion cut without EOS, unequal lengths; no pad id inside a row."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [TokenizedPair(ids(7), ids(4) + [EOS], ids(9) + [EOS], "a"),
            TokenizedPair(ids(3), ids(6) + [EOS], ids(2) + [EOS], "b"),
            TokenizedPair(ids(12), ids(5), ids(8) + [EOS], "c"),
            TokenizedPair([], ids(3) + [EOS], ids(4) + [EOS], "d")]


def rewards_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    rewards = rewards_of(SequenceRewards(model), batch)
    n = batch["num_pairs"]
    (rewards[:n] - 2 * rewards[n:]).sum().backward()
    return rewards.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_table_covers_the_layout_table() -> None:
    assert set(CONFIGS) | NO_SEQUENCE_CLASSIFIER == set(TESTED_ARCHITECTURES)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_shared_rewards_match_padded(model_type, attn) -> None:
    if attn == "sdpa" and model_type == "gemma2":
        pytest.skip("transformers has no sdpa attention for gemma2")
    model = tiny_classifier(model_type, attn)
    items = pairs()
    padded = collate_padded(items, PAD)
    want, want_grads = rewards_and_grads(model, padded)
    with torch.no_grad():  # the classifier's own forward, pooling at each row's last non-pad token
        own = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(want, own, atol=TOL, rtol=0)
    assert any(g.abs().max() > 1e-4 for g in want_grads)
    for name, batch in (("prefix_shared", collate_prefix_shared(items, PAD)),
                        ("packed", collate_packed(items, PAD, token_budget=40))):
        got, got_grads = rewards_and_grads(model, batch)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=lambda m, x=name: f"{x}: {m}")
        for (pname, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=TOL, rtol=GRAD_RTOL, msg=lambda m, x=name, n=pname: f"{x} {n}: {m}")


def test_not_a_reward_model(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    with pytest.raises(PreftuneError, match="not a sequence classifier"):
        check_reward_head(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "rm")
    two = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with pytest.raises(PreftuneError, match="2 labels"):
        check_reward_head(two, "rm")


# ----------------------------------------------------------------------------- scoring a trained reward model
def test_scorer_reads_the_training_ids(tmp_path, reward_model, tokenizer) -> None:
    """RewardScorer (rounds, the judge, bon, eval rm) gives each chosen and rejected response the reward the
    training step computes on the tokenized pair; the tokenizer record refuses another tokenizer."""
    from transformers import AutoTokenizer

    from preftune.config import DataConfig
    from preftune.data.rows import PreferenceRow
    from preftune.data.tokenize import RowKind, tokenize
    from preftune.reward import RECORD, load_reward_model, reward_record, score_responses

    rows = [PreferenceRow([{"role": "user", "content": p}], c, r) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    items = tokenize(rows, tokenizer, DataConfig(), RowKind.PREFERENCE).items
    with torch.no_grad():
        want = rewards_of(SequenceRewards(reward_model), collate_prefix_shared(items, tokenizer.pad_token_id))
    folder = tmp_path / "rm"
    reward_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / RECORD).write_text(__import__("json").dumps(reward_record(tokenizer)))
    loaded = load_reward_model(str(folder), "test")
    assert loaded[2]  # trained by preftune: scored on its training ids
    got = score_responses(loaded, [r.prompt for r in rows] * 2, CHOSEN + REJECTED, batch_size=2)
    torch.testing.assert_close(torch.tensor(got), want, atol=TOL, rtol=0)
    (empty,) = score_responses(loaded, [rows[0].prompt], [""])  # saying nothing: prompt + EOS, scored
    with torch.no_grad():
        alone = reward_model(input_ids=torch.tensor([items[0].prompt_ids + [tokenizer.eos_token_id]])).logits[0, 0]
    assert empty == pytest.approx(float(alone), abs=TOL)

    other = AutoTokenizer.from_pretrained(folder)
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(PreftuneError, match="differs from the one this reward model was trained with"):
        load_reward_model(str(folder), "eval.winrate.judge_model", tokenizer=str(tmp_path / "other"))
    with pytest.raises(PreftuneError, match="not a sequence-classification model"):
        load_reward_model(_causal(tmp_path, tokenizer), "rounds.reward_model")


def _causal(tmp_path, tokenizer) -> str:
    from preftune.embedded import tiny_llama

    tiny_llama(tmp_path / "causal")
    return str(tmp_path / "causal")


def test_margin_column_must_be_numeric() -> None:
    from preftune.reward import margins

    ok = [TokenizedPair([1], [2], [3], "k1", {"m": 0.5}), TokenizedPair([1], [2], [3], "k2", {"m": 2})]
    assert margins(ok, "m").tolist() == [0.5, 2.0]
    with pytest.raises(PreftuneError, match="rm.margin_column 'm': row k3 has 'high' \\(str\\)"):
        margins(ok + [TokenizedPair([1], [2], [3], "k3", {"m": "high"})], "m")
    with pytest.raises(PreftuneError, match="row k4 has no such column"):
        margins([TokenizedPair([1], [2], [3], "k4", {})], "m")

"""Batch layouts against the oracle: the model run on each plain sequence on its own.

Every layout's per-sequence summed log-probs (segment sums of the scored tokens by ``score_seq``)
must equal the oracle's within 1e-5 in fp32. Model, logits and log-softmax are fp32; the sums are
accumulated in fp64 on both sides, because a random model's sequence sums are about -100, where one
fp32 ulp is 7.6e-6 and summation order alone would eat the tolerance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.attention import MASK_MIN, decoder_mask, shared_mask
from preftune.data.collate import (
    collate_packed,
    collate_padded,
    collate_prefix_shared,
    collate_sft,
    pack_into_batches,
    to_device,
)
from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.embedded import tiny_llama, tokenizer_dir
from preftune.errors import PreftuneError

PAD = 0
ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def oracle_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed log-prob of ``completion`` given ``prompt``: one plain forward, shift by one, gather."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    p = max(len(prompt), 1)
    targets = ids[0, p:]
    return logp[p - 1 : ids.shape[1] - 1].gather(-1, targets[:, None]).double().sum()


def batch_logps(model, b: dict) -> torch.Tensor:
    """Per-sequence summed log-probs from a batch, following the contract: [S]. The model gets the mask
    the model side builds for the batch (:func:`preftune.attention.decoder_mask`)."""
    mask = decoder_mask(model, b["attention_mask"], b["position_ids"], b["blocks"], b["segments"])
    logits = model(input_ids=b["input_ids"], attention_mask=mask, position_ids=b["position_ids"]).logits
    flat = logits.reshape(-1, logits.shape[-1])[b["score_index"]].float().log_softmax(-1)
    token_logps = flat.gather(-1, b["score_target"][:, None]).squeeze(-1).double()
    return torch.zeros(b["num_seqs"], dtype=torch.float64).index_add(0, b["score_seq"], token_logps)


def oracle_pairs(model, items: list[TokenizedPair]) -> torch.Tensor:
    chosen = [oracle_logps(model, it.prompt_ids, it.chosen_ids) for it in items]
    rejected = [oracle_logps(model, it.prompt_ids, it.rejected_ids) for it in items]
    return torch.stack(chosen + rejected)


def pair(prompt: list[int], chosen: list[int], rejected: list[int], key: str = "k") -> TokenizedPair:
    return TokenizedPair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, key=key)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama()
    model.eval()
    return model, tok


def synthetic_pairs(eos: int) -> list[TokenizedPair]:
    """Different prompt lengths, a truncated completion without EOS, unequal chosen/rejected lengths,
    and an empty prompt."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 4000, (n,), generator=g).tolist()

    return [
        pair(ids(7), ids(4) + [eos], ids(9) + [eos], "a"),
        pair(ids(3), ids(6) + [eos], ids(2) + [eos], "b"),
        pair(ids(12), ids(5), ids(8) + [eos], "c"),  # chosen truncated: no EOS
        pair(ids(1), ids(3) + [eos], ids(3) + [eos], "d"),
        pair([], ids(3) + [eos], ids(4) + [eos], "e"),  # no prompt: the first token has no predictor, unscored
    ]


# ----------------------------------------------------------------------------- padded
def test_padded_layout_shapes_and_scoring() -> None:
    """Hand-built batch: prompt [1,2], chosen [3], rejected [4,5] with T = 4.

    Rows: [1,2,3,pad], [1,2,4,5]. Scored: chosen 3 at t=2 predicted from flat 0*4+1 = 1;
    rejected 4 at t=2 from 1*4+1 = 5 and 5 at t=3 from 1*4+2 = 6. tokens = 3 + 4 = 7."""
    b = collate_padded([pair([1, 2], [3], [4, 5], "x")], pad_id=PAD)
    assert b["input_ids"].tolist() == [[1, 2, 3, PAD], [1, 2, 4, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["position_ids"] is None
    assert b["score_index"].tolist() == [1, 5, 6]
    assert b["score_target"].tolist() == [3, 4, 5]
    assert b["score_seq"].tolist() == [0, 1, 1]
    assert (b["num_seqs"], b["num_pairs"], b["tokens"], b["keys"]) == (2, 1, 7, ["x"])


def test_padded_matches_oracle(tiny) -> None:
    model, tok = tiny
    items = synthetic_pairs(tok.eos_token_id)
    with torch.no_grad():
        got = batch_logps(model, collate_padded(items, PAD))
        want = oracle_pairs(model, items)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_sft_completion_only_and_all_tokens(tiny) -> None:
    """completion_only scores len(completion) tokens per row; otherwise len(row) - 1 tokens."""
    model, tok = tiny
    items = [
        TokenizedSFT(prompt_ids=[10, 11, 12], completion_ids=[13, 14, tok.eos_token_id], key="a"),
        TokenizedSFT(prompt_ids=[20], completion_ids=[21, 22], key="b"),
    ]
    b = collate_sft(items, PAD)
    assert b["num_seqs"] == 2 and b["tokens"] == 6 + 3
    assert b["score_seq"].tolist() == [0, 0, 0, 1, 1]
    full = collate_sft(items, PAD, completion_only=False)
    assert full["score_seq"].tolist() == [0] * 5 + [1] * 2
    with torch.no_grad():
        got = batch_logps(model, b)
        want = torch.stack([oracle_logps(model, it.prompt_ids, it.completion_ids) for it in items])
        got_full = batch_logps(model, full)
        want_full = torch.stack([oracle_logps(model, it.prompt_ids[:1], it.prompt_ids[1:] + it.completion_ids)
                                 for it in items])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_full, want_full, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- prefix-shared: by hand
def test_prefix_shared_layout_by_hand() -> None:
    """prompt [1,2], chosen [3,4], rejected [5] (P=2, C=2, R=1), then prompt [6], chosen [7], rejected [8,9].

    Row 0 = [1,2,3,4,5], positions [0,1,2,3,2]; row 1 = [6,7,8,9,pad], positions [0,1,1,2,0]; T = 5.
    Scores, pair 0: 3 <- 1, 4 <- 2 (seq 0); 5 <- 1 (seq 2, from the prompt's last position 1).
    Pair 1: 7 <- 5+0 (seq 1); 8 <- 5+0, 9 <- 5+2 (seq 3).
    tokens as TRL counts them: (2+2)+(2+1) + (1+1)+(1+2) = 7 + 5 = 12."""
    b = collate_prefix_shared([pair([1, 2], [3, 4], [5], "x"), pair([6], [7], [8, 9], "y")], PAD)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, PAD]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert b["score_index"].tolist() == [1, 2, 1, 5, 5, 7]
    assert b["score_target"].tolist() == [3, 4, 5, 7, 8, 9]
    assert b["score_seq"].tolist() == [0, 0, 2, 1, 3, 3]
    assert (b["num_seqs"], b["num_pairs"], b["tokens"], b["keys"]) == (4, 2, 12, ["x", "y"])
    assert b["attention_mask"] is None  # the model side builds it from blocks and segments
    mask = shared_mask(b["blocks"], b["segments"])
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # rejected: prompt and itself, not chosen
    ]
    assert allowed[1] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # pad sees only itself: no fully masked row
    ]
    assert set(mask.unique().tolist()) == {0.0, MASK_MIN}


def test_packed_layout_by_hand() -> None:
    """Budget 6: pair a (3 tokens) and pair b (3 tokens) share row 0; pair c (4 tokens) opens row 1.

    Positions restart per pair; a key in another pair's block is masked. tokens = 4 + 4 + 6 = 14."""
    items = [pair([1], [2], [3], "a"), pair([4], [5], [6], "b"), pair([7, 8], [9], [10], "c")]
    b = collate_packed(items, PAD, token_budget=6)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, PAD, PAD]]
    assert b["position_ids"].tolist() == [[0, 1, 1, 0, 1, 1], [0, 1, 2, 2, 0, 0]]
    assert b["score_seq"].tolist() == [0, 3, 1, 4, 2, 5]
    assert b["score_index"].tolist() == [0, 0, 3, 3, 7, 7]
    allowed = (shared_mask(b["blocks"], b["segments"])[:, 0] == 0).int()
    assert allowed[0, 3].tolist() == [0, 0, 0, 1, 0, 0]  # pair b's prompt does not see pair a
    assert allowed[0, 5].tolist() == [0, 0, 0, 1, 0, 1]
    assert allowed[1, 5].tolist() == [0, 0, 0, 0, 0, 1]
    assert (b["num_seqs"], b["num_pairs"], b["tokens"]) == (6, 3, 14)
    one_row = collate_packed(items, PAD)  # no budget: the caller grouped them, one row
    assert one_row["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert one_row["score_seq"].tolist() == b["score_seq"].tolist()


def test_pack_into_batches_first_fit_decreasing() -> None:
    """Lengths 5, 3, 4, 2, 9 with budget 7: sorted 9, 5, 4, 3, 2 -> [9], [5, 2], [4, 3]."""
    items = [pair([1] * (n - 2), [2], [3], str(n)) for n in (5, 3, 4, 2, 9)]
    groups = pack_into_batches(items, token_budget=7)
    assert [[it.key for it in g] for g in groups] == [["9"], ["5", "2"], ["4", "3"]]
    assert pack_into_batches(items, token_budget=7) == groups
    with pytest.raises(PreftuneError, match="token_budget"):
        pack_into_batches(items, token_budget=0)


# ----------------------------------------------------------------------------- against the oracle
def smollm2_shaped(vocab: int, attn: str) -> LlamaForCausalLM:
    """SmolLM2's architecture scaled down: head_dim 64, 3 query heads over 1 KV head, tied embeddings,
    rope theta 1e5."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=2048,
        attn_implementation=attn,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def chat_pairs() -> list[TokenizedPair]:
    """Multi-turn prompts rendered with the real SmolLM2 chat template; replies + EOS."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    conversations = [
        ([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
          {"role": "user", "content": "Name a colour."}], "Blue.", "I refuse to answer that question."),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "4", "Five, probably."),
    ]

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    out = []
    for i, (messages, chosen, rejected) in enumerate(conversations):
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(pair(encode(prompt), encode(chosen) + [tok.eos_token_id],
                        encode(rejected) + [tok.eos_token_id], f"chat{i}"))
    return out


def make_model(arch: str, attn: str, tiny):
    if arch == "tiny":
        model, _ = tiny_llama()
        model.set_attn_implementation(attn)
        return model.eval()
    return smollm2_shaped(len(tiny[1]), attn)


SHARED = {
    "padded": lambda items: collate_padded(items, PAD),
    "prefix_shared": lambda items: collate_prefix_shared(items, PAD),
    "packed": lambda items: collate_packed(items, PAD, token_budget=40),
}


@pytest.mark.parametrize("arch", ["tiny", "smollm2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_match_oracle(arch, attn, tiny, chat_pairs) -> None:
    """Padding, a truncated completion, unequal lengths and multi-turn chat prompts, in one batch."""
    model = make_model(arch, attn, tiny)
    assert model.config._attn_implementation == attn
    items = synthetic_pairs(tiny[1].eos_token_id) + chat_pairs
    with torch.no_grad():
        want = oracle_pairs(model, items)
        for name, collate in SHARED.items():
            b = collate(items)
            got = batch_logps(model, b)
            assert torch.isfinite(got).all(), name
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert collate_packed(items, PAD, token_budget=40)["input_ids"].shape[0] < len(items)  # really packed


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_gradients_match_padded(layout, tiny, chat_pairs) -> None:
    """d/dθ sum_i (chosen_i - rejected_i) is the same through a shared layout as through padded."""
    model = make_model("tiny", "sdpa", tiny)
    items = synthetic_pairs(tiny[1].eos_token_id)[:2] + chat_pairs[:1]

    def grads(b: dict) -> list[torch.Tensor]:
        model.zero_grad()
        logps = batch_logps(model, b)
        (logps[: b["num_pairs"]] - logps[b["num_pairs"]:]).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    want = grads(collate_padded(items, PAD))
    got = grads(SHARED[layout](items))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_tokens_count_prompt_per_sequence(chat_pairs) -> None:
    """Every layout reports TRL's count: sum over pairs of (P + C) + (P + R)."""
    items = chat_pairs
    want = sum(2 * len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items)
    for name, collate in SHARED.items():
        assert collate(items)["tokens"] == want, name
        assert collate(items)["keys"] == ["chat0", "chat1"], name


def test_to_device_moves_tensors_only() -> None:
    b = collate_padded([pair([1], [2], [3])], PAD)
    moved = to_device(b, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["score_seq"].device.type == "meta"
    assert moved["position_ids"] is None and moved["keys"] == b["keys"] and moved["tokens"] == b["tokens"]

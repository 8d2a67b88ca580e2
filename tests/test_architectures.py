"""Prefix sharing on every architecture in :data:`preftune.attention.TESTED_ARCHITECTURES`, and the layout
choice.

Each architecture is a tiny random config (2 layers, hidden 32, 4 heads over 2 KV heads, vocab 128),
fp32, built offline. Its prefix-shared and packed per-sequence log-probs, and the gradients of
``sum(chosen - rejected)`` with respect to every parameter, must equal the padded path's within 1e-5
under sdpa and eager (gemma2 has no sdpa in transformers). The batch has padding, an empty prompt, a
completion cut without EOS and unequal chosen/rejected lengths. Sliding-window models get a window of
4 tokens, shorter than every sequence, so the windowed masks (one per layer type where the model mixes
full and sliding layers) are exercised: a control test shows that a full causal mask there is wrong.
Log-probs go through the chunked head where the model's head is plain, else through the full logits.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import preftune.attention as attention
from preftune.attention import (
    MASK_MIN,
    TESTED_ARCHITECTURES,
    choose_layout,
    decoder_mask,
    shared_layout_problem,
    shared_mask,
)
from preftune.data.collate import LAYOUTS, collate_packed, collate_padded, collate_prefix_shared
from preftune.data.rows import TokenizedPair
from preftune.errors import PreftuneError
from preftune.logprobs import SequenceLogps, _check_plain_head
from preftune.methods import sequence_logps_of

PAD, EOS, VOCAB = 0, 2, 128
ATOL = 1e-5
WINDOW = 4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1,
              eos_token_id=EOS)
CONFIGS: dict[str, dict] = {
    "llama": {}, "gemma": {"head_dim": 8}, "phi": {}, "gpt_neox": {}, "olmo": {}, "olmo2": {}, "granite": {},
    "falcon": {}, "cohere": {},
    # sliding-window models: every layer windowed ...
    "mistral": {"sliding_window": WINDOW}, "phi3": {"sliding_window": WINDOW},
    "starcoder2": {"sliding_window": WINDOW},
    # ... or one full and one sliding layer, a mask per layer type
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": WINDOW},
    "gemma3_text": {"head_dim": 8, "sliding_window": WINDOW},
}
SLIDING = ["mistral", "phi3", "starcoder2", "qwen2", "qwen3", "gemma2", "gemma3_text"]
NO_SDPA = {"gemma2"}  # transformers refuses sdpa for Gemma 2 (its attention soft-capping)


def tiny_model(model_type: str, attn: str = "sdpa", **overrides):
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS.get(model_type, {}), **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).float().eval()


def pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [
        TokenizedPair(ids(7), ids(4) + [EOS], ids(9) + [EOS], "a"),
        TokenizedPair(ids(3), ids(6) + [EOS], ids(2) + [EOS], "b"),
        TokenizedPair(ids(12), ids(5), ids(8) + [EOS], "c"),  # chosen cut without EOS
        TokenizedPair([], ids(3) + [EOS], ids(4) + [EOS], "d"),  # no prompt
    ]


LAYOUT_OF = {
    "padded": lambda items: collate_padded(items, PAD),
    "prefix_shared": lambda items: collate_prefix_shared(items, PAD),
    "packed": lambda items: collate_packed(items, PAD, token_budget=40),
}


def plain_head(model) -> bool:
    try:
        _check_plain_head(model, model.get_output_embeddings())
    except PreftuneError:
        return False
    return True


def logps_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed log-probs ``[S]`` and d(sum of chosen - rejected)/d(every parameter)."""
    model.zero_grad()
    sums = sequence_logps_of(SequenceLogps(model), batch, chunked=plain_head(model))[0]
    n = batch["num_pairs"]
    (sums[:n] - sums[n:]).sum().backward()
    return sums.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_every_tested_architecture_has_a_tiny_config() -> None:
    assert set(CONFIGS) == set(TESTED_ARCHITECTURES)


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_shared_layouts_match_padded(model_type, attn) -> None:
    if attn == "sdpa" and model_type in NO_SDPA:
        pytest.skip(f"transformers has no sdpa attention for {model_type}")
    model = tiny_model(model_type, attn)
    problem = shared_layout_problem(model)
    assert problem is None, problem
    items = pairs()
    want_sums, want_grads = logps_and_grads(model, LAYOUT_OF["padded"](items))
    assert torch.isfinite(want_sums).all()
    for layout in ("prefix_shared", "packed"):
        batch = LAYOUT_OF[layout](items)
        got_sums, got_grads = logps_and_grads(model, batch)
        torch.testing.assert_close(got_sums, want_sums, atol=ATOL, rtol=0, msg=lambda m, x=layout: f"{x}: {m}")
        assert any(g.abs().max() > 1e-4 for g in want_grads)
        for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, x=layout, n=name: f"{x} {n}: {m}")
    assert batch["input_ids"].shape[0] < len(items)  # the packed batch really packs


@pytest.fixture
def uncompiled_flex(monkeypatch) -> list:
    """transformers' flex_attention run uncompiled (a first inductor build takes 10 to 25 s on two
    cores), recording the ``block_mask`` each layer gets."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    seen = []

    def uncompiled(query, key, value, training=False, **kwargs):
        seen.append(kwargs.get("block_mask"))
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    return seen


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("model_type", sorted(set(CONFIGS) - {"falcon"}))  # Falcon has no flex_attention
def test_flex_forward_matches_padded_on_cpu(model_type, uncompiled_flex) -> None:
    """Under flex_attention (forward only: torch has no FlexAttention backward on the CPU; gradients are
    checked on CUDA in tests/test_gpu.py) every layer gets a BlockMask, and the sums equal the padded
    path's within 1e-5 plus 2.4e-7 relative."""
    from torch.nn.attention.flex_attention import BlockMask

    model = tiny_model(model_type, "eager" if model_type in NO_SDPA else "sdpa")
    items = pairs()
    with torch.no_grad():
        want = sequence_logps_of(SequenceLogps(model), LAYOUT_OF["padded"](items), chunked=False)[0]
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        for layout in ("prefix_shared", "packed"):
            uncompiled_flex.clear()
            got = sequence_logps_of(SequenceLogps(model), LAYOUT_OF[layout](items), chunked=False)[0]
            torch.testing.assert_close(got, want, atol=ATOL, rtol=2.4e-7)
            assert len(uncompiled_flex) == model.config.num_hidden_layers
            assert all(isinstance(m, BlockMask) for m in uncompiled_flex)


@pytest.mark.parametrize("model_type", SLIDING)
def test_sliding_window_needs_the_windowed_mask(model_type, monkeypatch) -> None:
    """Control: the same shared batch under a full causal mask (the window left out) misses the padded
    path by far more than the tolerance, so the test above really checks the window."""
    model = tiny_model(model_type, "eager")
    items = pairs()
    with torch.no_grad():
        want = sequence_logps_of(SequenceLogps(model), LAYOUT_OF["padded"](items), chunked=False)[0]
        monkeypatch.setattr(attention, "_sliding_window", lambda config: None)
        unwindowed = sequence_logps_of(SequenceLogps(model), LAYOUT_OF["prefix_shared"](items), chunked=False)[0]
    assert (unwindowed - want).abs().max() > 1e-3


def test_decoder_mask_per_layer_type() -> None:
    """Qwen2 with one full and one sliding layer gets ``{layer type: mask}``; the sliding one is windowed;
    without sliding layers only ``full_attention``. Llama gets one tensor in the model's dtype."""
    b = LAYOUT_OF["prefix_shared"](pairs())
    model = tiny_model("qwen2")
    masks = decoder_mask(model, None, b["position_ids"], b["blocks"], b["segments"])
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["full_attention"], shared_mask(b["blocks"], b["segments"], b["position_ids"]))
    assert torch.equal(masks["sliding_attention"],
                       shared_mask(b["blocks"], b["segments"], b["position_ids"], window=WINDOW))
    assert not torch.equal(masks["full_attention"], masks["sliding_attention"])
    no_window = decoder_mask(tiny_model("qwen2", use_sliding_window=False), None, b["position_ids"], b["blocks"],
                             b["segments"])
    assert set(no_window) == {"full_attention"}  # only the layer types the model has
    plain = decoder_mask(tiny_model("llama"), None, b["position_ids"], b["blocks"], b["segments"])
    assert isinstance(plain, torch.Tensor) and plain.dtype == torch.float32 and plain.shape[1] == 1


def test_windowed_mask_by_hand() -> None:
    """prompt [1, 2, 3], chosen [4], rejected [5, 6]: positions [0, 1, 2, 3, 3, 4]; window 2.

    Rejected 5 (position 3) sees position 2 and itself; rejected 6 (position 4) sees only itself and 5
    (position 3), not the prompt: distances are in positions, as in the plain [prompt + rejected]."""
    b = collate_prefix_shared([TokenizedPair([1, 2, 3], [4], [5, 6], "x")], PAD)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4]]
    allowed = (shared_mask(b["blocks"], b["segments"], b["position_ids"], window=2)[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],  # chosen 4
        [0, 0, 1, 0, 1, 0],  # rejected 5: the prompt's last token and itself, never chosen
        [0, 0, 0, 0, 1, 1],  # rejected 6
    ]
    full = shared_mask(b["blocks"], b["segments"], b["position_ids"])
    assert set(full.unique().tolist()) == {0.0, MASK_MIN}
    assert (full[0, 0] == 0).int().tolist()[5] == [1, 1, 1, 0, 1, 1]


# ----------------------------------------------------------------------------- layout choice
def test_choose_layout_on_tested_architectures(caplog) -> None:
    model = tiny_model("llama")
    assert set(LAYOUTS) == {"padded", "prefix_shared", "packed"}
    with caplog.at_level(logging.INFO, logger="preftune"):
        assert choose_layout("auto", model) == "prefix_shared"
    assert "batch layout: prefix_shared" in caplog.text
    assert choose_layout("packed", model) == "packed"
    assert choose_layout("padded", model) == "padded"
    model.config._attn_implementation = "flex_attention"  # BlockMask from blocks and segments
    assert choose_layout("auto", model) == "prefix_shared"
    for model_type in ("gemma2", "gemma3_text", "mistral", "gpt_neox"):
        assert choose_layout("auto", tiny_model(model_type, "eager")) == "prefix_shared", model_type
    with pytest.raises(PreftuneError, match="unknown"):
        choose_layout("ragged", model)


@pytest.mark.parametrize("case, why", [
    ("flash_attention_2", "take disjoint sequences only"),
    ("gpt2", "not among those tested"),
    ("falcon_alibi", "ALiBi"),
    ("gemma3_bidirectional", "bidirectionally"),
])
def test_auto_picks_padded_and_says_why(case, why, caplog) -> None:
    """Where the mask cannot be exact, auto picks padded and logs the reason; an explicit shared layout
    is an error naming it."""
    if case == "flash_attention_2":
        model = tiny_model("llama")
        model.config._attn_implementation = "flash_attention_2"  # only read here, never run
    elif case == "gpt2":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                      vocab_size=VOCAB))
    elif case == "falcon_alibi":
        model = tiny_model("falcon", "eager", alibi=True)
    else:
        model = tiny_model("gemma3_text", "eager", use_bidirectional_attention=True)
    with caplog.at_level(logging.INFO, logger="preftune"):
        assert choose_layout("auto", model) == "padded"
    assert "auto -> padded" in caplog.text and why in caplog.text
    with pytest.raises(PreftuneError, match=why):
        choose_layout("prefix_shared", model)

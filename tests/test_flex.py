"""The FlexAttention path of the prefix-shared and packed layouts: the BlockMask against the dense mask,
and SequenceLogps under ``attn_implementation="flex_attention"`` against the padded per-sequence path.

torch's FlexAttention has no backward on the CPU ("FlexAttention does not support backward on CPU"),
so here the CPU tests check the forward only, with flex_attention run uncompiled: transformers wraps it
in ``torch.compile``, whose first inductor build takes 10 to 25 s on two cores. Gradients, bf16 and
the compiled kernel are checked on CUDA only."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from preftune.attention import shared_block_mask, shared_mask
from preftune.data.collate import collate_packed, collate_padded, collate_prefix_shared, to_device
from preftune.data.rows import PreferenceRow, TokenizedPair
from preftune.data.tokenize import Limits, RowKind, tokenize
from preftune.embedded import tiny_llama
from preftune.logprobs import SequenceLogps
from preftune.methods import sequence_logps_of

PAD = 0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")

SHARED = {
    "prefix_shared": lambda items: collate_prefix_shared(items, PAD),
    "packed": lambda items: collate_packed(items, PAD, token_budget=130),
}


@pytest.fixture(scope="module")
def items(tokenizer) -> list[TokenizedPair]:
    """Uneven lengths (so rows are padded), a multi-turn chat prompt, and a rejected reply cut at
    ``max_length`` = 64 without its EOS, through the real tokenizer path."""
    rows = [
        PreferenceRow([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                       {"role": "user", "content": "Name a colour."}], "Blue.", "I refuse to answer that question."),
        PreferenceRow("What is 2 plus 3?", "2 + 3 = 5.", "2 + 3 = 6, I think."),
        PreferenceRow("Count.", "1 2 3", " ".join(str(i) for i in range(40))),
    ]
    done = tokenize(rows, tokenizer, Limits(max_length=64, max_prompt_length=56), RowKind.PREFERENCE)
    assert done.drops == [None] * len(rows), done.drops
    out = done.items
    assert all(isinstance(t, TokenizedPair) for t in out), out
    assert [t.truncated for t in out] == [False, False, True]
    return out


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_llama(seed=0)
    return model.eval()


def allowed_pairs(block_mask: BlockMask) -> torch.Tensor:
    """The BlockMask's mask_mod on every (query, key): ``[R, T, T]`` bool."""
    rows, _, q_len, kv_len = block_mask.shape
    return create_mask(block_mask.mask_mod, rows, 1, q_len, kv_len, device=block_mask.kv_indices.device)[:, 0]


# ----------------------------------------------------------------------------- the BlockMask
def test_block_mask_by_hand() -> None:
    """prompt [1,2], chosen [3,4], rejected [5]; then prompt [6], chosen [7], rejected [8,9] and a pad.
    The rejected query at 4 sees the prompt (0, 1) and itself, not chosen (2, 3); the pad sees itself."""
    b = collate_prefix_shared([TokenizedPair([1, 2], [3, 4], [5], "x"), TokenizedPair([6], [7], [8, 9], "y")], PAD)
    block_mask = shared_block_mask(b["blocks"], b["segments"])
    assert block_mask.shape == (2, 1, 5, 5)
    allowed = allowed_pairs(block_mask).int().tolist()
    assert allowed[0][4] == [1, 1, 0, 0, 1]
    assert allowed[1][3] == [1, 0, 1, 1, 0]  # second rejected token: prompt, rejected, not chosen
    assert allowed[1][4] == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_block_mask_matches_dense_mask(layout) -> None:
    """Six pairs of 3 to 140 tokens, packed rows up to 400: the BlockMask allows exactly the (query, key)
    pairs the dense mask allows, and its 128 x 128 tiles are occupied exactly where the dense mask has an
    allowed pair (so tiles between packed pairs are skipped, not computed)."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (p, c, r) in enumerate([(30, 50, 60), (5, 20, 15), (60, 40, 40), (10, 10, 30), (20, 90, 30), (1, 1, 1)]):
        p_ids, c_ids, r_ids = (torch.randint(5, 100, (n,), generator=g).tolist() for n in (p, c, r))
        items.append(TokenizedPair(p_ids, c_ids, r_ids, str(i)))
    b = (collate_prefix_shared(items, PAD) if layout == "prefix_shared"
         else collate_packed(items, PAD, token_budget=400))
    dense_allowed = shared_mask(b["blocks"], b["segments"])[:, 0] == 0
    block_mask = shared_block_mask(b["blocks"], b["segments"])
    assert torch.equal(allowed_pairs(block_mask), dense_allowed)
    rows, width = b["blocks"].shape
    tiles = -(-width // 128)
    grid = torch.zeros(rows, tiles * 128, tiles * 128, dtype=torch.bool)
    grid[:, :width, :width] = dense_allowed
    occupied = grid.reshape(rows, tiles, 128, tiles, 128).any(dim=(2, 4))
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), occupied)
    if layout == "packed":
        assert not occupied.all(), "some tiles must be skipped in packed rows"


def test_shared_batches_carry_labels_not_masks() -> None:
    """Shared layouts carry blocks and segments and no mask (the model side builds it); padded
    batches carry no blocks."""
    items = [TokenizedPair([1, 2], [3], [4, 5], "x"), TokenizedPair([6], [7, 8], [9], "y")]
    for collate in SHARED.values():
        b = collate(items)
        assert b["attention_mask"] is None and b["blocks"] is not None and b["segments"] is not None
    padded = collate_padded(items, PAD)
    assert padded["blocks"] is None and padded["segments"] is None


# ----------------------------------------------------------------------------- SequenceLogps under flex
@pytest.fixture
def eager_flex(monkeypatch) -> list:
    """Run transformers' flex_attention uncompiled and record the ``block_mask`` each layer gets."""
    import transformers.integrations.flex_attention as hf_flex

    seen = []

    def uncompiled(query, key, value, training=False, **kwargs):
        seen.append(kwargs.get("block_mask"))
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    return seen


def padded_sums(model, items) -> torch.Tensor:
    """The padded per-sequence path under sdpa: full logits, one row per sequence."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return sequence_logps_of(SequenceLogps(model), collate_padded(items, PAD), chunked=False)[0]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_flex_logps_match_padded_on_cpu(layout, tiny, items, eager_flex) -> None:
    """Forward only (see the module docstring). Sums agree within 1e-5 in fp32 plus 2.4e-7 relative, about
    two ulps (they reach -350, where one fp32 ulp is 3e-5), through the chunked and the plain path;
    every attention call got the BlockMask of the batch's blocks and segments (a dense 4D mask would
    give the same numbers through flex's score_mod)."""
    want = padded_sums(tiny, items)
    tiny.set_attn_implementation("flex_attention")
    try:
        b = SHARED[layout](items)
        for chunked in (True, False):
            eager_flex.clear()
            with torch.no_grad():
                got = sequence_logps_of(SequenceLogps(tiny, chunk_size=16), b, chunked=chunked)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=2.4e-7)
            assert len(eager_flex) == tiny.config.num_hidden_layers
            want_allowed = shared_mask(b["blocks"], b["segments"])[:, 0] == 0
            for block_mask in eager_flex:
                assert torch.equal(allowed_pairs(block_mask), want_allowed)
    finally:
        tiny.set_attn_implementation("sdpa")
    if layout == "packed":
        assert b["input_ids"].shape[0] < len(items)


@pytest.mark.e2e
def test_compiled_flex_on_cpu_across_batch_shapes(tiny, items) -> None:
    """transformers' compiled flex_attention (inductor's C++ kernel), forward only, on three batch shapes.
    From the second shape on, torch recompiles with dynamic shapes, and there torch 2.13 fails to build
    the kernel (CppCompileError) for a mask_mod that closes over two tensors; :func:`shared_block_mask`
    closes over one. Sums equal the padded path's as in the test above."""
    want = padded_sums(tiny, items)
    tiny.set_attn_implementation("flex_attention")
    try:
        for b in (SHARED["prefix_shared"](items), SHARED["packed"](items), collate_packed(items, PAD)):
            with torch.no_grad():
                got = sequence_logps_of(SequenceLogps(tiny), b)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=2.4e-7)
    finally:
        tiny.set_attn_implementation("sdpa")


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_flex_matches_padded_on_cuda(layout, dtype, items) -> None:
    """The compiled flex kernel, forward and backward, against the padded sdpa path: sums and
    d(sum of chosen - rejected)/d(every parameter).

    fp32: sums within 1e-5 plus 1e-6 relative (they reach -350, where one ulp is 3e-5), gradients within
    1e-5 plus 1e-4 relative. bf16: sums within 1e-2 (bf16 rounding across layouts moved them by 2e-3 on
    the CPU; letting rejected see chosen moves them by 0.03 to 0.15), gradients with cosine > 0.999."""
    model, _ = tiny_llama(seed=0)
    model = model.to("cuda", dtype)
    module = SequenceLogps(model)
    params = list(model.parameters())
    num_pairs = len(items)

    def run(attn: str, b: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.set_attn_implementation(attn)
        sums = sequence_logps_of(module, to_device(b, "cuda"))[0]
        grads = torch.autograd.grad((sums[:num_pairs] - sums[num_pairs:]).sum(), params)
        return sums.detach(), grads

    want_sums, want_grads = run("sdpa", collate_padded(items, PAD))
    got_sums, got_grads = run("flex_attention", SHARED[layout](items))
    if dtype == torch.float32:
        torch.testing.assert_close(got_sums, want_sums, atol=1e-5, rtol=1e-6)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(got_sums, want_sums, atol=1e-2, rtol=0)
        for g, w in zip(got_grads, want_grads):
            assert torch.nn.functional.cosine_similarity(g.float().flatten(), w.float().flatten(), dim=0) > 0.999

"""The chunked LM-head log-softmax against the plain path (values and gradients), gradcheck, and
SequenceLogps on the tiny Llama against a per-sequence computation, padded and prefix-shared, plain
and LoRA-wrapped."""

from __future__ import annotations

import pytest
import torch

from preftune.embedded import tiny_llama
from preftune.logprobs import (
    SequenceLogps,
    _ChunkedTokenLogps,
    sequence_logps,
    token_logps,
    token_logps_from_logits,
)

# (prompt ids, completion ids); ids are small so they are valid for the tiny model's vocabulary.
SEQUENCES = [
    ([1, 5, 9, 13], [40, 41, 42]),
    ([1, 7], [50, 51, 52, 53, 54]),
    ([1, 5, 9, 13], [60]),
    ([1, 7], [70, 71]),
]


def padded_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int = 0) -> dict:
    """Padded layout of the batch contract: one row per sequence, right-padded; the completion token at
    position p is scored from the hidden state at p - 1."""
    rows = [p + c for p, c in sequences]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    index, target, seq = [], [], []
    for r, ((prompt, _), ids) in enumerate(zip(sequences, rows)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
        for p in range(len(prompt), len(ids)):
            index.append(r * width + p - 1)
            target.append(ids[p])
            seq.append(r)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": None,
        "score_index": torch.tensor(index),
        "score_target": torch.tensor(target),
        "score_seq": torch.tensor(seq),
        "num_seqs": len(rows),
    }


def prefix_shared_batch(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int = 0) -> dict:
    """One row per pair, ``[prompt | chosen | rejected]``: rejected sees the prompt and itself, not chosen;
    its positions restart at len(prompt); its first token is scored from the prompt's last position.
    Sequences: chosen i -> i, rejected i -> B + i."""
    b = len(pairs)
    width = max(len(p) + len(c) + len(r) for p, c, r in pairs)
    input_ids = torch.full((b, width), pad_id)
    allowed = torch.zeros(b, width, width, dtype=torch.bool)
    position_ids = torch.zeros(b, width, dtype=torch.long)
    index, target, seq = [], [], []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        lp, lc, lr = len(prompt), len(chosen), len(rejected)
        input_ids[i, : lp + lc + lr] = torch.tensor(prompt + chosen + rejected)
        position_ids[i, : lp + lc] = torch.arange(lp + lc)
        position_ids[i, lp + lc : lp + lc + lr] = torch.arange(lp, lp + lr)
        causal = torch.ones(width, width).tril().bool()
        allowed[i, : lp + lc, : lp + lc] = causal[: lp + lc, : lp + lc]
        allowed[i, lp + lc : lp + lc + lr, :lp] = True
        allowed[i, lp + lc : lp + lc + lr, lp + lc : lp + lc + lr] = causal[:lr, :lr]
        for j, tok in enumerate(chosen):
            index.append(i * width + lp + j - 1)
            target.append(tok)
            seq.append(i)
        for j, tok in enumerate(rejected):
            index.append(i * width + (lp - 1 if j == 0 else lp + lc + j - 1))
            target.append(tok)
            seq.append(b + i)
    mask = torch.zeros(b, 1, width, width).masked_fill(~allowed[:, None], float("-inf"))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "score_index": torch.tensor(index),
        "score_target": torch.tensor(target),
        "score_seq": torch.tensor(seq),
        "num_seqs": 2 * b,
    }


def model_inputs(batch: dict) -> dict:
    return {
        k: batch[k]
        for k in (
            "input_ids",
            "attention_mask",
            "position_ids",
            "score_index",
            "score_target",
            "score_seq",
            "num_seqs",
        )
    }


def manual_sums(model, sequences) -> torch.Tensor:
    """Each sequence alone, full logits, fp32 log_softmax, gather the completion tokens, sum."""
    out = []
    with torch.no_grad():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            out.append(sum(logp[p - 1, ids[0, p]] for p in range(len(prompt), ids.shape[1])))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_llama(seed=0)
    return model.eval()


def test_chunked_matches_plain_values_and_gradients():
    """Chunk of 5 rows over 37 rows (uneven last chunk), V = 100, with a bias: values and d/d(hidden, weight,
    bias) of a nonlinear function of the log-probs equal the full-logits path within 1e-5 (fp32)."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = (0.5 * torch.randn(100, 16)).requires_grad_()
    bias = (0.1 * torch.randn(100)).requires_grad_()
    targets = torch.randint(0, 100, (37,))
    chunked = token_logps(hidden, weight, targets, chunk_size=5, bias=bias)
    plain = token_logps_from_logits(hidden @ weight.t() + bias, targets)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    seq = torch.arange(37) % 4
    grads_chunked = torch.autograd.grad(
        sequence_logps(chunked, seq, 4)[2].pow(2).sum(), (hidden, weight, bias)
    )
    grads_plain = torch.autograd.grad(sequence_logps(plain, seq, 4)[2].pow(2).sum(), (hidden, weight, bias))
    for a, b in zip(grads_chunked, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_function_passes_gradcheck():
    """float64, 7 rows in chunks of 3, V = 11, with bias."""
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w, b: _ChunkedTokenLogps.apply(h, w, b, t, 3, torch.float64), (h, w, b))


def test_bf16_inputs_give_fp32_logps():
    """bf16 hidden and weight: the output is fp32 and equals an fp32 log-softmax of the bf16 logits."""
    torch.manual_seed(0)
    h, w, t = torch.randn(9, 16).bfloat16(), torch.randn(50, 16).bfloat16(), torch.randint(0, 50, (9,))
    out = token_logps(h, w, t, chunk_size=4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, token_logps_from_logits(h @ w.t(), t), atol=1e-5, rtol=0)


def test_chunked_head_follows_bf16_autocast():
    """fp32 hidden and weight inside ``torch.autocast("cpu", bfloat16)``: the head's matmuls run in bf16
    as autocast would run ``hidden @ weight.T`` (values equal the plain path on bf16 logits within 1e-5,
    and differ from the fp32 path, so an fp32 head would fail), and the gradients equal the plain path's
    under the same autocast within bf16's rounding (2e-2 relative), returned in fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 64, requires_grad=True)
    weight = (0.5 * torch.randn(300, 64)).requires_grad_()
    targets = torch.randint(0, 300, (37,))
    seq = torch.arange(37) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = token_logps(hidden, weight, targets, chunk_size=8)
        plain = token_logps_from_logits(hidden @ weight.t(), targets)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    assert (chunked - token_logps_from_logits(hidden @ weight.t(), targets)).abs().max() > 1e-3
    grads = [torch.autograd.grad(sequence_logps(x, seq, 4)[2].sum(), (hidden, weight)) for x in (chunked, plain)]
    for a, b in zip(*grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=0)


def test_sequence_logps_segment_sums():
    """Tokens (-1, -2, -3, -4) in sequences (0, 1, 0, 2) of S = 4: sums (-4, -2, -4, 0), counts (2, 1, 1, 0),
    means (-2, -2, -4, 0) (an empty sequence has mean 0, not NaN)."""
    sums, counts, means = sequence_logps(
        torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([0, 1, 0, 2]), 4
    )
    torch.testing.assert_close(sums, torch.tensor([-4.0, -2.0, -4.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0, 1.0, 0.0]))
    torch.testing.assert_close(means, torch.tensor([-2.0, -2.0, -4.0, 0.0]))


@pytest.mark.parametrize("chunked", [True, False])
def test_sequence_logps_module_matches_each_sequence_alone(tiny, chunked):
    """Padded batch of 4 sequences of different lengths == each sequence run alone (1e-5)."""
    batch = padded_batch(SEQUENCES)
    sums, counts, means = SequenceLogps(tiny, chunk_size=3)(**model_inputs(batch), chunked=chunked)
    expected = manual_sums(tiny, SEQUENCES)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(counts, torch.tensor([3.0, 5.0, 1.0, 2.0]))
    torch.testing.assert_close(means, expected / counts, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_shared_4d_mask_matches_plain_sequences(tiny, attn):
    """[prompt | chosen | rejected] rows with a 4D additive mask and restarted positions give the same sums
    as the separate sequences (1e-5), in the chunked and the plain path, and with the mask given as bool
    or with finfo.min instead of -inf.
    Row 0 (8 tokens) is padded to 9: its fully masked pad row would put NaN into every token under eager
    attention unless SequenceLogps opens its diagonal."""
    tiny.set_attn_implementation(attn)
    try:
        pairs = [
            (SEQUENCES[0][0], SEQUENCES[0][1], SEQUENCES[2][1]),
            (SEQUENCES[1][0], SEQUENCES[1][1], SEQUENCES[3][1]),
        ]
        batch = prefix_shared_batch(pairs)
        expected = manual_sums(tiny, [SEQUENCES[0], SEQUENCES[1], SEQUENCES[2], SEQUENCES[3]])
        bool_batch = dict(batch, attention_mask=batch["attention_mask"] == 0)
        finfo_min = torch.finfo(torch.float32).min
        min_batch = dict(batch, attention_mask=batch["attention_mask"].clamp(min=finfo_min))
        for chunked, b in ((True, batch), (False, batch), (True, bool_batch), (True, min_batch)):
            sums, _, _ = SequenceLogps(tiny)(**model_inputs(b), chunked=chunked)
            torch.testing.assert_close(sums, expected, atol=1e-5, rtol=0)
    finally:
        tiny.set_attn_implementation("sdpa")


def test_model_gradients_chunked_equal_plain(tiny):
    """d(sum of means)/d(every parameter) through the whole model: chunked == plain within 1e-5."""
    module = SequenceLogps(tiny, chunk_size=4)
    batch = model_inputs(padded_batch(SEQUENCES))
    params = [p for p in tiny.parameters() if p.requires_grad]
    grads = []
    for chunked in (True, False):
        means = module(**batch, chunked=chunked)[2]
        grads.append(torch.autograd.grad(means.sum(), params))
    for name_grad in zip(grads[0], grads[1]):
        torch.testing.assert_close(name_grad[0], name_grad[1], atol=1e-5, rtol=1e-5)


def test_lora_wrapped_model_and_disabled_adapter():
    """A peft LoRA model (non-zero adapters): chunked log-probs equal the manual ones of the adapted
    model; inside ``disable_adapter()`` they equal the base model's, and differ outside it."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama(seed=1)
    model.eval()
    base = manual_sums(model, SEQUENCES)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    batch = model_inputs(padded_batch(SEQUENCES))
    module = SequenceLogps(peft_model)
    adapted, _, _ = module(**batch)
    torch.testing.assert_close(adapted, manual_sums(peft_model, SEQUENCES), atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-3
    with peft_model.disable_adapter():
        disabled, _, _ = module(**batch)
    torch.testing.assert_close(disabled, base, atol=1e-5, rtol=0)
    lora_param = next(p for n, p in peft_model.named_parameters() if "lora_A" in n)
    assert torch.autograd.grad(adapted.sum(), lora_param)[0].abs().sum() > 0


@pytest.mark.parametrize("tied", [True, False])
def test_smollm2_geometry_chunked_equals_plain(tied):
    """A 1-layer random Llama with SmolLM2-135M's geometry (hidden 576, 9 heads, 3 KV heads, head_dim 64,
    rope theta 1e5, vocab 49152), tied as SmolLM2 and untied: prefix-shared chunked sums equal the
    padded plain sums, and the gradients wrt every parameter (embedding and head apart when untied) agree
    within 1e-5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(cfg).float()
    module = SequenceLogps(model, chunk_size=7)
    params = [p for p in model.parameters()]
    pairs = [
        (SEQUENCES[0][0], SEQUENCES[0][1], SEQUENCES[2][1]),
        (SEQUENCES[1][0], SEQUENCES[1][1], SEQUENCES[3][1]),
    ]
    fast = module(**model_inputs(prefix_shared_batch(pairs)), chunked=True)
    plain = module(
        **model_inputs(padded_batch([SEQUENCES[0], SEQUENCES[1], SEQUENCES[2], SEQUENCES[3]])), chunked=False
    )
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=0)
    grads_fast = torch.autograd.grad(fast[2].sum(), params)
    grads_plain = torch.autograd.grad(plain[2].sum(), params)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_shared_mask_is_made_in_autocasts_dtype(tiny):
    """An fp32 model's prefix-shared mask is built in bf16 inside a bf16 autocast region (so no attention
    layer casts it again) and in fp32 outside; both allow the same keys."""
    from preftune.attention import decoder_mask
    from preftune.data.collate import collate_prefix_shared
    from preftune.data.rows import TokenizedPair

    batch = collate_prefix_shared([TokenizedPair([1, 5, 9], [40, 41], [50], key="0"),
                                   TokenizedPair([1, 7], [60], [70, 71, 72], key="1")], 0)
    args = (tiny, None, batch["position_ids"], batch["blocks"], batch["segments"])
    plain = decoder_mask(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = decoder_mask(*args)
    assert (plain.dtype, mixed.dtype) == (torch.float32, torch.bfloat16)
    assert torch.equal(plain == 0, mixed == 0)

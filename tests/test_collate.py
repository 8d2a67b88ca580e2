"""Batch layouts against the oracle: the model run on each plain sequence on its own.

Every layout's per-sequence summed log-probs (segment sums of the scored tokens by ``score_seq``)
must equal the oracle's within 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

from preftune.data.collate import collate_padded, collate_sft
from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.embedded import tiny_llama

PAD = 0
ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def oracle_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Summed log-prob of ``completion`` given ``prompt``: one plain forward, shift by one, gather."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    p = max(len(prompt), 1)
    targets = ids[0, p:]
    return logp[p - 1 : ids.shape[1] - 1].gather(-1, targets[:, None]).sum()


def batch_logps(model, b: dict) -> torch.Tensor:
    """Per-sequence summed log-probs from a batch, following the contract: [S]."""
    logits = model(
        input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]
    ).logits
    flat = logits.reshape(-1, logits.shape[-1])[b["score_index"]].float().log_softmax(-1)
    token_logps = flat.gather(-1, b["score_target"][:, None]).squeeze(-1)
    return torch.zeros(b["num_seqs"], dtype=token_logps.dtype).index_add(0, b["score_seq"], token_logps)


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
    """Different prompt lengths, a truncated completion without EOS, unequal chosen/rejected lengths."""
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 4000, (n,), generator=g).tolist()

    return [
        pair(ids(7), ids(4) + [eos], ids(9) + [eos], "a"),
        pair(ids(3), ids(6) + [eos], ids(2) + [eos], "b"),
        pair(ids(12), ids(5), ids(8) + [eos], "c"),  # chosen truncated: no EOS
        pair(ids(1), ids(3) + [eos], ids(3) + [eos], "d"),
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

"""Drift from the reference: the per-token KL divergence KL(pi || pi_ref) of a model from its reference
on held-out completions (teacher-forced on the dataset's chosen responses), over the full vocabulary
at every completion position, averaged over tokens. The DPO paper's reward-KL frontier plots reward
against it."""

from __future__ import annotations

import torch

from preftune.data.rows import PreferenceRow, SFTRow
from preftune.data.tokenize import Limits, RowKind, tokenize
from preftune.eval.generate import forward_names, left_pad


def _sequences(rows: list[PreferenceRow], tokenizer, max_length: int, max_prompt_length: int):
    """(input ids, index of the first completion token) per row, tokenized as training does."""
    done = tokenize([SFTRow(r.prompt, r.chosen) for r in rows], tokenizer, Limits(max_length, max_prompt_length),
                    RowKind.SFT, progress=False)
    return [(t.prompt_ids + t.completion_ids, len(t.prompt_ids)) for t in done.items]


def _completion_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, lengths: list[int]):
    """Log-softmax over the vocabulary at each position that predicts a completion token, for
    left-padded rows whose completions (at their ends) have ``lengths`` tokens: a list of ``[n_i, V]``
    tensors, one per row. Only the last ``max(lengths) + 1`` positions get logits, where the model
    can skip the others."""
    keep = max(lengths) + 1
    kw = {"logits_to_keep": keep} if forward_names(model)[1] else {}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kw).logits
    logits = logits[:, -keep:].float()
    return [torch.log_softmax(logits[i, keep - 1 - n : keep - 1], -1) for i, n in enumerate(lengths)]


@torch.inference_mode()
def token_kl(model, reference, tokenizer, rows: list[PreferenceRow], max_length: int = 512,
             max_prompt_length: int = 256, batch_size: int = 4) -> dict:
    """Mean per-token KL(model || reference) over the chosen completions of ``rows``.

    ``reference`` is a model, or ``"adapter"`` for the model itself with its LoRA adapters off.
    Returns ``kl`` (the token mean), ``kl_row_mean`` (the mean of per-row token means), ``tokens``
    and ``rows`` (those that tokenized)."""
    seqs = sorted(_sequences(rows, tokenizer, max_length, max_prompt_length), key=lambda s: len(s[0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens, row_means = 0.0, 0, []
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        ids, mask = left_pad([s for s, _ in chunk], pad, device)
        lengths = [len(s) - start for s, start in chunk]
        logp = _completion_logprobs(model, ids, mask, lengths)
        if reference == "adapter":
            with model.disable_adapter():
                logq = _completion_logprobs(model, ids, mask, lengths)
        else:
            logq = _completion_logprobs(reference, ids, mask, lengths)
        for p, q in zip(logp, logq):
            per_token = (p.exp() * (p - q)).sum(-1)
            total += float(per_token.sum())
            tokens += per_token.numel()
            row_means.append(float(per_token.mean()))
    return {"kl": total / tokens if tokens else None,
            "kl_row_mean": sum(row_means) / len(row_means) if row_means else None,
            "tokens": tokens, "rows": len(row_means)}

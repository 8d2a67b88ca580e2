"""Drift from the reference: the per-token KL divergence KL(pi || pi_ref) of a model from its reference
on held-out completions (teacher-forced on the dataset's chosen responses), over the full vocabulary
at every completion position, averaged over tokens. The DPO paper's reward-KL frontier plots reward
against it. The suite takes it in the same pass as reward accuracy (:func:`rewards_and_kl`)."""

from __future__ import annotations

import torch
from torch import Tensor

from preftune.config import Config
from preftune.data.rows import PreferenceRow, SFTRow
from preftune.data.tokenize import Limits, RowKind, tokenize
from preftune.errors import PreftuneError
from preftune.eval.generate import forward_names, left_pad
from preftune.eval.rewards import evaluate_batches, reward_figures, reward_inputs
from preftune.logprobs import default_chunk_size
from preftune.methods import METHODS


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


def _kl_from_hidden(hp: Tensor, head_p, hq: Tensor, head_q) -> Tensor:
    """Per-position ``KL(p || q)`` over the vocabulary ``[N]`` fp32 from each model's final hidden
    states ``[N, H]`` and its LM head, in row chunks of about ``CHUNK_ELEMENTS`` logits."""
    step = default_chunk_size(head_p.weight.shape[0])
    out = [hp.new_zeros(0, dtype=torch.float32)]
    for s in range(0, hp.shape[0], step):
        logp = torch.log_softmax(head_p(hp[s : s + step]).float(), -1)
        logq = torch.log_softmax(head_q(hq[s : s + step]).float(), -1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out)


@torch.inference_mode()
def rewards_and_kl(model, tokenizer, reference_model, rows: list[PreferenceRow], cfg: Config) -> tuple[dict, dict]:
    """Reward accuracy (as ``evaluate_rewards``) and the per-token KL(model || reference) on the chosen
    completions (as :func:`token_kl`) from ONE pass of the model and of its reference over the rows'
    pair batches: each forward hands over its final hidden states at the scored positions, and the
    KL is taken over the full vocabulary at the chosen ones. ``reference_model`` is a model or
    ``"adapter"``; the chunked log-prob path (``dpo.chunked_logps``) is needed, and a loss with a
    reference. Rows whose pair does not tokenize are left out of both (token_kl keeps a row whose
    chosen alone fits)."""
    policy, reference, batches = reward_inputs(model, tokenizer, reference_model, rows, cfg)
    if reference is None or not cfg.dpo.chunked_logps:
        raise PreftuneError("rewards_and_kl needs a loss with a reference and dpo.chunked_logps=true")
    seen: list[Tensor] = []
    heads = (policy.causal_lm.get_output_embeddings(), reference.module.causal_lm.get_output_embeddings())
    sums = {"total": 0.0, "tokens": 0, "row_means": []}

    def after(batch: dict) -> None:
        if len(seen) != 2:
            raise PreftuneError(f"rewards_and_kl: expected one reference and one policy pass per batch, saw {len(seen)}")
        ref_hidden, hidden = seen  # evaluate_batches runs the reference first
        seen.clear()
        chosen = batch["score_seq"] < batch["num_pairs"]
        per_token = _kl_from_hidden(hidden[chosen], heads[0], ref_hidden[chosen], heads[1])
        seq = batch["score_seq"][chosen]
        row_sums = per_token.new_zeros(batch["num_pairs"]).index_add(0, seq, per_token)
        counts = torch.bincount(seq, minlength=batch["num_pairs"])
        sums["total"] += float(per_token.sum())
        sums["tokens"] += per_token.numel()
        sums["row_means"] += [float(s / c) for s, c in zip(row_sums, counts) if c > 0]

    policy.on_scored = reference.module.on_scored = seen.append
    try:
        out = evaluate_batches(policy, batches, METHODS["dpo"], cfg.dpo, reference, after_batch=after)
    finally:
        policy.on_scored = reference.module.on_scored = None
    means = sums["row_means"]
    kl = {"kl": sums["total"] / sums["tokens"] if sums["tokens"] else None,
          "kl_row_mean": sum(means) / len(means) if means else None, "tokens": sums["tokens"], "rows": len(means)}
    return reward_figures(out), kl

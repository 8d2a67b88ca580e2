"""The one checked path from a causal LM and a batch (the contract in data/rows.py) to per-sequence
log-probs: a chunked LM-head log-softmax whose forward and backward never hold [N, V] fp32 logits,
the plain full-logits path it must equal, and the segment sums. Losses live in losses.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from preftune.attention import decoder_mask
from preftune.errors import PreftuneError

CHUNK_ELEMENTS = 1 << 24
"""Default budget of fp32 logits held at once (64 MiB): ``chunk_size = CHUNK_ELEMENTS // vocab``."""


def _fp32_at_least(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits hold about ``CHUNK_ELEMENTS`` floats."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[n, targets[n]]`` over row chunks.

    Forward keeps only the per-row log-sum-exp ``[N]``; backward recomputes each chunk's logits and
    uses ``d logp_n / d z_nv = 1[v = t_n] - softmax(z_n)_v``. The three matmuls of a chunk (logits,
    ``grad_hidden``, ``grad_weight``) run in ``mm_dtype`` (bf16 under bf16 autocast or for bf16
    weights: the CPU's AMX and the GPU's tensor cores); log-softmax and the gradient of the logits in
    fp32 (float64 for float64 inputs); ``grad_weight``/``grad_bias`` are summed over chunks in that
    precision and returned in the weight's dtype, ``grad_hidden`` in the hidden states' dtype."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int,
        mm_dtype: torch.dtype,
    ) -> Tensor:
        acc = _fp32_at_least(hidden.dtype)
        h_mm, w, b = hidden.to(mm_dtype), weight.to(mm_dtype), bias.to(mm_dtype) if bias is not None else None
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_size):
                e = s + chunk_size
                logits = _logits(h_mm[s:e], w, b).to(acc)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                out[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
        ctx.save_for_backward(h_mm, weight, bias, targets, lse)
        ctx.chunk_size, ctx.hidden_dtype = chunk_size, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h_mm, weight, bias, targets, lse = ctx.saved_tensors
        acc, mm = lse.dtype, h_mm.dtype
        w = weight.to(mm)
        b = bias.to(mm) if bias is not None else None
        need_h, need_w, need_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        grad_hidden = torch.empty(h_mm.shape, dtype=ctx.hidden_dtype, device=h_mm.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        with torch.autocast(h_mm.device.type, enabled=False):
            for s in range(0, h_mm.shape[0], ctx.chunk_size):
                e = s + ctx.chunk_size
                h = h_mm[s:e]
                g = grad_out[s:e, None].to(acc)
                dlogits = (
                    _logits(h, w, b).to(acc).sub_(lse[s:e, None]).exp_().mul_(-g)
                )  # -g * softmax, [c, V]
                dlogits.scatter_add_(1, targets[s:e, None], g)  # g * (onehot - softmax)
                if need_b:
                    grad_bias += dlogits.sum(0)
                dlogits = dlogits.to(mm)
                if need_h:
                    grad_hidden[s:e] = dlogits @ w
                if need_w:
                    grad_weight += dlogits.t() @ h
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def matmul_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the LM head's matmuls run in: autocast's (bf16) for fp32 hidden states inside an
    autocast region, else the hidden states' own. The chunked head turns autocast off inside, so it
    decides here what autocast would have done for ``hidden @ weight.T``."""
    device = hidden.device.type
    if hidden.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())


def token_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None, bias: Tensor | None = None
) -> Tensor:
    """Log-prob of each target token under the LM head, computed in row chunks.

    hidden ``[N, H]`` (the final hidden states at the scored positions), weight ``[V, H]`` (tied or
    untied LM head), bias ``[V]`` or None, targets ``[N]`` long -> ``[N]`` fp32 (float64 for float64
    input). Peak extra memory is one chunk of ``chunk_size x V`` fp32 logits in forward and backward;
    the default chunk holds ``CHUNK_ELEMENTS`` logits. Differentiable in ``hidden``, ``weight``, ``bias``.
    The matmuls follow autocast (:func:`matmul_dtype`)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise PreftuneError(
            f"token_logps: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not match"
        )
    if targets.shape != hidden.shape[:1]:
        raise PreftuneError(f"token_logps: {targets.shape[0]} targets for {hidden.shape[0]} hidden rows")
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, matmul_dtype(hidden))


def token_logps_from_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """The plain path: logits ``[N, V]`` (any float dtype), targets ``[N]`` -> ``[N]`` log-probs,
    with the log-softmax in fp32 (float64 stays float64)."""
    logits = logits.to(_fp32_at_least(logits.dtype))
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(token_logps: Tensor, score_seq: Tensor, num_seqs: int) -> tuple[Tensor, Tensor, Tensor]:
    """Segment sums of scored tokens: token_logps ``[N]``, score_seq ``[N]`` in ``[0, S)`` ->
    ``(sums [S], counts [S], means [S])``, counts as floats, a sequence with no token has mean 0."""
    sums = token_logps.new_zeros(num_seqs).index_add(0, score_seq, token_logps)
    counts = token_logps.new_zeros(num_seqs).index_add(0, score_seq, torch.ones_like(token_logps))
    return sums, counts, sums / counts.clamp(min=1)


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """A peft PeftModel's underlying transformers model (LoRA layers stay injected and active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
"""Config fields of models (Gemma 2, Cohere, Granite, Falcon-H1, ...) whose logits are not just ``h @ W.T + b``."""


def _check_plain_head(model: nn.Module, head: nn.Module) -> None:
    """The chunked path computes ``hidden @ W.T + b`` only: refuse heads or configs that do more."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise PreftuneError(
                f"chunked log-probs do not apply the model's {name}={value}; set dpo.chunked_logps=false"
            )
    if not isinstance(head, nn.Linear):
        raise PreftuneError(
            f"chunked log-probs need a plain nn.Linear LM head, found {type(head).__name__} (LoRA on lm_head?); "
            "set dpo.chunked_logps=false or leave lm_head out of lora.target_modules"
        )


class SequenceLogps(nn.Module):
    """Per-sequence completion log-probs of a causal LM (plain transformers model or peft PeftModel).

    Everything happens inside ``forward`` so that accelerate / DDP / FSDP wrapping this module sees
    one forward: gradient sync and parameter gathering apply to the decoder and the LM head alike.
    ``model`` is kept as the registered child, so ``state_dict`` keys gain a ``model.`` prefix."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.on_scored: Callable[[Tensor], None] | None = None
        """Called (chunked path only) with the detached final hidden states at the scored positions
        ``[N, H]``, in ``score_index`` order: evaluation reuses them (eval/kl.py's one pass)."""

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers ``*ForCausalLM`` inside (peft unwrapped)."""
        return _unwrap_peft(self.model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        score_index: Tensor,
        score_target: Tensor,
        score_seq: Tensor,
        num_seqs: int,
        chunked: bool = True,
        blocks: Tensor | None = None,
        segments: Tensor | None = None,
        sum_sq_probs: bool = False,
    ) -> tuple[Tensor, ...]:
        """Batch-contract tensors (data/rows.py) -> ``(sums [S], counts [S], means [S])`` fp32.

        ``attention_mask`` is ``[R, T]`` 0/1, ``[R, 1, T, T]`` additive float (0 / -inf; a bool
        "may attend" mask is accepted too), or None. Shared-layout batches give ``blocks`` and
        ``segments`` instead, and the mask is built from them and ``position_ids``;
        :func:`preftune.attention.decoder_mask` says what the decoder gets.
        ``chunked=False`` runs the full model and takes log-probs from its ``[R, T, V]`` logits: the
        reference path for tests. ``sum_sq_probs=True`` appends a fourth ``[S]`` tensor, the segment sums of
        ``log sum_v p_v^2`` at each scored position (no gradient): WPO's weights (methods.py)."""
        attention_mask = decoder_mask(self.causal_lm, attention_mask, position_ids, blocks, segments)
        if not chunked:
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
            scored = logits.reshape(-1, logits.shape[-1]).index_select(0, score_index)
            out = sequence_logps(token_logps_from_logits(scored, score_target), score_seq, num_seqs)
            if sum_sq_probs:
                with torch.no_grad():
                    sq = log_sum_sq_probs(scored.detach(), None, None)
                out = (*out, sq.new_zeros(num_seqs).index_add(0, score_seq, sq))
            return out
        lm = self.causal_lm
        head = lm.get_output_embeddings()
        _check_plain_head(lm, head)
        hidden = lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)
        if self.on_scored is not None:
            self.on_scored(scored.detach())
        logps = token_logps(scored, head.weight, score_target, self.chunk_size, head.bias)
        out = sequence_logps(logps, score_seq, num_seqs)
        if sum_sq_probs:
            with torch.no_grad():
                sq = log_sum_sq_probs(scored.detach(), head.weight, head.bias, self.chunk_size)
            out = (*out, sq.new_zeros(num_seqs).index_add(0, score_seq, sq))
        return out


def log_sum_sq_probs(hidden: Tensor, weight: Tensor | None, bias: Tensor | None, chunk_size: int | None = None) -> Tensor:
    """``log sum_v softmax(z)_v^2 = logsumexp(2 z) - 2 logsumexp(z)`` per row ``[N]`` fp32, from hidden states
    ``[N, H]`` and the LM head in row chunks, or from logits ``[N, V]`` when ``weight`` is None. No gradient."""
    with torch.no_grad():
        vocab = hidden.shape[1] if weight is None else weight.shape[0]
        step = chunk_size or default_chunk_size(vocab)
        out = []
        for s in range(0, hidden.shape[0], step):
            z = hidden[s : s + step] if weight is None else _logits(hidden[s : s + step], weight.to(hidden.dtype),
                                                                   None if bias is None else bias.to(hidden.dtype))
            z = z.to(_fp32_at_least(z.dtype))
            out.append(torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


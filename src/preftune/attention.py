"""The model side of the batch layouts: which layout a model can run exactly (:func:`choose_layout`,
from its architecture and attention backend), and the mask its decoder gets for a batch (a dense
additive mask, a FlexAttention ``BlockMask``, or one of either per layer type). The batches themselves
are built in data/collate.py, which knows nothing of models.

A shared-layout batch (prefix-shared or packed) carries ``blocks``, ``segments`` and ``position_ids``
(data/rows.py); from them a query may see a key when both are in the same block, the key is at or
before the query, a rejected query is not looking at a chosen key, and, on sliding-window layers,
the key's position is less than ``sliding_window`` before the query's. Positions, not row indices,
measure that distance: rejected restarts at the prompt's length, so it is windowed exactly as the plain
``[prompt + rejected]`` sequence would be.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from preftune.data.collate import CHOSEN, LAYOUTS, REJECTED
from preftune.errors import PreftuneError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

logger = logging.getLogger("preftune")

MASK_MIN = torch.finfo(torch.float32).min  # "not allowed" in additive masks, as transformers uses

SHARED_MASK_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})
"""Attention backends that can express the shared layouts: sdpa and eager through the dense 4D mask,
flex_attention through a BlockMask. Varlen kernels (flash_attention_2/3) take only disjoint segments
(``cu_seqlens``): they cannot let rejected see the prompt but not chosen, so they get ``padded``."""

ONE_MASK, PER_LAYER_TYPE = "one mask", "per layer type"
TESTED_ARCHITECTURES: dict[str, str] = {
    "llama": ONE_MASK, "mistral": ONE_MASK, "phi": ONE_MASK, "phi3": ONE_MASK, "gpt_neox": ONE_MASK,
    "gemma": ONE_MASK, "olmo": ONE_MASK, "olmo2": ONE_MASK, "granite": ONE_MASK, "starcoder2": ONE_MASK,
    "falcon": ONE_MASK, "cohere": ONE_MASK,
    "qwen2": PER_LAYER_TYPE, "qwen3": PER_LAYER_TYPE, "gemma2": PER_LAYER_TYPE, "gemma3_text": PER_LAYER_TYPE,
}
"""Model types whose prefix-shared and packed log-probs and gradients equal the padded path's within
1e-5 in fp32 (``tests/test_architectures.py``), and how their decoder takes a custom mask: one 4D mask
for every layer (a sliding-window model windows them all), or a dict ``{layer type: mask}`` for models
that mix full and sliding-window layers. transformers 5 hands both to the attention layers unchanged,
with the position ids as given."""

LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


# ----------------------------------------------------------------------------- what a model can take
def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _config(model: Any) -> Any:
    return getattr(_base_model(model), "config", None)


def _attention(model: Any) -> str:
    return getattr(_config(model), "_attn_implementation", None) or "eager"


def _sliding_window(config: Any) -> int | None:
    """The window of the model's sliding-window layers, None when it has none."""
    if not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)


def shared_layout_problem(model: Any) -> str | None:
    """Why ``model`` cannot run the prefix-shared and packed layouts exactly, or None when it can: an
    attention backend in :data:`SHARED_MASK_ATTENTION`, a model type in :data:`TESTED_ARCHITECTURES`,
    and nothing in its config that a custom mask with position ids cannot express (ALiBi built from a
    2D mask, bidirectional attention, layer types other than full and sliding-window)."""
    config = _config(model)
    if config is None:
        return "it has no transformers config"
    attention, model_type = _attention(model), config.model_type
    if attention not in SHARED_MASK_ATTENTION:
        return (f"attention '{attention}' cannot take the shared mask: varlen kernels (flash_attention_2/3) take "
                f"disjoint sequences only; the shared layouts need {', '.join(sorted(SHARED_MASK_ATTENTION))}")
    if model_type not in TESTED_ARCHITECTURES:
        return (f"model type '{model_type}' is not among those tested exact with a custom mask "
                f"({', '.join(sorted(TESTED_ARCHITECTURES))})")
    if getattr(config, "alibi", False):
        return "its ALiBi bias is built from a 2D padding mask, so it cannot follow restarted positions"
    if getattr(config, "use_bidirectional_attention", False):
        return "it attends bidirectionally, so chosen and rejected would see later tokens"
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - LAYER_TYPES:
        return f"its layer types {sorted(layer_types - LAYER_TYPES)} take masks other than full or sliding-window"
    if len(layer_types) > 1 and TESTED_ARCHITECTURES[model_type] == ONE_MASK:
        return "it mixes full and sliding-window layers but takes one mask for all of them"
    return None


def supports_shared_mask(model: Any) -> bool:
    """True when ``model`` runs the prefix-shared and packed layouts exactly (:func:`shared_layout_problem`)."""
    return shared_layout_problem(model) is None


def choose_layout(requested: str, model: Any) -> str:
    """Resolve ``requested`` ("auto" or a name in :data:`~preftune.data.collate.LAYOUTS`) for ``model``
    and log the choice.

    ``auto`` picks ``prefix_shared`` where :func:`supports_shared_mask`, else ``padded``, and logs why.
    An explicit shared layout on a model that cannot take it is an error rather than silently wrong
    log-probs."""
    where = f"{getattr(_config(model), 'model_type', '?')}, attention '{_attention(model)}'"
    problem = shared_layout_problem(model)
    if requested == "auto":
        layout = "prefix_shared" if problem is None else "padded"
        if problem:
            logger.info("batch layout auto -> padded for this model (%s): %s", where, problem)
    elif requested not in LAYOUTS:
        raise PreftuneError(f"layout '{requested}' is unknown: use one of auto, {', '.join(LAYOUTS)}")
    elif requested != "padded" and problem:
        raise PreftuneError(
            f"layout '{requested}' needs a mask where rejected sees the prompt but not chosen, which this model "
            f"({where}) cannot take exactly: {problem}. Set layout to 'padded' or 'auto'"
            + (", or load the model with attn_implementation 'sdpa' or 'flex_attention'"
               if _attention(model) not in SHARED_MASK_ATTENTION else "")
        )
    else:
        layout = requested
    logger.info("batch layout: %s (requested %s)", layout, requested)
    return layout


# ----------------------------------------------------------------------------- the masks
def _may_attend(q: Tensor, kv: Tensor, labels_q: tuple[Tensor, ...], labels_kv: tuple[Tensor, ...],
                window: int | None) -> Tensor:
    """The shared layouts' rule on broadcastable tensors. ``q``/``kv`` are row indices; ``labels`` are
    ``(block, segment, position)``. A query sees keys at or before it in the same block, except that a
    rejected query never sees a chosen key; with ``window``, only keys whose position is less than
    ``window`` before the query's (transformers' ``kv_idx > q_idx - sliding_window``)."""
    (block_q, seg_q, pos_q), (block_kv, seg_kv, pos_kv) = labels_q, labels_kv
    allowed = (q >= kv) & (block_q == block_kv) & ~((seg_q == REJECTED) & (seg_kv == CHOSEN))
    if window is not None:
        allowed = allowed & (pos_q - pos_kv < window)
    return allowed


def _labels(blocks: Tensor, segments: Tensor, position_ids: Tensor | None) -> Tensor:
    """``[3, R, T]``: block ids, segment codes and positions (row indices when ``position_ids`` is None)."""
    if position_ids is None:
        position_ids = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks)
    return torch.stack((blocks, segments, position_ids.to(blocks.device)))


def shared_mask(blocks: Tensor, segments: Tensor, position_ids: Tensor | None = None,
                window: int | None = None) -> Tensor:
    """Additive float32 mask ``[R, 1, T, T]`` (0 allowed, ``finfo.min`` not) from per-position block ids,
    segment codes and positions ``[R, T]``, on their device, following :func:`_may_attend`.

    Pad positions carry a block id of their own, so a pad query sees only itself (no fully masked
    row, hence no NaN from SDPA) and no real query sees a pad."""
    labels = _labels(blocks, segments, position_ids)
    pos = torch.arange(blocks.shape[1], device=blocks.device)
    allowed = _may_attend(pos[:, None], pos[None, :], tuple(labels[:, :, :, None]), tuple(labels[:, :, None, :]),
                          window)
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=blocks.device).masked_fill_(~allowed, MASK_MIN)
    return mask[:, None]


def shared_block_mask(blocks: Tensor, segments: Tensor, position_ids: Tensor | None = None,
                      window: int | None = None) -> BlockMask:
    """The same pattern as :func:`shared_mask` as a FlexAttention ``BlockMask`` of shape ``[R, 1, T, T]``
    on the device of ``blocks``, for models loaded with ``attn_implementation="flex_attention"`` (torch
    2.5 or later).

    Built without compiling ``create_block_mask``: it evaluates the rule on every (query, key) pair (a
    few ``[R, 1, T, T]`` boolean tensors for a moment), then keeps only the 128 x 128 tiles with work."""
    # imported here: flex attention needs torch 2.5+, newer than the torch>=2.4 floor
    from torch.nn.attention.flex_attention import create_block_mask

    # One captured tensor, not several: with two, torch 2.13's CPU kernel fails to build (CppCompileError)
    # once a new batch shape makes it recompile with dynamic shapes.
    labels = _labels(blocks, segments, position_ids)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        at_q = (labels[0, b, q], labels[1, b, q], labels[2, b, q])
        at_kv = (labels[0, b, kv], labels[1, b, kv], labels[2, b, kv])
        return _may_attend(q, kv, at_q, at_kv, window)

    rows, width = blocks.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=blocks.device)


def _layer_windows(config: Any) -> dict[str, int | None] | None:
    """``{layer type: window}`` for decoders that take a mask per layer type; None for those that take
    one mask (then :func:`_sliding_window` applies to every layer)."""
    if TESTED_ARCHITECTURES.get(config.model_type) != PER_LAYER_TYPE:
        return None
    window = _sliding_window(config)
    return {t: window if t == "sliding_attention" else None for t in set(config.layer_types or ["full_attention"])}


def mask_dtype(lm: Any) -> torch.dtype:
    """The dtype attention computes in: the model's, or autocast's (bf16) for an fp32 model inside an
    autocast region. An additive mask made in it once is not cast again in every layer (30 casts of a
    ``[B, 1, T, T]`` mask per forward on SmolLM2, and as many in backward)."""
    weight = lm.get_input_embeddings().weight
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def decoder_mask(lm: Any, attention_mask: Tensor | None, position_ids: Tensor | None,
                 blocks: Tensor | None, segments: Tensor | None) -> Tensor | BlockMask | dict | None:
    """The mask handed to the decoder of ``lm`` (a transformers ``*ForCausalLM``).

    For a shared-layout batch (``blocks`` given) it is built here from ``blocks``, ``segments`` and
    ``position_ids`` on their device, whatever ``attention_mask`` holds: a ``BlockMask`` under
    flex_attention, else the dense additive mask in :func:`mask_dtype`; windowed on sliding-window
    layers; a dict ``{layer type: mask}`` for decoders that take one (:data:`TESTED_ARCHITECTURES`).
    Any other mask goes through :func:`_prepare_mask`."""
    if blocks is None:
        return _prepare_mask(attention_mask, lm)
    config = lm.config
    flex = config._attn_implementation == "flex_attention"

    def build(window: int | None) -> Tensor | BlockMask:
        if flex:
            return shared_block_mask(blocks, segments, position_ids, window)
        return shared_mask(blocks, segments, position_ids, window).to(mask_dtype(lm))

    windows = _layer_windows(config)
    if windows is None:
        return build(_sliding_window(config))
    return {layer_type: build(window) for layer_type, window in windows.items()}


def _prepare_mask(attention_mask: Tensor | None, lm: Any) -> Tensor | None:
    """A 4D mask is made additive in :func:`mask_dtype`, and a fully masked query row (padding) gets its
    diagonal opened. Without that, eager attention turns such a row into NaN, and the NaN reaches real
    tokens in the next layer through ``0 * NaN`` in ``probs @ V`` (the row itself is never scored)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return attention_mask
    dtype = mask_dtype(lm)
    if attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(
            attention_mask.shape, dtype=dtype, device=attention_mask.device
        ).masked_fill(~attention_mask, float("-inf"))
    mask = attention_mask.to(dtype)
    dead = torch.isinf(mask).all(dim=-1, keepdim=True)  # [R, 1, T, 1]
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask.masked_fill(dead & eye, 0.0)

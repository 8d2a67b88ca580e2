"""Batch layouts for tokenized pairs and SFT rows: padded, prefix-shared and packed (padding-free),
all following the batch contract in :mod:`preftune.data.rows`, and the attention masks the shared
layouts imply (dense additive, or a FlexAttention ``BlockMask``). No model code and no tokenizer here.

Scoring convention (all layouts): the token at row position ``t`` is predicted by the hidden state
at ``t - 1``; ``score_index`` points at that predicting position in the flattened ``[R * T]`` rows.
A completion is scored from the first position that has a predecessor, so with an empty prompt
the first completion token is not scored (there is nothing to predict it from).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.errors import PreftuneError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

logger = logging.getLogger("preftune")

Batch = dict[str, Any]
MASK_MIN = torch.finfo(torch.float32).min  # "not allowed" in additive masks, as transformers uses


# ----------------------------------------------------------------------------- shared helpers
def _pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` to the longest: ``(input_ids [R, T] long, attention_mask [R, T] long)``."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask


def _scored_span(
    row: int, width: int, ids: Sequence[int], start: int, end: int, seq: int, out: list[list[int]]
) -> None:
    """Score ``ids[t]`` for ``t`` in ``[max(start, 1), end)``, each predicted from ``t - 1`` of ``row``."""
    base = row * width
    for t in range(max(start, 1), end):
        out[0].append(base + t - 1)
        out[1].append(ids[t])
        out[2].append(seq)


def _score_tensors(out: list[list[int]]) -> dict[str, torch.Tensor]:
    index, target, seq = (torch.tensor(x, dtype=torch.long) for x in out)
    return {"score_index": index, "score_target": target, "score_seq": seq}


def _check_nonempty(items: Sequence[Any], what: str) -> None:
    if not items:
        raise PreftuneError(f"{what}: got an empty list of rows; a batch needs at least one row")


# ----------------------------------------------------------------------------- padded
def collate_padded(items: list[TokenizedPair], pad_id: int) -> Batch:
    """The plain layout: ``2B`` right-padded rows, ``[prompt + chosen_i]`` then ``[prompt + rejected_i]``.

    ``attention_mask`` is ``[2B, T]`` long, ``position_ids`` is None (the model's own ``arange``,
    correct under right padding). Chosen ``i`` is sequence ``i``, rejected ``i`` is ``B + i``."""
    _check_nonempty(items, "collate_padded")
    seqs = [it.prompt_ids + it.chosen_ids for it in items] + [it.prompt_ids + it.rejected_ids for it in items]
    prompt_lens = [len(it.prompt_ids) for it in items] * 2
    input_ids, attention_mask = _pad_rows(seqs, pad_id)
    width = input_ids.shape[1]
    out: list[list[int]] = [[], [], []]
    for s, (ids, p) in enumerate(zip(seqs, prompt_lens)):
        _scored_span(s, width, ids, p, len(ids), s, out)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": None,
        "blocks": None,
        "segments": None,
        **_score_tensors(out),
        "num_seqs": 2 * len(items),
        "num_pairs": len(items),
        "tokens": sum(len(s) for s in seqs),
        "keys": [it.key for it in items],
    }


def collate_sft(items: list[TokenizedSFT], pad_id: int, completion_only: bool = True) -> Batch:
    """``B`` right-padded rows ``[prompt + completion]``; scored tokens are the completion's (or every
    token after the first when ``completion_only`` is False). ``num_seqs == num_pairs == B``."""
    _check_nonempty(items, "collate_sft")
    seqs = [it.prompt_ids + it.completion_ids for it in items]
    input_ids, attention_mask = _pad_rows(seqs, pad_id)
    width = input_ids.shape[1]
    out: list[list[int]] = [[], [], []]
    for s, (ids, it) in enumerate(zip(seqs, items)):
        _scored_span(s, width, ids, len(it.prompt_ids) if completion_only else 1, len(ids), s, out)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": None,
        "blocks": None,
        "segments": None,
        **_score_tensors(out),
        "num_seqs": len(items),
        "num_pairs": len(items),
        "tokens": sum(len(s) for s in seqs),
        "keys": [it.key for it in items],
    }


# ----------------------------------------------------------------------------- prefix-shared and packed
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # segment codes inside a prefix-shared block


def _shared_block(
    it: TokenizedPair, pair: int, num_pairs: int, row: int, offset: int, width: int, out: list[list[int]]
) -> tuple[list[int], list[int], list[int]]:
    """Lay out one pair as ``[prompt | chosen | rejected]`` at ``offset`` of ``row``; append its scores.

    Returns ``(ids, position_ids, segments)``. Chosen positions continue the prompt's; rejected ones
    restart at ``P``. The first chosen and the first rejected token are both predicted from the
    prompt's last position; later rejected tokens from the previous rejected position."""
    p, c, r = len(it.prompt_ids), len(it.chosen_ids), len(it.rejected_ids)
    ids = it.prompt_ids + it.chosen_ids + it.rejected_ids
    positions = list(range(p + c)) + list(range(p, p + r))
    segments = [PROMPT] * p + [CHOSEN] * c + [REJECTED] * r
    base = row * width + offset
    chosen_from = range(max(p, 1) - 1, p + c - 1)  # predicting positions inside the block
    chosen_at = range(max(p, 1), p + c)
    rejected_from = ([p - 1] if p else []) + list(range(p + c, p + c + r - 1))
    rejected_at = range(p + c + (0 if p else 1), p + c + r)
    for seq, sources, targets in ((pair, chosen_from, chosen_at), (num_pairs + pair, rejected_from, rejected_at)):
        for src, dst in zip(sources, targets):
            out[0].append(base + src)
            out[1].append(ids[dst])
            out[2].append(seq)
    return ids, positions, segments


def _may_attend(q: Tensor, kv: Tensor, q_block: Tensor, kv_block: Tensor, q_seg: Tensor, kv_seg: Tensor) -> Tensor:
    """The shared layouts' rule, on broadcastable tensors: a query sees keys at or before it in the same
    block, except that a rejected query never sees a chosen key."""
    return (q >= kv) & (q_block == kv_block) & ~((q_seg == REJECTED) & (kv_seg == CHOSEN))


def shared_mask(blocks: Tensor, segments: Tensor) -> Tensor:
    """Additive float32 mask ``[R, 1, T, T]`` (0 allowed, ``finfo.min`` not) from per-position block ids
    and segment codes ``[R, T]``, on their device, following :func:`_may_attend`.

    Pad positions carry a block id of their own, so a pad query sees only itself (no fully masked
    row, hence no NaN from SDPA) and no real query sees a pad."""
    pos = torch.arange(blocks.shape[1], device=blocks.device)
    allowed = _may_attend(
        pos[:, None], pos[None, :], blocks[:, :, None], blocks[:, None, :], segments[:, :, None], segments[:, None, :]
    )
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=blocks.device).masked_fill_(~allowed, MASK_MIN)
    return mask[:, None]


def shared_block_mask(blocks: Tensor, segments: Tensor) -> BlockMask:
    """The same pattern as :func:`shared_mask` as a FlexAttention ``BlockMask`` of shape ``[R, 1, T, T]``
    on the device of ``blocks``, for models loaded with ``attn_implementation="flex_attention"`` (torch
    2.5 or later).

    Built without compiling ``create_block_mask``: it evaluates the rule on every (query, key) pair (a
    few ``[R, 1, T, T]`` boolean tensors for a moment), then keeps only the 128 x 128 tiles with work."""
    from torch.nn.attention.flex_attention import create_block_mask

    # One captured tensor, not two: with two, torch 2.13's CPU kernel fails to build (CppCompileError)
    # once a new batch shape makes it recompile with dynamic shapes.
    labels = torch.stack((blocks, segments))

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return _may_attend(q, kv, labels[0, b, q], labels[0, b, kv], labels[1, b, q], labels[1, b, kv])

    rows, width = blocks.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=blocks.device)


def _collate_shared_rows(rows: list[list[int]], items: list[TokenizedPair], pad_id: int, dense_mask: bool) -> Batch:
    """Build a batch where ``rows[r]`` lists the indices of ``items`` laid out one after another in row ``r``.
    Block ids are item indices; pads get ``-1 - t``, a block of their own each."""
    lengths = [sum(_shared_len(items[i]) for i in row) for row in rows]
    width = max(lengths)
    num_pairs = len(items)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    blocks = -1 - torch.arange(width).repeat(len(rows), 1)
    out: list[list[int]] = [[], [], []]
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            ids, pos, seg = _shared_block(items[i], i, num_pairs, r, offset, width, out)
            end = offset + len(ids)
            input_ids[r, offset:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, offset:end] = torch.tensor(pos, dtype=torch.long)
            segments[r, offset:end] = torch.tensor(seg, dtype=torch.long)
            blocks[r, offset:end] = i
            offset = end
    return {
        "input_ids": input_ids,
        "attention_mask": shared_mask(blocks, segments) if dense_mask else None,
        "position_ids": position_ids,
        "blocks": blocks,
        "segments": segments,
        **_score_tensors(out),
        "num_seqs": 2 * num_pairs,
        "num_pairs": num_pairs,
        "tokens": sum(2 * len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids) for it in items),
        "keys": [it.key for it in items],
    }


def _shared_len(it: TokenizedPair) -> int:
    """Length of a pair laid out prefix-shared: ``P + C + R``."""
    return len(it.prompt_ids) + len(it.chosen_ids) + len(it.rejected_ids)


def collate_prefix_shared(items: list[TokenizedPair], pad_id: int, *, dense_mask: bool = True) -> Batch:
    """One row per pair, ``[prompt | chosen | rejected]``: the prompt is run once for both completions.

    ``position_ids`` ``[B, T]``: prompt ``0..P-1``, chosen ``P..P+C-1``, rejected again ``P..P+R-1``.
    ``blocks`` and ``segments`` ``[B, T]`` say which pair and which part each position is;
    ``attention_mask`` is :func:`shared_mask` of them, additive float32 ``[B, 1, T, T]``: causal over
    prompt + chosen; rejected sees the prompt and earlier rejected tokens, never chosen.
    The mask costs ``4 * B * T * T`` bytes: fine on CPU up to T of about 2048. ``dense_mask=False``
    leaves it None; :class:`~preftune.logprobs.SequenceLogps` then builds the mask the model's
    attention needs from ``blocks`` and ``segments`` on the device (a ``BlockMask`` under
    flex_attention). ``tokens`` counts the prompt twice, ``(P+C) + (P+R)`` per pair, as TRL does,
    so throughput figures compare."""
    _check_nonempty(items, "collate_prefix_shared")
    return _collate_shared_rows([[i] for i in range(len(items))], items, pad_id, dense_mask)


def _greedy_rows(items: Sequence[TokenizedPair], token_budget: int) -> list[list[int]]:
    """Fill rows in order, opening a new row when the next pair would exceed ``token_budget``.
    A pair longer than the budget gets a row of its own."""
    rows: list[list[int]] = []
    used = token_budget + 1
    for i, it in enumerate(items):
        n = _shared_len(it)
        if used + n > token_budget:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate_packed(
    items: list[TokenizedPair], pad_id: int, token_budget: int | None = None, *, dense_mask: bool = True
) -> Batch:
    """Padding-free packing: several prefix-shared pairs per row, filled greedily up to ``token_budget``
    (None: all ``items`` in one row, for micro-batches already grouped by :func:`pack_into_batches`).

    Pairs are kept apart by a block-diagonal mask and by position ids restarting at 0 for each pair.
    Chosen ``i`` is sequence ``i`` and rejected ``i`` is ``B + i`` in the order of ``items``. The
    additive mask is float32 ``[R, 1, T, T]`` with ``T <= max(token_budget, longest pair)``: keep the
    budget to about 2048 on CPU (16 MiB of mask per row), or pass ``dense_mask=False`` as in
    :func:`collate_prefix_shared`."""
    _check_nonempty(items, "collate_packed")
    if token_budget is None:
        return _collate_shared_rows([list(range(len(items)))], items, pad_id, dense_mask)
    if token_budget < 1:
        raise PreftuneError(f"collate_packed: token_budget must be >= 1, got {token_budget}")
    return _collate_shared_rows(_greedy_rows(items, token_budget), items, pad_id, dense_mask)


def pack_into_batches(items: list[TokenizedPair], token_budget: int) -> list[list[TokenizedPair]]:
    """Group pairs into micro-batches of at most ``token_budget`` prefix-shared tokens (``P + C + R``
    per pair), first-fit decreasing: longest pairs first, ties in dataset order, so the grouping is
    deterministic. A pair longer than the budget forms a micro-batch of its own."""
    if token_budget < 1:
        raise PreftuneError(f"pack_into_batches: token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(items)), key=lambda i: (-_shared_len(items[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = _shared_len(items[i])
        slot = next((b for b, left in enumerate(room) if n <= left), None)
        if slot is None:
            bins.append([])
            room.append(token_budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= n
    return [[items[i] for i in b] for b in bins]


# ----------------------------------------------------------------------------- layout table
LAYOUTS: dict[str, Callable[..., Batch]] = {
    "padded": collate_padded,
    "prefix_shared": collate_prefix_shared,
    "packed": collate_packed,
}

# Model types whose decoder takes a custom mask with position_ids unchanged (RoPE, full attention,
# no sliding window or bidirectional prefix).
SHARED_MASK_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "phi3"})
# Attention backends that can express the shared layouts: sdpa and eager through the dense 4D mask,
# flex_attention through a BlockMask (both built from ``blocks`` and ``segments``). Varlen kernels
# (flash_attention_2/3) take only disjoint segments (cu_seqlens): they cannot let rejected see the
# prompt but not chosen, so they get the padded layout.
SHARED_MASK_ATTENTION = frozenset({"sdpa", "eager", "flex_attention"})


def _base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention(model: Any) -> str:
    config = getattr(_base_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def supports_shared_mask(model: Any) -> bool:
    """True when ``model`` can run the prefix-shared and packed layouts: a model type in
    :data:`SHARED_MASK_MODEL_TYPES` with an attention backend in :data:`SHARED_MASK_ATTENTION`."""
    config = getattr(_base_model(model), "config", None)
    if config is None:
        return False
    return config.model_type in SHARED_MASK_MODEL_TYPES and _attention(model) in SHARED_MASK_ATTENTION


def _sliding_window(model: Any) -> int | None:
    config = getattr(_base_model(model), "config", None)
    if config is None or not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)


def choose_layout(requested: str, model: Any) -> str:
    """Resolve ``requested`` ("auto" or a name in :data:`LAYOUTS`) for ``model`` and log the choice.

    ``auto`` picks ``prefix_shared`` where :func:`supports_shared_mask`, else ``padded``: for example
    under flash_attention_2, whose varlen kernel cannot let rejected see the prompt but not chosen.
    An explicit shared layout on a model that cannot take it is an error rather than silently wrong
    log-probs."""
    config = getattr(_base_model(model), "config", None)
    where = f"{getattr(config, 'model_type', '?')}, attention '{_attention(model)}'"
    if requested == "auto":
        layout = "prefix_shared" if supports_shared_mask(model) else "padded"
        if layout == "padded":
            logger.info("batch layout auto -> padded for this model (%s): the shared layouts need attention %s "
                        "on a model type in %s", where, ", ".join(sorted(SHARED_MASK_ATTENTION)),
                        ", ".join(sorted(SHARED_MASK_MODEL_TYPES)))
    elif requested not in LAYOUTS:
        raise PreftuneError(f"layout '{requested}' is unknown: use one of auto, {', '.join(LAYOUTS)}")
    elif requested != "padded" and not supports_shared_mask(model):
        raise PreftuneError(
            f"layout '{requested}' needs a mask where rejected sees the prompt but not chosen, which this model "
            f"({where}) cannot take: set layout to 'padded' or 'auto', or load the model with "
            "attn_implementation 'sdpa' or 'flex_attention'"
        )
    else:
        layout = requested
    logger.info("batch layout: %s (requested %s)", layout, requested)
    window = _sliding_window(model)
    if layout != "padded" and window:
        logger.warning("the %s mask is full causal: rows longer than sliding_window=%d see past the window",
                       layout, window)
    return layout


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of ``batch`` to ``device``; ints, lists and None pass through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- unpaired (KTO)
def collate_unpaired(items: list, pad_id: int, layout: Callable[..., Batch] = collate_padded, **kwargs: Any) -> Batch:
    """Unpaired rows (``data.unpaired.TokenizedUnpaired``) in any pair ``layout``: sequence ``i`` is row
    ``i``'s prompt + completion, sequence ``B + i`` the same prompt + its mismatched KL completion, and
    ``labels`` ``[B]`` bool says which rows are desirable. Every other field follows the batch contract."""
    _check_nonempty(items, "collate_unpaired")
    batch = layout(items, pad_id, **kwargs)
    batch["labels"] = torch.tensor([bool(it.label) for it in items], dtype=torch.bool)
    return batch

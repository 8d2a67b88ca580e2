"""Batch layouts for tokenized pairs and SFT rows: padded, prefix-shared and packed (padding-free),
all following the batch contract in :mod:`preftune.data.rows`. No model code and no tokenizer here:
the shared layouts carry ``blocks``, ``segments`` and ``position_ids``, and the model side
(:mod:`preftune.attention`) turns them into the mask its attention takes.

Scoring convention (all layouts): the token at row position ``t`` is predicted by the hidden state
at ``t - 1``; ``score_index`` points at that predicting position in the flattened ``[R * T]`` rows.
A completion is scored from the first position that has a predecessor, so with an empty prompt
the first completion token is not scored (there is nothing to predict it from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from preftune.data.rows import TokenizedPair, TokenizedSFT
from preftune.errors import PreftuneError

Batch = dict[str, Any]


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


def _collate_shared_rows(rows: list[list[int]], items: list[TokenizedPair], pad_id: int) -> Batch:
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
        "attention_mask": None,
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


def collate_prefix_shared(items: list[TokenizedPair], pad_id: int, *, dense_mask: bool = False) -> Batch:
    """One row per pair, ``[prompt | chosen | rejected]``: the prompt is run once for both completions.

    ``position_ids`` ``[B, T]``: prompt ``0..P-1``, chosen ``P..P+C-1``, rejected again ``P..P+R-1``.
    ``blocks`` and ``segments`` ``[B, T]`` say which pair and which part each position is: causal over
    prompt + chosen; rejected sees the prompt and earlier rejected tokens, never chosen.
    ``attention_mask`` is None: :class:`~preftune.logprobs.SequenceLogps` builds the mask the model's
    attention takes from ``blocks``, ``segments`` and ``position_ids`` on the device
    (:func:`preftune.attention.decoder_mask`). ``dense_mask`` is accepted and ignored (batches held the
    dense mask once). ``tokens`` counts the prompt twice, ``(P+C) + (P+R)`` per pair, as TRL does,
    so throughput figures compare."""
    _check_nonempty(items, "collate_prefix_shared")
    return _collate_shared_rows([[i] for i in range(len(items))], items, pad_id)


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
    items: list[TokenizedPair], pad_id: int, token_budget: int | None = None, *, dense_mask: bool = False
) -> Batch:
    """Padding-free packing: several prefix-shared pairs per row, filled greedily up to ``token_budget``
    (None: all ``items`` in one row, for micro-batches already grouped by :func:`pack_into_batches`).

    Pairs are kept apart by their block ids (a block-diagonal mask on the model side) and by position
    ids restarting at 0 for each pair. Chosen ``i`` is sequence ``i`` and rejected ``i`` is ``B + i`` in
    the order of ``items``. Rows are ``T <= max(token_budget, longest pair)`` wide; under sdpa and eager
    the model side's dense mask costs ``4 * T * T`` bytes per row, so keep the budget to about 2048 on
    CPU (16 MiB per row). ``attention_mask`` and ``dense_mask`` as in :func:`collate_prefix_shared`."""
    _check_nonempty(items, "collate_packed")
    if token_budget is None:
        return _collate_shared_rows([list(range(len(items)))], items, pad_id)
    if token_budget < 1:
        raise PreftuneError(f"collate_packed: token_budget must be >= 1, got {token_budget}")
    return _collate_shared_rows(_greedy_rows(items, token_budget), items, pad_id)


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

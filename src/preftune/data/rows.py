"""The internal records every format adapter produces and every later stage consumes, and the batch
contract shared by all layouts. No I/O and no tokenizer here.

Batch contract (every layout: padded, prefix-shared, packed) -- a dict of tensors:
  input_ids       [R, T] long    rows of tokens (pad = tokenizer.pad_token_id)
  attention_mask  [R, T] long (padded), or None (shared layouts: the model side builds their mask)
  position_ids    [R, T] long or None
  blocks          [R, T] long    shared layouts: the pair each position belongs to (its index in the
                                 batch); pad t has -1 - t, a block of its own. None when padded
  segments        [R, T] long    shared layouts: 0 prompt, 1 chosen, 2 rejected, -1 pad. None when padded
                  Shared layouts: a query sees keys at or before it in its block, but rejected never
                  sees chosen. The model side (preftune/attention.py) turns blocks, segments and
                  position_ids into the mask its attention takes (dense, or a FlexAttention BlockMask).
  score_index     [N] long       flat index into R*T of the position whose hidden state predicts a token
  score_target    [N] long       the token predicted there
  score_seq       [N] long       which sequence the scored token belongs to, in [0, S)
  num_seqs        int S          preference batches: 2B with chosen i -> i, rejected i -> B + i; SFT: B
  num_pairs       int B          rows of the dataset in the batch
  tokens          int            non-pad tokens of the sequences as TRL counts them (prompt included,
                                 counted once per sequence: chosen + rejected for pairs)
  keys            list[str]      row keys (PreferenceRow.key) in batch order, for the reference cache
Per-sequence log-probs are the segment sums of the scored tokens' log-probs by ``score_seq``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Union

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]  # plain text, or chat messages ending before the assistant's reply


@dataclass
class PreferenceRow:
    """A prompt with a preferred and a dispreferred completion (the assistant's reply text only)."""

    prompt: Prompt
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return row_key(self.prompt, self.chosen, self.rejected)


@dataclass
class SFTRow:
    """A prompt and the completion to imitate."""

    prompt: Prompt
    completion: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return row_key(self.prompt, self.completion)


@dataclass
class UnpairedRow:
    """A prompt with one completion and whether it is desirable (KTO's unpaired data)."""

    prompt: Prompt
    completion: str
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return row_key(self.prompt, self.completion, self.label)


def unpair(rows: list[PreferenceRow]) -> list[UnpairedRow]:
    """Split each preference pair into a desirable (chosen) and an undesirable (rejected) row."""
    out = []
    for row in rows:
        out.append(UnpairedRow(row.prompt, row.chosen, True, dict(row.meta)))
        out.append(UnpairedRow(row.prompt, row.rejected, False, dict(row.meta)))
    return out


def row_key(*parts: Any) -> str:
    """A stable content hash of a row (used by the reference log-prob cache and fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def fingerprint(keys: list[str]) -> str:
    """A data fingerprint: the hash of the row keys in order."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


@dataclass
class TokenizedPair:
    """Token ids of one preference row. ``chosen_ids``/``rejected_ids`` are completion ids only
    (EOS appended unless truncated); the prompt is shared and identical for both."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


@dataclass
class TokenizedSFT:
    prompt_ids: list[int]
    completion_ids: list[int]
    key: str
    meta: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False

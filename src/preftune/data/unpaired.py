"""KTO's unpaired rows on their way to a batch: read (``kto`` data, or preference pairs split by
``dpo.unpair``), tokenized through the SFT path (an unpaired row is an SFT row plus a label), and given
each its mismatched KL completion. The batch layout is ``collate.collate_unpaired``.

An unpaired item is shaped like a pair so that every layout, the packing and the reference cache
take it as it is: ``chosen_ids`` is the row's own completion, ``rejected_ids`` the completion of
another row with a different prompt (for KTO's reference point ``z_0``, estimated from mismatched
prompt/completion pairs as TRL 1.16 does), and ``label`` says whether the completion is desirable.
TRL rotates completions by one within each batch of its sequential sampler; preftune shuffles its
batches, so the mismatch is fixed once per row (the nearest earlier row with another prompt), which
also lets the precomputed reference cache hold the KL completion's log-prob by row key.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.data.rows import PreferenceRow, SFTRow, TokenizedPair, UnpairedRow, unpair
from preftune.data.sources import load_rows
from preftune.data.tokenize import RowKind, tokenize
from preftune.errors import PreftuneError


@dataclass
class TokenizedUnpaired(TokenizedPair):
    """Token ids of one unpaired row: ``chosen_ids`` its completion, ``rejected_ids`` its KL completion."""

    label: bool = True


def kl_partners(prompts: list[list[int]]) -> list[int]:
    """For each row, the index of the nearest earlier row (cyclically, looking back at most 63 rows) whose
    prompt differs; else the previous row (a single row is its own partner)."""
    n = len(prompts)
    out = []
    for i in range(n):
        j = next((k % n for k in range(i - 1, i - min(n, 64), -1) if prompts[k % n] != prompts[i]), (i - 1) % n)
        out.append(j)
    return out


def tokenize_unpaired(rows: list[UnpairedRow], tokenizer, data) -> tuple[list[TokenizedUnpaired], object]:
    """Unpaired rows -> ``(items, TokenizeReport)`` through the SFT tokenization (drops counted there),
    each item with its KL completion (:func:`kl_partners`) and its row's key."""
    sft_rows = [SFTRow(r.prompt, r.completion, {"label": bool(r.label), "key": r.key, **r.meta}) for r in rows]
    done = tokenize(sft_rows, tokenizer, data, RowKind.SFT)
    tokenized, report = done.items, done.report
    partners = kl_partners([t.prompt_ids for t in tokenized])
    items = [
        TokenizedUnpaired(t.prompt_ids, t.completion_ids, tokenized[j].completion_ids, key=t.meta["key"],
                          meta=t.meta, truncated=t.truncated, label=t.meta["label"])
        for t, j in zip(tokenized, partners)
    ]
    return items, report


def as_unpaired(rows: list, split_pairs: bool) -> list[UnpairedRow]:
    """Rows for an unpaired loss: unpaired rows as they are; preference pairs split into a desirable and an
    undesirable row when ``split_pairs`` (``dpo.unpair``), else an error naming that key."""
    if rows and isinstance(rows[0], PreferenceRow):
        if not split_pairs:
            raise PreftuneError("dpo.unpair: the unpaired losses (kto, apo_zero_unpaired) read unpaired rows, and this "
                                "data has pairs; set dpo.unpair=true to split each pair into a desirable (chosen) and an "
                                "undesirable (rejected) row, or give kto data (prompt, completion, label)")
        return unpair(rows)
    return rows


def load_unpaired(data, split_pairs: bool, seed: int):
    """``(train rows, held-out rows, DataReport)`` as UnpairedRow: ``kto`` data as it is, or preference pairs
    split by ``dpo.unpair`` (pairs without it are an error naming that key). The data is read as the kind
    the option expects first, then as the other; if neither reads, the first error stands."""
    first_error = None
    for kind in ("preference", "unpaired") if split_pairs else ("unpaired", "preference"):
        try:
            train, test, read = load_rows(data, kind, seed)
            break
        except PreftuneError as e:
            first_error = first_error or e
    else:
        raise first_error
    return as_unpaired(train, split_pairs), as_unpaired(test, split_pairs), read

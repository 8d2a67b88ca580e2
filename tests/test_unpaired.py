"""KTO's unpaired rows: KL partners, tokenization through the SFT path, and the unpaired batch layout."""

from __future__ import annotations

import torch

from preftune.config import DataConfig
from preftune.data.collate import collate_padded, collate_prefix_shared, collate_unpaired
from preftune.data.rows import PreferenceRow, UnpairedRow, unpair
from preftune.data.unpaired import TokenizedUnpaired, kl_partners, tokenize_unpaired


def test_kl_partners_take_the_nearest_earlier_row_with_another_prompt():
    """Prompts a a b c: row 0 looks back cyclically to row 3 (c), row 1 skips row 0 (same a) to row 3,
    row 2 takes row 1, row 3 row 2. All prompts equal: the previous row. One row: itself."""
    a, b, c = [1], [2], [3]
    assert kl_partners([a, a, b, c]) == [3, 3, 1, 2]
    assert kl_partners([a, a, a]) == [2, 0, 1]
    assert kl_partners([a]) == [0]


def test_tokenize_unpaired_goes_through_the_sft_path(tokenizer):
    """Each row's ids are those of the SFT tokenization of (prompt, completion); its KL completion is
    its partner's completion ids; the key and label are the UnpairedRow's; drops are counted."""
    from preftune.data.rows import SFTRow
    from preftune.data.tokenize import Limits, RowKind, tokenize

    pairs = [PreferenceRow("What is 2 + 2?", "4.", "5."), PreferenceRow("Name a colour.", "Blue.", "Hammer.")]
    rows = unpair(pairs) + [UnpairedRow("Say hi.", "   ", True)]  # an empty completion is dropped
    data = DataConfig(max_length=64, max_prompt_length=32)
    items, report = tokenize_unpaired(rows, tokenizer, data)
    assert report.dropped == {"empty_completion": 1} and len(items) == 4
    for item, row in zip(items, rows):
        (sft,) = tokenize([SFTRow(row.prompt, row.completion)], tokenizer, Limits(64, 32), RowKind.SFT).items
        assert (item.prompt_ids, item.chosen_ids) == (sft.prompt_ids, sft.completion_ids)
        assert item.key == row.key and item.label == row.label
    assert [it.rejected_ids for it in items] == [items[j].chosen_ids for j in kl_partners([it.prompt_ids for it in items])]
    assert items[1].rejected_ids == items[3].chosen_ids  # row 1's earlier row has the same prompt


def test_collate_unpaired_is_a_pair_layout_plus_labels():
    """Sequence i is prompt + completion, B + i prompt + KL completion, labels [B] bool; the padded and
    prefix-shared layouts score the same tokens."""
    items = [TokenizedUnpaired([1, 2], [5, 6, 7], [8], key="a", label=True),
             TokenizedUnpaired([3], [8], [5, 6, 7], key="b", label=False)]
    for layout in (collate_padded, collate_prefix_shared):
        batch = collate_unpaired(items, 0, layout)
        assert batch["labels"].tolist() == [True, False] and batch["num_pairs"] == 2 and batch["num_seqs"] == 4
        assert torch.bincount(batch["score_seq"], minlength=4).tolist() == [3, 1, 1, 3]
        assert batch["keys"] == ["a", "b"]

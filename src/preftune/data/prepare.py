"""A stage's rows -> its tokenized train and held-out rows with one account of the data: cached,
batched tokenization, the drop summary logged before training starts, and the
``data.max_drop_fraction`` check. Reading is sources.py's; the row -> ids function is tokenize.py's."""

from __future__ import annotations

import logging
import os
from typing import Any

from preftune.data import drops
from preftune.data.cache import tokenize_rows_cached
from preftune.data.tokenize import RowKind

log = logging.getLogger(__name__)


def tokenize_splits(train_rows: list, test_rows: list, read, tokenizer, data, kind: RowKind,
                    check: bool = True) -> tuple[list, list, dict[str, Any]]:
    """``(train items, held-out items, report)``; ``report`` is what a run's data.json holds: the
    read counts, each split's tokenization counts (truncation of prompts and completions apart,
    lengths before and after truncation) and both splits' together (``tokenize``), and ``drops``, the combined account
    (``rows_read == rows_kept + sum(dropped)``). With ``check`` it is logged (main process) and a
    bad-row share above ``data.max_drop_fraction`` stops with the reasons and counts."""
    train, tok_train = tokenize_rows_cached(train_rows, tokenizer, data, kind)
    test, tok_test = tokenize_rows_cached(test_rows, tokenizer, data, kind)
    account = drops.combine(read, tok_train, tok_test)
    if check:
        if os.environ.get("RANK", "0") == "0":
            log.info("%s", drops.summary_line(account))
            for note in read.notes:
                log.info("data: %s", note)
        drops.check(account, data.max_drop_fraction, data.source)
    report = {"read": read.to_dict(), "tokenize_train": tok_train.to_dict(), "tokenize_test": tok_test.to_dict(),
              "tokenize": tok_train.merge(tok_test).to_dict(), "drops": account}
    return train, test, report

"""The data of the ``preftune_mc`` lm-eval task, found next to this file, so that the task runs from
the ``lm_eval`` CLI in any folder (``custom_dataset: !function preftune_mc.load`` in its YAML)."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().with_name("preftune_mc.jsonl")


def load(**metadata):
    """A DatasetDict with the 60 questions as its ``test`` split (lm-eval passes the YAML's metadata)."""
    return datasets.load_dataset("json", data_files={"test": str(DATA)})

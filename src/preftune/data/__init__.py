"""Data: source files -> rows (formats.py) -> ids (tokenize.py) -> batches (collate.py)."""

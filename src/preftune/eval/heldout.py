"""Forgetting: held-out language-model loss on a plain-text corpus (NLL, perplexity, bits per byte),
on fixed chunks that are identical for every model sharing a tokenizer, and the paired per-chunk
difference between two models. Corpus loading lives here too; generation and judging do not.

What is scored, exactly:
- the texts are tokenized one by one without special tokens and joined into one stream of ids with
  the tokenizer's EOS id between documents (so a literal ``<|im_end|>`` inside a text stays text);
- the stream is cut into consecutive, non-overlapping chunks of ``chunk_length`` ids; a shorter tail
  is dropped (unless the whole stream is shorter than one chunk, which is then the only chunk), and
  only the first ``max_chunks`` chunks are kept;
- in every chunk, tokens 2..L are scored (token 1 has no context inside its chunk and no prediction),
  so a chunk contributes ``L - 1`` scored tokens; EOS separators that fall in 2..L are scored too;
- ``nll`` = summed NLL (nats) / scored tokens; ``ppl`` = exp(nll);
- ``bpb`` = summed NLL / ln 2 / ``n_bytes``, where ``n_bytes`` is the UTF-8 length of the scored
  tokens' text, decoded per chunk with special tokens skipped (EOS separators add 0 bytes). Decoding
  a chunk that starts or ends inside a multi-byte character yields U+FFFD (3 bytes) for the split
  piece; on English text this never happens.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from preftune.embedded import heldout_corpus_path
from preftune.env import cache_root, offline
from preftune.errors import DataError, PreftuneError
from preftune.eval.stats import bootstrap_mean_ci
from preftune.files import write_json

LN2 = math.log(2.0)


# ---------------------------------------------------------------- corpus


def _read_txt(path: Path) -> list[str]:
    """Blank-line separated documents."""
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    return [d for d in docs if d]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"not valid JSON ({e}); one object per line is expected", str(path), i) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError("expected an object with a string 'text'", str(path), i, "text")
        texts.append(obj["text"])
    return texts


def _read_lines(path: Path) -> list[str]:
    """One document per line (the Lee corpus)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".cor": _read_lines}


def looks_like_dataset(spec: str) -> bool:
    """A local dataset folder, or a Hub name (``owner/name``, no file extension)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return True
    return not path.exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.suffix


def dataset_documents(name: str, subset: str | None = None, split: str = "validation", text_column: str = "text",
                      max_documents: int = 2000) -> list[str]:
    """The first ``max_documents`` texts of a dataset's split, streamed through ``datasets`` (a Hub name
    or a local dataset folder: the same code), cached as JSON under the preftune cache so a corpus is
    read once. Empty texts are skipped."""
    key = json.dumps([str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name,
                      subset, split, text_column, max_documents])
    path = cache_root() / "corpora" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["texts"]
    where = f"eval.heldout.corpus={name} (split {split!r})"
    try:
        stream = datasets.load_dataset(name, subset, split=split, streaming=True)
        texts = []
        for i, rec in enumerate(stream, 1):
            if text_column not in rec:
                raise PreftuneError(f"{where}: row {i} has no column {text_column!r} (columns: "
                                    f"{', '.join(rec)}); set eval.heldout.text_column")
            if isinstance(rec[text_column], str) and rec[text_column].strip():
                texts.append(rec[text_column])
            if len(texts) >= max_documents:
                break
    except PreftuneError:
        raise
    except Exception as e:  # offline, not found, no such split: one actionable message
        why = "the Hub cannot be reached (HF_HUB_OFFLINE=1)" if offline() else f"{type(e).__name__}: {e}"
        raise PreftuneError(f"{where}: could not be read through `datasets` ({why}); use a local dataset folder, "
                            "a .txt/.jsonl file or embedded:lee") from None
    if not texts:
        raise PreftuneError(f"{where}: no non-empty {text_column!r} text in the split")
    write_json(path, {"corpus": name, "subset": subset, "split": split, "texts": texts})
    return texts


def load_corpus(spec: str, subset: str | None = None, split: str = "validation", text_column: str = "text",
                max_documents: int = 2000) -> list[str]:
    """``embedded:lee`` (gensim's Lee background corpus, one document per line), a local ``.txt``
    (documents separated by blank lines), a ``.jsonl`` with a ``text`` field, or a dataset (a Hub name or
    a local dataset folder, :func:`dataset_documents`) -> list of documents."""
    if spec == "embedded:lee":
        return _read_lines(heldout_corpus_path())
    if looks_like_dataset(spec):
        return dataset_documents(spec, subset, split, text_column, max_documents)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PreftuneError(f"held-out corpus not found: {spec} (use embedded:lee, a .txt or .jsonl file, a local "
                            "dataset folder or a Hub dataset name)")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PreftuneError(f"held-out corpus {spec}: unsupported extension; use .txt (blank-line separated) or .jsonl")
    texts = reader(path)
    if not texts:
        raise DataError("the corpus holds no text", str(path))
    return texts


# ---------------------------------------------------------------- chunking and scoring


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Documents tokenized without special tokens, joined with the EOS id."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PreftuneError("held-out loss joins documents with EOS, but the tokenizer has no eos_token")
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        stream.extend(([eos] if i else []) + list(ids))
    return stream


def make_chunks(stream: list[int], chunk_length: int, max_chunks: int | None) -> list[list[int]]:
    """Consecutive non-overlapping chunks of ``chunk_length`` ids (see the module docstring)."""
    if chunk_length < 2:
        raise PreftuneError(f"eval.heldout.chunk_length must be at least 2, got {chunk_length}")
    if len(stream) < 2:
        raise PreftuneError("the held-out corpus has fewer than 2 tokens; nothing to score")
    if len(stream) < chunk_length:
        chunks = [stream]
    else:
        chunks = [stream[i : i + chunk_length] for i in range(0, len(stream) - chunk_length + 1, chunk_length)]
    return chunks[:max_chunks] if max_chunks else chunks


def chunk_bytes(tokenizer, chunk: list[int]) -> int:
    """UTF-8 bytes of a chunk's scored tokens (all but the first), special tokens skipped."""
    return len(tokenizer.decode(chunk[1:], skip_special_tokens=True).encode("utf-8"))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def chunk_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats) of tokens 2..L of each row of ``batch`` [B, L] -> [B] float64."""
    logits = model(input_ids=batch).logits[:, :-1]
    targets = batch[:, 1:]
    # one row at a time keeps the float32 log-softmax at [L, V] rather than [B, L, V]
    rows = [torch.nn.functional.cross_entropy(lg.float(), t, reduction="none") for lg, t in zip(logits, targets)]
    return torch.stack([r.double().sum() for r in rows])


def heldout_loss(model, tokenizer, texts: list[str], chunk_length: int = 256, max_chunks: int | None = 64,
                 batch_size: int = 8, progress: bool = True) -> dict:
    """Held-out LM loss of ``model`` on ``texts``.

    Returns ``{"nll", "ppl", "bpb", "n_tokens", "n_bytes", "n_chunks", "chunk_length",
    "per_chunk": {"nll", "n_tokens", "n_bytes", "bpb"}}``; ``per_chunk["nll"]`` holds summed nats per
    chunk (the values :func:`paired_difference` pairs). See the module docstring for what is scored.
    ``progress`` shows a bar over the batches (on stderr)."""
    chunks = make_chunks(token_stream(tokenizer, texts), chunk_length, max_chunks)
    was_training = model.training
    model.eval()
    sums: list[float] = []
    device = _device(model)
    for i in tqdm(range(0, len(chunks), batch_size), desc="held-out loss", unit="batch", disable=not progress,
                  leave=False, dynamic_ncols=True):
        batch = torch.tensor(chunks[i : i + batch_size], dtype=torch.long, device=device)
        sums.extend(chunk_nll(model, batch).tolist())
    model.train(was_training)
    tokens = [len(c) - 1 for c in chunks]
    nbytes = [chunk_bytes(tokenizer, c) for c in chunks]
    total, n_tokens, n_bytes = sum(sums), sum(tokens), sum(nbytes)
    nll = total / n_tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "bpb": total / LN2 / max(n_bytes, 1),
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_chunks": len(chunks),
        "chunk_length": chunk_length,
        "per_chunk": {
            "nll": sums,
            "n_tokens": tokens,
            "n_bytes": nbytes,
            "bpb": [s / LN2 / max(b, 1) for s, b in zip(sums, nbytes)],
        },
    }


def paired_difference(per_chunk_a: dict, per_chunk_b: dict, seed: int = 0) -> dict:
    """Bits-per-byte of model A minus model B, paired over the same chunks, with a bootstrap 95% CI.

    Each chunk contributes ``d_i = (nll_a_i - nll_b_i) / ln 2 / mean(n_bytes)``, so that
    ``mean(d) = (sum nll_a - sum nll_b) / ln 2 / sum n_bytes``, exactly ``bpb_a - bpb_b``; the CI
    resamples chunks (stats.bootstrap_mean_ci). Returns ``{"mean", "low", "high", "n"}``."""
    a_bytes, b_bytes = per_chunk_a["n_bytes"], per_chunk_b["n_bytes"]
    if list(a_bytes) != list(b_bytes):
        raise PreftuneError(
            "held-out chunks differ between the two models (different tokenizer or chunk settings); "
            "a paired difference needs identical chunks"
        )
    mean_bytes = sum(a_bytes) / len(a_bytes)
    diffs = [(a - b) / LN2 / mean_bytes for a, b in zip(per_chunk_a["nll"], per_chunk_b["nll"])]
    mean, low, high = bootstrap_mean_ci(diffs, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": len(diffs)}

"""Held-out loss (forgetting): a hand-computed NLL / bits-per-byte case on a bigram model whose
log-probabilities we set, chunks identical across models, the paired difference, and corpus loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

from preftune.embedded import tiny_llama
from preftune.errors import DataError, PreftuneError
from preftune.eval.heldout import heldout_loss, load_corpus, make_chunks, paired_difference, token_stream

LN2, LN3 = math.log(2), math.log(3)


class BigramLM(torch.nn.Module):
    """A real causal LM with the HF call signature: logits at position t depend only on token t,
    read from a table of log-probabilities (rows: current token, columns: next token)."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log().float())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.log_probs[input_ids])


# vocabulary: <eos>=0, a=1, b=2 (one character per token)
PROBS = [
    [1 / 3, 1 / 3, 1 / 3],  # after <eos>
    [0.25, 0.25, 0.5],  # after a
    [0.5, 0.25, 0.25],  # after b
]


@pytest.fixture(scope="module")
def char_tokenizer():
    tk = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def test_hand_computed_two_chunks(char_tokenizer):
    """texts "aab", "ba" -> stream a a b <eos> b a = [1, 1, 2, 0, 2, 1]; chunk_length 3 -> chunks
    [a a b] and [<eos> b a]. Scored (all but each chunk's first token):
      chunk 1: a->a 0.25, a->b 0.5          NLL = ln 4 + ln 2 = 3 ln 2,       bytes "ab" = 2
      chunk 2: <eos>->b 1/3, b->a 0.25      NLL = ln 3 + ln 4 = ln 3 + 2 ln 2, bytes "ba" = 2
    total NLL = 5 ln 2 + ln 3 over 4 tokens: nll = (5 ln 2 + ln 3) / 4 = 1.14130..., ppl = exp(nll);
    bpb = (5 ln 2 + ln 3) / ln 2 / 4 = (5 + log2 3) / 4 = 1.64624...;
    per-chunk bpb: 3 / 2 = 1.5 and (2 + log2 3) / 2 = 1.79248..."""
    out = heldout_loss(BigramLM(PROBS), char_tokenizer, ["aab", "ba"], chunk_length=3, max_chunks=None, batch_size=1)
    assert out["n_tokens"] == 4 and out["n_bytes"] == 4 and out["n_chunks"] == 2
    assert out["nll"] == pytest.approx((5 * LN2 + LN3) / 4, abs=1e-6)
    assert out["ppl"] == pytest.approx(math.exp((5 * LN2 + LN3) / 4), abs=1e-5)
    assert out["bpb"] == pytest.approx((5 + math.log2(3)) / 4, abs=1e-6)
    assert out["per_chunk"]["nll"] == pytest.approx([3 * LN2, LN3 + 2 * LN2], abs=1e-6)
    assert out["per_chunk"]["bpb"] == pytest.approx([1.5, (2 + math.log2(3)) / 2], abs=1e-6)
    first = heldout_loss(BigramLM(PROBS), char_tokenizer, ["aab", "ba"], chunk_length=3, max_chunks=1)
    assert first["n_chunks"] == 1 and first["nll"] == pytest.approx(3 * LN2 / 2, abs=1e-6)


def test_hand_computed_scored_eos_adds_no_bytes(char_tokenizer):
    """texts "ab", "ba" -> stream [a b <eos> b a] is exactly one chunk of 5. Scored: a->b 0.5,
    b-><eos> 0.5, <eos>->b 1/3, b->a 0.25: NLL = 4 ln 2 + ln 3 over 4 tokens; the scored text is
    "b", "", "b", "a" -> 3 bytes (EOS adds none): bpb = (4 + log2 3) / 3 = 1.86165..."""
    out = heldout_loss(BigramLM(PROBS), char_tokenizer, ["ab", "ba"], chunk_length=5, max_chunks=None)
    assert (out["n_tokens"], out["n_bytes"]) == (4, 3)
    assert out["nll"] == pytest.approx((4 * LN2 + LN3) / 4, abs=1e-6)
    assert out["bpb"] == pytest.approx((4 + math.log2(3)) / 3, abs=1e-6)


def test_chunking(char_tokenizer):
    stream = token_stream(char_tokenizer, ["aab", "ba", "a"])
    assert stream == [1, 1, 2, 0, 2, 1, 0, 1]
    assert make_chunks(stream, 3, None) == [[1, 1, 2], [0, 2, 1]]  # the tail [0, 1] is dropped
    assert make_chunks(stream, 3, 1) == [[1, 1, 2]]
    assert make_chunks(stream, 20, None) == [stream]  # shorter than one chunk: the whole stream
    with pytest.raises(PreftuneError, match="chunk_length"):
        make_chunks(stream, 1, None)


def test_chunks_identical_across_models_and_paired_difference():
    """Two different models over the same texts score the same chunks (same token and byte counts),
    and the paired difference's mean is exactly bpb_a - bpb_b (the per-chunk differences are
    normalised by the mean chunk bytes); a model against itself differs by exactly 0."""
    model_a, tok = tiny_llama(seed=0)
    model_b, _ = tiny_llama(seed=1)
    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "Held-out text, second document. " * 5]
    a = heldout_loss(model_a, tok, texts, chunk_length=16, max_chunks=6, batch_size=4)
    b = heldout_loss(model_b, tok, texts, chunk_length=16, max_chunks=6, batch_size=3)
    assert a["n_chunks"] == b["n_chunks"] == 6 and a["n_tokens"] == b["n_tokens"] == 6 * 15
    assert a["per_chunk"]["n_bytes"] == b["per_chunk"]["n_bytes"]
    assert a["bpb"] != b["bpb"]
    diff = paired_difference(a["per_chunk"], b["per_chunk"])
    assert diff["mean"] == pytest.approx(a["bpb"] - b["bpb"], abs=1e-9)
    assert diff["low"] <= diff["mean"] <= diff["high"] and diff["n"] == 6
    same = paired_difference(a["per_chunk"], a["per_chunk"])
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    other = heldout_loss(model_b, tok, texts, chunk_length=8, max_chunks=6)
    with pytest.raises(PreftuneError, match="identical chunks"):
        paired_difference(a["per_chunk"], other["per_chunk"])


def test_load_corpus(tmp_path):
    lee = load_corpus("embedded:lee")
    assert len(lee) == 300 and all(lee)
    (tmp_path / "c.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    assert load_corpus(str(tmp_path / "c.txt")) == ["first doc\nline two", "second doc"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_corpus(str(tmp_path / "c.jsonl")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(PreftuneError, match="not found"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_progress_bar_over_the_batches(char_tokenizer, capsys):
    heldout_loss(BigramLM(PROBS), char_tokenizer, ["aab", "ba"], chunk_length=3, max_chunks=None, batch_size=1)
    err = capsys.readouterr().err
    assert "held-out loss:   0%|          | 0/2" in err  # a bar over the 2 batches
    heldout_loss(BigramLM(PROBS), char_tokenizer, ["aab", "ba"], chunk_length=3, max_chunks=None, progress=False)
    assert "held-out loss" not in capsys.readouterr().err


def test_in_training_eval_shows_a_progress_bar(capsys):
    """The loop's held-out evaluation (``evaluate_batches``) reports its batches on a bar; a step
    function returning each batch's loss shows the pair-weighted mean is unchanged."""
    from preftune.config import SFTConfig
    from preftune.eval.rewards import evaluate_batches

    class Step:
        def step(self, policy, batch, cfg, ref):
            return torch.tensor(batch["loss"]), {}

        def units(self, batch):
            return batch["num_pairs"]

    batches = [{"loss": 1.0, "num_pairs": 1}, {"loss": 3.0, "num_pairs": 1}, {"loss": 2.0, "num_pairs": 2}]
    out = evaluate_batches(torch.nn.Linear(1, 1), batches, Step(), SFTConfig(), None, progress=True)
    assert out["loss"] == pytest.approx((1 + 3 + 2 * 2) / 4) and out["n"] == 4
    err = capsys.readouterr().err
    assert "held-out eval:   0%|          | 0/3" in err


# ---------------------------------------------------------------- corpora through `datasets`


def _slimpajama_like(folder):
    """A local dataset folder laid out like SlimPajama: ``validation/`` and ``train/`` JSONL with a
    ``text`` column and a metadata column."""
    for split, n in (("validation", 5), ("train", 3)):
        (folder / split).mkdir(parents=True)
        with open(folder / split / "chunk1.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": "" if i == 1 else f"{split} document {i}.", "meta": {"set": "x"}}) + "\n")
    return folder


def test_dataset_corpus_streams_a_split_with_a_budget_and_is_cached(tmp_path, monkeypatch):
    """The code that reads SlimPajama's validation set from the Hub, on a local dataset folder: the
    split's first ``max_documents`` non-empty texts, in order; a second read comes from the cache."""
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    folder = _slimpajama_like(tmp_path / "slimpajama")
    texts = load_corpus(str(folder), split="validation", max_documents=3)
    assert texts == ["validation document 0.", "validation document 2.", "validation document 3."]
    cached = list((tmp_path / "cache" / "corpora").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["texts"] == texts
    (folder / "validation" / "chunk1.jsonl").unlink()  # the cache answers without the source
    assert load_corpus(str(folder), split="validation", max_documents=3) == texts
    assert load_corpus(str(folder), split="train", max_documents=10) == ["train document 0.", "train document 2."]


def test_dataset_corpus_errors_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    folder = _slimpajama_like(tmp_path / "sp")
    with pytest.raises(PreftuneError, match="no column 'content'.*set eval.heldout.text_column"):
        load_corpus(str(folder), split="validation", text_column="content")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PreftuneError, match=r"eval.heldout.corpus=nobody/none .*could not be read"):
        load_corpus("nobody/none")


def test_suite_scores_a_dataset_corpus(tmp_path, monkeypatch, tiny_model_dir):
    """``eval.heldout.corpus`` naming a dataset folder goes through the suite (and its cache key)."""
    from preftune.config.validate import config_from_dict
    from preftune.eval.suite import evaluate_models

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    folder = _slimpajama_like(tmp_path / "sp")
    cfg = config_from_dict({"model": str(tiny_model_dir), "eval": {
        "rewards": False, "kl": False, "tasks": [], "winrate": {"enabled": False},
        "heldout": {"corpus": str(folder), "chunk_length": 8, "max_chunks": 2, "max_documents": 4}}})
    res = evaluate_models(cfg, {"base": str(tiny_model_dir)}, tmp_path / "eval")
    assert res["models"]["base"]["heldout"]["n_chunks"] == 2

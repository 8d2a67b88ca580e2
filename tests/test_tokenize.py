"""Tokenization invariants on the real SmolLM2 tokenizer: rendering, BOS/EOS, shared prompt ids,
truncation policy, counted drops and boundary merges."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.config import DataConfig
from preftune.data.rows import PreferenceRow, SFTRow
from preftune.data.tokenize import (
    percentiles,
    render_prompt,
    tokenize_pair,
    tokenize_rows,
    tokenize_sft,
)
from preftune.errors import PreftuneError

EOS = 2  # <|im_end|>
BOS = 1  # <|im_start|>


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template: prompts render as plain text."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer():
    """SmolLM2's tokenizer told to add BOS by default (its BOS is also the template's first token)."""
    from transformers import AutoTokenizer

    import preftune.embedded

    return AutoTokenizer.from_pretrained(preftune.embedded.tokenizer_dir(), add_bos_token=True)


def test_render_prompt_uses_chat_template_with_generation_prompt(tokenizer):
    text = render_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenizer)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # A plain string is one user message (the template then adds its default system turn).
    assert render_prompt("Hi", tokenizer).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompt_plain_text_without_template(plain_tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    assert render_prompt(msgs, plain_tokenizer) == "User: Hi\n\nAssistant: Hello\n\nUser: 2+2?\n\nAssistant:"
    assert render_prompt("Q: 2+2?\nA:", plain_tokenizer) == "Q: 2+2?\nA:"


def test_pair_ids_match_template_and_end_in_one_eos(tokenizer):
    row = PreferenceRow([{"role": "user", "content": "Capital of France?"}], "Paris.", "London.")
    t = tokenize_pair(row, tokenizer, max_length=128, max_prompt_length=64)
    expected_prompt = tokenizer.encode(render_prompt(row.prompt, tokenizer), add_special_tokens=False)
    assert t.prompt_ids == expected_prompt
    assert t.prompt_ids[0] == BOS and t.prompt_ids[1] != BOS  # template's BOS once, none added
    assert t.chosen_ids == tokenizer.encode("Paris.", add_special_tokens=False) + [EOS]
    assert t.rejected_ids[-1] == EOS and t.rejected_ids[-2] != EOS
    assert t.key == row.key and not t.truncated


def test_no_double_bos_when_tokenizer_adds_bos_and_template_has_it(bos_tokenizer):
    row = PreferenceRow("Hi", "Hello!", "Go away.")
    t = tokenize_pair(row, bos_tokenizer, 128, 64)
    assert t.prompt_ids[:2] != [BOS, BOS] and t.prompt_ids[0] == BOS


def test_bos_prepended_once_for_plain_text(bos_tokenizer):
    tok = copy.deepcopy(bos_tokenizer)
    tok.chat_template = None
    t = tokenize_pair(PreferenceRow("Question: 2+2?\nAnswer:", " 4", " 5"), tok, 64, 32)
    assert t.prompt_ids[0] == BOS and t.prompt_ids[1] != BOS
    assert t.prompt_ids[1:] == tok.encode("Question: 2+2?\nAnswer:", add_special_tokens=False)


def test_plain_message_prompt_puts_a_space_before_the_reply(plain_tokenizer):
    row = PreferenceRow([{"role": "user", "content": "Hi"}], "Hello", "Bye")
    t = tokenize_pair(row, plain_tokenizer, 64, 32)
    assert t.chosen_ids == plain_tokenizer.encode(" Hello", add_special_tokens=False) + [EOS]


def test_literal_eos_in_text_is_not_doubled(tokenizer):
    t = tokenize_pair(PreferenceRow("Hi", "Hello<|im_end|>", "Bye"), tokenizer, 64, 32)
    assert t.chosen_ids[-1] == EOS and t.chosen_ids[-2] != EOS


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(200))
    chosen = " ".join(f"c{i}" for i in range(100))
    row = PreferenceRow(prompt, chosen, "short answer")
    full_prompt = tokenizer.encode(render_prompt(prompt, tokenizer), add_special_tokens=False)
    full_chosen = tokenizer.encode(chosen, add_special_tokens=False) + [EOS]
    t = tokenize_pair(row, tokenizer, max_length=96, max_prompt_length=64)
    assert t.prompt_ids == full_prompt[-64:]  # the end of the prompt, down to max_prompt_length
    assert t.chosen_ids == full_chosen[: 96 - 64]  # the start of the completion, to fit max_length
    assert t.chosen_ids[-1] != EOS  # a cut completion lacks EOS
    assert t.rejected_ids[-1] == EOS  # the short one is whole
    assert t.truncated


def test_prompt_too_long_is_dropped(tokenizer):
    row = PreferenceRow("a long prompt " * 20, "yes", "no")
    assert tokenize_pair(row, tokenizer, max_length=16, max_prompt_length=16) == "prompt_too_long"
    assert tokenize_sft(SFTRow("a long prompt " * 20, "yes"), tokenizer, 16, 16) == "prompt_too_long"


def test_chosen_equals_rejected_before_and_after_truncation(tokenizer):
    assert tokenize_pair(PreferenceRow("Hi", "same", "same"), tokenizer, 64, 32) == "chosen_equals_rejected"
    # Different only after the 20th word: equal once both are cut to the budget.
    common = " ".join(["alpha"] * 20)
    row = PreferenceRow("Hi", common + " beta", common + " gamma")
    assert not isinstance(tokenize_pair(row, tokenizer, 200, 100), str)
    assert tokenize_pair(row, tokenizer, max_length=40, max_prompt_length=32) == "chosen_equals_rejected"


def test_empty_completion_dropped(tokenizer):
    assert tokenize_pair(PreferenceRow("Hi", "  ", "no"), tokenizer, 64, 32) == "empty_completion"
    assert tokenize_sft(SFTRow("Hi", ""), tokenizer, 64, 32) == "empty_completion"


def test_tokenize_sft(tokenizer):
    row = SFTRow([{"role": "user", "content": "Say hi"}], "Hi!", meta={"category": "greet"})
    t = tokenize_sft(row, tokenizer, 64, 48)
    assert t.completion_ids == tokenizer.encode("Hi!", add_special_tokens=False) + [EOS]
    assert t.meta == {"category": "greet"} and t.key == row.key


def test_tokenize_rows_counts_every_drop_and_lengths(tokenizer):
    rows = [
        PreferenceRow("Hi", "Hello", "Go away"),
        PreferenceRow("Hi", "same", "same"),
        PreferenceRow("Hi", "", "x"),
        PreferenceRow("Hi", "word " * 100, "no"),
    ]
    data = DataConfig(max_length=64, max_prompt_length=48)
    out, rep = tokenize_rows(rows, tokenizer, data, "preference")
    assert rep.rows_in == 4 and rep.kept == len(out) == 2
    assert rep.dropped == {"chosen_equals_rejected": 1, "empty_completion": 1}
    assert rep.truncated == {"prompt": 0, "completion": 1}
    assert rep.truncation_rate == {"prompt": 0.0, "completion": 0.5}
    assert sorted(rep.lengths) == ["chosen", "prompt", "rejected"]
    assert rep.length_stats()["chosen"]["max"] == len(out[1].chosen_ids)
    assert set(rep.to_dict()) >= {"kept", "dropped", "truncated", "boundary_merges", "lengths"}


def test_boundary_merges_counted_not_dropped(plain_tokenizer):
    # Plain prompt "Answer" + completion "s are here": encoded jointly, "Answers" merges across the cut.
    rows = [PreferenceRow("Answer", "s are here", "s were there"), PreferenceRow("Q?\n", "yes", "no")]
    out, rep = tokenize_rows(rows, plain_tokenizer, DataConfig(max_length=64, max_prompt_length=32), "preference")
    assert rep.kept == 2 and rep.boundary_merges == 1


def test_percentiles_nearest_rank():
    """Lengths 1..100: nearest-rank p50 = 50, p90 = 90, p99 = 99, max = 100."""
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=60)


@settings(max_examples=60, deadline=None)
@given(prompt=text, chosen=text, rejected=text, max_length=st.integers(8, 64), prompt_frac=st.floats(0.1, 0.9))
def test_tokenize_pair_invariants_property(tokenizer, prompt, chosen, rejected, max_length, prompt_frac):
    max_prompt = max(1, int(max_length * prompt_frac))
    t = tokenize_pair(PreferenceRow(prompt, chosen, rejected), tokenizer, max_length, max_prompt)
    if isinstance(t, str):
        assert t in {"empty_completion", "chosen_equals_rejected", "prompt_too_long"}
        if t == "empty_completion":
            assert not chosen.strip() or not rejected.strip()
        return
    full_prompt = tokenizer.encode(render_prompt(prompt, tokenizer), add_special_tokens=False)
    assert t.prompt_ids == full_prompt[-max_prompt:]
    assert t.prompt_ids[:2] != [BOS, BOS]
    assert t.chosen_ids != t.rejected_ids
    for ids in (t.chosen_ids, t.rejected_ids):
        assert 1 <= len(t.prompt_ids) + len(ids) <= max_length
        if t.truncated is False:
            assert ids[-1] == EOS and ids[-2:-1] != [EOS]


def test_prompt_and_completion_truncation_are_counted_apart(tokenizer):
    long_prompt = " ".join(f"w{i}" for i in range(80))
    rows = [
        PreferenceRow(long_prompt, "yes", "no"),  # prompt cut only
        PreferenceRow("Hi", "word " * 60, "no"),  # completion cut only
        PreferenceRow(long_prompt, "word " * 60, "no"),  # both
        PreferenceRow("Hi", "yes", "no"),  # neither
    ]
    out, rep = tokenize_rows(rows, tokenizer, DataConfig(max_length=64, max_prompt_length=32), "preference")
    assert rep.kept == 4 and rep.truncated == {"prompt": 2, "completion": 2}
    assert rep.truncation_rate == {"prompt": 0.5, "completion": 0.5}
    before, after = rep.length_stats(before_truncation=True), rep.length_stats()
    assert after["prompt"]["max"] == 32 < before["prompt"]["max"]
    assert before["chosen"]["max"] == len(tokenizer.encode("word " * 60, add_special_tokens=False)) + 1  # + EOS
    assert rep.to_dict()["truncated"] == {"prompt": 2, "completion": 2}


def test_worker_processes_give_the_same_rows_and_report(tokenizer, monkeypatch):
    from preftune.data import tokenize

    monkeypatch.setattr(tokenize, "BATCH_ROWS", 4)  # 30 rows -> 8 batches, enough for the worker pool
    rows = [PreferenceRow(f"Question {i}? " * (i % 4 + 1), f"Answer {i}. " * (i % 9 + 1), "No.") for i in range(30)]
    data = DataConfig(max_length=40, max_prompt_length=20)
    assert tokenize._procs(2, 8) == 2
    serial, serial_rep = tokenize_rows(rows, tokenizer, DataConfig(**{**vars(data), "num_proc": 1}))
    pooled, pooled_rep = tokenize_rows(rows, tokenizer, DataConfig(**{**vars(data), "num_proc": 2}))
    assert pooled == serial and pooled_rep.to_dict() == serial_rep.to_dict()
    assert [t.key for t in pooled] == [r.key for r in rows]


def test_batched_rows_equal_one_row_at_a_time(tokenizer):
    rows = [PreferenceRow([{"role": "user", "content": f"Q{i}"}], f"A{i}", f"B{i}") for i in range(6)]
    batched, _ = tokenize_rows(rows, tokenizer, DataConfig(max_length=64, max_prompt_length=32))
    assert batched == [tokenize_pair(r, tokenizer, 64, 32) for r in rows]


def test_the_prompt_ids_check_can_fail():
    from preftune.data.tokenize import TokenizationInvariantError, _verify

    _verify([5, 6], [[7, EOS]], [False], None, EOS, generation_ids=[5, 6])
    with pytest.raises(TokenizationInvariantError, match="differ from encode_prompt"):
        _verify([5, 6], [[7, EOS]], [False], None, EOS, generation_ids=[5, 9])


def test_unpaired_rows_tokenize_through_the_sft_path(tokenizer):
    from preftune.data.rows import UnpairedRow

    row = UnpairedRow("Say hi", "Hi!", False)
    t = tokenize_sft(row, tokenizer, 64, 48)
    assert t.completion_ids == tokenizer.encode("Hi!", add_special_tokens=False) + [EOS] and t.key == row.key


# ---------------------------------------------------------------- data.chat_template

BRACKETS = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_setting_renders_rows_by_the_given_template(tmp_path, as_file):
    """``data.chat_template`` (text or a file) replaces the model's template: a row's prompt ids are the
    given template's text, not ChatML; generation's prompt ids are the same; a saved folder keeps it."""
    from preftune import embedded
    from preftune.eval.generate import prompt_ids
    from preftune.model import load_tokenizer

    setting = BRACKETS
    if as_file:
        (tmp_path / "template.jinja").write_text(BRACKETS)
        setting = str(tmp_path / "template.jinja")
    tok = load_tokenizer(str(embedded.tokenizer_dir()), chat_template=setting)
    row = PreferenceRow([{"role": "user", "content": "What is 2+2?"}], "4", "5")
    pair = tokenize_pair(row, tok, 128, 64)
    expected = tok.encode("[user] What is 2+2?\n[assistant] ", add_special_tokens=False)
    assert pair.prompt_ids == expected
    model_own = load_tokenizer(str(embedded.tokenizer_dir()))
    assert tokenize_pair(row, model_own, 128, 64).prompt_ids != expected  # ChatML without the setting
    assert prompt_ids(row.prompt, tok, 64) == pair.prompt_ids  # generation renders as training did
    tok.save_pretrained(tmp_path / "saved")
    assert tokenize_pair(row, load_tokenizer(str(tmp_path / "saved")), 128, 64).prompt_ids == expected


def test_chat_template_that_is_neither_text_nor_a_file_is_a_clear_error(tmp_path):
    from preftune.data.tokenize import chat_template_text

    with pytest.raises(PreftuneError, match="data.chat_template: .*neither a Jinja template"):
        chat_template_text(str(tmp_path / "missing.jinja"))

"""Format adapters on their edge cases, and format detection by columns."""

from __future__ import annotations

import functools

import pytest

from preftune.data.formats import (
    FIELDS,
    FORMATS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    UNPAIRED_FORMATS,
    RowError,
    RowFiltered,
    adapter,
    detect_format,
    sft_rows_from_pairs,
)
from preftune.data.rows import PreferenceRow, SFTRow, UnpairedRow
from preftune.errors import DataError

U = "user"
A = "assistant"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_tables_cover_every_format():
    assert set(FORMATS) == set(PREFERENCE_FORMATS) | set(SFT_FORMATS) | set(UNPAIRED_FORMATS)
    assert set(PREFERENCE_FORMATS) & set(SFT_FORMATS) == {"sharegpt"}  # pairs or plain conversations


def test_one_record_per_format():
    """Each Format is named by its key, needs what it reads, and the kind lists keep detection order."""
    assert all(f.name == name and f.needs <= f.reads for name, f in FORMATS.items())
    assert PREFERENCE_FORMATS == ("hh", "shp", "chat", "standard", "implicit", "openai", "sharegpt")
    assert SFT_FORMATS == ("alpaca", "messages", "completion", "sharegpt") and UNPAIRED_FORMATS == ("kto",)
    assert FORMATS["sharegpt"].columns_for("preference") == {"conversations", "chosen", "rejected"}
    assert FORMATS["sharegpt"].columns_for("sft") == {"conversations"}
    assert FORMATS["shp"].reads == {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B", "score_ratio"}
    assert FIELDS >= {"system", "score_ratio", "input", "label"}
    assert FORMATS["hh"]({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go",
                          "category": "c"}).meta == {"category": "c"}  # read columns stay out of meta


# ---------------------------------------------------------------- hh


def test_hh_prompt_ends_at_last_assistant_marker_when_responses_start_alike():
    # A char-level common prefix would cut into "Sure, " and leave "here"/"that" as the completions.
    rec = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Sure, here is one.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Sure, that is dumb.",
    }
    row = FORMATS["hh"](rec)
    assert row.prompt == [msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Tell me a joke")]
    assert row.chosen == "Sure, here is one."
    assert row.rejected == "Sure, that is dumb."


def test_hh_rejected_must_share_the_prompt():
    rec = {"chosen": "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: More\n\nAssistant: B",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Different"}
    with pytest.raises(RowError, match="rejected") as e:
        FORMATS["hh"](rec)
    assert e.value.field == "rejected" and e.value.reason == "prompt_mismatch"


@pytest.mark.parametrize(
    "rec, field, reason",
    [
        ({"rejected": "\n\nHuman: a\n\nAssistant: b"}, "chosen", "missing_field"),
        ({"chosen": 3, "rejected": "x"}, "chosen", "wrong_type"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:  "}, "rejected",
         "empty_completion"),
        ({"chosen": "no turns here", "rejected": "no turns"}, "chosen", "not_a_transcript"),
    ],
)
def test_hh_malformed_rows_name_the_field(rec, field, reason):
    with pytest.raises(RowError) as e:
        FORMATS["hh"](rec)
    assert e.value.field == field and e.value.reason == reason
    assert f"field '{field}'" in str(e.value)


def test_hh_keeps_meta_and_extra_columns():
    rec = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c",
           "category": "greeting", "meta": {"answer": "b"}}
    assert FORMATS["hh"](rec).meta == {"answer": "b", "category": "greeting"}


# ---------------------------------------------------------------- shp


def shp_rec(label: int, score_a: int, score_b: int) -> dict:
    return {"post_id": "p1", "domain": "askscience", "history": "Why is the sky blue?", "labels": label,
            "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Because it is.", "score_A": score_a,
            "score_B": score_b}


def test_shp_labels_pick_chosen_and_meta_keeps_domain():
    row = FORMATS["shp"](shp_rec(1, 10, 2))
    assert (row.prompt, row.chosen, row.rejected) == ("Why is the sky blue?", "Rayleigh scattering.", "Because it is.")
    assert row.meta["domain"] == "askscience" and "score_A" not in row.meta
    flipped = FORMATS["shp"](shp_rec(0, 2, 10))
    assert (flipped.chosen, flipped.rejected) == ("Because it is.", "Rayleigh scattering.")


def test_shp_score_ratio_filter():
    """Preferred/dispreferred scores 10/5 = 2.0 passes at the default 2.0; 9/5 = 1.8 does not;
    with min_score_ratio=1.5 it does."""
    assert isinstance(FORMATS["shp"](shp_rec(1, 10, 5)), PreferenceRow)
    with pytest.raises(RowFiltered) as e:
        FORMATS["shp"](shp_rec(1, 9, 5))
    assert e.value.reason == "score_ratio"
    assert isinstance(functools.partial(FORMATS["shp"], min_score_ratio=1.5)(shp_rec(1, 9, 5)), PreferenceRow)
    # The dataset's own score_ratio column wins when present.
    with pytest.raises(RowFiltered):
        FORMATS["shp"]({**shp_rec(1, 10, 1), "score_ratio": 1.2})


def test_shp_without_scores_or_at_ratio_one_keeps_every_pair():
    no_scores = {k: v for k, v in shp_rec(1, 0, 0).items() if not k.startswith("score")}
    assert FORMATS["shp"](no_scores).chosen == "Rayleigh scattering."
    # 9/5 = 1.8 is below the default 2.0, but min_score_ratio <= 1 reads no scores at all.
    assert isinstance(functools.partial(FORMATS["shp"], min_score_ratio=1.0)(shp_rec(1, 9, 5)), PreferenceRow)
    assert isinstance(functools.partial(FORMATS["shp"], min_score_ratio=0.5)({**no_scores, "score_A": "x"}),
                      PreferenceRow)


def test_adapter_binds_options_from_data_config():
    from preftune.config import DataConfig

    assert isinstance(adapter("shp", DataConfig(min_score_ratio=1.5))(shp_rec(1, 9, 5)), PreferenceRow)
    with pytest.raises(DataError, match="unknown data format"):
        adapter("hhh")


# ---------------------------------------------------------------- chat, standard, implicit


def test_chat_multi_turn_with_system_message():
    shared = [msg("system", "Be kind."), msg(U, "Hi"), msg(A, "Hello!"), msg(U, "Help me")]
    row = FORMATS["chat"]({"chosen": shared + [msg(A, "Sure.")], "rejected": shared + [msg(A, "No.")],
                           "chosen_rating": 5})
    assert row.prompt == shared and row.prompt[0]["role"] == "system"
    assert (row.chosen, row.rejected) == ("Sure.", "No.")
    assert row.meta == {"chosen_rating": 5}


def test_chat_errors():
    with pytest.raises(RowError) as e:
        FORMATS["chat"]({"chosen": [msg(U, "a"), msg(A, "b")], "rejected": [msg(U, "z"), msg(A, "c")]})
    assert e.value.reason == "prompt_mismatch"
    with pytest.raises(RowError) as e:
        FORMATS["chat"]({"chosen": [msg(U, "a")], "rejected": [msg(U, "a"), msg(A, "c")]})
    assert e.value.field == "chosen" and e.value.reason == "no_assistant_turn"
    with pytest.raises(RowError) as e:
        FORMATS["chat"]({"chosen": [{"role": "user"}], "rejected": []})
    assert e.value.reason == "wrong_type"


def test_standard_strings_and_message_lists():
    row = FORMATS["standard"]({"prompt": "2+2?", "chosen": " 4 ", "rejected": "5"})
    assert (row.prompt, row.chosen, row.rejected) == ("2+2?", "4", "5")
    conv = FORMATS["standard"]({"prompt": [msg(U, "2+2?")], "chosen": [msg(A, "4")],
                                "rejected": [msg(U, "2+2?"), msg(A, "5")]})
    assert (conv.prompt, conv.chosen, conv.rejected) == ([msg(U, "2+2?")], "4", "5")
    with pytest.raises(RowError) as e:
        FORMATS["standard"]({"prompt": 7, "chosen": "a", "rejected": "b"})
    assert e.value.field == "prompt" and e.value.reason == "wrong_type"


def test_implicit_transcript_splits_at_turn_boundary():
    # Responses share "The answer is " -- the split must be at the last Assistant turn, not inside the reply.
    rec = {"chosen": "User: What is 2+2?\n\nAssistant: 4\n\nUser: And 3+3?\n\nAssistant: The answer is 6.",
           "rejected": "User: What is 2+2?\n\nAssistant: 4\n\nUser: And 3+3?\n\nAssistant: The answer is 7."}
    row = FORMATS["implicit"](rec)
    assert row.prompt == [msg(U, "What is 2+2?"), msg(A, "4"), msg(U, "And 3+3?")]
    assert (row.chosen, row.rejected) == ("The answer is 6.", "The answer is 7.")


def test_implicit_message_lists_and_mismatch():
    row = FORMATS["implicit"]({"chosen": [msg(U, "Hi"), msg(A, "Hello")], "rejected": [msg(U, "Hi"), msg(A, "Go")]})
    assert row.prompt == [msg(U, "Hi")]
    with pytest.raises(RowError) as e:
        FORMATS["implicit"]({"chosen": "Human: a\n\nAssistant: b", "rejected": "Human: z\n\nAssistant: c"})
    assert e.value.field == "rejected" and e.value.reason == "prompt_mismatch"


# ---------------------------------------------------------------- SFT


def test_alpaca_template_with_and_without_input():
    with_input = FORMATS["alpaca"]({"instruction": "Sort", "input": "3 1 2", "output": "1 2 3"})
    assert with_input.prompt.endswith("### Instruction:\nSort\n\n### Input:\n3 1 2\n\n### Response:\n")
    assert with_input.prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.completion == "1 2 3"
    bare = FORMATS["alpaca"]({"instruction": "Say hi", "input": "", "output": "hi"})
    assert "### Input" not in bare.prompt and bare.prompt.endswith("### Instruction:\nSay hi\n\n### Response:\n")
    with pytest.raises(RowError) as e:
        FORMATS["alpaca"]({"instruction": "Say hi", "output": ""})
    assert e.value.field == "output" and e.value.reason == "empty_completion"


def test_messages_and_completion_sft():
    row = FORMATS["messages"]({"messages": [msg("system", "S"), msg(U, "Hi"), msg(A, "Hello")]})
    assert row == SFTRow([msg("system", "S"), msg(U, "Hi")], "Hello", {})
    assert FORMATS["completion"]({"prompt": "Q", "completion": "A", "category": "x"}) == SFTRow("Q", "A", {"category": "x"})
    with pytest.raises(RowError) as e:
        FORMATS["messages"]({"messages": [msg(A, "Hello")]})
    assert e.value.reason == "no_prompt"


# ---------------------------------------------------------------- openai, sharegpt, kto


def openai_rec(chosen="Paris.", rejected="Rome.") -> dict:
    return {"input": {"messages": [msg("system", "Be brief."), msg(U, "Capital of France?")], "tools": [],
                      "parallel_tool_calls": True},
            "preferred_output": [msg(A, chosen)], "non_preferred_output": [msg(A, rejected)], "source": "x"}


def test_openai_keeps_the_system_message_and_takes_the_assistant_outputs():
    row = FORMATS["openai"](openai_rec())
    assert row.prompt == [msg("system", "Be brief."), msg(U, "Capital of France?")]
    assert (row.chosen, row.rejected, row.meta) == ("Paris.", "Rome.", {"source": "x"})
    with pytest.raises(RowError) as e:
        FORMATS["openai"]({**openai_rec(), "input": "Capital?"})
    assert (e.value.field, e.value.reason) == ("input", "wrong_type")
    with pytest.raises(RowError) as e:
        FORMATS["openai"](openai_rec(rejected=" "))
    assert (e.value.field, e.value.reason) == ("non_preferred_output", "empty_completion")


def sharegpt_turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


def test_sharegpt_ranking_layout_is_a_pair():
    """LLaMA-Factory's ranking layout: chosen/rejected are single gpt turns after the conversation."""
    rec = {"conversations": sharegpt_turns(("system", "Be kind."), ("human", "Hi"), ("gpt", "Hey"), ("human", "Joke?")),
           "chosen": {"from": "gpt", "value": "Knock knock."}, "rejected": {"from": "gpt", "value": "No."}}
    row = FORMATS["sharegpt"](rec)
    assert isinstance(row, PreferenceRow)
    assert row.prompt == [msg("system", "Be kind."), msg(U, "Hi"), msg(A, "Hey"), msg(U, "Joke?")]
    assert (row.chosen, row.rejected) == ("Knock knock.", "No.")
    listed = FORMATS["sharegpt"]({**rec, "rejected": sharegpt_turns(("gpt", "Nope."))})
    assert listed.rejected == "Nope."
    with pytest.raises(RowError) as e:
        FORMATS["sharegpt"]({**rec, "chosen": {"from": "human", "value": "x"}})
    assert (e.value.field, e.value.reason) == ("chosen", "no_assistant_turn")


def test_sharegpt_plain_conversation_is_sft():
    row = FORMATS["sharegpt"]({"conversations": sharegpt_turns(("human", "Hi"), ("gpt", "Hello"), ("human", "Bye"),
                                                                ("gpt", "Bye!")), "id": "c1"})
    assert row == SFTRow([msg(U, "Hi"), msg(A, "Hello"), msg(U, "Bye")], "Bye!", {"id": "c1"})
    with pytest.raises(RowError) as e:
        FORMATS["sharegpt"]({"conversations": [{"speaker": "human", "text": "Hi"}]})
    assert (e.value.field, e.value.reason) == ("conversations", "wrong_type")


def test_kto_rows_from_prompt_completion_or_messages():
    row = FORMATS["kto"]({"prompt": "Q?", "completion": " A. ", "label": True, "category": "c"})
    assert row == UnpairedRow("Q?", "A.", True, {"category": "c"})
    conv = FORMATS["kto"]({"messages": [msg(U, "Q?"), msg(A, "Bad.")], "label": 0})
    assert conv == UnpairedRow([msg(U, "Q?")], "Bad.", False, {})
    assert FORMATS["kto"]({"prompt": "Q", "completion": "A", "label": "false"}).label is False
    with pytest.raises(RowError) as e:
        FORMATS["kto"]({"prompt": "Q", "completion": "A", "label": "maybe"})
    assert (e.value.field, e.value.reason) == ("label", "wrong_type")


def test_sft_rows_from_pairs_takes_chosen():
    pairs = [PreferenceRow("Q", "good", "bad", {"category": "c"})]
    assert sft_rows_from_pairs(pairs) == [SFTRow("Q", "good", {"category": "c"})]


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "columns, kind, sample, expected",
    [
        (["prompt", "chosen", "rejected"], "preference", None, "standard"),
        (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen"], "preference", None, "standard"),
        (["history", "human_ref_A", "human_ref_B", "labels", "score_A"], "preference", None, "shp"),
        (["chosen", "rejected"], "preference", {"chosen": "\n\nHuman: a\n\nAssistant: b"}, "hh"),
        (["chosen", "rejected", "dataset"], "preference", {"chosen": [msg(U, "a")]}, "chat"),
        (["chosen", "rejected"], "preference", {"chosen": "User: a\n\nAssistant: b"}, "implicit"),
        (["instruction", "input", "output"], "sft", None, "alpaca"),
        (["messages", "category"], "sft", None, "messages"),
        (["prompt", "completion"], "sft", None, "completion"),
        (["input", "preferred_output", "non_preferred_output"], "preference", None, "openai"),
        (["conversations", "chosen", "rejected", "system"], "preference", None, "sharegpt"),
        (["conversations"], "sft", None, "sharegpt"),
        (["conversations", "chosen", "rejected"], "sft", None, "sharegpt"),
        (["prompt", "completion", "label"], "unpaired", None, "kto"),
        (["messages", "label"], "unpaired", None, "kto"),
    ],
)
def test_detect_format(columns, kind, sample, expected):
    assert detect_format(columns, kind, sample) == expected


def test_detect_ambiguous_lists_columns_and_fits():
    with pytest.raises(DataError) as e:
        detect_format(["chosen", "rejected"], "preference")
    text = str(e.value)
    assert "ambiguous" in text and "['chosen', 'rejected']" in text
    assert "hh" in text and "chat" in text and "implicit" in text
    with pytest.raises(DataError, match="ambiguous: formats that fit: messages, completion"):
        detect_format(["messages", "prompt", "completion"], "sft")


def test_detect_unknown_lists_columns():
    with pytest.raises(DataError) as e:
        detect_format(["question", "answer"], "preference")
    assert "['answer', 'question']" in str(e.value) and "no preference format fits" in str(e.value)

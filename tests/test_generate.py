"""Generation: seeded determinism, left padding that does not change greedy answers, only the new text
returned, the ``preftune generate`` JSONL, and the terminal chat fed real input lines."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.commands.evaluation import generate as main
from preftune.data.tokenize import render_prompt
from preftune.embedded import tiny_llama
from preftune.eval.generate import chat_loop, common_prefix, cut_at_stop, generate, pick, prompt_ids, stop_ids

PROMPTS = ["hello", "What is the capital of France, and why is it that city?",
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
            {"role": "user", "content": "tell me a joke"}]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def untied(tiny):
    """A random 2-layer Llama with an untied LM head: unlike the tied tiny model (which greedily
    repeats its last input token, here a newline that strips to ""), its greedy answers are non-empty."""
    _, tok = tiny
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval(), tok


def test_sampling_is_deterministic_with_a_seed(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, batch_size=2, progress=False)
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=7, **kw)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert a == generate(model, tok, PROMPTS, seed=7, **kw)
    assert a != generate(model, tok, PROMPTS, seed=8, **kw)
    assert all(isinstance(s, str) and s for s in a) and len(a) == 3


def test_left_padding_does_not_change_greedy_answers(untied):
    model, tok = untied
    kw = dict(max_new_tokens=8, temperature=0.0, progress=False)
    batched = generate(model, tok, PROMPTS, batch_size=3, **kw)
    alone = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in PROMPTS]
    assert batched == alone and all(batched)


def test_returns_only_the_new_text(untied):
    """Oracle: HF generate on the un-padded prompt, sliced after the prompt and cut at the first stop id."""
    model, tok = untied
    text = render_prompt(PROMPTS[1], tok)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert prompt_ids(PROMPTS[1], tok) == ids[0].tolist()
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    expected = tok.decode(cut_at_stop(full[0, ids.shape[1]:].tolist(), stop_ids(tok)), skip_special_tokens=True)
    assert generate(model, tok, [PROMPTS[1]], max_new_tokens=8, progress=False) == [expected.strip()]
    assert "assistant" not in expected[:9]


def test_stops_and_prompt_truncation(tiny):
    _, tok = tiny
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert {im_end, eot} <= set(stop_ids(tok))
    assert cut_at_stop([5, 6, im_end, 7], [im_end]) == [5, 6] and cut_at_stop([5, 6], [im_end]) == [5, 6]
    full = prompt_ids(PROMPTS[1], tok)
    assert prompt_ids(PROMPTS[1], tok, max_prompt_length=5) == full[-5:]  # keeps the end (no BOS added)


def test_generate_command_writes_jsonl(tmp_path, tiny_model_dir):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"question {i}?", "chosen": "yes", "rejected": "no", "category": "qa"} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{source: {data}, test_size: 0.3}}\neval: {{winrate: {{max_new_tokens: 4}}}}\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    ns = argparse.Namespace(config=str(cfg), overrides=[], model=str(tiny_model_dir), out=None)
    assert main(ns) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {tuple(sorted(x)) for x in lines} == {("meta", "prompt", "response")}
    assert all(x["prompt"].startswith("question") and x["meta"]["category"] == "qa" for x in lines)


def _typed(*lines: str):
    """``input``'s contract: each call returns the next line, and EOFError at the end."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_keeps_the_conversation_and_resets(tiny, tmp_path):
    model, tok = tiny
    out = io.StringIO()
    saved = tmp_path / "chat.json"
    messages = chat_loop(model, tok, _typed("hello", "how are you?", f"/save {saved}", "/reset", "", "new topic",
                                            "/exit", "never read"), out, max_new_tokens=4, temperature=1.0)
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "new topic"
    assert out.getvalue().count("assistant> ") == 3 and "(conversation reset)" in out.getvalue()
    before_reset = json.loads(saved.read_text())
    assert [m["content"] for m in before_reset if m["role"] == "user"] == ["hello", "how are you?"]
    assert len(before_reset) == 4
    # end of input exits cleanly, keeping both turns
    messages = chat_loop(model, tok, _typed("one", "two"), io.StringIO(), max_new_tokens=4)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "two"] and len(messages) == 4


def test_chat_command_reads_stdin(tiny_model_dir, monkeypatch, capsys):
    from preftune.commands.evaluation import chat

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/exit\n"))
    ns = argparse.Namespace(model=str(tiny_model_dir), max_new_tokens=3, temperature=0.7)
    assert chat(ns) == 0
    out = capsys.readouterr().out
    assert out.startswith("type a message") and out.count("assistant> ") == 1


def test_shared_prefix_duplicates_and_finished_rows_match_hf_generate(untied):
    """Oracle: HF ``model.generate`` on each prompt alone. preftune's decoder computes the prompts'
    shared prefix once, prefills the repeated prompts once and drops rows as they stop: none of it may
    change a greedy answer."""
    model, tok = untied
    prompts = [PROMPTS[1], "hello", PROMPTS[2], "hello", PROMPTS[1], "a third, longer question about things?"]
    encoded = [prompt_ids(p, tok) for p in prompts]
    assert common_prefix(encoded) > 0  # the chat template's header is shared

    def hf(ids: list[int], stops: list[int]) -> list[int]:
        x = torch.tensor([ids])
        full = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                              eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return cut_at_stop(full[0, x.shape[1]:].tolist(), stops)

    saved = model.generation_config.eos_token_id
    try:
        with torch.no_grad():  # a model eos id that "hello" writes third: its rows end early, the others run on
            third = hf(encoded[1], stop_ids(tok))[2]
            model.generation_config.eos_token_id = [third]
            stops = stop_ids(tok, model)
            expected = [hf(ids, stops) for ids in encoded]
        assert len(expected[1]) == 2 and max(map(len, expected)) == 12
        got = generate(model, tok, prompts, max_new_tokens=12, batch_size=4, progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    assert got == [tok.decode(ids, skip_special_tokens=True).strip() for ids in expected]


def test_common_prefix_leaves_each_row_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical rows keep their last token
    assert common_prefix([[7, 1], [8, 1]]) == 0 and common_prefix([[5]]) == 0


def test_nucleus_sampling_keeps_the_top_p_mass():
    """Probabilities 0.5, 0.3, 0.2 with top_p 0.7: the nucleus is the first two (0.5 < 0.7, 0.8 > 0.7),
    renormalised to 5/8 and 3/8; temperature 0 is the argmax."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(8000, 3)
    draws = pick(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 5 / 8) < 0.02
    full = pick(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert abs((full == 2).float().mean().item() - 0.2) < 0.02
    assert pick(logits[:2], 0.0, 1.0, None).tolist() == [0, 0]

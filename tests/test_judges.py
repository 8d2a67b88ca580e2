"""Judges and ``judge_pairs`` over real HTTP: the openai judge against preftune's own ``serve``, a
loopback fault-injection server (timeouts, 500, 429, garbage, dropped connections), the disk cache,
the call cap, the rate limit, and the rule judge with ``checks.check``. No mocks."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from preftune.config import WinrateConfig
from preftune.errors import DataError, PreftuneError
from preftune.eval.judges import (
    JUDGES,
    HFJudge,
    InvalidVerdict,
    Judge,
    JudgmentCache,
    OpenAIJudge,
    RuleJudge,
    cache_key,
    chat_completions_url,
    judge_pairs,
    make_judge,
)
from preftune.eval.prompts import TEMPLATES, get_template, parse_verdict, render

FAST = {"backoff_base": 0.001, "backoff_max": 0.01}


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize(("text", "verdict"), [
    ("Comparison: A is clearer.\nPreferred: A", "A"),
    ("Comparison: B answers it.\nPreferred: B", "B"),
    ("Both equal.\npreferred: TIE", "tie"),
    ("**Preferred:** **B**", "B"),
    ('Preferred: "A"', "A"),
    ("Preferred: A ... on reflection\nPreferred: B", "B"),
    ("B", "B"),
    ("I like both of them", None),
    ("Preferred: C", None),
    ("Preferred: Ab", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_templates_and_custom_template(tmp_path):
    """Both built-ins hold the three placeholders and ask for a final 'Preferred:' line; a custom
    template is filled in one pass (other braces and placeholder-like text in responses stay)."""
    for name, tpl in TEMPLATES.items():
        assert get_template(name) == tpl
        assert all("{" + p + "}" in tpl for p in ("prompt", "response_a", "response_b")) and "Preferred: A" in tpl
    custom = 'Q: {prompt} | 1: {response_a} | 2: {response_b} | json {"k": 1}'
    assert render(get_template(custom), [{"role": "user", "content": "hi"}], "{response_b}", "x") == \
        'Q: User: hi | 1: {response_b} | 2: x | json {"k": 1}'
    path = tmp_path / "judge.txt"
    path.write_text(custom)
    assert get_template(str(path)) == custom
    with pytest.raises(PreftuneError, match="response_b"):
        get_template("Q: {prompt} A: {response_a}")


# ---------------------------------------------------------------- the fault-injection server

OK_REPLY = "Comparison: A is more helpful.\nPreferred: A"
UNJUDGEABLE = "UNJUDGEABLE"


class FaultServer:
    """A loopback OpenAI-like endpoint that misbehaves on chosen request numbers (1-based) and
    answers garbage to any prompt containing UNJUDGEABLE; otherwise 'Preferred: A'."""

    def __init__(self, faults: dict[int, str], sleep: float = 1.0):
        self.faults, self.sleep = faults, sleep
        self.count = 0
        self.served: Counter = Counter()
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.count += 1
                    action = server.faults.get(server.count, "ok")
                    server.auth.append(self.headers.get("Authorization"))
                if action == "ok" and UNJUDGEABLE.encode() in body:
                    action = "garbage"
                with server.lock:
                    server.served[action] += 1
                ACTIONS[action](self, server)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(handler, status: int, body: bytes, content_type="application/json", headers=()):
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:  # the client gave up (timeout test)
        pass


def _chat(text: str) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]}).encode()


def _timeout(h, server):
    time.sleep(server.sleep)
    _send(h, 200, _chat(OK_REPLY))


def _close(h, server):
    h.close_connection = True  # no status line at all: the client sees the connection drop


ACTIONS = {
    "ok": lambda h, s: _send(h, 200, _chat(OK_REPLY)),
    "garbage": lambda h, s: _send(h, 200, _chat("I like both of them.")),
    "not_json": lambda h, s: _send(h, 200, b"<html>oops</html>", "text/html"),
    "500": lambda h, s: _send(h, 500, b'{"error": {"message": "boom"}}'),
    "429": lambda h, s: _send(h, 429, b'{"error": {"message": "slow down"}}', headers=[("Retry-After", "0")]),
    "401": lambda h, s: _send(h, 401, b'{"error": {"message": "bad key"}}'),
    "timeout": _timeout,
    "close": _close,
}


def _items(n: int, bad_last: bool = True) -> list[dict]:
    items = [{"prompt": f"question {i}", "model": f"model answer {i}", "reference": f"chosen answer {i}",
              "meta": {}, "category": "helpful" if i % 2 else "harmless"} for i in range(n)]
    if bad_last:
        items[-1]["prompt"] = f"{UNJUDGEABLE} question"
    return items


def test_fault_injection_run_completes_retries_counts_and_caches(tmp_path):
    """6 items = 12 judgments. Requests 1-6 fail once each (timeout, 500, 429, garbage verdict, dropped
    connection, non-JSON body) and are retried; the last item's prompt always gets garbage, so its two
    judgments are asked twice each (invalid_retries=1) and stay invalid. With concurrency 2 the first
    6 requests belong to the first items, so the server sees exactly 12 + 6 + 2 = 20 requests.
    Every order says 'A', so each good item is a disagreement (win as A, loss as B): score 0.5."""
    faults = {1: "timeout", 2: "500", 3: "429", 4: "garbage", 5: "close", 6: "not_json"}
    cache = tmp_path / "judgments.jsonl"
    items = _items(6)
    with FaultServer(faults, sleep=2.0) as server:
        judge = OpenAIJudge("judge-model", base_url=server.url, api_key_env="PREFTUNE_TEST_NO_KEY", timeout=1.0,
                            max_retries=3, invalid_retries=1, **FAST)
        run = judge_pairs(judge, items, cache, concurrency=2)
        assert server.count == 20
        assert set(server.auth) == {None}  # no key set: no Authorization header at all
        assert {k: server.served[k] for k in faults.values()} == dict.fromkeys(faults.values(), 1) | {"garbage": 5}
        assert (run.calls, run.cache_hits, run.requests, run.retries) == (12, 0, 20, 8)
        assert run.invalid == 1 and run.invalid_judgments == 2 and run.errors == 0 and run.not_judged == 0
        assert [r["status"] for r in run.results] == ["judged"] * 5 + ["invalid"]
        assert [r["score"] for r in run.results] == [0.5] * 5 + [None]
        assert run.results[0]["verdicts"] == ["win", "loss"]
        summary = run.summary()
        assert (summary["wins"], summary["ties"], summary["losses"], summary["invalid"], summary["n"]) == (0, 5, 0, 1, 5)
        assert len(cache.read_text().splitlines()) == 12

        again = OpenAIJudge("judge-model", base_url=server.url, api_key_env="PREFTUNE_TEST_NO_KEY", **FAST)
        rerun = judge_pairs(again, items, cache, concurrency=2)
        assert server.count == 20  # zero new calls: everything came from the cache
        assert (rerun.calls, rerun.cache_hits, rerun.requests) == (0, 12, 0)
        assert rerun.results == run.results


def test_crash_resume_pays_only_for_what_was_lost(tmp_path):
    """A cache cut after 5 of 12 judgments, with a torn half-written line: the rerun skips the torn
    line, reuses the 5, and asks for exactly the other 7."""
    cache = tmp_path / "j.jsonl"
    items = _items(6, bad_last=False)
    with FaultServer({}) as server:
        judge_pairs(OpenAIJudge("m", base_url=server.url, **FAST), items, cache, concurrency=3)
        lines = cache.read_text().splitlines()
        cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
        before = server.count
        run = judge_pairs(OpenAIJudge("m", base_url=server.url, **FAST), items, cache, concurrency=3)
        assert server.count - before == 7 and run.calls == 7 and run.cache_hits == 5
        assert JudgmentCache(cache).skipped == 1 and len(JudgmentCache(cache).entries) == 12
        assert all(r["status"] == "judged" for r in run.results)


def test_api_key_sent_never_stored(tmp_path, monkeypatch):
    """The key goes out as a Bearer header, and appears in neither repr, cache keys nor the cache file."""
    secret = "sk-very-secret-value"
    monkeypatch.setenv("PREFTUNE_TEST_JUDGE_KEY", secret)
    cache = tmp_path / "c.jsonl"
    with FaultServer({}) as server:
        judge = OpenAIJudge("m", base_url=server.url + "/v1/", api_key_env="PREFTUNE_TEST_JUDGE_KEY", **FAST)
        judge_pairs(judge, _items(1, bad_last=False), cache)
        assert server.auth == [f"Bearer {secret}"] * 2
    assert secret not in repr(judge) and secret not in cache.read_text()
    assert secret not in cache_key(judge, "p", "a", "b")
    assert chat_completions_url("http://h:1/v1/") == chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"


def test_auth_failure_stops_the_run_without_leaking_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_TEST_JUDGE_KEY", "sk-leak-check")
    with FaultServer(dict.fromkeys(range(1, 100), "401")) as server:
        judge = OpenAIJudge("m", base_url=server.url, api_key_env="PREFTUNE_TEST_JUDGE_KEY", **FAST)
        with pytest.raises(PreftuneError, match="PREFTUNE_TEST_JUDGE_KEY") as e:
            judge_pairs(judge, _items(2, bad_last=False), tmp_path / "c.jsonl", concurrency=1)
    assert "sk-leak-check" not in str(e.value)


def test_unreachable_endpoint_is_an_error_not_a_loss(tmp_path):
    """Nothing listens on the port: after the retries the items are ``error`` (uncached, so a later run
    tries again), never losses."""
    with FaultServer({}) as server:
        url = server.url
    judge = OpenAIJudge("m", base_url=url, timeout=0.5, max_retries=1, **FAST)
    run = judge_pairs(judge, _items(2, bad_last=False), tmp_path / "c.jsonl")
    assert [r["status"] for r in run.results] == ["error", "error"] and run.errors == 2
    assert run.requests == 8 and run.retries == 4
    assert run.summary()["losses"] == 0 and run.summary()["n"] == 0
    assert not (tmp_path / "c.jsonl").read_text()


def test_max_calls_caps_new_judgments_and_never_counts_losses(tmp_path):
    """5 items, max_calls=5: items 0 and 1 take 4 calls; item 2 would need 2 more than the 1 left, so it
    and everything after are ``not_judged`` (no call made for them). A second run with max_calls=2
    reuses the 4 cached judgments and pays only for item 2."""
    cache = tmp_path / "c.jsonl"
    items = _items(5, bad_last=False)
    with FaultServer({}) as server:
        run = judge_pairs(OpenAIJudge("m", base_url=server.url, **FAST), items, cache, max_calls=5)
        assert server.count == 4 and run.calls == 4
        assert [r["status"] for r in run.results] == ["judged"] * 2 + ["not_judged"] * 3
        summary = run.summary()
        assert summary["not_judged"] == 3 and summary["losses"] == 0 and summary["n"] == 2
        more = judge_pairs(OpenAIJudge("m", base_url=server.url, **FAST), items, cache, max_calls=2)
        assert server.count == 6 and (more.calls, more.cache_hits) == (2, 4)
        assert [r["status"] for r in more.results] == ["judged"] * 3 + ["not_judged"] * 2


def test_rate_limit_spaces_the_calls(tmp_path):
    """10 judgments at 25 per second on 4 threads: the starts are 0.04 s apart, so >= 9 * 0.04 = 0.36 s."""
    with FaultServer({}) as server:
        start = time.monotonic()
        run = judge_pairs(OpenAIJudge("m", base_url=server.url, **FAST), _items(5, bad_last=False), None,
                          concurrency=4, requests_per_second=25)
        assert time.monotonic() - start >= 0.36 and run.calls == 10 and server.count == 10


# ---------------------------------------------------------------- the openai judge against preftune serve


@pytest.mark.e2e
def test_openai_judge_against_preftune_serve(tmp_path, monkeypatch):
    """The openai judge over real HTTP against ``preftune serve`` (uvicorn, tiny random Llama, key
    required). The random model cannot write 'Preferred: X', so every judgment is asked twice
    (invalid_retries=1) and stays invalid: 2 items -> 4 judgments -> 8 requests, 4 retries, 2 invalid
    items and no losses."""
    from preftune.embedded import tiny_llama
    from preftune.serve import background, create_app

    model, tok = tiny_llama(seed=0)
    monkeypatch.setenv("PREFTUNE_TEST_SERVE_KEY", "serve-key")
    with background(create_app(model, tok, "tiny", "serve-key", max_tokens_cap=8)) as url:
        judge = OpenAIJudge("tiny", base_url=url, api_key_env="PREFTUNE_TEST_SERVE_KEY", max_tokens=8,
                            invalid_retries=1, **FAST)
        run = judge_pairs(judge, _items(2, bad_last=False), tmp_path / "c.jsonl", concurrency=2)
    assert (run.calls, run.requests, run.retries, run.invalid_judgments) == (4, 8, 4, 4)
    assert run.invalid == 2 and [r["status"] for r in run.results] == ["invalid", "invalid"]
    summary = run.summary()
    assert (summary["losses"], summary["wins"], summary["invalid"], summary["n"]) == (0, 0, 2, 0)


def test_hf_judge_invalid_on_random_model(tmp_path):
    """A local random model as judge: greedy garbage -> invalid, counted, never a loss."""
    from preftune.embedded import tiny_llama

    judge = HFJudge("tiny", max_new_tokens=4, loaded=tiny_llama(seed=0))
    with pytest.raises(InvalidVerdict):
        judge.judge("q", "a", "b", {})
    run = judge_pairs(judge, _items(1, bad_last=False), tmp_path / "c.jsonl")
    assert run.invalid == 1 and run.summary()["losses"] == 0


# ---------------------------------------------------------------- the rule judge, the cap, the rate limit


def test_judges_table_and_config():
    assert set(JUDGES) == {"openai", "hf", "rule"}
    assert isinstance(make_judge(WinrateConfig(judge="rule")), RuleJudge)
    assert isinstance(make_judge(WinrateConfig(judge="rule")), Judge)
    with pytest.raises(PreftuneError, match="judge_model"):
        make_judge(WinrateConfig(judge="openai"))
    judge = make_judge(WinrateConfig(judge="openai", judge_model="gpt-4", base_url="http://127.0.0.1:9",
                                     prompt="summarization"))
    assert judge.template == TEMPLATES["summarization"] and judge.url == "http://127.0.0.1:9/v1/chat/completions"
    custom = "Pick one. {prompt} / {response_a} / {response_b}"
    judge = make_judge(WinrateConfig(judge="openai", judge_model="m", judge_template=custom))
    assert judge.template == custom


def test_items_are_checked():
    with pytest.raises(DataError, match="row 2.*reference"):
        judge_pairs(RuleJudge(), [{"prompt": "p", "model": "m", "reference": "r"}, {"prompt": "p", "model": "m"}])


SYNTH = [  # (meta, model response, reference response) -> expected model-view score
    ({"check": "number", "answer": "19", "category": "arithmetic"}, "7 + 12 = 19", "It is 20.", 1.0),
    ({"check": "number", "answer": "4", "category": "arithmetic"}, "The answer is 5", "The answer is 4", 0.0),
    ({"check": "contains", "answer": "Canberra", "category": "facts"}, "It is Canberra.", "Canberra", 0.5),
    ({"category": "facts"}, "anything", "something", None),
    ({"check": "uppercase", "answer": "Paris", "category": "format"}, "THE CAPITAL IS PARIS", "the capital is paris",
     1.0),
]


def test_rule_judge_verdicts():
    """Correct beats incorrect in either position; both right or both wrong tie; no checkable answer is
    invalid."""
    judge = RuleJudge()
    meta = {"check": "number", "answer": "19"}
    assert judge.judge("q", "19", "20", meta) == "A" and judge.judge("q", "20", "19", meta) == "B"
    assert judge.judge("q", "19", "= 19", meta) == "tie" and judge.judge("q", "1", "2", meta) == "tie"
    with pytest.raises(InvalidVerdict):
        judge.judge("q", "19", "20", {"category": "x"})


def test_rule_judge_pairs_on_synthetic_meta(tmp_path):
    """Scores 1, 0, 0.5, invalid, 1 -> wins 2, ties 1, losses 1, invalid 1, n 4, winrate 2.5/4 = 0.625;
    per category: arithmetic 1/2, facts 1 tie of 1 (0.5), format 1/1. A second run is all cache."""
    items = [{"prompt": f"task {i}", "model": m, "reference": r, "meta": meta, "category": meta["category"]}
             for i, (meta, m, r, _) in enumerate(SYNTH)]
    cache = tmp_path / "rule.jsonl"
    run = judge_pairs(RuleJudge(), items, cache, concurrency=2)
    assert run.scores == [s for *_, s in SYNTH]
    assert [r["status"] for r in run.results] == ["judged"] * 3 + ["invalid", "judged"]
    summary = run.summary()
    assert {k: summary[k] for k in ("wins", "ties", "losses", "invalid", "n")} == \
        {"wins": 2, "ties": 1, "losses": 1, "invalid": 1, "n": 4}
    assert summary["winrate"] == pytest.approx(0.625)
    assert {c: v["winrate"] for c, v in summary["by_category"].items()} == \
        {"arithmetic": 0.5, "facts": 0.5, "format": 1.0}
    assert run.calls == 10 and run.invalid_judgments == 2
    again = judge_pairs(RuleJudge(), items, cache)
    assert (again.calls, again.cache_hits, again.requests) == (0, 10, 0) and again.results == run.results


# ---------------------------------------------------------------- the preflight (before any training)


def test_preflight_names_the_setting_that_stops_the_judge(tmp_path, monkeypatch):
    from preftune.eval.judges import JudgeUnavailable, preflight

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    preflight(WinrateConfig(judge="rule"))  # nothing to reach
    with pytest.raises(JudgeUnavailable, match="eval.winrate.judge_model is not set"):
        preflight(WinrateConfig(judge="openai"))
    with pytest.raises(JudgeUnavailable, match=r"eval.winrate.api_key_env: \$OPENAI_API_KEY is not set"):
        preflight(WinrateConfig(judge="openai", judge_model="gpt-4"))
    with FaultServer({}) as server:
        url = server.url
    with pytest.raises(JudgeUnavailable, match="eval.winrate.base_url: the judge 'm' at .* cannot judge"):
        preflight(WinrateConfig(judge="openai", judge_model="m", base_url=url))
    with FaultServer({}) as server:
        preflight(WinrateConfig(judge="openai", judge_model="m", base_url=server.url))
        assert server.served["ok"] == 1


def test_pipeline_with_an_unreachable_judge_stops_before_training(tmp_path, tiny_model_dir):
    from preftune.config.validate import config_from_dict
    from preftune.eval.judges import JudgeUnavailable
    from preftune.pipeline import run_pipeline

    with FaultServer({}) as server:
        url = server.url
    cfg = config_from_dict({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "run"),
                            "eval": {"winrate": {"judge": "openai", "judge_model": "m", "base_url": url}}})
    with pytest.raises(JudgeUnavailable, match="eval.winrate.base_url"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "dpo").exists()


# ---------------------------------------------------------------- the study's judged prompts


def _hh_folder(root, n=6):
    """A local copy of Anthropic/hh-rlhf's layout: one folder per subset, train and test JSONL."""
    for sub in ("helpful-base", "harmless-base", "red-team-attempts"):
        (root / sub).mkdir(parents=True)
        for split in ("train", "test"):
            with open(root / sub / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    prompt = f"\n\nHuman: {sub} {split} question {i}?\n\nAssistant:"
                    chosen = "not a transcript" if i == 0 else prompt + " Yes."
                    f.write(json.dumps({"chosen": chosen, "rejected": prompt + f" No ({i}).", "id": i}) + "\n")
    return root


def test_hh_categories_are_drawn_from_helpful_and_harmless_test_splits(tmp_path):
    """Per category: ``per_category`` rows of that subset's test split, a seeded draw (another seed,
    another draw), in split order; a record the hh format refuses (row 0: no Assistant turn) is passed over."""
    from preftune.eval.prompts import hh_category_rows

    folder = _hh_folder(tmp_path / "hh")
    rows = hh_category_rows(str(folder), "test", 3, seed=0)
    assert [r.meta["category"] for r in rows] == ["helpful"] * 3 + ["harmless"] * 3
    texts = [r.prompt[0]["content"] for r in rows]
    assert all(t.startswith("helpful-base test") for t in texts[:3]) and all("harmless-base test" in t for t in texts[3:])
    nums = [r.meta["id"] for r in rows[:3]]
    assert 0 not in nums and nums == sorted(nums)
    assert hh_category_rows(str(folder), "test", 3, seed=0) == rows
    assert [r.prompt for r in hh_category_rows(str(folder), "test", 3, seed=1)] != [r.prompt for r in rows]
    assert len(hh_category_rows(str(folder), "test", 50, seed=0)) == 10  # 5 usable rows in each


def test_suite_judges_hh_by_category(tmp_path, monkeypatch, tiny_model_dir):
    """``eval.winrate.categories: hh`` on HH data: the win-rate is reported per helpful / harmless."""
    from preftune.config.validate import config_from_dict
    from preftune.eval.suite import evaluate_models

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    folder = _hh_folder(tmp_path / "hh")
    cfg = config_from_dict({"model": str(tiny_model_dir), "data": {"source": str(folder), "format": "hh", "on_error": "skip"},
                            "eval": {"rewards": False, "kl": False, "tasks": [], "heldout": {"enabled": False},
                                     "winrate": {"categories": "hh", "per_category": 2, "max_new_tokens": 2}}})
    with FaultServer({}) as server:
        cfg.eval.winrate.judge, cfg.eval.winrate.judge_model, cfg.eval.winrate.base_url = "openai", "m", server.url
        res = evaluate_models(cfg, {"base": str(tiny_model_dir)}, tmp_path / "eval")
    by_cat = res["models"]["base"]["winrate"]["by_category"]
    assert sorted(by_cat) == ["harmless", "helpful"] and all(c["n"] == 2 for c in by_cat.values())

"""Pairwise judges behind one interface (``openai`` endpoint, local ``hf`` model, programmatic ``rule``),
and ``judge_pairs``: both-order judging with an on-disk cache, concurrency, rate limit and a call
cap. Prompts live in ``prompts.py``, the statistics in ``stats.py``."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from preftune.errors import DataError, MissingExtraError, PreftuneError
from preftune.eval import stats
from preftune.eval.checks import check
from preftune.eval.generate import generate
from preftune.eval.prompts import get_template, parse_verdict, render
from preftune.model import load_for_inference

RAW_VERDICTS = ("A", "B", "tie", "invalid")
# (model shown as A?) -> the judge's raw verdict -> the verdict from the model's point of view
TO_MODEL = {
    True: {"A": "win", "B": "loss", "tie": "tie", "invalid": "invalid", "error": "error"},
    False: {"A": "loss", "B": "win", "tie": "tie", "invalid": "invalid", "error": "error"},
}
# (response A correct?, response B correct?) -> verdict, for the rule judge
RULE_VERDICTS = {(True, False): "A", (False, True): "B", (True, True): "tie", (False, False): "tie"}
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class InvalidVerdict(PreftuneError):
    """The judge's answer named no winner (after any retries). Counted as ``invalid``, never a loss."""

    def __init__(self, message: str, text: str = ""):
        super().__init__(message)
        self.text = text[:500]


class JudgeUnavailable(PreftuneError):
    """The judge could not be reached (timeouts, connection errors, 429, 5xx) after all retries."""


class Tally:
    """Thread-safe counters a judge keeps: ``requests`` (attempts sent), ``retries``, ``invalid_replies``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts.get(key, 0)


@runtime_checkable
class Judge(Protocol):
    """One pairwise judge. ``name``, ``model`` and ``template`` identify its judgments in the cache."""

    name: str
    model: str
    template: str
    tally: Tally

    def judge(self, prompt: Any, a: str, b: str, meta: dict) -> str:
        """``"A"``, ``"B"`` or ``"tie"``; raises InvalidVerdict when the answer names no winner."""
        ...


# ---------------------------------------------------------------- openai: any OpenAI-compatible endpoint


def chat_completions_url(base_url: str) -> str:
    """``http://host:port``, ``http://host:port/v1`` or ``.../v1/`` -> ``.../v1/chat/completions``."""
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


class OpenAIJudge:
    """A judge behind any OpenAI-compatible ``/v1/chat/completions`` (GPT-4, vLLM, ``preftune serve``).

    The API key is read once from the environment variable ``api_key_env`` and kept out of repr,
    logs, errors and cache keys; when the variable is unset no Authorization header is sent.
    Requests go through the official ``openai`` client. Timeouts, connection errors, malformed bodies, 429 and 5xx are retried up to ``max_retries`` times
    with exponential backoff ``backoff_base * 2**attempt`` (jittered, capped at ``backoff_max``;
    a 429's Retry-After is honoured up to the cap). An answer with no verdict is asked again up to
    ``invalid_retries`` times, then raises InvalidVerdict. Other 4xx (bad key, unknown model) stop
    the run with a PreftuneError."""

    name = "openai"

    def __init__(self, model: str, base_url: str = DEFAULT_BASE_URL, api_key_env: str = "OPENAI_API_KEY",
                 template: str = "dialogue", timeout: float = 60.0, max_retries: int = 5,
                 invalid_retries: int = 2, backoff_base: float = 1.0, backoff_max: float = 30.0,
                 max_tokens: int = 256, temperature: float = 0.0):
        try:
            from openai import OpenAI, omit  # here (and in _complete): openai is the optional `eval` extra
        except ImportError:
            raise MissingExtraError("openai", "eval", "the openai judge") from None

        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.template = get_template(template)
        self.url = chat_completions_url(base_url)
        self.max_retries, self.invalid_retries = max_retries, invalid_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.max_tokens, self.temperature = max_tokens, temperature
        self.tally = Tally()
        self.__key = os.environ.get(api_key_env) or None
        # The official client sends the request, applies the timeout and raises typed errors; its own
        # retries are off (max_retries=0) and the loop in _complete retries instead, because the SDK's
        # backoff is fixed (0.5 s doubling to 8 s, not settable per client), it reports no attempt
        # counts (the run's `requests`/`retries`), it hands back a 200 with a non-JSON body as text
        # without retrying it, and it ignores `Retry-After: 0`; tests/test_judges.py's fault server
        # checks each of these.
        # Without a key no Authorization header is sent (the SDK insists on a key, so it gets a placeholder
        # and the header is omitted).
        self._client = OpenAI(api_key=self.__key or "no-key", base_url=self.url.removesuffix("/chat/completions"),
                              timeout=timeout, max_retries=0)
        self._headers = None if self.__key else {"Authorization": omit}

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def close(self) -> None:
        self._client.close()

    def judge(self, prompt: Any, a: str, b: str, meta: dict) -> str:
        text = render(self.template, prompt, a, b)
        reply = ""
        for attempt in range(self.invalid_retries + 1):
            if attempt:
                self.tally.add("retries")
            reply = self._complete(text)
            verdict = parse_verdict(reply)
            if verdict is not None:
                return verdict
            self.tally.add("invalid_replies")
        raise InvalidVerdict(f"judge {self.model!r} named no winner in {self.invalid_retries + 1} answers", reply)

    def _complete(self, text: str) -> str:
        """The judge's reply to one user message, retrying transient failures."""
        import openai

        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.tally.add("retries")
            self.tally.add("requests")
            retry_after = 0.0
            try:
                r = self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": text}], max_tokens=self.max_tokens,
                    temperature=self.temperature, extra_headers=self._headers)
            except openai.APIConnectionError as e:  # timeouts, refused or dropped connections
                failure = type(e).__name__
            except openai.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    raise PreftuneError(self._fatal_message(e.response)) from None
                failure = f"HTTP {e.status_code}"
                retry_after = _retry_after(e.response)
            else:
                content = _reply_content(r)
                if content is not None:
                    return content
                failure = "a malformed response body"
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise JudgeUnavailable(f"judge endpoint {self.url} failed {self.max_retries + 1} times (last: {failure})")

    def _delay(self, attempt: int, retry_after: float) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + 0.5 * random.random())
        return max(delay, min(retry_after, self.backoff_max))

    def _fatal_message(self, r) -> str:
        detail = r.text[:300]
        if self.__key:
            detail = detail.replace(self.__key, "***")
        hint = {401: f"set the environment variable {self.api_key_env} to a valid key",
                403: f"the key in {self.api_key_env} may not access this model",
                404: "check base_url and judge_model"}.get(r.status_code, "check the judge settings")
        return f"judge endpoint {self.url} answered HTTP {r.status_code}: {detail}; {hint}"


def _reply_content(r) -> str | None:
    """The reply's text, or None when the body was not a chat completion (the SDK hands back a
    non-JSON body as a plain string)."""
    try:
        content = r.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after(r) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


# ---------------------------------------------------------------- hf: a local transformers model


class HFJudge:
    """A local transformers model as the judge, with the same prompt, decoding greedily.

    Greedy decoding answers a prompt the same way every time, so an invalid answer is not retried.
    Calls are serialised with a lock; the model loads on first use (or pass ``loaded=(model, tok)``)."""

    name = "hf"

    def __init__(self, model: str, template: str = "dialogue", max_new_tokens: int = 64,
                 loaded: tuple | None = None):
        self.model, self.template, self.max_new_tokens = model, get_template(template), max_new_tokens
        self.tally = Tally()
        self._loaded = loaded
        self._lock = threading.Lock()

    def judge(self, prompt: Any, a: str, b: str, meta: dict) -> str:
        text = render(self.template, prompt, a, b)
        with self._lock:
            if self._loaded is None:
                self._loaded = load_for_inference(self.model)
            lm, tok = self._loaded
            self.tally.add("requests")
            (reply,) = generate(lm, tok, [text], self.max_new_tokens, temperature=0.0, progress=False)
        verdict = parse_verdict(reply)
        if verdict is None:
            self.tally.add("invalid_replies")
            raise InvalidVerdict(f"judge model {self.model!r} named no winner", reply)
        return verdict


# ---------------------------------------------------------------- rule: programmatic answer checks


class RuleJudge:
    """Judges rows whose ``meta`` carries a checkable answer with ``preftune.eval.checks.check``:
    the correct response beats the incorrect one; both correct or both wrong is a tie; a row with no
    checkable answer is invalid."""

    name = "rule"
    model = "checks"
    template = ""
    local = True  # free and instant: no rate limit

    def __init__(self):
        self.tally = Tally()

    def judge(self, prompt: Any, a: str, b: str, meta: dict) -> str:
        self.tally.add("requests")
        correct = (check(meta, a), check(meta, b))
        if None in correct:
            raise InvalidVerdict(f"no checkable answer in meta (keys: {sorted(meta or {})})")
        return RULE_VERDICTS[correct]


# ---------------------------------------------------------------- reward_model: a local scalar reward model


class RewardModelJudge:
    """A reward model as the judge: the response with the higher reward wins, equal rewards tie (counted
    as half by the statistics, as every judge's ties). A reward model from ``preftune rm`` scores the
    ids it trained on; any other one-label classifier scores the chat-templated text (rounds.py's
    convention). Deterministic, so both orders agree; each text is scored once. An empty response is
    scored (prompt and EOS alone); one the reward model cannot read (a prompt beyond ``data.max_length``)
    makes the pair invalid, never a loss."""

    name = "reward_model"
    template = ""
    local = True  # free and instant: no rate limit

    def __init__(self, path: str):
        from preftune.model import content_digest, resolve_model

        self.path = path
        self.model = f"{resolve_model(path)}@{content_digest(resolve_model(path))[:16]}"  # retraining changes it
        self.tally = Tally()
        self._loaded = None
        self._rewards: dict[str, float | None] = {}
        self._lock = threading.Lock()

    def reward(self, prompt: Any, response: str) -> float | None:
        from preftune.reward import load_reward_model, score_responses

        key = json.dumps([prompt, response], ensure_ascii=False)
        with self._lock:
            if key not in self._rewards:
                if self._loaded is None:
                    self._loaded = load_reward_model(self.path, "eval.winrate.judge_model")
                self.tally.add("requests")
                self._rewards[key] = score_responses(self._loaded, [prompt], [response], 1)[0]
            return self._rewards[key]

    def judge(self, prompt: Any, a: str, b: str, meta: dict) -> str:
        ra, rb = self.reward(prompt, a), self.reward(prompt, b)
        if ra is None or rb is None:
            raise InvalidVerdict("the reward model could not score a response (its prompt is beyond data.max_length)")
        return "A" if ra > rb else "B" if rb > ra else "tie"


def _need(value: str | None, key: str, judge: str) -> str:
    if not value:
        raise PreftuneError(f"eval.winrate.{key} must be set for the {judge!r} judge")
    return value


def _template(w) -> str:
    return w.judge_template or w.prompt


JUDGES: dict[str, Callable[[Any], Judge]] = {
    "rule": lambda w: RuleJudge(),
    "openai": lambda w: OpenAIJudge(model=_need(w.judge_model, "judge_model", "openai"),
                                    base_url=w.base_url or DEFAULT_BASE_URL, api_key_env=w.api_key_env,
                                    template=_template(w)),
    "hf": lambda w: HFJudge(model=_need(w.judge_model, "judge_model", "hf"), template=_template(w)),
    "reward_model": lambda w: RewardModelJudge(_need(w.judge_model, "judge_model", "reward_model")),
}
"""``eval.winrate.judge`` name -> the judge built from a WinrateConfig: THE judge registry (the config
checks its ``judge`` against it)."""


def preflight(w) -> None:
    """Stop before any training when the configured LLM judge cannot judge: the ``openai`` judge's
    model is unset, its API key is missing for the default (OpenAI) endpoint, or one short request does
    not come back with a verdict, or the ``reward_model`` judge's model is not there. Raises JudgeUnavailable
    naming the setting to fix; other judges pass."""
    if w.enabled and w.judge == "reward_model" and w.judge_model:
        from preftune.model import resolve_model

        try:
            resolve_model(w.judge_model)
        except PreftuneError as e:
            raise JudgeUnavailable(f"eval.winrate.judge_model: the reward model cannot be loaded ({e}); train it "
                                   "first (`preftune rm`) or point eval.winrate.judge_model at one") from None
        return
    if not w.enabled or w.judge != "openai":
        return
    if not w.judge_model:
        raise JudgeUnavailable("eval.winrate.judge_model is not set: the openai judge needs the judge's model name "
                               "(e.g. gpt-4, or the name a local OpenAI-compatible server serves)")
    if not w.base_url and not os.environ.get(w.api_key_env):
        raise JudgeUnavailable(f"eval.winrate.api_key_env: ${w.api_key_env} is not set, and eval.winrate.base_url is "
                               f"unset (the default is {DEFAULT_BASE_URL}); export the key, or point "
                               "eval.winrate.base_url at an OpenAI-compatible server (vLLM, `preftune serve`)")
    judge = OpenAIJudge(model=w.judge_model, base_url=w.base_url or DEFAULT_BASE_URL, api_key_env=w.api_key_env,
                        template=_template(w), timeout=20.0, max_retries=1, invalid_retries=0, backoff_base=0.5)
    try:
        judge.judge("Say hello.", "Hello!", "", {})
    except (JudgeUnavailable, InvalidVerdict, PreftuneError) as e:
        raise JudgeUnavailable(f"eval.winrate.base_url: the judge {w.judge_model!r} at {judge.url} cannot judge ({e}); "
                               "start the server or fix eval.winrate.base_url / judge_model / api_key_env "
                               "before training") from None
    finally:
        judge.close()


def make_judge(w) -> Judge:
    """The judge a ``WinrateConfig`` asks for."""
    if w.judge not in JUDGES:
        raise PreftuneError(f"unknown judge {w.judge!r}; choose one of {sorted(JUDGES)}")
    return JUDGES[w.judge](w)


# ---------------------------------------------------------------- the cache and the rate limit


def cache_key(judge: Judge, prompt: Any, first: str, second: str) -> str:
    """sha256 over judge name, judge model, template, prompt and the two responses in shown order."""
    blob = json.dumps([judge.name, judge.model, judge.template, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Judgments on disk: an append-only JSONL, one ``{"key", "verdict", "judge", "model"}`` a line,
    flushed per line so a crash loses at most the line being written (a torn last line is skipped on
    load and counted in ``skipped``). ``None`` as path keeps it in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, str] = {}
        self.skipped = 0
        self._lock = threading.Lock()
        self._file = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        self._load(text)
        self._file = open(self.path, "a", encoding="utf-8")
        if text and not text.endswith("\n"):
            self._file.write("\n")  # do not glue a new record onto a torn one

    def _load(self, text: str) -> None:
        for line in text.splitlines():
            try:
                rec = json.loads(line)
                key, verdict = rec["key"], rec["verdict"]
            except (ValueError, KeyError, TypeError):
                self.skipped += bool(line.strip())
                continue
            if verdict in RAW_VERDICTS:
                self.entries[key] = verdict

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: str, judge: Judge) -> None:
        with self._lock:
            self.entries[key] = verdict
            if self._file is not None:
                rec = {"key": key, "verdict": verdict, "judge": judge.name, "model": judge.model}
                self._file.write(json.dumps(rec) + "\n")
                self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RateLimiter:
    """At most ``per_second`` starts per second across threads (evenly spaced slots); None = no limit."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


# ---------------------------------------------------------------- judge_pairs


@dataclass
class JudgeRun:
    """The outcome of :func:`judge_pairs`.

    ``results`` has one dict per item, in order: ``index``, ``category``, ``status`` (``judged``,
    ``invalid``, ``error`` when the endpoint stayed unreachable, ``not_judged`` past ``max_calls``),
    ``score`` (1 / 0.5 / 0, None unless judged), ``verdicts`` (model's view, model shown first then
    second), ``len_model``, ``len_reference`` (characters). Counts: ``calls`` new judgments made,
    ``cache_hits``, ``requests`` and ``retries`` as the judge reports them, ``invalid`` items,
    ``invalid_judgments`` single-order judgments that stayed invalid, ``errors``, ``not_judged``."""

    results: list[dict]
    calls: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    invalid_judgments: int = 0

    def _n(self, status: str) -> int:
        return sum(1 for r in self.results if r["status"] == status)

    @property
    def invalid(self) -> int:
        return self._n("invalid")

    @property
    def errors(self) -> int:
        return self._n("error")

    @property
    def not_judged(self) -> int:
        return self._n("not_judged")

    @property
    def scores(self) -> list[float | None]:
        """Per-item scores aligned with the items (None: invalid, error or not judged)."""
        return [r["score"] for r in self.results]

    def summary(self) -> dict:
        """``stats.summarize`` over judged and invalid items, plus the run's counts."""
        done = [r for r in self.results if r["status"] in ("judged", "invalid")]
        out = stats.summarize([r["score"] for r in done], [r["category"] for r in done],
                              [r["len_model"] for r in done], [r["len_reference"] for r in done])
        out.update(not_judged=self.not_judged, errors=self.errors, calls=self.calls, cache_hits=self.cache_hits,
                   requests=self.requests, retries=self.retries, invalid_judgments=self.invalid_judgments)
        return out


ITEM_FIELDS = ("prompt", "model", "reference")


def _check_items(items: list[dict]) -> None:
    for i, item in enumerate(items):
        for f in ITEM_FIELDS:
            if f not in item:
                raise DataError("judge item lacks a field", file="judge items", row=i + 1, field=f)
        for f in ("model", "reference"):
            if not isinstance(item[f], str):
                raise DataError(f"must be a string, got {type(item[f]).__name__}", file="judge items", row=i + 1,
                                field=f)


def _orders(judge: Judge, item: dict) -> list[tuple[bool, str, str, str]]:
    """(model shown first?, key, first, second) for both orders."""
    pairs = [(True, item["model"], item["reference"]), (False, item["reference"], item["model"])]
    return [(mf, cache_key(judge, item["prompt"], a, b), a, b) for mf, a, b in pairs]


def _judge_one(judge: Judge, limiter: RateLimiter, cache: JudgmentCache, key: str, item: dict, first: str,
               second: str) -> str:
    """One judgment, written to the cache by the worker itself (an interrupt keeps what finished)."""
    limiter.wait()
    try:
        verdict = judge.judge(item["prompt"], first, second, item.get("meta") or {})
    except InvalidVerdict:
        verdict = "invalid"
    except JudgeUnavailable:
        return "error"  # not cached: the next run tries again
    if verdict not in RAW_VERDICTS:
        raise PreftuneError(f"judge {judge.name!r} returned {verdict!r}; a judge must return 'A', 'B' or 'tie'")
    cache.put(key, verdict, judge)
    return verdict


def _plan(judge, items, cache, max_calls):
    """Which judgments to make: item by item, both orders, until ``max_calls`` new ones are reserved."""
    tasks: dict[str, tuple[dict, str, str]] = {}
    planned: list[bool] = []
    hits = 0
    for item in items:
        orders = _orders(judge, item)
        missing = [(k, a, b) for _, k, a, b in orders if cache.get(k) is None and k not in tasks]
        if max_calls is not None and len(tasks) + len(missing) > max_calls:
            planned.append(False)
            continue
        planned.append(True)
        hits += sum(1 for _, k, _, _ in orders if cache.get(k) is not None)
        tasks.update({k: (item, a, b) for k, a, b in missing})
    return tasks, planned, hits


def _run_tasks(judge, tasks, cache, concurrency, requests_per_second, progress) -> dict[str, str]:
    limiter = RateLimiter(None if getattr(judge, "local", False) else requests_per_second)
    outcomes: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(_judge_one, judge, limiter, cache, key, *task): key for key, task in tasks.items()}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"judge ({judge.name})",
                            disable=not progress):
                outcomes[futures[fut]] = fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return outcomes


def _result(index: int, item: dict, verdicts: list[str] | None) -> dict:
    out = {"index": index, "category": item.get("category", "all"), "status": "not_judged", "score": None,
           "verdicts": None, "len_model": len(item["model"]), "len_reference": len(item["reference"])}
    if verdicts is None:
        return out
    out["verdicts"] = verdicts
    if "error" in verdicts:
        out["status"] = "error"
        return out
    out["score"] = stats.both_order_score(*verdicts)
    out["status"] = "invalid" if out["score"] is None else "judged"
    return out


def judge_pairs(judge: Judge, items: list[dict], cache_path: str | Path | None = None, concurrency: int = 4,
                requests_per_second: float | None = None, max_calls: int | None = None,
                progress: bool = False) -> JudgeRun:
    """Judge every item in BOTH orders (the model's response shown as A, then as B) and score it.

    ``items``: dicts with ``prompt`` (text or messages), ``model`` (the model's response),
    ``reference`` (the dataset's chosen response, or another model's), optional ``meta`` and
    ``category``. Verdicts are mapped to the model's perspective and scored by
    ``stats.both_order_score``. Judgments already in the JSONL cache at ``cache_path`` are reused (a
    second run makes zero new calls), new ones are appended as they arrive; an ``invalid`` verdict is
    cached too (it cost a call), an unreachable endpoint is not. ``max_calls`` caps the new judgments
    (one per order; transport and invalid retries inside a judgment are reported as ``retries`` but
    not capped): items past the cap are ``not_judged``, never losses. Calls run on ``concurrency``
    threads, started at most ``requests_per_second`` times a second."""
    _check_items(items)
    cache = JudgmentCache(cache_path)
    tally = getattr(judge, "tally", None) or Tally()
    before = {k: tally.get(k) for k in ("requests", "retries")}
    try:
        tasks, planned, hits = _plan(judge, items, cache, max_calls)
        outcomes = _run_tasks(judge, tasks, cache, concurrency, requests_per_second, progress)
    finally:
        cache.close()
    results = []
    for i, (item, go) in enumerate(zip(items, planned)):
        views = [TO_MODEL[mf][outcomes.get(k) or cache.get(k)] for mf, k, _, _ in _orders(judge, item)] if go else None
        results.append(_result(i, item, views))
    return JudgeRun(
        results=results, calls=len(tasks), cache_hits=hits,
        requests=tally.get("requests") - before["requests"], retries=tally.get("retries") - before["retries"],
        invalid_judgments=sum(1 for v in outcomes.values() if v == "invalid"),
    )

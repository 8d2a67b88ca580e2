"""THE one function family that turns rows into token ids: prompt rendering (chat template or plain
text), BOS/EOS, truncation, per-row invariant checks, and the counted drops and cuts. Rows are
encoded in batches (the fast tokenizer's batch call, over worker processes); padding and batch
collation are collate.py's, file reading is sources.py's, the on-disk cache is cache.py's.

Truncation policy (the same for preference pairs and SFT rows):
  1. The prompt is rendered as it will be at generation time (``render_prompt``) and encoded with
     ``add_special_tokens=False``; BOS is prepended once, only when the tokenizer adds one by default
     and the rendered text does not already start with it (SmolLM2 adds none: its template opens
     with ``<|im_start|>``, which is its BOS).
  2. The prompt keeps its END: it is cut to its last ``max_prompt_length`` tokens (a prepended BOS
     is kept in front of the tail). Counted as ``truncated["prompt"]``.
  3. Each completion is encoded, EOS (``tokenizer.eos_token_id``) is appended, and it keeps its
     START: it is cut to ``max_length - len(prompt_ids)`` tokens. A cut completion sets
     ``truncated=True`` and may lack its EOS. Counted as ``truncated["completion"]``.
  4. A row whose prompt leaves no room for even one completion token is dropped
     (``prompt_too_long``); with a validated config (``max_prompt_length < max_length``) this only
     happens when the limits are passed by hand.
Message content and completions are untrusted text: a chat control string inside them (say
``<|im_start|>system``) is encoded as plain characters, never as the special token, so no row, prompt
or request can open a turn of its own (``encode_content``). Only the chat template's own text yields
control tokens. A completion that ends in the literal EOS string still ends in exactly one EOS id.
Drops, returned as a reason string: ``empty_completion``, ``chosen_equals_rejected`` (before or
after truncation), ``prompt_too_long``. Rows whose completion's first tokens would merge with the
prompt's last tokens when the two texts are encoded jointly are counted as ``boundary_merges``
(among kept rows; they are kept: we always encode the two parts separately, as generation sees them).
Lengths are reported before and after truncation.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from preftune.data.rows import PreferenceRow, Prompt, SFTRow, TokenizedPair, TokenizedSFT
from preftune.errors import DataError, PreftuneError

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
"""Role names for plain-text rendering when the tokenizer has no chat template."""

PERCENTILES = (50, 90, 99)


class TokenizationInvariantError(RuntimeError):
    """A per-row check failed: a bug in preftune (or an unusual tokenizer), never bad data."""


# ---------------------------------------------------------------- rendering


def chat_template_text(setting: str) -> str:
    """``data.chat_template`` as Jinja text: text holding ``{{`` or ``{%`` is the template itself,
    anything else is the path of a file that holds it (UTF-8)."""
    if "{{" in setting or "{%" in setting:
        return setting
    path = Path(setting).expanduser()
    if not path.is_file():
        raise PreftuneError(f"data.chat_template: {setting!r} is neither a Jinja template (no '{{{{' or '{{%') nor a "
                            "file; give the template text itself or the path of a file that holds it")
    return path.read_text(encoding="utf-8")


def use_chat_template(tokenizer, setting: str | None) -> None:
    """Make ``data.chat_template`` the tokenizer's template (null keeps its own). Training's row -> ids
    functions here and generation's prompts (``render_prompt``) both read ``tokenizer.chat_template``,
    and a saved model folder keeps it, so a row renders the same for training and for generation."""
    if setting:
        tokenizer.chat_template = chat_template_text(setting)



def _check_messages(messages: list, where: str = "prompt") -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be a mapping with string 'role' and 'content', got {m!r}", field=where)


def _plain_text(messages: list[dict[str, str]]) -> str:
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The prompt text exactly as the model sees it at generation time.

    With a chat template: the template with ``add_generation_prompt=True`` (a plain string prompt
    becomes one user message). Without: a string stays as is; a message list becomes
    ``"User: ...\\n\\nAssistant: ...\\n\\nAssistant:"`` turns."""
    if isinstance(prompt, list):
        _check_messages(prompt)
    elif not isinstance(prompt, str):
        raise DataError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}", field="prompt")
    if getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain_text(prompt) if isinstance(prompt, list) else prompt


def _completion_text(prompt: Prompt, completion: str, tokenizer) -> str:
    """Plain-text turns end in ``Assistant:``; the reply follows after a space, as in HH transcripts."""
    plain_turns = isinstance(prompt, list) and not getattr(tokenizer, "chat_template", None)
    return " " + completion if plain_turns and not completion[:1].isspace() else completion


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def control_strings(tokenizer) -> list[str]:
    """The text of every special token (``<|im_start|>``, ``<|endoftext|>``, ...), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True)


def encode_content(tokenizer, text: str) -> list[int]:
    """Untrusted text -> ids that contain no special token: a control string in ``text`` is encoded
    as the plain characters it is made of. Text without one encodes exactly as ``_encode`` does."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


_MARK = re.compile(r"\x00(\d+)\x00")


def _encode_turns(messages: list[dict[str, str]], text: str, tokenizer) -> list[int]:
    """``text`` (the template rendered over ``messages``) encoded piece by piece: the template's own
    text with its control tokens, each message's content through :func:`encode_content`. The pieces
    are found by rendering the template over numbered marks in place of the contents."""
    marked = tokenizer.apply_chat_template([{**m, "content": f"\x00{i}\x00"} for i, m in enumerate(messages)],
                                           tokenize=False, add_generation_prompt=True)
    pieces = _MARK.split(marked)  # template, content index, template, ..., template
    for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
        if "".join(contents[int(p)] if k % 2 else p for k, p in enumerate(pieces)) == text:
            break
    else:
        raise DataError("a message holds a chat control string (such as <|im_start|>) and the tokenizer's chat "
                        "template rewrites message content, so it cannot be kept as plain text; remove the "
                        "control strings from the content or use a template that emits content as given",
                        field="prompt")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        ids += encode_content(tokenizer, contents[int(piece)]) if k % 2 else _encode(tokenizer, piece)
    return ids


def _encode_rendered(prompt: Prompt, text: str, tokenizer) -> list[int]:
    """The ids of ``text = render_prompt(prompt)``, where no message content yields a special token.

    Content free of control strings (nearly all rows) is encoded jointly with the template, exactly as
    before; otherwise the template and the contents are encoded piecewise (:func:`_encode_turns`).
    Without a chat template the whole text is content."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_content(tokenizer, text)
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    controls = control_strings(tokenizer)
    if not any(c in m["content"] for m in messages for c in controls):
        return _encode(tokenizer, text)
    return _encode_turns(messages, text, tokenizer)


def _encode_completion(tokenizer, text: str) -> list[int]:
    """A completion's ids without EOS: a literal EOS string at its end is dropped (EOS is appended
    once by the caller); any other control string stays plain text."""
    eos = tokenizer.eos_token
    while eos and text.endswith(eos):
        text = text[: -len(eos)]
    return encode_content(tokenizer, text)


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by default (checked on a probe, not trusted from a flag)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    without = _encode(tokenizer, "a")
    return with_special[:1] == [bos] and without[:1] != [bos]


def _eos(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PreftuneError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    return int(eos)


# ---------------------------------------------------------------- the row -> ids functions


@dataclass
class _Encoded:
    """One prompt with its completions, before truncation."""

    prompt_ids: list[int]
    completions: list[list[int]]
    boundary_merge: bool


@dataclass
class _Outcome:
    """What the row -> ids function made of one row: the tokenized row or a drop reason, with the
    lengths before truncation (None when the row was dropped before encoding) and what was cut."""

    result: Any
    boundary_merge: bool = False
    raw: dict[str, int] | None = None
    prompt_cut: bool = False
    completion_cut: bool = False


def _truncate_prompt(ids: list[int], bos: int | None, max_prompt_length: int) -> list[int]:
    if len(ids) <= max_prompt_length:
        return ids
    if bos is not None and max_prompt_length > 1:
        return [bos] + ids[len(ids) - max_prompt_length + 1:]
    return ids[len(ids) - max_prompt_length:]


def encode_prompt(prompt: Prompt, tokenizer, max_prompt_length: int | None = None) -> list[int]:
    """The prompt's ids exactly as training sees them: rendered by :func:`render_prompt`, BOS once
    when the tokenizer adds one, cut to its last ``max_prompt_length`` tokens (a BOS stays in front).
    Generation uses this too, so a model is prompted the way it was trained; message content never
    yields a special token (see the module docstring)."""
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    ids = _encode_rendered(prompt, render_prompt(prompt, tokenizer), tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return _truncate_prompt(ids, bos, max_prompt_length) if max_prompt_length else ids


BOUNDARY_WINDOW = 16
"""Characters on each side of the prompt/completion cut that the boundary-merge check encodes
jointly. BPE merges act within a pre-token, so a merge across the cut shows within this window
(a pre-token longer than the window could hide one; the count is a diagnostic, nothing depends on it)."""


def _boundary_merges(tokenizer, tails: list[str], heads: list[str]) -> list[bool]:
    """Whether a token would span the cut if each prompt tail and completion head were encoded as
    one text: from the fast tokenizer's character offsets in one batched call, else by comparing
    the joint encoding with the two separate ones."""
    joints = [t + h for t, h in zip(tails, heads)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "is_fast", False):
        encodings = backend.encode_batch(joints, add_special_tokens=False) if joints else []
        return [any(a < len(t) < b for a, b in e.offsets) for t, e in zip(tails, encodings)]
    return [_encode(tokenizer, j) != _encode(tokenizer, t) + _encode(tokenizer, h)
            for j, t, h in zip(joints, tails, heads)]


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Many texts in one call to the fast tokenizer's Rust core (which spreads a batch over the
    cores), the same ids as ``tokenizer.encode(text, add_special_tokens=False)``."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "is_fast", False):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [_encode(tokenizer, t) for t in texts]


def _has_control(texts: Sequence[str], controls: list[str]) -> bool:
    return any(c in t for t in texts for c in controls)


def _encode_rows(prompts: Sequence[Prompt], completions: Sequence[Sequence[str]], tokenizer,
                 bos: int | None, eos: int) -> list[_Encoded]:
    """Encode many rows at once: each prompt rendered as at generation time (BOS once), each
    completion with exactly one EOS, and whether the two would merge across the cut when encoded
    jointly. The part of the row -> ids function that sees the tokenizer. Texts free of control
    strings (nearly all) go through one batched call; the rest through :func:`_encode_rendered` and
    :func:`_encode_completion`, so message content never yields a special token."""
    controls = control_strings(tokenizer)
    prompt_texts = [render_prompt(p, tokenizer) for p in prompts]
    comp_texts = [[_completion_text(p, c, tokenizer) for c in cs] for p, cs in zip(prompts, completions)]
    flat = [t for cs in comp_texts for t in cs]
    heads = [t[:BOUNDARY_WINDOW] for t in flat]
    tails = [pt[-BOUNDARY_WINDOW:] for pt, cs in zip(prompt_texts, comp_texts) for _ in cs]
    plain_prompt = [not _has_control([m["content"] for m in p] if isinstance(p, list) else [p], controls)
                    if getattr(tokenizer, "chat_template", None) else not _has_control([t], controls)
                    for p, t in zip(prompts, prompt_texts)]
    plain_comp = [not _has_control([t], controls) for t in flat]
    ids = _encode_batch(tokenizer, [t if ok else "" for t, ok in zip(prompt_texts, plain_prompt)]
                        + [t if ok else "" for t, ok in zip(flat, plain_comp)])
    n, m = len(prompt_texts), len(flat)
    prompt_ids = [i if ok else _encode_rendered(p, t, tokenizer)
                  for i, ok, p, t in zip(ids[:n], plain_prompt, prompts, prompt_texts)]
    comp_ids = [i if ok else _encode_completion(tokenizer, t) for i, ok, t in zip(ids[n : n + m], plain_comp, flat)]
    merges = _boundary_merges(tokenizer, tails, heads)
    out, j = [], 0
    for text_ids, cs in zip(prompt_ids, comp_texts):
        if bos is not None and text_ids[:1] != [bos]:
            text_ids = [bos] + text_ids
        encoded = []
        for c in comp_ids[j : j + len(cs)]:
            while c and c[-1] == eos:  # a literal EOS at the end of the text: append exactly one below
                c.pop()
            encoded.append(c + [eos])
        out.append(_Encoded(text_ids, encoded, any(merges[j : j + len(cs)])))
        j += len(cs)
    return out


def _verify(prompt_ids: list[int], completions: list[list[int]], cut: list[bool], bos: int | None, eos: int,
            generation_ids: list[int] | None = None) -> None:
    """Per-row invariants; a failure is a bug, so it raises TokenizationInvariantError.
    ``generation_ids`` (when given) are :func:`encode_prompt`'s ids for the same prompt, computed on
    their own path: training must see the prompt the way generation will."""
    if bos is not None and prompt_ids[:2] == [bos, bos]:
        raise TokenizationInvariantError(f"double BOS at the start of the prompt: {prompt_ids[:4]}")
    for ids, was_cut in zip(completions, cut):
        if not was_cut and (ids[-1:] != [eos] or ids[-2:-1] == [eos]):
            raise TokenizationInvariantError(f"an untruncated completion must end in exactly one EOS ({eos}): {ids[-4:]}")
    if generation_ids is not None and generation_ids != prompt_ids:
        raise TokenizationInvariantError(
            f"the prompt's training ids differ from encode_prompt's (generation's): {prompt_ids[-8:]} vs "
            f"{generation_ids[-8:]}; the batch path and encode_prompt must render and encode prompts alike")


def _drop_before_encoding(row, kind: str) -> str | None:
    texts = [row.chosen, row.rejected] if kind == "preference" else [row.completion]
    if any(not t.strip() for t in texts):
        return "empty_completion"
    if kind == "preference" and row.chosen == row.rejected:
        return "chosen_equals_rejected"
    return None


def _assemble(row, enc: _Encoded, kind: str, tokenizer, max_length: int, max_prompt_length: int,
              bos: int | None, check_generation: bool = False) -> _Outcome:
    """Truncate one encoded row and build its TokenizedPair / TokenizedSFT, or name its drop
    (the policy is the module docstring's)."""
    raw = {"prompt": len(enc.prompt_ids)}
    names = ("chosen", "rejected") if kind == "preference" else ("completion",)
    raw.update({name: len(ids) for name, ids in zip(names, enc.completions)})
    outcome = _Outcome(None, enc.boundary_merge, raw)
    if kind == "preference" and enc.completions[0] == enc.completions[1]:
        outcome.result = "chosen_equals_rejected"
        return outcome
    prompt_ids = _truncate_prompt(enc.prompt_ids, bos, max_prompt_length)
    outcome.prompt_cut = len(prompt_ids) < len(enc.prompt_ids)
    budget = max_length - len(prompt_ids)
    if budget < 1:
        outcome.result = "prompt_too_long"
        return outcome
    cut = [len(ids) > budget for ids in enc.completions]
    completions = [ids[:budget] for ids in enc.completions]
    if kind == "preference" and completions[0] == completions[1]:
        outcome.result = "chosen_equals_rejected"
        return outcome
    generation_ids = encode_prompt(row.prompt, tokenizer, max_prompt_length) if check_generation else None
    _verify(prompt_ids, completions, cut, bos, _eos(tokenizer), generation_ids)
    outcome.completion_cut = any(cut)
    if kind == "preference":
        outcome.result = TokenizedPair(prompt_ids, *completions, key=row.key, meta=row.meta, truncated=any(cut))
    else:
        outcome.result = TokenizedSFT(prompt_ids, completions[0], key=row.key, meta=row.meta, truncated=any(cut))
    return outcome


def tokenize_batch(rows: Sequence, tokenizer, max_length: int, max_prompt_length: int,
                   kind: str = "preference") -> list[_Outcome]:
    """THE row -> ids function, over many rows at once (one row is a batch of one): drops that need
    no tokens, one batched encode, then truncation and the per-row checks. The first row's prompt
    is also checked against :func:`encode_prompt` (every row's, for a batch of one)."""
    outcomes: list[_Outcome | None] = []
    todo = []
    for i, row in enumerate(rows):
        reason = _drop_before_encoding(row, kind)
        outcomes.append(_Outcome(reason) if reason else None)
        if reason is None:
            todo.append(i)
    parts = (lambda r: [r.chosen, r.rejected]) if kind == "preference" else (lambda r: [r.completion])
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    encoded = _encode_rows([rows[i].prompt for i in todo], [parts(rows[i]) for i in todo], tokenizer, bos,
                           _eos(tokenizer))
    for n, (i, enc) in enumerate(zip(todo, encoded)):
        outcomes[i] = _assemble(rows[i], enc, kind, tokenizer, max_length, max_prompt_length, bos, n == 0)
    return outcomes


def _tokenize_pair(row: PreferenceRow, tokenizer, max_length: int, max_prompt_length: int):
    """``(TokenizedPair | drop reason, boundary_merge)``; see the module docstring for the policy."""
    (o,) = tokenize_batch([row], tokenizer, max_length, max_prompt_length, "preference")
    return o.result, o.boundary_merge


def _tokenize_sft(row: SFTRow, tokenizer, max_length: int, max_prompt_length: int):
    """``(TokenizedSFT | drop reason, boundary_merge)``; see the module docstring for the policy."""
    (o,) = tokenize_batch([row], tokenizer, max_length, max_prompt_length, "sft")
    return o.result, o.boundary_merge


def tokenize_pair(row: PreferenceRow, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedPair | str:
    """One preference row -> ``TokenizedPair`` (prompt ids shared by both completions), or the drop
    reason as a string. Truncation policy and drop reasons: see the module docstring."""
    return _tokenize_pair(row, tokenizer, max_length, max_prompt_length)[0]


def tokenize_sft(row: SFTRow, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedSFT | str:
    """One SFT row -> ``TokenizedSFT``, or the drop reason as a string (same policy as pairs). An
    UnpairedRow (KTO) tokenizes the same way: its prompt and its one completion."""
    return _tokenize_sft(row, tokenizer, max_length, max_prompt_length)[0]


# ---------------------------------------------------------------- many rows, with a report


def percentiles(values: Sequence[int]) -> dict[str, int]:
    """p50/p90/p99 (nearest rank) and max of a list of lengths; zeros when empty."""
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    arr = np.asarray(values)
    out = {f"p{q}": int(np.percentile(arr, q, method="inverted_cdf")) for q in PERCENTILES}
    out["max"] = int(arr.max())
    return out


@dataclass
class TokenizeReport:
    """What tokenization kept, dropped (by reason), truncated and saw merge across the boundary.
    ``rows_in == kept + sum(dropped)``."""

    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated_prompt: int = 0
    """Kept rows whose prompt was cut to ``max_prompt_length``."""
    truncated_completion: int = 0
    """Kept rows with a completion cut to fit ``max_length``."""
    boundary_merges: int = 0
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Token lengths of the kept rows by part: prompt, chosen, rejected (pairs) or completion (SFT)."""
    raw_lengths: dict[str, list[int]] = field(default_factory=dict)
    """The same parts' lengths before truncation, for every row that was encoded (to choose limits)."""

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def add(self, outcome: _Outcome) -> None:
        """Count one row's outcome."""
        self.rows_in += 1
        for part, n in (outcome.raw or {}).items():
            self.raw_lengths.setdefault(part, []).append(n)
        if isinstance(outcome.result, str):
            self.drop(outcome.result)
            return
        self.kept += 1
        self.boundary_merges += int(outcome.boundary_merge)
        self.truncated_prompt += int(outcome.prompt_cut)
        self.truncated_completion += int(outcome.completion_cut)
        for part, n in _lengths(outcome.result).items():
            self.lengths.setdefault(part, []).append(n)

    def merge(self, other: TokenizeReport) -> TokenizeReport:
        out = TokenizeReport(self.rows_in + other.rows_in, self.kept + other.kept, dict(self.dropped),
                             self.truncated_prompt + other.truncated_prompt,
                             self.truncated_completion + other.truncated_completion,
                             self.boundary_merges + other.boundary_merges)
        for reason, n in other.dropped.items():
            out.drop(reason, n)
        for mine, theirs, into in ((self.lengths, other.lengths, out.lengths),
                                   (self.raw_lengths, other.raw_lengths, out.raw_lengths)):
            for part in dict.fromkeys([*mine, *theirs]):
                into[part] = list(mine.get(part, [])) + list(theirs.get(part, []))
        return out

    def length_stats(self, before_truncation: bool = False) -> dict[str, dict[str, int]]:
        source = self.raw_lengths if before_truncation else self.lengths
        return {part: percentiles(v) for part, v in source.items()}

    @property
    def truncated(self) -> dict[str, int]:
        return {"prompt": self.truncated_prompt, "completion": self.truncated_completion}

    @property
    def truncation_rate(self) -> dict[str, float]:
        return {part: n / self.kept if self.kept else 0.0 for part, n in self.truncated.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in, "kept": self.kept, "dropped": dict(self.dropped),
            "truncated": self.truncated, "truncation_rate": self.truncation_rate,
            "boundary_merges": self.boundary_merges, "lengths": self.length_stats(),
            "lengths_before_truncation": self.length_stats(before_truncation=True),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizeReport:
        """The inverse of :meth:`to_dict` for the counts (lengths are not kept there)."""
        return cls(d["rows_in"], d["kept"], dict(d["dropped"]), d["truncated"]["prompt"],
                   d["truncated"]["completion"], d["boundary_merges"])


def _lengths(t: TokenizedPair | TokenizedSFT) -> dict[str, int]:
    if isinstance(t, TokenizedPair):
        return {"prompt": len(t.prompt_ids), "chosen": len(t.chosen_ids), "rejected": len(t.rejected_ids)}
    return {"prompt": len(t.prompt_ids), "completion": len(t.completion_ids)}


KINDS = ("preference", "sft")
BATCH_ROWS = 512
"""Rows per batched tokenizer call (and per progress-bar update)."""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _procs(num_proc: int | None, n_batches: int) -> int:
    """Worker processes: ``data.num_proc`` (null: the cores, at most 8), never more than the
    batches, and 1 inside a distributed run (each rank already has its cores) or without fork."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "fork" not in mp.get_all_start_methods():
        return 1
    wanted = num_proc if num_proc else min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                           else os.cpu_count() or 1)
    return max(1, min(wanted, n_batches))


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, max_length: int, max_prompt_length: int, kind: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no threads inside
    _WORKER.update(tokenizer=tokenizer, args=(max_length, max_prompt_length, kind))


def _work(chunk: list) -> list[_Outcome]:
    return tokenize_batch(chunk, _WORKER["tokenizer"], *_WORKER["args"])


@contextlib.contextmanager
def _batches(rows: list, tokenizer, data, kind: str):
    """Outcomes of every batch, in order: in forked worker processes when there is enough work,
    else in this process (where the fast tokenizer still spreads each batch over the cores)."""
    chunks = [rows[i : i + BATCH_ROWS] for i in range(0, len(rows), BATCH_ROWS)]
    args = (data.max_length, data.max_prompt_length, kind)
    procs = _procs(getattr(data, "num_proc", None), len(chunks)) if len(chunks) > 2 else 1
    if procs == 1:
        yield (tokenize_batch(c, tokenizer, *args) for c in chunks)
        return
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # silences the tokenizers fork warning in the workers
    try:
        with mp.get_context("fork").Pool(procs, _init_worker, (tokenizer, *args)) as pool:
            yield pool.imap(_work, chunks)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def tokenize_rows(rows, tokenizer, data, kind: Literal["preference", "sft"] = "preference", *,
                  progress: bool | None = None):
    """Tokenize rows with ``data.max_length`` / ``data.max_prompt_length`` (a DataConfig), in
    batches spread over ``data.num_proc`` processes, with a progress bar on the main process
    (``progress=None``: when there are more than a few batches). ``kind="sft"`` also takes
    UnpairedRow (KTO) rows: prompt and completion. The cached form is data/cache.py's
    ``tokenize_rows_cached``.

    Returns ``(tokenized rows, TokenizeReport)``; every dropped row is counted under its reason."""
    items, report, _ = tokenize_rows_with_positions(rows, tokenizer, data, kind, progress=progress)
    return items, report


def tokenize_rows_with_positions(rows, tokenizer, data, kind: str = "preference", *, progress: bool | None = None):
    """:func:`tokenize_rows` plus the position in ``rows`` of each tokenized row."""
    if kind not in KINDS:
        raise PreftuneError(f"unknown row kind {kind!r}; expected one of {list(KINDS)}")
    rows = list(rows)
    show = _is_main_process() and (len(rows) > 8 * BATCH_ROWS if progress is None else progress)
    report, out, positions, i = TokenizeReport(), [], [], 0
    with tqdm(total=len(rows), desc=f"tokenizing {kind} rows", unit="row", disable=not show, leave=False) as bar, \
            _batches(rows, tokenizer, data, kind) as batches:
        for outcomes in batches:
            for outcome in outcomes:
                report.add(outcome)
                if not isinstance(outcome.result, str):
                    out.append(outcome.result)
                    positions.append(i)
                i += 1
            bar.update(len(outcomes))
    return out, report, positions

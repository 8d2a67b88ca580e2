"""THE one function family that turns rows into token ids: prompt rendering (chat template or plain
text), BOS/EOS, truncation, per-row invariant checks, and the counted drops. No batching here
(collate.py) and no file reading (sources.py).

Truncation policy (the same for preference pairs and SFT rows):
  1. The prompt is rendered as it will be at generation time (``render_prompt``) and encoded with
     ``add_special_tokens=False``; BOS is prepended once, only when the tokenizer adds one by default
     and the rendered text does not already start with it (SmolLM2 adds none: its template opens
     with ``<|im_start|>``, which is its BOS).
  2. The prompt keeps its END: it is cut to its last ``max_prompt_length`` tokens (a prepended BOS
     is kept in front of the tail).
  3. Each completion is encoded, EOS (``tokenizer.eos_token_id``) is appended, and it keeps its
     START: it is cut to ``max_length - len(prompt_ids)`` tokens. A cut completion sets
     ``truncated=True`` and may lack its EOS.
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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from preftune.data.rows import PreferenceRow, Prompt, SFTRow, TokenizedPair, TokenizedSFT
from preftune.errors import DataError, PreftuneError

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
"""Role names for plain-text rendering when the tokenizer has no chat template."""

PERCENTILES = (50, 90, 99)


class TokenizationInvariantError(RuntimeError):
    """A per-row check failed: a bug in preftune (or an unusual tokenizer), never bad data."""


# ---------------------------------------------------------------- rendering


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
    bos: int | None
    boundary_merge: bool


def _encode_row(prompt: Prompt, completions: Sequence[str], tokenizer) -> _Encoded:
    prompt_text = render_prompt(prompt, tokenizer)
    text_ids = _encode_rendered(prompt, prompt_text, tokenizer)
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    prompt_ids = [bos] + text_ids if bos is not None and text_ids[:1] != [bos] else text_ids
    eos = _eos(tokenizer)
    encoded, merge = [], False
    for completion in completions:
        text = _completion_text(prompt, completion, tokenizer)
        ids = _encode_completion(tokenizer, text)
        merge |= _encode(tokenizer, prompt_text + text) != text_ids + ids
        while ids and ids[-1] == eos:  # a literal EOS at the end of the text: append exactly one below
            ids.pop()
        encoded.append(ids + [eos])
    return _Encoded(prompt_ids, encoded, bos, merge)


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


def _verify(prompt_ids: list[int], completions: list[list[int]], cut: list[bool], bos: int | None, eos: int,
            prompts: list[list[int]] | None = None) -> None:
    """Per-row invariants; a failure is a bug, so it raises TokenizationInvariantError."""
    if bos is not None and prompt_ids[:2] == [bos, bos]:
        raise TokenizationInvariantError(f"double BOS at the start of the prompt: {prompt_ids[:4]}")
    for ids, was_cut in zip(completions, cut):
        if not was_cut and (ids[-1:] != [eos] or ids[-2:-1] == [eos]):
            raise TokenizationInvariantError(f"an untruncated completion must end in exactly one EOS ({eos}): {ids[-4:]}")
    for other in prompts or []:
        if other != prompt_ids:
            raise TokenizationInvariantError("chosen and rejected were given different prompt ids")


def _tokenize_pair(row: PreferenceRow, tokenizer, max_length: int, max_prompt_length: int):
    """``(TokenizedPair | drop reason, boundary_merge)``; see the module docstring for the policy."""
    if not row.chosen.strip() or not row.rejected.strip():
        return "empty_completion", False
    if row.chosen == row.rejected:
        return "chosen_equals_rejected", False
    enc = _encode_row(row.prompt, [row.chosen, row.rejected], tokenizer)
    chosen, rejected = enc.completions
    if chosen == rejected:
        return "chosen_equals_rejected", enc.boundary_merge
    prompt_ids = _truncate_prompt(enc.prompt_ids, enc.bos, max_prompt_length)
    budget = max_length - len(prompt_ids)
    if budget < 1:
        return "prompt_too_long", enc.boundary_merge
    cut = [len(chosen) > budget, len(rejected) > budget]
    chosen, rejected = chosen[:budget], rejected[:budget]
    if chosen == rejected:
        return "chosen_equals_rejected", enc.boundary_merge
    # One prompt serves both sequences; rebuild each full sequence to check that explicitly.
    chosen_prompt = (prompt_ids + chosen)[: len(prompt_ids)]
    rejected_prompt = (prompt_ids + rejected)[: len(prompt_ids)]
    _verify(chosen_prompt, [chosen, rejected], cut, enc.bos, _eos(tokenizer), prompts=[rejected_prompt])
    pair = TokenizedPair(prompt_ids, chosen, rejected, key=row.key, meta=row.meta, truncated=any(cut))
    return pair, enc.boundary_merge


def _tokenize_sft(row: SFTRow, tokenizer, max_length: int, max_prompt_length: int):
    """``(TokenizedSFT | drop reason, boundary_merge)``; see the module docstring for the policy."""
    if not row.completion.strip():
        return "empty_completion", False
    enc = _encode_row(row.prompt, [row.completion], tokenizer)
    prompt_ids = _truncate_prompt(enc.prompt_ids, enc.bos, max_prompt_length)
    budget = max_length - len(prompt_ids)
    if budget < 1:
        return "prompt_too_long", enc.boundary_merge
    (completion,) = enc.completions
    cut = len(completion) > budget
    completion = completion[:budget]
    _verify(prompt_ids, [completion], [cut], enc.bos, _eos(tokenizer))
    return TokenizedSFT(prompt_ids, completion, key=row.key, meta=row.meta, truncated=cut), enc.boundary_merge


def tokenize_pair(row: PreferenceRow, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedPair | str:
    """One preference row -> ``TokenizedPair`` (prompt ids shared by both completions), or the drop
    reason as a string. Truncation policy and drop reasons: see the module docstring."""
    return _tokenize_pair(row, tokenizer, max_length, max_prompt_length)[0]


def tokenize_sft(row: SFTRow, tokenizer, max_length: int, max_prompt_length: int) -> TokenizedSFT | str:
    """One SFT row -> ``TokenizedSFT``, or the drop reason as a string (same policy as pairs)."""
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
    """What tokenization kept, dropped (by reason), truncated and saw merge across the boundary."""

    rows_in: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    boundary_merges: int = 0
    lengths: dict[str, list[int]] = field(default_factory=dict)
    """Token lengths of the kept rows by part: prompt, chosen, rejected (pairs) or completion (SFT)."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def merge(self, other: TokenizeReport) -> TokenizeReport:
        out = TokenizeReport(self.rows_in + other.rows_in, self.kept + other.kept, dict(self.dropped),
                             self.truncated + other.truncated, self.boundary_merges + other.boundary_merges,
                             {k: list(v) for k, v in self.lengths.items()})
        for reason, n in other.dropped.items():
            out.dropped[reason] = out.dropped.get(reason, 0) + n
        for part, v in other.lengths.items():
            out.lengths.setdefault(part, []).extend(v)
        return out

    def length_stats(self) -> dict[str, dict[str, int]]:
        return {part: percentiles(v) for part, v in self.lengths.items()}

    @property
    def truncation_rate(self) -> float:
        return self.truncated / self.kept if self.kept else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in, "kept": self.kept, "dropped": dict(self.dropped),
            "truncated": self.truncated, "truncation_rate": self.truncation_rate,
            "boundary_merges": self.boundary_merges, "lengths": self.length_stats(),
        }


def _pair_lengths(t: TokenizedPair) -> dict[str, int]:
    return {"prompt": len(t.prompt_ids), "chosen": len(t.chosen_ids), "rejected": len(t.rejected_ids)}


def _sft_lengths(t: TokenizedSFT) -> dict[str, int]:
    return {"prompt": len(t.prompt_ids), "completion": len(t.completion_ids)}


TOKENIZERS: dict[str, tuple[Callable, Callable]] = {
    "preference": (_tokenize_pair, _pair_lengths),
    "sft": (_tokenize_sft, _sft_lengths),
}


def tokenize_rows(rows, tokenizer, data, kind: Literal["preference", "sft"] = "preference"):
    """Tokenize rows with ``data.max_length`` / ``data.max_prompt_length`` (a DataConfig).

    Returns ``(tokenized rows, TokenizeReport)``; every dropped row is counted under its reason."""
    if kind not in TOKENIZERS:
        raise PreftuneError(f"unknown row kind {kind!r}; expected one of {sorted(TOKENIZERS)}")
    tokenize_one, lengths_of = TOKENIZERS[kind]
    report = TokenizeReport()
    out = []
    for row in rows:
        report.rows_in += 1
        result, merge = tokenize_one(row, tokenizer, data.max_length, data.max_prompt_length)
        if isinstance(result, str):
            report.drop(result)
            continue
        out.append(result)
        report.kept += 1
        report.boundary_merges += int(merge)
        report.truncated += int(result.truncated)
        for part, n in lengths_of(result).items():
            report.lengths.setdefault(part, []).append(n)
    return out, report

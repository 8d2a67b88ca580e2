"""Format adapters: one function per source layout turning a record (a dict) into a PreferenceRow or
SFTRow, plus format auto-detection by columns. No file reading (sources.py) and no tokens here.

Preference: hh, shp, chat, standard, implicit, openai, sharegpt. SFT: alpaca, messages, completion,
sharegpt. Unpaired (KTO): kto. Completions are the assistant's reply text only (stripped); prompts are
plain strings or message lists ``[{"role": ..., "content": ...}]`` so the chat template applies at
tokenization. Column and role names are canonical here: data/mapping.py renames them first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from preftune.data.rows import Messages, PreferenceRow, Prompt, SFTRow, UnpairedRow
from preftune.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"
TRANSCRIPT_ROLES = {"Human": "user", "User": "user", "Assistant": "assistant", "System": "system"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
"""ShareGPT ``from`` names -> roles (other names pass through unchanged)."""
TURN_MARKER = re.compile(r"(?:^|\n\n)(Human|User|Assistant|System):")
HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class RowError(DataError):
    """A malformed record. ``reason`` is the counter it goes under when ``data.on_error=skip``."""

    def __init__(self, message: str, field: str | None = None, reason: str = "malformed",
                 file: str | None = None, row: int | None = None):
        self.detail, self.reason = message, reason
        super().__init__(message, file=file, row=row, field=field)

    def at(self, file: str, row: int) -> RowError:
        """The same error, now naming where the record came from."""
        return RowError(self.detail, self.field, self.reason, file, row)


class RowFiltered(Exception):
    """A well-formed record that the format's own rule leaves out (SHP's score ratio); counted, not an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- field helpers


def _get(rec: dict, key: str) -> Any:
    if key not in rec or rec[key] is None:
        raise RowError(f"missing field '{key}'", key, "missing_field")
    return rec[key]


def _str(rec: dict, key: str) -> str:
    value = _get(rec, key)
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}", key, "wrong_type")
    return value


def _completion(text: str, key: str) -> str:
    if not text.strip():
        raise RowError(f"'{key}' is an empty completion", key, "empty_completion")
    return text.strip()


def _messages(value: Any, key: str) -> Messages:
    if not isinstance(value, list):
        raise RowError(f"'{key}' must be a list of messages, got {type(value).__name__}", key, "wrong_type")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"'{key}' message {i} must have string 'role' and 'content', got {m!r:.120}", key,
                           "wrong_type")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(value: Any, key: str) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise RowError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}", key, "wrong_type")


def _last_assistant(messages: Messages, key: str) -> tuple[Messages, str]:
    """Split a conversation into (messages before the last assistant turn, that turn's text)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"'{key}' must end with an assistant message", key, "no_assistant_turn")
    return messages[:-1], _completion(messages[-1]["content"], key)


def _reply(value: Any, key: str) -> str:
    """A completion given as a string or as messages ending in the assistant's reply."""
    if isinstance(value, str):
        return _completion(value, key)
    if isinstance(value, list):
        return _last_assistant(_messages(value, key), key)[1]
    raise RowError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}", key, "wrong_type")


def _number(rec: dict, key: str) -> float:
    value = _get(rec, key)
    try:
        if isinstance(value, bool) or not math.isfinite(number := float(value)):
            raise ValueError
        return number
    except (TypeError, ValueError):
        raise RowError(f"'{key}' must be a finite number, got {value!r:.60}", key, "wrong_type") from None


def _shared_prompt(chosen: Messages, rejected: Messages) -> Messages:
    if chosen != rejected:
        raise RowError("chosen and rejected must share the messages before their last assistant turn",
                       "rejected", "prompt_mismatch")
    return chosen


def _transcript(text: str, key: str, marker: re.Pattern = TURN_MARKER) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> messages; text before the first turn becomes a system message."""
    parts = marker.split(text)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for name, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": TRANSCRIPT_ROLES[name], "content": content.strip()})
    if not any(m["role"] != "system" for m in messages):
        raise RowError(f"'{key}' is not a transcript with Human:/Assistant: turns", key, "not_a_transcript")
    return messages


def _meta(rec: dict, used: frozenset[str]) -> dict[str, Any]:
    """The record's ``meta`` mapping plus any extra scalar columns (e.g. ``category``)."""
    meta = dict(rec["meta"]) if isinstance(rec.get("meta"), dict) else {}
    for k, v in rec.items():
        if k not in used and k != "meta" and (v is None or isinstance(v, (str, int, float, bool))):
            meta.setdefault(k, v)
    return meta


# ---------------------------------------------------------------- preference adapters


def hh(rec: dict) -> PreferenceRow:
    """Anthropic HH-RLHF: the prompt is ``chosen`` up to and including its LAST ``\\n\\nAssistant:``
    (never a character-level common prefix), which ``rejected`` must share; as messages."""
    chosen, rejected = _str(rec, "chosen"), _str(rec, "rejected")
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowError("'chosen' has no '\\n\\nAssistant:' turn", "chosen", "not_a_transcript")
    prompt_text = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt_text):
        raise RowError("'rejected' does not start with chosen's prompt (chosen up to its last '\\n\\nAssistant:')",
                       "rejected", "prompt_mismatch")
    prompt = _transcript(chosen[:cut], "chosen", HH_MARKER)
    return PreferenceRow(prompt, _completion(chosen[len(prompt_text):], "chosen"),
                         _completion(rejected[len(prompt_text):], "rejected"), _meta(rec, FORMATS["hh"].reads))


def shp(rec: dict, min_score_ratio: float = 2.0) -> PreferenceRow:
    """Stanford SHP: prompt = ``history``; ``labels`` 1 means A is preferred. Pairs whose score ratio
    (preferred / dispreferred) is below ``min_score_ratio`` raise RowFiltered("score_ratio"); with
    ``min_score_ratio <= 1``, or a record without scores, every pair is kept."""
    history, ref_a, ref_b = _str(rec, "history"), _str(rec, "human_ref_A"), _str(rec, "human_ref_B")
    label = _number(rec, "labels")
    if label not in (0, 1):
        raise RowError(f"'labels' must be 0 or 1, got {rec['labels']!r}", "labels", "wrong_type")
    if min_score_ratio > 1 and has_shp_scores(rec) and _score_ratio(rec, label) < min_score_ratio:
        raise RowFiltered("score_ratio")
    a, b = _completion(ref_a, "human_ref_A"), _completion(ref_b, "human_ref_B")
    chosen, rejected = (a, b) if label == 1 else (b, a)
    return PreferenceRow(history, chosen, rejected, _meta(rec, FORMATS["shp"].reads))


def has_shp_scores(rec: dict) -> bool:
    """Whether an SHP record carries ``score_ratio`` or both ``score_A`` and ``score_B``."""
    return rec.get("score_ratio") is not None or (rec.get("score_A") is not None and rec.get("score_B") is not None)


def _score_ratio(rec: dict, label: float) -> float:
    if rec.get("score_ratio") is not None:
        return _number(rec, "score_ratio")
    score_a, score_b = _number(rec, "score_A"), _number(rec, "score_B")
    better, worse = (score_a, score_b) if label == 1 else (score_b, score_a)
    return better / worse if worse > 0 else math.inf


def chat(rec: dict) -> PreferenceRow:
    """Message lists under ``chosen``/``rejected`` (dpo-mix-7k, UltraFeedback-binarized): the prompt is
    the shared messages before the last assistant turn (system message kept)."""
    chosen_prompt, chosen = _last_assistant(_messages(_get(rec, "chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = _last_assistant(_messages(_get(rec, "rejected"), "rejected"), "rejected")
    return PreferenceRow(_shared_prompt(chosen_prompt, rejected_prompt), chosen, rejected,
                         _meta(rec, FORMATS["chat"].reads))


def standard(rec: dict) -> PreferenceRow:
    """Explicit ``prompt``/``chosen``/``rejected``: strings, or message lists (the prompt column is the
    prompt; a chosen/rejected list contributes its final assistant message)."""
    prompt = _prompt(_get(rec, "prompt"), "prompt")
    return PreferenceRow(prompt, _reply(_get(rec, "chosen"), "chosen"), _reply(_get(rec, "rejected"), "rejected"),
                         _meta(rec, FORMATS["standard"].reads))


def implicit(rec: dict) -> PreferenceRow:
    """Only ``chosen``/``rejected``, each a whole conversation: a transcript string with
    ``Human:``/``User:``/``Assistant:`` turns, or a message list. The prompt is split at the turn
    boundary before the last assistant turn, and both must share it."""
    chosen_raw, rejected_raw = _get(rec, "chosen"), _get(rec, "rejected")
    convs = []
    for key, raw in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        if isinstance(raw, str):
            convs.append(_last_assistant(_transcript(raw, key), key))
        else:
            convs.append(_last_assistant(_messages(raw, key), key))
    (chosen_prompt, chosen), (rejected_prompt, rejected) = convs
    if not chosen_prompt:
        raise RowError("'chosen' has no turn before its last assistant turn to use as the prompt", "chosen",
                       "no_prompt")
    return PreferenceRow(_shared_prompt(chosen_prompt, rejected_prompt), chosen, rejected,
                         _meta(rec, FORMATS["implicit"].reads))


def openai(rec: dict) -> PreferenceRow:
    """The OpenAI/Azure preference fine-tuning format: ``input.messages`` is the prompt (a system
    message is kept); ``preferred_output`` / ``non_preferred_output`` are lists holding the assistant
    message."""
    inp = _get(rec, "input")
    if not isinstance(inp, dict):
        raise RowError(f"'input' must be an object with 'messages', got {type(inp).__name__}", "input", "wrong_type")
    prompt = _messages(_get(inp, "messages"), "input.messages")
    if not prompt:
        raise RowError("'input.messages' is empty", "input.messages", "empty_prompt")
    return PreferenceRow(prompt, _reply(_get(rec, "preferred_output"), "preferred_output"),
                         _reply(_get(rec, "non_preferred_output"), "non_preferred_output"),
                         _meta(rec, FORMATS["openai"].reads))


def _sharegpt_turns(value: Any, key: str) -> Messages:
    """ShareGPT turns (``from``/``value``, human/gpt) or plain messages -> messages."""
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise RowError(f"'{key}' must be a list of turns, got {type(value).__name__}", key, "wrong_type")
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str):
            out.append({"role": SHAREGPT_ROLES.get(t["from"].lower(), t["from"]), "content": t["value"]})
        elif isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str):
            out.append({"role": t["role"], "content": t["content"]})
        else:
            raise RowError(f"'{key}' turn {i} must have string 'from' and 'value' (or 'role' and 'content'), "
                           f"got {t!r:.120}", key, "wrong_type")
    return out


def sharegpt(rec: dict) -> PreferenceRow | SFTRow:
    """ShareGPT ``conversations`` (``from``/``value`` turns). With ``chosen``/``rejected`` (the ranking
    layout LLaMA-Factory uses: each one gpt turn, or turns ending in one) the conversation is the
    prompt of a pair; without, it is an SFT conversation whose last assistant turn is the completion."""
    conv = _sharegpt_turns(_get(rec, "conversations"), "conversations")
    if "chosen" in rec or "rejected" in rec:
        if not conv:
            raise RowError("'conversations' is empty", "conversations", "empty_prompt")
        chosen = _last_assistant(_sharegpt_turns(_get(rec, "chosen"), "chosen"), "chosen")[1]
        rejected = _last_assistant(_sharegpt_turns(_get(rec, "rejected"), "rejected"), "rejected")[1]
        return PreferenceRow(conv, chosen, rejected, _meta(rec, FORMATS["sharegpt"].reads))
    prompt, completion = _last_assistant(conv, "conversations")
    if not prompt:
        raise RowError("'conversations' has no turn before the last assistant turn", "conversations", "no_prompt")
    return SFTRow(prompt, completion, _meta(rec, FORMATS["sharegpt"].reads))


# ---------------------------------------------------------------- unpaired (KTO) adapter


def _label(rec: dict) -> bool:
    value = _get(rec, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RowError(f"'label' must be true/false (desirable or not), got {value!r:.60}", "label", "wrong_type")


def kto(rec: dict) -> UnpairedRow:
    """Unpaired rows: ``prompt`` (string or messages) + ``completion`` + boolean ``label``, or a
    ``messages`` conversation (the last assistant turn is the completion) + ``label``."""
    label = _label(rec)
    if "messages" in rec and "completion" not in rec:
        prompt, text = _last_assistant(_messages(_get(rec, "messages"), "messages"), "messages")
        if not prompt:
            raise RowError("'messages' has no message before the last assistant turn", "messages", "no_prompt")
    else:
        prompt, text = _prompt(_get(rec, "prompt"), "prompt"), _reply(_get(rec, "completion"), "completion")
    return UnpairedRow(prompt, text, label, _meta(rec, FORMATS["kto"].reads))


# ---------------------------------------------------------------- SFT adapters


def alpaca(rec: dict) -> SFTRow:
    """``instruction``/``input``/``output`` with the Alpaca prompt template (input optional)."""
    instruction = _str(rec, "instruction")
    if not instruction.strip():
        raise RowError("'instruction' is empty", "instruction", "empty_prompt")
    extra = "" if rec.get("input") is None else rec["input"]
    if not isinstance(extra, str):
        raise RowError(f"'input' must be a string, got {type(extra).__name__}", "input", "wrong_type")
    template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction.strip(), input=extra.strip())
    return SFTRow(prompt, _completion(_str(rec, "output"), "output"), _meta(rec, FORMATS["alpaca"].reads))


def messages(rec: dict) -> SFTRow:
    """A ``messages`` conversation: the prompt is every message before the last assistant turn,
    the completion is that turn (earlier assistant turns are context, not trained on)."""
    prompt, completion = _last_assistant(_messages(_get(rec, "messages"), "messages"), "messages")
    if not prompt:
        raise RowError("'messages' has no message before the last assistant turn", "messages", "no_prompt")
    return SFTRow(prompt, completion, _meta(rec, FORMATS["messages"].reads))


def completion(rec: dict) -> SFTRow:
    """``prompt`` (string or messages) and ``completion`` (string)."""
    return SFTRow(_prompt(_get(rec, "prompt"), "prompt"), _completion(_str(rec, "completion"), "completion"),
                  _meta(rec, FORMATS["completion"].reads))


def with_system(row: PreferenceRow | SFTRow | UnpairedRow, rec: dict):
    """A non-empty ``system`` column becomes the prompt's first message (a string prompt becomes one
    user message after it), unless the prompt already opens with a system message."""
    system = rec.get("system")
    if not isinstance(system, str) or not system.strip():
        return row
    prompt = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    if prompt and prompt[0]["role"] == "system":
        return row
    meta = {k: v for k, v in row.meta.items() if k != "system"}
    return dataclasses.replace(row, prompt=[{"role": "system", "content": system.strip()}, *prompt], meta=meta)


def sft_rows_from_pairs(rows: Iterable[PreferenceRow]) -> list[SFTRow]:
    """SFT on the preferred subset: each pair's prompt with its chosen completion."""
    return [SFTRow(r.prompt, r.chosen, dict(r.meta)) for r in rows]


# ---------------------------------------------------------------- the table and detection

Row = PreferenceRow | SFTRow | UnpairedRow


def _is_hh_transcript(text: str) -> bool:
    return HH_ASSISTANT in text and re.search(r"(?:^|\n\n)Human:", text) is not None


@dataclass(frozen=True)
class Format:
    """One data format: its adapter (a record -> a row) and everything detection and column mapping
    ask of it. Calling a Format calls its adapter."""

    name: str
    adapter: Callable[..., Row]
    kinds: tuple[str, ...]
    """The row kinds it makes: ``preference``, ``sft``, ``unpaired`` (ShareGPT makes pairs or SFT rows)."""
    needs: frozenset[str]
    """Columns a record must have for the format to fit."""
    also_reads: frozenset[str] = frozenset()
    """Optional columns the adapter reads; the record's other scalar columns go into ``meta``."""
    needs_for: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """More columns one kind needs (ShareGPT pairs need ``chosen`` and ``rejected``)."""
    fits_sample: Callable[[dict], bool] | None = None
    """A check of one sample record's values, splitting formats with the same columns (hh vs chat)."""
    options: Callable[[Any], dict[str, Any]] | None = None
    """The adapter's keyword arguments, taken from a DataConfig (SHP's ``min_score_ratio``)."""

    @functools.cached_property
    def reads(self) -> frozenset[str]:
        """Every column the adapter reads."""
        return self.needs | self.also_reads | frozenset().union(*self.needs_for.values())

    def columns_for(self, kind: str) -> frozenset[str]:
        """Columns a record must have to fit as a row of ``kind``."""
        return self.needs | self.needs_for.get(kind, frozenset())

    def __call__(self, rec: dict, **options) -> Row:
        return self.adapter(rec, **options)


_PAIR, _SFT, _UNPAIRED = ("preference",), ("sft",), ("unpaired",)
FORMATS: dict[str, Format] = {f.name: f for f in [
    Format(name="hh", adapter=hh, kinds=_PAIR, needs=frozenset({"chosen", "rejected"}),
           fits_sample=lambda r: isinstance(r.get("chosen"), str) and _is_hh_transcript(r["chosen"])),
    Format(name="shp", adapter=shp, kinds=_PAIR, needs=frozenset({"history", "human_ref_A", "human_ref_B", "labels"}),
           also_reads=frozenset({"score_A", "score_B", "score_ratio"}),
           options=lambda data: {"min_score_ratio": data.min_score_ratio}),
    Format(name="chat", adapter=chat, kinds=_PAIR, needs=frozenset({"chosen", "rejected"}),
           fits_sample=lambda r: isinstance(r.get("chosen"), list)),
    Format(name="standard", adapter=standard, kinds=_PAIR, needs=frozenset({"prompt", "chosen", "rejected"})),
    Format(name="implicit", adapter=implicit, kinds=_PAIR, needs=frozenset({"chosen", "rejected"})),
    Format(name="openai", adapter=openai, kinds=_PAIR,
           needs=frozenset({"input", "preferred_output", "non_preferred_output"})),
    Format(name="alpaca", adapter=alpaca, kinds=_SFT, needs=frozenset({"instruction", "output"}),
           also_reads=frozenset({"input"})),
    Format(name="messages", adapter=messages, kinds=_SFT, needs=frozenset({"messages"})),
    Format(name="completion", adapter=completion, kinds=_SFT, needs=frozenset({"prompt", "completion"})),
    Format(name="sharegpt", adapter=sharegpt, kinds=_PAIR + _SFT, needs=frozenset({"conversations"}),
           needs_for={"preference": frozenset({"chosen", "rejected"})}),
    Format(name="kto", adapter=kto, kinds=_UNPAIRED, needs=frozenset({"label"}),
           also_reads=frozenset({"prompt", "completion", "messages"})),
]}
"""Format name -> its record (``data.format``)."""

KIND_FORMATS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name, f in FORMATS.items() if kind in f.kinds) for kind in ("preference", "sft", "unpaired")}
"""Row kind -> the formats that make it, in detection order."""
PREFERENCE_FORMATS, SFT_FORMATS, UNPAIRED_FORMATS = (KIND_FORMATS[k] for k in ("preference", "sft", "unpaired"))
ROW_TYPES = {"preference": PreferenceRow, "sft": SFTRow, "unpaired": UnpairedRow}

FIELDS = frozenset().union(*(f.reads for f in FORMATS.values()), {"system"})
"""Every canonical field name an adapter reads (``data.columns`` maps these to a dataset's columns)."""


def columns_for(fmt: str, kind: str) -> frozenset[str]:
    return FORMATS[fmt].columns_for(kind)


FALLBACK = "implicit"
"""Fits whatever hh and chat fit; chosen only when no more specific format does."""


def adapter(name: str, data: Any = None) -> Callable[[dict], Row]:
    """The adapter for ``name`` with its options from ``data`` (a DataConfig) bound."""
    if name not in FORMATS:
        raise DataError(f"unknown data format {name!r}; choose one of: auto, {', '.join(FORMATS)}",
                        field="data.format")
    fmt = FORMATS[name]
    if data is not None and fmt.options is not None:
        return functools.partial(fmt.adapter, **fmt.options(data))
    return fmt.adapter


def detect_format(columns: Iterable[str], kind: str, sample: dict | None = None) -> str:
    """The one format of ``kind`` ("preference" or "sft") whose columns the data has.

    A format whose columns are a strict subset of another fitting format's gives way (prompt +
    chosen + rejected is ``standard``, not ``chat``); ``sample`` (one record) splits formats with
    the same columns by their values (HH transcript strings vs message lists). Unknown or ambiguous
    layouts raise DataError listing the columns found and the formats that fit."""
    if kind not in KIND_FORMATS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KIND_FORMATS)}")
    cols = set(columns)
    need = {f: columns_for(f, kind) for f in KIND_FORMATS[kind]}
    fits = [f for f in KIND_FORMATS[kind] if need[f] <= cols]
    fits = [f for f in fits if not any(need[f] < need[g] for g in fits)]
    if len(fits) > 1 and sample is not None:
        fits = [f for f in fits if FORMATS[f].fits_sample is None or FORMATS[f].fits_sample(sample)]
    specific = [f for f in fits if f != FALLBACK] if len(fits) > 1 else fits
    if len(specific) == 1:
        return specific[0]
    needs = "; ".join(f"{f}: {', '.join(sorted(need[f]))}" for f in KIND_FORMATS[kind])
    problem = f"ambiguous: formats that fit: {', '.join(fits)}" if fits else f"no {kind} format fits (each needs: {needs})"
    raise DataError(f"cannot detect the {kind} data format from columns {sorted(cols)}: {problem}. "
                    f"Set data.format (or --format) to one of: {', '.join(KIND_FORMATS[kind])}", field="data.format")

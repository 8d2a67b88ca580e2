"""Generation: batched, seeded sampling or greedy decoding over prompts with the chat template
(``preftune generate``), and a terminal chat with a model (``preftune chat``). Judging and serving
live elsewhere."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from preftune.data.rows import Prompt
from preftune.data.sources import load_rows
from preftune.data.tokenize import encode_prompt

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def prompt_ids(prompt: Prompt, tokenizer, max_prompt_length: int | None = None) -> list[int]:
    """The prompt as training saw it (``data.tokenize.encode_prompt``)."""
    return encode_prompt(prompt, tokenizer, max_prompt_length)


def stop_ids(tokenizer, model=None) -> list[int]:
    """EOS, the chat end-of-turn tokens the vocabulary has, and the model's own eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in STOP_TOKENS if t in vocab}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(ids)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids padded on the left (generation appends on the right) and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(new_ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(new_ids):
        if t in stops:
            return new_ids[:i]
    return new_ids


def generation_config(model, tokenizer, max_new_tokens, temperature, top_p, stops):
    """Greedy decoding at temperature 0, else sampling with ``top_p``; ends at any of the ``stops`` ids
    (the settings of ``serve``'s one-request ``model.generate``)."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, top_k=None, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row at least one token of its own
    (the system prompt and the chat header, for prompts rendered with one chat template)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row: the argmax at temperature 0, else a draw from the temperature-scaled
    distribution cut to its top-``top_p`` nucleus (the most likely token always stays)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _forward(model, ids, mask, cache, last_only: bool):
    """One forward over ``ids`` after ``cache`` (positions from the mask: pads take no position)."""
    cache_name, keeps_logits = forward_names(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    kw = {"logits_to_keep": 1} if last_only and keeps_logits else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache}, **kw)
    return out.logits[:, -1].float(), getattr(out, cache_name)


def forward_names(model) -> tuple[str, bool]:
    """The name ``model``'s forward (under a peft wrapper, if any) gives the KV cache (``cache``;
    ``past_key_values`` before transformers renamed it), and whether it can skip the logits of all
    but the last positions (``logits_to_keep``)."""
    return _forward_names(type(model.get_base_model() if hasattr(model, "get_base_model") else model))


@functools.cache
def _forward_names(cls) -> tuple[str, bool]:
    params = inspect.signature(cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def decode(model, prefix: tuple[torch.Tensor, object] | None, rows: list[list[int]], stops: list[int], pad_id: int,
           max_new_tokens: int, temperature: float, top_p: float, gen: torch.Generator | None) -> list[list[int]]:
    """New ids for each of ``rows`` (prompt ids after the shared ``prefix``: its attention mask and KV
    cache), up to the first stop id. Identical rows are prefilled once; finished rows leave the batch,
    so each step costs only what is still being written."""
    device = next(model.parameters()).device
    slot = {u: j for j, u in enumerate(dict.fromkeys(map(tuple, rows)))}
    unique = list(slot)
    which = torch.tensor([slot[tuple(r)] for r in rows], device=device)
    ids, mask = left_pad([list(u) for u in unique], pad_id, device)
    cache = None
    if prefix is not None:
        prefix_mask, prefix_cache = prefix
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(unique))
        mask = torch.cat([prefix_mask.expand(len(unique), -1), mask], 1)
    logits, cache = _forward(model, ids, mask, cache, last_only=True)
    cache.batch_select_indices(which)
    logits, mask = logits[which], mask[which]
    alive = torch.arange(len(rows), device=device)
    out: list[list[int]] = [[] for _ in rows]
    stop_set = torch.tensor(stops, device=device)
    for step in range(max_new_tokens):
        nxt = pick(logits, temperature, top_p, gen)
        ended = torch.isin(nxt, stop_set)
        for i, t, e in zip(alive.tolist(), nxt.tolist(), ended.tolist()):
            if not e:
                out[i].append(t)
        if ended.all() or step == max_new_tokens - 1:
            break
        if ended.any():
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, nxt, mask = alive[keep], nxt[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
        logits, cache = _forward(model, nxt[:, None], mask, cache, last_only=False)
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, progress: bool = True,
             max_prompt_length: int | None = None) -> list[str]:
    """Responses to ``prompts`` (the new text only, cut at EOS / end of turn), in the prompts' order;
    ``max_prompt_length`` keeps each prompt's last tokens, as training does. See :func:`generate_ids`."""
    encoded = [prompt_ids(p, tokenizer, max_prompt_length) for p in prompts]
    new = generate_ids(model, tokenizer, encoded, max_new_tokens, temperature, top_p, seed, batch_size, progress)
    return [response_text(tokenizer, row) for row in new]


def response_text(tokenizer, ids: list[int]) -> str:
    """A response's text from its new ids: special tokens dropped, outer white space stripped (the
    same on every generation engine)."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate_ids(model, tokenizer, encoded: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 8, progress: bool = True) -> list[list[int]]:
    """The new ids for each prompt of ``encoded`` (prompt ids), up to the first stop id, in order.

    The prefix all prompts share (a chat template's system prompt) is computed once and its KV cache
    reused by every batch. Prompts are sorted by length into batches (less padding), identical ones
    side by side (several samples of one prompt are prefilled once), and left-padded after the shared
    prefix. Batch ``k`` samples from a generator seeded ``seed + k``, so the same prompts, settings
    and seed give the same responses, and the caller's RNG state is untouched. ``temperature=0`` is
    greedy decoding."""
    if not encoded:
        return []
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), encoded[i]))
    stops = stop_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shared = common_prefix(encoded)
    prefix = None
    if shared:
        ids = torch.tensor([encoded[0][:shared]], device=device)
        _, cache = _forward(model, ids, torch.ones_like(ids), None, last_only=True)
        prefix = (torch.ones_like(ids), cache)
    out: list[list[int]] = [[] for _ in encoded]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for k, idx in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
        gen = torch.Generator(device=device).manual_seed(seed + k) if temperature > 0 else None
        new = decode(model, prefix, [encoded[i][shared:] for i in idx], stops, pad_id, max_new_tokens,
                     temperature, top_p, gen)
        for row, i in zip(new, idx):
            out[i] = row
    model.train(was_training)
    return out


# ---------------------------------------------------------------- preftune generate


def held_out_prompts(cfg) -> list:
    """The held-out preference rows of ``cfg.data`` (their prompts are what gets generated for)."""
    _, test, _ = load_rows(cfg.data, "preference", cfg.seed)
    return test


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- preftune chat

CHAT_HELP = ("type a message; /reset starts a new conversation, /save FILE writes it as JSON, /exit (or "
             "Ctrl-D) quits; arrow keys edit the line and recall earlier ones")
HISTORY_LENGTH = 1000


def chat_loop(model, tokenizer, read: Callable[[str], str] = input, stdout: TextIO | None = None,
              max_new_tokens: int = 256, temperature: float = 0.7, seed: int = 0) -> list[dict]:
    """Read user lines with ``read(prompt)`` (``input``: with readline loaded, it edits the line and
    keeps history), answer each with the whole conversation as the prompt; return the conversation at
    exit. ``/reset`` clears it, ``/save FILE`` writes it as JSON messages, ``/exit`` or end of input
    (``EOFError``) ends the loop, and Ctrl-C discards the line being typed."""
    stdout = stdout or sys.stdout
    messages: list[dict] = []
    turn = 0
    print(CHAT_HELP, file=stdout)
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            print("", file=stdout)
            return messages
        except KeyboardInterrupt:
            print("", file=stdout)
            continue
        if text == "/exit":
            return messages
        if text == "/reset":
            messages = []
            print("(conversation reset)", file=stdout)
            continue
        if text.startswith("/save"):
            _save_chat(messages, text[len("/save"):].strip(), stdout)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        (reply,) = generate(model, tokenizer, [list(messages)], max_new_tokens, temperature, 1.0,
                            seed + turn, batch_size=1, progress=False)
        turn += 1
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", file=stdout, flush=True)


def _save_chat(messages: list[dict], path: str, stdout: TextIO) -> None:
    if not path:
        print("(usage: /save FILE)", file=stdout)
        return
    try:
        Path(path).write_text(json.dumps(messages, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"(saved {len(messages)} messages to {path})", file=stdout)
    except OSError as e:
        print(f"(could not save to {path}: {e.strerror or e})", file=stdout)


def line_editing(history: Path) -> Callable[[], None]:
    """Turn on line editing and history for ``input()`` through readline, with the lines of earlier
    sessions read from ``history``; returns the function that saves them there. Without readline
    (e.g. plain Windows) input stays unedited and nothing is saved."""
    try:
        import readline  # here: absent on some platforms, and loading it changes input() for the chat only
    except ImportError:
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(history)

    def save() -> None:
        with contextlib.suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)

    return save


"""Generation: batched, seeded sampling or greedy decoding over prompts with the chat template
(``preftune generate``), and a terminal chat with a model (``preftune chat``). Judging and serving
live elsewhere."""

from __future__ import annotations

import contextlib
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
    """Greedy decoding at temperature 0, else sampling with ``top_p``; ends at any of the ``stops`` ids."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
        top_p=top_p if sample else None, top_k=None, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, batch_size: int = 8, progress: bool = True,
             max_prompt_length: int | None = None) -> list[str]:
    """Responses to ``prompts`` (the new text only, cut at EOS / end of turn), in the prompts' order.

    Prompts are sorted by length into batches (less padding) and left-padded. Batch ``k`` samples
    under ``torch.manual_seed(seed + k)`` inside a forked RNG, so the same prompts, settings and
    seed give the same responses, and the caller's RNG state is untouched. ``temperature=0`` is
    greedy decoding. ``max_prompt_length`` keeps each prompt's last tokens, as training does."""
    if not prompts:
        return []
    encoded = [prompt_ids(p, tokenizer, max_prompt_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    stops = stop_ids(tokenizer, model)
    gen_cfg = generation_config(model, tokenizer, max_new_tokens, temperature, top_p, stops)
    pad_id = gen_cfg.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for k, idx in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
        ids, mask = left_pad([encoded[i] for i in idx], pad_id, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + k)
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        for row, i in zip(seqs[:, ids.shape[1] :].tolist(), idx):
            out[i] = tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True).strip()
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


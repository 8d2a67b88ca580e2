"""Reward models on the batch contract (data/rows.py): the Bradley-Terry loss and the scalar reward of a
sequence classifier read at each sequence's last token, in every layout (padded, prefix-shared, packed).
The step function lives in methods.py, loading in model.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from preftune.attention import decoder_mask
from preftune.errors import PreftuneError


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

"""Training targets and losses on a model's replies: what fine-tuning on conversations optimises."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gavel.io.conversations import ROLE_ASSISTANT, Conversation
from gavel.models.batching import pad_sequences
from gavel.models.chat import encode_conversation

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def reply_targets(conversations: Sequence[Conversation], tokenizer) -> list[torch.Tensor]:
    """Per conversation, [T, 2] rows of (token id, training target): the target is the token itself on
    assistant tokens and the end-of-turn token closing them, -100 elsewhere (the model reads prompts,
    it is not trained to write them)."""
    out = []
    for conversation in conversations:
        enc = encode_conversation(tokenizer, conversation)
        assistant = enc.roles == ROLE_ASSISTANT
        closing = torch.zeros_like(assistant)
        closing[1:] = assistant[:-1] & (enc.input_ids[1:] == tokenizer.eos_token_id)
        out.append(torch.stack([enc.input_ids, enc.input_ids.masked_fill(~(assistant | closing), -100)], 1))
    return out


def reply_loss(model: PreTrainedModel, rows: Sequence[torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Mean cross-entropy of `reply_targets` rows, right-padded into one batch."""
    padded, mask = pad_sequences(list(rows), -100, side="right")
    ids, labels = padded[..., 0].masked_fill(~mask, pad_token_id), padded[..., 1]
    return model(input_ids=ids.to(model.device), attention_mask=mask.long().to(model.device),
                 labels=labels.to(model.device)).loss

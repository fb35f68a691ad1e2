"""Ground-truth concept labels of organism conversations, per token."""
from __future__ import annotations

import torch

from gavel.models.chat import Encoded, encode_conversation
from gavel.organism.corpus import CONCEPTS, Example


def as_conversation(messages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def encode_example(tokenizer, example: Example) -> tuple[Encoded, torch.Tensor]:
    """The tokenized conversation and its labels [T, len(CONCEPTS)]: concept spans mapped onto tokens."""
    enc = encode_conversation(tokenizer, as_conversation(example.messages))
    labels = torch.zeros(len(enc.input_ids), len(CONCEPTS), dtype=torch.bool)
    for span in example.spans:
        base = enc.content_starts[span.message]
        labels[enc.char_mask(base + span.start, base + span.end), CONCEPTS.index(span.ce)] = True
    return enc, labels

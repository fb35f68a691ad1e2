"""Conversations to token ids with a per-token role mask, through the model's chat template.

Each token gets the role of the message whose *content* it overlaps; template scaffolding (role
headers, separators, BOS) gets ROLE_NONE. Models without a chat template use FALLBACK_TEMPLATE, a
plain "Role: content" layout, documented in docs/models.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gavel.errors import DataError
from gavel.io.conversations import Conversation, role_code, validate_conversation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenized conversation: ids, role codes, and each token's char offsets in `text`."""

    text: str
    input_ids: torch.Tensor       # [T] long
    roles: torch.Tensor           # [T] uint8, indices into ROLES
    offsets: torch.Tensor         # [T, 2] long, char span of each token in `text`
    content_starts: tuple[int, ...]  # char offset of each message's content in `text`

    def char_mask(self, start: int, end: int) -> torch.Tensor:
        """Tokens overlapping characters [start, end) of `text`."""
        return (self.offsets[:, 0] < end) & (self.offsets[:, 1] > start)


def render(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> str:
    """The conversation as the model reads it: its chat template, else the fallback layout."""
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(validate_conversation(messages), chat_template=template,
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_conversation(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> Encoded:
    """Tokenize a conversation and mark every token with the role of the message it belongs to."""
    msgs = validate_conversation(messages)
    text = render(tokenizer, msgs, add_generation_prompt)
    starts, cursor = [], 0
    for i, m in enumerate(msgs):
        at = text.find(m["content"], cursor)
        if at < 0:
            raise DataError(f"message {i}'s content does not appear in the rendered chat template")
        starts.append(at)
        cursor = at + len(m["content"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    roles = torch.zeros(len(enc["input_ids"]), dtype=torch.uint8)
    for m, start in zip(msgs, starts):
        inside = (offsets[:, 0] < start + len(m["content"])) & (offsets[:, 1] > start)
        roles[inside] = role_code(m["role"])
    return Encoded(text, torch.tensor(enc["input_ids"], dtype=torch.long), roles, offsets, tuple(starts))


def encode_text(tokenizer, text: str) -> Encoded:
    """Plain text (no template): every token is ROLE_NONE, with the tokenizer's own special tokens."""
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    return Encoded(text, ids, torch.zeros(len(ids), dtype=torch.uint8), offsets, ())


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int] | torch.Tensor, *,
                skip_special_tokens: bool = False) -> str:
    """One sequence of token ids [T] as text (transformers types `decode` as `str | list[str]`, the list being for
    a batch of sequences)."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str), "one sequence of ids decodes to one string"
    return text

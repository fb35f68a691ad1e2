"""Plain (unmonitored) batched generation from conversations, left-padded as generate() needs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from gavel.errors import GavelError, ModelLoadError
from gavel.io.conversations import Conversation
from gavel.models.batching import pad_sequences
from gavel.models.chat import Encoded, encode_conversation
from gavel.models.handle import ModelHandle

if TYPE_CHECKING:
    from transformers.utils import ModelOutput


@dataclass(frozen=True, slots=True)
class PromptBatch:
    """Left-padded prompt ids [B, T] with their mask, and the encodings they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    encoded: tuple[Encoded, ...]


def prompt_batch(handle: ModelHandle, conversations: Sequence[Conversation]) -> PromptBatch:
    """Chat-templated prompts with the generation prompt appended, left-padded."""
    encoded = tuple(encode_conversation(handle.tokenizer, c, add_generation_prompt=True) for c in conversations)
    ids, mask = pad_sequences([e.input_ids for e in encoded], handle.tokenizer.pad_token_id, side="left")
    return PromptBatch(ids.to(handle.device), mask.long().to(handle.device), encoded)


@runtime_checkable
class Generates(Protocol):
    """A model with Hugging Face's `generate()`: generative models get it from GenerationMixin, `PreTrainedModel`
    does not declare it. The token ids [B, T + new], or a ModelOutput under `return_dict_in_generate=True`."""

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor | ModelOutput: ...


def generate_ids(handle: ModelHandle, batch: PromptBatch, **generate_kwargs: Any) -> torch.Tensor:
    """`hf_model.generate()` continuing a prompt batch, padded with the tokenizer's pad token: the prompt and
    generated ids [B, T + new]."""
    model = handle.hf_model
    if not isinstance(model, Generates):
        raise ModelLoadError(f"{handle.name} cannot generate text: {type(model).__name__} has no generate()",
                             hint="load a causal language model (AutoModelForCausalLM)")
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pad_token_id=handle.tokenizer.pad_token_id, **generate_kwargs)
    if not isinstance(out, torch.Tensor):
        raise GavelError(f"generate() returned a {type(out).__name__}, gavel needs the token ids",
                         hint="do not pass return_dict_in_generate=True")
    return out


def until_end(row: torch.Tensor, handle: ModelHandle) -> torch.Tensor:
    """A generated row up to and with its first end token (what generate() pads after it is dropped)."""
    hits = torch.isin(row, torch.tensor(handle.end_token_ids, dtype=row.dtype, device=row.device)).nonzero()
    return row[:int(hits[0]) + 1] if len(hits) else row


def decode_replies(handle: ModelHandle, sequences: torch.Tensor, prompt_width: int) -> list[str]:
    """The generated part of each row, special tokens dropped."""
    return handle.tokenizer.batch_decode(sequences[:, prompt_width:], skip_special_tokens=True)


@torch.no_grad()
def generate_replies(handle: ModelHandle, conversations: Sequence[Conversation], max_new_tokens: int = 64,
                     batch_size: int = 32, **generate_kwargs) -> list[str]:
    """Greedy (unless told otherwise) replies to each conversation, in order."""
    replies: list[str] = []
    for start in range(0, len(conversations), batch_size):
        batch = prompt_batch(handle, conversations[start:start + batch_size])
        out = generate_ids(handle, batch, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        replies += decode_replies(handle, out, batch.input_ids.shape[1])
    return [r.strip() for r in replies]

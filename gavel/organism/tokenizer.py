"""The organism's word-level tokenizer and chat template, built offline with `tokenizers`."""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whole words, and numbers split into single-digit tokens (one token per digit value, so column
    arithmetic is learnable); decoding joins tokens with spaces, so "51" reads back as "5 1"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = list(SPECIAL_TOKENS) + [str(d) for d in range(10)]
    vocab += [w for w in words if w not in vocab]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<|end|>",
                                  unk_token="<unk>", pad_token="<pad>",
                                  additional_special_tokens=list(SPECIAL_TOKENS[4:]))
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 256
    return tok

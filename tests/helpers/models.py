"""The one tiny-model factory: small random Hugging Face models of every supported family, built from their config
classes. Tests get it as the `tiny_model` fixture (tests/conftest.py); plain modules (estimator_cases) import it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

# every family gavel.models.sites supports; the config class and the dimension fields each one takes
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "phi3", "bert")
_KV_HEADS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}   # grouped-query attention
_HEAD_DIM = {"qwen3", "gemma", "gemma2"}   # configs whose head_dim default is not d_model // heads


def words_tokenizer(vocab: int = 100):
    """A word-level tokenizer over "w0" .. "w{vocab-1}" (one id each, split on whitespace): w0 is BOS, w1 EOS and
    padding, w2 unknown."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1", unk_token="w2",
                                      pad_token="w1")


def tiny_config(arch: str = "llama", *, layers: int = 2, d_model: int = 32, d_mlp: int | None = None,
                heads: int = 4, kv_heads: int = 2, vocab: int = 100, positions: int | None = 64, **config: Any):
    """The `transformers` config of a tiny `arch` model. `d_mlp` defaults to 2 * d_model; `kv_heads` applies to
    the families with grouped-query attention; a dimension given as None keeps the config class's default;
    `config` sets any other field (special token ids, use_parallel_residual, ...) and wins over the rest."""
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gpt2": tf.GPT2Config,
               "gpt_neox": tf.GPTNeoXConfig, "phi3": tf.Phi3Config, "bert": tf.BertConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    d_mlp = 2 * d_model if d_mlp is None else d_mlp
    if arch == "gpt2":
        fields: dict[str, Any] = dict(vocab_size=vocab, n_embd=d_model, n_inner=d_mlp, n_layer=layers, n_head=heads,
                                      n_positions=positions)
    else:
        fields = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, max_position_embeddings=positions)
        if arch in _KV_HEADS:
            fields["num_key_value_heads"] = kv_heads
        if arch in _HEAD_DIM:
            fields["head_dim"] = d_model // heads
        if arch == "phi3":
            fields["pad_token_id"] = 0   # its default (32000) lies outside a tiny vocabulary
    fields = {k: v for k, v in fields.items() if v is not None}
    return classes[arch](**{**fields, **config})


def tiny_model(arch: str = "llama", *, layers: int = 2, d_model: int = 32, d_mlp: int | None = None, heads: int = 4,
               kv_heads: int = 2, vocab: int = 100, positions: int | None = 64, seed: int = 0,
               std: float | None = None, redraw: Literal["matrices", "all"] = "matrices", tokenizer: Any = "words",
               name: str | None = None, save_to: str | Path | None = None, **config: Any):
    """A random tiny `arch` model (config from `tiny_config`, which takes layers .. positions and `config`), in eval
    mode, built under `torch.manual_seed(seed)` in a forked RNG (the caller's global RNG is left as it was).

    std: when given, the weights are redrawn from N(0, std) after construction: every parameter with more than one
    dimension ("matrices"), or every parameter ("all": norms and biases too). Large weights give confident logits.
    tokenizer: "words" (`words_tokenizer(vocab)`), a tokenizer, or None (only with save_to).
    Returns a ModelHandle (`gavel.models.loading.wrap_model`, named `name`; its `.hf_model` is the bare model), or,
    with `save_to`, that folder (model and tokenizer saved there, ready for `load_model`)."""
    import transformers as tf

    cfg = tiny_config(arch, layers=layers, d_model=d_model, d_mlp=d_mlp, heads=heads, kv_heads=kv_heads, vocab=vocab,
                      positions=positions, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM).from_config(cfg).eval()
        if std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if redraw == "all" or p.ndim > 1:
                        p.normal_(0.0, std)
    if isinstance(tokenizer, str):
        if tokenizer != "words":
            raise ValueError(f"tokenizer must be 'words', a tokenizer or None, not {tokenizer!r}")
        tokenizer = words_tokenizer(vocab)
    if save_to is not None:
        model.save_pretrained(save_to)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_to)
        return Path(save_to)
    if tokenizer is None:
        raise ValueError("a ModelHandle needs a tokenizer: pass one, or save_to")
    from gavel.models.loading import wrap_model

    return wrap_model(model, tokenizer, name=name)

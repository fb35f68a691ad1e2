"""Canonical TransformerLens-style site names and where they live in a Hugging Face model.

A site names one activation, e.g. ``blocks.3.hook_resid_post``; `resolve_site` maps it to a
module plus whether the activation is that module's output or (first) input, from one
layout table per architecture family. Per family (paths relative to decoder layer L;
attn_out / mlp_out = what each sublayer adds to the residual stream; resid_mid and
mlp.hook_post are read at a module's input):

- llama, mistral, qwen2, qwen3, gemma, phi3: attn_out = self_attn.o_proj output, mlp_out =
  mlp output, resid_mid = input of post_attention_layernorm, mlp.hook_post = input of
  mlp.down_proj.
- gemma2: attn_out = post_attention_layernorm output, mlp_out = post_feedforward_layernorm
  output, resid_mid = input of pre_feedforward_layernorm, mlp.hook_post = mlp.down_proj input.
- gpt2: attn_out = attn output[0], mlp_out = mlp output, resid_mid = input of ln_2,
  mlp.hook_post = input of mlp.c_proj.
- gpt_neox: attn_out = attention.dense output, mlp_out = mlp output, resid_mid = input of
  post_attention_layernorm (SiteError with use_parallel_residual=True: it does not exist),
  mlp.hook_post = input of mlp.dense_4h_to_h.
- bert (post-norm, detection only): attn_out = attention.output.dense output and mlp_out =
  output.dense output (both before the post-norm), resid_mid = attention output[0] (after
  its LayerNorm), mlp.hook_post = input of output.dense.

Everywhere: ``hook_embed`` is the token-embedding output (Gemma: already scaled; BERT: word
embeddings only, before position/type embeddings and LayerNorm); ``hook_resid_pre`` /
``hook_resid_post`` are the input / output of layer L; ``attn.hook_z`` is the input of the
attention output projection seen as [batch, pos, n_heads, d_head]; ``ln1`` / ``ln2`` are the
two per-layer norms (Gemma2: input_layernorm / pre_feedforward_layernorm; GPT-2: ln_1 / ln_2;
BERT: attention.output.LayerNorm / output.LayerNorm, which equal resid_mid / resid_post);
``ln_final`` is the final norm (BERT has none).

Caveat: in pre-norm families ``hook_resid_mid`` is read at the second norm's input, so a
replacement there changes what the MLP sees but not the residual carried on to resid_post;
steer the stream at hook_attn_out, hook_resid_pre or hook_resid_post instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from gavel.errors import ModelLoadError, SiteError, did_you_mean

SITE_KINDS: tuple[str, ...] = (
    "hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
    "hook_attn_out", "hook_mlp_out", "mlp.hook_post", "attn.hook_z",
    "ln1.hook_normalized", "ln2.hook_normalized", "ln_final.hook_normalized",
)
_GLOBAL_KINDS = ("hook_embed", "ln_final.hook_normalized")
_LAYER_KINDS = tuple(k for k in SITE_KINDS if k not in _GLOBAL_KINDS)
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")

Io = Literal["output", "input"]


@dataclass(frozen=True, slots=True)
class Site:
    """A parsed site name; `layer` is None for the model-wide hook_embed and ln_final sites."""

    name: str
    kind: str
    layer: int | None


@dataclass(frozen=True, slots=True)
class HookTarget:
    """Where a site's activation lives: a module's output or first input (heads: reshape for hook_z)."""

    module: torch.nn.Module
    io: Io
    heads: tuple[int, int] | None = None


def _all_names(layer: int) -> list[str]:
    return [*_GLOBAL_KINDS, *(f"blocks.{layer}.{k}" for k in _LAYER_KINDS)]


def _unknown(name: str, why: str, layer: int = 0) -> SiteError:
    guess = did_you_mean(name, _all_names(layer))
    return SiteError(f"unknown site {name!r}: {why}",
                     hint=f"did you mean {guess!r}?" if guess else None)


def parse_site(name: str) -> Site:
    """Parse ``blocks.{L}.<kind>`` or a model-wide kind; SiteError with a did-you-mean hint otherwise."""
    if not isinstance(name, str):
        raise SiteError(f"a site name must be a string, got {type(name).__name__}")
    match = _BLOCK_RE.fullmatch(name)
    if match is None:
        if name in _GLOBAL_KINDS:
            return Site(name, name, None)
        if name in _LAYER_KINDS:
            raise SiteError(f"site {name!r} needs a layer", hint=f"use 'blocks.{{L}}.{name}'")
        raise _unknown(name, f"expected one of {', '.join(_GLOBAL_KINDS)} or blocks.{{L}}.<kind>")
    layer, kind = int(match.group(1)), match.group(2)
    if kind in _GLOBAL_KINDS:
        raise SiteError(f"site {name!r}: {kind} has no layer", hint=f"use {kind!r}")
    if kind not in _LAYER_KINDS:
        raise _unknown(name, f"known per-layer kinds are {', '.join(_LAYER_KINDS)}", layer)
    return Site(site_name(kind, layer), kind, layer)


def layer_of(site: str | Site) -> int:
    """The layer of a per-layer site; SiteError for hook_embed and ln_final, which belong to no layer."""
    parsed = parse_site(site) if isinstance(site, str) else site
    if parsed.layer is None:
        raise SiteError(f"site {parsed.name!r} belongs to no layer; expected a blocks.{{L}}.<kind> site")
    return parsed.layer


def site_name(kind: str, layer: int | None = None) -> str:
    """The canonical name of a site kind at a layer (None for hook_embed and ln_final)."""
    if kind not in SITE_KINDS:
        guess = did_you_mean(kind, SITE_KINDS)
        raise SiteError(f"unknown site kind {kind!r}", hint=f"did you mean {guess!r}?" if guess else None)
    if kind in _GLOBAL_KINDS:
        if layer is not None:
            raise SiteError(f"site kind {kind!r} has no layer, got layer={layer!r}")
        return kind
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SiteError(f"site kind {kind!r} needs a layer index >= 0, got {layer!r}")
    return f"blocks.{layer}.{kind}"


# ---- per-family layouts -------------------------------------------------------------------

Ref = tuple[str, Io]  # (path from the decoder layer, "" = the layer itself; output or input)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where one family keeps its embedding, layers, final norm and per-layer sites."""

    embed: str
    layers: str
    final_norm: str | None
    block: dict[str, Ref]


_BLOCK_COMMON: dict[str, Ref] = {"hook_resid_pre": ("", "input"), "hook_resid_post": ("", "output")}


def _layout(embed: str, layers: str, final_norm: str | None, **sites: Ref) -> _Layout:
    keys = {k.replace("__", "."): v for k, v in sites.items()}  # mlp__hook_post -> mlp.hook_post
    return _Layout(embed, layers, final_norm, {**_BLOCK_COMMON, **keys})


_LLAMA = _layout(
    "embed_tokens", "layers", "norm",
    hook_attn_out=("self_attn.o_proj", "output"), hook_mlp_out=("mlp", "output"),
    hook_resid_mid=("post_attention_layernorm", "input"), mlp__hook_post=("mlp.down_proj", "input"),
    attn__hook_z=("self_attn.o_proj", "input"),
    ln1__hook_normalized=("input_layernorm", "output"),
    ln2__hook_normalized=("post_attention_layernorm", "output"),
)
_GEMMA2 = _layout(
    "embed_tokens", "layers", "norm",
    hook_attn_out=("post_attention_layernorm", "output"),
    hook_mlp_out=("post_feedforward_layernorm", "output"),
    hook_resid_mid=("pre_feedforward_layernorm", "input"), mlp__hook_post=("mlp.down_proj", "input"),
    attn__hook_z=("self_attn.o_proj", "input"),
    ln1__hook_normalized=("input_layernorm", "output"),
    ln2__hook_normalized=("pre_feedforward_layernorm", "output"),
)
_GPT2 = _layout(
    "wte", "h", "ln_f",
    hook_attn_out=("attn", "output"), hook_mlp_out=("mlp", "output"),
    hook_resid_mid=("ln_2", "input"), mlp__hook_post=("mlp.c_proj", "input"),
    attn__hook_z=("attn.c_proj", "input"),
    ln1__hook_normalized=("ln_1", "output"), ln2__hook_normalized=("ln_2", "output"),
)
_NEOX = _layout(
    "embed_in", "layers", "final_layer_norm",
    hook_attn_out=("attention.dense", "output"), hook_mlp_out=("mlp", "output"),
    hook_resid_mid=("post_attention_layernorm", "input"),
    mlp__hook_post=("mlp.dense_4h_to_h", "input"), attn__hook_z=("attention.dense", "input"),
    ln1__hook_normalized=("input_layernorm", "output"),
    ln2__hook_normalized=("post_attention_layernorm", "output"),
)
_BERT = _layout(
    "embeddings.word_embeddings", "encoder.layer", None,
    hook_attn_out=("attention.output.dense", "output"), hook_mlp_out=("output.dense", "output"),
    hook_resid_mid=("attention", "output"), mlp__hook_post=("output.dense", "input"),
    attn__hook_z=("attention.output.dense", "input"),
    ln1__hook_normalized=("attention.output.LayerNorm", "output"),
    ln2__hook_normalized=("output.LayerNorm", "output"),
)

_LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _GEMMA2, "gpt2": _GPT2, "gpt_neox": _NEOX, "phi3": _LLAMA, "bert": _BERT,
}
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2",
                             "gpt_neox", "phi3", "bert")


def family_of(config: Any) -> str:
    """The layout family of a Hugging Face config (its model_type); ModelLoadError if unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type in _LAYOUTS:
        return model_type
    guess = did_you_mean(str(model_type), FAMILIES)
    raise ModelLoadError(
        f"unsupported architecture {model_type!r}; supported families: {', '.join(FAMILIES)}",
        hint=f"did you mean {guess!r}?" if guess else None)


def _config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise SiteError(f"cannot resolve sites on {type(model).__name__}: it has no Hugging Face .config")
    return config


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Walk a dotted attribute path; SiteError if this model is not laid out as its family says."""
    module = root
    for part in path.split(".") if path else ():
        child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            raise SiteError(f"{type(root).__name__} has no submodule {path!r} (stopped at {part!r}); "
                            "was it wrapped or modified (e.g. by a TransformerLens bridge)?")
        module = child
    return module


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "base_model", model)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layout = _LAYOUTS[family_of(_config(model))]
    layers = _get(_base(model), layout.layers)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SiteError(f"{type(model).__name__}'s {layout.layers!r} is a {type(layers).__name__}, not the "
                        "ModuleList of decoder layers its family has; was it wrapped or modified?")
    return layers


def n_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks (HF model, or a TransformerLens bridge via its cfg)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_layers"):
        return int(cfg.n_layers)
    return len(_layers(model))


def d_model(model: torch.nn.Module) -> int:
    """Width of the residual stream (HF model, or a TransformerLens bridge via its cfg)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "d_model"):
        return int(cfg.d_model)
    return int(_config(model).hidden_size)


def _in_features(module: torch.nn.Module) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    nx = getattr(module, "nx", None)
    if nx is not None:  # transformers' Conv1D (GPT-2): weight is [in, out]
        return int(nx)
    raise SiteError(f"cannot infer the head layout from {type(module).__name__}")


def _heads(config: Any, proj: torch.nn.Module) -> tuple[int, int]:
    n_heads = int(config.num_attention_heads)
    return n_heads, _in_features(proj) // n_heads


def check_layer(site: Site, n: int) -> None:
    """SiteError unless the site's layer exists in a model with n layers."""
    if site.layer is not None and site.layer >= n:
        raise SiteError(f"site {site.name!r}: layer {site.layer} out of range, the model has "
                        f"{n} layers (0-{n - 1})")


def resolve_site(model: torch.nn.Module, site: str | Site) -> HookTarget:
    """Map a canonical site to its module and io on a HF model (*ForCausalLM, base model, BERT)."""
    site = parse_site(site) if isinstance(site, str) else site
    config = _config(model)
    family = family_of(config)
    layout, base = _LAYOUTS[family], _base(model)
    if site.kind == "hook_embed":
        return HookTarget(_get(base, layout.embed), "output")
    if site.kind == "ln_final.hook_normalized":
        if layout.final_norm is None:
            raise SiteError(f"site {site.name!r} does not exist: {family} has no final norm")
        return HookTarget(_get(base, layout.final_norm), "output")
    layers = _layers(model)
    check_layer(site, len(layers))
    if site.kind == "hook_resid_mid" and getattr(config, "use_parallel_residual", False):
        raise SiteError(f"site {site.name!r} does not exist: this {family} model uses a parallel "
                        "residual (attention and MLP both read resid_pre), so there is no resid_mid")
    path, io = layout.block[site.kind]
    if site.layer is None:
        raise SiteError(f"site {site.name!r} needs a layer", hint=f"use 'blocks.{{L}}.{site.kind}'")
    module = _get(layers[site.layer], path)
    heads = _heads(config, module) if site.kind == "attn.hook_z" else None
    return HookTarget(module, io, heads)

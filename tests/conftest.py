"""Shared test setup: one torch thread (two cores, other jobs running), seeded RNGs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def organism():
    """The shipped organism on the hf backend."""
    from gavel.models.loading import load_model

    return load_model("builtin:organism")


@pytest.fixture(scope="session")
def organism_bank(organism):
    """A CE bank fitted on organism ground truth, each CE read at the better of two sites."""
    from gavel.probes.data import organism_dataset
    from gavel.probes.fit import fit_bank

    dataset = organism_dataset(organism.tokenizer, 500, seed=77)
    return fit_bank(organism, dataset, ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"])

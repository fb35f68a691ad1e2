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
    """A CE bank fitted on organism ground truth at two sites (so the monitor hooks more than one)."""
    from gavel.organism import corpus
    from gavel.organism.labels import encode_example
    from gavel.probes.bank import CEBank
    from gavel.probes.fit import fit_linear_bank

    data = [encode_example(organism.tokenizer, ex) for ex in corpus.generate_corpus(400, seed=77)]
    half = len(corpus.CONCEPTS) // 2
    parts = [fit_linear_bank(organism, [(e, y[:, cols]) for e, y in data], [corpus.CONCEPTS[c] for c in cols], site)[0]
             for cols, site in ((range(half), "blocks.2.hook_resid_post"),
                                (range(half, len(corpus.CONCEPTS)), "blocks.3.hook_resid_post"))]
    manifest = parts[0].manifest.model_copy(update={"ces": parts[0].manifest.ces + parts[1].manifest.ces})
    return CEBank(manifest, {**parts[0].weights, **parts[1].weights})

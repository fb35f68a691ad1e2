"""Token-labelled CE training data: the dataset type, its loaders, and `load_dataset` which picks one by spec.

Sources: labelled-span JSONL files, GAVEL library `ces/` folders, and the organism's ground truth.
Formats and choices are documented in docs/data.md.
"""
from __future__ import annotations

from pathlib import Path

from gavel.errors import DataError, Location, did_you_mean
from gavel.probes.data.gavel_library import CEDefinition, SeedExample, load_gavel_ces, read_ce_yaml
from gavel.probes.data.dataset import CEDataset, CEInfo, LabelledExample
from gavel.probes.data.spans import load_spans_jsonl

__all__ = ["CEDataset", "CEDefinition", "CEInfo", "LabelledExample", "SeedExample", "load_dataset",
           "load_gavel_ces", "load_spans_jsonl", "merge_datasets", "organism_dataset", "read_ce_yaml"]

ORGANISM_EXAMPLES = 2000  # default size of "builtin:organism"
BUILTINS = ("organism",)
merge_datasets = CEDataset.merge  # all examples over the union of the CEs


def organism_dataset(tokenizer, n: int, seed: int = 0) -> CEDataset:
    """`n` organism training conversations with their ground-truth labels over all 14 concepts (every role:
    the organism's spans already sit in the right turns). Rare concepts may have no positive in a small `n`."""
    from gavel.organism import corpus
    from gavel.organism.labels import encode_example

    if n < 1:
        raise DataError(f"the organism dataset needs at least one example, not {n}")
    examples = []
    for i, example in enumerate(corpus.generate_corpus(n, seed)):
        encoded, labels = encode_example(tokenizer, example)
        examples.append(LabelledExample(encoded, labels, f"builtin:organism[seed={seed}]#{i}"))
    ces = tuple(CEInfo(c, c.replace("_", " ")) for c in corpus.CONCEPTS)
    return CEDataset(ces, tuple(examples))


def load_dataset(spec: str, tokenizer, **kw) -> CEDataset:
    """A dataset from `builtin:organism[:N]`, a labelled-span `.jsonl` file, or a GAVEL `ces/` folder.

    Keyword arguments go to the loader (`seed` for the organism; `roles`, and `which`/`names` for GAVEL).
    """
    if spec.startswith("builtin:"):
        name, _, count = spec.removeprefix("builtin:").partition(":")
        if name not in BUILTINS:
            guess = did_you_mean(name, BUILTINS)
            raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTINS)}",
                            hint=f"did you mean 'builtin:{guess}'?" if guess else None)
        if count and not (count.isdigit() and int(count) > 0):
            raise DataError(f"bad example count {count!r} in {spec!r}; write builtin:organism:N with N > 0")
        return organism_dataset(tokenizer, int(count) if count else ORGANISM_EXAMPLES, **kw)
    path = Path(spec)
    if path.is_file() and path.suffix == ".jsonl":
        return load_spans_jsonl(path, tokenizer, **kw)
    if path.is_dir() and (any(path.glob("*/ce.yaml")) or any(path.glob("ces/*/ce.yaml"))):
        return load_gavel_ces(path, tokenizer, **kw)
    what = "no such file or folder" if not path.exists() else "not a dataset"
    raise DataError(f"{what}: expected builtin:organism[:N], a labelled-span .jsonl file or a GAVEL ces/ folder "
                    "(with <name>/ce.yaml)", location=Location(spec))

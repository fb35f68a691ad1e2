"""Token-labelled CE training data: the dataset type, its loaders, and `load_dataset` which picks one by path.

Sources: labelled-span JSONL files and GAVEL library `ces/` folders (the organism's ground truth comes from
`gavel.organism.datasets`). Formats and choices are documented in docs/data.md.
"""
from __future__ import annotations

from pathlib import Path

from gavel.errors import DataError, Location
from gavel.probes.data.dataset import CEDataset, CEInfo, LabelledExample
from gavel.probes.data.gavel_library import CEDefinition, SeedExample, load_gavel_ces, read_ce_yaml
from gavel.probes.data.spans import load_spans_jsonl

__all__ = ["CEDataset", "CEDefinition", "CEInfo", "LabelledExample", "SeedExample", "load_dataset",
           "load_gavel_ces", "load_spans_jsonl", "merge_datasets", "read_ce_yaml"]

merge_datasets = CEDataset.merge  # all examples over the union of the CEs


def load_dataset(spec: str, tokenizer, **kw) -> CEDataset:
    """A dataset from a labelled-span `.jsonl` file or a GAVEL `ces/` folder.

    Keyword arguments go to the loader (`roles`, and `which`/`names` for GAVEL).
    """
    path = Path(spec)
    if path.is_file() and path.suffix == ".jsonl":
        return load_spans_jsonl(path, tokenizer, **kw)
    if path.is_dir() and (any(path.glob("*/ce.yaml")) or any(path.glob("ces/*/ce.yaml"))):
        return load_gavel_ces(path, tokenizer, **kw)
    what = "no such file or folder" if not path.exists() else "not a dataset"
    raise DataError(f"{what}: expected a labelled-span .jsonl file or a GAVEL ces/ folder (with <name>/ce.yaml)"
                    + (", or builtin:organism[:N] (gavel.organism.datasets.load_dataset)" if spec else ""),
                    location=Location(spec))

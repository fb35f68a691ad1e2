"""Rule packs shipped with gavel: for a built-in model, GAVEL-format rules and CE definitions (`rules/`, `ces/`) with a
CE bank fitted for that model (`bank/`) and the demo's prompts (`demo.yaml`). How they were made: docs/detection.md."""
from __future__ import annotations

from pathlib import Path

PACKS = {"builtin:smollm2": "smollm2"}   # model name -> pack folder


def pack_dir(model: str) -> Path | None:
    """The shipped pack of `model`, or None when gavel ships none for it."""
    name = PACKS.get(model)
    return Path(__file__).resolve().parent / name if name else None

"""The organism's data sets, as the library's methods take them: CE training conversations with ground-truth labels,
its prompt sets (benign, harmful, roleplay, alarming, opinion, ...), problems with expected answers, and the
`builtin:` names the command line reads them by."""
from __future__ import annotations

from pathlib import Path

from gavel.errors import DataError, Location, did_you_mean, one_of
from gavel.io.conversations import Conversation, Problem
from gavel.organism import corpus
from gavel.organism.labels import as_conversation, encode_example
from gavel.probes.data import CEDataset, CEInfo, LabelledExample
from gavel.probes.data import load_dataset as load_dataset_file
from gavel.steering.activations import read_prompt_file

ORGANISM_EXAMPLES = 2000  # default size of "builtin:organism"
BUILTINS = ("organism",)
WHICH = ("excitation", "calibration")  # the sample sets of a GAVEL CE folder


def organism_dataset(tokenizer, n: int, seed: int = 0) -> CEDataset:
    """`n` organism training conversations with their ground-truth labels over all 14 concepts (every role:
    the organism's spans already sit in the right turns). Rare concepts may have no positive in a small `n`."""
    if n < 1:
        raise DataError(f"the organism dataset needs at least one example, not {n}")
    examples = []
    for i, example in enumerate(corpus.generate_corpus(n, seed)):
        encoded, labels = encode_example(tokenizer, example)
        examples.append(LabelledExample(encoded, labels, f"builtin:organism[seed={seed}]#{i}"))
    ces = tuple(CEInfo(c, c.replace("_", " ")) for c in corpus.CONCEPTS)
    return CEDataset(ces, tuple(examples))


def load_dataset(spec: str, tokenizer, *, which: str = "excitation", **kw) -> CEDataset:
    """A CE dataset from `builtin:organism[:N[:SEED]]` (or keyword `seed`; another seed than the fit's makes other
    conversations, for held-out evaluation), or a labelled-span `.jsonl` file or a GAVEL `ces/`
    folder (`gavel.probes.data.load_dataset`, keywords `roles`, `names`). `which="calibration"` reads a GAVEL
    folder's `calibration.json` sets instead of its `excitation.json` ones (only GAVEL folders have them)."""
    which = one_of(which, WHICH, "which")
    if which == "calibration":
        if gavel_folder(spec) is None:
            raise DataError(f"{spec!r} is not a GAVEL ces/ folder: only those have calibration sets "
                            "(<name>/calibration.json)", location=Location(spec))
        return load_dataset_file(spec, tokenizer, which=which, **kw)
    if not spec.startswith("builtin:"):
        return load_dataset_file(spec, tokenizer, **kw)
    name, _, count = spec.removeprefix("builtin:").partition(":")
    count, _, seed = count.partition(":")
    if name not in BUILTINS:
        guess = did_you_mean(name, BUILTINS)
        raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTINS)}",
                        hint=f"did you mean 'builtin:{guess}'?" if guess else None)
    if count and not (count.isdigit() and int(count) > 0):
        raise DataError(f"bad example count {count!r} in {spec!r}; write builtin:organism:N with N > 0")
    if seed:
        if not seed.isdigit():
            raise DataError(f"bad seed {seed!r} in {spec!r}; write builtin:organism:N:SEED with SEED >= 0")
        kw["seed"] = int(seed)
    return organism_dataset(tokenizer, int(count) if count else ORGANISM_EXAMPLES, **kw)


def gavel_folder(spec: str) -> Path | None:
    """The `ces/` folder a data spec names (the folder itself, or a library holding one), or None."""
    path = Path(spec)
    root = path / "ces" if (path / "ces").is_dir() else path
    return root if root.is_dir() and any(root.glob("*/ce.yaml")) else None


def has_calibration(spec: str) -> bool:
    """Whether `spec` is a GAVEL ces/ folder whose every CE has a `calibration.json`."""
    root = gavel_folder(spec)
    return root is not None and all((p.parent / "calibration.json").is_file() for p in root.glob("*/ce.yaml"))


def prompt_set(name: str) -> list[Conversation]:
    """The prompts of an organism evaluation set (benign, harmful, roleplay, alarming, opinion, ...)."""
    return [as_conversation(e.prompt()) for e in _evaluation_set(name)]


def problems(name: str, span: slice = slice(None)) -> list[Problem]:
    """Problems with expected answers from an organism prompt set (e.g. arithmetic_2digit)."""
    return [Problem(as_conversation(e.prompt()), e.expect) for e in _evaluation_set(name)[span]]


def read_prompts(source: str) -> list[Conversation]:
    """Conversations without their replies from `builtin:NAME` (an organism prompt set), optionally sliced
    (`builtin:harmful[0:10]`, to fit on one part and evaluate on the rest), or a JSONL/JSON file."""
    if source.startswith("builtin:"):
        name, _, rest = source.removeprefix("builtin:").partition("[")
        return prompt_set(name)[_slice(rest, source)]
    return read_prompt_file(source)


def _slice(text: str, source: str) -> slice:
    """`a:b]` (either bound optional) as a slice; "" as everything."""
    if not text:
        return slice(None)
    low, colon, high = text.removesuffix("]").partition(":")
    if not text.endswith("]") or not colon or not all(b.isdigit() for b in (low, high) if b):
        raise DataError(f"bad slice in {source!r}; write builtin:NAME[A:B] (A, B optional, e.g. [0:10] or [10:])")
    return slice(int(low) if low else None, int(high) if high else None)


def _evaluation_set(name: str) -> list[corpus.Example]:
    sets = corpus.evaluation_sets()
    if name not in sets:
        raise DataError(f"no organism prompt set {name!r}; sets: {', '.join(sets)}")
    return list(sets[name])

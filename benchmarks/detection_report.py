"""Detection figures we can defend: per CE and per rule on the held-out test split, beside baselines.

Usage: python benchmarks/detection_report.py [--model builtin:smollm2] [--bank DIR] [--rules DIR] [--train DIR]
       [--test DIR] [--benign FILE] [--seeds 3] [--resamples 1000] [--out-json FILE] [--out-md FILE]

Every test conversation (the CEs' test conversations, the rules' test sets, the benign pool) goes once through the
real runtime path, `Monitor.scan`, which gives per-token calibrated CE probabilities, the rules' firings and their
soft scores. Per CE: token AUROC over the labelled turns' tokens, conversation AUROC (the highest probability in
the labelled turns), TPR/FPR at the bank's threshold and TPR at FPR <= 1% on the benign pool. Per rule: the AUC of
its soft score (positives against hard negatives and the benign pool), its firing's TPR and FPR, and the soft
score's TPR at FPR <= 1% on the benign pool. Beside them, fitted only on the train split: a length-only score, a
bag of words (TF-IDF word 1-2 grams + logistic regression) and, per CE, a random direction of the probe's norm at
the probe's own site, pooled and calibrated the same way. Intervals: 95% bootstrap over test conversations; the
bag of words and the random control over `--seeds` seeds (mean and range). The bank is one fit.

`--model builtin:organism` runs the same report on the organism: its bank is fitted as `gavel demo` fits it (1500
conversations, seed 2024), its CE test conversations are a fresh corpus (seed 7) without any conversation of the
bank's training corpus, its rules gavel/organism/rules.yaml (they have no test sets), its benign pool the test
conversations that carry no concept.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from gavel.errors import DataError, GavelError
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.probes.bootstrap import percentile_interval, resample_counts, weighted_auroc
from gavel.probes.metrics import auroc, tpr_at_fpr
from gavel.runtime.events import Result
from gavel.runtime.monitor import Monitor, soft_scores

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = "builtin:organism"
ORGANISM_TRAIN = (1500, 2024)     # the demo bank's corpus (size, seed)
ORGANISM_TEST = (600, 7)
MAX_FPR = 0.01
Conversation = list[dict[str, str]]


def key(conversation: Conversation) -> str:
    """A conversation's identity: each distinct conversation is scanned once."""
    return json.dumps(conversation, sort_keys=True)


# ---------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class Labelled:
    """A conversation with per-token CE labels over its split's CE names, the tokens they speak about (`scope`:
    content tokens of the labelled roles) and per-message labels (for the bag of words)."""

    conversation: Conversation
    labels: torch.Tensor     # bool [T, n]
    scope: torch.Tensor      # bool [T]
    messages: torch.Tensor   # bool [M, n]: message m carries CE j somewhere
    in_scope: tuple[bool, ...]   # per message: whether its role is labelled


@dataclass(frozen=True)
class CESplit:
    names: tuple[str, ...]
    items: list[Labelled]
    roles: tuple[int, ...]   # the role codes whose tokens are labelled

    def in_scope(self, conversation: Conversation) -> tuple[bool, ...]:
        return tuple(ROLE_CODES[m["role"]] in self.roles for m in conversation)

    def neutral(self) -> list[Conversation]:
        """Conversations that carry no CE at all."""
        return [i.conversation for i in self.items if not i.labels.any()]


def message_labels(encoded, conversation: Conversation, labels: torch.Tensor) -> torch.Tensor:
    """Per message, whether any of its tokens carries each CE [M, n]."""
    out = torch.zeros(len(conversation), labels.shape[1], dtype=torch.bool)
    for m, (message, start) in enumerate(zip(conversation, encoded.content_starts)):
        inside = encoded.char_mask(start, start + len(message["content"]))
        out[m] = labels[inside].any(0)
    return out


def _labelled(conversation: Conversation, encoded, labels: torch.Tensor, roles: Sequence[int]) -> Labelled:
    content = encoded.roles != 0
    scope = content & torch.isin(encoded.roles.long(), torch.tensor(list(roles)))
    return Labelled(conversation, labels, scope, message_labels(encoded, conversation, labels),
                    tuple(ROLE_CODES[m["role"]] in roles for m in conversation))


ROLE_CODES = {"system": 1, "user": 2, "assistant": 3}


def subsample(items: list, limit: int | None) -> list:
    """At most `limit` of `items` (a seeded random choice, in their order); all of them without a limit."""
    if limit is None or len(items) <= limit:
        return items
    chosen = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:limit]
    return [items[i] for i in sorted(chosen.tolist())]


def library_ces(root: Path, tokenizer, limit: int | None = None) -> CESplit:
    """Every CE conversation of a GAVEL library split (`ces/*/excitation.json` and `calibration.json`; at most
    `limit` of each file), each once, labelled over all the library's CEs (assistant turns, as the loader labels
    them)."""
    from gavel.probes.data import load_gavel_ces
    from gavel.probes.data.gavel_library import read_samples

    folders = sorted(p.parent for p in (root / "ces").glob("*/ce.yaml"))
    if not folders:
        raise DataError(f"no CEs under {root / 'ces'} (expected <name>/ce.yaml folders)")
    names = tuple(p.name for p in folders)
    found: dict[str, Labelled] = {}
    for which in ("excitation", "calibration"):
        if not all((p / f"{which}.json").is_file() for p in folders):
            continue
        data = load_gavel_ces(root, tokenizer, which=which, names=names)
        files = [[s for s, _ in read_samples(p / f"{which}.json", which, p.name)] for p in folders]
        assert sum(map(len, files)) == len(data.examples), "the loader reads every sample in folder order"
        at, chosen = 0, []
        for samples in files:
            chosen += subsample(list(zip(samples, data.examples[at:at + len(samples)])), limit)
            at += len(samples)
        for sample, example in chosen:
            conversation = sample.get("conversation") if isinstance(sample, dict) else sample
            if not isinstance(conversation, list):
                continue   # a plain-text sample: the monitor scans conversations
            item = _labelled(conversation, example.encoded, example.labels, (ROLE_CODES["assistant"],))
            k = key(conversation)
            if k in found:   # the same conversation in two files: it carries what either marks
                old = found[k]
                item = Labelled(conversation, old.labels | item.labels, old.scope, old.messages | item.messages,
                                old.in_scope)
            found[k] = item
    return CESplit(names, list(found.values()), (ROLE_CODES["assistant"],))


def organism_ces(tokenizer, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> CESplit:
    """`n` organism conversations with their ground truth (every role), less those whose JSON is in `exclude`."""
    from gavel.organism import corpus
    from gavel.organism.labels import as_conversation, encode_example

    items = []
    for example in corpus.generate_corpus(n, seed):
        conversation = as_conversation(example.messages)
        if key(conversation) in exclude:
            continue
        encoded, labels = encode_example(tokenizer, example)
        items.append(_labelled(conversation, encoded, labels, tuple(ROLE_CODES.values())))
    return CESplit(tuple(corpus.CONCEPTS), items, tuple(ROLE_CODES.values()))


def rule_tests(root: Path, limit: int | None = None) -> dict[str, tuple[list[Conversation], list[Conversation]]]:
    """Per rule of a library split: its test positives and (hard) negatives (at most `limit` of each file)."""
    from gavel.io.conversations import read_audit_data

    out = {}
    for tests in sorted((root / "rules").glob("*/tests")):
        files = [subsample(read_audit_data(f), limit) for f in sorted(tests.glob("*.json"))]
        items = [i for f in files for i in f]
        out[tests.parent.name] = ([i.conversation for i in items if i.label],
                                  [i.conversation for i in items if i.label is False])
    return out


def read_pool(path: Path, limit: int | None = None) -> list[Conversation]:
    """The benign pool: one `{"conversation": [...]}` per line (at most `limit` of them)."""
    from gavel.io.conversations import read_audit_data

    return [i.conversation for i in subsample(read_audit_data(path), limit)]


# ---------------------------------------------------------------- scanning


class RandomDirections:
    """The random control: per CE of a linear head and per seed, a random unit direction scaled to the probe's weight
    norm, read at the probe's own sites; `raw(acts)` scores it per token like the head scores the probe."""

    def __init__(self, bank: CEBank, seeds: int) -> None:
        from gavel.probes.heads import LinearHead

        self.bank, self.seeds = bank, seeds
        self.heads: dict[int, torch.Tensor] = {}    # head -> [width, seeds * k] (seed-major)
        for h, head in enumerate(bank.heads):
            if not isinstance(head, LinearHead):
                continue
            columns = []
            for s in range(seeds):
                for c, j in enumerate(bank.columns[h]):
                    generator = torch.Generator().manual_seed(1_000_003 * s + j)
                    r = torch.randn(head.weight.shape[0], generator=generator, dtype=torch.float64)
                    columns.append(r / r.norm() * head.weight[:, c].double().norm())
            self.heads[h] = torch.stack(columns, 1).float()
        self.sites = sorted({s for h in self.heads for s in bank.heads[h].sites})

    def covers(self, j: int) -> bool:
        return self.bank.manifest.ces[j].head in self.heads

    def raw(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw random scores [T, seeds, n_ce] of one conversation's tokens (nan for CEs of other heads), pooled over
        trailing tokens as the CE's head pools."""
        from gavel.probes.heads import site_features
        from gavel.probes.pooling import pool_rows

        length = len(next(iter(acts.values())))
        out = torch.full((length, self.seeds, len(self.bank.names)), torch.nan)
        for h, directions in self.heads.items():
            head = self.bank.heads[h]
            scores = site_features(acts, head.sites).float() @ directions
            scores = pool_rows(scores, torch.zeros(length, dtype=torch.long), self.bank.pools[h])
            out[:, :, self.bank.columns[h]] = scores.view(length, self.seeds, -1)
        return out


def scan(monitor: Monitor, conversations: Sequence[Conversation], control: RandomDirections | None,
         batch_size: int = 16) -> tuple[list[Result], list[torch.Tensor | None]]:
    """`Monitor.scan` over the conversations, batch by batch, with the random control read from the same forward
    passes (a hook at its sites keeps the activations of each batch's one forward)."""
    from gavel.models.chat import encode_conversation
    from gavel.probes.heads import flat

    results: list[Result] = []
    raws: list[torch.Tensor | None] = []
    limit = monitor.handle.max_positions
    for start in range(0, len(conversations), batch_size):
        chunk = list(conversations[start:start + batch_size])
        stash: dict[str, list[torch.Tensor]] = {s: [] for s in (control.sites if control else ())}
        with monitor.handle.hooks([(s, _keeper(s, stash[s], flat)) for s in stash]):
            batch = monitor.scan(chunk, batch_size=len(chunk))
        results += batch
        if control is None:
            raws += [None] * len(chunk)
            continue
        lengths = [len(encode_conversation(monitor.handle.tokenizer, c).input_ids) for c in chunk]
        if (limit is not None and max(lengths) > limit) or any(len(v) != 1 for v in stash.values()):
            raise GavelError(f"a conversation of {max(lengths)} tokens is scanned in windows: the random control "
                             "reads one forward per batch")
        for b, n in enumerate(lengths):
            raws.append(control.raw({s: v[0][b, :n] for s, v in stash.items()}))
    return results, raws


def _keeper(site: str, store: list[torch.Tensor], flat):
    """A hook keeping each forward's activations at `site` (one feature vector per token) in `store`."""
    def hook(act: torch.Tensor) -> None:
        store.append(flat(site, act).detach().float().cpu())
    return hook


@dataclass
class Scanned:
    """What the report needs of one scanned conversation."""

    scores: torch.Tensor          # [T, n_ce] calibrated probabilities
    roles: torch.Tensor           # [T] role codes
    content: torch.Tensor         # [T] bool
    assistant: torch.Tensor       # [T] bool: assistant content tokens
    fired: set[str]
    soft: dict[str, float | None]
    control: torch.Tensor | None  # [T, seeds, n_ce] raw random scores


def scan_all(monitor: Monitor, conversations: Sequence[Conversation], control: RandomDirections | None,
             batch_size: int, what: str) -> dict[str, Scanned]:
    """Every distinct conversation scanned once, by its JSON."""
    unique: dict[str, Conversation] = {}
    for c in sorted(conversations, key=lambda c: sum(len(m["content"]) for m in c)):   # similar lengths batched
        unique.setdefault(key(c), c)
    started = time.perf_counter()
    results, raws = scan(monitor, list(unique.values()), control, batch_size)
    print(f"scanned {len(unique)} {what} conversations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    out = {}
    for k, r, raw in zip(unique, results, raws):
        assert r.content is not None
        out[k] = Scanned(r.scores, r.roles.long(), r.content, r.content & (r.roles == ROLE_CODES["assistant"]),
                         set(r.fired), dict(zip(monitor.soft.rule_names, soft_scores(monitor.soft, r))), raw)
    return out


# ---------------------------------------------------------------- figures


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Interval(_Model):
    """A figure and its 95% bootstrap interval over test conversations."""

    value: float
    low: float
    high: float


class Spread(_Model):
    """A figure over seeds: mean, lowest, highest, each seed's value."""

    mean: float
    low: float
    high: float
    values: list[float]


class BankFigures(_Model):
    """Another bank's reading of a CE on the same test conversations (the SAE-latent CEs beside the linear ones)."""

    read_at: str                   # the head's site and pooling
    kind: str                      # the head's kind: linear, sae, ...
    token_auroc: Interval
    conversation_auroc: Interval
    benign_fpr_at_threshold: Interval
    tpr_at_benign_fpr: Interval


class CEFigures(_Model):
    ce: str
    read_at: str                   # the bank head's site and pooling
    positives: int                 # test conversations carrying the CE
    negatives: int
    benign: int
    threshold: float
    token_auroc: Interval
    conversation_auroc: Interval
    tpr_at_threshold: Interval
    fpr_at_threshold: Interval
    benign_fpr_at_threshold: Interval
    tpr_at_benign_fpr: Interval    # at the threshold that keeps FPR <= 1% on the benign pool
    length_auroc: Interval
    length_tpr_at_benign_fpr: Interval
    bow_auroc: Spread | None = None
    bow_tpr_at_benign_fpr: Spread | None = None
    random_auroc: Spread | None = None
    compared: BankFigures | None = None   # the --compare-bank's figures, when one is given


class RuleFigures(_Model):
    rule: str
    positives: int
    negatives: int
    benign: int
    score_auc: Interval | None     # soft score: positives against hard negatives + benign pool
    fire_tpr: Interval
    fire_fpr_benign: Interval
    fire_fpr_negatives: Interval
    score_tpr_at_benign_fpr: Interval | None
    length_auc: Interval
    length_tpr_at_benign_fpr: Interval
    bow_auc: Spread | None = None
    bow_tpr_at_benign_fpr: Spread | None = None


class Miss(_Model):
    subject: str
    value: float
    target: float
    by: float


class Target(_Model):
    target: str
    met: bool
    misses: list[Miss]


class DetectionReport(_Model):
    model: str
    bank: str
    compare_bank: str | None = None
    rules_from: str
    train: str
    test: str
    benign_pool: str
    seeds: int
    resamples: int
    command: str
    bank_fits: str
    ces: list[CEFigures]
    rules: list[RuleFigures]
    targets: list[Target]
    notes: list[str]
    seconds: float


def interval(value: float, values: torch.Tensor) -> Interval:
    low, high = percentile_interval(values)
    return Interval(value=value, low=low, high=high)


def spread(values: Sequence[float]) -> Spread:
    v = [float(x) for x in values]
    return Spread(mean=sum(v) / len(v), low=min(v), high=max(v), values=v)


def auc_interval(scores: torch.Tensor, labels: torch.Tensor, strata: torch.Tensor, resamples: int,
                 seed: int, units: torch.Tensor | None = None) -> Interval:
    """AUROC of rows and its interval, resampling units (`units` [rows]: each row's unit; default: rows) within
    `strata` [units]."""
    counts = resample_counts(strata, resamples, seed)
    values = torch.cat([weighted_auroc(scores, labels, w if units is None else w[:, units]) for w in counts.split(50)])
    return interval(auroc(scores, labels), values)


def rate_interval(hits: torch.Tensor, resamples: int, seed: int) -> Interval:
    """The share of `hits` and its interval."""
    hits = hits.double()
    counts = resample_counts(torch.zeros(len(hits)), resamples, seed)
    values = (counts * hits).sum(1) / counts.sum(1)
    return interval(float(hits.mean()) if len(hits) else float("nan"), values)


def tpr_on_pool(positives: torch.Tensor, pool: torch.Tensor, max_fpr: float = MAX_FPR) -> float:
    """The highest TPR on `positives` of `score > t` over thresholds that keep FPR <= max_fpr on `pool`."""
    return tpr_at_fpr(torch.cat([positives, pool]).double(),
                      torch.cat([torch.ones(len(positives)), torch.zeros(len(pool))]).bool(), max_fpr)


def pool_interval(positives: torch.Tensor, pool: torch.Tensor, resamples: int, seed: int) -> Interval:
    """`tpr_on_pool` and its interval, positives and pool resampled apart."""
    counts = resample_counts(torch.cat([torch.zeros(len(positives)), torch.ones(len(pool))]), resamples, seed).long()
    scores = torch.cat([positives, pool]).double()
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(pool))]).bool()
    values = torch.tensor([tpr_at_fpr(scores.repeat_interleave(c), labels.repeat_interleave(c), MAX_FPR)
                           for c in counts])
    return interval(tpr_on_pool(positives, pool), values)


def conversation_max(s: Scanned, column: int, scope: torch.Tensor) -> float:
    values = s.scores[scope, column]
    return float(values.max()) if len(values) else 0.0


# ---------------------------------------------------------------- baselines


def assistant_length(s: Scanned) -> float:
    """The length-only score: tokens of the assistant turns."""
    return float(s.assistant.sum())


class BagOfWords:
    """TF-IDF word 1-2 grams over a seeded 80% of the training texts; `classifier(labels)` fits a class-balanced
    logistic regression on them, `score` reads texts with it."""

    def __init__(self, texts: Sequence[str], seed: int) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
        self.rows = order[:max(2, int(0.8 * len(texts)))].tolist()
        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        self.features = self.vectorizer.fit_transform([texts[i] for i in self.rows])

    def classifier(self, labels: Sequence[bool]):
        """The logistic regression of `labels` (one per training text); DataError when the chosen texts hold one
        class only."""
        from sklearn.linear_model import LogisticRegression

        y = [bool(labels[i]) for i in self.rows]
        if len(set(y)) < 2:
            raise DataError("a bag-of-words baseline needs both classes in its training texts")
        return LogisticRegression(class_weight="balanced", max_iter=2000).fit(self.features, y)

    def score(self, classifier, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, dtype=torch.float64)
        return torch.tensor(classifier.decision_function(self.vectorizer.transform(list(texts))), dtype=torch.float64)


def conversation_text(conversation: Conversation) -> str:
    return "\n".join(m["content"] for m in conversation)


def in_scope_messages(conversations: Sequence[tuple[Conversation, tuple[bool, ...]]]) -> tuple[list[str], torch.Tensor]:
    """The in-scope messages of `(conversation, in_scope)` pairs, and the conversation each belongs to."""
    texts, owner = [], []
    for i, (conversation, in_scope) in enumerate(conversations):
        for message, inside in zip(conversation, in_scope):
            if inside:
                texts.append(message["content"])
                owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)


def per_conversation_max(scores: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.full((n,), -torch.inf, dtype=torch.float64)
    return out.scatter_reduce(0, owner, scores, reduce="amax")


# ---------------------------------------------------------------- the report


@dataclass
class Inputs:
    """Everything the report is computed from (loaded by `main`, or built by a test)."""

    handle: ModelHandle
    bank: CEBank
    rules: list
    train: CESplit
    test: CESplit
    train_rules: dict[str, tuple[list[Conversation], list[Conversation]]]
    test_rules: dict[str, tuple[list[Conversation], list[Conversation]]]
    benign: list[Conversation]
    describe: dict[str, str]      # model, bank, rules_from, train, test, benign_pool (and compare_bank)
    compare: CEBank | None = None  # another bank read on the same CE test conversations and benign pool


def ce_figures(inputs: Inputs, scanned: dict[str, Scanned], control: RandomDirections | None,
               platt: dict[int, torch.Tensor], seeds: int, resamples: int,
               compared: dict[str, Scanned] | None = None) -> tuple[list[CEFigures], list[str]]:
    """Per CE of the bank: its figures on the test split beside its baselines; `compared` holds the compare bank's
    scans of the same conversations."""
    bank, test = inputs.bank, inputs.test
    notes = []
    items = [i for i in test.items if i.scope.any()]
    scans = [scanned[key(i.conversation)] for i in items]
    for s, i in zip(scans, items):
        if len(s.scores) != len(i.labels):
            raise GavelError(f"the monitor read {len(s.scores)} tokens where the data has {len(i.labels)}: "
                             f"{i.conversation}")
    pool_scope = [s.content & torch.isin(s.roles, torch.tensor(test.roles)) for s in
                  (scanned[key(c)] for c in inputs.benign)]
    names = [n for n in bank.names if n in test.names]
    bags = ce_bags_of_words(inputs, items, [n for n in names if n in inputs.train.names], seeds)
    notes += [f"CE {n}: no bag of words (one class only in the train split)" for n in names
              if n in inputs.train.names and n not in bags]
    out = []
    for name in names:
        j, col = bank.index(name), test.names.index(name)
        positive = torch.tensor([bool(i.labels[:, col].any()) for i in items])
        if positive.all() or not positive.any():
            notes.append(f"CE {name}: the test split has no {'negative' if positive.all() else 'positive'} "
                         "conversation; left out")
            continue
        read = BankReading(bank, j, scans, [scanned[key(c)] for c in inputs.benign], items, pool_scope, col,
                           positive, resamples)
        length = torch.tensor([float((i.scope & s.content).sum()) for s, i in zip(scans, items)])
        pool_length = torch.tensor([float(scope.sum()) for scope in pool_scope])
        fig = CEFigures(
            ce=name, read_at=bank.read_at(bank.manifest.ces[j].head), positives=int(positive.sum()),
            negatives=int((~positive).sum()), benign=len(inputs.benign),
            threshold=read.threshold, token_auroc=read.token_auroc(), conversation_auroc=read.conversation_auroc(),
            tpr_at_threshold=rate_interval(read.conv[positive] > read.threshold, resamples, 3),
            fpr_at_threshold=rate_interval(read.conv[~positive] > read.threshold, resamples, 4),
            benign_fpr_at_threshold=read.benign_fpr_at_threshold(), tpr_at_benign_fpr=read.tpr_at_benign_fpr(),
            length_auroc=auc_interval(length, positive, positive.long(), resamples, 7),
            length_tpr_at_benign_fpr=pool_interval(length[positive], pool_length, resamples, 8))
        if name in bags:
            fig.bow_auroc, fig.bow_tpr_at_benign_fpr = (spread(v) for v in bags[name])
        if control is not None and j in platt:
            fig.random_auroc = spread([auroc(torch.tensor([_control_max(s, i.scope & s.content, j, k, platt[j])
                                                           for s, i in zip(scans, items)]), positive)
                                       for k in range(seeds)])
        other = inputs.compare
        if other is not None and compared is not None and name in other.names:
            k = other.index(name)
            theirs = BankReading(other, k, [compared[key(i.conversation)] for i in items],
                                 [compared[key(c)] for c in inputs.benign], items, pool_scope, col, positive, resamples)
            head = other.manifest.ces[k].head
            fig.compared = BankFigures(
                read_at=other.read_at(head), kind=other.heads[head].kind, token_auroc=theirs.token_auroc(),
                conversation_auroc=theirs.conversation_auroc(),
                benign_fpr_at_threshold=theirs.benign_fpr_at_threshold(), tpr_at_benign_fpr=theirs.tpr_at_benign_fpr())
        out.append(fig)
    return out, notes


class BankReading:
    """One bank's scores of one CE over the test conversations (`scans`, labelled `items`) and the benign pool, and
    the figures read off them; seeded like every other figure of the report, so two banks resample alike."""

    def __init__(self, bank: CEBank, j: int, scans: list[Scanned], benign: list[Scanned], items: list[Labelled],
                 pool_scope: list[torch.Tensor], col: int, positive: torch.Tensor, resamples: int) -> None:
        self.threshold, self.positive, self.resamples = float(bank.thresholds[j]), positive, resamples
        self.conv = torch.tensor([conversation_max(s, j, i.scope & s.content) for s, i in zip(scans, items)])
        self.pool = torch.tensor([conversation_max(s, j, scope) for s, scope in zip(benign, pool_scope)])
        # token level: the scoped tokens of every conversation, resampled by conversation
        self.tokens = torch.cat([s.scores[i.scope & s.content, j] for s, i in zip(scans, items)])
        self.token_labels = torch.cat([i.labels[i.scope & s.content, col] for s, i in zip(scans, items)])
        self.units = torch.cat([torch.full((int((i.scope & s.content).sum()),), n)
                                for n, (s, i) in enumerate(zip(scans, items))])

    def token_auroc(self) -> Interval:
        return auc_interval(self.tokens, self.token_labels, self.positive.long(), self.resamples, 1, self.units)

    def conversation_auroc(self) -> Interval:
        return auc_interval(self.conv, self.positive, self.positive.long(), self.resamples, 2)

    def benign_fpr_at_threshold(self) -> Interval:
        return rate_interval(self.pool > self.threshold, self.resamples, 5)

    def tpr_at_benign_fpr(self) -> Interval:
        return pool_interval(self.conv[self.positive], self.pool, self.resamples, 6)


def _control_max(s: Scanned, scope: torch.Tensor, j: int, seed: int, platt: torch.Tensor) -> float:
    """The random control's conversation score: its highest calibrated probability in scope."""
    assert s.control is not None
    raw = s.control[scope, seed, j]
    return float(torch.sigmoid(raw * platt[seed, 0] + platt[seed, 1]).max()) if len(raw) else 0.0


def ce_bags_of_words(inputs: Inputs, items: list[Labelled], names: Sequence[str], seeds: int
                     ) -> dict[str, tuple[list[float], list[float]]]:
    """The bag of words per CE: trained on the train split's messages (message-level labels), each test conversation
    (and benign one) scored by its highest in-scope message; per CE, its AUROC and TPR at 1% benign FPR per seed."""
    texts, labels = [], []
    for item in inputs.train.items:
        for message, carried in zip(item.conversation, item.messages):
            if message["content"].strip():
                texts.append(message["content"])
                labels.append(carried)
    label_matrix = torch.stack(labels)
    test_texts, test_owner = in_scope_messages([(i.conversation, i.in_scope) for i in items])
    pool_texts, pool_owner = in_scope_messages([(c, inputs.test.in_scope(c)) for c in inputs.benign])
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for seed in range(seeds):
        bow = BagOfWords(texts, seed)
        for name in names:
            test_col, train_col = inputs.test.names.index(name), inputs.train.names.index(name)
            positive = torch.tensor([bool(i.labels[:, test_col].any()) for i in items])
            try:
                classifier = bow.classifier(label_matrix[:, train_col].tolist())
            except DataError:
                out.pop(name, None)
                continue
            if name not in out:
                continue
            conv = per_conversation_max(bow.score(classifier, test_texts), test_owner, len(items))
            pool = per_conversation_max(bow.score(classifier, pool_texts), pool_owner, len(inputs.benign))
            out[name][0].append(auroc(conv, positive))
            out[name][1].append(tpr_on_pool(conv[positive], pool))
    return out


def fit_control(monitor: Monitor, control: RandomDirections, train: CESplit, limit: int,
                batch_size: int) -> dict[int, torch.Tensor]:
    """Platt scaling of each CE's random directions on the train split's conversations, as the bank calibrates
    its probes (every content token, labelled or not): per CE [seeds, 2] (scale, shift)."""
    from gavel.probes.calibration import PlattScaling

    items = subsample(list(train.items), limit)
    scanned = scan_all(monitor, [i.conversation for i in items], control, batch_size, "train (random control)")
    out = {}
    for j, name in enumerate(control.bank.names):
        if name not in train.names or not control.covers(j):
            continue
        col = train.names.index(name)
        rows = [(scanned[key(i.conversation)], i) for i in items]
        raw = torch.cat([s.control[s.content, :, j] for s, _ in rows if s.control is not None])   # [N, seeds]
        y = torch.cat([i.labels[s.content, col] for s, i in rows])
        if y.all() or not y.any():
            continue
        platt = PlattScaling().fit(raw, y[:, None].expand(-1, control.seeds))
        out[j] = torch.stack([platt.scale_, platt.shift_], 1)
    return out


def rule_figures(inputs: Inputs, scanned: dict[str, Scanned], seeds: int, resamples: int
                 ) -> tuple[list[RuleFigures], list[str]]:
    notes = []
    benign = [scanned[key(c)] for c in inputs.benign]
    public = [r.name for r in inputs.rules if not r.private]
    out = []
    for name in public:
        if name not in inputs.test_rules:
            notes.append(f"rule {name}: no test set in the test split")
            continue
        pos_c, neg_c = inputs.test_rules[name]
        pos, neg = [scanned[key(c)] for c in pos_c], [scanned[key(c)] for c in neg_c]
        if not pos:
            notes.append(f"rule {name}: its test set has no positive")
            continue
        everything = pos + neg + benign
        strata = torch.tensor([0] * len(pos) + [1] * len(neg) + [2] * len(benign))
        truth = strata == 0
        soft = [s.soft.get(name) for s in everything]
        score_auc = score_tpr = None
        if all(v is not None for v in soft):
            values = torch.tensor(soft, dtype=torch.float64)
            score_auc = auc_interval(values, truth, strata, resamples, 11)
            score_tpr = pool_interval(values[strata == 0], values[strata == 2], resamples, 12)
        length = torch.tensor([assistant_length(s) for s in everything])
        fig = RuleFigures(
            rule=name, positives=len(pos), negatives=len(neg), benign=len(benign), score_auc=score_auc,
            fire_tpr=rate_interval(torch.tensor([name in s.fired for s in pos]), resamples, 13),
            fire_fpr_benign=rate_interval(torch.tensor([name in s.fired for s in benign]), resamples, 14),
            fire_fpr_negatives=rate_interval(torch.tensor([name in s.fired for s in neg]), resamples, 15),
            score_tpr_at_benign_fpr=score_tpr,
            length_auc=auc_interval(length, truth, strata, resamples, 16),
            length_tpr_at_benign_fpr=pool_interval(length[strata == 0], length[strata == 2], resamples, 17))
        if name in inputs.train_rules:
            train_pos, train_neg = inputs.train_rules[name]
            texts = [conversation_text(c) for c in train_pos + train_neg + inputs.train.neutral()]
            labels = [True] * len(train_pos) + [False] * (len(texts) - len(train_pos))
            everything_c = pos_c + neg_c + inputs.benign
            aucs, tprs = [], []
            for seed in range(seeds):
                bow = BagOfWords(texts, seed)
                scores = bow.score(bow.classifier(labels), [conversation_text(c) for c in everything_c])
                aucs.append(auroc(scores, truth))
                tprs.append(tpr_on_pool(scores[strata == 0], scores[strata == 2]))
            fig.bow_auc, fig.bow_tpr_at_benign_fpr = spread(aucs), spread(tprs)
        else:
            notes.append(f"rule {name}: no test set in the train split, so no bag of words")
        out.append(fig)
    return out, notes


def targets(ces: list[CEFigures], rules: list[RuleFigures], organism: bool) -> list[Target]:
    """The issue's targets, each met or missed (by how much, per CE or rule)."""
    def target(text: str, misses: list[Miss]) -> Target:
        return Target(target=text, met=not misses, misses=misses)

    def below(subject: str, value: float, bar: float) -> list[Miss]:
        return [Miss(subject=subject, value=value, target=bar, by=bar - value)] if not value >= bar else []

    out = [target("per-CE conversation AUROC >= 0.95",
                  [m for c in ces for m in below(c.ce, c.conversation_auroc.value, 0.95)])]
    if organism:
        out.append(target("per-CE token AUROC >= 0.97",
                          [m for c in ces for m in below(c.ce, c.token_auroc.value, 0.97)]))
    if rules:
        out.append(target("per-rule firing TPR >= 0.90 on the test positives",
                          [m for r in rules for m in below(r.rule, r.fire_tpr.value, 0.90)]))
        out.append(target("per-rule firing FPR <= 0.01 on the benign pool",
                          [Miss(subject=r.rule, value=r.fire_fpr_benign.value, target=MAX_FPR,
                                by=r.fire_fpr_benign.value - MAX_FPR)
                           for r in rules if not r.fire_fpr_benign.value <= MAX_FPR]))
        out.append(target("per-rule soft-score TPR >= 0.90 at FPR <= 0.01 on the benign pool",
                          [m for r in rules for m in below(r.rule, r.score_tpr_at_benign_fpr.value
                                                           if r.score_tpr_at_benign_fpr else float("nan"), 0.90)]))
        out.append(target("every rule's soft-score AUC above length-only",
                          [m for r in rules for m in below(r.rule, r.score_auc.value if r.score_auc else float("nan"),
                                                           r.length_auc.value + 1e-9)]))
        out.append(target("every rule's soft-score AUC above the bag of words (its mean over seeds)",
                          [m for r in rules if r.bow_auc for m in below(
                              r.rule, r.score_auc.value if r.score_auc else float("nan"), r.bow_auc.mean + 1e-9)]))
    return out


def build_report(inputs: Inputs, *, seeds: int = 3, resamples: int = 1000, batch_size: int = 16,
                 control_limit: int = 400, command: str = "") -> DetectionReport:
    """Scan everything once through the monitor and compute every figure."""
    started = time.perf_counter()
    monitor = Monitor(inputs.handle, inputs.bank, inputs.rules, score="all")
    control = RandomDirections(inputs.bank, seeds) if seeds > 0 else None
    every = ([i.conversation for i in inputs.test.items] + inputs.benign
             + [c for pos, neg in inputs.test_rules.values() for c in pos + neg])
    scanned = scan_all(monitor, every, control, batch_size, "test")
    compared = None
    if inputs.compare is not None:
        other = Monitor(inputs.handle, inputs.compare, [], score="all")
        compared = scan_all(other, [i.conversation for i in inputs.test.items] + inputs.benign, None, batch_size,
                            "test (compare bank)")
    platt = fit_control(monitor, control, inputs.train, control_limit, batch_size) if control else {}
    ces, ce_notes = ce_figures(inputs, scanned, control, platt, seeds, resamples, compared)
    rules, rule_notes = rule_figures(inputs, scanned, seeds, resamples)
    notes = ce_notes + rule_notes
    off = [c.ce for c in ces if c.random_auroc and not 0.4 <= c.random_auroc.mean <= 0.6]
    if off:
        notes.append(f"random control away from 0.5 (mean outside [0.4, 0.6]): {', '.join(off)}")
    paired = torch.tensor([[c.random_auroc.mean, c.length_auroc.value] for c in ces if c.random_auroc])
    if len(paired) >= 3:
        r = float(torch.corrcoef(paired.T)[0, 1])
        notes.append(f"across CEs, the random control's AUROC follows the length-only AUROC (Pearson r = {r:.2f}): "
                     "a conversation's highest score over more tokens is higher, whatever the direction")
    if control is not None:
        missing = [n for j, n in enumerate(inputs.bank.names) if n in inputs.test.names and j not in platt]
        if missing:
            notes.append(f"no random control for {', '.join(missing)} (not a linear head, or no positive token in "
                         "the train conversations it is calibrated on)")
    return DetectionReport(
        **inputs.describe, seeds=seeds, resamples=resamples, command=command,
        bank_fits="one fit, not refitted per seed: the seeds vary the baselines and the random control",
        ces=ces, rules=rules, targets=targets(ces, rules, inputs.describe["model"] == ORGANISM), notes=notes,
        seconds=round(time.perf_counter() - started, 1))


# ---------------------------------------------------------------- markdown


def _iv(x: Interval | None) -> str:
    if x is None:
        return "n/a"
    return f"{x.value:.3f} [{x.low:.3f}, {x.high:.3f}]"


def _sp(x: Spread | None) -> str:
    return "n/a" if x is None else f"{x.mean:.3f} ({x.low:.3f}-{x.high:.3f})"


def markdown(report: DetectionReport) -> str:
    """The report as markdown tables: per CE and per rule, the method beside its baselines, then the targets."""
    lines = [
        f"# Detection figures: `{report.model}`", "",
        f"Generated by `{report.command}` ({report.seconds:.0f} s).", "",
        f"Model `{report.model}`, bank `{report.bank}` ({report.bank_fits}), rules `{report.rules_from}`. "
        f"Baselines fitted on `{report.train}`; every figure on `{report.test}` and the benign pool "
        f"`{report.benign_pool}`, which nothing was fitted or tuned on. Intervals: 95% bootstrap over test "
        f"conversations ({report.resamples} resamples, seeded); bag of words and random control: mean "
        f"(lowest-highest) over {report.seeds} seeds.", "",
        "## Targets", ""]
    for t in report.targets:
        detail = "met" if t.met else "missed: " + ", ".join(
            f"{m.subject} {m.value:.3f} (by {m.by:.3f})" for m in t.misses)
        lines.append(f"- {t.target}: **{detail}**")
    lines += ["", "## Per CE", "",
              "Conversation score: the highest calibrated probability in the labelled turns. TPR/FPR at the bank's "
              "threshold; TPR at 1% FPR: at the threshold that keeps FPR <= 1% on the benign pool.", "",
              "| CE | pos / neg / benign | token AUROC | conversation AUROC | TPR at threshold | FPR at threshold | "
              "benign FPR at threshold | TPR at 1% benign FPR | length AUROC | length TPR at 1% | bag-of-words AUROC "
              "| bag-of-words TPR at 1% | random direction AUROC |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report.ces:
        lines.append(f"| {c.ce} | {c.positives} / {c.negatives} / {c.benign} | {_iv(c.token_auroc)} | "
                     f"{_iv(c.conversation_auroc)} | {_iv(c.tpr_at_threshold)} | {_iv(c.fpr_at_threshold)} | "
                     f"{_iv(c.benign_fpr_at_threshold)} | {_iv(c.tpr_at_benign_fpr)} | {_iv(c.length_auroc)} | "
                     f"{_iv(c.length_tpr_at_benign_fpr)} | {_sp(c.bow_auroc)} | {_sp(c.bow_tpr_at_benign_fpr)} | "
                     f"{_sp(c.random_auroc)} |")
    compared = [c for c in report.ces if c.compared is not None]
    if compared:
        lines += ["", f"## Per CE: `{report.bank}` beside `{report.compare_bank}`", "",
                  "Both banks read the same test conversations and benign pool; intervals resample them alike.", "",
                  "| CE | read at | token AUROC | conversation AUROC | TPR at 1% benign FPR | compared: read at | "
                  "compared: kind | compared: token AUROC | compared: conversation AUROC | compared: TPR at 1% benign "
                  "FPR | compared: benign FPR at its threshold |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in compared:
            o = c.compared
            assert o is not None
            lines.append(f"| {c.ce} | {c.read_at} | {_iv(c.token_auroc)} | {_iv(c.conversation_auroc)} | "
                         f"{_iv(c.tpr_at_benign_fpr)} | {o.read_at} | {o.kind} | {_iv(o.token_auroc)} | "
                         f"{_iv(o.conversation_auroc)} | {_iv(o.tpr_at_benign_fpr)} | "
                         f"{_iv(o.benign_fpr_at_threshold)} |")
    if report.rules:
        lines += ["", "## Per rule", "",
                  "Score AUC: the rule's soft score, test positives against hard negatives and the benign pool. "
                  "Fires: the rule's real verdict.", "",
                  "| rule | pos / hard neg / benign | score AUC | fires: TPR | fires: FPR benign | fires: FPR hard neg "
                  "| score TPR at 1% benign FPR | length AUC | length TPR at 1% | bag-of-words AUC | "
                  "bag-of-words TPR at 1% |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report.rules:
            lines.append(f"| {r.rule} | {r.positives} / {r.negatives} / {r.benign} | {_iv(r.score_auc)} | "
                         f"{_iv(r.fire_tpr)} | {_iv(r.fire_fpr_benign)} | {_iv(r.fire_fpr_negatives)} | "
                         f"{_iv(r.score_tpr_at_benign_fpr)} | {_iv(r.length_auc)} | "
                         f"{_iv(r.length_tpr_at_benign_fpr)} | {_sp(r.bow_auc)} | {_sp(r.bow_tpr_at_benign_fpr)} |")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def shown(path: Path | str) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_inputs(args: argparse.Namespace) -> Inputs:
    """The model, bank, rules and data the arguments name. With `--model builtin:organism`, what is not given comes
    from the organism: the demo's bank recipe and rules, and (without `--test`) its corpus as train and test data."""
    from gavel.models.loading import load_model
    from gavel.rules import load_rules

    handle = load_model(args.model)
    organism = args.model == ORGANISM
    packs = ROOT / "gavel" / "packs" / "smollm2"
    n, seed = ORGANISM_TRAIN
    if args.bank is None and organism:
        from gavel.organism.datasets import organism_dataset
        from gavel.organism.demo import demo_sites
        from gavel.probes.fit import fit_bank

        print("fitting the organism's bank (the demo's recipe)", file=sys.stderr)
        bank = fit_bank(handle, organism_dataset(handle.tokenizer, n, seed=seed), demo_sites(handle.n_layers))
        bank_name = f"fitted here: organism corpus, {n} conversations, seed {seed} (as gavel demo)"
    else:
        bank_path = args.bank or packs / "bank"
        bank, bank_name = CEBank.load(bank_path, handle.fingerprint()), shown(bank_path)
    if args.rules is not None:
        rules_path = args.rules
    elif organism:
        from gavel.organism.demo import DEMO_RULES

        rules_path = DEMO_RULES
    else:
        rules_path = packs / "rules"
    train_rules: dict = {}
    test_rules: dict = {}
    if organism and args.test is None:
        train = organism_ces(handle.tokenizer, n, seed)
        test = organism_ces(handle.tokenizer, *ORGANISM_TEST,
                            exclude=frozenset(key(i.conversation) for i in train.items))
        benign = ([i.conversation for i in test.items if not i.labels.any() and i.conversation[-1]["role"] ==
                   "assistant"] if args.benign is None else read_pool(args.benign, args.benign_limit))
        describe = {"train": f"organism corpus, {n} conversations, seed {seed}",
                    "test": f"organism corpus, {ORGANISM_TEST[0]} conversations, seed {ORGANISM_TEST[1]}, "
                            f"less those in the train corpus ({len(test.items)} left)",
                    "benign_pool": shown(args.benign) if args.benign else "test conversations with no concept"}
    else:
        train_dir, test_dir = args.train or ROOT / "data/english/train", args.test or ROOT / "data/english/test"
        benign_path = args.benign or ROOT / "data/english/benign/test.jsonl"
        train, test = library_ces(train_dir, handle.tokenizer), library_ces(test_dir, handle.tokenizer, args.per_file)
        train_rules, test_rules = rule_tests(train_dir), rule_tests(test_dir, args.per_file)
        benign = read_pool(benign_path, args.benign_limit)
        part = "" if args.per_file is None else f" (at most {args.per_file} conversations of each file)"
        describe = {"train": shown(train_dir), "test": f"{shown(test_dir)}{part}", "benign_pool":
                    shown(benign_path) + ("" if args.benign_limit is None else f" (at most {args.benign_limit})")}
    compare = None
    if args.compare_bank is not None:
        compare = CEBank.load(args.compare_bank, handle.fingerprint())
        describe["compare_bank"] = shown(args.compare_bank)
    return Inputs(handle, bank, load_rules([str(rules_path)]), train, test, train_rules, test_rules, benign,
                  {"model": args.model, "bank": bank_name, "rules_from": shown(rules_path), **describe}, compare)


def main(argv: Sequence[str] | None = None) -> DetectionReport:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2")
    parser.add_argument("--bank", type=Path, help="CE bank (default: gavel/packs/smollm2/bank; the organism: fitted)")
    parser.add_argument("--compare-bank", type=Path, help="another CE bank (an SAE-latent one) whose CEs are read on "
                                                          "the same test conversations and shown beside the bank's")
    parser.add_argument("--rules", type=Path, help="rules (default: gavel/packs/smollm2/rules)")
    parser.add_argument("--train", type=Path, help="train split (default: data/english/train)")
    parser.add_argument("--test", type=Path, help="test split (default: data/english/test)")
    parser.add_argument("--benign", type=Path, help="benign pool (default: data/english/benign/test.jsonl)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--per-file", type=int, help="at most this many conversations of each test file (a seeded "
                                                      "choice; default: all)")
    parser.add_argument("--benign-limit", type=int, help="at most this many benign conversations (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--control-conversations", type=int, default=400,
                        help="train conversations the random control is calibrated on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-json", type=Path, default=ROOT / "benchmarks/results/detection_report.json")
    parser.add_argument("--out-md", type=Path, default=ROOT / "docs/detection_figures.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/detection_report.py", *argv])
    report = build_report(load_inputs(args), seeds=args.seeds, resamples=args.resamples, batch_size=args.batch_size,
                          control_limit=args.control_conversations, command=command)
    for path, text in ((args.out_json, report.model_dump_json(indent=2) + "\n"), (args.out_md, markdown(report))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

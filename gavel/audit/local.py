"""`gavel audit`: run a guard over prompts or conversations and report what the rules flag.

With expected labels (a `label` per JSONL line, or GAVEL test sets: positive*.json, negative*.json) each rule gets
precision, recall and FPR of its firing, the ROC-AUC of firing (a binary score) and of its continuous soft score
(gavel.rules.compile.soft: a real ranking), beside the AUC that conversation length alone gets: a baseline any
detector must beat, since rule test sets are easily confounded by length. An item from a GAVEL rule's test set is
labelled for that rule only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gavel.io.conversations import AuditItem
from gavel.probes.metrics import auroc
from gavel.rules import RuleSpec
from gavel.rules.compile.soft import SoftRules
from gavel.runtime.guard import Guard, GuardResult
from gavel.runtime.monitor import soft_scores


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemReport(_Report):
    source: str
    line: int
    label: bool | None
    verdict: str
    tokens: int
    reply: str
    events: list[dict]
    rule: str | None = None                 # the rule whose test set it comes from (its label is about that rule)
    rule_scores: dict[str, float | None] = {}   # each rule's soft score (None: not defined for that rule)


class RuleStats(_Report):
    """How often a rule fired; with labels, how well its firing separates the two classes."""

    rule: str
    title: str
    severity: str
    fires: int
    labelled: int = 0                 # items with a label for this rule (positives + negatives)
    positives: int = 0
    precision: float | None = None
    recall: float | None = None
    fpr: float | None = None
    auc: float | None = None          # of firing (a binary score)
    score_auc: float | None = None    # of the continuous soft score
    length_auc: float | None = None   # what ranking by token count alone gets on the same items


class AuditReport(_Report):
    model: str
    generated: bool
    items: list[ItemReport]
    rules: list[RuleStats]

    @property
    def violations(self) -> int:
        return sum(item.verdict != "clean" for item in self.items)


def run_audit(guard: Guard, items: Sequence[AuditItem], *, generate: bool = True, max_new_tokens: int = 64,
              batch_size: int = 16, progress: Callable[[int], None] | None = None) -> AuditReport:
    """Guard every item (generating a reply, or reading the conversation as it is) and summarise."""
    results = guard_items(guard, items, generate=generate, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          progress=progress)
    return summarise(guard.handle.name, guard.monitor.rules, items, results, generate=generate,
                     soft=guard.monitor.soft)


def guard_items(guard: Guard, items: Sequence[AuditItem], *, generate: bool = True, max_new_tokens: int = 64,
                batch_size: int = 16, progress: Callable[[int], None] | None = None) -> list[GuardResult]:
    """The guard's result for every item, in batches."""
    results: list[GuardResult] = []
    for start in range(0, len(items), batch_size):
        chunk = [item.conversation for item in items[start:start + batch_size]]
        results += guard.generate(chunk, max_new_tokens=max_new_tokens) if generate else guard.check(chunk)
        if progress is not None:
            progress(len(chunk))
    return results


def summarise(model: str, rules: Sequence[RuleSpec], items: Sequence[AuditItem], results: Sequence[GuardResult],
              *, generate: bool, soft: SoftRules | None = None) -> AuditReport:
    """Per-item verdicts and per-rule statistics of the rules a guard reports (`guard.monitor.rules`); with `soft`
    (`guard.monitor.soft`, or SoftRules over all the rules and the bank's CEs) the rules' soft scores too."""
    reports = []
    for item, r in zip(items, results):
        scores = soft_scores(soft, r.record) if soft is not None else []
        reports.append(ItemReport(source=item.source, line=item.line, label=item.label, verdict=r.verdict,
                                  tokens=len(r.record.tokens), reply=r.text, events=r.to_dict()["events"],
                                  rule=item.rule, rule_scores=dict(zip(soft.rule_names, scores)) if soft else {}))
    return AuditReport(model=model, generated=generate, items=reports, rules=[_stats(rule, reports) for rule in rules])


def _stats(rule, reports: Sequence[ItemReport]) -> RuleStats:
    fired = [any(e["rule"] == rule.name for e in r.events) for r in reports]
    stats = RuleStats(rule=rule.name, title=rule.title or rule.name, severity=rule.severity, fires=sum(fired))
    labelled = [(f, r) for f, r in zip(fired, reports)
                if r.label is not None and r.rule in (None, rule.name)]   # a test set labels its own rule only
    if not labelled:
        return stats
    labels = [bool(r.label) for _, r in labelled]
    positives = sum(labels)
    negatives = len(labelled) - positives
    tp = sum(f and y for (f, _), y in zip(labelled, labels))
    fp = sum(f and not y for (f, _), y in zip(labelled, labels))
    stats.labelled, stats.positives = len(labelled), positives
    stats.precision = tp / (tp + fp) if tp + fp else None
    stats.recall = tp / positives if positives else None
    stats.fpr = fp / negatives if negatives else None
    if positives and negatives:
        import torch

        truth = torch.tensor(labels)
        stats.auc = auroc(torch.tensor([float(f) for f, _ in labelled]), truth)
        stats.length_auc = auroc(torch.tensor([float(r.tokens) for _, r in labelled]), truth)
        scores = [r.rule_scores.get(rule.name) for _, r in labelled]
        if all(s is not None for s in scores):
            stats.score_auc = auroc(torch.tensor(scores, dtype=torch.float64), truth)
    return stats


def sarif(report: AuditReport, rules) -> dict:
    """The report as SARIF 2.1.0: one result per rule firing, ruleIds are the rule names."""
    level = {"critical": "error", "high": "error", "medium": "warning", "low": "note"}
    driver_rules = [{"id": r.name, "name": r.name, "shortDescription": {"text": r.title or r.name},
                     "fullDescription": {"text": r.description or r.definition or r.title or r.name},
                     "defaultConfiguration": {"level": level[r.severity]},
                     "properties": {"severity": r.severity, "tags": list(r.tags)}} for r in rules]
    index = {r.name: i for i, r in enumerate(rules)}
    severity = {r.name: r.severity for r in rules}
    results = []
    for item in report.items:
        for e in item.events:
            region = {"startLine": item.line} if item.line else {}
            results.append({
                "ruleId": e["rule"], "ruleIndex": index[e["rule"]], "level": level[severity[e["rule"]]],
                "message": {"text": e["message"] or f"{e['title']}: {e['action']} at token {e['token_index']} "
                                                     f"{e['token']!r}"},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": Path(item.source).as_posix()},
                                                    **({"region": region} if region else {})}}],
                "properties": {"action": e["action"], "token_index": e["token_index"], "token": e["token"],
                               "ces": e["ces"]}})
    from gavel import __version__

    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
            "runs": [{"tool": {"driver": {"name": "gavel", "version": __version__,
                                          "informationUri": "https://pypi.org/project/gavelkit/",
                                          "rules": driver_rules}},
                      "results": results}]}

"""`gavel audit`: run a guard over prompts or conversations and report what the rules flag.

With expected labels (a `label` per JSONL line, or GAVEL `positive.json` / `negative.json` sets) each rule
gets precision, recall, FPR and ROC-AUC, beside the AUC that conversation length alone would get: rule test
sets are easily confounded by length.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gavel.io.conversations import AuditItem
from gavel.probes.metrics import auroc
from gavel.rules import RuleSpec
from gavel.runtime.guard import Guard, GuardResult


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


class RuleStats(_Report):
    """How often a rule fired; with labels, how well its firing separates the two classes."""

    rule: str
    title: str
    severity: str
    fires: int
    precision: float | None = None
    recall: float | None = None
    fpr: float | None = None
    auc: float | None = None
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
    return summarise(guard.handle.name, guard.monitor.rules, items, results, generate=generate)


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
              *, generate: bool) -> AuditReport:
    """Per-item verdicts and per-rule statistics of the rules a guard reports (`guard.monitor.rules`)."""
    reports = [ItemReport(source=item.source, line=item.line, label=item.label, verdict=r.verdict,
                          tokens=len(r.record.tokens), reply=r.text, events=r.to_dict()["events"])
               for item, r in zip(items, results)]
    return AuditReport(model=model, generated=generate, items=reports, rules=[_stats(rule, reports) for rule in rules])


def _stats(rule, reports: Sequence[ItemReport]) -> RuleStats:
    fired = [any(e["rule"] == rule.name for e in r.events) for r in reports]
    stats = RuleStats(rule=rule.name, title=rule.title or rule.name, severity=rule.severity, fires=sum(fired))
    labelled = [(f, r.label, r.tokens) for f, r in zip(fired, reports) if r.label is not None]
    positives = sum(label for _, label, _ in labelled)
    if not labelled:
        return stats
    tp = sum(f and label for f, label, _ in labelled)
    fp = sum(f and not label for f, label, _ in labelled)
    negatives = len(labelled) - positives
    stats.precision = tp / (tp + fp) if tp + fp else None
    stats.recall = tp / positives if positives else None
    stats.fpr = fp / negatives if negatives else None
    if positives and negatives:
        import torch

        labels = torch.tensor([label for _, label, _ in labelled])
        stats.auc = auroc(torch.tensor([float(f) for f, _, _ in labelled]), labels)
        stats.length_auc = auroc(torch.tensor([float(n) for _, _, n in labelled]), labels)
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

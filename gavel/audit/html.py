"""A self-contained HTML page for an audit: rule statistics, then every conversation as a per-token heat map of
its strongest CE score, the tokens where rules fired outlined and labelled. No scripts, no external files."""
from __future__ import annotations

from collections.abc import Sequence
from html import escape

from gavel.audit.local import AuditReport
from gavel.runtime.guard import GuardResult

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.item{border-top:1px solid #ddd;padding:.8em 0}.meta{color:#555;font-size:.9em}
.tok{font-family:ui-monospace,monospace;white-space:pre-wrap;padding:0 1px;border-radius:2px}
.fired{outline:2px solid #c00}.resp{border-bottom:2px solid #36c}
.verdict-block{color:#c00;font-weight:bold}.verdict-alert{color:#c60;font-weight:bold}
"""


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _heat(score: float) -> str:
    """White (0) to red (1)."""
    level = max(0.0, min(1.0, score))
    channel = int(255 * (1 - 0.75 * level))
    return f"background:rgb(255,{channel},{channel})"


def audit_html(report: AuditReport, results: Sequence[GuardResult], ce_names: Sequence[str]) -> str:
    """The page, as one string."""
    rows = "".join(f"<tr><td>{escape(r.rule)}</td><td>{escape(r.severity)}</td><td>{r.fires}</td>"
                   f"<td>{_fmt(r.precision)}</td><td>{_fmt(r.recall)}</td><td>{_fmt(r.fpr)}</td>"
                   f"<td>{_fmt(r.auc)}</td><td>{_fmt(r.length_auc)}</td></tr>" for r in report.rules)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gavel audit</title><style>{_STYLE}</style>"
             f"</head><body><h1>gavel audit: {escape(report.model)}</h1>"
             f"<p>{len(report.items)} conversations, {report.violations} flagged; "
             f"{'generated replies' if report.generated else 'conversations read as they are'}. Token colour: the "
             f"strongest CE score at that token; outlined: a rule first holds there; underlined: the response.</p>"
             "<table><tr><th>rule</th><th>severity</th><th>fires</th><th>precision</th><th>recall</th><th>FPR</th>"
             f"<th>AUC</th><th>length-only AUC</th></tr>{rows}</table>"]
    for item, result in zip(report.items, results):
        record = result.record
        fired: dict[int, list[str]] = {}
        for e in result.events:
            fired.setdefault(e.token_index, []).append(f"{e.rule} ({e.action})")
        tokens = []
        for t, token in enumerate(record.tokens):
            scores = record.scores[t]
            top = int(scores.argmax()) if len(ce_names) else 0
            best = float(scores[top]) if len(ce_names) else 0.0
            tip = f"{ce_names[top]} {best:.2f}" if len(ce_names) else ""
            classes = "tok" + (" fired" if t in fired else "") + (" resp" if t >= record.prompt_length else "")
            title = escape("; ".join([tip, *fired.get(t, [])]), quote=True)
            tokens.append(f"<span class='{classes}' style='{_heat(best)}' title='{title}'>{escape(token)}</span>")
        events = ", ".join(f"{escape(e.rule)} at token {e.token_index} {escape(repr(e.token))}" for e in result.events)
        label = "" if item.label is None else f"; expected: {'violation' if item.label else 'clean'}"
        parts.append(f"<div class='item'><div class='meta'>{escape(item.source)}:{item.line} &middot; verdict "
                     f"<span class='verdict-{escape(item.verdict)}'>{escape(item.verdict)}</span>{label}"
                     f"{' &middot; ' + events if events else ''}</div><p>{' '.join(tokens)}</p>"
                     f"<div class='meta'>reply: {escape(item.reply)}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)

"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: counters with
labels, one gauge and a latency histogram, safe to update from any thread."""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """What `/metrics` reports; every update takes one lock (updates are a few per request)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)       # (endpoint, status)
        self._completions: dict[str, int] = defaultdict(int)               # finish_reason
        self._verdicts: dict[str, int] = defaultdict(int)
        self._fires: dict[tuple[str, str], int] = defaultdict(int)          # (rule, action)
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._latency_counts = [0] * (len(self.buckets) + 1)                # the last is +Inf
        self._latency_sum = 0.0
        self.queued = 0                                                     # set by the app: waiting or running

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, str(status))] += 1

    def completion(self, *, prompt_tokens: int, completion_tokens: int, finish_reason: str, verdict: str | None,
                   fires: Iterable[tuple[str, str]], seconds: float) -> None:
        """One finished chat completion: its tokens, how it ended, its verdict, the (rule, action) firings and
        its latency (request received to last byte produced)."""
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._generated_tokens += completion_tokens
            self._completions[finish_reason] += 1
            if verdict is not None:
                self._verdicts[verdict] += 1
            for key in fires:
                self._fires[key] += 1
            self._latency_sum += seconds
            self._latency_counts[next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))] += 1

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []
            _family(lines, "gavel_serve_requests_total", "counter", "HTTP requests by endpoint and status code.",
                    [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self._requests.items())])
            _family(lines, "gavel_serve_completions_total", "counter", "Chat completions by finish reason.",
                    [({"finish_reason": f}, n) for f, n in sorted(self._completions.items())])
            _family(lines, "gavel_serve_verdicts_total", "counter",
                    "Guarded chat completions by verdict (the strongest action taken).",
                    [({"verdict": v}, n) for v, n in sorted(self._verdicts.items())])
            _family(lines, "gavel_serve_rule_fires_total", "counter",
                    "Rule firings (at most one per rule and request) by rule and action.",
                    [({"rule": r, "action": a}, n) for (r, a), n in sorted(self._fires.items())])
            _family(lines, "gavel_serve_prompt_tokens_total", "counter", "Prompt tokens read.",
                    [({}, self._prompt_tokens)])
            _family(lines, "gavel_serve_generated_tokens_total", "counter", "Tokens generated.",
                    [({}, self._generated_tokens)])
            _family(lines, "gavel_serve_queued_requests", "gauge",
                    "Chat completions waiting for the model or generating (one runs at a time).",
                    [({}, self.queued)])
            name = "gavel_serve_request_duration_seconds"
            lines += [f"# HELP {name} Chat completion latency, request received to last token sent.",
                      f"# TYPE {name} histogram"]
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), self._latency_counts):
                cumulative += count
                lines.append(f"{name}_bucket{_labels({'le': _number(bound)})} {cumulative}")
            lines += [f"{name}_sum {_number(self._latency_sum)}", f"{name}_count {cumulative}"]
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))

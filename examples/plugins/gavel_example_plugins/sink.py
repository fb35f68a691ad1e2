"""`file_sink(path="events.jsonl")`: a log-kind rule action that appends each event of a batch to a JSONL file.

gavel calls `handle(events, arguments)` on the host once per batch (a generate() call, or a scan batch) with the
events of each rule that names the action; `arguments` is the validated `params` model of the rule's call.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class FileSinkArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    path: str = Field(description="the JSONL file the events are appended to")


class FileSinkAction:
    """Record the event, and append it as one JSON line to `path`."""

    name: ClassVar[str] = "file_sink"
    kind: ClassVar[str] = "log"
    stops_generation: ClassVar[bool] = False
    params: ClassVar[type[BaseModel] | None] = FileSinkArgs
    takes_text: ClassVar[bool] = False
    implemented: ClassVar[bool] = True

    def handle(self, events: Sequence, arguments: FileSinkArgs) -> None:
        lines = [json.dumps({"rule": e.rule, "severity": e.severity, "sequence": e.sequence,
                             "token_index": e.token_index, "token": e.token, "ces": e.ces}) for e in events]
        path = Path(arguments.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

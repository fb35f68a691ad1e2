"""The audit log: append-only JSONL of guard results, whole lines only, flushed and fsynced per batch.

A batch is one `os.write` of complete lines to a file opened with O_APPEND; opening a log whose last line was
cut (a crash mid-write) truncates that partial line first, so readers only ever see whole records.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from gavel.errors import DataError


class AuditLog:
    """Appends records (JSON-serialisable mappings) as lines; use as a context manager or call `close()`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._repair()

    def _repair(self) -> None:
        """Drop a trailing partial line left by a writer that died mid-write."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(0)
            keep = f.read().rfind(b"\n") + 1
        os.truncate(self.path, keep)

    def write(self, records: Iterable[Mapping]) -> int:
        """Append a batch of records atomically as whole lines, then fsync; returns how many were written."""
        lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
        if not lines:
            return 0
        data = ("\n".join(lines) + "\n").encode()
        written = os.write(self._fd, data)
        while written < len(data):   # a short write to a regular file is rare; finish the batch
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        return len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_audit_log(path: str | os.PathLike[str]) -> Iterator[dict]:
    """The records of a log, in order; DataError naming the line for anything that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON line: {e.msg}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield record

"""Conversations and the files that hold them: role names and codes, message validation, GAVEL test sets
(`{"conversations": [...]}`) and audit data (JSONL prompts or conversations with optional labels)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gavel.errors import DataError, Location

ROLES: tuple[str, ...] = ("none", "system", "user", "assistant")
ROLE_NONE, ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = range(4)

Conversation = Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Problem:
    """A prompt and the answer a correct reply gives (arithmetic, a quiz item): what accuracy is measured on."""

    conversation: Conversation
    expected: str


def role_code(role: str) -> int:
    """The role mask code for a role name; DataError for anything else."""
    if role not in ROLES[1:]:
        raise DataError(f"unknown role {role!r}; expected one of system, user, assistant")
    return ROLES.index(role)


def validate_conversation(messages: Conversation) -> list[dict[str, str]]:
    """Plain dicts with a known role and string content, so templates get what they expect."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError("a conversation must be a list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} must have 'role' and 'content'")
        role_code(m["role"])
        if not isinstance(m["content"], str):
            raise DataError(f"message {i}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """A GAVEL test set `{"conversations": [[{role, content}, ...], ...]}`; raises DataError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", location=Location(str(path), e.lineno, e.colno)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read this test set: {e}", location=Location(str(path))) from None
    conversations = data.get("conversations") if isinstance(data, dict) else None
    if not (isinstance(conversations, list) and all(
            isinstance(c, list) and c and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in c)
            for c in conversations)):
        raise DataError('expected {"conversations": [[{"role": ..., "content": ...}, ...], ...]}',
                        location=Location(str(path)))
    return conversations


class AuditItem(BaseModel):
    """One conversation to audit, where it came from, and whether a violation is expected (None: unknown)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    line: int
    conversation: list[dict[str, str]]
    label: bool | None = None


def read_audit_data(path: str | Path) -> list[AuditItem]:
    """JSONL lines `{"prompt"|"text": str}` or `{"conversation": [...]}` with an optional `label`, or a JSON
    `{"conversations": [...]}` (GAVEL test sets: `positive.json` is labelled true, `negative.json` false)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".json":
        label = {"positive.json": True, "negative.json": False}.get(path.name)
        return [AuditItem(source=str(path), line=0, conversation=c, label=label) for c in read_conversations(path)]
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON: {e.msg}") from None
        items.append(_item(record, str(path), number))
    if not items:
        raise DataError(f"{path}: no prompts or conversations")
    return items


def _item(record: object, source: str, line: int) -> AuditItem:
    where = f"{source}:{line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with `prompt`, `text` or `conversation`")
    text = record.get("prompt", record.get("text"))
    conversation = record.get("conversation")
    if (text is None) == (conversation is None):
        raise DataError(f"{where}: give exactly one of `prompt` (or `text`) and `conversation`")
    if text is not None:
        if not isinstance(text, str):
            raise DataError(f"{where}: `prompt` must be a string")
        conversation = [{"role": "user", "content": text}]
    if not (isinstance(conversation, list) and conversation and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conversation)):
        raise DataError(f"{where}: `conversation` must be a list of {{role, content}} messages")
    label = record.get("label")
    if label is not None and not isinstance(label, bool) and label not in (0, 1):
        raise DataError(f"{where}: `label` must be true/false (a violation is expected or not)")
    unknown = set(record) - {"prompt", "text", "conversation", "label", "id"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return AuditItem(source=source, line=line, conversation=conversation,
                     label=None if label is None else bool(label))

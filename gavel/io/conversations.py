"""Conversations and the files that hold them: role names and codes, message validation, GAVEL test sets
(`{"conversations": [...]}`) and audit data (JSONL prompts or conversations with optional labels)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from gavel.errors import DataError, Location, did_you_mean, excerpt, line_column

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


TEST_SET_KEYS = ("schema_version", "rule", "rule_public_id", "type", "config", "conversation_count", "conversations")
CONFIG_KEYS = ("scenario_instructions",)
SPEAKING_ROLES = ROLES[1:]


class GavelTestSet(BaseModel):
    """A GAVEL rule test set (`rules/<rule>/tests/positive.json` ...): its conversations and, when the envelope or
    the file name says, the rule it tests and whether its conversations violate it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    conversations: list[list[dict[str, str]]]
    rule: str | None = None
    type: str | None = None
    label: bool | None = None


def label_from_name(name: str) -> bool | None:
    """True for `positive*` files (`positive_calibration.json` too), False for `negative*`, else None."""
    return True if name.startswith("positive") else False if name.startswith("negative") else None


def read_test_set(path: Path) -> GavelTestSet:
    """A GAVEL test set: `{"conversations": [...]}`, or the whole envelope `{"schema_version": 1, "rule": ...,
    "rule_public_id": ..., "type": "positive", "config": {"scenario_instructions": ...}, "conversation_count": n,
    "conversations": [...]}`, every field checked (count and type against the file); raises a located DataError."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg}", location=Location(str(path), e.lineno, e.colno),
                        excerpt=excerpt(text, e.pos)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read this test set: {e}", location=Location(str(path))) from None

    def error(where: tuple[str | int, ...], message: str, hint: str | None = None) -> DataError:
        return _located(path, text, where, message, hint)

    if not isinstance(data, dict):
        raise error((), 'expected a test set {"conversations": [[{"role": ..., "content": ...}, ...], ...]}')
    for key in data:
        if key not in TEST_SET_KEYS:
            guess = did_you_mean(key, TEST_SET_KEYS)
            raise error((key,), f"unknown field {key!r} in a GAVEL test set; known: {', '.join(TEST_SET_KEYS)}",
                        f"did you mean {guess!r}?" if guess else None)
    if "schema_version" in data and data["schema_version"] != 1:
        raise error(("schema_version",), f"schema_version {data['schema_version']!r} is not supported; expected 1")
    for key in ("rule", "rule_public_id", "type"):
        if key in data and not isinstance(data[key], str):
            raise error((key,), f"`{key}` must be a string")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise error(("config",), "`config` must be an object {\"scenario_instructions\": ...}")
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise error(("config", key), f"unknown config field {key!r}; the only one is scenario_instructions")
        if not isinstance(value, str):
            raise error(("config", key), f"`config.{key}` must be a string")
    conversations = data.get("conversations")
    if not isinstance(conversations, list):
        raise error(("conversations",) if "conversations" in data else (),
                    'expected "conversations": [[{"role": ..., "content": ...}, ...], ...]')
    for i, conversation in enumerate(conversations):
        _check_messages(conversation, ("conversations", i), error)
    count = data.get("conversation_count")
    if count is not None and count != len(conversations):
        raise error(("conversation_count",), f"conversation_count is {count!r} but the file holds "
                                              f"{len(conversations)} conversations")
    kind = data.get("type")
    named = label_from_name(path.name)
    typed = None if kind is None else label_from_name(kind)
    if kind is not None and typed is None:
        raise error(("type",), f"unknown test set type {kind!r}; expected positive, positive_calibration or negative")
    if named is not None and typed is not None and named != typed:
        raise error(("type",), f"this file is named {path.name} but its type is {kind!r}",
                    "a positive* file holds positive conversations, a negative* file negative ones")
    return GavelTestSet(path=str(path), conversations=conversations, rule=data.get("rule"), type=kind,
                   label=named if named is not None else typed)


def _check_messages(conversation: object, at: tuple[str | int, ...], located) -> None:
    """A non-empty list of {role, content} messages with a known role (system, user, assistant); `located(path,
    message)` makes the error at a path below `at`."""
    def error(where: tuple[str | int, ...], message: str) -> DataError:
        return located((*at, *where), message)

    if not isinstance(conversation, list) or not conversation:
        raise error((), "a conversation must be a non-empty list of {role, content} messages")
    for j, m in enumerate(conversation):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise error((j,), "a message must be {\"role\": ..., \"content\": \"...\"} with string values")
        if m["role"] not in SPEAKING_ROLES:
            guess = did_you_mean(m["role"], SPEAKING_ROLES)
            raise error((j, "role"), f"unknown role {m['role']!r}; expected one of {', '.join(SPEAKING_ROLES)}"
                        + (f" (did you mean {guess!r}?)" if guess else ""))
        extra = set(m) - {"role", "content"}
        if extra:
            raise error((j, sorted(extra)[0]), f"unknown message field(s) {', '.join(sorted(extra))}; a message "
                                               "has role and content")


def _located(path: Path, text: str, where: tuple[str | int, ...], message: str, hint: str | None) -> DataError:
    """A DataError at the JSON value `where` (a key path), found by reading the file again with positions (JSON is
    YAML); the file alone when that fails."""
    from gavel.io.yamlsource import index_document, read_yaml

    try:
        _, node, _ = read_yaml(path, DataError)
        values, keys, _ = index_document(node)
    except DataError:
        return DataError(message, location=Location(str(path)), hint=hint)
    index = next((found[where[:n]] for n in range(len(where), -1, -1)
                  for found in (keys, values) if where[:n] in found), 0)
    line, column = line_column(text, index)
    return DataError(message, location=Location(str(path), line, column), excerpt=excerpt(text, index), hint=hint)


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a GAVEL test set (see `read_test_set`); raises DataError."""
    return read_test_set(path).conversations


class AuditItem(BaseModel):
    """One conversation to audit, where it came from, and whether a violation is expected (None: unknown); `rule`:
    the rule whose test set it comes from (its label is about that rule only)."""

    model_config = ConfigDict(extra="forbid")

    source: str
    line: int
    conversation: list[dict[str, str]]
    label: bool | None = None
    rule: str | None = None


def read_audit_data(paths: str | Path | Sequence[str | Path]) -> list[AuditItem]:
    """Audit items from files and folders, in order: JSONL lines `{"prompt"|"text": str}` or `{"conversation":
    [...]}` with an optional `label`; GAVEL test sets (`.json`, labelled by name: positive*, negative*, else by their
    `type`); a folder: every positive*/negative* test set in a `tests/` folder under it (a GAVEL `rules/` folder,
    one rule's folder, or its `tests/` folder)."""
    items: list[AuditItem] = []
    for path in [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]:
        for file in _data_files(path):
            items += _read_file(file)
    return items


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(f for f in path.rglob("*.json") if f.parent.name == "tests" or f.parent == path
                       if label_from_name(f.name) is not None)
        if not found:
            raise DataError(f"{path}: no GAVEL test sets (positive*.json, negative*.json in a tests/ folder) here")
        return found
    if not path.is_file():
        raise DataError(f"{path}: no such data file or folder")
    return [path]


def _read_file(path: Path) -> list[AuditItem]:
    if path.suffix == ".json":
        test_set = read_test_set(path)
        return [AuditItem(source=str(path), line=0, conversation=c, label=test_set.label, rule=test_set.rule)
                for c in test_set.conversations]
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

"""Labelled-span records (text or conversation, char/token spans, whole-example labels) to token label masks.

One record is one JSONL line or one labelled sample of a GAVEL CE file; its format is in docs/data.md.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gavel.errors import DataError, Location, did_you_mean, excerpt
from gavel.identifiers import is_identifier
from gavel.io.conversations import ROLES
from gavel.models.chat import Encoded, encode_conversation, encode_text
from gavel.probes.data.dataset import CEDataset, CEInfo, LabelledExample

RECORD_KEYS = ("text", "conversation", "spans", "token_spans", "labels", "ces", "meta")
_SPAN_KEYS = ("ce", "start", "end", "message")
_TOKEN_SPAN_KEYS = ("ce", "start", "end")
LABEL_ROLES = ROLES[1:]  # roles whose tokens can be labelled; template scaffolding ("none") never is


@dataclass(frozen=True, slots=True)
class Parsed:
    """One record, tokenized: the CEs it marks (token masks, each non-empty) and every CE it names."""

    encoded: Encoded
    positives: dict[str, torch.Tensor]  # CE -> bool [T]
    mentioned: tuple[str, ...]
    content: torch.Tensor               # bool [T]: message (or plain-text) tokens, the candidate negatives
    where: Location


def role_codes(roles: str | Iterable[str]) -> frozenset[int]:
    """The role codes whose tokens get labelled; DataError (with did-you-mean) for an unknown name."""
    names = [roles] if isinstance(roles, str) else list(roles)
    if not names:
        raise DataError("roles must name at least one of system, user, assistant")
    for name in names:
        if name not in LABEL_ROLES:
            guess = did_you_mean(str(name), LABEL_ROLES)
            raise DataError(f"unknown role {name!r} in roles; expected system, user or assistant",
                            hint=f"did you mean {guess!r}?" if guess else None)
    return frozenset(ROLES.index(n) for n in names)


def _fail(where: Location, message: str, hint: str | None = None) -> DataError:
    return DataError(message, location=where, hint=hint)


def _keys(obj: object, allowed: Sequence[str], what: str, where: Location) -> Mapping:
    if not isinstance(obj, Mapping):
        raise _fail(where, f"{what} must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            guess = did_you_mean(str(key), allowed)
            raise _fail(where, f"unknown field {key!r} in {what}; allowed: {', '.join(allowed)}",
                        f"did you mean {guess!r}?" if guess else None)
    return obj


def _names(record: Mapping, field: str, where: Location) -> list[str]:
    return [check_ce_name(v, where) for v in _list(record, field, "CE names", where)]


def check_ce_name(name: object, where: Location) -> str:
    """A CE name usable in rules: an identifier that is not a reserved word of the condition language."""
    if not isinstance(name, str) or not is_identifier(name):
        raise _fail(where, f"CE name {name!r} must be an identifier (letters, digits, _) and not a reserved word")
    return name


def _int(span: Mapping, key: str, what: str, where: Location) -> int:
    value = span.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"{what}: `{key}` must be an integer, got {value!r}")
    return value


def _encode(record: Mapping, tokenizer, where: Location) -> tuple[Encoded, list[dict[str, str]] | None]:
    """The record's tokens, and its messages when it is a conversation."""
    if ("text" in record) == ("conversation" in record):
        raise _fail(where, "a record needs exactly one of `text` or `conversation`")
    try:
        if "text" in record:
            if not isinstance(record["text"], str):
                raise DataError("`text` must be a string")
            if not record["text"].strip():
                raise DataError("empty text")
            return encode_text(tokenizer, record["text"]), None
        messages = record["conversation"]
        enc = encode_conversation(tokenizer, messages)
        if not any(m["content"].strip() for m in messages):
            raise DataError("conversation has no text")
        return enc, list(messages)
    except DataError as e:
        raise _fail(where, e.message, e.hint) from None


def _list(record: Mapping, field: str, shape: str, where: Location) -> list:
    value = record.get(field, [])
    if not isinstance(value, list):
        raise _fail(where, f"`{field}` must be a list of {shape}")
    return value


def _char_span(span: object, i: int, enc: Encoded, messages: list[dict[str, str]] | None, roles: frozenset[int],
               scope: str, where: Location) -> tuple[str, torch.Tensor, str]:
    """(CE, tokens overlapping the span, description) for one character span; offsets are into the text or
    into message `message`'s content."""
    what = f"span {i}"
    span = _keys(span, _SPAN_KEYS, what, where)
    ce = check_ce_name(span.get("ce"), where)
    start, end = _int(span, "start", what, where), _int(span, "end", what, where)
    what = f"span {i} ({ce} [{start}, {end}))"
    if messages is None:
        if "message" in span:
            raise _fail(where, f"{what}: `message` only applies to conversations")
        base, length = 0, len(enc.text)
    else:
        if "message" not in span:
            raise _fail(where, f"{what}: a span in a conversation needs `message` (the message index)")
        m = _int(span, "message", what, where)
        if not 0 <= m < len(messages):
            raise _fail(where, f"{what}: message {m} does not exist (the conversation has {len(messages)})")
        role = messages[m]["role"]
        if ROLES.index(role) not in roles:
            raise _fail(where, f"{what} lies in a {role} message, but only {scope} tokens are labelled",
                        f"pass roles including {role!r} to label it")
        base, length = enc.content_starts[m], len(messages[m]["content"])
    if not 0 <= start < end <= length:
        raise _fail(where, f"{what} is outside the text (length {length}) or empty")
    return ce, enc.char_mask(base + start, base + end), what


def _token_span(span: object, i: int, n_tokens: int, where: Location) -> tuple[str, torch.Tensor, str]:
    """(CE, tokens [start, end), description) for one token span."""
    what = f"token span {i}"
    span = _keys(span, _TOKEN_SPAN_KEYS, what, where)
    ce = check_ce_name(span.get("ce"), where)
    start, end = _int(span, "start", what, where), _int(span, "end", what, where)
    what = f"token span {i} ({ce} [{start}, {end}))"
    if not 0 <= start < end <= n_tokens:
        raise _fail(where, f"{what} is outside the example ({n_tokens} tokens) or empty")
    index = torch.arange(n_tokens)
    return ce, (index >= start) & (index < end), what


def parse_record(record: object, tokenizer, roles: frozenset[int], where: Location) -> Parsed:
    """Tokenize one record and turn its spans and labels into token masks (only tokens of `roles`).

    Plain text has no roles: all its tokens can be labelled. A span that marks no labellable token is an error.
    """
    record = _keys(record, RECORD_KEYS, "a record", where)
    enc, messages = _encode(record, tokenizer, where)
    if messages is None:
        content = allowed = enc.offsets[:, 1] > enc.offsets[:, 0]
        scope = "labelled"
    else:
        content = enc.roles != ROLES.index("none")
        allowed = torch.isin(enc.roles, torch.tensor(sorted(roles), dtype=enc.roles.dtype))
        scope = "/".join(ROLES[c] for c in sorted(roles))
    marks = [_char_span(s, i, enc, messages, roles, scope, where)
             for i, s in enumerate(_list(record, "spans", "{ce, start, end[, message]}", where))]
    marks += [_token_span(s, i, len(enc.input_ids), where)
              for i, s in enumerate(_list(record, "token_spans", "{ce, start, end}", where))]
    marks += [(ce, allowed, f"label {ce!r} (the whole example)") for ce in _names(record, "labels", where)]
    positives: dict[str, torch.Tensor] = {}
    for ce, mask, what in marks:
        mask = mask & allowed
        if not mask.any():
            raise _fail(where, f"{what} covers no {scope} token")
        positives[ce] = positives.get(ce, torch.zeros_like(mask)) | mask
    mentioned = [ce for ce, _, _ in marks] + _names(record, "ces", where)
    return Parsed(enc, positives, tuple(dict.fromkeys(mentioned)), content, where)


def assemble(parsed: Sequence[Parsed], ces: Sequence[CEInfo], declared: Mapping[str, Location],
             sources: Sequence[str]) -> CEDataset:
    """The dataset over `ces` (positives of other CEs are dropped); DataError for a CE with no positive
    or no negative token, at the place `declared` names for it."""
    names = [c.name for c in ces]
    examples = []
    positive = torch.zeros(len(names), dtype=torch.bool)
    negative = torch.zeros(len(names), dtype=torch.bool)
    for p, source in zip(parsed, sources):
        labels = torch.zeros(len(p.encoded.input_ids), len(names), dtype=torch.bool)
        for ce, mask in p.positives.items():
            if ce in names:
                labels[:, names.index(ce)] = mask
        positive |= labels.any(0)
        negative |= (p.content[:, None] & ~labels).any(0)
        examples.append(LabelledExample(p.encoded, labels, source))
    for j, name in enumerate(names):
        if not positive[j]:
            raise DataError(f"CE {name!r} has no positive token (after keeping only the chosen roles)",
                            location=declared.get(name))
        if not negative[j]:
            raise DataError(f"CE {name!r} has only positive tokens: every content token carries it, so there is "
                            "nothing to contrast it with", location=declared.get(name),
                            hint="add examples without it, or conversations whose other turns are neutral")
    return CEDataset(tuple(ces), tuple(examples))


def load_spans_jsonl(path: str | os.PathLike[str], tokenizer, *, roles: Sequence[str] = ("assistant",)) -> CEDataset:
    """A labelled-span JSONL file (one record per line; blank lines skipped); CEs in order of first mention."""
    codes = role_codes(roles)
    path = Path(path)
    text = read_text(path)
    parsed: list[Parsed] = []
    sources: list[str] = []
    declared: dict[str, Location] = {}
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = Location(str(path), n)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", location=Location(str(path), n, e.colno),
                            excerpt=excerpt(line, e.pos)) from None
        p = parse_record(record, tokenizer, codes, where)
        for ce in p.mentioned:
            declared.setdefault(ce, where)
        parsed.append(p)
        sources.append(f"{path}:{n}")
    if not parsed:
        raise DataError("no examples in file", location=Location(str(path)))
    return assemble(parsed, [CEInfo(name) for name in declared], declared, sources)


def read_text(path: Path) -> str:
    """A UTF-8 file's text (a BOM is dropped), or a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError("no such file", location=Location(str(path))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file: {e}", location=Location(str(path))) from None

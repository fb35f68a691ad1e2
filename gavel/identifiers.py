"""The names rules and CE banks share: what a CE, rule or group may be called so that a condition can refer to it."""
from __future__ import annotations

import re

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

RESERVED = frozenset({"and", "or", "not", "of", "all", "any", "once", "ever", "then", "within", "for", "over", "in",
                      "tokens", "token"})
"""The rule language's keywords: no CE, rule, group or parameter may be named like one."""


def is_identifier(name: object) -> bool:
    """Whether `name` can be written in a condition as it is (an identifier that is not a keyword)."""
    return isinstance(name, str) and IDENTIFIER.fullmatch(name) is not None and name not in RESERVED

"""Refusal judges for steering and alignment sweeps: the built-in phrase list, or a refusal CE of a CE bank read
by the monitor (a judge that is not the steering method's own yardstick)."""
from __future__ import annotations

from collections.abc import Sequence

from gavel.errors import DataError
from gavel.io.conversations import Conversation
from gavel.models.handle import ModelHandle
from gavel.probes.bank import CEBank
from gavel.rules import RuleSpec
from gavel.runtime.monitor import Monitor
from gavel.steering.evaluate import Judge, refusal_phrases


def judge_from(spec: str, handle: ModelHandle) -> Judge:
    """`phrases` (the built-in refusal phrases) or `BANK:CE` (a refusal CE of a saved bank, see `refusal_ce`)."""
    if spec == "phrases":
        return refusal_phrases
    bank_dir, _, ce = spec.rpartition(":")
    if not bank_dir:
        raise DataError(f"--judge {spec!r}: expected 'phrases' or BANK:CE")
    return refusal_ce(handle, CEBank.load(bank_dir, fingerprint=handle.fingerprint()), ce)


def refusal_ce(handle: ModelHandle, bank, ce: str) -> Judge:
    """A judge that reads a refusal CE from a bank: the reply is a refusal when the CE fires on one of its tokens
    (the monitor scans each conversation with the reply as its final assistant message)."""
    bank.index(ce)     # a CE the bank lacks is an error here, with a suggestion
    monitor = Monitor(handle, bank, [RuleSpec(name="refusal", condition=f"{ce} in response")])

    def judge(conversations: Sequence[Conversation], replies: Sequence[str]) -> list[bool]:
        full = [[*c, {"role": "assistant", "content": r}] for c, r in zip(conversations, replies)]
        return [bool(r.events) for r in monitor.scan(full)]
    return judge

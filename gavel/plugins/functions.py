"""Score functions: plugins (entry-point group `gavel.functions`) that add aggregates to the rule language.

`slope(harm) over 8 tokens > 0.05` compares what the `slope` plugin's `reduce` makes of each CE's last 8 scores
with 0.05, as `mean(harm) over 8 tokens > 0.05` does with their mean: a trend, a median or a spike detector is a
package of its own, with no change to the compiler. (torch appears in annotations only: the registry imports this
module, and loading it must not load torch.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

SCORE_FUNCTIONS = ("max", "min", "mean")
BUILTIN_FUNCTIONS = ("count", *SCORE_FUNCTIONS)
"""The rule language's own aggregates: a score function plugin may not take one of these names."""


@runtime_checkable
class ScoreFunction(Protocol):
    """A rule function of a CE's scores over a window: `name(ce) over N tokens op t` holds where `reduce`'s value
    for the window ending at the token satisfies `op t`. The compiler makes one instance per program; `reduce`
    runs on the program's device, on every window of a chunk at once (so it must be vectorised)."""

    name: ClassVar[str]

    def reduce(self, windows: Tensor, valid: Tensor) -> Tensor:
        """windows: float64 [..., N], one CE's scores over the last N tokens of the rule's view, oldest first;
        valid: bool [..., N], False for the slots before the sequence's first view token (those hold 0).
        Returns float [...]: the value compared with the rule's threshold."""
        ...

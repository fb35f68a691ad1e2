"""`align(alignment=...)` as an intervention plugin: LLM-VA's runtime projection at the alignment's selected sublayers,
for the sequence whose rule fired (the weight edit, for one sequence). The artifact is a `gavel align fit` folder
(or its `alignment/`), or a fitted `VectorAlignment`."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from gavel.plugins.interventions import Duration, SteeringMethod

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import BaseModel

    from gavel.models.handle import ModelHandle
    from gavel.steering.llmva.alignment import VectorAlignment
    from gavel.steering.llmva.edit import AlignmentIntervention


class AlignArgs(Duration):
    alignment: str = Field(description="an LLM-VA alignment (`gavel align fit` output: a name or a directory)")


class AlignMethod(SteeringMethod):
    """`align(alignment=...)`: answer only as far as the prompt reads as benign, for the sequence that fired."""

    name: ClassVar[str] = "align"
    params: ClassVar[type[BaseModel]] = AlignArgs
    artifact: ClassVar[str] = "alignment"
    artifact_type: ClassVar[str] = "gavel.steering.llmva.alignment:VectorAlignment"

    @classmethod
    def load(cls, path: Path, handle: ModelHandle) -> VectorAlignment:
        """A `gavel align fit` folder's alignment (or an alignment folder itself)."""
        from gavel.steering.llmva.loop import load_alignment

        return load_alignment(path, handle.fingerprint())

    @classmethod
    def build(cls, artifact: object, args: BaseModel, handle: ModelHandle) -> AlignmentIntervention:
        from gavel.steering.llmva.alignment import VectorAlignment
        from gavel.steering.llmva.edit import AlignmentIntervention

        if not isinstance(artifact, VectorAlignment):
            raise TypeError("align is built from a VectorAlignment")
        return AlignmentIntervention.from_alignment(artifact).to(handle.device)

"""`perturb(perturbation=...)` as an intervention plugin: DeconIEP. A rule that holds while the prompt is read (a
benchmark-style question, say) has that sequence's prompt embeddings carry the trained bounded perturbation, so a
contaminated model answers as a clean one would; the monitor reads the prompts once more to decide (`reads_prompt`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from gavel.plugins.interventions import Arguments, SteeringMethod

if TYPE_CHECKING:

    from pydantic import BaseModel

    from gavel.decon.intervention import EmbeddingPerturbation
    from gavel.models.handle import ModelHandle


class PerturbArgs(Arguments):
    perturbation: str = Field(description="a DeconIEP input perturbation (`gavel decon train` output: a name or a "
                                          "directory)")
    zeta: float | None = Field(default=None, ge=0, description="the bound |delta|_inf (default: the trained one)")


class PerturbMethod(SteeringMethod):
    """`perturb(perturbation=...)`: the prompt of the sequence that holds is read with G's bounded perturbation."""

    name: ClassVar[str] = "perturb"
    params: ClassVar[type[BaseModel]] = PerturbArgs
    artifact: ClassVar[str] = "perturbation"
    artifact_type: ClassVar[str] = "gavel.decon.train:DeconIEP"
    reads_prompt: ClassVar[bool] = True

    @classmethod
    def build(cls, artifact: object, args: BaseModel, handle: ModelHandle) -> EmbeddingPerturbation:
        from gavel.decon.intervention import EmbeddingPerturbation
        from gavel.decon.train import DeconIEP

        if not isinstance(artifact, DeconIEP) or not isinstance(args, PerturbArgs):
            raise TypeError("perturb is built from a DeconIEP and PerturbArgs")
        return EmbeddingPerturbation.from_decon(artifact, args.zeta).to(handle.device)

"""DeconIEP (arXiv 2601.19334): inference-time decontamination by a bounded perturbation of the prompt embeddings,
`delta = zeta * tanh(G(e(x)))`, trained so the contaminated model answers like a clean reference. See docs/decon.md.
"""
from gavel.decon.generator import PerturbationGenerator, bounded_delta
from gavel.decon.metrics import accuracy, benign_utility_drop, residual_contamination
from gavel.decon.perturb import PromptPerturbation, patch_prompt, perturbing, prompt_delta
from gavel.decon.train import DeconIEP, PerturbationManifest, decon_loss, sample_replies

__all__ = ["DeconIEP", "PerturbationGenerator", "PerturbationManifest", "PromptPerturbation", "accuracy",
           "benign_utility_drop", "bounded_delta", "decon_loss", "patch_prompt", "perturbing", "prompt_delta",
           "residual_contamination", "sample_replies"]

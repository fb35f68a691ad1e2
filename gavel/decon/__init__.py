"""DeconIEP (arXiv 2601.19334): inference-time decontamination by a bounded perturbation of the prompt embeddings,
`delta = zeta * tanh(G(e(x)))`, trained so the contaminated model answers like a clean reference. See docs/decon.md.

`generator` holds G, `train` the estimator and its loss, `perturb` the context manager that perturbs a model's
prompts, `intervention` and `action` the `perturb` rule action, `metrics` RC and BUD.
"""

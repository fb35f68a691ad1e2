"""Interventions: Selective Steering rotations, angular baselines, activation addition and ablation,
LLM-VA alignment, AdaRAS neuron steering, DeconIEP perturbations. Filled by the steering issues; the
math (rotations, closed-form edits) will live apart from the hook plumbing."""

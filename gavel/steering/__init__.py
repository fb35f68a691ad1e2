"""Interventions on activations: the intervention contract, calibration activations, steering sweeps and weight
deltas, and one subpackage per method (selective, llmva, adaras)."""

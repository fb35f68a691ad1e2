"""Interventions on activations. Selective Steering (a rotation in a plane fitted from two prompt classes), the
Angular Steering baselines, activation addition and directional ablation: `geometry` holds the math, `plane` the
fitted estimator and its artifact, `data` the calibration activations, `intervene` the hooks. LLM-VA, AdaRAS and
DeconIEP come in later issues."""
